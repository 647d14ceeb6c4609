"""What HyperOptimizer costs against the torch.optim optimizer it wraps: one full training step.

    python benchmarks/summary.py                       # writes benchmarks/RESULTS.md
    python benchmarks/summary.py --quick               # a look in under a minute, printed only
    python benchmarks/summary.py --widths 256 --cnn-widths 16 --lstm-widths 64 --out /tmp/r.md
    python benchmarks/summary.py --profile SGD "implicit graph" 256     # where the time goes

A step is ``zero_grad(); loss = CE(net(x), y); loss.backward(); opt.step()`` on a few fixed
random minibatches taken in turn, for an MLP 784-H-10 (ReLU, batch 128), a small CNN (1x28x28
inputs, 3x3 convolutions 1 -> C/2 -> C channels without padding, ReLU, linear to 10 classes;
batch 64) and a character-level LSTM language model (embedding 64x16, one LSTM layer of H
units, linear to 64 classes, sequences of 32, batch 32), float32: torch's optimizer as it runs by default on CPU ("vanilla", the reference
of most ratios), torch's fused kernel ("vanilla fused", for context), and HyperOptimizer
around it: greedy (global, per-tensor and per-element lr; lr, momentum and weight decay), and
the second-order methods implicit (T=10, i=5) and unroll (K=5, T=10) with either curvature
source, at per-tensor and per-element lr.  Those take their step in one of two styles:

* ``graph``: ``loss.backward(create_graph=opt.needs_graph); opt.step()``, measured against
  vanilla's plain step;
* ``closure``: ``opt.step(closure)``, the closure doing zero_grad, forward and backward (the
  methods' finite-difference Hessian-vector products re-call it), measured against
  "vanilla closure", torch's optimizer stepped with the same closure.

Every case of a network is built first (same initial weights), warmed up, and then measured
in ``rounds`` round-robin passes of ``steps`` steps each, the order rotating every round, so
that drift in machine load hits every case alike.  A case's steps per round are rounded up to
whole windows of its ``update_every`` (implicit and unroll: 10), since a second-order method's
cost lands at the end of each window.  Reported: the median over rounds of the mean step time,
and the median over rounds of the per-round ratio to the case's reference (measured in the
same round).

Memory (torch has no allocator statistics for CPU tensors, and tracemalloc does not see them):

* ``state``: bytes held by the optimizer between windows, the sum of the distinct tensors in
  ``opt.state`` (for HyperOptimizer including the method's buffers kept there) plus, for
  HyperOptimizer, its tuned values/raws/accumulators, the hyper-optimizer's state and the
  persistent per-parameter scratch buffers of its in-place steps;
* ``step peak``: the highest amount allocated during one step (a whole window of steps for
  HyperOptimizer: recorded steps and kept graphs included) above what was held just before
  it, from ``torch.profiler`` memory events (``profile_memory=True``).

Denormal floats are flushed to zero (``torch.set_flush_denormal(True)``) while measuring, a
precaution: the cases' values differ by design (tuned learning rates), and on a few memorised
batches tiny numbers could otherwise make one case's arithmetic slower than another's.

The pytest-benchmark suite in ``test_overhead.py`` builds its cases with the same code.
``--profile BASE VARIANT NET`` prints where one case's step time goes instead.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from hyperopt_wrap import HyperOptimizer, Implicit, Unroll

from report import RESULTS as DEFAULT_OUT, machine_info, machine_lines, write_section

HERE = Path(__file__).resolve().parent
IN_FEATURES, CLASSES = 784, 10
IMAGE = (1, 28, 28)
VOCAB, EMBED, SEQ = 64, 16, 32           # the LSTM: characters in, next character out
BATCHES = {"mlp": 128, "cnn": 64, "lstm": 32}
# weight_decay > 0 everywhere: tuning it (log space) needs a positive start, and vanilla
# must do the same arithmetic as the wrapped optimizer to be a fair reference.
BASES: dict[str, tuple[type, dict]] = {
    "SGD": (torch.optim.SGD, {"lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4}),
    "Adam": (torch.optim.Adam, {"lr": 1e-3, "weight_decay": 5e-4}),
}


@dataclass(frozen=True)
class Variant:
    """How a case builds its optimizer and takes its step."""
    hyper: dict | None = None       # HyperOptimizer options; None: the torch optimizer itself
    torch_kwargs: dict = field(default_factory=dict)    # extra options of the torch optimizer
    step: str = "plain"             # "plain", "graph" or "closure" (see the module docstring)
    reference: str = "vanilla"      # the variant its ratios are taken against
    target: float | None = None     # the ratio it should stay within

    def describe(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self.hyper.items())
        return f"HyperOptimizer({options}), {self.step} step"


GLOBAL_LR = {"tune": ("lr",), "granularity": "global"}
TENSOR_LR = {"tune": ("lr",), "granularity": "tensor"}
ELEMENT_LR = {"tune": ("lr",), "granularity": "element"}
GREEDY = {"method": "greedy"}
IMPLICIT = {"method": Implicit(neumann_terms=5), "update_every": 10}
UNROLL = {"method": Unroll(horizon=5), "update_every": 10}


def _second_order(name: str, options: dict, target: float) -> dict[str, "Variant"]:
    """``name`` with both curvature sources at per-tensor and per-element lr."""
    variants = {}
    for gran, tuned in (("tensor", TENSOR_LR), ("element", ELEMENT_LR)):
        variants[f"{name} graph {gran} lr"] = Variant(
            {**options, **tuned, "curvature": "graph"}, step="graph", target=target)
        variants[f"{name} closure {gran} lr"] = Variant(
            {**options, **tuned, "curvature": "closure"}, step="closure",
            reference="vanilla closure", target=target)
    return variants


VARIANTS: dict[str, Variant] = {
    "vanilla": Variant(),
    "vanilla fused": Variant(torch_kwargs={"fused": True}),
    "greedy global lr": Variant({**GREEDY, **GLOBAL_LR}, target=1.10),
    "greedy tensor lr": Variant({**GREEDY, **TENSOR_LR}, target=1.10),
    "greedy element lr": Variant({**GREEDY, **ELEMENT_LR}, target=1.10),
    "greedy global lr+mom+wd": Variant({**GREEDY, **GLOBAL_LR,
                                        "tune": ("lr", "momentum", "weight_decay")}),
    "vanilla closure": Variant(step="closure"),
    **_second_order("implicit", IMPLICIT, 1.5),
    **_second_order("unroll", UNROLL, 2.0),
}


class CharLSTM(nn.Module):
    """Embedding -> one LSTM layer -> linear: next-token logits, flattened over the sequence."""

    def __init__(self, hidden: int):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, EMBED)
        self.lstm = nn.LSTM(EMBED, hidden, batch_first=True)
        self.out = nn.Linear(hidden, VOCAB)

    def forward(self, tokens: Tensor) -> Tensor:
        hidden, _ = self.lstm(self.embed(tokens))
        return self.out(hidden).reshape(-1, VOCAB)


@dataclass(frozen=True)
class Net:
    """A network and its minibatches."""
    kind: str       # "mlp", "cnn" or "lstm"
    width: int      # MLP: hidden units; CNN: channels of the second convolution (first: half);
    #                 LSTM: hidden units

    def __post_init__(self):
        if self.kind not in BATCHES or self.width < (2 if self.kind == "cnn" else 1):
            raise ValueError(f"no network {self.kind!r} of width {self.width}")

    @property
    def batch(self) -> int:
        return BATCHES[self.kind]

    @property
    def label(self) -> str:
        if self.kind == "mlp":
            return f"MLP {IN_FEATURES}-{self.width}-{CLASSES}"
        if self.kind == "lstm":
            return f"LSTM {VOCAB}-{EMBED}-{self.width}-{VOCAB}"
        return f"CNN {IMAGE[0]}-{self.width // 2}-{self.width}"

    @property
    def id(self) -> str:
        return f"h{self.width}" if self.kind == "mlp" else f"{self.kind}{self.width}"

    @classmethod
    def parse(cls, text: str) -> "Net":
        """``"256"``, ``"h256"`` or ``"mlp256"``: the MLP of that width; ``"cnn16"``: the CNN;
        ``"lstm64"``: the LSTM."""
        for prefix, kind in (("cnn", "cnn"), ("lstm", "lstm"), ("mlp", "mlp"), ("h", "mlp"),
                             ("", "mlp")):
            if text.startswith(prefix) and text[len(prefix):].isdigit():
                return cls(kind, int(text[len(prefix):]))
        raise ValueError(f"unknown network {text!r}: e.g. 256 (MLP 784-256-10), cnn16 or lstm64")

    def model(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        if self.kind == "mlp":
            return nn.Sequential(nn.Linear(IN_FEATURES, self.width), nn.ReLU(),
                                 nn.Linear(self.width, CLASSES))
        if self.kind == "lstm":
            return CharLSTM(self.width)
        c, (_, h, w) = self.width, IMAGE
        return nn.Sequential(nn.Conv2d(IMAGE[0], c // 2, 3), nn.ReLU(), nn.Conv2d(c // 2, c, 3),
                             nn.ReLU(), nn.Flatten(), nn.Linear(c * (h - 4) * (w - 4), CLASSES))

    def batches(self, n: int = 4, seed: int = 0) -> list[tuple[Tensor, Tensor]]:
        """``n`` minibatches (inputs, targets); the LSTM's are random token sequences and the
        same sequences shifted by one (flattened, as the model's logits are)."""
        gen = torch.Generator().manual_seed(seed)
        if self.kind == "lstm":
            tokens = [torch.randint(0, VOCAB, (self.batch, SEQ + 1), generator=gen)
                      for _ in range(n)]
            return [(t[:, :-1], t[:, 1:].reshape(-1)) for t in tokens]
        shape = (IN_FEATURES,) if self.kind == "mlp" else IMAGE
        return [(torch.randn(self.batch, *shape, generator=gen),
                 torch.randint(0, CLASSES, (self.batch,), generator=gen)) for _ in range(n)]


def make_nets(widths: Sequence[int] = (), cnn_widths: Sequence[int] = (),
              lstm_widths: Sequence[int] = ()) -> list[Net]:
    return ([Net("mlp", w) for w in widths] + [Net("cnn", c) for c in cnn_widths]
            + [Net("lstm", h) for h in lstm_widths])


DEFAULT_WIDTHS, DEFAULT_CNN_WIDTHS, DEFAULT_LSTM_WIDTHS = (64, 256, 1024), (16,), (64,)
DEFAULT_NETS = make_nets(DEFAULT_WIDTHS, DEFAULT_CNN_WIDTHS, DEFAULT_LSTM_WIDTHS)


@dataclass(frozen=True)
class Case:
    base: str
    variant: str
    net: Net

    @property
    def group(self) -> str:
        return f"{self.base} {self.net.label} batch {self.net.batch}"

    @property
    def id(self) -> str:
        return f"{self.base}-{self.variant.replace(' ', '_')}-{self.net.id}"

    @property
    def reference(self) -> "Case":
        return Case(self.base, VARIANTS[self.variant].reference, self.net)


@dataclass
class Built:
    case: Case
    model: nn.Module
    opt: torch.optim.Optimizer
    step: Callable[[], Tensor]

    @property
    def window(self) -> int:
        """Steps per window: the cost of a HyperOptimizer step is spread over a whole one."""
        return self.opt.update_every if isinstance(self.opt, HyperOptimizer) else 1

    def whole_windows(self, steps: int) -> int:
        """``steps`` rounded up to whole windows."""
        return -(-steps // self.window) * self.window

    def settle(self) -> None:
        """Step until no recorded step is held (the window's hypergradient is done)."""
        while getattr(self.opt, "tape", None):
            self.step()


def training_step(opt: torch.optim.Optimizer, model: nn.Module, batches,
                  style: str = "plain") -> Callable[[], Tensor]:
    """A function doing one full training step (cross-entropy) on the next of ``batches`` in
    one of the styles of the module docstring: "plain", "graph" or "closure"."""
    loss_fn = nn.CrossEntropyLoss()
    if style == "closure":
        def step() -> Tensor:
            x, y = next(batches)

            def closure(x=x, y=y) -> Tensor:        # binds its batch: it may be replayed
                opt.zero_grad()
                loss = loss_fn(model(x), y)
                loss.backward()
                return loss

            return opt.step(closure)
        return step
    graph = style == "graph"

    def step() -> Tensor:
        x, y = next(batches)
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward(create_graph=graph and opt.needs_graph)
        opt.step()
        return loss
    return step


def build_case(case: Case, seed: int = 0) -> Built:
    """Model, optimizer and a function doing one full training step on the next minibatch."""
    model = case.net.model(seed)
    optimizer_cls, kwargs = BASES[case.base]
    variant = VARIANTS[case.variant]
    if variant.hyper is None:
        opt = optimizer_cls(model.parameters(), **kwargs, **variant.torch_kwargs)
    else:           # a copy: a method instance may keep state between steps
        opt = HyperOptimizer(optimizer_cls, model.parameters(), **copy.deepcopy(variant.hyper),
                             **kwargs)
    step = training_step(opt, model, itertools.cycle(case.net.batches(seed=seed)), variant.step)
    return Built(case, model, opt, step)


def with_references(variants: Sequence[str]) -> list[str]:
    """``variants`` and the references of their ratios, in the order of ``VARIANTS``."""
    wanted, todo = set(), list(variants)
    while todo:
        v = todo.pop()
        if v not in wanted:
            wanted.add(v)
            todo.append(VARIANTS[v].reference)
    return [v for v in VARIANTS if v in wanted]


def all_cases(nets: Sequence[Net], bases: Sequence[str] = tuple(BASES),
              variants: Sequence[str] = tuple(VARIANTS)) -> list[Case]:
    return [Case(b, v, n) for n in nets for b in bases for v in with_references(variants)]


# ---------------------------------------------------------------------------- memory
def _tensors(obj):
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def _distinct_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of the distinct tensors an optimizer keeps between steps (params and grads excluded)."""
    tensors = list(_tensors(list(opt.state.values())))
    if isinstance(opt, HyperOptimizer):
        tensors += opt.scratch_tensors()   # tuned values, hyper-optimizer, method, scratch
    return _distinct_bytes(tensors)


def step_peak_bytes(step: Callable[[], Tensor], steps: int = 1) -> int | None:
    """Peak bytes allocated during ``steps`` consecutive steps above what was held just before
    them (torch.profiler).

    One more step is profiled first, so that every block the measured ones free was
    allocated under the profiler.  None where the profiler gives no memory events.
    """
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
        with record_function("measured_step"):
            for _ in range(steps):
                step()
    events = list(prof.profiler.kineto_results.events())
    mark = next((e for e in events if e.name() == "measured_step"), None)
    memory = sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns())
    if mark is None or not memory:
        return None
    held, before, peak = 0, None, 0
    for e in memory:
        if e.start_ns() > mark.end_ns():
            break
        if before is None and e.start_ns() >= mark.start_ns():
            before = held
        held += e.nbytes()
        if before is not None:
            peak = max(peak, held - before)
    return peak


# ---------------------------------------------------------------------------- timing
def _minor_faults() -> int | None:
    """Minor page faults of this process so far (None where ``resource`` is missing)."""
    try:
        import resource
    except ImportError:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


@contextlib.contextmanager
def measuring(threads: int, flush_denormal: bool = True):
    """torch's thread count and denormal flushing as measured; both restored afterwards."""
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    torch.set_flush_denormal(flush_denormal)
    try:
        yield
    finally:
        torch.set_num_threads(saved_threads)
        torch.set_flush_denormal(False)     # torch's default; it has no getter


def measure(nets: Sequence[Net] = DEFAULT_NETS, rounds: int = 11, steps: int = 20,
            warmup: int = 10, threads: int = 1, bases: Sequence[str] = tuple(BASES),
            variants: Sequence[str] = tuple(VARIANTS), memory: bool = True,
            flush_denormal: bool = True) -> list[dict]:
    """Interleaved timings (and memory) of every case and of its reference; one dict per case.

    Each case runs at least ``steps`` steps per round, rounded up to whole windows."""
    if rounds < 1 or steps < 1 or warmup < 0:
        raise ValueError(f"need rounds >= 1, steps >= 1, warmup >= 0; got {rounds}, {steps}, {warmup}")
    results = []
    with measuring(threads, flush_denormal):
        for net in nets:
            built = [build_case(c) for c in all_cases([net], bases, variants)]
            for b in built:
                for _ in range(warmup):
                    b.step()
            times: dict[Case, list[float]] = {b.case: [] for b in built}
            faults: dict[Case, list[float]] = {b.case: [] for b in built}
            for r in range(rounds):
                k = r % len(built)
                for b in built[k:] + built[:k]:
                    n = b.whole_windows(steps)
                    faults_before = _minor_faults()
                    start = time.perf_counter()
                    for _ in range(n):
                        b.step()
                    times[b.case].append((time.perf_counter() - start) / n)
                    if faults_before is not None:
                        faults[b.case].append((_minor_faults() - faults_before) / n)
            for b in built:
                ref = b.case.reference
                ratios = [t / v for t, v in zip(times[b.case], times[ref])]
                loss = float(b.step().detach())
                b.settle()
                rec = {"base": b.case.base, "variant": b.case.variant, "net": net.label,
                       "reference": ref.variant,
                       "median_s": statistics.median(times[b.case]),
                       "ratio": statistics.median(ratios),
                       "ratio_of_medians": statistics.median(times[b.case])
                       / statistics.median(times[ref]),
                       "times_s": times[b.case],
                       "minor_faults": statistics.median(faults[b.case]) if faults[b.case]
                       else None,
                       "state_bytes": optimizer_state_bytes(b.opt),
                       "param_bytes": sum(p.numel() * p.element_size()
                                          for p in b.model.parameters()),
                       "step_peak_bytes": step_peak_bytes(b.step, b.window) if memory else None,
                       "final_loss": loss,
                       "skipped_steps": b.opt.skipped_steps if isinstance(b.opt, HyperOptimizer)
                       else 0}
                results.append(rec)
    return results


# ---------------------------------------------------------------------------- profile
MODEL_OPS = "model forward/backward, zero_grad"


def _charge(event) -> tuple[str, bool] | None:
    """Where a top-level aten op's time goes, and whether it ran inside ``opt.step``; None for an
    op called by another aten op.

    Ops are charged to the innermost ``hyperopt_wrap`` function on their Python stack, except
    the model's own forward and backward: those outside ``opt.step``, and those of the closure
    as ``step`` calls it (a closure replayed for a Hessian-vector product is charged to the
    library function that replays it)."""
    frames, parent = [], event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return None
        frames.append(parent.name)
        parent = parent.cpu_parent
    in_step = any(f.startswith("Optimizer.step#") for f in frames)
    lib = [i for i, f in enumerate(frames) if "hyperopt_wrap/" in f]
    closure = next((i for i, f in enumerate(frames) if f.endswith("): closure")
                    and f.rsplit("(", 1)[0].endswith(Path(__file__).name)), None)
    if closure is not None:
        caller = next((frames[i] for i in lib if i > closure), "")
        if not caller or ("hyperopt_wrap/optimizer.py(" in caller and caller.endswith("): step")):
            return MODEL_OPS, in_step
    if lib:
        return "hyperopt_wrap/" + frames[lib[0]].split("hyperopt_wrap/")[-1], in_step
    return ("torch.optim" if in_step else MODEL_OPS), in_step


def profile_step(case: Case, steps: int = 50, threads: int = 1, top: int = 25) -> str:
    """Where one step's time goes: torch.profiler, each top-level aten op charged to the
    innermost ``hyperopt_wrap`` function on its Python stack (function and its ``def`` line),
    over whole windows of at least ``steps`` steps."""
    from collections import Counter

    from torch.profiler import ProfilerActivity, profile

    with measuring(threads):
        built = build_case(case)
        for _ in range(20):
            built.step()
        steps = built.whole_windows(steps)
        config = torch._C._profiler._ExperimentalConfig(verbose=True)   # Python frames as events
        with profile(activities=[ProfilerActivity.CPU], with_stack=True,
                     experimental_config=config) as prof:
            for _ in range(steps):
                built.step()
    events = prof.events()
    by_op, calls = Counter(), Counter()
    model_us = closure_us = 0.0
    for e in events:
        charged = _charge(e) if e.name.startswith("aten::") else None
        if charged is None:
            continue
        where, in_step = charged
        if where == MODEL_OPS:
            model_us += e.cpu_time_total / steps
            closure_us += e.cpu_time_total / steps if in_step else 0.0
        else:
            by_op[(where, e.name)] += e.cpu_time_total
            calls[(where, e.name)] += 1
    step_us = sum(e.cpu_time_total for e in events if e.name.startswith("Optimizer.step#")) / steps
    kernels_us = sum(by_op.values()) / steps
    by_function = Counter()
    for (where, _), v in by_op.items():
        by_function[where] += v
    lines = [f"{case.id}: profiled {steps} steps, {threads} thread(s); times per step "
             "(profiler on: Python costs are inflated)",
             f"  model forward/backward/zero_grad ops: {model_us:8.0f} us",
             f"  opt.step total:                      {step_us:8.0f} us",
             f"    of which the step's closure ops:   {closure_us:8.0f} us  (counted above)",
             f"    of which other aten ops:           {kernels_us:8.0f} us",
             f"    of which Python and dispatch:      {step_us - closure_us - kernels_us:8.0f} us",
             "  aten time inside opt.step by function:"]
    lines += [f"    {v / steps:8.0f} us  {w}" for w, v in by_function.most_common()]
    lines.append(f"  top {top} (function :: op, calls per step):")
    lines += [f"    {v / steps:8.0f} us {calls[k] / steps:5.1f}x  {k[0]} :: {k[1]}"
              for k, v in by_op.most_common(top)]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- report
def format_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _faults(r: dict) -> str:
    return "n/a" if r["minor_faults"] is None else format(r["minor_faults"], ".0f")


def peak_total_bytes(r: dict) -> int | None:
    """Weights + gradients + optimizer state + the step's peak (None without memory events)."""
    if r["step_peak_bytes"] is None:
        return None
    return 2 * r["param_bytes"] + r["state_bytes"] + r["step_peak_bytes"]


def _peak_ratio(r: dict, reference: dict) -> str:
    a, b = peak_total_bytes(r), peak_total_bytes(reference)
    return "n/a" if a is None or not b else f"{a / b:.2f}x"


def format_markdown(results: list[dict], info: dict[str, str], settings: dict) -> str:
    by_key = {(r["base"], r["variant"], r["net"]): r for r in results}

    def ref(r: dict) -> dict:
        return by_key[(r["base"], r["reference"], r["net"])]

    variants = [v for v in VARIANTS if any(r["variant"] == v for r in results)]
    lines = ["## Overhead: one training step", "",
             f"Generated by `python benchmarks/summary.py` on {info['date']}.", "",
             *machine_lines(info),
             "- step: zero_grad, forward, backward, opt.step on float32 networks: MLP 784-H-10 "
             f"(ReLU), batch {BATCHES['mlp']}; CNN 1-C/2-C on 1x28x28 inputs (two 3x3 "
             "convolutions without padding, ReLU, linear to 10 classes), batch "
             f"{BATCHES['cnn']}; LSTM V-E-H-V, a character-level language model (embedding "
             f"{VOCAB}x{EMBED}, one LSTM layer of H units, linear to {VOCAB} classes, next-token "
             f"cross-entropy over sequences of {SEQ}), batch {BATCHES['lstm']}; "
             f"{settings['rounds']} interleaved rounds x "
             f"{settings['steps']} steps (rounded up to whole windows of the case's update_every) "
             f"after {settings['warmup']} warm-up steps; denormals "
             f"{'flushed to zero' if settings.get('flush_denormal', True) else 'kept'}",
             "- step styles: plain, `loss.backward(); opt.step()`; graph, "
             "`loss.backward(create_graph=opt.needs_graph); opt.step()` (a graph only on the "
             "steps the method records); closure, `opt.step(closure)` with a closure doing "
             "zero_grad, forward and backward (finite-difference Hessian-vector products re-call "
             "it). vanilla closure is torch's optimizer stepped with the same closure, the "
             "reference of the closure variants",
             "- variants: " + "; ".join(f"{v}: {VARIANTS[v].describe()}" for v in variants
                                        if VARIANTS[v].hyper is not None),
             "- ratio: median over rounds of (case step time / its reference's step time in the "
             "same round), the reference named in the column 'against'; ratio of medians: median "
             "step time / the reference's median step time (the two differ when machine load "
             "drifts)",
             "- state: bytes the optimizer holds between windows (distinct tensors in opt.state, "
             "plus HyperOptimizer's tuned values, raws, accumulators, hyper-optimizer state and "
             "scratch buffers); extra state: state minus the reference's; step peak: highest "
             "bytes allocated during a step (for HyperOptimizer during a whole window of "
             "update_every steps, recorded steps and kept graphs included) above those held "
             "before it (torch.profiler memory events); peak ratio: the training run's peak, "
             "estimated as weights + gradients + state + step peak (activations are inside the "
             "step peak), over the reference's",
             "- base settings: " + "; ".join(f"{k} {v[1]}" for k, v in BASES.items()),
             "- faults/step: median minor page faults per step (fresh memory the allocator got "
             "from the OS and the kernel had to zero; torch's default CPU Adam allocates "
             "parameter-sized temporaries every step, and how often that faults depends on the "
             "heap's state, so its step time, and every ratio to it, varies between runs)",
             "",
             "| network | base | variant | against | median ms/step | ratio | ratio of medians | "
             "state | extra state | step peak | peak ratio | faults/step |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['net']} | {r['base']} | {r['variant']} | {r['reference']} | "
                     f"{1e3 * r['median_s']:.3f} | {r['ratio']:.2f}x | "
                     f"{r['ratio_of_medians']:.2f}x | {format_bytes(r['state_bytes'])} | "
                     f"{format_bytes(r['state_bytes'] - ref(r)['state_bytes'])} | "
                     f"{format_bytes(r['step_peak_bytes'])} | {_peak_ratio(r, ref(r))} | "
                     f"{_faults(r)} |")
    nets = list(dict.fromkeys(r["net"] for r in results))
    bases = [b for b in BASES if any(r["base"] == b for r in results)]
    lines += ["", "### Ratio to the reference by network", "",
              "| base | variant | against | " + " | ".join(nets) + " |",
              "|---|---|---|" + "---:|" * len(nets)]
    for b in bases:
        for var in variants:
            cells = [f"{by_key[(b, var, n)]['ratio']:.2f}x" if (b, var, n) in by_key else ""
                     for n in nets]
            if var != VARIANTS[var].reference and any(cells):
                lines.append(f"| {b} | {var} | {VARIANTS[var].reference} | "
                             + " | ".join(cells) + " |")
    if any(r["step_peak_bytes"] is not None for r in results):
        lines += ["", "### Peak memory ratio to the reference by network", "",
                  "| base | variant | against | " + " | ".join(nets) + " |",
                  "|---|---|---|" + "---:|" * len(nets)]
        for b in bases:
            for var in variants:
                cells = [_peak_ratio(by_key[k], ref(by_key[k])) if (k := (b, var, n)) in by_key
                         else "" for n in nets]
                if var != VARIANTS[var].reference and any(cells):
                    lines.append(f"| {b} | {var} | {VARIANTS[var].reference} | "
                                 + " | ".join(cells) + " |")
    lines.append("")
    for var in variants:
        target, rows = VARIANTS[var].target, [r for r in results if r["variant"] == var]
        if target is not None:
            worst = max(rows, key=lambda r: r["ratio"])
            met = all(r["ratio"] <= target for r in rows)
            lines.append(f"- Target {var} <= {target:.2f}x {VARIANTS[var].reference}: "
                         f"{'met' if met else 'NOT met'} (worst {worst['ratio']:.2f}x: "
                         f"{worst['base']}, {worst['net']}).")
    against = [f"{r['base']} {r['net']}: {r['median_s'] / by_key[k]['median_s']:.2f}x"
               for r in results if r["variant"] == "greedy global lr"
               and (k := (r["base"], "vanilla fused", r["net"])) in by_key]
    if against:
        lines += ["", "Greedy (global lr) against torch's fused kernel (ratio of medians): "
                  + ", ".join(against) + "."]
    skipped = [r for r in results if r["skipped_steps"]]
    if skipped:
        lines += ["", "Note: some HyperOptimizer cases skipped non-finite steps: "
                  + ", ".join(f"{r['base']} {r['variant']} {r['net']}: {r['skipped_steps']}"
                              for r in skipped)]
    return "\n".join(lines) + "\n"


# Settings of a full run and of --quick (a look in under a minute, printed only).
FULL = {"widths": list(DEFAULT_WIDTHS), "cnn_widths": list(DEFAULT_CNN_WIDTHS),
        "lstm_widths": list(DEFAULT_LSTM_WIDTHS), "rounds": 11,
        "steps": 20, "bases": list(BASES), "out": DEFAULT_OUT}
QUICK = {"widths": [256], "cnn_widths": list(DEFAULT_CNN_WIDTHS), "lstm_widths": [],
         "rounds": 3, "steps": 10,
         "bases": ["SGD"], "out": None}


def main(argv: Sequence[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help=f"fewer cases and rounds, printed only unless --out: {QUICK}")
    p.add_argument("--widths", type=int, nargs="*", help=f"MLP hidden widths {FULL['widths']}")
    p.add_argument("--cnn-widths", type=int, nargs="*",
                   help=f"channels of the CNN's second convolution {FULL['cnn_widths']}")
    p.add_argument("--lstm-widths", type=int, nargs="*",
                   help=f"hidden units of the LSTM {FULL['lstm_widths']}")
    p.add_argument("--rounds", type=int, help=f"default {FULL['rounds']}")
    p.add_argument("--steps", type=int, help=f"steps per case per round, rounded up to whole "
                   f"windows (default {FULL['steps']})")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--bases", nargs="+", choices=tuple(BASES), help="default: all")
    p.add_argument("--variants", nargs="+", choices=tuple(VARIANTS), default=list(VARIANTS),
                   help="default: all (the references of their ratios are always measured)")
    p.add_argument("--no-memory", action="store_true", help="skip the profiler memory pass")
    p.add_argument("--keep-denormals", action="store_true",
                   help="do not flush denormal floats to zero while measuring")
    p.add_argument("--out", type=Path, help=f"markdown file to write (default {DEFAULT_OUT})")
    p.add_argument("--profile", nargs=3, metavar=("BASE", "VARIANT", "NET"),
                   help="instead of the table, profile one case, e.g. SGD 'implicit graph' 256 "
                   "(NET: an MLP width, cnnC for the CNN or lstmH for the LSTM)")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    # the graph style breaks the p -> p.grad -> graph cycle torch warns about
    warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
    if args.profile:
        base, variant, net = args.profile
        if base not in BASES or variant not in VARIANTS:
            p.error(f"--profile: base one of {list(BASES)}, variant one of {list(VARIANTS)}")
        try:
            net = Net.parse(net)
        except ValueError as e:
            p.error(f"--profile: {e}")
        print(profile_step(Case(base, variant, net), threads=args.threads))
        return []
    settings = {"rounds": args.rounds, "steps": args.steps, "warmup": args.warmup,
                "flush_denormal": not args.keep_denormals}
    info = machine_info(args.threads)       # before measuring: the commit that was imported
    results = measure(make_nets(args.widths, args.cnn_widths, args.lstm_widths), **settings, threads=args.threads,
                      bases=args.bases, variants=args.variants, memory=not args.no_memory)
    text = format_markdown(results, info, settings)
    print(text)
    if args.out is not None:
        write_section("overhead", text, args.out)
        print(f"written to section 'overhead' of {args.out}")
    return results


if __name__ == "__main__":
    main()
