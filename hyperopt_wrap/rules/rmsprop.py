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

from .base import Hyper, State, UpdateRule, gated, is_zero, kept, new_step_count, scratch


class RMSpropRule(UpdateRule):
    kinds = ("lr", "momentum", "weight_decay")

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
