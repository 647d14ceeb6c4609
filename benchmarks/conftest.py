"""pytest-benchmark suite: ``python -m pytest benchmarks --benchmark-only`` (once, untimed:
``--benchmark-disable``).

Not collected by ``python -m pytest tests`` (it lives outside ``tests/``).  Environment:

* ``HYPEROPT_BENCH_THREADS``: ``torch.set_num_threads`` for every case (default 1);
* ``HYPEROPT_BENCH_ROUNDS`` / ``HYPEROPT_BENCH_ITERATIONS``: rounds, and steps timed per round
  (defaults 30 and 10);
* ``HYPEROPT_BENCH_WIDTHS``: comma-separated MLP hidden widths (default ``256``);
* ``HYPEROPT_BENCH_CNN_WIDTHS``: comma-separated channel counts of the CNN's second convolution
  (default ``16``; empty for none);
* ``HYPEROPT_BENCH_LSTM_WIDTHS``: comma-separated hidden sizes of the character LSTM (default
  ``64``; empty for none).
* ``HYPEROPT_BENCH_MANY_TENSORS``: comma-separated tensor counts of the chain of 16x16 linear
  layers (default ``200``; empty for none);
* ``HYPEROPT_BENCH_GPT_WIDTHS``: comma-separated model widths of the transformer language model
  (default ``256``; empty for none).

Each network is measured with its kind's variants (``benchmarks.summary.KIND_VARIANTS``).

A case's iterations per round are rounded up to whole windows of its ``update_every``.
"""
from __future__ import annotations

import os

import pytest

from benchmarks.timing import measuring


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.strip() else default


def _env_ints(name: str, default: str) -> list[int]:
    return [int(w) for w in os.environ.get(name, default).split(",") if w.strip()]


THREADS = _env_int("HYPEROPT_BENCH_THREADS", 1)
ROUNDS = _env_int("HYPEROPT_BENCH_ROUNDS", 30)
ITERATIONS = _env_int("HYPEROPT_BENCH_ITERATIONS", 10)
WIDTHS = _env_ints("HYPEROPT_BENCH_WIDTHS", "256")
CNN_WIDTHS = _env_ints("HYPEROPT_BENCH_CNN_WIDTHS", "16")
LSTM_WIDTHS = _env_ints("HYPEROPT_BENCH_LSTM_WIDTHS", "64")
MANY_TENSORS = _env_ints("HYPEROPT_BENCH_MANY_TENSORS", "200")
GPT_WIDTHS = _env_ints("HYPEROPT_BENCH_GPT_WIDTHS", "256")


@pytest.fixture(scope="session", autouse=True)
def bench_threads():
    """The same thread count for every case, and denormals flushed to zero (a precaution, see
    ``benchmarks.timing.measuring``); both restored afterwards."""
    with measuring(THREADS):
        yield THREADS
