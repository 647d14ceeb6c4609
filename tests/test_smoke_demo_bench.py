"""Smoke tests of the demo (``python -m hyperopt_wrap.demo``) and of the benchmark summary
(``python -m benchmarks.summary``) at tiny sizes: they run, print/write finite numbers."""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn")

from benchmarks import report, summary  # noqa: E402
from benchmarks.models import Net  # noqa: E402
from benchmarks.timing import Case  # noqa: E402
from hyperopt_wrap import demo  # noqa: E402


def _table_rows(text: str) -> list[list[str]]:
    """Cells of the markdown table rows after the header and its rule."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    assert len(lines) >= 3, f"no table in the output:\n{text}"
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]


def test_demo_quick_prints_a_table_of_finite_numbers(capsys):
    runs = demo.main(["--quick", "--steps", "30", "--eval-every", "10"])
    out = capsys.readouterr().out
    rows = _table_rows(out)
    assert [r[0] for r in rows] == [run.name for run in runs]
    assert len(rows) == 5 and sum(run.tuned for run in runs) == 2
    for row in rows:
        numbers = [float(c) for c in row[1:-1]]          # final lr ... ms/step
        assert all(math.isfinite(x) for x in numbers), row
        assert 0.0 <= numbers[4] <= 1.0, f"test accuracy out of range: {row}"
        assert re.fullmatch(r"\d+\.\d\dx( \(ref\))?", row[-1]), row
    for run in runs:
        assert run.steps_done == 30 and run.seconds > 0
        assert all(math.isfinite(v) for v in run.final.values()), run
        assert len(run.curve_lr) == len(run.curve_train) == 4       # steps 0, 10, 20, 30
    # Same initial weights and batches: every run starts from the same loss.
    assert len({round(run.curve_train[0], 6) for run in runs}) == 1
    # Vanilla keeps its lr; the tuned runs moved theirs (greedy, one hyper-step per step).
    by_name = {run.name: run for run in runs}
    for run in runs:
        if run.tuned:
            assert run.final["lr"] != run.lr0
            assert by_name[run.baseline].final["lr"] == run.lr0
    assert "wall time" in out


@pytest.mark.parametrize("method", ["implicit", "unroll"])
def test_demo_runs_the_second_order_methods(method, capsys):
    """The demo's loop asks for the graph with opt.needs_graph; 30 steps are 3 windows."""
    runs = demo.main(["--quick", "--no-context", "--steps", "30", "--eval-every", "10",
                      "--method", method])
    assert f"method={method!r}" in capsys.readouterr().out
    tuned = next(run for run in runs if run.tuned)
    assert tuned.final["lr"] != tuned.lr0 and math.isfinite(tuned.final["test_loss"])


def test_demo_rejects_bad_arguments():
    with pytest.raises(SystemExit):
        demo.main(["--steps", "0"])


def test_summary_measures_and_writes_markdown(tmp_path, capsys):
    mlp = Net("mlp", 8)
    results = summary.measure([mlp], rounds=1, steps=2, warmup=1, bases=["SGD"], memory=True)
    by_key = {(r["base"], r["variant"]): r for r in results}
    # every variant but the compiled ones (measured only when named: compiling takes long)
    assert set(by_key) == {("SGD", v) for v in summary.VARIANTS
                           if v not in summary.COMPILED_VARIANTS}
    assert len(results) == len(by_key) and {r["net"] for r in results} == {mlp.label}
    for r in results:
        assert r["median_s"] > 0 and math.isfinite(r["ratio"]) and r["ratio"] > 0, r
        assert math.isfinite(r["final_loss"]), r
        assert r["state_bytes"] > 0 and r["step_peak_bytes"] > 0, r
        reference = by_key[(r["base"], r["reference"])]
        if r["variant"] == r["reference"]:
            assert r["ratio"] == 1.0
        elif r["variant"].startswith(("greedy", "implicit", "unroll")):
            assert r["state_bytes"] > reference["state_bytes"], r   # tuned values, tangents ...
        if r["variant"].startswith(("implicit", "unroll")):
            # closure steps are compared with closure steps; a window's recorded steps (and
            # kept graphs) show in its peak
            closure = " closure " in r["variant"]
            assert r["reference"] == ("vanilla closure" if closure else "vanilla"), r
            assert r["step_peak_bytes"] > reference["step_peak_bytes"], r
            assert summary.peak_total_bytes(r) > summary.peak_total_bytes(reference), r
    out = tmp_path / "RESULTS.md"
    variants = ["implicit graph element lr", "unroll closure tensor lr"]
    summary.main(["--widths", "8", "--cnn-widths", "2", "--lstm-widths", "3",
                  "--many-tensors", "3", "--gpt-widths", "8", "--rounds", "1", "--steps", "2",
                  "--warmup", "1", "--no-memory", "--variants", *variants, "--out", str(out)])
    text = report.read_section("overhead", out)
    assert text == capsys.readouterr().out.split("written to")[0].rstrip("\n") + "\n"
    for net in (mlp, Net("cnn", 2), Net("lstm", 3), Net("many", 3), Net("gpt", 8)):
        rows = [r for r in _table_rows(text) if r[0] == net.label]
        # every base, and the references of the ratios are measured too
        assert [r[1:3] for r in rows] == [[b, v] for b in summary.BASES
                                          for v in ("vanilla", "vanilla closure", *variants)]
        for row in rows:
            assert float(row[4]) > 0 and math.isfinite(float(row[4])), row
            assert re.fullmatch(r"\d+\.\d\dx", row[5]) and re.fullmatch(r"\d+\.\d\dx", row[6]), row
            assert row[9] == row[10] == "n/a", row        # --no-memory: no step peak, no ratio
    assert "torch" in text and "CPU:" in text and "Ratio to the reference by network" in text
    assert all(f"Target {v} <= " in text for v in variants)


def test_summary_profile_attributes_step_time_to_library_functions():
    mlp = Net("mlp", 8)
    text = summary.profile_step(Case("SGD", "greedy global lr", mlp), steps=2)
    assert "opt.step total" in text
    # the ops are charged to the library's own functions (the stepper, controller, rules)
    assert re.search(r"hyperopt_wrap/\w+(/\w+)?\.py\(\d+\)", text), text
    # a closure step: the closure's forward/backward is the model's, not the optimizer's
    text = summary.profile_step(Case("SGD", "vanilla closure", mlp), steps=2)
    closure_us = re.search(r"step's closure ops: +(\d+) us", text)
    assert closure_us and int(closure_us.group(1)) > 0, text


def test_pytest_benchmark_suite_runs_once():
    """``python -m pytest benchmarks --benchmark-disable`` (each case run once, untimed) on the
    MLP 784-8-10 only: the suite's files collect, build their cases and take finite steps."""
    pytest.importorskip("pytest_benchmark")
    tiny = {"HYPEROPT_BENCH_WIDTHS": "8", "HYPEROPT_BENCH_CNN_WIDTHS": "",
            "HYPEROPT_BENCH_LSTM_WIDTHS": "", "HYPEROPT_BENCH_MANY_TENSORS": "",
            "HYPEROPT_BENCH_GPT_WIDTHS": "", "HYPEROPT_BENCH_ROUNDS": "1",
            "HYPEROPT_BENCH_ITERATIONS": "1"}
    run = subprocess.run([sys.executable, "-m", "pytest", "benchmarks", "--benchmark-disable",
                          "-q", "-p", "no:cacheprovider", "-rs"],
                         cwd=Path(__file__).resolve().parents[1], env={**os.environ, **tiny},
                         capture_output=True, text=True, timeout=300)
    tail = (run.stdout + run.stderr)[-3000:]
    assert run.returncode == 0, tail
    passed = re.search(r"(\d+) passed", run.stdout)
    assert passed and int(passed.group(1)) >= 2 * len(summary.VARIANTS), tail


def test_report_sections_are_replaced_independently(tmp_path):
    path = tmp_path / "RESULTS.md"
    report.write_section("study", "study v1", path)
    report.write_section("overhead", "overhead v1\n", path)      # goes before the study
    report.write_section("custom", "mine", path)                  # unknown keys go last
    report.write_section("study", "study v2 | with $1 \\1 text", path)
    text = path.read_text()
    assert text.startswith(report.TITLE)
    assert text.index("overhead v1") < text.index("study v2") < text.index("mine")
    assert "study v1" not in text and text.count("<!-- begin study -->") == 1
    assert report.read_section("study", path) == "study v2 | with $1 \\1 text\n"
    assert report.read_section("overhead", path) == "overhead v1\n"
    assert report.read_section("peers", path) is None
    with pytest.raises(ValueError, match="section key"):
        report.write_section("Bad Key", "x", path)
