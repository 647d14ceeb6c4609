"""Implicit hypergradients by a truncated Neumann series (Clarke, Oldewage & Hernandez-Lobato,
ICLR 2022, "Scalable One-Pass Optimisation of High-Dimensional Weight-Update Hyperparameters by
Implicit Differentiation").

Training is treated as converging to a fixed point ``x* = Phi(x*, lam)`` of the update, so the
best-response Jacobian is ``dx*/dlam = (I - A)^{-1} B`` with ``A = dPhi/dx`` and
``B = dPhi/dlam``.  Every ``update_every`` (T) steps, at the window's last step t::

    v = grad_w E(w_{t+1})
    p = sum_{j=0}^{i-1} v A_t^j          (i = neumann_terms; i - 1 products with A_t)
    dE/dlam ~= p B_t

``A_t`` and ``B_t`` are those of step t (weights ``w_t``, minibatch ``B_t``), derived from the
rule by autograd (Adam's included); each product with ``A_t`` costs one Hessian-vector product
of the training loss (:mod:`hyperopt_wrap.curvature`).  With ``i = 1`` this is exactly greedy's
one-step hypergradient of that step.

``include_state=False`` (the authors' choice and the default): the optimizer state (momentum
buffer, Adam moments) is a constant of the fixed point, ``x = w``.  ``include_state=True`` puts
the state into the fixed point, ``x = (w, s)``; it is the more faithful linearisation when the
state moves slowly, but with momentum close to 1 the spectral radius of the full ``A`` comes
close to 1, so a short series is further from its limit and its terms larger.  The default
follows the paper, whose experiments validate it.

Defaults are the authors' (camera-ready code): T = 10, i = 5, Adam hyper-optimizer with learning
rate 0.05 on log10 lr, log10 weight decay and logit momentum, log10 lr clamped to [-10, 0].  Our
raw values are natural logs, so the same step is ``0.05 * ln 10`` for lr and weight decay.
"""
from __future__ import annotations

import math

import torch

from ..tape import Replay, StepGraph, add_hypergradient, meta_cotangents
from .base import MetaGradients, RecordingMethod


class Implicit(RecordingMethod):
    name = "implicit"
    default_update_every = 10
    default_hyper_lr = {"lr": 0.05 * math.log(10), "weight_decay": 0.05 * math.log(10),
                        "momentum": 0.05}

    def __init__(self, neumann_terms: int = 5, include_state: bool = False):
        if not (isinstance(neumann_terms, int) and not isinstance(neumann_terms, bool)
                and neumann_terms >= 1):
            raise ValueError(f"neumann_terms must be an int >= 1 (1 is greedy), got "
                             f"{neumann_terms!r}; the authors use Implicit(neumann_terms=5)")
        self.neumann_terms = neumann_terms
        self.include_state = bool(include_state)

    def records_step(self, ctx, state, position: int) -> bool:
        return position == ctx.update_every - 1

    def hypergradient(self, ctx, state, meta: MetaGradients) -> int:
        if not self.window_ready(ctx):
            return 0
        step = ctx.tape[-1]
        v = meta_cotangents(meta)
        ids = [id(item.param) for item in step.params]
        a_w = [v.get(i) for i in ids]
        acc_w = [None if a is None else a.clone() for a in a_w]
        acc_s = [{} for _ in ids] if self.include_state else None
        graph = StepGraph(ctx, step, with_state=self.include_state)
        if self.neumann_terms > 1:
            with Replay(ctx, [step]) as replay:
                if self.include_state:
                    self._series_with_state(graph, replay, step, a_w, acc_w, acc_s)
                else:
                    self._series(graph, replay, step, a_w, acc_w)
        res = graph.vjp(acc_w, acc_s, inputs=False, hyper=True)
        add_hypergradient(ctx, step, [r[3] for r in res])
        ctx.mark_window(step.finite)
        ctx.release_tape()
        return 1

    def _series(self, graph, replay, step, a_w, acc_w) -> None:
        """State held constant: ``a A = a D_w + H (a D_g)`` with ``D_w = dPhi/dw`` and
        ``D_g = dPhi/dg`` diagonal (rules are elementwise), read off once by a product with
        ones; each further term is two multiplies and one Hessian-vector product."""
        ones = [torch.ones_like(item.weights) for item in step.params]
        diag = graph.vjp(ones, None, inputs=True, hyper=False)
        d_w, d_g = [r[0] for r in diag], [r[1] for r in diag]
        a_w = [torch.zeros_like(o) if a is None else a for a, o in zip(a_w, ones)]
        for _ in range(self.neumann_terms - 1):
            hv = replay.hvp(step, [a * d for a, d in zip(a_w, d_g)])
            a_w = [torch.addcmul(h, a, d) for a, d, h in zip(a_w, d_w, hv)]
            for i, a in enumerate(a_w):
                acc_w[i] = a.clone() if acc_w[i] is None else acc_w[i].add_(a)

    def _series_with_state(self, graph, replay, step, a_w, acc_w, acc_s) -> None:
        """State in the fixed point: ``(a_w, a_s) A`` by reverse products through the rule."""
        a_s = [{} for _ in a_w]
        for _ in range(self.neumann_terms - 1):
            res = graph.vjp(a_w, a_s, inputs=True, hyper=False)
            hv = replay.hvp(step, [r[1] for r in res])
            # not in place: autograd may hand back a cotangent itself
            a_w = [r[0] + h for r, h in zip(res, hv)]
            a_s = [r[2] for r in res]
            for i, a in enumerate(a_w):
                acc_w[i] = a.clone() if acc_w[i] is None else acc_w[i].add_(a)
            for acc, new in zip(acc_s, a_s):
                for name, a in new.items():
                    acc[name] = a.clone() if name not in acc else acc[name].add_(a)
