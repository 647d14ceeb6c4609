"""Adagrad (``lr_decay``, ``initial_accumulator_value``, ``eps``, ``maximize``).

    g = -g if maximize else g;  g += wd * w;  t += 1
    s = s + g^2
    w = w - lr / (1 + (t - 1) lr_decay) * g / (sqrt(s) + eps)

exactly as ``torch.optim.Adagrad`` (dense gradients).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import _foreach as F
from .base import Hyper, State, UpdateRule, gated, is_zero, new_step_count, scratch
from .base import step_count_as_float64
from .base import axpy, hyper_tangents, lincomb, or_zeros


class AdagradRule(UpdateRule):
    kinds = ("lr", "weight_decay")
    param_shaped_state = True

    def options(self, group: dict[str, Any]) -> dict[str, Any]:
        return {"lr_decay": group["lr_decay"], "eps": group["eps"], "maximize": group["maximize"],
                "initial_accumulator_value": group["initial_accumulator_value"]}

    def init_state(self, param: Tensor, options: dict[str, Any]) -> State:
        return {"step": new_step_count(param),
                "sum": torch.full_like(param, options["initial_accumulator_value"],
                                       memory_format=torch.preserve_format)}

    def update(self, param: Tensor, grad: Tensor, state: State, hyper: Hyper,
               options: dict[str, Any]) -> tuple[Tensor, State]:
        lr, wd = hyper["lr"], hyper["weight_decay"]
        g = -grad if options["maximize"] else grad
        if not is_zero(wd):
            g = g + wd * param
        step = state["step"] + 1
        total = state["sum"] + g * g
        clr = lr / (1 + (step_count_as_float64(step) - 1) * options["lr_decay"])
        return param - clr * g / (total.sqrt() + options["eps"]), {"step": step, "sum": total}

    def step_(self, param, grad, state, hyper, options, kinds, ok, work):
        """In place, like torch.optim.Adagrad, with closed-form tangents; a no-op for ok=0."""
        lr, wd = hyper["lr"], hyper["weight_decay"]
        g = grad.neg_() if options["maximize"] else grad
        if not is_zero(wd):
            g.addcmul_(param, gated(ok, wd))
        step = state["step"].add_(ok)
        total = state["sum"].addcmul_(g, g)
        root = torch.sqrt(total, out=scratch(work, "root", param))
        t_wd = None
        if "weight_decay" in kinds:  # d std / d wd = g w / sqrt(s); 0/0 where g = 0: limit 0
            t_wd = torch.mul(g, param, out=scratch(work, "t_weight_decay", param))
            t_wd.div_(root).nan_to_num_(0.0)
        std = root.add_(options["eps"])
        scaled = torch.div(g, std, out=scratch(work, "scaled", param))
        decay = 1 + (step_count_as_float64(step) - 1) * options["lr_decay"]
        clr = lr / decay
        tangents = {}
        for kind in kinds:
            if kind == "lr":
                tangents[kind] = torch.mul(scaled, -1 / decay, out=scratch(work, "t_lr", param))
            else:
                tangents[kind] = t_wd.mul_(scaled).neg_().add_(param).div_(std).mul_(-clr)
        param.addcmul_(scaled, clr * ok, value=-1)
        return tangents

    def step_foreach(self, params, grads, states, hyper, options, kinds, ok, tangents):
        """:meth:`step_` on a whole bucket with foreach ops (as torch's
        ``_multi_tensor_adagrad``); ``g / std`` is built in the gradient buffers and the root in
        the lr tangent's until that is written.  With ``lr_decay = 0`` (the default) the decay
        is exactly 1 and the step counters are not read."""
        if not params:
            return True
        lr, wd = hyper["lr"], hyper["weight_decay"]
        g = grads
        if options["maximize"]:
            torch._foreach_neg_(g)
        if not is_zero(wd):
            F.axpy_(g, params, F.gate(ok, wd))
        steps = [s["step"] for s in states]
        F.add_count_(steps, ok)
        total = [s["sum"] for s in states]
        torch._foreach_addcmul_(total, g, g)
        t_lr = tangents["lr"] if "lr" in kinds else None
        t_wd = tangents["weight_decay"] if "weight_decay" in kinds else None
        loop = F.per_tensor(params)             # one-pass out= loops for big tensors
        if t_lr is None:
            root = list(torch._foreach_sqrt(total))
        else:
            root = t_lr                 # scratch until the lr tangent is written
            F.sqrt_into(root, total, loop)
        if t_wd is not None:            # d std / d wd = g w / sqrt(s); 0/0 where g = 0: limit 0
            F.mul_into(t_wd, g, params, loop)
            torch._foreach_div_(t_wd, F.nonzero_floor(root))
        std = root
        torch._foreach_add_(std, F.as_list(options["eps"], std))
        scaled = g
        torch._foreach_div_(scaled, std)
        lr_decay = options["lr_decay"]
        decay = (1.0 if lr_decay == 0
                 else 1 + (step_count_as_float64(torch.stack(steps)) - 1) * lr_decay)
        clr = F.Coef(lr) / F.Coef(decay)
        if t_wd is not None:            # (w - scaled d std) / std, times -clr
            torch._foreach_mul_(t_wd, scaled)
            torch._foreach_sub_(t_wd, params)
            torch._foreach_div_(t_wd, std)
            F.mul_(t_wd, clr)
        if t_lr is not None:
            F.into_(t_lr, scaled, -1 / F.Coef(decay), loop)
        F.axpy_(params, scaled, clr * F.Coef(ok), alpha=-1.0)
        return True

    def jvp(self, param, grad, state, hyper, options, tangents):
        """Forward products of :meth:`update` in closed form, for tangents
        ``(Z_w, G, Z_S, L)`` (``s = -1`` if maximize else 1, ``t`` the old step count)::

            g  = s g + wd w                 dg    = s G + wd Z_w + w L_wd
            S' = S + g^2                    Z_S'  = Z_S + 2 g dg
            c  = sqrt(S') + eps, y = g / c  dy    = (dg - y Z_S' / (2 sqrt(S'))) / c
            w' = w - lr / q y,  q = 1 + t lr_decay
                                            Z_w'  = Z_w - (lr / q) dy - (y / q) L_lr

        Where ``S' = 0`` (the gradient and the sum zero) the term through ``sqrt(S')`` is taken
        as its limit 0 (``y`` is 0 there), not forward mode's NaN.
        """
        lr, wd = hyper["lr"], hyper["weight_decay"]
        sign = -1.0 if options["maximize"] else 1.0
        lams = [hyper_tangents(tan, hyper) for tan in tangents]
        g = grad.neg() if options["maximize"] else grad
        if not is_zero(wd):
            g = axpy(g, param, wd)
        root = torch.addcmul(state["sum"], g, g).sqrt_()
        inv_c = torch.add(root, options["eps"]).reciprocal_()
        scaled = g * inv_c
        decay = 1 + step_count_as_float64(state["step"]) * options["lr_decay"]
        clr = lr / decay
        c_g = inv_c * -clr                                  # of dg in Z_w'
        # of Z_S' in Z_w': clr y / (2 sqrt(S') c), 0 where S' = 0 (the limit)
        c_s = torch.mul(root, 2).reciprocal_().masked_fill_(root == 0, 0.0).mul_(scaled)
        c_s.mul_(inv_c).mul_(clr)
        c_lr = scaled / -decay if any("lr" in lam for lam in lams) else None
        two_g = g * 2
        results = []
        for tan, lam in zip(tangents, lams):
            z_state = tan.state or {}
            dg = lincomb(param, (tan.grad, sign), (tan.param, wd),
                         (lam.get("weight_decay"), param))
            z_sum = lincomb(param, (z_state.get("sum"), 1.0), (dg, two_g))
            z_param = lincomb(param, (tan.param, 1.0), (dg, c_g), (z_sum, c_s),
                              (lam.get("lr"), c_lr))
            results.append((or_zeros(z_param, param), {"sum": or_zeros(z_sum, param)}))
        return results
