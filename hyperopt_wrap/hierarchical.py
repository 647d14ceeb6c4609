"""Hierarchical: the default hyper-optimizer for per-tensor and per-element values.

A per-tensor or per-element learning rate is a *shared level* (one value per tuned kind, moved
exactly as a global value is) plus *bounded deviations* of each entry from it::

    raw_i = level + d_i,    |d_i| <= spread before re-centring, <= 2 spread after
                            (raw units; for lr: log lr, spread = log 2: within a factor 2)

* The level's hypergradient is the sum of the entries' (``dE/dlevel = sum_i dE/draw_i``, the
  chain rule through a uniform shift), stepped by the rule the method uses for a global value:
  ``level="normalized"`` (greedy: :class:`~hyperopt_wrap.NormalizedMomentum`'s sign momentum,
  eps in natural units) or ``level="adam"`` (implicit, unroll and the forward methods: torch's
  Adam recurrence on the one scalar).  With all deviations at 0 the run is the global run, step
  for step (tested).
* Each deviation moves by NormalizedMomentum's step on its own hypergradient (normalised by its
  block's RMS), scaled by ``deviation_lr`` (a fraction of ``lr``), then is clamped to
  ``[-spread, spread]`` and the deviations are re-centred (their mean is the level's business).

Why (``benchmarks/RESULTS.md``, "Per-tensor and per-element values"; 10 of the study's
initialisations, SGD with lr, momentum and weight decay tuned on a validation loss): with one
free value per entry (NormalizedMomentum per block, the default before 0.6) per-element greedy
fits the validation set it is tuned on (digits: validation loss 0.059 against the global row's
0.088) and generalises worse (test loss 0.184 against 0.102); in the study it ended at 2.4x the
global row on digits.  Tying the entries to a level keeps what works globally (with ``spread=0``
the run is the global run) and lets them differ only as far as ``spread`` allows.  Measured:
per-tensor within x2 as good as global or better on digits, diabetes and the LSTM (x4 and x10
no better); per-element, x1.25 cost greedy or implicit up to 10% on digits or diabetes (x2:
greedy's digits loss 9x), x1.1 0-9%.  HyperOptimizer's defaults: ``spread = log 2`` per tensor,
``log 1.1`` per element (:data:`SHARED_LEVEL`).

Groups without a ``spread`` (HyperOptimizer passes ``spread=None`` for kinds tuned globally or
per param group) step every entry as a level of its own.  ``found_inf`` (a device float,
nonzero = skip) skips the whole step on the device, counters included; nothing is read on the
host.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .normalized_momentum import NormalizedMomentum

LEVELS = ("normalized", "adam")
#: the granularities whose entries share a level (the others: every entry its own level), with
#: the spread HyperOptimizer gives them when the user names none (measured: RESULTS.md,
#: "Per-tensor and per-element values")
SHARED_LEVEL = {"tensor": math.log(2), "element": math.log(1.1)}


class Hierarchical(NormalizedMomentum):
    r"""A shared level per group plus bounded per-entry deviations (see the module docstring).

    Args:
        params: the raw hyperparameter blocks (HyperOptimizer passes one group per tuned kind,
            with ``spread`` set for kinds tuned per tensor or per element).
        lr: the level's step size on raw values (``hyper_lr``).
        level: ``"normalized"`` (sign momentum: no step larger than ``lr``) or ``"adam"``.
        spread: the largest deviation of an entry from the level, in raw units (``log 2``: a
            learning rate within a factor 2 of the level); 0 ties every entry to the level;
            ``None``: every entry is a level of its own.
        deviation_lr: the deviations' step as a fraction of ``lr``.
        momentum: NormalizedMomentum's first-moment decay (the normalised level, deviations).
        eps: NormalizedMomentum's dead zone (natural units where HyperOptimizer passes
            ``eps_scale``).
        betas, adam_eps: the Adam level's decays and eps (raw units, as torch's Adam).
    """

    def __init__(self, params, lr: float = 0.05, level: str = "normalized",
                 spread: float | None = math.log(2), deviation_lr: float = 0.25,
                 momentum: float = 0.9, eps: float = 1e-8,
                 betas: tuple[float, float] = (0.9, 0.999), adam_eps: float = 1e-8):
        if not (isinstance(lr, (int, float)) and lr >= 0.0):
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"Invalid momentum: {momentum} (must lie in [0, 1))")
        if not eps > 0.0:
            raise ValueError(f"Invalid eps: {eps} (must be > 0)")
        _check_group(level, spread)
        if not (isinstance(deviation_lr, (int, float)) and deviation_lr >= 0):
            raise ValueError(f"deviation_lr must be >= 0, got {deviation_lr!r}")
        if not (len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas)):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
        if not adam_eps > 0.0:
            raise ValueError(f"adam_eps must be > 0, got {adam_eps!r}")
        torch.optim.Optimizer.__init__(self, params, dict(
            lr=lr, level=level, spread=spread, deviation_lr=deviation_lr, momentum=momentum,
            eps=eps, betas=tuple(betas), adam_eps=adam_eps, normalize="block"))

    @torch.no_grad()
    def step(self, closure=None, found_inf: Tensor | None = None,
             eps_scale: dict | None = None):
        """One step of every group; ``eps_scale`` as for :class:`NormalizedMomentum`.  The
        blocks' ``.grad`` are consumed: per tensor or per element they are normalised in place
        (HyperOptimizer drops them after the step)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._step_group(group, params, found_inf, eps_scale or {})
        return loss

    def _step_group(self, group: dict, params: list[Tensor], found_inf, eps_scale) -> None:
        dev = params[0].device
        wide = torch.float32 if dev.type == "mps" else torch.float64
        ok = None if found_inf is None else 1 - found_inf.to(dev, wide)
        first = self.state[params[0]]
        if "step" not in first:
            first["step"] = torch.zeros((), dtype=torch.float32, device=dev)
        step = first["step"]
        step.add_(1 if ok is None else ok.to(step.dtype))
        b1 = group["momentum"]
        bc1 = (1 - b1 ** step.clamp(min=1)).to(wide)   # (in float32, as NormalizedMomentum's)
        if group["spread"] is None:
            self._step_own(group, params, ok, eps_scale, step.to(wide).clamp(min=1), bc1)
        else:
            self._step_shared(group, params, ok, eps_scale, step.to(wide).clamp(min=1), bc1)

    @staticmethod
    def _level_step(group: dict, m: Tensor, v: Tensor, grad: Tensor, floor: Tensor, ok,
                    t: Tensor, bc1: Tensor) -> Tensor:
        """The level's rule on its state ``m``, ``v`` (in place, gated by ``ok``): the step."""
        lr = group["lr"]
        if group["level"] == "normalized":
            tiny = torch.finfo(grad.dtype).tiny
            g_hat = grad / torch.maximum(grad.abs(), floor).clamp(min=tiny)
            m.lerp_(g_hat, _gated(1 - group["momentum"], ok, m.dtype))
            return (m / bc1).clamp(-1, 1).mul_(-lr)
        beta1, beta2 = group["betas"]
        m.lerp_(grad, _gated(1 - beta1, ok, m.dtype))
        v.lerp_(grad * grad, _gated(1 - beta2, ok, v.dtype))
        return (m / (1 - beta1 ** t)).div_(
            (v / (1 - beta2 ** t)).sqrt_().add_(group["adam_eps"])).mul_(-lr)

    def _step_own(self, group, params, ok, eps_scale, t, bc1) -> None:
        """Every entry a level of its own (kinds tuned globally or per group: a few entries)."""
        dtype = params[0].dtype
        sizes = [p.numel() for p in params]
        for p in params:
            if "level_avg" not in self.state[p]:
                self.state[p].update(level_avg=torch.zeros_like(p), level_sq=torch.zeros_like(p))
        x = torch.cat([p.reshape(-1) for p in params])
        g = torch.cat([p.grad.reshape(-1) for p in params]).to(dtype)
        if ok is not None:
            g = torch.nan_to_num(g, 0.0, 0.0, 0.0)
        e = torch.cat([eps_scale[p].reshape(-1).to(dtype).abs() if p in eps_scale
                       else torch.ones(p.numel(), dtype=dtype, device=p.device) for p in params])
        m = torch.cat([self.state[p]["level_avg"].reshape(-1) for p in params])
        v = torch.cat([self.state[p]["level_sq"].reshape(-1) for p in params])
        new = x + self._level_step(group, m, v, g, group["eps"] * e, ok, t, bc1)
        for p, mp, vp in zip(params, m.split(sizes), v.split(sizes)):
            self.state[p]["level_avg"].copy_(mp.view_as(p))
            self.state[p]["level_sq"].copy_(vp.view_as(p))
        if ok is not None:
            new = torch.lerp(x, new, ok.to(dtype))   # an exact select: a skipped step moves nothing
        torch._foreach_copy_(params, [part.view_as(p) for part, p in zip(new.split(sizes), params)])

    def _step_shared(self, group, params, ok, eps_scale, t, bc1) -> None:
        """One level for the group's entries, and their deviations: block by block, in the
        blocks' dtype (the sums in float64), a dozen passes over the entries and no copy of
        them all.  The level is the entries' mean shift from their origins (their values at
        construction), so entries that started apart (two param groups at different lrs) keep
        their offsets and deviate from them by at most ``spread``."""
        wide = t.dtype
        first = self.state[params[0]]
        if "level_avg" not in first:   # (in the blocks' dtype, as torch's load_state_dict casts)
            first["level_avg"] = torch.zeros((), dtype=params[0].dtype, device=t.device)
            first["level_sq"] = torch.zeros((), dtype=params[0].dtype, device=t.device)
        grads, origins = [], []
        for p in params:
            st = self.state[p]
            if "exp_avg" not in st:
                st["exp_avg"] = torch.zeros_like(p)
            if "origin" not in st:     # (recorded at construction; otherwise: its value now)
                st["origin"] = p.detach().clone()
            origins.append(st["origin"])
            # (the hypergradients are the hyper-optimizer's to consume: HyperOptimizer drops
            # them after the step, so a NaN is zeroed and the blocks normalised in place)
            grads.append(p.grad if ok is None else torch.nan_to_num_(p.grad, 0.0, 0.0, 0.0))
        total = sum(p.numel() for p in params)
        counts = self._counts(params, t.device, wide)
        # the level: the entries' mean shift from their origins; its hypergradient the
        # entries' sum; the dead zone eps * the mean |d value / d raw| (natural units, as for a
        # global value)
        shifts = torch.stack([p.sum(dtype=wide) - (o.sum(dtype=wide) if o.dim() else
                                                   o.to(wide) * p.numel())
                              for p, o in zip(params, origins)])
        gs = torch.stack([g.sum(dtype=wide) for g in grads])
        scales = [eps_scale[p] for p in params if p in eps_scale]
        e_sums = torch.stack(torch._foreach_norm(scales, 1, dtype=wide)) if len(scales) == \
            len(params) else counts
        level = shifts.sum() / total
        floor = group["eps"] * e_sums.sum() / total
        m, v = first["level_avg"].to(wide), first["level_sq"].to(wide)
        delta = self._level_step(group, m, v, gs.sum(), floor, ok, t, bc1)
        first["level_avg"].copy_(m)
        first["level_sq"].copy_(v)
        # the deviations: each block's hypergradient over its RMS (at least the dead zone)
        rms = torch.stack(torch._foreach_norm(grads, 2, dtype=wide)) / counts.sqrt()
        scale = torch.maximum(rms, group["eps"] * e_sums / counts)
        weight = _gated(1 - group["momentum"], ok, wide)
        rate = group["lr"] * group["deviation_lr"]
        spread = group["spread"]
        devs, sums = [], []
        for i, (p, g, o) in enumerate(zip(params, grads, origins)):
            m = self.state[p]["exp_avg"]
            tiny = torch.finfo(p.dtype).tiny
            m.lerp_(g.div_(scale[i].clamp(min=tiny).to(p.dtype)), weight.to(p.dtype))
            d = p - (o.to(wide) + level).to(p.dtype) if o.dim() == 0 else (p - o).sub_(
                level.to(p.dtype))
            d.sub_((m / bc1.to(p.dtype)).clamp_(-1, 1), alpha=rate).clamp_(-spread, spread)
            devs.append(d)
            sums.append(d.sum(dtype=wide))
        shift = level + delta - torch.stack(sums).sum() / total     # re-centred
        for p, d, o in zip(params, devs, origins):
            new = d.add_((o.to(wide) + shift).to(p.dtype)) if o.dim() == 0 else \
                d.add_(o).add_(shift.to(p.dtype))
            if ok is None:
                p.copy_(new)
            else:                   # an exact select: a skipped step moves nothing
                p.lerp_(new, ok.to(p.dtype))

    def add_param_group(self, param_group: dict) -> None:
        """torch's, and for a group with a ``spread``: each block's origin (its value now; one
        number for a block whose entries are equal, read here at construction, never in
        ``step``)."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_group(group["level"], group["spread"])
        if group["spread"] is None:
            return
        with torch.no_grad():
            for p in group["params"]:
                flat = p.detach().reshape(-1)
                uniform = flat.numel() > 0 and bool((flat == flat[0]).all())
                self.state[p]["origin"] = flat[0].clone() if uniform else p.detach().clone()

    def _counts(self, params: list[Tensor], dev: torch.device, dtype) -> Tensor:
        """The blocks' sizes on the device, made once per layout (no copy a step)."""
        cache = self.__dict__.setdefault("_counts_cache", {})
        key = (tuple(p.numel() for p in params), dev, dtype)
        if key not in cache:
            cache[key] = torch.tensor([float(n) for n in key[0]], dtype=dtype, device=dev)
        return cache[key]

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_counts_cache", None)
        return state


def _check_group(level, spread) -> None:
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    if spread is not None and not (isinstance(spread, (int, float)) and spread >= 0
                                   and math.isfinite(spread)):
        raise ValueError(f"spread must be a finite number >= 0 (raw units, e.g. math.log(2)) "
                         f"or None, got {spread!r}")


def _gated(weight: float, ok: Tensor | None, dtype) -> "float | Tensor":
    """A lerp weight, 0 where the step is skipped (``ok`` = 0; a device tensor, no sync)."""
    return weight if ok is None else (ok * weight).to(dtype)
