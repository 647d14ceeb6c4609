"""RMSprop (``alpha``, ``eps``, ``momentum``, ``centered``, ``maximize``).

    g   = -g if maximize else g;  g += wd * w
    v   = alpha v + (1 - alpha) g^2
    c   = sqrt(v - gbar^2) + eps, gbar = gbar + (1 - alpha)(g - gbar)  (centered)
    c   = sqrt(v) + eps                                                (otherwise)
    buf = mu buf + g / c;  w = w - lr buf       (momentum > 0)
    w   = w - lr g / c                          (otherwise)

exactly as ``torch.optim.RMSprop``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import _foreach as F
from .base import Hyper, State, UpdateRule, gated, is_zero, kept, new_step_count, scratch
from .base import axpy, hyper_tangents, lincomb, or_zeros


class RMSpropRule(UpdateRule):
    kinds = ("lr", "momentum", "weight_decay")
    param_shaped_state = True

    def options(self, group: dict[str, Any]) -> dict[str, Any]:
        return {"alpha": group["alpha"], "eps": group["eps"], "centered": group["centered"],
                "maximize": group["maximize"], "has_momentum": group["momentum"] > 0}

    def init_state(self, param: Tensor, options: dict[str, Any]) -> State:
        state = {"step": new_step_count(param),
                 "square_avg": torch.zeros_like(param, memory_format=torch.preserve_format)}
        if options["has_momentum"]:
            state["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        if options["centered"]:
            state["grad_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        return state

    def update(self, param: Tensor, grad: Tensor, state: State, hyper: Hyper,
               options: dict[str, Any]) -> tuple[Tensor, State]:
        lr, momentum, wd = hyper["lr"], hyper["momentum"], hyper["weight_decay"]
        alpha, eps = options["alpha"], options["eps"]
        g = -grad if options["maximize"] else grad
        if not is_zero(wd):
            g = g + wd * param
        square_avg = alpha * state["square_avg"] + (1 - alpha) * g * g
        new_state = {"step": state["step"] + 1, "square_avg": square_avg}
        if options["centered"]:
            grad_avg = state["grad_avg"] + (1 - alpha) * (g - state["grad_avg"])
            new_state["grad_avg"] = grad_avg
            avg = (square_avg - grad_avg * grad_avg).sqrt() + eps
        else:
            avg = square_avg.sqrt() + eps
        if options["has_momentum"]:
            buf = momentum * state["momentum_buffer"] + g / avg
            new_state["momentum_buffer"] = buf
            return param - lr * buf, new_state
        return param - lr * g / avg, new_state

    def step_(self, param, grad, state, hyper, options, kinds, ok, work):
        """In place, like torch.optim.RMSprop, with closed-form tangents; a no-op for ok=0."""
        lr, momentum, wd = hyper["lr"], hyper["momentum"], hyper["weight_decay"]
        alpha, eps = options["alpha"], options["eps"]
        g = grad.neg_() if options["maximize"] else grad
        if not is_zero(wd):
            g.addcmul_(param, gated(ok, wd))
        square_avg = state["square_avg"]
        square_avg.mul_(kept(ok, alpha, 1.0)).addcmul_(g, g, value=1 - alpha)
        state["step"].add_(ok)
        root = scratch(work, "root", param)
        t_wd = scratch(work, "t_weight_decay", param) if "weight_decay" in kinds else None
        if options["centered"]:
            grad_avg = state["grad_avg"]
            grad_avg.lerp_(g, gated(ok, 1 - alpha))
            torch.addcmul(square_avg, grad_avg, grad_avg, value=-1, out=root).sqrt_()
            if t_wd is not None:   # d root / d wd = (1 - a)(g - gbar) w / root
                torch.sub(g, grad_avg, out=t_wd).mul_(param).mul_(1 - alpha)
        else:
            torch.sqrt(square_avg, out=root)
            if t_wd is not None:   # d root / d wd = (1 - a) g w / root
                torch.mul(g, param, out=t_wd).mul_(1 - alpha)
        if t_wd is not None:
            t_wd.div_(root).nan_to_num_(0.0)    # 0/0 where g = 0: the limit is 0
        avg = root.add_(eps)
        scaled = torch.div(g, avg, out=scratch(work, "scaled", param))
        if t_wd is not None:       # d scaled / d wd = (w - scaled d root) / avg
            t_wd.mul_(scaled).neg_().add_(param).div_(avg).mul_(-lr)
        t_mu = None
        if options["has_momentum"]:
            buf = state["momentum_buffer"]
            if "momentum" in kinds:
                t_mu = torch.mul(buf, -lr, out=scratch(work, "t_momentum", param))
            buf.mul_(kept(ok, momentum, 1.0)).add_(scaled)
            direction = buf
        else:
            direction = scaled
        tangents = {}
        for kind in kinds:
            if kind == "lr":
                tangents[kind] = torch.neg(direction, out=scratch(work, "t_lr", param))
            else:
                tangents[kind] = t_mu if kind == "momentum" else t_wd
        param.addcmul_(direction, gated(ok, lr), value=-1)
        return tangents

    def step_foreach(self, params, grads, states, hyper, options, kinds, ok, tangents):
        """:meth:`step_` on a whole bucket with foreach ops (as torch's
        ``_multi_tensor_rmsprop``); ``g / avg`` is built in the gradient buffers and the root in
        the lr tangent's until that is written (a new list only without one)."""
        if not params:
            return True
        lr, momentum, wd = hyper["lr"], hyper["momentum"], hyper["weight_decay"]
        alpha, eps = options["alpha"], options["eps"]
        g = grads
        if options["maximize"]:
            torch._foreach_neg_(g)
        if not is_zero(wd):
            F.axpy_(g, params, F.gate(ok, wd))
        square_avg = [s["square_avg"] for s in states]
        F.mul_(square_avg, F.keep(ok, alpha, 1.0))
        torch._foreach_addcmul_(square_avg, g, g, value=1 - alpha)
        F.add_count_([s["step"] for s in states], ok)
        loop = F.per_tensor(params)             # one-pass out= loops for big tensors
        root = tangents["lr"] if "lr" in kinds else None
        t_wd = tangents["weight_decay"] if "weight_decay" in kinds else None
        if options["centered"]:
            grad_avg = [s["grad_avg"] for s in states]
            F.lerp_(grad_avg, g, F.gate(ok, 1 - alpha))
            if root is None:
                root = list(torch._foreach_addcmul(square_avg, grad_avg, grad_avg, value=-1))
            else:
                F.addcmul_into(root, square_avg, grad_avg, grad_avg, -1, loop)
            torch._foreach_sqrt_(root)
            if t_wd is not None:   # d root / d wd = (1 - a)(g - gbar) w / root
                F.sub_into(t_wd, g, grad_avg, loop)
                torch._foreach_mul_(t_wd, params)
        else:
            if root is None:
                root = list(torch._foreach_sqrt(square_avg))
            else:
                F.sqrt_into(root, square_avg, loop)
            if t_wd is not None:   # d root / d wd = (1 - a) g w / root
                F.mul_into(t_wd, g, params, loop)
        if t_wd is not None:
            F.mul_(t_wd, 1 - alpha)
            torch._foreach_div_(t_wd, F.nonzero_floor(root))   # 0/0 where g = 0: the limit 0
        avg = root
        torch._foreach_add_(avg, F.as_list(eps, avg))
        scaled = g
        torch._foreach_div_(scaled, avg)
        if t_wd is not None:       # d scaled / d wd = (w - scaled d root) / avg, times -lr
            torch._foreach_mul_(t_wd, scaled)
            torch._foreach_sub_(t_wd, params)
            torch._foreach_div_(t_wd, avg)
            F.mul_(t_wd, lr)
        if options["has_momentum"]:
            buf = [s["momentum_buffer"] for s in states]
            if "momentum" in kinds:
                F.into_(tangents["momentum"], buf, -F.Coef(lr), loop)
            F.mul_(buf, F.keep(ok, momentum, 1.0))
            torch._foreach_add_(buf, scaled, alpha=1)
            direction = buf
        else:
            direction = scaled
        if "lr" in kinds:
            F.neg_into(tangents["lr"], direction, loop)
        F.axpy_gated_(params, direction, ok, lr, alpha=-1.0)
        return True

    def jvp(self, param, grad, state, hyper, options, tangents):
        """Forward products of :meth:`update` in closed form, for tangents
        ``(Z_w, G, Z_v, Z_gbar, Z_b, L)`` (``s = -1`` if maximize else 1, ``a`` = alpha)::

            g   = s g + wd w                dg     = s G + wd Z_w + w L_wd
            v'  = a v + (1 - a) g^2         Z_v'   = a Z_v + 2 (1 - a) g dg
            gb' = a gb + (1 - a) g          Z_gb'  = a Z_gb + (1 - a) dg        (centered)
            x   = v' - gb'^2 (centered)     dx     = Z_v' - 2 gb' Z_gb'         (else x = v')
            c   = sqrt(x) + eps,  y = g / c dy     = (dg - y dx / (2 sqrt(x))) / c
            b'  = mu b + y  (momentum)      Z_b'   = mu Z_b + b L_mu + dy
            w'  = w - lr b'                 Z_w'   = Z_w - lr Z_b' - b' L_lr
            w'  = w - lr y  (otherwise)     Z_w'   = Z_w - lr dy - y L_lr

        Where ``x = 0`` (the gradient and the averages zero) the term through ``sqrt(x)`` is
        taken as its limit 0 (``y`` is 0 there), not forward mode's NaN.
        """
        lr, mu, wd = hyper["lr"], hyper["momentum"], hyper["weight_decay"]
        alpha, eps = options["alpha"], options["eps"]
        centered, has_momentum = options["centered"], options["has_momentum"]
        sign = -1.0 if options["maximize"] else 1.0
        lams = [hyper_tangents(tan, hyper) for tan in tangents]
        wanted = set().union(*lams)
        g = grad.neg() if options["maximize"] else grad
        if not is_zero(wd):
            g = axpy(g, param, wd)
        x = torch.mul(state["square_avg"], alpha).addcmul_(g, g, value=1 - alpha)
        if centered:
            grad_avg = torch.lerp(state["grad_avg"], g, 1 - alpha)
            c_gbar = grad_avg * -2
            x.addcmul_(grad_avg, grad_avg, value=-1)
        root = x.sqrt_()
        inv_c = torch.add(root, eps).reciprocal_()
        scaled = g * inv_c
        # d y / d x = -y / (2 sqrt(x) c): 0 where x = 0 (the limit)
        c_x = torch.mul(root, -2).reciprocal_().masked_fill_(root == 0, 0.0).mul_(scaled)
        c_x.mul_(inv_c)
        c_g2 = g * (2 * (1 - alpha))
        neg_lr = -lr
        if has_momentum:
            buf = state["momentum_buffer"]
            direction = axpy(scaled, buf, mu)
        else:
            direction = scaled
            c_x.mul_(neg_lr)                # Z_w' gets -lr dy directly
            c_g = inv_c * neg_lr
        neg_dir = direction.neg() if "lr" in wanted else None
        results = []
        for tan, lam in zip(tangents, lams):
            z_state = tan.state or {}
            dg = lincomb(param, (tan.grad, sign), (tan.param, wd),
                         (lam.get("weight_decay"), param))
            z_v = lincomb(param, (z_state.get("square_avg"), alpha), (dg, c_g2))
            new_z_state = {"square_avg": or_zeros(z_v, param)}
            dx = z_v
            if centered:
                z_gbar = lincomb(param, (z_state.get("grad_avg"), alpha), (dg, 1 - alpha))
                new_z_state["grad_avg"] = or_zeros(z_gbar, param)
                dx = lincomb(param, (z_v, 1.0), (z_gbar, c_gbar))
            if has_momentum:
                z_buf = lincomb(param, (z_state.get("momentum_buffer"), mu),
                                (lam.get("momentum"), buf), (dg, inv_c), (dx, c_x))
                new_z_state["momentum_buffer"] = or_zeros(z_buf, param)
                z_param = lincomb(param, (tan.param, 1.0), (z_buf, neg_lr),
                                  (lam.get("lr"), neg_dir))
            else:
                z_param = lincomb(param, (tan.param, 1.0), (dg, c_g), (dx, c_x),
                                  (lam.get("lr"), neg_dir))
            results.append((or_zeros(z_param, param), new_z_state))
        return results
