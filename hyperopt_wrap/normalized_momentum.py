"""NormalizedMomentum: the default hyper-optimizer (momentum on hypergradients normalised per
block), and why torch's Adam is not the default any more.

The raw hyperparameters come in *blocks* (see :mod:`hyperopt_wrap.hyperparams`): one scalar
for a global value, one entry per group or per tensor in a block, or one block per parameter
shaped like it (per-element learning rates).  Each step::

    g_hat = g / max(rms(g), eps * |d|)              (rms over the block; d = d value / d raw)
    m    <- b1 m + (1 - b1) g_hat                   (per entry)
    r    <- r - lr * clamp(m / (1 - b1^t), -1, 1)

Three things this fixes, each measured (``benchmarks/RESULTS.md``, "hyper-optimizer"):

* **Scale.** The hypergradient of ``log lr`` is proportional to lr (for SGD it is
  ``lr dE/dlr = -lr g_{t+1}.g_t``): from lr = 1e-9 it is about 1e-10, and Adam's eps = 1e-8
  swamps it (from 1e-10 with plain SGD the lr never moved).  Here the dead zone is ``eps`` in
  *natural* units (``eps * d value / d raw`` in raw units), so a tiny lr grows by ``exp(lr)`` a
  step while a hypergradient that is rounding noise (Adam's first beta1 hypergradient is 0 in
  exact arithmetic) still moves nothing.
* **Spikes.** A run that diverges for a few steps produces hypergradients many orders of
  magnitude above the usual; in Adam's second moment they freeze every value for the thousand
  steps it takes to forget them (a recovered blow-up kept its lr at 3.6e-5 for 1400 steps).
  A normalised step weighs every hyper-step alike.
* **Many entries.** Adam normalises every entry by its own second moment, so every entry of a
  per-tensor block moves by about lr a step however weak its signal.  Normalising by the block's
  RMS moves an entry in proportion to its share of the block's signal (and by at most lr).
  With ``normalize="group"`` the RMS is taken over all blocks of a param group of the
  hyper-optimizer (HyperOptimizer makes one per tuned kind): the per-element blocks of a kind
  then share one scale.

For a scalar block this is sign descent with momentum.  ``found_inf`` (a device float, nonzero =
skip) skips the whole step on the device, as for torch's fused optimizers; nothing is read on the
host.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


# blocks of at most this many entries in all, or on average, are stepped on one flat vector
# (a few large blocks: block by block, fewer passes over the data)
_FLAT_MAX = 4096


class NormalizedMomentum(torch.optim.Optimizer):
    r"""Momentum on hypergradients normalised per block (see the module docstring).

    Args:
        params: the raw hyperparameter blocks (HyperOptimizer passes them).
        lr: step size on the raw values (``hyper_lr``); no entry moves by more than ``lr``.
        momentum: the first-moment decay ``b1`` (bias-corrected).
        eps: the dead zone, in natural units when HyperOptimizer passes ``eps_scale``.
        normalize: ``"block"`` (default) or ``"group"``.
    """

    def __init__(self, params, lr: float = 0.05, momentum: float = 0.9, eps: float = 1e-8,
                 normalize: str = "block"):
        check_options(lr, momentum, eps)
        if normalize not in ("block", "group"):
            raise ValueError(f"normalize must be 'block' or 'group', got {normalize!r}")
        super().__init__(params, dict(lr=lr, momentum=momentum, eps=eps, normalize=normalize))

    @torch.no_grad()
    def step(self, closure=None, found_inf: Tensor | None = None,
             eps_scale: dict | None = None):
        """One step.  ``eps_scale`` (param -> tensor of its shape) multiplies ``eps`` entry by
        entry (HyperOptimizer passes ``d value / d raw``); with ``found_inf`` set a skipped
        step leaves every value and state, the counters included, bit-exactly as it was.

        All blocks of one device and dtype are stepped together on one flat vector (their
        states are views into flat buffers), about twenty tensor operations however many
        blocks there are."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        split: dict[tuple, list[tuple[Tensor, int]]] = {}
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                if p.grad is not None:
                    split.setdefault((p.device, p.dtype), []).append((p, gi))
        for entries in split.values():
            params, gis = [p for p, _ in entries], [gi for _, gi in entries]
            total = sum(p.numel() for p in params)
            if total <= _FLAT_MAX or total <= _FLAT_MAX * len(params):    # small blocks
                self._step_flat(params, gis, found_inf, eps_scale or {})
            else:      # large blocks (per-element values): a few in-place passes per block
                self._step_blocks(params, gis, found_inf, eps_scale or {})
        return loss

    def _step_blocks(self, params, gis, found_inf, eps_scale) -> None:
        ok = None if found_inf is None else 1 - found_inf.to(params[0].device, torch.float32)
        grads, sums = [], []
        for p in params:
            g = p.grad if ok is None else torch.nan_to_num(p.grad, 0.0, 0.0, 0.0)
            grads.append(g)
            sums.append(torch.linalg.vector_norm(g).square())
        counts = [float(p.numel()) for p in params]
        rms = [(sq / n).sqrt() for sq, n in zip(sums, counts)]
        for gi in set(gis):
            if self.param_groups[gi]["normalize"] == "group":
                mine = [i for i, x in enumerate(gis) if x == gi]
                total = sum(counts[i] for i in mine)
                shared = (torch.stack([sums[i] for i in mine]).sum() / total).sqrt()
                for i in mine:
                    rms[i] = shared
        for p, g, r, gi in zip(params, grads, rms, gis):
            group = self.param_groups[gi]
            lr, b1, eps = group["lr"], group["momentum"], group["eps"]
            st = self.state[p]
            if not st:
                st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                st["exp_avg"] = torch.zeros_like(p)
            step, m = st["step"], st["exp_avg"]
            e = eps_scale.get(p)
            scale = torch.maximum(r.to(g.dtype), (e.abs() * eps).to(g.dtype)) if e is not None \
                else r.to(g.dtype).clamp(min=eps)
            g_hat = torch.div(g, scale.clamp_(min=torch.finfo(g.dtype).tiny))
            _advance(m, step, g_hat, 1 - b1, ok)
            bc1 = 1 - b1 ** step.clamp(min=1)
            update = g_hat.copy_(m).div_(bc1.to(m.dtype)).clamp_(-1, 1)
            if ok is not None:
                update.mul_(ok.to(m.dtype))
            p.sub_(update.to(p.dtype), alpha=lr)

    def _plan(self, params: list[Tensor], gis: list[int]) -> dict:
        """Flat buffers for the blocks' states (the state entries are views into them) and the
        per-entry constants, memoised; rebuilt when the blocks, their groups' options or the
        state tensors (after load_state_dict) change."""
        key = (tuple(id(p) for p in params), tuple(gis),
               tuple((g["lr"], g["momentum"], g["eps"], g["normalize"])
                     for g in self.param_groups))
        plan = getattr(self, "_flat", None)
        if plan is not None and plan["key"] == key and all(
                self.state[p].get("exp_avg") is m and self.state[p].get("step") is t
                for p, m, t in zip(params, plan["m_views"], plan["t_views"])):
            return plan
        dev, dtype = params[0].device, params[0].dtype
        sizes = [p.numel() for p in params]
        old = [self.state.get(p) or {} for p in params]
        m = torch.cat([st["exp_avg"].to(dev, dtype).reshape(-1) if "exp_avg" in st
                       else torch.zeros(n, dtype=dtype, device=dev)
                       for st, n in zip(old, sizes)])
        t = torch.stack([st["step"].to(dev, torch.float32).reshape(()) if "step" in st
                         else torch.zeros((), dtype=torch.float32, device=dev) for st in old])
        m_views = [v.view_as(p) for v, p in zip(m.split(sizes), params)]
        t_views = list(t.unbind())
        for p, mv, tv in zip(params, m_views, t_views):
            self.state[p] = {"step": tv, "exp_avg": mv}
        groups = [self.param_groups[gi] for gi in gis]
        lengths = torch.tensor(sizes, device=dev)
        total = sum(sizes)
        per_entry = lambda xs, dt=dtype: torch.tensor(xs, dtype=dt, device=dev).repeat_interleave(
            lengths, output_size=total)
        group_ids = sorted(set(gis))
        plan = {"key": key, "m": m, "t": t, "m_views": m_views, "t_views": t_views,
                "sizes": sizes, "lengths": lengths, "scalar": all(n == 1 for n in sizes),
                "total": total,
                "lr": per_entry([g["lr"] for g in groups]),
                "b1": per_entry([g["momentum"] for g in groups]),
                "b1_block": torch.tensor([g["momentum"] for g in groups], dtype=torch.float32,
                                         device=dev),
                "eps": per_entry([g["eps"] for g in groups]),
                "by_group": torch.tensor([group_ids.index(gi) for gi in gis], device=dev)
                if any(g["normalize"] == "group" for g in groups) else None,
                "n_groups": len(group_ids),
                "group_mode": torch.tensor([g["normalize"] == "group" for g in groups],
                                           device=dev)}
        self._flat = plan
        return plan

    def _step_flat(self, params, gis, found_inf, eps_scale) -> None:
        plan = self._plan(params, gis)
        tiny = torch.finfo(params[0].dtype).tiny
        g = torch.cat([p.grad.reshape(-1) for p in params])
        ok = None
        if found_inf is not None:
            ok = 1 - found_inf.to(g.device, torch.float32)
            g = torch.nan_to_num(g, 0.0, 0.0, 0.0)
        e = torch.cat([eps_scale[p].reshape(-1).to(g.dtype) if p in eps_scale
                       else torch.ones(p.numel(), dtype=g.dtype, device=g.device)
                       for p in params]) if eps_scale else None
        if plan["scalar"] and plan["by_group"] is None:     # one entry per block: rms = |g|
            rms = g.abs()
            floor = plan["eps"] if e is None else plan["eps"] * e.abs()
        else:
            lengths = plan["lengths"]
            # block RMS, formed in float64 where the device has it (squares of small
            # hypergradients underflow in float32)
            wide = torch.float32 if g.device.type == "mps" else torch.float64
            sums = torch.segment_reduce(g.to(wide).square(), "sum", lengths=lengths)
            counts = lengths.to(wide)
            if plan["by_group"] is not None:     # normalize="group": one RMS per group
                gsum = torch.zeros(plan["n_groups"], dtype=wide, device=g.device)
                gcnt = torch.zeros_like(gsum)
                gsum.index_add_(0, plan["by_group"], sums)
                gcnt.index_add_(0, plan["by_group"], counts)
                sums = torch.where(plan["group_mode"], gsum[plan["by_group"]], sums)
                counts = torch.where(plan["group_mode"], gcnt[plan["by_group"]], counts)
            rms = (sums / counts).sqrt().to(g.dtype).repeat_interleave(
                lengths, output_size=plan["total"])
            floor = plan["eps"] if e is None else plan["eps"] * e.abs()
        g_hat = g / torch.maximum(rms, floor).clamp_(min=tiny)
        m, t = plan["m"], plan["t"]
        _advance(m, t, g_hat, 1 - plan["b1"], ok)
        bc1 = 1 - plan["b1_block"] ** t.clamp(min=1)
        if not plan["scalar"]:
            bc1 = bc1.repeat_interleave(plan["lengths"], output_size=plan["total"])
        update = (m / bc1.to(m.dtype)).clamp_(-1, 1)
        if ok is not None:
            update.mul_(ok.to(m.dtype))
        update.mul_(plan["lr"])
        torch._foreach_sub_(params, [u.view_as(p) for u, p in
                                     zip(update.split(plan["sizes"]), params)])

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_flat", None)       # (views into flat buffers: rebuilt on demand)
        return state


def check_options(lr, momentum, eps) -> None:
    """The options NormalizedMomentum and Hierarchical share."""
    if not (isinstance(lr, (int, float)) and lr >= 0.0):
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"Invalid momentum: {momentum} (must lie in [0, 1))")
    if not eps > 0.0:
        raise ValueError(f"Invalid eps: {eps} (must be > 0)")


def _advance(m: Tensor, step: Tensor, g_hat: Tensor, weight, ok: Tensor | None) -> None:
    """``step += 1; m = lerp(m, g_hat, weight)``, both gated by ``ok`` (0: exactly as before)."""
    if ok is None:
        step.add_(1)
        m.lerp_(g_hat, weight)
    else:
        step.add_(ok)
        m.lerp_(g_hat, weight * ok.to(m.dtype))
