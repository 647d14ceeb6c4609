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

from .base import Hyper, State, UpdateRule, add_scaled_, gated, is_zero, kept, scratch


class SGDRule(UpdateRule):
    kinds = ("lr", "momentum", "weight_decay")

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
