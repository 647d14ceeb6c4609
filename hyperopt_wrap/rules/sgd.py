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

from .base import Hyper, State, UpdateRule, is_zero


class SGDRule(UpdateRule):
    kinds = ("lr", "momentum", "weight_decay")

    def check_tunable(self, group, kind):
        if kind == "momentum" and group["momentum"] == 0:
            return ("momentum=0 means plain SGD without a momentum buffer; to tune momentum start "
                    "from a value in (0, 1), e.g. momentum=0.9")
        return None

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
