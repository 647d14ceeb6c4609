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

from .base import Hyper, State, UpdateRule, is_zero, new_step_count


class RMSpropRule(UpdateRule):
    kinds = ("lr", "momentum", "weight_decay")

    def check_tunable(self, group, kind):
        if kind == "momentum" and group["momentum"] == 0:
            return ("momentum=0 means RMSprop without a momentum buffer; to tune momentum start "
                    "from a value in (0, 1), e.g. momentum=0.9")
        return None

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
