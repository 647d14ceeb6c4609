"""What HyperOptimizer costs against the torch.optim optimizer it wraps: one full training step.

    python benchmarks/summary.py                       # writes benchmarks/RESULTS.md
    python benchmarks/summary.py --quick               # a look in under a minute, printed only
    python benchmarks/summary.py --widths 256 --cnn-widths 16 --lstm-widths 64 --out /tmp/r.md
    python benchmarks/summary.py --widths --cnn-widths --lstm-widths --many-tensors 200 \
        --gpt-widths 256 --out /tmp/r.md                 # only the chain and the transformer
    python benchmarks/summary.py --profile SGD "implicit graph tensor lr" 256   # where time goes

A step is ``zero_grad(); loss = CE(net(x), y); loss.backward(); opt.step()`` on a few fixed
random minibatches taken in turn, for an MLP 784-H-10 (ReLU, batch 128), a small CNN (1x28x28
inputs, 3x3 convolutions 1 -> C/2 -> C channels without padding, ReLU, linear to 10 classes;
batch 64), a character-level LSTM language model (embedding 64x16, one LSTM layer of H
units, linear to 64 classes, sequences of 32, batch 32), a chain of N bias-free 16x16 linear
layers with tanh (batch 16, 16 classes: many small tensors, little arithmetic, the optimizer's
per-tensor fixed cost) and a GPT-style transformer language model (4 pre-LN blocks of width W,
4 heads of causal self-attention written out with matmuls, mask and softmax so that it has a
double backward, MLP 4W with GELU; vocabulary 256, sequences of 64, batch 2, random tokens),
float32: torch's optimizer as it runs by default on CPU ("vanilla", the reference of most
ratios), torch's fused kernel ("vanilla fused", for context), and HyperOptimizer around it:
greedy (global, per-tensor and per-element lr; lr, momentum and weight decay), the
second-order methods implicit (T=10, i=5) and unroll (K=5, T=10) with either curvature source,
at per-tensor and per-element lr, and RTRL (forward sensitivities of lr, momentum and weight
decay, global, a hyper-step every 10 steps; three Hessian-vector products every step).  Not
every network gets every variant: ``KIND_VARIANTS`` says which (the transformer, whose step is
the dearest, gets greedy and implicit from the closure; RTRL runs on the MLP up to width 256);
``--variants`` measures the named ones on every network.  Methods needing curvature take their
step in one of two styles:

* ``graph``: ``loss.backward(create_graph=opt.needs_graph); opt.step()``, measured against
  vanilla's plain step;
* ``closure``: ``opt.step(closure)``, the closure doing zero_grad, forward and backward (the
  methods' finite-difference Hessian-vector products re-call it), measured against
  "vanilla closure", torch's optimizer stepped with the same closure.

Every case of a network is built first (same initial weights), warmed up, and then measured
in ``rounds`` round-robin passes of ``steps`` steps each (the transformer at most 10), the
order rotating every round, so that drift in machine load hits every case alike.  A case's
steps per round are rounded up to whole windows of its ``update_every`` (implicit, unroll and
RTRL: 10), since a second-order method's cost lands at the end of each window.  Reported: the
median over rounds of the mean step time, and the median over rounds of the per-round ratio to
the case's reference (measured in the same round).

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

from hyperopt_wrap import HyperOptimizer
from hyperopt_wrap.methods import RTRL, SGLD, Distill, ForwardGradient, Implicit, Unroll

from report import RESULTS as DEFAULT_OUT, machine_info, machine_lines, write_section

HERE = Path(__file__).resolve().parent
IN_FEATURES, CLASSES = 784, 10
IMAGE = (1, 28, 28)
VOCAB, EMBED, SEQ = 64, 16, 32           # the LSTM: characters in, next character out
MANY_SIZE = 16              # "many": a chain of W bias-free Linear(16, 16), tanh, 16 classes
# "gpt": a pre-LN transformer language model of width W on random tokens.  Batch 8 made one
# plain step about 100 ms on one thread of a 2-core machine, too slow for a full run to stay
# near 10 minutes; batch 2 (128 tokens a step) costs about 30 ms.
GPT_VOCAB, GPT_LAYERS, GPT_HEADS, GPT_SEQ = 256, 4, 4, 64
BATCHES = {"mlp": 128, "cnn": 64, "lstm": 32, "many": 16, "gpt": 2}
# Steps per case and round at most, before rounding up to whole windows (default: --steps):
# ten transformer steps already take a good part of a second.
MAX_STEPS = {"gpt": 10}
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
ALL_KINDS = {"tune": ("lr", "momentum", "weight_decay"), "granularity": "global"}
GREEDY = {"method": "greedy"}
IMPLICIT = {"method": Implicit(neumann_terms=5), "update_every": 10}
UNROLL = {"method": Unroll(horizon=5), "update_every": 10}
RTRL_ = {"method": RTRL(), "update_every": 10}     # forward sensitivities, one HVP per tangent
FORWARD_GRADIENT = {"method": ForwardGradient(directions=2), "update_every": 10}
DISTILL = {"method": Distill(), "update_every": 10}
SGLD_ = {"method": SGLD(), "update_every": 10}     # first-order default: no curvature


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
    "greedy global lr": Variant({**GREEDY, **GLOBAL_LR}, target=1.15),
    "greedy tensor lr": Variant({**GREEDY, **TENSOR_LR}, target=1.10),
    "greedy element lr": Variant({**GREEDY, **ELEMENT_LR}, target=1.10),
    "greedy global lr+mom+wd": Variant({**GREEDY, **GLOBAL_LR,
                                        "tune": ("lr", "momentum", "weight_decay")}),
    "vanilla closure": Variant(step="closure"),
    **_second_order("implicit", IMPLICIT, 1.5),
    **_second_order("unroll", UNROLL, 2.0),
    # RTRL carries three tangents (lr, momentum, weight decay) through every step: three
    # Hessian-vector products a step, from the graph (needs_graph is True on every step) or
    # the closure (three more gradients)
    "rtrl graph global lr+mom+wd": Variant({**RTRL_, **ALL_KINDS, "curvature": "graph"},
                                           step="graph"),
    "rtrl closure global lr+mom+wd": Variant({**RTRL_, **ALL_KINDS, "curvature": "closure"},
                                             step="closure", reference="vanilla closure"),
    # (FG)^2U with two directions: two Hessian-vector products a step, per-element lr (its
    # point: the cost does not grow with the number of tuned values)
    "forward_gradient closure element lr": Variant(
        {**FORWARD_GRADIENT, **ELEMENT_LR, "curvature": "closure"}, step="closure",
        reference="vanilla closure", target=3.3),
    # HyperDistill: one more gradient a step, at the distilled weights, through the closure
    "distill closure global lr": Variant({**DISTILL, **GLOBAL_LR, "curvature": "closure"},
                                         step="closure", reference="vanilla closure",
                                         target=1.35),
    # SGLD at its defaults: the Hessian-free recurrence, noise on the weights every step
    "sgld global lr+mom+wd": Variant({**SGLD_, **ALL_KINDS}),
}
RTRL_VARIANTS = tuple(v for v in VARIANTS if v.startswith("rtrl "))
# The variants each kind of network is measured with by default (``--variants`` names others,
# measured on every network): everything on the MLP, RTRL only there and only up to width
# RTRL_MAX_WIDTH (at 1024 one of its steps costs 15-25x vanilla's, 100 ms or more); the
# 200-tensor chain greedy and implicit (their per-tensor fixed costs); the transformer, the
# costliest step, greedy and implicit from the closure (a double backward through it is dearer).
KIND_VARIANTS: dict[str, tuple[str, ...]] = {
    "mlp": tuple(VARIANTS),
    "cnn": tuple(v for v in VARIANTS if v not in RTRL_VARIANTS),
    "lstm": tuple(v for v in VARIANTS if v not in RTRL_VARIANTS),
    "many": ("vanilla", "vanilla fused", "greedy global lr", "greedy tensor lr",
             "vanilla closure", "implicit closure tensor lr"),
    "gpt": ("vanilla", "greedy global lr", "vanilla closure", "implicit closure tensor lr",
            "forward_gradient closure element lr", "distill closure global lr",
            "sgld global lr+mom+wd"),
}
RTRL_MAX_WIDTH = 256


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


class Chain(nn.Module):
    """``n`` bias-free ``Linear(16, 16)``, each followed by tanh: many small parameter tensors
    and almost no arithmetic (the optimizer's per-tensor fixed cost).  Orthogonal weights keep
    the signal alive through the whole depth, and tanh keeps it bounded as training moves
    them."""

    def __init__(self, n: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(MANY_SIZE, MANY_SIZE, bias=False)
                                    for _ in range(n))
        for layer in self.layers:
            nn.init.orthogonal_(layer.weight)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


class Block(nn.Module):
    """Pre-LN transformer block: causal multi-head self-attention written out with matmuls, a
    mask and softmax (``F.scaled_dot_product_attention`` has no double backward, which the
    graph curvature source needs), then an MLP of 4x width with GELU."""

    def __init__(self, width: int, heads: int, seq: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.fc, self.fc2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)
        self.register_buffer("mask", torch.full((seq, seq), float("-inf")).triu(1),
                             persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads) \
            .permute(2, 0, 3, 1, 4)                     # each (batch, heads, seq, head width)
        att = torch.softmax(q @ k.transpose(-2, -1) * (d // self.heads) ** -0.5
                            + self.mask[:t, :t], dim=-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(nn.functional.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """Token embedding + learned positions, pre-LN blocks, final LayerNorm, untied linear head:
    next-token logits, flattened over the sequence."""

    def __init__(self, width: int):
        super().__init__()
        self.tokens = nn.Embedding(GPT_VOCAB, width)
        self.positions = nn.Parameter(0.02 * torch.randn(GPT_SEQ, width))
        self.blocks = nn.ModuleList(Block(width, GPT_HEADS, GPT_SEQ) for _ in range(GPT_LAYERS))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, GPT_VOCAB, bias=False)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.tokens(tokens) + self.positions[:tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x)).reshape(-1, GPT_VOCAB)


@dataclass(frozen=True)
class Net:
    """A network and its minibatches."""
    kind: str       # "mlp", "cnn", "lstm", "many" or "gpt"
    width: int      # MLP: hidden units; CNN: channels of the second convolution (first: half);
    #                 LSTM: hidden units; many: number of 16x16 tensors; GPT: model width

    def __post_init__(self):
        least = {"cnn": 2, "gpt": GPT_HEADS}.get(self.kind, 1)
        if (self.kind not in BATCHES or self.width < least
                or (self.kind == "gpt" and self.width % GPT_HEADS)):
            raise ValueError(f"no network {self.kind!r} of width {self.width}"
                             + (f" (gpt: a multiple of {GPT_HEADS} heads)"
                                if self.kind == "gpt" else ""))

    @property
    def batch(self) -> int:
        return BATCHES[self.kind]

    @property
    def label(self) -> str:
        if self.kind == "mlp":
            return f"MLP {IN_FEATURES}-{self.width}-{CLASSES}"
        if self.kind == "lstm":
            return f"LSTM {VOCAB}-{EMBED}-{self.width}-{VOCAB}"
        if self.kind == "many":
            return f"{self.width}x Linear {MANY_SIZE}x{MANY_SIZE}"
        if self.kind == "gpt":
            return f"GPT {GPT_LAYERS}x{self.width} seq {GPT_SEQ}"
        return f"CNN {IMAGE[0]}-{self.width // 2}-{self.width}"

    @property
    def id(self) -> str:
        return f"h{self.width}" if self.kind == "mlp" else f"{self.kind}{self.width}"

    @classmethod
    def parse(cls, text: str) -> "Net":
        """``"256"``, ``"h256"`` or ``"mlp256"``: the MLP of that width; ``"cnn16"``: the CNN;
        ``"lstm64"``: the LSTM; ``"many200"``: the chain of 200 16x16 tensors; ``"gpt256"``:
        the transformer of width 256."""
        for prefix, kind in (("cnn", "cnn"), ("lstm", "lstm"), ("many", "many"), ("gpt", "gpt"),
                             ("mlp", "mlp"), ("h", "mlp"), ("", "mlp")):
            if text.startswith(prefix) and text[len(prefix):].isdigit():
                return cls(kind, int(text[len(prefix):]))
        raise ValueError(f"unknown network {text!r}: e.g. 256 (MLP 784-256-10), cnn16, lstm64, "
                         "many200 or gpt256")

    def model(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        if self.kind == "mlp":
            return nn.Sequential(nn.Linear(IN_FEATURES, self.width), nn.ReLU(),
                                 nn.Linear(self.width, CLASSES))
        if self.kind == "lstm":
            return CharLSTM(self.width)
        if self.kind == "many":
            return Chain(self.width)
        if self.kind == "gpt":
            return GPT(self.width)
        c, (_, h, w) = self.width, IMAGE
        return nn.Sequential(nn.Conv2d(IMAGE[0], c // 2, 3), nn.ReLU(), nn.Conv2d(c // 2, c, 3),
                             nn.ReLU(), nn.Flatten(), nn.Linear(c * (h - 4) * (w - 4), CLASSES))

    def batches(self, n: int = 4, seed: int = 0) -> list[tuple[Tensor, Tensor]]:
        """``n`` minibatches (inputs, targets); the language models' are random token
        sequences and the same sequences shifted by one (flattened, as the models' logits
        are)."""
        gen = torch.Generator().manual_seed(seed)
        if self.kind in ("lstm", "gpt"):
            vocab, seq = (VOCAB, SEQ) if self.kind == "lstm" else (GPT_VOCAB, GPT_SEQ)
            tokens = [torch.randint(0, vocab, (self.batch, seq + 1), generator=gen)
                      for _ in range(n)]
            return [(t[:, :-1], t[:, 1:].reshape(-1)) for t in tokens]
        shape, classes = {"mlp": ((IN_FEATURES,), CLASSES), "cnn": (IMAGE, CLASSES),
                          "many": ((MANY_SIZE,), MANY_SIZE)}[self.kind]
        return [(torch.randn(self.batch, *shape, generator=gen),
                 torch.randint(0, classes, (self.batch,), generator=gen)) for _ in range(n)]


def make_nets(widths: Sequence[int] = (), cnn_widths: Sequence[int] = (),
              lstm_widths: Sequence[int] = (), many_tensors: Sequence[int] = (),
              gpt_widths: Sequence[int] = ()) -> list[Net]:
    return ([Net("mlp", w) for w in widths] + [Net("cnn", c) for c in cnn_widths]
            + [Net("lstm", h) for h in lstm_widths] + [Net("many", n) for n in many_tensors]
            + [Net("gpt", w) for w in gpt_widths])


DEFAULT_WIDTHS, DEFAULT_CNN_WIDTHS, DEFAULT_LSTM_WIDTHS = (64, 256, 1024), (16,), (64,)
DEFAULT_MANY_TENSORS, DEFAULT_GPT_WIDTHS = (200,), (256,)
DEFAULT_NETS = make_nets(DEFAULT_WIDTHS, DEFAULT_CNN_WIDTHS, DEFAULT_LSTM_WIDTHS,
                         DEFAULT_MANY_TENSORS, DEFAULT_GPT_WIDTHS)


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


def default_variants(net: Net) -> tuple[str, ...]:
    """The variants ``net`` is measured with when none are named (``KIND_VARIANTS``)."""
    if net.kind == "mlp" and net.width > RTRL_MAX_WIDTH:
        return tuple(v for v in KIND_VARIANTS["mlp"] if v not in RTRL_VARIANTS)
    return KIND_VARIANTS[net.kind]


def all_cases(nets: Sequence[Net], bases: Sequence[str] = tuple(BASES),
              variants: Sequence[str] | None = None) -> list[Case]:
    """Every base x variant on every network, references included; ``variants`` None: each
    network's defaults (``default_variants``), else those on every network."""
    return [Case(b, v, n) for n in nets for b in bases
            for v in with_references(default_variants(n) if variants is None else variants)]


# ---------------------------------------------------------------------------- memory
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
    tensors = [t for st in opt.state.values() for t in st.values() if isinstance(t, Tensor)]
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
            variants: Sequence[str] | None = None, memory: bool = True,
            flush_denormal: bool = True) -> list[dict]:
    """Interleaved timings (and memory) of every case and of its reference; one dict per case.
    ``variants`` None: each network's defaults (``default_variants``).

    Each case runs ``steps`` steps per round (at most ``MAX_STEPS`` of its kind of network),
    rounded up to whole windows."""
    if rounds < 1 or steps < 1 or warmup < 0:
        raise ValueError(f"need rounds >= 1, steps >= 1, warmup >= 0; got {rounds}, {steps}, {warmup}")
    results = []
    with measuring(threads, flush_denormal):
        for net in nets:
            built = [build_case(c) for c in all_cases([net], bases, variants)]
            if not built:
                continue
            for b in built:
                for _ in range(warmup):
                    b.step()
            times: dict[Case, list[float]] = {b.case: [] for b in built}
            faults: dict[Case, list[float]] = {b.case: [] for b in built}
            net_steps = min(steps, MAX_STEPS.get(net.kind, steps))
            for r in range(rounds):
                k = r % len(built)
                for b in built[k:] + built[:k]:
                    n = b.whole_windows(net_steps)
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
             f"N x Linear {MANY_SIZE}x{MANY_SIZE}, a chain of N bias-free {MANY_SIZE}x"
             f"{MANY_SIZE} linear layers (orthogonal init) each followed by tanh, "
             f"cross-entropy to {MANY_SIZE} random classes, batch {BATCHES['many']} (the "
             "per-tensor fixed cost of the optimizer); GPT LxW, a pre-LN transformer language "
             f"model (token embedding {GPT_VOCAB}xW + learned positions, L = {GPT_LAYERS} blocks "
             f"of {GPT_HEADS}-head causal self-attention written out with matmuls, causal mask "
             "and softmax, and an MLP of 4W with GELU; final LayerNorm, untied linear head), "
             f"next-token cross-entropy on random tokens, sequences of {GPT_SEQ}, batch "
             f"{BATCHES['gpt']}; "
             f"{settings['rounds']} interleaved rounds x "
             f"{settings['steps']} steps"
             + "".join(f" ({kind}: at most {n})" for kind, n in MAX_STEPS.items())
             + " (rounded up to whole windows of the case's update_every) "
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
             "- rows per network, unless --variants names them: MLP every variant (RTRL up to "
             f"width {RTRL_MAX_WIDTH}); CNN and LSTM every one but RTRL; "
             + "; ".join(f"{kind} {', '.join(KIND_VARIANTS[kind])}" for kind in ("many", "gpt")),
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
        "lstm_widths": list(DEFAULT_LSTM_WIDTHS), "many_tensors": list(DEFAULT_MANY_TENSORS),
        "gpt_widths": list(DEFAULT_GPT_WIDTHS), "rounds": 11,
        "steps": 20, "bases": list(BASES), "out": DEFAULT_OUT}
QUICK = {"widths": [256], "cnn_widths": list(DEFAULT_CNN_WIDTHS), "lstm_widths": [],
         "many_tensors": list(DEFAULT_MANY_TENSORS), "gpt_widths": [], "rounds": 3, "steps": 10,
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
    p.add_argument("--many-tensors", type=int, nargs="*",
                   help=f"16x16 tensors of the Linear chain {FULL['many_tensors']}")
    p.add_argument("--gpt-widths", type=int, nargs="*",
                   help=f"model widths of the transformer, multiples of {GPT_HEADS} "
                   f"{FULL['gpt_widths']}")
    p.add_argument("--rounds", type=int, help=f"default {FULL['rounds']}")
    p.add_argument("--steps", type=int, help=f"steps per case per round, rounded up to whole "
                   f"windows (default {FULL['steps']})")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--bases", nargs="+", choices=tuple(BASES), help="default: all")
    p.add_argument("--variants", nargs="+", choices=tuple(VARIANTS),
                   help="measured on every network (default: each kind of network's own rows, "
                   "see KIND_VARIANTS; the references of their ratios are always measured)")
    p.add_argument("--no-memory", action="store_true", help="skip the profiler memory pass")
    p.add_argument("--keep-denormals", action="store_true",
                   help="do not flush denormal floats to zero while measuring")
    p.add_argument("--out", type=Path, help=f"markdown file to write (default {DEFAULT_OUT})")
    p.add_argument("--profile", nargs=3, metavar=("BASE", "VARIANT", "NET"),
                   help="instead of the table, profile one case, e.g. SGD 'implicit graph "
                   "tensor lr' 256 "
                   "(NET: an MLP width, cnnC for the CNN, lstmH for the LSTM, manyN for the "
                   "chain of N 16x16 tensors or gptW for the transformer)")
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
    try:
        nets = make_nets(args.widths, args.cnn_widths, args.lstm_widths, args.many_tensors,
                         args.gpt_widths)
    except ValueError as e:
        p.error(str(e))
    results = measure(nets, **settings, threads=args.threads, bases=args.bases,
                      variants=args.variants, memory=not args.no_memory)
    text = format_markdown(results, info, settings)
    print(text)
    if args.out is not None:
        write_section("overhead", text, args.out)
        print(f"written to section 'overhead' of {args.out}")
    return results


if __name__ == "__main__":
    main()
