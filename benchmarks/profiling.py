"""Where one case's step time goes (``--profile`` of ``summary`` and ``peers``): the case is
built, warmed up and run under ``torch.profiler`` for whole windows of steps; then either each
top-level aten op is charged to the innermost ``hyperopt_wrap`` function on its Python stack
(``charged_table``) or torch's own table of ops and calls is printed (``ops_table``).
"""
from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path
from typing import Callable

import torch

from . import timing
from .timing import Built, measuring

MODEL_OPS = "model forward/backward, zero_grad"
# the file whose ``closure`` the "closure" step style passes to opt.step
_CLOSURE_FILE = Path(timing.__file__).name


def profiled(build: Callable[[], Built], steps: int, warmup: int, threads: int = 1,
             with_stack: bool = False):
    """``build()`` a case, take ``warmup`` steps and profile at least ``steps`` (both rounded up
    to whole windows); returns the profiler and the number of steps profiled.  With
    ``with_stack``, Python frames are recorded as events (for ``charged_table``)."""
    from torch.profiler import ProfilerActivity, profile

    extra = {}
    if with_stack:   # Python frames as events: torch's only switch for them is experimental
        extra = {"with_stack": True,
                 "experimental_config": torch._C._profiler._ExperimentalConfig(verbose=True)}
    with measuring(threads), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
        warnings.filterwarnings("ignore", category=FutureWarning)
        built = build()
        timing.warm_up([built], warmup, whole=True)
        steps = built.whole_windows(steps)
        with profile(activities=[ProfilerActivity.CPU], **extra) as prof:
            for _ in range(steps):
                built.step()
    return prof, steps


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
                    and f.rsplit("(", 1)[0].endswith(_CLOSURE_FILE)), None)
    if closure is not None:
        caller = next((frames[i] for i in lib if i > closure), "")
        if not caller or ("hyperopt_wrap/optimizer.py(" in caller and caller.endswith("): step")):
            return MODEL_OPS, in_step
    if lib:
        return "hyperopt_wrap/" + frames[lib[0]].split("hyperopt_wrap/")[-1], in_step
    return ("torch.optim" if in_step else MODEL_OPS), in_step


def charged_table(prof, steps: int, title: str, threads: int = 1, top: int = 25) -> str:
    """Times per step: the model's ops, ``opt.step`` in total and split into the closure's ops,
    other aten ops (by the ``hyperopt_wrap`` function charged, and the ``top`` ops) and the
    rest (Python and dispatch).  ``prof`` from ``profiled(..., with_stack=True)``."""
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
    lines = [f"{title}: profiled {steps} steps, {threads} thread(s); times per step "
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


def ops_table(prof, steps: int, title: str, top: int = 20) -> str:
    """torch.profiler's table (aten ops and Python-visible calls, by self CPU time)."""
    return (f"{title}: {steps} steps profiled\n"
            + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))
