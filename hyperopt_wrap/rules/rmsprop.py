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

from .base import Hyper, State, UpdateRule, add_scaled_, is_zero, new_step_count, sub_scaled


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

    def update_with_tangents(self, param, grad, state, hyper, options, kinds):
        """Fast step (no_grad) with closed-form tangents; ``update`` is the reference."""
        lr, momentum, wd = hyper["lr"], hyper["momentum"], hyper["weight_decay"]
        alpha, eps = options["alpha"], options["eps"]
        g = grad.neg() if options["maximize"] else grad
        if not is_zero(wd):
            g = add_scaled_(g.clone() if g is grad else g, param, wd)
        square_avg = torch.addcmul(state["square_avg"] * alpha, g, g, value=1 - alpha)
        new_state = {"step": state["step"] + 1, "square_avg": square_avg}
        want_wd = "weight_decay" in kinds
        if options["centered"]:
            grad_avg = torch.lerp(state["grad_avg"], g, 1 - alpha)
            new_state["grad_avg"] = grad_avg
            root = torch.addcmul(square_avg, grad_avg, grad_avg, value=-1).sqrt_()
            if want_wd:   # d(v - gbar^2) = 2(1-a) g w - 2 gbar (1-a) w
                d_root = (g - grad_avg).mul_(param).mul_(1 - alpha).div_(root)
        else:
            root = square_avg.sqrt()
            if want_wd:
                d_root = (g * param).mul_(1 - alpha).div_(root)
        avg = root + eps
        scaled = g / avg
        if want_wd:
            d_scaled = torch.addcmul(param, scaled, d_root, value=-1).div_(avg)
        tangents = {}
        if options["has_momentum"]:
            buf_old = state["momentum_buffer"]
            buf = add_scaled_(buf_old * momentum, scaled, 1.0)
            new_state["momentum_buffer"] = buf
            direction, d_dir_dmu = buf, buf_old
        else:
            direction, d_dir_dmu = scaled, None
        for kind in kinds:
            if kind == "lr":
                tangents[kind] = direction.neg()
            elif kind == "momentum":
                tangents[kind] = (torch.zeros_like(param) if d_dir_dmu is None
                                  else d_dir_dmu * (-lr))
            else:
                tangents[kind] = d_scaled.mul_(-lr)
        return sub_scaled(param, direction, lr), new_state, tangents
