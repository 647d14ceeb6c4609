"""Cost of one full training step with ``opt.step()`` under torch.compile, as in
``test_overhead.py``, on the MLP 784-H-10 (``HYPEROPT_BENCH_WIDTHS``), batch 128, float32: greedy
at a global lr, its step compiled as one graph (``fullgraph=True``), against torch's optimizer
stepped eagerly ("vanilla") and compiled ("vanilla compiled": torch's step breaks the graph in
its no_grad wrapper, so ``fullgraph=False``), and greedy's eager step, in one benchmark group
per base optimizer (the relative column reads as the ratio to the fastest case).  The first
steps compile (tens of seconds each on a small CPU machine) and are not timed; for
interleaved ratios run ``python -m benchmarks.summary --variants vanilla "vanilla compiled"
"greedy global lr" "greedy global lr compiled" --cnn-widths --lstm-widths --many-tensors
--gpt-widths``.
"""
from __future__ import annotations

import pytest

from benchmarks.conftest import ITERATIONS, ROUNDS, THREADS, WIDTHS
from benchmarks.memory import optimizer_state_bytes
from benchmarks.models import make_nets
from benchmarks.summary import all_cases, build_case

VARIANTS = ("vanilla", "vanilla compiled", "greedy global lr", "greedy global lr compiled")
CASES = all_cases(make_nets(WIDTHS), variants=VARIANTS)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_compiled_step(benchmark, case):
    built = build_case(case)
    for _ in range(10):           # compilation (a few graphs), lazily created state, caches
        built.step()
    benchmark.group = f"{case.group}, compiled step"
    benchmark.extra_info.update({"base": case.base, "variant": case.variant,
                                 "net": case.net.label, "threads": THREADS,
                                 "state_bytes": optimizer_state_bytes(built.opt)})
    benchmark.pedantic(built.step, rounds=ROUNDS, iterations=ITERATIONS, warmup_rounds=1)
    loss = built.step().detach()
    assert loss.isfinite(), f"{case.id}: training diverged during the benchmark (loss {loss})"
