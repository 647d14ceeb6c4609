"""How the benchmarks take and time training steps: one case (``Case``) built into a step
function (``Built``, ``training_step``), measured in interleaved rounds (``interleaved``) under
fixed torch settings (``measuring``), a case's steps rounded up to whole windows of its
``update_every`` (a second-order method's cost lands at the end of each window).
"""
from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Hashable, Iterator, Sequence

import torch
from torch import Tensor, nn

from .models import Net


@contextlib.contextmanager
def measuring(threads: int, flush_denormal: bool = True):
    """torch's thread count and denormal flushing as measured; both restored afterwards.

    Denormals are flushed by default, a precaution: the cases' values differ by design (tuned
    learning rates), and on a few memorised batches tiny numbers could otherwise make one
    case's arithmetic slower than another's."""
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    torch.set_flush_denormal(flush_denormal)
    try:
        yield
    finally:
        torch.set_num_threads(saved_threads)
        torch.set_flush_denormal(False)     # torch's default; it has no getter


def minor_faults() -> int | None:
    """Minor page faults of this process so far (None where ``resource`` is missing)."""
    try:
        import resource
    except ImportError:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def whole_windows(steps: int, window: int) -> int:
    """``steps`` rounded up to whole windows of ``window`` steps."""
    return -(-steps // window) * window


def check_protocol(rounds: int, steps: int, warmup: int) -> None:
    if rounds < 1 or steps < 1 or warmup < 0:
        raise ValueError("need rounds >= 1, steps >= 1, warmup >= 0; "
                         f"got {rounds}, {steps}, {warmup}")


def median_ratio(own: Sequence[float], reference: Sequence[float]) -> float:
    """The median over rounds of the per-round ratio ``own / reference``."""
    return statistics.median(t / v for t, v in zip(own, reference))


@dataclass(frozen=True)
class Case:
    """One measured case: a base optimizer, a variant (how the optimizer is built and stepped)
    and a network."""
    base: str
    variant: str
    net: Net

    @property
    def group(self) -> str:
        return f"{self.base} {self.net.label} batch {self.net.batch}"

    @property
    def id(self) -> str:
        return f"{self.base}-{self.variant.replace(' ', '_')}-{self.net.id}"


@dataclass
class Built:
    """A case ready to run: ``step()`` does one full training step on the next minibatch; its
    cost is spread over windows of ``window`` steps."""
    case: Hashable
    step: Callable[[], Tensor]
    window: int = 1
    model: nn.Module | None = None
    opt: torch.optim.Optimizer | None = None

    def whole_windows(self, steps: int) -> int:
        """``steps`` rounded up to whole windows."""
        return whole_windows(steps, self.window)

    def settle(self) -> None:
        """Step until no recorded step is held (the window's hypergradient is done)."""
        while getattr(self.opt, "tape", None):
            self.step()


Loss = Callable[[nn.Module, object], Tensor]       # (model, batch) -> the batch's loss


def _cross_entropy() -> Loss:
    loss_fn = nn.CrossEntropyLoss()

    def loss(model: nn.Module, batch) -> Tensor:
        x, y = batch
        return loss_fn(model(x), y)
    return loss


def training_step(opt: torch.optim.Optimizer, model: nn.Module, batches: Iterator,
                  style: str = "plain", loss: Loss | None = None,
                  opt_step: Callable[[], None] | None = None) -> Callable[[], Tensor]:
    """A function doing one full training step on the next of ``batches`` and returning its
    loss, ``loss(model, batch)`` (default: cross-entropy of ``model(x)`` against ``y`` for a
    batch ``(x, y)``), in one of three styles:

    * "plain": ``zero_grad(); loss.backward(); opt.step()``;
    * "graph": the same with ``loss.backward(create_graph=opt.needs_graph)`` (a graph only on
      the steps a second-order method records);
    * "closure": ``opt.step(closure)``, the closure doing zero_grad, forward and backward on
      its own batch (finite-difference Hessian-vector products re-call it).

    ``opt_step`` replaces ``opt.step`` in the first two (e.g. :func:`compiled_step`)."""
    loss_of = _cross_entropy() if loss is None else loss
    if style == "closure":
        def step() -> Tensor:
            batch = next(batches)

            def closure(batch=batch) -> Tensor:        # binds its batch: it may be replayed
                opt.zero_grad()
                value = loss_of(model, batch)
                value.backward()
                return value

            return opt.step(closure)
        return step
    if style not in ("plain", "graph"):
        raise ValueError(f"unknown step style {style!r}: plain, graph or closure")
    graph = style == "graph"
    opt_step = opt.step if opt_step is None else opt_step

    def step() -> Tensor:
        batch = next(batches)
        opt.zero_grad()
        value = loss_of(model, batch)
        value.backward(create_graph=graph and opt.needs_graph)
        opt_step()
        return value
    return step


def compiled_step(opt: torch.optim.Optimizer, fullgraph: bool) -> Callable[[], None]:
    """``opt.step()`` under torch.compile, as torch documents it for optimizers (compiled on
    its first calls: warm it up before timing)."""
    @torch.compile(fullgraph=fullgraph)
    def step() -> None:
        opt.step()
    return step


def warm_up(built: Sequence[Built], steps: int, whole: bool = False) -> None:
    """``steps`` steps of every case, with ``whole`` rounded up to its whole windows (lazily
    created state, allocator caches, first hyper-steps)."""
    for b in built:
        for _ in range(b.whole_windows(steps) if whole else steps):
            b.step()


def interleaved(built: Sequence[Built], rounds: int, steps: int,
                faults: bool = False) -> tuple[dict, dict]:
    """``rounds`` round-robin passes over ``built``, the order rotating by one every round so
    that drift in machine load hits every case alike; in each, every case runs ``steps`` steps
    rounded up to its whole windows.  Returns ``{case: [mean seconds per step, a round
    each]}`` and, with ``faults``, ``{case: [minor page faults per step, a round each]}``
    (empty lists where the platform has no count)."""
    times: dict = {b.case: [] for b in built}
    fault_counts: dict = {b.case: [] for b in built}
    for r in range(rounds):
        k = r % len(built)
        for b in [*built[k:], *built[:k]]:
            n = b.whole_windows(steps)
            before = minor_faults() if faults else None
            start = time.perf_counter()
            for _ in range(n):
                b.step()
            times[b.case].append((time.perf_counter() - start) / n)
            if before is not None:
                fault_counts[b.case].append((minor_faults() - before) / n)
    return times, fault_counts
