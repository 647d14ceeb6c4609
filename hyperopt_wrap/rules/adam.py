"""Adam and AdamW (``amsgrad``, ``maximize``, coupled or decoupled weight decay).

    g  = -g if maximize else g
    w  = w * (1 - lr * wd)            (AdamW: decoupled)   |  g = g + wd * w   (Adam)
    m  = m + (1 - b1) (g - m);        v = b2 v + (1 - b2) g^2;     t += 1
    vh = max(vh, v)                   (amsgrad)
    w  = w - lr / (1 - b1^t) * m / (sqrt(v or vh) / sqrt(1 - b2^t) + eps)

exactly as ``torch.optim.Adam``/``AdamW``.  "momentum" is beta1.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from . import _foreach as F
from .base import (Hyper, State, UpdateRule, add_scaled_, axpy, gated, is_zero, kept,
                   new_step_count, reduce_like, scratch, step_count_as_float64)
from .base import StateAlias, hyper_tangents, lincomb, or_zeros
from .base import fused_lr_runs as _runs, fused_scalar_lr as _scalar_lr

_FUSED_ADAM = hasattr(torch, "_fused_adam_")


class AdamDirection(StateAlias):
    """Adam's lr tangent as the state holds it after a step, computed when read::

        d w' / d lr = -r / bc1,   r = m' / (sqrt(v') / bc2s + eps) = bc2s m' / (sqrt(v') + eps bc2s)

    with ``v'`` amsgrad's running max where it keeps one and the bias corrections at each
    parameter's own counter (clamped at 1: before any step the moments are 0 and so is the
    tangent).  The denominators are built in the bucket's scratch, one parameter-sized buffer
    per tensor kept in ``work``."""
    __slots__ = ("seconds", "steps", "beta1", "beta2", "eps", "amsgrad", "work")

    def __init__(self, exp_avgs, seconds, steps, beta1, beta2, eps, amsgrad, work):
        super().__init__(exp_avgs, -1.0)
        self.seconds, self.steps = seconds, steps
        self.beta1, self.beta2, self.eps, self.amsgrad = beta1, beta2, eps, amsgrad
        self.work = work

    @property
    def settings(self) -> tuple:
        return (self.beta1, self.beta2, self.eps, self.amsgrad)

    def _ratios(self) -> tuple[list[Tensor], Tensor]:
        """``bc2s m' / (sqrt(v') + eps bc2s)`` per tensor (in the scratch) and ``-1 / bc1``
        per tensor (a float64 vector)."""
        t = step_count_as_float64(torch.stack(self.steps)).clamp(min=1)
        bc2s = (1 - self.beta2 ** t).sqrt()
        factors = (-bc2s / (1 - self.beta1 ** t))
        eps_bc2s = self.eps * bc2s
        out = []
        for i, (m, v) in enumerate(zip(self.tensors, self.seconds)):
            d = scratch(self.work, i, m)
            torch.sqrt(v, out=d).add_(eps_bc2s[i])
            out.append(torch.div(m, d, out=d))
        return out, factors

    def parts(self):
        ratios, factors = self._ratios()
        return [r.mul(factors[i].to(r.dtype)) for i, r in enumerate(ratios)], 1.0

    def dots(self, metas):
        ratios, factors = self._ratios()
        dots = torch.stack([torch.vdot(g.reshape(-1), r.reshape(-1))
                            for g, r in zip(metas, ratios)])
        return dots * factors


class AdamRule(UpdateRule):
    kinds = ("lr", "momentum", "weight_decay")
    param_shaped_state = True

    def __init__(self, decoupled_weight_decay: bool = False):
        self.decoupled_weight_decay = decoupled_weight_decay

    def read(self, group, kind):
        return float(group["betas"][0]) if kind == "momentum" else float(group[kind])

    def write(self, group, kind, value):
        if kind == "momentum":
            group["betas"] = (value, group["betas"][1])
        else:
            group[kind] = value

    def options(self, group: dict[str, Any]) -> dict[str, Any]:
        return {"beta2": group["betas"][1], "eps": group["eps"], "amsgrad": group["amsgrad"],
                "maximize": group["maximize"],
                "decoupled": group.get("decoupled_weight_decay", self.decoupled_weight_decay)}

    def init_state(self, param: Tensor, options: dict[str, Any]) -> State:
        state = {"step": new_step_count(param),
                 "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
                 "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format)}
        if options["amsgrad"]:
            state["max_exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        return state

    def update(self, param: Tensor, grad: Tensor, state: State, hyper: Hyper,
               options: dict[str, Any]) -> tuple[Tensor, State]:
        lr, beta1, wd = hyper["lr"], hyper["momentum"], hyper["weight_decay"]
        beta2, eps = options["beta2"], options["eps"]
        g = -grad if options["maximize"] else grad
        if not is_zero(wd):
            if options["decoupled"]:
                param = param * (1 - lr * wd)
            else:
                g = g + wd * param
        step = state["step"] + 1
        exp_avg = state["exp_avg"] + (1 - beta1) * (g - state["exp_avg"])
        exp_avg_sq = beta2 * state["exp_avg_sq"] + (1 - beta2) * g * g
        new_state = {"step": step, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
        t = step_count_as_float64(step)
        bias_correction1 = 1 - beta1 ** t
        bias_correction2_sqrt = (1 - beta2 ** t).sqrt()
        second = exp_avg_sq
        if options["amsgrad"]:
            second = torch.maximum(state["max_exp_avg_sq"], exp_avg_sq)
            new_state["max_exp_avg_sq"] = second
        denom = second.sqrt() / bias_correction2_sqrt + eps
        return param - (lr / bias_correction1) * exp_avg / denom, new_state

    def step_(self, param, grad, state, hyper, options, kinds, ok, work):
        """In place, like torch.optim.Adam, with closed-form tangents; a no-op for ok=0."""
        lr, beta1, wd = hyper["lr"], hyper["momentum"], hyper["weight_decay"]
        beta2, eps, amsgrad = options["beta2"], options["eps"], options["amsgrad"]
        coupled = not is_zero(wd) and not options["decoupled"]
        decoupled = not is_zero(wd) and options["decoupled"]
        if amsgrad and coupled and "weight_decay" in kinds:
            return None     # rare: forward mode through update() handles torch.maximum's kink
        g = grad.neg_() if options["maximize"] else grad
        if coupled:
            g.addcmul_(param, gated(ok, wd))
        exp_avg, exp_avg_sq, step = state["exp_avg"], state["exp_avg_sq"], state["step"]
        t_b1 = torch.sub(exp_avg, g, out=scratch(work, "t_momentum", param)) \
            if "momentum" in kinds else None   # d m / d b1 = m_old - g
        exp_avg.lerp_(g, gated(ok, 1 - beta1))
        exp_avg_sq.mul_(kept(ok, beta2, 1.0)).addcmul_(g, g, value=1 - beta2)
        step.add_(ok)
        t = step_count_as_float64(step).clamp(min=1)
        bias_correction1 = 1 - beta1 ** t
        bias_correction2_sqrt = (1 - beta2 ** t).sqrt()
        second = exp_avg_sq
        if amsgrad:   # a no-op for ok=0: the running max already bounds the unchanged v
            second = torch.maximum(state["max_exp_avg_sq"], exp_avg_sq,
                                   out=state["max_exp_avg_sq"])
        denom = torch.sqrt(second, out=scratch(work, "denom", param))
        t_wd = None
        if "weight_decay" in kinds:
            t_wd = scratch(work, "t_weight_decay", param)
            if coupled:     # d denom / d wd = (1 - b2) g w / (sqrt(v) sqrt(bc2)); 0/0 -> 0
                torch.mul(g, param, out=t_wd).mul_(1 - beta2).div_(denom).nan_to_num_(0.0)
                t_wd.div_(bias_correction2_sqrt)
            else:
                torch.mul(param, -lr, out=t_wd)
        denom.div_(bias_correction2_sqrt).add_(eps)
        # m / denom; in the denominator's own buffer unless a tangent still needs the latter
        reuse = "momentum" not in kinds and not (coupled and "weight_decay" in kinds)
        ratio = torch.div(exp_avg, denom, out=denom if reuse else scratch(work, "ratio", param))
        step_size = lr / bias_correction1
        tangents = {}
        for kind in kinds:
            if kind == "lr":
                t_lr = torch.mul(ratio, -1 / bias_correction1, out=scratch(work, "t_lr", param))
                tangents[kind] = add_scaled_(t_lr, param, -wd) if decoupled else t_lr
            elif kind == "momentum":
                d_bc1 = -t * beta1 ** (t - 1)
                add_scaled_(t_b1.div_(denom), ratio, -d_bc1 / bias_correction1)
                tangents[kind] = t_b1.mul_(-step_size)
            else:
                if coupled:
                    add_scaled_(t_wd.mul_(ratio).neg_(), param, 1 - beta1)
                    t_wd.div_(denom).mul_(-step_size)
                tangents[kind] = t_wd
        if decoupled:
            param.mul_(1 - lr * wd * ok)
        param.addcmul_(ratio, step_size * ok, value=-1)
        return tangents

    def step_foreach(self, params, grads, states, hyper, options, kinds, ok, tangents):
        """:meth:`step_` on a whole bucket with foreach ops (as torch's ``_multi_tensor_adam``).

        The bias corrections are computed once, on the step counters stacked into a vector,
        and folded into the denominator, ``D' = sqrt(v) + eps bc2s = bc2s (sqrt(v) / bc2s +
        eps)``, so that ``ratio = m / denom = bc2s m / D'`` takes no division pass of its own
        (same numbers as :meth:`step_` up to rounding, not bit for bit).  ``D'`` is built in
        the gradient buffers; with a tuned lr the weights move as ``w + lr ok t_lr``."""
        lr, beta1, wd = hyper["lr"], hyper["momentum"], hyper["weight_decay"]
        beta2, eps, amsgrad = options["beta2"], options["eps"], options["amsgrad"]
        coupled = not is_zero(wd) and not options["decoupled"]
        decoupled = not is_zero(wd) and options["decoupled"]
        if amsgrad and coupled and "weight_decay" in kinds:
            return False        # as step_: forward mode through update() handles the kink
        if not params:
            return True
        g = grads
        if options["maximize"]:
            torch._foreach_neg_(g)
        if coupled:
            F.axpy_(g, params, F.gate(ok, wd))
        m = [s["exp_avg"] for s in states]
        v = [s["exp_avg_sq"] for s in states]
        steps = [s["step"] for s in states]
        loop = F.per_tensor(params)             # one-pass out= loops for big tensors
        b1 = F.Coef(beta1)
        t_b1 = tangents["momentum"] if "momentum" in kinds else None
        t_wd = tangents["weight_decay"] if "weight_decay" in kinds else None
        if t_b1 is not None:                    # d m / d b1 = m_old - g
            F.sub_into(t_b1, m, g, loop)
        F.lerp_(m, g, F.gate(ok, 1 - b1))
        F.mul_(v, F.keep(ok, beta2, 1.0))
        torch._foreach_addcmul_(v, g, g, value=1 - beta2)
        F.add_count_(steps, ok)
        t = step_count_as_float64(torch.stack(steps)).clamp_(min=1)  # the counters, one vector
        bc2s = F.Coef((1 - beta2 ** t).sqrt())
        t, okc = F.Coef(t), F.Coef(ok)
        bc1 = 1 - b1 ** t
        second = v
        if amsgrad:     # a no-op for ok=0: the running max already bounds the unchanged v
            second = [s["max_exp_avg_sq"] for s in states]
            torch._foreach_maximum_(second, v)
        if t_wd is not None and coupled:        # g w, for d sqrt(v) / d wd
            F.mul_into(t_wd, g, params, loop)
        denom = g                               # sqrt(v) + eps bc2s, in the gradient buffers
        F.sqrt_into(denom, second, loop)
        if t_wd is not None and coupled:        # g w / sqrt(v); 0/0 -> 0 (v = 0 means g = 0)
            torch._foreach_div_(t_wd, F.nonzero_floor(denom))
        F.add_(denom, eps * bc2s)
        step_size = F.Coef(lr) / bc1
        for kind in kinds:
            if kind == "lr":                    # -ratio / bc1 (- wd w, decoupled)
                F.div_into(tangents[kind], m, denom, -bc2s / bc1, loop)
                if decoupled:
                    F.axpy_(tangents[kind], params, -F.Coef(wd))
            elif kind == "momentum":
                # -step_size ((m_old - g) / denom - ratio d_bc1 / bc1), d_bc1 = d bc1 / d b1
                d_bc1 = -t * b1 ** (t - 1)
                F.axpy_(t_b1, m, -d_bc1 / bc1)
                torch._foreach_div_(t_b1, denom)
                F.mul_(t_b1, -step_size * bc2s)
            elif coupled:
                # -step_size (-(t ratio) + (1 - b1) w) / denom, t = (1 - b2) g w / (sqrt(v) bc2s)
                torch._foreach_mul_(t_wd, m)
                torch._foreach_div_(t_wd, denom)
                F.mul_(t_wd, -(1 - beta2))
                F.axpy_(t_wd, params, 1 - b1)
                torch._foreach_div_(t_wd, denom)
                F.mul_(t_wd, -step_size * bc2s)
            else:
                F.into_(t_wd, params, -F.Coef(lr), loop)
        if "lr" in kinds:   # w' = w + lr ok t_lr, AdamW's decay included: one pass, two reads
            F.axpy_gated_(params, tangents["lr"], ok, lr)
        else:
            if decoupled:
                F.mul_(params, 1 - F.Coef(lr) * F.Coef(wd) * okc)
            F.addcdiv_(params, m, denom, -(step_size * okc) * bc2s)
        return True

    def fused_tangents(self, states, hyper, options, kinds, work):
        """torch's fused Adam kernel takes a step with an lr shared by the bucket or one per
        tensor (a call each; L2 weight decay, amsgrad and maximize included; not AdamW's decoupled decay, whose lr tangent
        reads the weights before the step): one pass over weights, gradient and moments.  The
        lr tangent is computed from the moments when it is read (:class:`AdamDirection`)."""
        if not set(kinds) <= {"lr"} or not _FUSED_ADAM:
            return None
        lr, beta1, wd = hyper["lr"], hyper["momentum"], hyper["weight_decay"]
        if not (isinstance(beta1, float) and isinstance(wd, float) and _scalar_lr(lr)
                and not (wd != 0 and options["decoupled"])):
            return None
        amsgrad = options["amsgrad"]
        names = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ())
        if not all(s.get(n) is not None and s[n].is_contiguous() for s in states for n in names):
            return None     # (the kernel walks storage order: layouts must agree)
        seconds = [s["max_exp_avg_sq" if amsgrad else "exp_avg_sq"] for s in states]
        alias = AdamDirection([s["exp_avg"] for s in states], seconds,
                              [s["step"] for s in states], beta1, options["beta2"],
                              options["eps"], amsgrad, work)
        return {"lr": alias} if kinds else {}

    def step_fused(self, params, grads, states, hyper, options, found_inf):
        """As torch's ``_fused_adam``: the counters advance by ``1 - found_inf`` first (a
        skipped step leaves them, as it leaves everything), then the kernel."""
        steps = [s["step"] for s in states]
        ok = 1 - found_inf
        ok = ok if ok.dtype == steps[0].dtype else ok.to(steps[0].dtype)
        torch._foreach_add_(steps, [ok] * len(steps))
        amsgrad = options["amsgrad"]
        lr = hyper["lr"]
        for idx in _runs(lr, len(params)):     # one call, or one per tensor (per-tensor lr)
            sub = [states[i] for i in idx]
            torch._fused_adam_(
                [params[i] for i in idx], [grads[i] for i in idx],
                [s["exp_avg"] for s in sub], [s["exp_avg_sq"] for s in sub],
                [s["max_exp_avg_sq"] for s in sub] if amsgrad else [], [steps[i] for i in idx],
                lr=lr[idx[0]] if isinstance(lr, list) else lr, beta1=hyper["momentum"],
                beta2=options["beta2"], weight_decay=hyper["weight_decay"], eps=options["eps"],
                amsgrad=amsgrad, maximize=options["maximize"], grad_scale=None,
                found_inf=found_inf)

    def vjp(self, param, grad, state, hyper, options, cot_param, cot_state, inputs, kinds):
        """Reverse products of :meth:`update` in closed form, with cotangents ``a`` of the new
        weights and ``c_m``, ``c_v`` of the new moments::

            w' = w1 - k r,   k = lr / bc1,   r = m' / (sqrt(v') / bc2s + eps)
            m' = b1 m + (1 - b1) g,   v' = b2 v + (1 - b2) g^2,   bc1 = 1 - b1^t'

        Where ``v' = 0`` (the gradient and both moments zero) the derivative through
        ``sqrt(v')`` is taken as its limit 0 (``r`` is 0 there), not autograd's NaN.
        amsgrad (``torch.maximum``'s kink) declines: autograd through ``update`` serves it.
        """
        if options["amsgrad"]:
            return None
        # Temporaries are updated in place where this function owns them: on CPU a fresh
        # parameter-sized allocation costs about as much as the arithmetic.
        lr, beta1, wd = hyper["lr"], hyper["momentum"], hyper["weight_decay"]
        beta2, eps, maximize = options["beta2"], options["eps"], options["maximize"]
        coupled = not is_zero(wd) and not options["decoupled"]
        decoupled = not is_zero(wd) and options["decoupled"]
        a = torch.zeros_like(param) if cot_param is None else cot_param
        g, m, t, bc1, bc2s, m_new, v_new = _primal(param, grad, state, beta1, beta2, wd,
                                                    coupled, maximize)
        root = v_new.sqrt_()                                                # sqrt(v')
        denom = torch.div(root, bc2s).add_(eps)
        r = torch.div(m_new, denom)
        a_r = a * (-lr / bc1)                            # cotangent of r
        a_m = torch.div(a_r, denom)                      # of m', through r ...
        c_m = cot_state.get("exp_avg")
        if c_m is not None:
            a_m.add_(c_m)                                # ... and as the new state
        # of v', through denom (limit 0 where v' = 0, where r = 0) ...
        a_v = torch.mul(a_r, r).div_(denom).div_(root).mul_(-0.5 / bc2s)
        a_v.masked_fill_(root == 0, 0.0)
        c_v = cot_state.get("exp_avg_sq")
        if c_v is not None:
            a_v.add_(c_v)                                # ... and as the new state
        out: dict[str, Tensor] = {}
        if "lr" in kinds:
            d_lr = _dot(a, r, lr, 1 / bc1).neg()
            if decoupled:
                d_lr = d_lr - _dot(a, param, lr, wd)
            out["lr"] = d_lr
        if "momentum" in kinds:
            # m' = m + (1 - b1)(g - m): d m'/d b1 = m - g;  k = lr / (1 - b1^t):
            # d k / d b1 = lr t b1^(t-1) / bc1^2
            dk_db1 = lr * t * beta1 ** (t - 1) / (bc1 * bc1)
            through_m = (reduce_like(a_m, m - g, beta1) if beta1.dim() > 0
                         else reduce_like(a_m, m, beta1) - reduce_like(a_m, g, beta1))
            out["momentum"] = through_m - _dot(a, r, beta1, dk_db1)
        if not inputs and not (coupled and "weight_decay" in kinds):
            if "weight_decay" in kinds:
                out["weight_decay"] = _dot(a, param, wd, lr).neg()
            return None, None, {}, out
        a_g = torch.mul(a_m, 1 - beta1).addcmul_(g, a_v, value=2 * (1 - beta2))
        if "weight_decay" in kinds:
            out["weight_decay"] = (reduce_like(a_g, param, wd) if coupled
                                   else _dot(a, param, wd, lr).neg())
        if not inputs:
            return None, None, {}, out
        if coupled:
            d_param = axpy(a, a_g, wd)
        elif decoupled:
            d_param = a * (1 - lr * wd)
        else:
            d_param = a
        d_grad = a_g.neg_() if maximize else a_g
        return d_param, d_grad, {"exp_avg": a_m.mul_(beta1), "exp_avg_sq": a_v.mul_(beta2)}, out

    def carry_foreach(self, params, grads, states, hyper, options, tangents, ok, discount=1.0):
        """:meth:`jvp`'s recurrence on a bucket, in place, the step's gate folded into the
        coefficients (``delta`` the discount; the shared coefficients are :meth:`jvp`'s, per
        tensor)::

            dg    = s delta G + (coupled) wd delta Z_w + w L_wd            (in G's storage)
            Z_m'  = keep(b1 delta, 1) Z_m + ok ((1 - b1) dg + (m - g) L_b1)
            Z_v'  = keep(b2 delta, 1) Z_v + ok c_g2 dg
            Z_w'  = keep(c_w delta, 1) Z_w + ok (c_m Z_m' + c_v Z_v' + c_lr L_lr + c_wd L_wd
                                                 + c_b1 L_b1)

        amsgrad is left to :meth:`jvp` (its max selects per element)."""
        if not params:
            return []
        if options["amsgrad"]:
            return None
        n = len(params)

        lams = [{k: t["hyper"].get(k) for k in ("lr", "momentum", "weight_decay")}
                for t in tangents]
        wanted = {k for lam in lams for k, v in lam.items() if v is not None}
        cs = [_coefficients(p, g, st, {k: (v[i] if isinstance(v, list) else v)
                                       for k, v in hyper.items()}, options, wanted)
              for i, (p, g, st) in enumerate(zip(params, grads, states))]
        c0 = cs[0]
        delta = float(discount)
        okc = F.Coef(ok)

        def per(name):
            return [getattr(c, name) for c in cs]

        def kept_list(values):          # keep(value * delta, 1) per tensor
            return [kept(ok, v * delta if delta != 1.0 else v, 1.0) for v in values]
        c_m, c_v, c_g2 = per("c_m"), per("c_v"), per("c_g2")
        keep_w = None if not c0.decoupled and delta == 1.0 else kept_list(per("c_w"))
        keep_m, keep_v = kept_list(per("beta1")), kept_list(per("beta2"))
        one_minus_b1 = per("one_minus_b1")
        if not isinstance(one_minus_b1[0], Tensor):     # a constant of the group
            one_minus_b1 = one_minus_b1[0]
        out = []
        for t, lam in zip(tangents, lams):
            zw = t["w"]
            dg = F.gradient_tangent(params, zw, t["g"], c0.sign, delta,
                                    hyper["weight_decay"] if c0.coupled else None,
                                    lam["weight_decay"] if c0.coupled else None)
            zs = t["s"]
            zm = [torch.zeros_like(p) if z is None else z
                  for z, p in zip(zs.get("exp_avg") or [None] * n, params)]
            zv = [torch.zeros_like(p) if z is None else z
                  for z, p in zip(zs.get("exp_avg_sq") or [None] * n, params)]
            F.mul_(zm, keep_m)
            F.mul_(zv, keep_v)
            if dg is not None:
                F.axpy_(zm, dg, F.Coef(one_minus_b1) * okc)
                F.axpy_(zv, dg, ok, zs=c_g2)
            if lam["momentum"] is not None:
                F.axpy_some_(zm, per("m_minus_g"), lam["momentum"], okc)
            if keep_w is not None:
                F.mul_(zw, keep_w)
            F.axpy_(zw, zm, ok, zs=c_m)
            F.axpy_(zw, zv, ok, zs=c_v)
            for kind, name in (("lr", "c_lr"), ("weight_decay", "c_wd"), ("momentum", "c_b1")):
                if lam[kind] is None or (kind == "weight_decay" and not c0.decoupled):
                    continue
                # ok L_k c_k per tensor: L_k 0-dim (a scalar's tangent) or per element
                F.axpy_some_(zw, per(name), lam[kind], okc)
            out.append({"exp_avg": zm, "exp_avg_sq": zv})
        return out

    def jvp(self, param, grad, state, hyper, options, tangents):
        """Forward products of :meth:`update` in closed form, for tangents
        ``(Z_w, G, Z_m, Z_v, Z_vh, L)`` (``s = -1`` if maximize else 1, ``t`` the new step)::

            g  = s g + wd w  (coupled)      dg   = s G + wd Z_w + w L_wd       (else s G)
            w1 = (1 - lr wd) w (decoupled)  dw1  = (1 - lr wd) Z_w - w (wd L_lr + lr L_wd)
            m' = b1 m + (1 - b1) g          Z_m' = b1 Z_m + (1 - b1) dg + (m - g) L_b1
            v' = b2 v + (1 - b2) g^2        Z_v' = b2 Z_v + 2 (1 - b2) g dg
            vh' = max(vh, v')  (amsgrad)    Z_vh' = Z_v' where v' > vh, Z_vh below, the mean at
                                                    ties (as forward mode); vh' replaces v' below
            D  = sqrt(v') / bc2s + eps      dD   = Z_v' / (2 sqrt(v') bc2s)
            w' = w1 - k r,  r = m' / D,  k = lr / bc1,  bc1 = 1 - b1^t
            Z_w' = dw1 - k (Z_m' - r dD) / D - (r / bc1) (L_lr + lr t b1^(t-1) L_b1 / bc1)

        Where ``v' = 0`` (the gradient and both moments zero) ``dD`` is taken as its limit 0
        (``r`` is 0 there; ``r dD`` -> 0), not forward mode's NaN.
        """
        lams = [hyper_tangents(tan, hyper) for tan in tangents]
        c = _coefficients(param, grad, state, hyper, options, set().union(*lams))
        lr, beta1, wd, beta2 = c.lr, c.beta1, c.wd, c.beta2
        coupled, decoupled, sign, amsgrad = c.coupled, c.decoupled, c.sign, c.amsgrad
        one_minus_b1, c_g2, c_m, c_v, c_w = c.one_minus_b1, c.c_g2, c.c_m, c.c_v, c.c_w
        c_lr, c_wd, c_b1, m_minus_g = c.c_lr, c.c_wd, c.c_b1, c.m_minus_g
        w_new, w_old = c.w_new, c.w_old
        results = []
        for tan, lam in zip(tangents, lams):
            z_state = tan.state or {}
            dg = lincomb(param, (tan.grad, sign), (tan.param, wd if coupled else 0.0),
                         (lam.get("weight_decay") if coupled else None, param))
            z_m = lincomb(param, (z_state.get("exp_avg"), beta1), (dg, one_minus_b1),
                          (lam.get("momentum"), m_minus_g))
            z_v = lincomb(param, (z_state.get("exp_avg_sq"), beta2), (dg, c_g2))
            new_z_state = {"exp_avg": or_zeros(z_m, param), "exp_avg_sq": or_zeros(z_v, param)}
            z_second = z_v
            if amsgrad:
                z_second = lincomb(param, (z_state.get("max_exp_avg_sq"), w_old), (z_v, w_new))
                new_z_state["max_exp_avg_sq"] = or_zeros(z_second, param)
            z_param = lincomb(param, (tan.param, c_w), (lam.get("lr"), c_lr),
                              (lam.get("weight_decay") if decoupled else None, c_wd),
                              (lam.get("momentum"), c_b1), (z_m, c_m), (z_second, c_v))
            results.append((or_zeros(z_param, param), new_z_state))
        return results


def _coefficients(param, grad, state, hyper, options, wanted) -> SimpleNamespace:
    """The coefficients of :meth:`AdamRule.jvp`'s products at the pre-step point, shared by
    every tangent of one parameter, for the hyperparameter kinds in ``wanted``."""
    lr, beta1, wd = hyper["lr"], hyper["momentum"], hyper["weight_decay"]
    beta2, eps, amsgrad = options["beta2"], options["eps"], options["amsgrad"]
    coupled = not is_zero(wd) and not options["decoupled"]
    decoupled = not is_zero(wd) and options["decoupled"]
    sign = -1.0 if options["maximize"] else 1.0
    g, m, t, bc1, bc2s, m_new, second = _primal(param, grad, state, beta1, beta2, wd,
                                                 coupled, options["maximize"])
    w_new = w_old = None
    if amsgrad:
        vh = state["max_exp_avg_sq"]
        w_new = (second > vh).to(param.dtype).masked_fill_(second == vh, 0.5)
        w_old = 1 - w_new
        second = torch.maximum(vh, second)
    root = second.sqrt()
    denom = torch.div(root, bc2s).add_(eps)
    r = torch.div(m_new, denom)
    k = lr / bc1
    c_m = torch.div(-k, denom) if isinstance(k, Tensor) else denom.reciprocal().mul_(-k)
    # d w'/d v' = k r / (2 sqrt(v') bc2s D): 0 where v' = 0 (the limit)
    c_v = torch.mul(root, -2 * bc2s).reciprocal_().masked_fill_(root == 0, 0.0)
    c_v.mul_(r).mul_(c_m)        # (the sign folded into the 0-dim factor: no negated copy)
    c_g2 = g * (2 * (1 - beta2))
    one_minus_b1 = 1 - beta1
    c_lr = c_wd = c_b1 = m_minus_g = None
    if "lr" in wanted:
        c_lr = r * (-1 / bc1)
        if decoupled:
            c_lr = axpy(c_lr, param, -wd)
    if decoupled and "weight_decay" in wanted:
        c_wd = param * -lr
    if "momentum" in wanted:
        m_minus_g = m - g
        c_b1 = r * (-lr * t * beta1 ** (t - 1) / (bc1 * bc1))
    c_w = 1 - lr * wd if decoupled else 1.0
    return SimpleNamespace(
        lr=lr, beta1=beta1, wd=wd, beta2=beta2, coupled=coupled, decoupled=decoupled, sign=sign,
        amsgrad=amsgrad, one_minus_b1=one_minus_b1, c_g2=c_g2, c_m=c_m, c_v=c_v, c_w=c_w,
        c_lr=c_lr, c_wd=c_wd, c_b1=c_b1, m_minus_g=m_minus_g, w_new=w_new, w_old=w_old)


def _primal(param, grad, state, beta1, beta2, wd, coupled: bool, maximize: bool):
    """The step's own intermediates that the closed-form products are taken at: the direction
    ``g`` (sign and coupled weight decay applied), ``m``, the new count ``t``, ``bc1``,
    ``sqrt(bc2)``, ``m'`` and ``v'`` (fresh tensors)."""
    g = grad.neg() if maximize else grad
    if coupled:
        g = axpy(g, param, wd)
    m, v = state["exp_avg"], state["exp_avg_sq"]
    t = step_count_as_float64(state["step"]) + 1
    bc1 = 1 - beta1 ** t
    bc2s = (1 - beta2 ** t).sqrt()
    m_new = torch.lerp(m, g, 1 - beta1)
    v_new = torch.mul(v, beta2).addcmul_(g, g, value=1 - beta2)
    return g, m, t, bc1, bc2s, m_new, v_new


def _dot(x: Tensor, y: Tensor, like: float | Tensor, coef: float | Tensor) -> Tensor:
    """``x * y * coef`` reduced to the shape of ``like``; a scalar ``coef`` is factored out of
    the sum, a per-element one (another hyperparameter's shape) multiplied in first."""
    if isinstance(coef, Tensor) and coef.dim() > 0:
        return reduce_like(x, y * coef, like)
    return reduce_like(x, y, like) * coef
