"""The update-rule protocol.

A rule is one step of a base optimizer written as a pure function of tensors,

    new_param, new_state = rule.update(param, grad, state, hyper, options)

elementwise in ``(param, grad, state)``.  The same code runs in two ways:

* under ``torch.no_grad()`` for the real step, when the rule has no in-place
  :meth:`UpdateRule.step_` (the optimizer copies the result into the parameter
  and its state);
* with forward- or reverse-mode autograd, which gives the derivatives the
  hypergradient methods need: ``B = dPhi/dlam`` (tangents with respect to the
  hyperparameters) and ``A = dPhi/dx``; ``reference.py`` unrolls it.

Built-in rules also implement ``step_``: the real step in place (no allocation
per step, like torch.optim), with closed-form tangents; the tests check it
against ``update`` and against forward mode through ``update`` in float64.

``hyper`` maps a kind ("lr", "momentum", "weight_decay") to a Python float
(constant) or a tensor (tuned; 0-dim or shaped like ``param``).  A rule must
not branch on the *value* of a tensor (that would synchronise CUDA); branching
on ``isinstance(value, Tensor)`` is fine.  ``state`` uses torch.optim's own
names (``momentum_buffer``, ``exp_avg``, ``step`` ...), so ``state_dict()``
looks like the wrapped optimizer's.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

Hyper = dict[str, "float | Tensor"]
State = dict[str, Tensor]

KINDS = ("lr", "momentum", "weight_decay")


def is_zero(value: float | Tensor) -> bool:
    """True for a constant 0; a tensor (tuned value) is never treated as zero."""
    return not isinstance(value, Tensor) and value == 0


class UpdateRule:
    """Base class of a differentiable update rule.

    Subclasses set ``kinds`` (the hyperparameters that can be tuned) and
    implement ``options``, ``init_state`` and ``update``.  ``read``/``write``
    map a kind to the param-group entry (override where the group stores it
    elsewhere, e.g. Adam keeps "momentum" as ``betas[0]``).
    """

    kinds: tuple[str, ...] = ("lr", "weight_decay")

    def read(self, group: dict[str, Any], kind: str) -> float:
        return float(group[kind])

    def write(self, group: dict[str, Any], kind: str, value: float) -> None:
        group[kind] = value

    def check_tunable(self, group: dict[str, Any], kind: str) -> str | None:
        """Why ``kind`` cannot be tuned from this group's settings, or None."""
        if kind == "momentum" and self.read(group, "momentum") == 0:
            return ("momentum 0 means no momentum buffer and cannot be tuned in logit space; "
                    "start from a value in (0, 1), e.g. momentum=0.9 (betas=(0.9, 0.999) for "
                    "Adam-type optimizers)")
        return None

    def options(self, group: dict[str, Any]) -> dict[str, Any]:
        """The non-tuned settings of a param group that ``update`` needs."""
        raise NotImplementedError

    def init_state(self, param: Tensor, options: dict[str, Any]) -> State:
        """Fresh per-parameter state, as torch.optim creates it lazily."""
        raise NotImplementedError

    def update(self, param: Tensor, grad: Tensor, state: State, hyper: Hyper,
               options: dict[str, Any]) -> tuple[Tensor, State]:
        """One step, out of place: returns the new parameter and new state."""
        raise NotImplementedError

    def update_with_tangents(self, param: Tensor, grad: Tensor, state: State, hyper: Hyper,
                             options: dict[str, Any], kinds: tuple[str, ...]
                             ) -> tuple[Tensor, State, dict[str, Tensor]]:
        """The out-of-place real step (under ``torch.no_grad()``), used when :meth:`step_`
        declines: ``update``'s result plus ``d new_param / d hyper[kind]`` for each kind in
        ``kinds`` (elementwise).

        This default runs forward-mode AD through :meth:`update`, one tangent per kind, so a
        user's rule needs nothing more; override it (or :meth:`step_`) for speed.  Tangents must
        not alias ``param``, ``grad`` or ``state`` (methods keep them past the step); the new
        param and state may (the optimizer copies them into its own storage).
        """
        if not kinds:
            new_param, new_state = self.update(param, grad, state, hyper, options)
            return new_param, new_state, {}
        tangents: dict[str, Tensor] = {}
        primal = None
        for kind in kinds:
            with fwAD.dual_level():
                dual = dict(hyper)
                dual[kind] = fwAD.make_dual(hyper[kind], torch.ones_like(hyper[kind]))
                new_param, new_state = self.update(param, grad, state, dual, options)
                p_primal, p_tangent = fwAD.unpack_dual(new_param)
                if primal is None:
                    primal = (p_primal, {k: fwAD.unpack_dual(v).primal for k, v in new_state.items()})
                tangents[kind] = p_tangent if p_tangent is not None else torch.zeros_like(p_primal)
        return primal[0], primal[1], tangents

    def step_(self, param: Tensor, grad: Tensor, state: State, hyper: Hyper,
              options: dict[str, Any], kinds: tuple[str, ...], ok: Tensor,
              work: dict[str, Tensor]) -> dict[str, Tensor] | None:
        """Optional in-place fast step, called under ``torch.no_grad()``.

        Updates ``param`` and ``state`` in place (no allocation per step, like torch.optim) and
        returns the tangents ``d param_new / d hyper[kind]``, written into persistent buffers
        from ``work`` (see :func:`scratch`; valid until the next step).  ``grad`` is the
        optimizer's own scratch copy of the gradient, finite, which the rule may overwrite.
        ``ok`` is a 0-dim tensor of the param's dtype, 1 or 0: with ``ok = 0`` the rule must
        leave ``param`` and ``state`` bit-exactly as they were (the step is skipped because a
        gradient was not finite; ``grad`` is then all zeros).  Return None where a
        configuration is not handled in place; the optimizer then runs
        :meth:`update_with_tangents` and writes its results back.  The default returns None.
        """
        return None

    def vjp(self, param: Tensor, grad: Tensor, state: State, hyper: Hyper,
            options: dict[str, Any], cot_param: Tensor | None, cot_state: State,
            inputs: bool, kinds: tuple[str, ...]):
        """Optional closed-form reverse products of :meth:`update` (second-order methods).

        For output cotangents ``cot_param`` (of the new parameter; None for zero) and
        ``cot_state`` (of new state entries; missing ones are zero), return
        ``(d_param, d_grad, d_state, d_hyper)``: the cotangents of the inputs
        (``d_param``/``d_grad`` None and ``d_state`` empty when ``inputs`` is False;
        ``d_state`` has an entry for each floating-point state tensor shaped like ``param``
        that the step reads, ``step`` counters excepted) and ``d_hyper[kind]`` for each kind in
        ``kinds``, shaped like ``hyper[kind]`` (summed over the parameter for a 0-dim value).
        Called with gradients disabled; all inputs are constants.

        Return None where a configuration is not handled: the methods then run reverse-mode
        autograd through :meth:`update`, which is always correct.  The default returns None;
        the tests check every closed form against autograd in float64.
        """
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def scratch(work: dict[str, Tensor], name: str, like: Tensor) -> Tensor:
    """A persistent buffer shaped like ``like``, created on first use."""
    buf = work.get(name)
    if buf is None or buf.shape != like.shape or buf.dtype != like.dtype:
        buf = work[name] = torch.empty_like(like, memory_format=torch.preserve_format)
    return buf


def _memo(ok: Tensor, key, value, compute):
    """Memoise ``compute()`` on the per-step tensor ``ok``; a tensor ``value`` is keyed by
    identity and kept alive by the memo, so its id cannot be reused within the step."""
    memo = ok.__dict__.setdefault("_memo", {})
    hit = memo.get(key)
    if hit is None or hit[0] is not value:
        hit = memo[key] = (value, compute())
    return hit[1]


def gated(ok: Tensor, value: float | Tensor) -> Tensor:
    """``value * ok``: the coefficient of a step's increment, 0 when the step is skipped
    (computed once per step per value, not once per parameter)."""
    key = ("gated", id(value) if isinstance(value, Tensor) else value)
    return _memo(ok, key, value, lambda: value * ok)


def kept(ok: Tensor, value: float | Tensor, frozen: float) -> Tensor:
    """``value`` where the step is taken (ok=1), ``frozen`` (the no-op value) where it is
    skipped (ok=0); exact in both cases, in ``ok``'s dtype (memoised like :func:`gated`)."""
    key = ("kept", id(value) if isinstance(value, Tensor) else value, frozen)
    return _memo(ok, key, value, lambda: ok * value + (1 - ok) * frozen)


def reduce_like(x: Tensor, y: Tensor | float, like: float | Tensor) -> Tensor:
    """``x * y`` (broadcast) reduced to the shape of the hyperparameter ``like``: summed to a
    0-dim tensor for a scalar, elementwise for a value shaped like the parameter."""
    if isinstance(like, Tensor) and like.dim() > 0:
        return x * y
    if not isinstance(y, Tensor) or y.dim() == 0:
        return x.sum() * y
    if x.shape != y.shape:
        return (x * y).sum()
    return torch.vdot(x.reshape(-1), y.reshape(-1))


def axpy(x: Tensor, y: Tensor, alpha: float | Tensor) -> Tensor:
    """``x + alpha * y`` as a new tensor, in one op."""
    if isinstance(alpha, Tensor):
        return torch.addcmul(x, y, alpha)
    return torch.add(x, y, alpha=alpha)


def add_scaled_(x: Tensor, y: Tensor, scale: float | Tensor) -> Tensor:
    """``x += scale * y`` in place."""
    if isinstance(scale, Tensor):
        return x.addcmul_(y, scale)
    return x.add_(y, alpha=scale)


def new_step_count(param: Tensor) -> Tensor:
    """torch.optim's ``state["step"]``: a 0-dim float tensor on the CPU.

    We keep it on the parameter's device instead, so that bias corrections are
    tensor arithmetic and never need a host synchronisation, and in float64
    (where the device has it), so that ``1 - beta2 ** step`` is as exact as
    torch's Python-float arithmetic.
    """
    dtype = torch.float32 if param.device.type == "mps" else torch.float64
    return torch.zeros((), dtype=dtype, device=param.device)
