"""Greedy one-step hypergradients (hypergradient descent, Baydin et al. 2018).

One-step horizon, gradient and optimizer state held fixed at step t:

    dE(w_{t+1}) / dlam  ~=  grad_w E(w_{t+1}) . B_t,     B_t = d Phi(x_t, g_t, lam) / dlam

``B_t`` comes from forward mode through the update rule (one tangent per tuned
kind; elementwise, so it serves every granularity).  With no validation
objective ``grad_w E(w_{t+1})`` is the next step's training gradient, and for
plain SGD this is exactly Baydin et al.'s ``dE/dlr = -g_{t+1} . g_t``.  No
Hessian-vector products; it works in the plain ``loss.backward(); opt.step()``
loop.  With ``update_every = T`` the T one-step hypergradients of a window
are averaged (with ``val_loss``, only the window's last step is used).
"""
from __future__ import annotations

from typing import Any

from .base import HypergradientMethod, MetaGradient, StepRecord


class Greedy(HypergradientMethod):
    name = "greedy"
    default_update_every = 1
    default_hyper_lr = 0.05

    def __init__(self) -> None:
        self._lr_scales: list[float] | None = None   # scales of the pending step
        self._finite = None                           # whether the pending step was taken

    def tangent_kinds(self, opt, ends_window):
        if opt.val_loss is None or ends_window:
            return opt.tuned_kinds
        return ()

    def observe(self, opt, record: StepRecord) -> None:
        stepped = {id(obs.param) for obs in record.params if obs.tangents}
        for obs in record.params:
            if obs.tangents:
                opt.state[obs.param]["hyper"] = dict(obs.tangents)
        # a parameter this step did not update has no one-step tangent: drop an older one
        for group in opt.param_groups:
            for p in group["params"]:
                if id(p) not in stepped and p in opt.state:
                    opt.state[p].pop("hyper", None)
        self._lr_scales = list(record.lr_scales) if record.params else None
        self._finite = record.finite

    def hypergradient(self, opt, meta_grads: list[MetaGradient]) -> int:
        if self._lr_scales is None:
            return 0
        terms: dict[str, list] = {kind: [] for kind in opt.tuned}
        for mg in meta_grads:
            buffers = opt.state[mg.param].pop("hyper", None)
            if buffers is None or mg.grad is None:
                continue
            sign = -1.0 if opt.param_groups[mg.group_index]["maximize"] else 1.0
            for kind, tangent in buffers.items():
                scale = sign * (self._lr_scales[mg.group_index] if kind == "lr" else 1.0)
                terms[kind].append((mg.group_index, mg.param_index, mg.grad, tangent, scale))
        used = any(terms.values())
        for kind, kind_terms in terms.items():
            opt.tuned[kind].accumulate(kind_terms)
        if used:
            opt.mark_window(self._finite)
        self._lr_scales = self._finite = None
        return int(used)

    def state_dict(self) -> dict[str, Any]:
        return {"lr_scales": self._lr_scales, "finite": self._finite}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._lr_scales, self._finite = state["lr_scales"], state["finite"]
