"""NormalizedMomentum: the default hyper-optimizer (momentum on hypergradients normalised per
block), and why torch's Adam is not the default any more.

The raw hyperparameters come in *blocks* (see :mod:`hyperopt_wrap.hyperparams`): one scalar
for a global value, one entry per group or per tensor in a block, or one block per parameter
shaped like it (per-element learning rates).  Each step::

    g_hat = g / max(rms(g), eps * rms(d))           (rms over the block; d = d value / d raw)
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
        if not (isinstance(lr, (int, float)) and lr >= 0.0):
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"Invalid momentum: {momentum} (must lie in [0, 1))")
        if not eps > 0.0:
            raise ValueError(f"Invalid eps: {eps} (must be > 0)")
        if normalize not in ("block", "group"):
            raise ValueError(f"normalize must be 'block' or 'group', got {normalize!r}")
        super().__init__(params, dict(lr=lr, momentum=momentum, eps=eps, normalize=normalize))

    def _state(self, p: Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p)
        return state

    @torch.no_grad()
    def step(self, closure=None, found_inf: Tensor | None = None,
             eps_scale: dict | None = None):
        """One step.  ``eps_scale`` (param -> tensor of its shape) multiplies ``eps`` entry by
        entry (HyperOptimizer passes ``d value / d raw``); with ``found_inf`` set a skipped
        step leaves every value and state, the counters included, bit-exactly as it was."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._step_group(group, params, found_inf, eps_scale or {})
        return loss

    def _step_group(self, group, params, found_inf, eps_scale) -> None:
        lr, b1, eps = group["lr"], group["momentum"], group["eps"]
        tiny = torch.finfo(torch.float32).tiny
        ok = None if found_inf is None else 1 - found_inf.to(params[0].device, torch.float32)
        grads, squares, floors = [], [], []
        for p in params:
            g = p.grad if ok is None else torch.nan_to_num(p.grad, 0.0, 0.0, 0.0)
            e = eps_scale.get(p)
            grads.append(g)
            squares.append(g.float().square().mean())
            floors.append(eps * (e.float().square().mean().sqrt() if e is not None else 1.0))
        if group["normalize"] == "group":
            n = [p.numel() for p in params]
            total = float(sum(n))
            rms = (sum(s * (k / total) for s, k in zip(squares, n))).sqrt()
            floor = max(floors) if all(isinstance(f, float) for f in floors) else \
                torch.stack([torch.as_tensor(f, device=rms.device) for f in floors]).amax()
            scales = [torch.maximum(rms, torch.as_tensor(floor, device=rms.device))] * len(params)
        else:
            scales = [torch.maximum(s.sqrt(), torch.as_tensor(f, device=s.device))
                      for s, f in zip(squares, floors)]
        for p, g, scale in zip(params, grads, scales):
            st = self._state(p)
            step, m = st["step"], st["exp_avg"]
            g_hat = g / scale.clamp(min=tiny).to(g.dtype)
            if ok is None:
                step.add_(1)
                m.lerp_(g_hat, 1 - b1)
                update = (m / (1 - b1 ** step)).clamp_(-1, 1)
            else:
                okp = ok.to(m.dtype)
                step.add_(ok)
                m.lerp_(g_hat, (1 - b1) * okp)
                update = (m / (1 - b1 ** step.clamp(min=1))).clamp_(-1, 1).mul_(okp)
            p.sub_(update.to(p.dtype), alpha=lr)

