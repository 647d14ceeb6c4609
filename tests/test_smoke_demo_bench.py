"""Smoke tests of the demo (``python -m hyperopt_wrap.demo``) and of the benchmark summary
(``python benchmarks/summary.py``) at tiny sizes: they run, print/write finite numbers."""
from __future__ import annotations

import importlib.util
import math
import re
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn")

from hyperopt_wrap import demo  # noqa: E402

SUMMARY = Path(__file__).resolve().parents[1] / "benchmarks" / "summary.py"


def _load_summary():
    spec = importlib.util.spec_from_file_location("hyperopt_wrap_benchmark_summary", SUMMARY)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module          # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


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


def test_demo_rejects_bad_arguments():
    with pytest.raises(SystemExit):
        demo.main(["--steps", "0"])


def test_summary_measures_and_writes_markdown(tmp_path, capsys):
    summary = _load_summary()
    results = summary.measure(widths=(8,), rounds=1, steps=2, warmup=1, memory=True)
    cases = {(r["base"], r["variant"]) for r in results}
    assert cases == {(b, v) for b in summary.BASES for v in summary.VARIANTS}
    for r in results:
        assert r["median_s"] > 0 and math.isfinite(r["ratio"]) and r["ratio"] > 0, r
        assert math.isfinite(r["final_loss"]), r
        assert r["state_bytes"] > 0, r
        if r["variant"] == "vanilla":
            assert r["ratio"] == 1.0
        elif r["variant"].startswith("greedy"):
            vanilla = next(v for v in results if v["base"] == r["base"] and v["variant"] == "vanilla")
            assert r["state_bytes"] > vanilla["state_bytes"], r   # tuned values, tangents ...
    out = tmp_path / "RESULTS.md"
    summary.main(["--widths", "8", "--rounds", "1", "--steps", "2", "--warmup", "1",
                  "--no-memory", "--bases", "SGD", "--out", str(out)])
    text = out.read_text()
    assert text == capsys.readouterr().out.split("written to")[0].rstrip("\n") + "\n"
    rows = [r for r in _table_rows(text) if r[0] == "8"]
    assert [r[2] for r in rows] == list(summary.VARIANTS)
    for row in rows:
        assert float(row[3]) > 0 and math.isfinite(float(row[3])), row
        assert re.fullmatch(r"\d+\.\d\dx", row[4]) and re.fullmatch(r"\d+\.\d\dx", row[5]), row
    assert "torch" in text and "CPU:" in text and "Ratio to vanilla by width" in text


def test_summary_profile_attributes_step_time_to_library_functions():
    summary = _load_summary()
    text = summary.profile_step(summary.Case("SGD", "greedy global lr", 8), steps=2)
    assert "opt.step total" in text
    assert "hyperopt_wrap/optimizer.py" in text, text
