"""What HyperOptimizer costs against the torch.optim optimizer it wraps: one full training step.

    python benchmarks/summary.py                       # writes benchmarks/RESULTS.md
    python benchmarks/summary.py --widths 256 --rounds 11 --out /tmp/r.md

A step is ``zero_grad(); loss = CE(mlp(x), y); loss.backward(); opt.step()`` for an MLP
784-H-10 (ReLU), batch 128, float32, on a few fixed random minibatches taken in turn: torch's
optimizer as it runs by default on CPU ("vanilla", the reference of every ratio), torch's
fused kernel ("vanilla fused", for context), and HyperOptimizer (greedy) around it.  Every
case of a width is built first (same initial weights), warmed up, and then measured in
``rounds`` round-robin passes of ``steps`` steps each, the order rotating every round, so that
drift in machine load hits every case alike.  Reported: the median over rounds of the mean
step time, and the median over rounds of the per-round ratio to the vanilla optimizer of the
same base and width (measured in the same round).

Memory (torch has no allocator statistics for CPU tensors, and tracemalloc does not see them):

* ``state``: bytes held by the optimizer between steps, the sum of the distinct tensors in
  ``opt.state`` (for HyperOptimizer including the method's buffers kept there) plus, for
  HyperOptimizer, its tuned values/raws/accumulators, the hyper-optimizer's state and the
  persistent per-parameter scratch buffers of its in-place steps;
* ``step peak``: the highest amount allocated during one step above what was held just
  before it, from ``torch.profiler`` memory events (``profile_memory=True``).

Denormal floats are flushed to zero (``torch.set_flush_denormal(True)``) while measuring, a
precaution: the cases' values differ by design (tuned learning rates), and on a few memorised
batches tiny numbers could otherwise make one case's arithmetic slower than another's.

The pytest-benchmark suite in ``test_overhead.py`` builds its cases with the same code.
``--profile BASE VARIANT WIDTH`` prints where one case's step time goes instead.
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from hyperopt_wrap import HyperOptimizer

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "RESULTS.md"
BATCH = 128
IN_FEATURES, CLASSES = 784, 10
# weight_decay > 0 everywhere: tuning it (log space) needs a positive start, and vanilla
# must do the same arithmetic as the wrapped optimizer to be a fair reference.
BASES: dict[str, tuple[type, dict]] = {
    "SGD": (torch.optim.SGD, {"lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4}),
    "Adam": (torch.optim.Adam, {"lr": 1e-3, "weight_decay": 5e-4}),
}
# Variants that are the plain torch optimizer: "vanilla" is torch's default on CPU (the
# per-tensor loop), the reference of every ratio; "vanilla fused" is torch's fused kernel.
TORCH_VARIANTS: dict[str, dict] = {"vanilla": {}, "vanilla fused": {"fused": True}}
VARIANTS: dict[str, dict | None] = {
    "vanilla": None,
    "vanilla fused": None,
    "greedy global lr": {"method": "greedy", "tune": ("lr",), "granularity": "global"},
    "greedy element lr": {"method": "greedy", "tune": ("lr",), "granularity": "element"},
    "greedy global lr+mom+wd": {"method": "greedy", "tune": ("lr", "momentum", "weight_decay"),
                                "granularity": "global"},
}


@dataclass(frozen=True)
class Case:
    base: str
    variant: str
    width: int

    @property
    def group(self) -> str:
        return f"{self.base} MLP {IN_FEATURES}-{self.width}-{CLASSES} batch {BATCH}"

    @property
    def id(self) -> str:
        return f"{self.base}-{self.variant.replace(' ', '_')}-h{self.width}"


@dataclass
class Built:
    case: Case
    model: nn.Module
    opt: torch.optim.Optimizer
    step: Callable[[], Tensor]


def make_model(width: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(IN_FEATURES, width), nn.ReLU(), nn.Linear(width, CLASSES))


def make_batches(n: int = 4, seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(BATCH, IN_FEATURES, generator=gen),
             torch.randint(0, CLASSES, (BATCH,), generator=gen)) for _ in range(n)]


def build_case(case: Case, seed: int = 0) -> Built:
    """Model, optimizer and a closure doing one full training step on the next minibatch."""
    model = make_model(case.width, seed)
    optimizer_cls, kwargs = BASES[case.base]
    hyper = VARIANTS[case.variant]
    if hyper is None:
        opt = optimizer_cls(model.parameters(), **kwargs, **TORCH_VARIANTS[case.variant])
    else:
        opt = HyperOptimizer(optimizer_cls, model.parameters(), **hyper, **kwargs)
    batches = itertools.cycle(make_batches(seed=seed))
    loss_fn = nn.CrossEntropyLoss()

    def step() -> Tensor:
        x, y = next(batches)
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        return loss

    return Built(case, model, opt, step)


def all_cases(widths: Sequence[int], bases: Sequence[str] = tuple(BASES),
              variants: Sequence[str] = tuple(VARIANTS)) -> list[Case]:
    return [Case(b, v, w) for w in widths for b in bases for v in variants]


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
        for tk in opt.tuned.values():
            tensors += tk.values + tk.raws + tk.accums + tk.last
        tensors += list(_tensors(list(opt.hyper_optimizer.state.values())))
        tensors += list(_tensors(list(opt._workspace.values())))   # persistent scratch buffers
    return _distinct_bytes(tensors)


def step_peak_bytes(step: Callable[[], Tensor]) -> int | None:
    """Peak bytes allocated during one step above what was held just before it (torch.profiler).

    Two steps are profiled and the second measured, so that every block it frees was
    allocated under the profiler.  None where the profiler gives no memory events.
    """
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
        with record_function("measured_step"):
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


def measure(widths: Sequence[int] = (64, 256, 1024), rounds: int = 11, steps: int = 20,
            warmup: int = 10, threads: int = 1, bases: Sequence[str] = tuple(BASES),
            variants: Sequence[str] = tuple(VARIANTS), memory: bool = True,
            flush_denormal: bool = True) -> list[dict]:
    """Interleaved timings (and memory) of every case; one dict per case."""
    if "vanilla" not in variants:
        raise ValueError("variants must include 'vanilla': ratios are taken against it")
    if rounds < 1 or steps < 1 or warmup < 0:
        raise ValueError(f"need rounds >= 1, steps >= 1, warmup >= 0; got {rounds}, {steps}, {warmup}")
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    torch.set_flush_denormal(flush_denormal)
    results = []
    try:
        for width in widths:
            built = [build_case(c) for c in all_cases([width], bases, variants)]
            for b in built:
                for _ in range(warmup):
                    b.step()
            times: dict[Case, list[float]] = {b.case: [] for b in built}
            faults: dict[Case, list[float]] = {b.case: [] for b in built}
            for r in range(rounds):
                k = r % len(built)
                for b in built[k:] + built[:k]:
                    faults_before = _minor_faults()
                    start = time.perf_counter()
                    for _ in range(steps):
                        b.step()
                    times[b.case].append((time.perf_counter() - start) / steps)
                    if faults_before is not None:
                        faults[b.case].append((_minor_faults() - faults_before) / steps)
            for b in built:
                vanilla = Case(b.case.base, "vanilla", width)
                ratios = [t / v for t, v in zip(times[b.case], times[vanilla])]
                loss = float(b.step().detach())
                rec = {"base": b.case.base, "variant": b.case.variant, "width": width,
                       "median_s": statistics.median(times[b.case]),
                       "ratio": statistics.median(ratios),
                       "ratio_of_medians": statistics.median(times[b.case])
                       / statistics.median(times[vanilla]),
                       "times_s": times[b.case],
                       "minor_faults": statistics.median(faults[b.case]) if faults[b.case]
                       else None,
                       "state_bytes": optimizer_state_bytes(b.opt),
                       "step_peak_bytes": step_peak_bytes(b.step) if memory else None,
                       "final_loss": loss,
                       "skipped_steps": b.opt.skipped_steps if isinstance(b.opt, HyperOptimizer)
                       else 0}
                results.append(rec)
    finally:
        torch.set_num_threads(saved_threads)
        torch.set_flush_denormal(False)     # torch's default; it has no getter
    return results


# ---------------------------------------------------------------------------- profile
def profile_step(case: Case, steps: int = 50, threads: int = 1, top: int = 25) -> str:
    """Where one step's time goes: torch.profiler, each top-level aten op charged to the
    innermost ``hyperopt_wrap`` function on its Python stack (function and its ``def`` line)."""
    from collections import Counter

    from torch.profiler import ProfilerActivity, profile

    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    try:
        built = build_case(case)
        for _ in range(20):
            built.step()
        config = torch._C._profiler._ExperimentalConfig(verbose=True)   # Python frames as events
        with profile(activities=[ProfilerActivity.CPU], with_stack=True,
                     experimental_config=config) as prof:
            for _ in range(steps):
                built.step()
    finally:
        torch.set_num_threads(saved_threads)
        torch.set_flush_denormal(False)
    events = prof.events()
    by_op, calls = Counter(), Counter()
    for e in events:
        if not e.name.startswith("aten::"):
            continue
        parent, where, in_step, top_level = e.cpu_parent, None, False, True
        while parent is not None:
            if parent.name.startswith("aten::"):
                top_level = False
                break
            if where is None and "hyperopt_wrap/" in parent.name:
                where = "hyperopt_wrap/" + parent.name.split("hyperopt_wrap/")[-1]
            in_step = in_step or parent.name.startswith("Optimizer.step#")
            parent = parent.cpu_parent
        if top_level:
            where = where or ("torch.optim" if in_step else "model forward/backward, zero_grad")
            by_op[(where, e.name)] += e.cpu_time_total
            calls[(where, e.name)] += 1
    step_us = sum(e.cpu_time_total for e in events if e.name.startswith("Optimizer.step#")) / steps
    model_us = sum(v for (w, _), v in by_op.items() if w.startswith("model")) / steps
    kernels_us = sum(v for (w, _), v in by_op.items() if not w.startswith("model")) / steps
    by_function = Counter()
    for (where, _), v in by_op.items():
        by_function[where] += v
    lines = [f"{case.id}: profiled {steps} steps, {threads} thread(s); times per step "
             "(profiler on: Python costs are inflated)",
             f"  model forward/backward/zero_grad ops: {model_us:8.0f} us",
             f"  opt.step total:                      {step_us:8.0f} us",
             f"    of which aten ops:                 {kernels_us:8.0f} us",
             f"    of which Python and dispatch:      {step_us - kernels_us:8.0f} us",
             "  aten time inside opt.step by function:"]
    lines += [f"    {v / steps:8.0f} us  {w}" for w, v in by_function.most_common()
              if not w.startswith("model")]
    lines.append(f"  top {top} (function :: op, calls per step):")
    inside = [(k, v) for k, v in by_op.most_common() if not k[0].startswith("model")]
    lines += [f"    {v / steps:8.0f} us {calls[k] / steps:5.1f}x  {k[0]} :: {k[1]}"
              for k, v in inside[:top]]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- report
def machine_info(threads: int) -> dict[str, str]:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            cpu = names[0]
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=HERE,
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "cpu": cpu, "cores": f"{os.cpu_count()} logical ({usable} usable)",
            "torch": torch.__version__, "threads": str(threads),
            "python": platform.python_version(), "commit": commit or "unknown"}


def _bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def format_markdown(results: list[dict], info: dict[str, str], settings: dict) -> str:
    vanilla = {(r["base"], r["width"]): r for r in results if r["variant"] == "vanilla"}
    lines = ["# HyperOptimizer overhead: one training step", "",
             f"Generated by `python benchmarks/summary.py` on {info['date']}.", "",
             f"- CPU: {info['cpu']}; cores: {info['cores']}; torch.set_num_threads({info['threads']})",
             f"- torch {info['torch']}, Python {info['python']}, hyperopt_wrap at `{info['commit']}`",
             f"- step: zero_grad, forward, backward, opt.step; MLP 784-H-10 (ReLU), batch {BATCH}, "
             f"float32; {settings['rounds']} interleaved rounds x {settings['steps']} steps after "
             f"{settings['warmup']} warm-up steps; denormals "
             f"{'flushed to zero' if settings.get('flush_denormal', True) else 'kept'}",
             "- ratio: median over rounds of (case step time / vanilla step time in the same round); "
             "ratio of medians: median step time / vanilla's median step time (the two differ "
             "when machine load drifts)",
             "- state: bytes the optimizer holds between steps (distinct tensors in opt.state, plus "
             "HyperOptimizer's tuned values, raws, accumulators, hyper-optimizer state and scratch "
             "buffers); "
             "step peak: highest bytes allocated during a step above those held before it "
             "(torch.profiler memory events)",
             "- base settings: " + "; ".join(f"{k} {v[1]}" for k, v in BASES.items()),
             "- faults/step: median minor page faults per step (fresh memory the allocator got "
             "from the OS and the kernel had to zero; torch's default CPU Adam allocates "
             "parameter-sized temporaries every step, and how often that faults depends on the "
             "heap's state, so its step time, and every ratio to it, varies between runs)",
             "",
             "| width | base | variant | median ms/step | ratio to vanilla | ratio of medians | "
             "state | extra state | step peak | faults/step |",
             "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        v = vanilla[(r["base"], r["width"])]
        lines.append(f"| {r['width']} | {r['base']} | {r['variant']} | {1e3 * r['median_s']:.3f} | "
                     f"{r['ratio']:.2f}x | {r['ratio_of_medians']:.2f}x | {_bytes(r['state_bytes'])} | "
                     f"{_bytes(r['state_bytes'] - v['state_bytes'])} | "
                     f"{_bytes(r['step_peak_bytes'])} | "
                     f"{'n/a' if r['minor_faults'] is None else format(r['minor_faults'], '.0f')} |")
    widths = sorted({r["width"] for r in results})
    variants = [v for v in VARIANTS if v != "vanilla" and any(r["variant"] == v for r in results)]
    bases = [b for b in BASES if any(r["base"] == b for r in results)]
    lines += ["", "## Ratio to vanilla by width", "",
              "| base | variant | " + " | ".join(f"H={w}" for w in widths) + " |",
              "|---|---|" + "---:|" * len(widths)]
    for b in bases:
        for var in variants:
            cells = [next((f"{r['ratio']:.2f}x" for r in results if (r["base"], r["variant"],
                                                                        r["width"]) == (b, var, w)),
                          "") for w in widths]
            lines.append(f"| {b} | {var} | " + " | ".join(cells) + " |")
    glob = [r for r in results if r["variant"] == "greedy global lr"]
    if glob:
        worst = max(glob, key=lambda r: r["ratio"])
        met = all(r["ratio"] <= 1.10 for r in glob)
        lines += ["", f"Target greedy (global lr) <= 1.10x vanilla: {'met' if met else 'NOT met'} "
                  f"(worst {worst['ratio']:.2f}x: {worst['base']}, H={worst['width']})."]
        fused = {(r["base"], r["width"]): r for r in results if r["variant"] == "vanilla fused"}
        against = [f"{r['base']} H={r['width']}: "
                   f"{r['median_s'] / fused[(r['base'], r['width'])]['median_s']:.2f}x"
                   for r in glob if (r["base"], r["width"]) in fused]
        if against:
            lines += ["", "Greedy (global lr) against torch's fused kernel (ratio of medians): "
                      + ", ".join(against) + "."]
    skipped = [r for r in results if r["skipped_steps"]]
    if skipped:
        lines += ["", "Note: some HyperOptimizer cases skipped non-finite steps: "
                  + ", ".join(f"{r['base']} {r['variant']} H={r['width']}: {r['skipped_steps']}"
                              for r in skipped)]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--widths", type=int, nargs="+", default=[64, 256, 1024])
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--steps", type=int, default=20, help="steps per case per round")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--bases", nargs="+", choices=tuple(BASES), default=list(BASES))
    p.add_argument("--no-memory", action="store_true", help="skip the profiler memory pass")
    p.add_argument("--keep-denormals", action="store_true",
                   help="do not flush denormal floats to zero while measuring")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="markdown file to write")
    p.add_argument("--profile", nargs=3, metavar=("BASE", "VARIANT", "WIDTH"),
                   help="instead of the table, profile one case, e.g. SGD 'greedy global lr' 256")
    args = p.parse_args(argv)
    if args.profile:
        base, variant, width = args.profile
        if base not in BASES or variant not in VARIANTS:
            p.error(f"--profile: base one of {list(BASES)}, variant one of {list(VARIANTS)}")
        print(profile_step(Case(base, variant, int(width)), threads=args.threads))
        return []
    settings = {"rounds": args.rounds, "steps": args.steps, "warmup": args.warmup,
                "flush_denormal": not args.keep_denormals}
    info = machine_info(args.threads)       # before measuring: the commit that was imported
    results = measure(args.widths, args.rounds, args.steps, args.warmup, args.threads,
                      bases=args.bases, memory=not args.no_memory,
                      flush_denormal=not args.keep_denormals)
    text = format_markdown(results, info, settings)
    args.out.write_text(text)
    print(text)
    print(f"written to {args.out}")
    return results


if __name__ == "__main__":
    main()
