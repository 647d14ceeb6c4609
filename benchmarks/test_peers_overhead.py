"""Side by side with peer implementations, as a pytest-benchmark suite: one full training step
of ours (greedy; unroll K=5) against gdtuo's hyperoptimizer step and higher's / torchopt's
5-step unrolled meta-gradient, and vanilla torch.optim, on the MLP 784-256-10 (batch 128) and
the CNN 1-8-16 (batch 64), float32.  The cases (and the work each does per step) are built
by ``benchmarks.peers``' code; each base optimizer and network is one benchmark group, so the
relative column reads as the ratio to the fastest case.  Iterations per round are rounded up to
whole windows of 5 steps for the unroll cases.  Skipped without the extra ``peers``.  Environment:
as ``conftest.py`` (``HYPEROPT_BENCH_ROUNDS``, ``_ITERATIONS``, ``_WIDTHS``, ``_CNN_WIDTHS``,
``_THREADS``).  For interleaved measurements and memory: ``python -m benchmarks.peers``.
"""
from __future__ import annotations

import pytest

pytest.importorskip("gradient_descent_the_ultimate_optimizer",
                    reason="peer libraries not installed: pip install -e '.[peers]'")
pytest.importorskip("higher", reason="peer libraries not installed: pip install -e '.[peers]'")
pytest.importorskip("torchopt", reason="peer libraries not installed: pip install -e '.[peers]'")

from benchmarks.conftest import CNN_WIDTHS, ITERATIONS, ROUNDS, THREADS, WIDTHS  # noqa: E402
from benchmarks.models import make_nets  # noqa: E402
from benchmarks.peers import BASES, CASES, build  # noqa: E402

PARAMS = [pytest.param(base, case, net, id=f"{base}-{case.replace(' ', '_')}-{net.id}")
          for net in make_nets(WIDTHS, CNN_WIDTHS) for base in BASES for case in CASES]


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("base,case,net", PARAMS)
def test_peer_step(benchmark, base, case, net):
    built = build(base, case, net)
    for _ in range(built.whole_windows(10)):     # lazy state, allocator caches
        built.step()
    benchmark.group = f"peers {base} {net.label} batch {net.batch}"
    benchmark.extra_info.update({"base": base, "case": case, "net": net.label,
                                 "threads": THREADS})
    benchmark.pedantic(built.step, rounds=ROUNDS,
                       iterations=built.whole_windows(ITERATIONS), warmup_rounds=1)
    loss = built.step().detach()
    assert loss.isfinite(), f"{base} {case} {net.label}: training diverged (loss {loss})"
