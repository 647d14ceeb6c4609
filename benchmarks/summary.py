"""What HyperOptimizer costs against the torch.optim optimizer it wraps: one full training step.

    python -m benchmarks.summary                       # writes benchmarks/RESULTS.md
    python -m benchmarks.summary --quick               # a look in under a minute, printed only
    python -m benchmarks.summary --widths 256 --cnn-widths 16 --lstm-widths 64 --out /tmp/r.md
    python -m benchmarks.summary --widths --cnn-widths --lstm-widths --many-tensors 200 \
        --gpt-widths 256 --out /tmp/r.md                 # only the chain and the transformer
    python -m benchmarks.summary --profile SGD "implicit graph tensor lr" 256   # where time goes

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
import copy
import itertools
import statistics
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import torch

from hyperopt_wrap import RTRL, SGLD, Distill, ForwardGradient, HyperOptimizer, Implicit, Unroll

from .memory import optimizer_state_bytes, param_bytes, step_peak_bytes
from .models import (BATCHES, EMBED, GPT_HEADS, GPT_LAYERS, GPT_SEQ, GPT_VOCAB, MANY_SIZE, SEQ,
                     VOCAB, Net, make_nets)
from .profiling import charged_table, profiled
from .report import RESULTS as DEFAULT_OUT, format_bytes, grid, machine_info, machine_lines, \
    write_section
from .timing import Built, Case, check_protocol, compiled_step, interleaved, measuring, \
    median_ratio, training_step, warm_up

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
    compiled: bool = False          # opt.step() under torch.compile (``timing.compiled_step``)

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
    "vanilla compiled": Variant(compiled=True),
    "greedy global lr": Variant({**GREEDY, **GLOBAL_LR}, target=1.15),
    "greedy tensor lr": Variant({**GREEDY, **TENSOR_LR}, target=1.10),
    "greedy element lr": Variant({**GREEDY, **ELEMENT_LR}, target=1.10),
    "greedy global lr compiled": Variant({**GREEDY, **GLOBAL_LR}, compiled=True),
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
    # HyperDistill: one more gradient a window (at its last step), at the distilled weights,
    # through the closure; the distilled point moves every step
    "distill closure global lr": Variant({**DISTILL, **GLOBAL_LR, "curvature": "closure"},
                                         step="closure", reference="vanilla closure",
                                         target=1.35),
    # SGLD at its defaults: the Hessian-free recurrence, noise on the weights every step
    "sgld global lr+mom+wd": Variant({**SGLD_, **ALL_KINDS}),
}
RTRL_VARIANTS = tuple(v for v in VARIANTS if v.startswith("rtrl "))
# compiling a step costs tens of seconds: measured only when named (``--variants``, and
# ``test_compiled_overhead.py``)
COMPILED_VARIANTS = tuple(v for v, variant in VARIANTS.items() if variant.compiled)
# The variants each kind of network is measured with by default (``--variants`` names others,
# measured on every network): everything on the MLP, RTRL only there and only up to width
# RTRL_MAX_WIDTH (at 1024 one of its steps costs 15-25x vanilla's, 100 ms or more); the
# 200-tensor chain greedy and implicit (their per-tensor fixed costs); the transformer, the
# costliest step, greedy and implicit from the closure (a double backward through it is dearer).
KIND_VARIANTS: dict[str, tuple[str, ...]] = {
    "mlp": tuple(v for v in VARIANTS if v not in COMPILED_VARIANTS),
    "cnn": tuple(v for v in VARIANTS if v not in RTRL_VARIANTS + COMPILED_VARIANTS),
    "lstm": tuple(v for v in VARIANTS if v not in RTRL_VARIANTS + COMPILED_VARIANTS),
    "many": ("vanilla", "vanilla fused", "greedy global lr", "greedy tensor lr",
             "vanilla closure", "implicit closure tensor lr"),
    "gpt": ("vanilla", "greedy global lr", "vanilla closure", "implicit closure tensor lr",
            "forward_gradient closure element lr", "distill closure global lr",
            "sgld global lr+mom+wd"),
}
RTRL_MAX_WIDTH = 256


def reference(case: Case) -> Case:
    """The case whose step times ``case``'s ratios are taken against (same base and network)."""
    return replace(case, variant=VARIANTS[case.variant].reference)


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
    # torch's own step breaks the graph (its no_grad wrapper does, on purpose), ours is one
    opt_step = compiled_step(opt, fullgraph=variant.hyper is not None) if variant.compiled \
        else None
    step = training_step(opt, model, itertools.cycle(case.net.batches(seed=seed)), variant.step,
                         opt_step=opt_step)
    # steps per window: the cost of a HyperOptimizer step is spread over a whole one
    window = opt.update_every if isinstance(opt, HyperOptimizer) else 1
    return Built(case, step, window, model, opt)


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


DEFAULT_WIDTHS, DEFAULT_CNN_WIDTHS, DEFAULT_LSTM_WIDTHS = (64, 256, 1024), (16,), (64,)
DEFAULT_MANY_TENSORS, DEFAULT_GPT_WIDTHS = (200,), (256,)
DEFAULT_NETS = make_nets(DEFAULT_WIDTHS, DEFAULT_CNN_WIDTHS, DEFAULT_LSTM_WIDTHS,
                         DEFAULT_MANY_TENSORS, DEFAULT_GPT_WIDTHS)


# ---------------------------------------------------------------------------- measure
def measure(nets: Sequence[Net] = DEFAULT_NETS, rounds: int = 11, steps: int = 20,
            warmup: int = 10, threads: int = 1, bases: Sequence[str] = tuple(BASES),
            variants: Sequence[str] | None = None, memory: bool = True,
            flush_denormal: bool = True) -> list[dict]:
    """Interleaved timings (and memory) of every case and of its reference; one dict per case.
    ``variants`` None: each network's defaults (``default_variants``).

    Each case runs ``steps`` steps per round (at most ``MAX_STEPS`` of its kind of network),
    rounded up to whole windows."""
    check_protocol(rounds, steps, warmup)
    results = []
    with measuring(threads, flush_denormal):
        for net in nets:
            built = [build_case(c) for c in all_cases([net], bases, variants)]
            if not built:
                continue
            warm_up(built, warmup)
            times, faults = interleaved(built, rounds, min(steps, MAX_STEPS.get(net.kind, steps)),
                                        faults=True)
            for b in built:
                ref = reference(b.case)
                loss = float(b.step().detach())
                b.settle()
                rec = {"base": b.case.base, "variant": b.case.variant, "net": net.label,
                       "reference": ref.variant,
                       "median_s": statistics.median(times[b.case]),
                       "ratio": median_ratio(times[b.case], times[ref]),
                       "ratio_of_medians": statistics.median(times[b.case])
                       / statistics.median(times[ref]),
                       "times_s": times[b.case],
                       "minor_faults": statistics.median(faults[b.case]) if faults[b.case]
                       else None,
                       "state_bytes": optimizer_state_bytes(b.opt),
                       "param_bytes": param_bytes(b.model),
                       "step_peak_bytes": step_peak_bytes(b.step, b.window) if memory else None,
                       "final_loss": loss,
                       "skipped_steps": b.opt.skipped_steps if isinstance(b.opt, HyperOptimizer)
                       else 0}
                results.append(rec)
    return results


def profile_step(case: Case, steps: int = 50, threads: int = 1, top: int = 25) -> str:
    """Where one step's time goes: torch.profiler, each top-level aten op charged to the
    innermost ``hyperopt_wrap`` function on its Python stack (function and its ``def`` line),
    over whole windows of at least ``steps`` steps."""
    prof, steps = profiled(lambda: build_case(case), steps, warmup=20, threads=threads,
                           with_stack=True)
    return charged_table(prof, steps, case.id, threads, top)


# ---------------------------------------------------------------------------- report
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
             f"Generated by `python -m benchmarks.summary` on {info['date']}.", "",
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

    def by_network(cell) -> list[str]:
        """A row per base and variant (references left out), a column per network."""
        return grid(["base", "variant", "against"], nets,
                    (([b, var, VARIANTS[var].reference],
                      [cell(by_key[k]) if (k := (b, var, n)) in by_key else "" for n in nets])
                     for b in bases for var in variants if var != VARIANTS[var].reference))

    lines += ["", "### Ratio to the reference by network", ""]
    lines += by_network(lambda r: f"{r['ratio']:.2f}x")
    if any(r["step_peak_bytes"] is not None for r in results):
        lines += ["", "### Peak memory ratio to the reference by network", ""]
        lines += by_network(lambda r: _peak_ratio(r, ref(r)))
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
    p = argparse.ArgumentParser(prog="python -m benchmarks.summary",
                                description=__doc__.split("\n")[0])
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
