"""Adam and AdamW (``amsgrad``, ``maximize``, coupled or decoupled weight decay).

    g  = -g if maximize else g
    w  = w * (1 - lr * wd)            (AdamW: decoupled)   |  g = g + wd * w   (Adam)
    m  = m + (1 - b1) (g - m);        v = b2 v + (1 - b2) g^2;     t += 1
    vh = max(vh, v)                   (amsgrad)
    w  = w - lr / (1 - b1^t) * m / (sqrt(v or vh) / sqrt(1 - b2^t) + eps)

exactly as ``torch.optim.Adam``/``AdamW``.  "momentum" is beta1.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import Hyper, State, UpdateRule, is_zero, new_step_count


class AdamRule(UpdateRule):
    kinds = ("lr", "momentum", "weight_decay")

    def __init__(self, decoupled_weight_decay: bool = False):
        self.decoupled_weight_decay = decoupled_weight_decay

    def read(self, group, kind):
        return float(group["betas"][0]) if kind == "momentum" else float(group[kind])

    def write(self, group, kind, value):
        if kind == "momentum":
            group["betas"] = (value, group["betas"][1])
        else:
            group[kind] = value

    def check_tunable(self, group, kind):
        if kind == "momentum" and group["betas"][0] == 0:
            return "beta1=0 cannot be tuned in logit space; start from e.g. betas=(0.9, 0.999)"
        return None

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
        bias_correction1 = 1 - beta1 ** step
        bias_correction2_sqrt = (1 - beta2 ** step).sqrt()
        second = exp_avg_sq
        if options["amsgrad"]:
            second = torch.maximum(state["max_exp_avg_sq"], exp_avg_sq)
            new_state["max_exp_avg_sq"] = second
        denom = second.sqrt() / bias_correction2_sqrt + eps
        return param - (lr / bias_correction1) * exp_avg / denom, new_state
