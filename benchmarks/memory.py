"""Memory accounting of the benchmarks (torch has no allocator statistics for CPU tensors, and
tracemalloc does not see them):

* ``optimizer_state_bytes``: bytes an optimizer holds between steps, the distinct tensors in
  ``opt.state`` plus, for HyperOptimizer, ``opt.scratch_tensors()`` (tuned values, raws,
  accumulators, the hyper-optimizer's state, the method's buffers and the persistent scratch
  buffers of its in-place steps);
* ``step_peak_bytes``: the highest amount allocated during some steps above what was held just
  before them, from ``torch.profiler`` memory events.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import Tensor, nn

from hyperopt_wrap import HyperOptimizer


def distinct_bytes(tensors: Iterable[Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views of one storage count once)."""
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
    return distinct_bytes(tensors)


def param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


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
