"""SGD with momentum, dampening, Nesterov, weight decay and maximize.

    d   = -g if maximize else g;          d += wd * w
    buf = d                      (first step)
    buf = mu * buf + (1 - tau) * d        (later steps)
    d   = d + mu * buf if nesterov else buf
    w   = w - lr * d

exactly as ``torch.optim.SGD`` (the momentum buffer starts as a copy of the
first direction, without dampening).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import _foreach as F
from .base import (Hyper, State, UpdateRule, add_scaled_, axpy, gated, is_zero, kept,
                   reduce_like, scratch)
from .base import StateAlias, hyper_tangents, lincomb, or_zeros
from .base import fused_lr_runs as _runs, fused_scalar_lr as _scalar_lr

_FUSED_SGD = hasattr(torch, "_fused_sgd_")


class SGDRule(UpdateRule):
    kinds = ("lr", "momentum", "weight_decay")
    param_shaped_state = True

    def options(self, group: dict[str, Any]) -> dict[str, Any]:
        return {"dampening": group["dampening"], "nesterov": group["nesterov"],
                "maximize": group["maximize"]}

    def init_state(self, param: Tensor, options: dict[str, Any]) -> State:
        return {}

    def update(self, param: Tensor, grad: Tensor, state: State, hyper: Hyper,
               options: dict[str, Any]) -> tuple[Tensor, State]:
        lr, momentum, wd = hyper["lr"], hyper["momentum"], hyper["weight_decay"]
        d = -grad if options["maximize"] else grad
        if not is_zero(wd):
            d = d + wd * param
        new_state: State = {}
        if not is_zero(momentum):
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = d
            else:
                buf = momentum * buf + (1 - options["dampening"]) * d
            new_state["momentum_buffer"] = buf
            d = d + momentum * buf if options["nesterov"] else buf
        return param - lr * d, new_state

    def step_(self, param, grad, state, hyper, options, kinds, ok, work):
        """In place, like torch.optim.SGD, with closed-form tangents; a no-op for ok=0."""
        lr, momentum, wd = hyper["lr"], hyper["momentum"], hyper["weight_decay"]
        d = grad.neg_() if options["maximize"] else grad
        if not is_zero(wd):
            d.addcmul_(param, gated(ok, wd))          # zero when skipped
        t_mu = scratch(work, "t_momentum", param) if "momentum" in kinds else None
        t_wd = scratch(work, "t_weight_decay", param) if "weight_decay" in kinds else None
        if not is_zero(momentum):
            nesterov = options["nesterov"]
            tau = 1 - options["dampening"]
            buf = state.get("momentum_buffer")
            first = buf is None
            if t_mu is not None:                # d direction / d mu, from the old buffer
                if first:
                    t_mu.copy_(d) if nesterov else t_mu.zero_()
                else:
                    t_mu.copy_(buf)
            if t_wd is not None:                # d direction / d wd = c p (+ mu c p, Nesterov)
                c = 1.0 if first else tau
                torch.mul(param, (1 + momentum * c) if nesterov else c, out=t_wd)
            if first:
                buf = state["momentum_buffer"] = d.clone()
            else:
                buf.mul_(kept(ok, momentum, 1.0)).add_(d, alpha=tau)
            if nesterov:
                direction = add_scaled_(d, buf, momentum)
                if t_mu is not None and not first:
                    add_scaled_(t_mu.mul_(momentum), buf, 1.0)
            else:
                direction = buf
        else:
            direction = d
            if t_wd is not None:
                t_wd.copy_(param)
        tangents = {}
        for kind in kinds:
            if kind == "lr":
                tangents[kind] = torch.neg(direction, out=scratch(work, "t_lr", param))
            else:
                tangents[kind] = (t_mu if kind == "momentum" else t_wd).mul_(-lr)
        param.addcmul_(direction, gated(ok, lr), value=-1)
        return tangents

    def step_foreach(self, params, grads, states, hyper, options, kinds, ok, tangents):
        """:meth:`step_` on a whole bucket with foreach ops (as torch's ``_multi_tensor_sgd``):
        about four foreach calls a step for momentum with a tuned lr."""
        if not params:
            return True
        lr, momentum, wd = hyper["lr"], hyper["momentum"], hyper["weight_decay"]
        has_momentum = not is_zero(momentum)
        if has_momentum:
            bufs = [s.get("momentum_buffer") for s in states]
            first = bufs[0] is None
            if any((b is None) != first for b in bufs):     # buffers on some params only
                later = [i for i, b in enumerate(bufs) if b is not None]
                fresh = [i for i, b in enumerate(bufs) if b is None]
                for idx in (later, fresh):
                    ps, gs, ss, hs, ts = F.subset(idx, params, grads, states, hyper, tangents)
                    self.step_foreach(ps, gs, ss, hs, options, kinds, ok, ts)
                return True
        d = grads
        if options["maximize"]:
            torch._foreach_neg_(d)
        if not is_zero(wd):
            F.axpy_(d, params, F.gate(ok, wd))                      # zero when skipped
        t_mu = tangents["momentum"] if "momentum" in kinds else None
        t_wd = tangents["weight_decay"] if "weight_decay" in kinds else None
        loop = F.per_tensor(params)             # one-pass out= loops for big tensors
        if has_momentum:
            nesterov = options["nesterov"]
            tau = 1 - options["dampening"]
            if t_mu is not None:                # d direction / d mu, from the old buffer
                if first:
                    torch._foreach_copy_(t_mu, d) if nesterov else torch._foreach_zero_(t_mu)
                else:
                    torch._foreach_copy_(t_mu, bufs)
            if t_wd is not None:                # d direction / d wd = c p (+ mu c p, Nesterov)
                c = 1.0 if first else tau
                F.into_(t_wd, params, (1 + F.Coef(momentum) * c) if nesterov else c, loop)
            if first:                           # once per run (no _foreach_clone before 2.11)
                bufs = [x.clone() for x in d]
                for s, b in zip(states, bufs):
                    s["momentum_buffer"] = b
            else:
                F.mul_(bufs, F.keep(ok, momentum, 1.0))
                torch._foreach_add_(bufs, d, alpha=tau)
            if nesterov:
                F.axpy_(d, bufs, momentum)
                direction = d
                if t_mu is not None and not first:
                    F.mul_(t_mu, momentum)
                    torch._foreach_add_(t_mu, bufs, alpha=1.0)
            else:
                direction = bufs
        else:
            direction = d
            if t_wd is not None:
                torch._foreach_copy_(t_wd, params)
        for kind in kinds:
            if kind == "lr":
                F.neg_into(tangents[kind], direction, loop)
            else:
                F.mul_(t_mu if kind == "momentum" else t_wd, -F.Coef(lr))
        F.axpy_gated_(params, direction, ok, lr, alpha=-1.0)
        return True

    def carry_foreach(self, params, grads, states, hyper, options, tangents, ok, discount=1.0):
        """:meth:`jvp`'s recurrence on a bucket, in place, with the step's gate folded into the
        coefficients (``delta`` the discount, ``s`` the maximize sign)::

            dd0  = s delta G + wd delta Z_w + w L_wd                  (in G's storage)
            Z_b' = keep(mu delta, 1) Z_b + ok (L_mu b + tau dd0)     (Z_b' = ok dd0 first)
            du   = dd0 + mu Z_b' + L_mu b'  (Nesterov), Z_b' (momentum), dd0 (none)
            Z_w' = keep(delta, 1) Z_w - ok (lr du + L_lr u)

        with ``b' = mu b + tau d0`` and ``u`` the step's direction (computed once for the
        bucket, where a tangent has an lr or, under Nesterov, a momentum entry).  With
        ``ok = 0`` every tangent is kept (``x * 1 + 0 * y``: the products are finite)."""
        if not params:
            return []
        lr, mu, wd = hyper["lr"], hyper["momentum"], hyper["weight_decay"]
        has_momentum = not is_zero(mu)
        bufs = [s.get("momentum_buffer") for s in states] if has_momentum else None
        first = has_momentum and bufs[0] is None
        if has_momentum and any((b is None) != first for b in bufs):
            return None                     # buffers on some params only: per tensor
        sign = -1.0 if options["maximize"] else 1.0
        nesterov, tau = options["nesterov"], 1 - options["dampening"]
        delta = float(discount)

        lams = [{k: t["hyper"].get(k) for k in ("lr", "momentum", "weight_decay")}
                for t in tangents]
        u = new_buf = None
        if any(lam["lr"] for lam in lams) or (nesterov and any(lam["momentum"] for lam in lams)):
            d0 = grads                      # read only
            if sign != 1.0:
                d0 = list(torch._foreach_neg(grads))
                if not is_zero(wd):
                    F.axpy_(d0, params, wd)
            elif not is_zero(wd):
                d0 = F.axpy(grads, params, wd)
            u = new_buf = d0
            if has_momentum:
                if not first:
                    new_buf = F.axpy(d0 if tau == 1 else F.scaled(d0, tau), bufs, mu)
                u = F.axpy(d0, new_buf, mu) if nesterov else new_buf
        okc = F.Coef(ok)
        out = []
        for t, lam in zip(tangents, lams):
            zw = t["w"]
            dd0 = F.gradient_tangent(params, zw, t["g"], sign, delta,
                                     None if is_zero(wd) else wd, lam["weight_decay"])
            new_state = {}
            du = dd0
            if has_momentum:
                if first:
                    zb = dd0 if dd0 is not None else [torch.zeros_like(p) for p in params]
                    F.mul_(zb, ok)
                else:
                    zb = t["s"].get("momentum_buffer") or [None] * len(params)
                    zb = [torch.zeros_like(p) if z is None else z for z, p in zip(zb, params)]
                    F.mul_(zb, F.keep(ok, F.Coef(mu) * delta, 1.0))
                    F.axpy_some_(zb, bufs, lam["momentum"], okc)
                    if dd0 is not None:
                        F.axpy_(zb, dd0, F.gate(ok, tau))
                new_state["momentum_buffer"] = zb
                if nesterov:
                    du = F.scaled(zb, mu)
                    if dd0 is not None:
                        torch._foreach_add_(du, dd0, alpha=1.0)
                    F.axpy_some_(du, new_buf, lam["momentum"], 1.0)
                else:
                    du = zb
            if delta != 1.0:
                F.mul_(zw, F.keep(ok, delta, 1.0))
            if du is not None:
                F.axpy_gated_(zw, du, ok, lr, alpha=-1.0)
            F.axpy_some_(zw, u, lam["lr"], okc, alpha=-1.0)
            out.append(new_state)
        return out

    def fused_tangents(self, states, hyper, options, kinds, work):
        """torch's fused SGD kernel takes a step with (heavy-ball) momentum and an lr shared
        by the bucket or one per tensor (a call each), from the second step on: one pass over
        weights, gradient and buffer, against six for the copy, the check, the select and the
        foreach step.  The lr tangent it leaves behind is the new buffer itself, negated:
        ``w' = w - lr buf'``."""
        if not set(kinds) <= {"lr"} or options["nesterov"] or not _FUSED_SGD:
            return None
        lr, momentum, wd = hyper["lr"], hyper["momentum"], hyper["weight_decay"]
        if not (isinstance(momentum, float) and momentum != 0 and isinstance(wd, float)
                and _scalar_lr(lr)):
            return None
        bufs = [s.get("momentum_buffer") for s in states]
        if any(b is None or not b.is_contiguous() for b in bufs):
            return None     # (the kernel walks storage order: layouts must agree)
        return {"lr": StateAlias(bufs, -1.0)} if kinds else {}

    def step_fused(self, params, grads, states, hyper, options, found_inf):
        lr = hyper["lr"]
        for idx in _runs(lr, len(params)):     # one call, or one per tensor (per-tensor lr)
            torch._fused_sgd_(
                [params[i] for i in idx], [grads[i] for i in idx],
                [states[i]["momentum_buffer"] for i in idx], weight_decay=hyper["weight_decay"],
                momentum=hyper["momentum"], lr=lr[idx[0]] if isinstance(lr, list) else lr,
                dampening=options["dampening"], nesterov=False, maximize=options["maximize"],
                is_first_step=False, grad_scale=None, found_inf=found_inf)

    def vjp(self, param, grad, state, hyper, options, cot_param, cot_state, inputs, kinds):
        """Reverse products of :meth:`update` in closed form (see the module docstring)::

            d0 = s g + wd w                                (s = -1 if maximize else 1)
            b' = mu b + tau d0   (b' = d0 on the first step)
            u  = d0 + mu b' (Nesterov) or b'              w' = w - lr u

        with cotangents ``a`` of w' and ``c`` of b'.  Fused ops where they exist: these run on
        parameter-sized tensors, several per recorded step.
        """
        lr, mu, wd = hyper["lr"], hyper["momentum"], hyper["weight_decay"]
        a = torch.zeros_like(param) if cot_param is None else cot_param
        maximize, tau = options["maximize"], 1 - options["dampening"]
        d0 = grad.neg() if maximize else grad
        if not is_zero(wd):
            d0 = axpy(d0, param, wd)
        a_u = a * -lr                                    # cotangent of the direction u
        out: dict[str, Tensor] = {}
        d_state: State = {}
        if is_zero(mu):
            a_d0, u = a_u, d0
        else:
            nesterov = options["nesterov"]
            c = cot_state.get("momentum_buffer")
            buf = state.get("momentum_buffer")
            if buf is None:
                new_buf = d0
            else:
                new_buf = axpy(d0 * tau if tau != 1 else d0, buf, mu)
            u = axpy(d0, new_buf, mu) if nesterov and "lr" in kinds else new_buf
            a_b = a_u * mu if nesterov else a_u          # cotangent of b', through u ...
            if c is not None:
                a_b = a_b + c                            # ... and as the new state
            if "momentum" in kinds:
                dmu = reduce_like(a_u, new_buf, mu) if nesterov else None
                if buf is not None:
                    term = reduce_like(a_b, buf, mu)
                    dmu = term if dmu is None else dmu + term
                out["momentum"] = torch.zeros_like(mu) if dmu is None else dmu
            if buf is None:
                a_d0 = a_b + a_u if nesterov else a_b
            else:
                a_d0 = a_b * tau if tau != 1 else a_b
                if nesterov:
                    a_d0 = a_d0 + a_u
                if inputs:
                    d_state["momentum_buffer"] = a_b * mu
        if "lr" in kinds:
            out["lr"] = reduce_like(a, u, lr).neg_()
        if "weight_decay" in kinds:
            out["weight_decay"] = reduce_like(a_d0, param, wd)
        if not inputs:
            return None, None, {}, out
        d_param = a if is_zero(wd) else axpy(a, a_d0, wd)
        d_grad = a_d0.neg() if maximize else a_d0
        return d_param, d_grad, d_state, out

    def jvp(self, param, grad, state, hyper, options, tangents):
        """Forward products of :meth:`update` in closed form, for tangents
        ``(Z_w, G, Z_b, L)`` (``s = -1`` if maximize else 1, ``tau = 1 - dampening``)::

            d0 = s g + wd w                 dd0  = s G + wd Z_w + w L_wd
            b' = mu b + tau d0              Z_b' = mu Z_b + b L_mu + tau dd0
            b' = d0        (first step)     Z_b' = dd0
            u  = d0 + mu b' (Nesterov)      du   = dd0 + mu Z_b' + b' L_mu
            u  = b'        (otherwise)      du   = Z_b'
            w' = w - lr u                   Z_w' = Z_w - lr du - u L_lr

        (no buffer, ``u = d0``, for a constant momentum 0).
        """
        lr, mu, wd = hyper["lr"], hyper["momentum"], hyper["weight_decay"]
        sign = -1.0 if options["maximize"] else 1.0
        nesterov, tau = options["nesterov"], 1 - options["dampening"]
        d0 = grad.neg() if options["maximize"] else grad
        if not is_zero(wd):
            d0 = axpy(d0, param, wd)
        has_buffer = not is_zero(mu)
        buf = state.get("momentum_buffer") if has_buffer else None
        first = buf is None
        lams = [hyper_tangents(tan, hyper) for tan in tangents]
        new_buf = u = d0
        if has_buffer:
            if not first:
                new_buf = axpy(d0 * tau if tau != 1 else d0, buf, mu)
            u = axpy(d0, new_buf, mu) if nesterov else new_buf
        neg_u = u.neg() if any("lr" in lam for lam in lams) else None
        neg_lr = -lr
        results = []
        for tan, lam in zip(tangents, lams):
            z_state = tan.state or {}
            dd0 = lincomb(param, (tan.grad, sign), (tan.param, wd),
                          (lam.get("weight_decay"), param))
            new_z_state = {}
            du = dd0
            if has_buffer:
                z_buf = dd0 if first else lincomb(
                    param, (z_state.get("momentum_buffer"), mu), (lam.get("momentum"), buf),
                    (dd0, tau))
                du = lincomb(param, (dd0, 1.0), (z_buf, mu),
                             (lam.get("momentum"), new_buf)) if nesterov else z_buf
                new_z_state["momentum_buffer"] = or_zeros(z_buf, param)
            z_param = lincomb(param, (tan.param, 1.0), (du, neg_lr), (lam.get("lr"), neg_u))
            results.append((or_zeros(z_param, param), new_z_state))
        return results
