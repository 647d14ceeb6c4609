"""The registry of optimizer configurations that drives the generic tests.

Like PyTorch's ``OptimizerInfo``: one list, :data:`CASES`, of every built-in rule in every
option combination it supports.  A test parametrised over it covers SGD (momentum,
dampening, Nesterov, weight decay, maximize), Adam/AdamW (weight decay, amsgrad, maximize,
decoupled weight decay), RMSprop (alpha, eps, momentum, centered, weight decay, maximize) and
Adagrad (lr_decay, weight decay, initial accumulator, eps, maximize).

``tunable`` lists the kinds ``HyperOptimizer(..., tune=...)`` accepts for the configuration:
``"lr"`` always; ``"momentum"`` where the case has a momentum buffer (beta1 for Adam-type
rules, always); ``"weight_decay"`` where the weight decay is > 0 (tuned in log space, so 0
cannot be tuned).  The lists are written out by hand, not read from the library, and
``test_parity.py`` checks them against what the library accepts and rejects.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

KINDS = ("lr", "momentum", "weight_decay")
GRANULARITIES = ("global", "group", "tensor", "element")


@dataclass(frozen=True)
class OptimizerCase:
    """One configuration: ``cls(params, **kwargs)``; ``id`` names the options (not the lr)."""
    cls: type
    kwargs: dict[str, Any] = field(default_factory=dict)
    tunable: tuple[str, ...] = ("lr",)

    @property
    def id(self) -> str:
        opts = ",".join(f"{k}={v}" if not isinstance(v, bool) else k
                        for k, v in self.kwargs.items() if k != "lr" and v is not False)
        return f"{self.cls.__name__}({opts})"

    @property
    def maximize(self) -> bool:
        return bool(self.kwargs.get("maximize", False))

    @property
    def untunable(self) -> tuple[str, ...]:
        return tuple(k for k in KINDS if k not in self.tunable)

    def initial(self, kind: str) -> float:
        """The configured value of ``kind`` as torch.optim itself fills it in (defaults
        included); "momentum" is beta1 for Adam-type optimizers."""
        group = self.cls([torch.zeros(1, dtype=torch.float64)], **self.kwargs).param_groups[0]
        if kind == "momentum" and "betas" in group:
            return float(group["betas"][0])
        return float(group[kind])

    def __repr__(self) -> str:
        return self.id


SGD, Adam, AdamW = torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW
RMSprop, Adagrad = torch.optim.RMSprop, torch.optim.Adagrad
LR, LR_MOM, LR_WD, ALL = ("lr",), ("lr", "momentum"), ("lr", "weight_decay"), KINDS

CASES: list[OptimizerCase] = [
    # --- SGD
    OptimizerCase(SGD, dict(lr=0.05), LR),
    OptimizerCase(SGD, dict(lr=0.05, momentum=0.9), LR_MOM),
    OptimizerCase(SGD, dict(lr=0.05, momentum=0.9, dampening=0.3), LR_MOM),
    OptimizerCase(SGD, dict(lr=0.05, momentum=0.9, nesterov=True), LR_MOM),
    OptimizerCase(SGD, dict(lr=0.05, weight_decay=0.01), LR_WD),
    OptimizerCase(SGD, dict(lr=0.05, maximize=True), LR),
    OptimizerCase(SGD, dict(lr=0.05, momentum=0.8, dampening=0.2, weight_decay=0.01,
                            maximize=True), ALL),
    OptimizerCase(SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01,
                            maximize=True), ALL),
    # --- Adam ("momentum" is beta1, always tunable)
    OptimizerCase(Adam, dict(lr=0.01), LR_MOM),
    OptimizerCase(Adam, dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6), LR_MOM),
    OptimizerCase(Adam, dict(lr=0.01, weight_decay=0.01), ALL),
    OptimizerCase(Adam, dict(lr=0.01, amsgrad=True), LR_MOM),
    OptimizerCase(Adam, dict(lr=0.01, maximize=True), LR_MOM),
    OptimizerCase(Adam, dict(lr=0.01, weight_decay=0.01, amsgrad=True, maximize=True), ALL),
    OptimizerCase(Adam, dict(lr=0.01, weight_decay=0.05, decoupled_weight_decay=True), ALL),
    OptimizerCase(Adam, dict(lr=0.01, weight_decay=0.05, amsgrad=True,
                             decoupled_weight_decay=True, maximize=True), ALL),
    # --- AdamW (torch's default weight_decay is 0.01, so it is tunable)
    OptimizerCase(AdamW, dict(lr=0.01), ALL),
    OptimizerCase(AdamW, dict(lr=0.01, weight_decay=0.0), LR_MOM),
    OptimizerCase(AdamW, dict(lr=0.01, weight_decay=0.1), ALL),
    OptimizerCase(AdamW, dict(lr=0.01, amsgrad=True), ALL),
    OptimizerCase(AdamW, dict(lr=0.01, maximize=True), ALL),
    OptimizerCase(AdamW, dict(lr=0.01, weight_decay=0.1, amsgrad=True, maximize=True), ALL),
    # --- RMSprop
    OptimizerCase(RMSprop, dict(lr=0.01), LR),
    OptimizerCase(RMSprop, dict(lr=0.01, alpha=0.9, eps=1e-6), LR),
    OptimizerCase(RMSprop, dict(lr=0.01, momentum=0.9), LR_MOM),
    OptimizerCase(RMSprop, dict(lr=0.01, centered=True), LR),
    OptimizerCase(RMSprop, dict(lr=0.01, weight_decay=0.01), LR_WD),
    OptimizerCase(RMSprop, dict(lr=0.01, maximize=True), LR),
    OptimizerCase(RMSprop, dict(lr=0.01, alpha=0.95, momentum=0.5, centered=True,
                                weight_decay=0.01, maximize=True), ALL),
    # --- Adagrad (no momentum)
    OptimizerCase(Adagrad, dict(lr=0.1), LR),
    OptimizerCase(Adagrad, dict(lr=0.1, lr_decay=0.01), LR),
    OptimizerCase(Adagrad, dict(lr=0.1, weight_decay=0.01), LR_WD),
    OptimizerCase(Adagrad, dict(lr=0.1, initial_accumulator_value=0.1), LR),
    OptimizerCase(Adagrad, dict(lr=0.1, eps=1e-6), LR),
    OptimizerCase(Adagrad, dict(lr=0.1, maximize=True), LR),
    OptimizerCase(Adagrad, dict(lr=0.1, lr_decay=0.01, weight_decay=0.01,
                                initial_accumulator_value=0.1, eps=1e-6, maximize=True), LR_WD),
]

CASE_IDS = [c.id for c in CASES]
assert len(set(CASE_IDS)) == len(CASE_IDS), "case ids must be unique"
