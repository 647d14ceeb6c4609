"""A running count (steps, hyper-steps, step calls) that a compiled ``step()`` can advance.

torch.compile specialises on the Python ints it reads (dynamo guards on their values when they
hang off a global, such as the optimizer a compiled ``def fn(): opt.step()`` closes over): an
int that grows every step would recompile the step every step, until the recompile limit, after
which the step silently runs eagerly.  torch's own optimizers keep ``state["step"]`` as a
tensor for the same reason.  A :class:`Count` is a plain int for eager code (``+= 1`` costs
what an int's does); under torch.compile its increments go to a 0-dim int64 tensor, which the
graph updates in place.  Its value is the sum of the two, read with ``int()``: the tensor is
read only once a compiled graph advanced it (outside the compiled region; on an accelerator
that read synchronises, so a count read inside ``step()`` lives on the CPU).
"""
from __future__ import annotations

import torch

from .rules._foreach import is_compiling


class Count:
    """A non-negative integer count: ``+=``, ``int()``, ``==`` with ints."""

    def __init__(self, value: int = 0, device: torch.device | str | None = None):
        self.host = int(value)
        self.traced = torch.zeros((), dtype=torch.int64, device=device)
        self.compiled = False       # whether a compiled graph ever advanced it

    def __iadd__(self, n: int) -> "Count":
        if is_compiling():
            self.traced.add_(n)
            self.compiled = True
        else:
            self.host += n
        return self

    def __int__(self) -> int:
        return self.host + int(self.traced) if self.compiled else self.host

    __index__ = __int__

    def __eq__(self, other) -> bool:
        if isinstance(other, (Count, int)):
            return int(self) == int(other)
        return NotImplemented

    __hash__ = None

    def __repr__(self) -> str:
        return f"Count({int(self)})"
