"""Tuned hyperparameters: parametrisation, bounds, granularity.

A tuned kind ("lr", "momentum", "weight_decay") is stored twice:

* ``values``: tensors in natural units, the ones the update rule reads;
* ``raws``: unconstrained leaf tensors (``log`` for lr and weight decay,
  ``logit`` for momentum) that the hyper-optimizer moves.

Both are laid out in *slots* by granularity:

=========== ==================================== ===========================
granularity slots                                 shape of a slot
=========== ==================================== ===========================
global      one, shared by every param group      ``()``
group       one per param group                   ``()``
tensor      one per parameter tensor              ``()``
element     one per parameter tensor              the parameter's shape
=========== ==================================== ===========================

Because every built-in rule is elementwise, a per-tensor value broadcast over
a parameter gives exactly the per-element derivatives, so one tangent per kind
serves every granularity.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

GRANULARITIES = ("global", "group", "tensor", "element")

# Authors' defaults (Clarke et al. 2022): log10 lr clamped to [-10, 0].
DEFAULT_BOUNDS = {"lr": (1e-10, 1.0), "momentum": (0.0, 0.9999), "weight_decay": (1e-10, 1.0)}


@dataclass(frozen=True)
class Parametrisation:
    """value = to_value(raw); ``dvalue_draw(value)`` is d value / d raw."""
    name: str
    to_raw: Callable[[Tensor], Tensor]
    to_value: Callable[[Tensor], Tensor]
    dvalue_draw: Callable[[Tensor], Tensor]
    raw_bound: Callable[[float], float]


def _logit_bound(v: float) -> float:
    if v <= 0.0:
        return -math.inf
    if v >= 1.0:
        return math.inf
    return math.log(v) - math.log1p(-v)


LOG = Parametrisation("log", torch.log, torch.exp, lambda v: v,
                      lambda v: math.log(v) if v > 0 else -math.inf)
LOGIT = Parametrisation("logit", torch.logit, torch.sigmoid, lambda v: v * (1 - v), _logit_bound)
PARAMETRISATIONS = {"lr": LOG, "weight_decay": LOG, "momentum": LOGIT}


def resolve_granularity(granularity, tune: tuple[str, ...]) -> dict[str, str]:
    if isinstance(granularity, str):
        granularity = {kind: granularity for kind in tune}
    elif isinstance(granularity, dict):
        extra = set(granularity) - set(tune)
        if extra:
            raise ValueError(f"granularity names kinds that are not tuned: {sorted(extra)}; "
                             f"add them to tune= (now {tune}) or drop them from granularity")
        granularity = {kind: granularity.get(kind, "global") for kind in tune}
    else:
        raise TypeError(f"granularity must be a string or a dict per kind, got {granularity!r}; "
                        f"e.g. granularity='tensor' or granularity={{'lr': 'element'}}")
    for kind, g in granularity.items():
        if g not in GRANULARITIES:
            raise ValueError(f"unknown granularity {g!r} for {kind!r}; choose one of {GRANULARITIES}")
    return granularity


def resolve_bounds(bounds, tune: tuple[str, ...]) -> dict[str, tuple[float, float]]:
    bounds = dict(bounds or {})
    unknown = set(bounds) - set(DEFAULT_BOUNDS)
    if unknown:
        raise ValueError(f"bounds has unknown kinds {sorted(unknown)}; "
                         f"use keys from {tuple(DEFAULT_BOUNDS)}")
    out = {}
    for kind in tune:
        lo, hi = bounds.get(kind, DEFAULT_BOUNDS[kind])
        lo, hi = float(lo), float(hi)
        if not (lo < hi) or math.isnan(lo) or math.isnan(hi):
            raise ValueError(f"bounds[{kind!r}] must be (low, high) with low < high, got {(lo, hi)}")
        if kind in ("lr", "weight_decay") and lo <= 0:
            raise ValueError(f"bounds[{kind!r}] low must be > 0 ({kind} is tuned in log space), "
                             f"got {lo}; e.g. bounds={{{kind!r}: (1e-10, {hi})}}")
        if kind == "momentum" and (lo < 0 or hi > 1):
            raise ValueError(f"bounds['momentum'] must lie in [0, 1], got {(lo, hi)}")
        out[kind] = (lo, hi)
    return out


class TunedKind:
    """One tuned hyperparameter kind, with its slots, values, raws and accumulators."""

    def __init__(self, kind: str, granularity: str, bounds: tuple[float, float]):
        self.kind = kind
        self.granularity = granularity
        self.bounds = bounds
        self.parametrisation = PARAMETRISATIONS[kind]
        self.raw_bounds = tuple(self.parametrisation.raw_bound(b) for b in bounds)
        self.values: list[Tensor] = []
        self.raws: list[Tensor] = []
        self.accums: list[Tensor] = []      # summed natural-unit hypergradients
        self.last: list[Tensor] = []        # hypergradient of the latest hyper-step
        self.group_slots: list[list[int]] = []  # per group: slot of each parameter

    def _new_slot(self, like: Tensor, value: float, shape) -> list[Tensor]:
        v = torch.full(shape, value, dtype=like.dtype, device=like.device)
        raw = self.parametrisation.to_raw(v)
        self.values.append(v)
        self.raws.append(raw)
        self.accums.append(torch.zeros_like(v))
        self.last.append(torch.zeros_like(v))
        return [raw]

    def add_group(self, params: list[Tensor], value: float) -> list[Tensor]:
        """Create the slots of a new param group; returns the new raw leaves."""
        lo, hi = self.bounds
        if not (lo <= value <= hi):
            raise ValueError(f"initial {self.kind}={value} lies outside bounds[{self.kind!r}]="
                             f"{self.bounds}; pass bounds={{{self.kind!r}: (low, high)}} that "
                             f"contain it, or start from a value inside")
        new: list[Tensor] = []
        g = self.granularity
        if g == "global":
            if not self.values:
                new += self._new_slot(params[0], value, ())
            self.group_slots.append([0] * len(params))
        elif g == "group":
            new += self._new_slot(params[0], value, ())
            self.group_slots.append([len(self.values) - 1] * len(params))
        else:
            slots = []
            for p in params:
                new += self._new_slot(p, value, () if g == "tensor" else p.shape)
                slots.append(len(self.values) - 1)
            self.group_slots.append(slots)
        return new

    def slot(self, group_index: int, param_index: int) -> int:
        return self.group_slots[group_index][param_index]

    def fill_group(self, group_index: int, value: float) -> None:
        """Set every slot this group uses to ``value`` (a user wrote the group's entry)."""
        lo, hi = self.bounds
        value = min(max(value, lo), hi)
        with torch.no_grad():
            for s in set(self.group_slots[group_index]):
                self.values[s].fill_(value)
                self.raws[s].copy_(self.parametrisation.to_raw(self.values[s]))

    def accumulate(self, slot: int, meta_grad: Tensor, tangent: Tensor, scale: float) -> None:
        """accum += scale * <meta_grad, tangent>, reduced to the slot's shape."""
        acc = self.accums[slot]
        if acc.dim() == 0:
            acc.add_(torch.vdot(meta_grad.reshape(-1), tangent.reshape(-1)), alpha=scale)
        else:
            acc.addcmul_(meta_grad, tangent, value=scale)

    def per_group(self, tensors: list[Tensor]) -> list:
        """Arrange slot tensors as the public structure: one entry per param group."""
        out = []
        for slots in self.group_slots:
            if self.granularity in ("global", "group"):
                out.append(tensors[slots[0]].detach().clone() if slots else None)
            elif self.granularity == "tensor":
                out.append(torch.stack([tensors[s] for s in slots]).detach().clone()
                           if slots else None)
            else:
                out.append([tensors[s].detach().clone() for s in slots])
        return out
