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

from .base import Hyper, State, UpdateRule, gated, is_zero, new_step_count, scratch


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

    def step_(self, param, grad, state, hyper, options, kinds, ok, work):
        """In place, like torch.optim.Adagrad, with closed-form tangents; a no-op for ok=0."""
        lr, wd = hyper["lr"], hyper["weight_decay"]
        g = grad.neg_() if options["maximize"] else grad
        if not is_zero(wd):
            g.addcmul_(param, gated(ok, wd))
        step = state["step"].add_(ok)
        total = state["sum"].addcmul_(g, g)
        root = torch.sqrt(total, out=scratch(work, "root", param))
        t_wd = None
        if "weight_decay" in kinds:  # d std / d wd = g w / sqrt(s); 0/0 where g = 0: limit 0
            t_wd = torch.mul(g, param, out=scratch(work, "t_weight_decay", param))
            t_wd.div_(root).nan_to_num_(0.0)
        std = root.add_(options["eps"])
        scaled = torch.div(g, std, out=scratch(work, "scaled", param))
        decay = 1 + (step - 1) * options["lr_decay"]
        clr = lr / decay
        tangents = {}
        for kind in kinds:
            if kind == "lr":
                tangents[kind] = torch.mul(scaled, -1 / decay, out=scratch(work, "t_lr", param))
            else:
                tangents[kind] = t_wd.mul_(scaled).neg_().add_(param).div_(std).mul_(-clr)
        param.addcmul_(scaled, clr * ok, value=-1)
        return tangents
