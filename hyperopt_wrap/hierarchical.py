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
        if level not in LEVELS:
            raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
        if spread is not None and not (isinstance(spread, (int, float)) and spread >= 0
                                       and math.isfinite(spread)):
            raise ValueError(f"spread must be a finite number >= 0 (raw units, e.g. "
                             f"math.log(2)) or None, got {spread!r}")
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
        """One step of every group (about thirty tensor operations a group, on one flat vector
        of its entries); ``eps_scale`` as for :class:`NormalizedMomentum`."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._step_group(group, params, found_inf, eps_scale or {})
        return loss

    def _lengths(self, sizes: list[int], dev: torch.device) -> Tensor:
        """The blocks' sizes as a device tensor, made once per layout (no copy a step)."""
        cache = self.__dict__.setdefault("_lengths_cache", {})
        key = (tuple(sizes), dev)
        if key not in cache:
            cache[key] = torch.tensor(sizes, device=dev)
        return cache[key]

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_lengths_cache", None)
        return state

    def _step_group(self, group: dict, params: list[Tensor], found_inf, eps_scale) -> None:
        dev, dtype = params[0].device, params[0].dtype
        wide = torch.float32 if dev.type == "mps" else torch.float64
        sizes = [p.numel() for p in params]
        x = torch.cat([p.reshape(-1) for p in params]).to(wide)
        g = torch.cat([p.grad.reshape(-1) for p in params]).to(wide)
        ok = None
        if found_inf is not None:
            ok = 1 - found_inf.to(dev, wide)
            g = torch.nan_to_num(g, 0.0, 0.0, 0.0)
        e = torch.cat([eps_scale[p].reshape(-1).to(wide).abs() if p in eps_scale
                       else torch.ones(n, dtype=wide, device=dev)
                       for p, n in zip(params, sizes)])
        lr, b1, eps, spread = group["lr"], group["momentum"], group["eps"], group["spread"]
        first = self.state[params[0]]
        if not first:
            shape = () if spread is not None else (x.numel(),)
            first["step"] = torch.zeros((), dtype=torch.float32, device=dev)
            first["level_avg"] = torch.zeros(shape, dtype=wide, device=dev)
            first["level_sq"] = torch.zeros(shape, dtype=wide, device=dev)
        if spread is not None:
            for p in params:
                if "exp_avg" not in self.state[p]:
                    self.state[p]["exp_avg"] = torch.zeros_like(p)
        step = first["step"]
        step.add_(1 if ok is None else ok.to(step.dtype))
        t = step.to(wide).clamp(min=1)
        # NormalizedMomentum's bias correction, in float32 as there
        bc1 = (1 - b1 ** step.clamp(min=1)).to(wide)
        w = (lambda c: c) if ok is None else (lambda c: c * ok)
        # the level: one scalar (its hypergradient the entries' sum), or every entry
        if spread is not None:
            level, grad, floor = x.mean(), g.sum(), eps * e.mean()
        else:
            level, grad, floor = x, g, eps * e
        m, v = first["level_avg"].to(wide), first["level_sq"].to(wide)
        if group["level"] == "normalized":
            g_hat = grad / torch.maximum(grad.abs(), floor).clamp(min=torch.finfo(wide).tiny)
            m.lerp_(g_hat, w(1 - b1))
            delta = (m / bc1).clamp_(-1, 1).mul_(-lr)
        else:
            beta1, beta2 = group["betas"]
            m.lerp_(grad, w(1 - beta1))
            v.lerp_(grad * grad, w(1 - beta2))
            delta = (m / (1 - beta1 ** t)).div_(
                (v / (1 - beta2 ** t)).sqrt_().add_(group["adam_eps"])).mul_(-lr)
        first["level_avg"].copy_(m)
        first["level_sq"].copy_(v)
        if spread is None:
            new = x + delta
        else:       # the deviations: NormalizedMomentum per block, clamped, re-centred
            d = x - level
            lengths = self._lengths(sizes, dev)
            rms = (torch.segment_reduce(g.square(), "sum", lengths=lengths)
                   / lengths.to(wide)).sqrt().repeat_interleave(lengths, output_size=x.numel())
            g_hat = g / torch.maximum(rms, eps * e).clamp_(min=torch.finfo(wide).tiny)
            dm = torch.cat([self.state[p]["exp_avg"].reshape(-1) for p in params]).to(wide)
            dm.lerp_(g_hat, w(1 - b1))
            for p, part in zip(params, dm.split(sizes)):
                self.state[p]["exp_avg"].copy_(part.view_as(p))
            rate = lr * group["deviation_lr"]
            d.sub_((dm / bc1).clamp_(-1, 1), alpha=rate).clamp_(-spread, spread)
            d.sub_(d.mean())
            new = d.add_(level + delta)
        if ok is not None:
            new = torch.lerp(x, new, ok)        # an exact select: a skipped step moves nothing
        torch._foreach_copy_(params, [part.view_as(p).to(dtype)
                                      for part, p in zip(new.split(sizes), params)])
