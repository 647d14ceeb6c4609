"""The hypergradient-method protocol.

A method is a small object with options (its constructor's keyword
arguments) and no hidden running state: per-parameter buffers live in
``opt.state[p]["hyper"]`` and anything else in ``state_dict()``, so
``HyperOptimizer.state_dict()`` saves and restores a method mid-window.

Each base step the optimizer

0. asks ``records_step(opt, position)`` whether to record the step on ``opt.tape`` (methods that
   differentiate through past steps: implicit, unroll);
1. asks ``tangent_kinds(opt, ends_window)`` which hyperparameter tangents
   ``B = dPhi/dlam`` the step must produce (forward mode through the rule);
2. runs the step and hands ``observe(opt, record)`` what it saw;
   A step whose gradient was not finite was skipped (``record.finite`` is False on the
   device); a method that uses such a step's tangents calls ``opt.mark_window(finite)``
   so that the hyper-step is skipped rather than fed a made-up derivative.
3. when the meta-gradient ``grad_w E`` is known (at the next step's gradient,
   or from ``val_loss`` at the end of a window) calls
   ``hypergradient(opt, meta_grads)``, which adds ``dE/dlam`` in natural units
   into the tuned kinds' accumulators and returns how many contributions it
   added (0 when it had nothing pending).

Every ``update_every`` contributions the optimizer makes a hyper-step.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    from ..optimizer import HyperOptimizer


@dataclass
class ObservedParam:
    """What one base step did to one parameter."""
    group_index: int
    param_index: int
    param: Tensor
    tangents: dict[str, Tensor] = field(default_factory=dict)  # kind -> d w_new / d lam


@dataclass
class StepRecord:
    params: list[ObservedParam]
    lr_scales: list[float]          # per group: effective lr / tuned lr at this step
    finite: Tensor                  # device bool: the step's gradients were finite (else skipped)


@dataclass
class MetaGradient:
    """grad_w E for one parameter (``None`` where E does not depend on it)."""
    group_index: int
    param_index: int
    param: Tensor
    grad: Tensor | None


class HypergradientMethod:
    name = "method"
    default_update_every = 1
    default_hyper_lr: "float | dict[str, float]" = 0.01
    #: the method asks for Hessian-vector products (a gradient graph or a closure, see
    #: :mod:`hyperopt_wrap.curvature`) on the steps it records
    needs_curvature = False

    def records_step(self, opt: "HyperOptimizer", position: int) -> bool:
        """Whether the base step at ``position`` (0-based) in the window is recorded on
        ``opt.tape`` (weights, state, gradient and curvature source before the update) for a
        later reverse pass.  A method that records steps reads them in :meth:`hypergradient`
        once ``opt.window_complete`` and then calls ``opt.release_tape()``."""
        return False

    def bind(self, opt: "HyperOptimizer") -> None:
        """Check that the method can serve this optimizer; raise otherwise."""

    def tangent_kinds(self, opt: "HyperOptimizer", ends_window: bool) -> tuple[str, ...]:
        raise NotImplementedError

    def observe(self, opt: "HyperOptimizer", record: StepRecord) -> None:
        raise NotImplementedError

    def hypergradient(self, opt: "HyperOptimizer", meta_grads: list[MetaGradient]) -> int:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({opts})"


class RecordingMethod(HypergradientMethod):
    """A method that differentiates through recorded steps (implicit, unroll): no tangents in
    the base step, nothing to observe; :meth:`hypergradient` reads ``opt.tape`` once the
    window is complete (see :meth:`window_ready`) and releases it."""
    needs_curvature = True

    def tangent_kinds(self, opt, ends_window):
        return ()

    def observe(self, opt, record: StepRecord) -> None:
        pass

    @staticmethod
    def window_ready(opt: "HyperOptimizer") -> bool:
        return opt.window_complete and bool(opt.tape)
