"""Cost of one full training step (zero_grad, forward, backward, opt.step) with HyperOptimizer
against the torch.optim optimizer it wraps: MLP 784-256-10, batch 128, CNN 1-8-16, batch 64, a
character LSTM 64-16-64-64 (sequences of 32, batch 32), a chain of 200 16x16 linear layers
(batch 16: the per-tensor fixed cost) and a 4-block GPT-style transformer of width 256
(sequences of 64, batch 2), float32; each network with its kind's variants
(``benchmarks.summary.KIND_VARIANTS``: on the MLP every method at per-tensor and per-element
lr, greedy also global, and RTRL; on the transformer greedy global lr and implicit from the
closure).

Each base optimizer and network is one benchmark group, so pytest-benchmark's relative column
(the number in brackets) reads as the ratio to the fastest case, vanilla (the closure variants'
reference is "vanilla closure", in the same group).  Iterations per round are rounded up to
whole windows, since a second-order method's cost lands at the end of each window.  For
interleaved measurements, memory and a markdown report run ``python -m benchmarks.summary``,
which builds its cases with the same code.
"""
from __future__ import annotations

import pytest

from benchmarks.conftest import (CNN_WIDTHS, GPT_WIDTHS, ITERATIONS, LSTM_WIDTHS, MANY_TENSORS,
                                 ROUNDS, THREADS, WIDTHS)
from benchmarks.memory import optimizer_state_bytes
from benchmarks.models import make_nets
from benchmarks.summary import MAX_STEPS, all_cases, build_case

CASES = all_cases(make_nets(WIDTHS, CNN_WIDTHS, LSTM_WIDTHS, MANY_TENSORS, GPT_WIDTHS))


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_step(benchmark, case):
    built = build_case(case)
    for _ in range(10):           # lazily created state, allocator caches, first hyper-steps
        built.step()
    benchmark.group = case.group
    benchmark.extra_info.update({"base": case.base, "variant": case.variant,
                                 "net": case.net.label, "threads": THREADS,
                                 "state_bytes": optimizer_state_bytes(built.opt)})
    iterations = min(ITERATIONS, MAX_STEPS.get(case.net.kind, ITERATIONS))
    benchmark.pedantic(built.step, rounds=ROUNDS,
                       iterations=built.whole_windows(iterations), warmup_rounds=1)
    loss = built.step().detach()
    assert loss.isfinite(), f"{case.id}: training diverged during the benchmark (loss {loss})"
