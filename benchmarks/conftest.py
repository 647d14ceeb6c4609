"""pytest-benchmark suite: ``python -m pytest benchmarks --benchmark-only``.

Not collected by ``python -m pytest tests`` (it lives outside ``tests/``).  Environment:

* ``HYPEROPT_BENCH_THREADS``: ``torch.set_num_threads`` for every case (default 1);
* ``HYPEROPT_BENCH_ROUNDS`` / ``HYPEROPT_BENCH_ITERATIONS``: rounds, and steps timed per round
  (defaults 30 and 10);
* ``HYPEROPT_BENCH_WIDTHS``: comma-separated hidden widths (default ``256``).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

# test_overhead.py builds its cases with summary.py's code, so both measure the same thing.
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.strip() else default


THREADS = _env_int("HYPEROPT_BENCH_THREADS", 1)
ROUNDS = _env_int("HYPEROPT_BENCH_ROUNDS", 30)
ITERATIONS = _env_int("HYPEROPT_BENCH_ITERATIONS", 10)
WIDTHS = [int(w) for w in os.environ.get("HYPEROPT_BENCH_WIDTHS", "256").split(",") if w.strip()]


@pytest.fixture(scope="session", autouse=True)
def bench_threads():
    """The same thread count for every case, and denormals flushed to zero (a precaution, see
    summary.py); both restored afterwards."""
    saved = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    torch.set_flush_denormal(True)
    yield THREADS
    torch.set_num_threads(saved)
    torch.set_flush_denormal(False)
