"""Small float64 problems with fixed seeds, and the comparison helpers the tests share.

A :class:`Problem` is written functionally, ``loss_fn(weights, batch) -> scalar`` with
``weights`` a flat list of tensors, so that the same function drives a real training loop
(``HyperOptimizer`` or ``torch.optim`` on leaf tensors) and ``reference.unrolled_hypergradient``.
Every tensor is built with ``dtype=torch.float64`` explicitly; nothing relies on the default
dtype, so a float32 leak inside the library would show up as a precision loss.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from hyperopt_wrap.rules import UpdateRule

DTYPE = torch.float64

Batch = tuple[Tensor, Tensor]


@dataclass(frozen=True)
class Problem:
    """Initial weights, a loss, a few fixed minibatches and a validation batch."""
    name: str
    initial: tuple[Tensor, ...]        # detached initial weights, flat
    group_sizes: tuple[int, int]       # how the flat weights split into two param groups
    loss_fn: Callable[[list[Tensor], Batch], Tensor]
    batches: tuple[Batch, ...]
    val_batch: Batch

    def weights(self) -> list[Tensor]:
        """Fresh leaf copies of the initial weights (requires_grad)."""
        return [w.clone().requires_grad_(True) for w in self.initial]

    def batch(self, t: int) -> Batch:
        """The minibatch of step ``t`` (the fixed batches, cycled)."""
        return self.batches[t % len(self.batches)]

    def split(self, weights: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        n0 = self.group_sizes[0]
        return list(weights[:n0]), list(weights[n0:])


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(gen: torch.Generator, *shape: int, scale: float = 1.0) -> Tensor:
    return torch.randn(*shape, generator=gen, dtype=DTYPE) * scale


def linear_regression(seed: int = 0, n_in: int = 5, n_out: int = 2, batch: int = 8,
                      n_batches: int = 4) -> Problem:
    """``0.5 * mean ||x W^T + b - y||^2`` with noisy targets from a random linear map."""
    gen = _generator(seed)
    true_w, true_b = _randn(gen, n_out, n_in), _randn(gen, n_out)

    def data(n: int) -> Batch:
        x = _randn(gen, n, n_in)
        return x, x @ true_w.T + true_b + 0.1 * _randn(gen, n, n_out)

    def loss_fn(weights, batch):
        w, b = weights
        x, y = batch
        return 0.5 * ((x @ w.T + b - y) ** 2).sum(dim=1).mean()

    initial = (_randn(gen, n_out, n_in, scale=0.3), _randn(gen, n_out, scale=0.3))
    return Problem("linreg", initial, (1, 1), loss_fn,
                   tuple(data(batch) for _ in range(n_batches)), data(2 * batch))


def logistic_regression(seed: int = 1, n_in: int = 5, batch: int = 8,
                        n_batches: int = 4) -> Problem:
    """Binary cross-entropy of a linear classifier on labels of a noisy linear rule."""
    gen = _generator(seed)
    direction = _randn(gen, n_in)

    def data(n: int) -> Batch:
        x = _randn(gen, n, n_in)
        logits = x @ direction + 0.5 * _randn(gen, n)
        return x, (logits > 0).to(DTYPE)

    def loss_fn(weights, batch):
        w, b = weights
        x, y = batch
        return F.binary_cross_entropy_with_logits(x @ w + b, y)

    initial = (_randn(gen, n_in, scale=0.3), _randn(gen, 1, scale=0.3))
    return Problem("logreg", initial, (1, 1), loss_fn,
                   tuple(data(batch) for _ in range(n_batches)), data(2 * batch))


def mlp(seed: int = 2, n_in: int = 4, hidden: int = 6, n_classes: int = 3, batch: int = 8,
        n_batches: int = 4, biases: bool = True) -> Problem:
    """A one-hidden-layer tanh MLP with cross-entropy; groups are the two layers.  Without
    ``biases`` it has two weight tensors, which halves the per-step cost of long runs."""
    gen = _generator(seed)
    centres = _randn(gen, n_classes, n_in, scale=1.5)

    def data(n: int) -> Batch:
        y = torch.randint(0, n_classes, (n,), generator=gen)
        return centres[y] + _randn(gen, n, n_in), y

    def loss_fn(weights, batch):
        x, y = batch
        if biases:
            w1, b1, w2, b2 = weights
            return F.cross_entropy(torch.tanh(x @ w1.T + b1) @ w2.T + b2, y)
        w1, w2 = weights
        return F.cross_entropy(torch.tanh(x @ w1.T) @ w2.T, y)

    w1, b1 = _randn(gen, hidden, n_in, scale=0.5), _randn(gen, hidden, scale=0.1)
    w2, b2 = _randn(gen, n_classes, hidden, scale=0.5), _randn(gen, n_classes, scale=0.1)
    initial, groups = ((w1, b1, w2, b2), (2, 2)) if biases else ((w1, w2), (1, 1))
    return Problem("mlp" if biases else "mlp-no-bias", initial, groups, loss_fn,
                   tuple(data(batch) for _ in range(n_batches)), data(2 * batch))


PROBLEMS: dict[str, Callable[[], Problem]] = {
    "linreg": linear_regression, "logreg": logistic_regression, "mlp": mlp}


def objective(problem: Problem, maximize: bool) -> Callable[[list[Tensor], Batch], Tensor]:
    """What the training loop backpropagates: the loss, or minus the loss when the optimizer
    maximizes (a reward), so that every trajectory stays bounded."""
    if not maximize:
        return problem.loss_fn
    return lambda weights, batch: -problem.loss_fn(weights, batch)


# ---------------------------------------------------------------------------- comparisons
def flat(entries) -> Tensor:
    """One 1-D tensor from a ``hyperparameters()``/``last_hypergradient()`` entry list
    (0-dim tensors, 1-D tensors, lists of tensors, or floats).  Tensors keep their dtype."""
    parts = []
    for entry in entries:
        items = entry if isinstance(entry, list) else [entry]
        parts += [(x if isinstance(x, Tensor) else torch.tensor(x, dtype=DTYPE)).reshape(-1)
                  for x in items]
    return torch.cat(parts)


def rel_err(actual: Tensor, expected: Tensor) -> float:
    """Normwise relative error ``max|actual - expected| / max|expected|`` (absolute where
    ``expected`` is all zeros)."""
    actual = torch.as_tensor(actual).to(DTYPE)
    expected = torch.as_tensor(expected).to(DTYPE)
    assert actual.shape == expected.shape, f"shapes differ: {actual.shape} vs {expected.shape}"
    diff = (actual - expected).abs().max() if actual.numel() else torch.zeros((), dtype=DTYPE)
    scale = expected.abs().max() if expected.numel() else torch.zeros((), dtype=DTYPE)
    return float(diff / scale) if scale > 0 else float(diff)


class SignRule(UpdateRule):
    """A user-defined rule (sign SGD) that relies on the forward-mode default for tangents."""
    kinds = ("lr",)

    def options(self, group):
        return {}

    def init_state(self, param, options):
        return {}

    def update(self, param, grad, state, hyper, options):
        return param - hyper["lr"] * grad.sign(), {}


@contextlib.contextmanager
def forbid_host_sync(monkeypatch, allowed: set[int] = frozenset()):
    """Inside the block, reading any tensor's value on the host (``.item()``, ``bool()``,
    ``.cpu()``, ...) raises, except for the tensors whose ``id`` is in ``allowed``; a raise that
    the code under test swallowed still fails at the end of the block."""
    calls = []

    def guard(name):
        original = getattr(Tensor, name)

        def wrapped(self, *a, **k):
            if id(self) not in allowed:
                calls.append(name)
                raise AssertionError(f"host synchronisation: Tensor.{name} inside step()")
            return original(self, *a, **k)
        return wrapped

    with monkeypatch.context() as mp:
        for name in ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy"):
            mp.setattr(Tensor, name, guard(name))
        yield
    assert not calls, f"host synchronisation inside step(): {calls}"
