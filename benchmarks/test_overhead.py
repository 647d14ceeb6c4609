"""Cost of one full training step (zero_grad, forward, backward, opt.step) with HyperOptimizer
against the torch.optim optimizer it wraps: MLP 784-256-10, batch 128, float32.

Each base optimizer and width is one benchmark group, so pytest-benchmark's relative column
(the number in brackets) reads directly as the ratio to the fastest case, vanilla.  For
interleaved measurements, memory and a markdown report run ``python benchmarks/summary.py``.
"""
from __future__ import annotations

import pytest

from conftest import ITERATIONS, ROUNDS, THREADS, WIDTHS
from summary import all_cases, build_case, optimizer_state_bytes

CASES = all_cases(WIDTHS)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_step(benchmark, case):
    built = build_case(case)
    for _ in range(10):           # lazily created state, allocator caches, first hyper-steps
        built.step()
    benchmark.group = case.group
    benchmark.extra_info.update({"base": case.base, "variant": case.variant, "width": case.width,
                                 "threads": THREADS,
                                 "state_bytes": optimizer_state_bytes(built.opt)})
    benchmark.pedantic(built.step, rounds=ROUNDS, iterations=ITERATIONS, warmup_rounds=1)
    loss = built.step().detach()
    assert loss.isfinite(), f"{case.id}: training diverged during the benchmark (loss {loss})"
