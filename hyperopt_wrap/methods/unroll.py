"""Truncated reverse mode ("Diff-through-Opt"; Franceschi et al. 2017, Shaban et al. 2019).

The exact hypergradient of ``E`` through the window's last K base steps, the weights and state
at their start held constant::

    a = grad_w E(w_T),  a_s = 0
    for t = T-1 down to T-K:
        h += a . B_t                      (B_t = dPhi_t/dlam, from the rule by autograd)
        a  = a . A_t                      (A_t = dPhi_t/dx, one Hessian-vector product;
                                           not needed at the oldest step)

Memory: the K recorded steps (weights, state and gradient copies, plus the K gradient graphs
with ``curvature="graph"``).  Cost per window: K - 1 Hessian-vector products.  With K = 1 it is
greedy's one-step hypergradient; for every K it equals ``hyperopt_wrap.reference`` (the tests
check this to 1e-10 in float64).

Replaying an old step needs that step's minibatch.  The recorded steps keep either the gradient
graph (``loss.backward(create_graph=opt.needs_graph)``: nothing is re-run) or the closure each
step was given, which must bind its batch (``def closure(x=x, y=y): ...``); the first replay of
an old closure checks this and raises if the closure reproduces a different loss.
"""
from __future__ import annotations

from ..tape import add_hypergradient, meta_cotangents, reverse_pass
from .base import MetaGradients, RecordingMethod


class Unroll(RecordingMethod):
    name = "unroll"
    default_hyper_lr = {"lr": 0.05, "weight_decay": 0.05, "momentum": 0.05}

    def __init__(self, horizon: int = 5):
        if not (isinstance(horizon, int) and not isinstance(horizon, bool) and horizon >= 1):
            raise ValueError(f"horizon must be an int >= 1 (the number of steps differentiated "
                             f"through), got {horizon!r}; e.g. Unroll(horizon=5)")
        self.horizon = horizon

    @property
    def default_update_every(self) -> int:
        return max(10, self.horizon)

    def bind(self, ctx) -> None:
        if self.horizon > ctx.update_every:
            raise ValueError(f"Unroll(horizon={self.horizon}) differentiates through the last "
                             f"{self.horizon} steps of each window, but update_every="
                             f"{ctx.update_every} makes windows shorter; use update_every >= "
                             f"{self.horizon} or a smaller horizon")

    def records_step(self, ctx, state, position: int) -> bool:
        return position >= ctx.update_every - self.horizon

    def hypergradient(self, ctx, state, meta: MetaGradients) -> int:
        if not self.window_ready(ctx):
            return 0
        for _, step, _, res in reverse_pass(ctx, list(ctx.tape), meta_cotangents(meta)):
            add_hypergradient(ctx, step, [r[3] for r in res])
            ctx.mark_window(step.finite)
        ctx.release_tape()
        return 1
