"""The update-rule protocol.

A rule is one step of a base optimizer written as a pure function of tensors,

    new_param, new_state = rule.update(param, grad, state, hyper, options)

elementwise in ``(param, grad, state)``.  The same code runs in two ways:

* under ``torch.no_grad()`` for the real step (the optimizer copies the result
  into the parameter and its state in place);
* with forward- or reverse-mode autograd, which gives the derivatives the
  hypergradient methods need: ``B = dPhi/dlam`` (tangents with respect to the
  hyperparameters) and ``A = dPhi/dx``.

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

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def new_step_count(param: Tensor) -> Tensor:
    """torch.optim's ``state["step"]``: a 0-dim float tensor on the CPU.

    We keep it on the parameter's device instead, so that bias corrections are
    tensor arithmetic and never need a host synchronisation, and in float64
    (where the device has it), so that ``1 - beta2 ** step`` is as exact as
    torch's Python-float arithmetic.
    """
    dtype = torch.float32 if param.device.type == "mps" else torch.float64
    return torch.zeros((), dtype=dtype, device=param.device)
