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

from .base import Hyper, State, UpdateRule, add_scaled_, is_zero, new_step_count, sub_scaled


class AdagradRule(UpdateRule):
    kinds = ("lr", "weight_decay")

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
        clr = lr / (1 + (step - 1) * options["lr_decay"])
        return param - clr * g / (total.sqrt() + options["eps"]), {"step": step, "sum": total}

    def update_with_tangents(self, param, grad, state, hyper, options, kinds):
        """Fast step (no_grad) with closed-form tangents; ``update`` is the reference."""
        lr, wd = hyper["lr"], hyper["weight_decay"]
        g = grad.neg() if options["maximize"] else grad
        if not is_zero(wd):
            g = add_scaled_(g.clone() if g is grad else g, param, wd)
        step = state["step"] + 1
        total = torch.addcmul(state["sum"], g, g)
        root = total.sqrt()
        std = root + options["eps"]
        scaled = g / std
        clr = lr / (1 + (step - 1) * options["lr_decay"])
        tangents = {}
        for kind in kinds:
            if kind == "lr":
                tangents[kind] = scaled * (-clr / lr)
            else:   # d std / d wd = g w / sqrt(s)
                t = (scaled * g).mul_(param).div_(root)
                tangents[kind] = torch.sub(param, t).div_(std).mul_(-clr)
        return sub_scaled(param, scaled, clr), {"step": step, "sum": total}, tangents
