"""The demo's HyperMonitor: the trajectory it prints is the monitor's history, ``--plot`` writes
the monitor's panels beside the demo's figure, and without matplotlib ``--plot`` only says so."""
from __future__ import annotations

import sys

import pytest

pytest.importorskip("sklearn")

from hyperopt_wrap import demo  # noqa: E402

ARGS = ["--quick", "--no-context", "--steps", "30", "--eval-every", "10"]


def _trajectory_rows(out: str) -> list[list[str]]:
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if "(HyperMonitor)" in line) + 2
    rows = []
    for line in lines[start:]:
        cells = line.split()
        if len(cells) != 4 or not cells[0].isdigit():
            break
        rows.append(cells)
    return rows


def test_demo_prints_the_monitors_trajectory(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "demo.png"
    runs = demo.main([*ARGS, "--plot", str(path)])
    out = capsys.readouterr().out
    tuned = next(r for r in runs if r.tuned)
    assert not tuned.monitor.attached                      # closed after training
    h = tuned.monitor.history()
    assert h["hyperstep"] == list(range(0, 30, demo.MONITOR_EVERY))
    assert h["lr/0"][0] == pytest.approx(tuned.lr0) and h["lr/0"][-1] != h["lr/0"][0]
    rows = _trajectory_rows(out)
    assert len(rows) == len(h["step"])          # 3 records, fewer than TRAJECTORY_ROWS
    for i, (step, hyperstep, lr, norm) in enumerate(rows):
        assert (int(step), int(hyperstep)) == (h["step"][i], h["hyperstep"][i])
        assert float(lr) == pytest.approx(h["lr/0"][i], rel=1e-3)
        assert float(norm) == pytest.approx(h["hypergrad_norm/lr"][i], rel=1e-2, abs=1e-12)
    assert path.exists() and (tmp_path / "demo.hyper1.png").exists()
    assert f"HyperMonitor panels written to {tmp_path / 'demo.hyper1.png'}" in out


def test_demo_plot_without_matplotlib_still_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    runs = demo.main([*ARGS, "--plot", str(tmp_path / "demo.png")])
    out = capsys.readouterr().out
    assert "pip install matplotlib" in out and not list(tmp_path.iterdir())
    assert all(r.steps_done == 30 for r in runs) and _trajectory_rows(out)
