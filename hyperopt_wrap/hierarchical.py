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
greedy's digits loss 9x), x1.1 0-9%.  In the study (N=20) the per-tensor and per-element rows
of greedy, implicit and unroll are at or below global on diabetes and the LSTM (one 0.1% above),
0.7-7.1% above on digits.  HyperOptimizer's defaults: ``spread = log 2`` per tensor,
``log 1.1`` per element (:data:`SHARED_LEVEL`).

The level is the entries' mean shift from their *origins* (their values at construction), so
entries that start apart (param groups at different lrs) keep their offsets.  A param group
added to the HyperOptimizer later joins its kind's level (:meth:`Hierarchical.extend_group`), and
a value the user writes to a group is rebased onto the level (:meth:`Hierarchical.rebase`): both
start at deviation 0, as written.  With spread 0 a run is the global run (float64, to rounding;
not where an entry sits at a bound, whose clamp then holds the mean back).

Groups without a ``spread`` (HyperOptimizer passes ``spread=None`` for kinds tuned globally or
per param group) step every entry as a level of its own.  ``found_inf`` (a device float,
1.0 = skip) skips the whole step on the device, counters included; nothing is read on the host.
Constructed by hand, ``level`` defaults to ``"normalized"`` (greedy's rule); HyperOptimizer
chooses ``"adam"`` itself for the methods whose global rule is Adam.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .normalized_momentum import _FLAT_MAX, NormalizedMomentum, check_options

LEVELS = ("normalized", "adam")
#: a shared group of more blocks than this, averaging under 4096 entries, is stepped on one flat
#: vector (a dozen ops in all, where block by block costs a dozen a block: per-element lr on 200
#: 16x16 tensors took 3.7x a torch SGD step so); fewer or larger blocks, block by block (no copy
#: of all entries)
FLAT_BLOCKS = 8
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
        check_options(lr, momentum, eps)
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
        first = self.state[group["params"][0]]     # (the group's counter and level state)
        if "step" not in first:
            first["step"] = torch.zeros((), dtype=torch.float32, device=dev)
        elif first["step"].device != dev:          # (torch's load_state_dict leaves it)
            first["step"] = first["step"].to(dev)
        step = first["step"]
        step.add_(1 if ok is None else ok.to(step.dtype))
        b1 = group["momentum"]
        bc1 = (1 - b1 ** step.clamp(min=1)).to(wide)   # (in float32, as NormalizedMomentum's)
        if group["spread"] is None:
            self._step_own(group, params, ok, eps_scale, step.to(wide).clamp(min=1), bc1)
        else:
            many_small = len(params) > FLAT_BLOCKS and \
                sum(p.numel() for p in params) < _FLAT_MAX * len(params) and \
                len({(p.device, p.dtype) for p in params}) == 1
            shared = self._step_flat_shared if many_small else self._step_shared
            shared(group, params, ok, eps_scale, step.to(wide).clamp(min=1), bc1)

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
        v.lerp_(_square(grad, v.dtype), _gated(1 - beta2, ok, v.dtype))
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
        if ok is not None:       # a skipped step moves nothing
            new = torch.where(ok > 0, new, x)
        torch._foreach_copy_(params, [part.view_as(p) for part, p in zip(new.split(sizes), params)])

    def _step_shared(self, group, params, ok, eps_scale, t, bc1) -> None:
        """One level for the group's entries, and their deviations: block by block, in the
        blocks' dtype (the sums' results widened to float64), a dozen passes over the entries
        and no copy of them all.  The level is the entries' mean shift from their origins
        (their values at construction), so entries that started apart (two param groups at
        different lrs) keep their offsets and deviate from them by at most ``spread``."""
        wide = t.dtype
        first = self.state[group["params"][0]]
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
        # (at most max / total each, so that the sums below stay finite in the blocks' dtype:
        # only a blow-up's hypergradients are that large, and the level reads their sign)
        for g in grads:
            lim = torch.finfo(g.dtype).max / total
            g.clamp_(-lim, lim)
        # the level: the entries' mean shift from their origins; its hypergradient the
        # entries' sum; the dead zone eps * the mean |d value / d raw| (natural units, as for a
        # global value)
        here = t.device             # (blocks on other devices: their sums come here)
        # (sums in the blocks' dtype, then widened: a float64 sum of a float32 tensor would
        # copy it, 170 us and a page fault per 4 KiB on 200k entries)
        shifts = torch.stack([_shift(p, o, wide, here) for p, o in zip(params, origins)])
        gs = torch.stack([g.sum().to(here, wide) for g in grads])
        scales = [eps_scale[p] for p in params if p in eps_scale]
        e_sums = torch.stack([n.to(here, wide) for n in torch._foreach_norm(scales, 1)]) \
            if len(scales) == len(params) else counts
        level = shifts.sum() / total
        floor = group["eps"] * e_sums.sum() / total
        m, v = first["level_avg"].to(wide), first["level_sq"].to(wide)
        delta = self._level_step(group, m, v, gs.sum(), floor, ok, t, bc1)
        big = torch.finfo(first["level_avg"].dtype).max      # (stored finite: no inf - inf)
        first["level_avg"].copy_(m.clamp(-big, big))
        first["level_sq"].copy_(v.clamp(max=big))
        # the deviations: each block's hypergradient over its RMS (at least the dead zone)
        rms = torch.stack([n.to(here, wide) for n in torch._foreach_norm(grads, 2)]) \
            / counts.sqrt()
        scale = torch.maximum(rms, group["eps"] * e_sums / counts)
        weight = _gated(1 - group["momentum"], ok, wide)
        rate = group["lr"] * group["deviation_lr"]
        spread = group["spread"]
        devs, sums = [], []
        for i, (p, g, o) in enumerate(zip(params, grads, origins)):
            m = self.state[p]["exp_avg"]
            tiny = torch.finfo(p.dtype).tiny
            at = (p.device, p.dtype)
            m.lerp_(g.div_(scale[i].clamp(min=tiny).to(*at)), weight.to(*at))
            lv = level.to(p.device)
            d = p - (o.to(wide) + lv).to(p.dtype) if o.dim() == 0 else (p - o).sub_(
                lv.to(p.dtype))
            # (m / bc1 formed in the consumed hypergradient's memory: one allocation a block)
            d.sub_(torch.div(m, bc1.to(*at), out=g).clamp_(-1, 1), alpha=rate)
            d.clamp_(-spread, spread)
            devs.append(d)
            sums.append(d.sum().to(here, wide))
        shift = level + delta - torch.stack(sums).sum() / total     # re-centred
        for p, d, o in zip(params, devs, origins):
            sh = shift.to(p.device)
            new = d.add_((o.to(wide) + sh).to(p.dtype)) if o.dim() == 0 else \
                d.add_(o).add_(sh.to(p.dtype))
            if ok is not None:
                torch.where(ok.to(p.device) > 0, new, p, out=new)
            p.copy_(new)

    def _step_flat_shared(self, group, params, ok, eps_scale, t, bc1) -> None:
        """:meth:`_step_shared` for many small blocks, on one flat vector (the same arithmetic;
        the sums in another order): the deviations' momentum is a flat buffer whose views are
        the blocks' ``exp_avg``."""
        wide, dev = t.dtype, t.device
        first = self.state[group["params"][0]]
        if "level_avg" not in first:
            first["level_avg"] = torch.zeros((), dtype=params[0].dtype, device=dev)
            first["level_sq"] = torch.zeros((), dtype=params[0].dtype, device=dev)
        plan = self._flat_plan(params)
        dtype, lengths, total = plan["dtype"], plan["lengths"], plan["total"]
        tiny = torch.finfo(dtype).tiny
        x = torch.cat([p.reshape(-1) for p in params]).to(dtype)
        g = torch.cat([p.grad.reshape(-1) for p in params]).to(dtype)
        if ok is not None:
            g = torch.nan_to_num(g, 0.0, 0.0, 0.0)
        lim = torch.finfo(dtype).max / total      # (sums stay finite, as in _step_shared)
        g.clamp_(-lim, lim)
        counts = plan["counts"]
        if all(p in eps_scale for p in params):
            e = torch.cat([eps_scale[p].reshape(-1).to(dtype) for p in params]).abs_()
            e_sums = torch.segment_reduce(e, "sum", lengths=lengths).to(wide)
        else:
            e_sums = counts
        o = plan["origin"]
        level = (x - o).sum().to(wide) / total
        floor = group["eps"] * e_sums.sum() / total
        m, v = first["level_avg"].to(wide), first["level_sq"].to(wide)
        delta = self._level_step(group, m, v, g.sum().to(wide), floor, ok, t, bc1)
        big = torch.finfo(first["level_avg"].dtype).max
        first["level_avg"].copy_(m.clamp(-big, big))
        first["level_sq"].copy_(v.clamp(max=big))
        sq = torch.segment_reduce(g.square(), "sum", lengths=lengths).to(wide)
        scale = torch.maximum((sq / counts).sqrt(), group["eps"] * e_sums / counts)
        scale = scale.to(dtype).clamp_(min=tiny).repeat_interleave(lengths, output_size=total)
        dm = plan["exp_avg"]
        dm.lerp_(g.div_(scale), _gated(1 - group["momentum"], ok, wide).to(dtype)
                 if ok is not None else 1 - group["momentum"])
        d = (x - o).sub_(level.to(dtype))
        d.sub_((dm / bc1.to(dtype)).clamp_(-1, 1), alpha=group["lr"] * group["deviation_lr"])
        d.clamp_(-group["spread"], group["spread"])
        shift = level + delta - d.sum().to(wide) / total       # re-centred
        new = d.add_(o).add_(shift.to(dtype))
        if ok is not None:
            new = torch.where(ok > 0, new, x)
        torch._foreach_copy_(params, [part.view_as(p) for part, p in
                                      zip(new.split(plan["sizes"]), params)])

    def _flat_plan(self, params: list[Tensor]) -> dict:
        """The flat layout of many small blocks (memoised; rebuilt when the blocks, their
        origins or their ``exp_avg`` tensors change: after a load, a rebase or a new block):
        sizes, the origins as one vector, the deviations' momentum as one buffer whose views
        are the blocks' ``exp_avg``."""
        states = [self.state[p] for p in params]
        key = tuple((id(p), id(st.get("origin"))) for p, st in zip(params, states))
        plan = self.__dict__.get("_flat_shared")
        if plan is not None and plan["key"] == key and all(
                st.get("exp_avg") is view for st, view in zip(states, plan["views"])):
            return plan
        dev = params[0].device
        dtype = params[0].dtype
        wide = torch.float32 if dev.type == "mps" else torch.float64
        sizes = [p.numel() for p in params]
        for p, st in zip(params, states):
            if "origin" not in st:
                st["origin"] = p.detach().clone()
        origin = torch.cat([st["origin"].to(dtype).expand(p.shape).reshape(-1)
                            for p, st in zip(params, states)])
        m = torch.cat([st["exp_avg"].to(dtype).reshape(-1) if "exp_avg" in st
                       else torch.zeros(n, dtype=dtype, device=dev)
                       for st, n in zip(states, sizes)])
        views = [v.view_as(p) for v, p in zip(m.split(sizes), params)]
        for st, view in zip(states, views):
            st["exp_avg"] = view
        lengths = torch.tensor(sizes, device=dev)
        plan = {"key": key, "views": views, "exp_avg": m, "origin": origin, "sizes": sizes,
                "lengths": lengths, "counts": lengths.to(wide), "total": sum(sizes),
                "dtype": dtype}
        self._flat_shared = plan
        return plan

    def add_param_group(self, param_group: dict) -> None:
        """torch's, and for a group with a ``spread``: each block's origin (its value now; one
        number for a block whose entries are equal, read here at construction, never in
        ``step``)."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_group(group["level"], group["spread"])
        self._record_origins(group, group["params"], None)

    def extend_group(self, index: int, params: list[Tensor]) -> None:
        """Add raw blocks to group ``index`` (HyperOptimizer: the blocks of a param group added
        later join their kind's level rather than starting one of their own).  Their origins
        are set so that they start at the current level: their deviations are 0."""
        group = self.param_groups[index]
        known = {id(p) for g in self.param_groups for p in g["params"]}
        if any(id(p) in known for p in params):
            raise ValueError("some blocks are already in the hyper-optimizer")
        level = self.level_of(group["params"][0]) if group["params"] else None
        group["params"].extend(params)
        self._record_origins(group, params, level)

    def _record_origins(self, group: dict, params: list[Tensor], level: Tensor | None) -> None:
        if group["spread"] is None:
            return
        with torch.no_grad():
            for p in params:
                flat = p.detach().reshape(-1)
                uniform = flat.numel() > 0 and bool((flat == flat[0]).all())
                origin = flat[0].clone() if uniform else p.detach().clone()
                if level is not None:
                    origin = (origin.to(level.dtype) - level.to(p.device)).to(p.dtype)
                self.state[p]["origin"] = origin

    @torch.no_grad()
    def level_of(self, block: Tensor) -> Tensor | None:
        """The current level (the mean shift from the origins) of the group holding ``block``,
        a device scalar; None where the group has no shared level."""
        group = next((g for g in self.param_groups if any(p is block for p in g["params"])),
                     None)
        if group is None or group["spread"] is None:
            return None
        wide = torch.float32 if block.device.type == "mps" else torch.float64
        shifts = [_shift(p, self.state[p].get("origin", p), wide, block.device)
                  for p in group["params"]]
        total = sum(p.numel() for p in group["params"])
        return torch.stack(shifts).sum() / max(total, 1)

    @torch.no_grad()
    def rebase(self, block: Tensor, index: int | None, level: Tensor | None) -> None:
        """A user wrote ``block`` (its entry ``index``, or all of it): the written entries get
        origins that put them at deviation 0 from ``level`` (the group's level before the
        write, :meth:`level_of`), so the write is kept, not clamped back."""
        if level is None:
            return
        st = self.state[block]
        lv = level.to(block.device)
        if index is None:
            st["origin"] = (block.reshape(-1)[0].to(lv.dtype) - lv).to(block.dtype)
            return
        origin = st.get("origin")
        # (a new tensor: the flat layout of many small blocks notices it)
        origin = block.detach().clone() if origin is None else \
            origin.expand(block.shape).clone()
        origin[index] = (block[index].to(lv.dtype) - lv).to(block.dtype)
        st["origin"] = origin

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
        state.pop("_flat_shared", None)     # (views into a flat buffer: rebuilt on demand)
        return state


def _check_group(level, spread) -> None:
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    if spread is not None and not (isinstance(spread, (int, float)) and spread >= 0
                                   and math.isfinite(spread)):
        raise ValueError(f"spread must be a finite number >= 0 (raw units, e.g. math.log(2)) "
                         f"or None, got {spread!r}")


def _shift(p: Tensor, origin: Tensor, wide, here: torch.device) -> Tensor:
    """``sum(p - origin)`` (a 0-dim origin: one number for the block), summed in the block's
    dtype and widened after (a float64 sum of a float32 tensor would copy it), on ``here``."""
    base = origin.sum().to(wide) if origin.dim() else origin.to(wide) * p.numel()
    return (p.sum().to(wide) - base).to(here)


def _square(x: Tensor, dtype) -> Tensor:
    """``x * x`` in ``dtype``, at most its largest finite number (the product is formed in
    float64, exactly for float32 inputs, so below the largest it equals ``x * x`` in dtype):
    an Adam second moment never turns inf, and inf - inf never NaN."""
    wide = torch.float64 if x.device.type != "mps" else torch.float32
    sq = x.to(wide).square()
    return sq.clamp_(max=torch.finfo(dtype).max).to(dtype)


def _gated(weight: float, ok: Tensor | None, dtype) -> "float | Tensor":
    """A lerp weight, 0 where the step is skipped (``ok`` = 0; a device tensor, no sync)."""
    return weight if ok is None else (ok * weight).to(dtype)
