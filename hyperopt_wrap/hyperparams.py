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

# Authors' defaults (Clarke et al. 2022): log10 lr clamped to [-10, 0].  Momentum at most 0.99
# (0.9999 until 0.5): a greedy one-step hypergradient drives momentum up early in training, and
# at 0.9999 (a step 10^4 times the gradient's) runs oscillated for hundreds of steps or never
# came back; at 0.99 the study's global rows are unchanged or better and the per-tensor and
# per-element rows stop blowing up (RESULTS.md, "Per-tensor and per-element values").
DEFAULT_BOUNDS = {"lr": (1e-10, 1.0), "momentum": (0.0, 0.99), "weight_decay": (1e-10, 1.0)}


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


def _log_bound(v: float) -> float:
    return math.log(v) if v > 0 else -math.inf


def _identity(v: Tensor) -> Tensor:
    return v


def _sigmoid_derivative(v: Tensor) -> Tensor:
    return v * (1 - v)


# module-level functions, not lambdas, so that an optimizer can be pickled and deep-copied
LOG = Parametrisation("log", torch.log, torch.exp, _identity, _log_bound)
LOGIT = Parametrisation("logit", torch.logit, torch.sigmoid, _sigmoid_derivative, _logit_bound)
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


def resolve_bounds(bounds, tune: tuple[str, ...]) -> dict[str, tuple[tuple[float, float], bool]]:
    """``{kind: ((low, high), given)}`` for every tuned kind; ``given`` is whether the user
    named the bounds (default bounds widen to contain an initial value, given ones refuse it)."""
    if bounds is None:
        bounds = {}
    if not isinstance(bounds, dict):
        raise TypeError(f"bounds must be a dict {{kind: (low, high)}}, got {bounds!r}; e.g. "
                        "bounds={'lr': (1e-6, 1.0)}")
    unknown = set(bounds) - set(DEFAULT_BOUNDS)
    if unknown:
        raise ValueError(f"bounds has unknown kinds {sorted(unknown)}; "
                         f"use keys from {tuple(DEFAULT_BOUNDS)}")
    untuned = set(bounds) - set(tune)
    if untuned:
        raise ValueError(f"bounds names kinds that are not tuned: {sorted(untuned)}; add them "
                         f"to tune= (now {tune}) or drop them from bounds")
    out = {}
    for kind in tune:
        pair = bounds.get(kind, DEFAULT_BOUNDS[kind])
        try:
            lo, hi = (float(b) for b in pair)
        except (TypeError, ValueError):
            raise ValueError(f"bounds[{kind!r}] must be a pair (low, high) of numbers, got "
                             f"{pair!r}; e.g. bounds={{{kind!r}: (1e-6, 1.0)}}") from None
        if not (lo < hi) or math.isnan(lo) or math.isnan(hi):
            raise ValueError(f"bounds[{kind!r}] must be (low, high) with low < high, got {(lo, hi)}")
        if kind in ("lr", "weight_decay") and (lo <= 0 or math.isinf(hi)):
            raise ValueError(f"bounds[{kind!r}] must be finite with low > 0 ({kind} is tuned in "
                             f"log space), got {(lo, hi)}; e.g. bounds={{{kind!r}: (1e-10, 1.0)}}")
        if kind == "momentum" and not (0 <= lo and hi < 1):
            raise ValueError(f"bounds['momentum'] must lie in [0, 1) with high < 1, got {(lo, hi)}: "
                             "momentum is tuned in logit space, where 1 is out of reach (and a "
                             "value rounded to 1.0 could never move again); e.g. "
                             "bounds={'momentum': (0.0, 0.999)}")
        out[kind] = ((lo, hi), kind in bounds)
    return out


class TunedKind:
    """One tuned hyperparameter kind, stored in *blocks* that the hyper-optimizer moves.

    global/group/tensor: a block is a 1-D tensor of scalar slots (one block shared by every
    group for "global"; one per group otherwise, with one slot per group or per parameter), so a
    hyper-step costs a handful of small ops however many parameters there are.  element: one
    block per parameter, shaped like it.  ``group_slots[gi][pi]`` is ``(block, index)`` with
    ``index`` None for element blocks.
    """

    def __init__(self, kind: str, granularity: str, bounds: tuple[float, float],
                 given: bool = True):
        self.kind = kind
        self.granularity = granularity
        self.parametrisation = PARAMETRISATIONS[kind]
        self.given = given          # bounds named by the user: an initial value outside is refused
        self._set_bounds(bounds)
        self.values: list[Tensor] = []      # natural units, read by the update rule
        self.raws: list[Tensor] = []        # unconstrained leaves, moved by the hyper-optimizer
        self.accums: list[Tensor] = []      # summed natural-unit hypergradients of the window
        self.last: list[Tensor] = []        # hypergradient of the latest hyper-step
        # per group, per parameter: (block, index) -- index None for element blocks; a group
        # whose weight decay starts at 0 (a no-decay group) has None: it stays untuned at 0
        self.group_slots: list[list[tuple[int, int | None]] | None] = []

    def _new_block(self, like: Tensor, value: float, shape) -> Tensor:
        # at least float32: a bf16/fp16 model still tunes its hyperparameters in full precision
        dtype = torch.promote_types(like.dtype, torch.float32)
        v = torch.full(shape, value, dtype=dtype, device=like.device)
        raw = self.parametrisation.to_raw(v)
        self.values.append(v)
        self.raws.append(raw)
        self.accums.append(torch.zeros_like(v))
        self.last.append(torch.zeros_like(v))
        return raw

    def _set_bounds(self, bounds: tuple[float, float]) -> None:
        self.bounds = bounds
        self.raw_bounds = tuple(self.parametrisation.raw_bound(b) for b in bounds)

    def check_initial(self, value: float) -> tuple[float, float]:
        """The bounds once ``value`` is a tuned value: default bounds widen to contain it (a
        user's lr of 2.0 or 1e-12 is honoured), bounds the user named refuse it."""
        lo, hi = self.bounds
        if lo <= value <= hi:
            return self.bounds
        if self.given:
            raise ValueError(f"initial {self.kind}={value} lies outside bounds[{self.kind!r}]="
                             f"{self.bounds}; pass bounds={{{self.kind!r}: (low, high)}} that "
                             f"contain it, or start from a value inside")
        return (min(lo, value), max(hi, value))

    def add_untuned_group(self) -> None:
        self.group_slots.append(None)

    def add_group(self, params: list[Tensor], value: float) -> list[Tensor]:
        """Create the blocks of a new param group; returns the new raw leaves."""
        g, n = self.granularity, len(self.values)
        if not self.values:
            self.initial = value
        if g != "global" or not self.values:     # (a later global group adds no value)
            self._set_bounds(self.check_initial(value))
        if g == "global":
            new = [] if self.values else [self._new_block(params[0], value, (1,))]
            self.group_slots.append([(0, 0)] * len(params))
        elif g == "group":
            new = [self._new_block(params[0], value, (1,))]
            self.group_slots.append([(n, 0)] * len(params))
        elif g == "tensor":
            new = [self._new_block(params[0], value, (len(params),))]
            self.group_slots.append([(n, i) for i in range(len(params))])
        else:
            new = [self._new_block(p, value, p.shape) for p in params]
            self.group_slots.append([(n + i, None) for i in range(len(params))])
        return new

    def is_tuned(self, group_index: int) -> bool:
        return self.group_slots[group_index] is not None

    def value(self, group_index: int, param_index: int) -> Tensor:
        block, index = self.group_slots[group_index][param_index]
        return self.values[block] if index is None else self.values[block][index]

    def fill_group(self, group_index: int, value: float) -> None:
        """Set every slot this group uses to ``value`` (a user wrote the group's entry)."""
        lo, hi = self.bounds
        value = min(max(value, lo), hi)
        with torch.no_grad():
            for block, index in set(self.group_slots[group_index] or ()):
                target = self.values[block] if index is None else self.values[block][index]
                target.fill_(value)
                self.raws[block].copy_(self.parametrisation.to_raw(self.values[block]))

    def accumulate(self, terms) -> None:
        """accum += scale * <meta_grad, tangent>, reduced to each slot's shape, for ``terms``
        = iterable of ``(group_index, param_index, meta_grad, tangent, scale)``.  Scalar slots
        are summed in one add per block, not one small op per parameter."""
        scalar: dict[int, list] = {}
        for gi, pi, meta_grad, tangent, scale in terms:
            slots = self.group_slots[gi]
            if slots is None:
                continue
            block, index = slots[pi]
            if index is None:
                self.accums[block].addcmul_(meta_grad, tangent, value=scale)
                continue
            dot = torch.vdot(meta_grad.reshape(-1), tangent.reshape(-1))
            scalar.setdefault(block, []).append((index, dot * scale if scale != 1.0 else dot))
        self._add_scalar(scalar)

    def slots_of(self, group_index: int, param_indices: list[int]):
        """How a bucket of this group's parameters maps onto slots: None (the group is not
        tuned), ``("scalar", block, index)`` (one slot for all of them: global, group),
        ``("tensor", block, indices)`` or ``("element", blocks)``."""
        slots = self.group_slots[group_index]
        if slots is None:
            return None
        mine = [slots[pi] for pi in param_indices]
        if self.granularity in ("global", "group"):
            return ("scalar",) + mine[0]
        if self.granularity == "tensor":
            return ("tensor", mine[0][0], [i for _, i in mine])
        return ("element", [b for b, _ in mine])

    def accumulate_bucket(self, slots, bucket, meta: Tensor, tangent: Tensor,
                          scale: float) -> None:
        """accum += scale * <meta, tangent> per slot, for a bucket's flat ``meta`` and
        ``tangent`` (a dot for a shared slot, segment sums per tensor, one foreach op per
        element blocks)."""
        how = slots[0]
        if how == "scalar":
            _, block, index = slots
            acc = self.accums[block]
            if meta.dtype != acc.dtype:
                meta, tangent = meta.to(acc.dtype), tangent.to(acc.dtype)
            acc[index].add_(torch.dot(meta, tangent), alpha=scale)
        elif how == "tensor":
            _, block, indices = slots
            acc = self.accums[block]
            prod = meta * tangent if meta.dtype == acc.dtype else \
                meta.to(acc.dtype) * tangent.to(acc.dtype)
            sums = bucket.segment_sums(prod)
            if indices == list(range(acc.numel())):
                acc.add_(sums, alpha=scale)
            else:
                acc.index_add_(0, self._index(indices, acc.device), sums, alpha=scale)
        else:
            accs = [self.accums[b] for b in slots[1]]
            metas, tangents = bucket.views(meta), bucket.views(tangent)
            if accs[0].dtype == meta.dtype:
                torch._foreach_addcmul_(accs, metas, tangents, value=scale)
            else:
                for a, m, t in zip(accs, metas, tangents):
                    a.add_(m.to(a.dtype) * t.to(a.dtype), alpha=scale)

    def accumulate_dots(self, slots, metas: list[Tensor], tangents: list[Tensor], scale: float,
                        finite: Tensor) -> None:
        """accum += scale * <meta, tangent> per tensor into each slot, for a bucket's per-tensor
        ``metas`` that may not be finite (a fused step's own gradients, unchecked): where
        ``finite`` (a device bool) is False the step adds 0, as a checked gradient of zeros
        would.  Shared and per-tensor slots (a fused step's lr is a 0-dim value)."""
        acc = self.accums[slots[1]]
        if metas[0].dtype != acc.dtype:
            metas = [m.to(acc.dtype) for m in metas]
            tangents = [t.to(acc.dtype) for t in tangents]
        self.add_dots(slots, torch.stack([torch.vdot(m.reshape(-1), t.reshape(-1))
                                          for m, t in zip(metas, tangents)]), scale, finite)

    def _index(self, indices: list[int], device) -> Tensor:
        """``indices`` as a tensor on ``device``, made once (on CUDA a fresh one each step
        would be a host-to-device copy inside ``step()``)."""
        cache = self.__dict__.setdefault("_indices", {})
        key = (tuple(indices), device)
        hit = cache.get(key)
        if hit is None:
            hit = cache[key] = torch.tensor(indices, device=device)
        return hit

    def add_dots(self, slots, dots: Tensor, scale: float, finite: Tensor) -> None:
        """accum += scale * dots for a bucket's per-tensor ``dots`` (1-D), summed into a shared
        slot or one per tensor; 0 where ``finite`` is False."""
        how, block = slots[0], slots[1]
        if how == "element":
            raise ValueError("per-element slots take flat meta-gradients (accumulate_bucket)")
        acc = self.accums[block]
        dots = torch.where(finite.to(acc.device), dots.to(acc.dtype), 0.0)
        if how == "scalar":
            acc[slots[2]].add_(dots.sum(), alpha=scale)
        elif slots[2] == list(range(acc.numel())):
            acc.add_(dots, alpha=scale)
        else:
            acc.index_add_(0, self._index(slots[2], acc.device), dots, alpha=scale)

    def add_contributions(self, terms) -> None:
        """accum += value for ``terms`` = iterable of ``(group_index, param_index, value)``,
        ``value`` already reduced to the slot's shape (0-dim, or the parameter's shape for
        element slots)."""
        scalar: dict[int, list] = {}
        for gi, pi, value in terms:
            slots = self.group_slots[gi]
            if slots is None:
                continue
            block, index = slots[pi]
            if index is None:
                self.accums[block].add_(value)
            else:
                scalar.setdefault(block, []).append((index, value))
        self._add_scalar(scalar)

    def _add_scalar(self, scalar: dict[int, list]) -> None:
        for block, items in scalar.items():
            acc = self.accums[block]
            dots = torch.stack([d.to(acc.device, acc.dtype) for _, d in items])
            indices = [i for i, _ in items]
            if acc.numel() == 1:
                acc.add_(dots.sum())
            elif indices == list(range(acc.numel())):
                acc.add_(dots)
            else:   # some parameters had no gradient this step
                for i, d in zip(indices, dots):
                    acc[i].add_(d)

    def per_group(self, blocks: list[Tensor]) -> list:
        """Arrange block tensors as the public structure: one entry per param group."""
        out = []
        for slots in self.group_slots:
            if slots is None:
                out.append(0.0)
            elif self.granularity in ("global", "group"):
                block, index = slots[0]
                out.append(blocks[block][index].detach().clone())
            elif self.granularity == "tensor":
                out.append(blocks[slots[0][0]].detach().clone())
            else:
                out.append([blocks[b].detach().clone() for b, _ in slots])
        return out
