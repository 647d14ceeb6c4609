"""Smoke test of the tuning-quality study (``python -m benchmarks.study``) at tiny sizes: every
task and every method (the learning-rate-free ones when their packages are installed) runs,
the section "study" is written with one table per task, finite numbers where no run diverged,
NaN counts, random search, a verdict per task, and the plots."""
from __future__ import annotations

import math
import re

import pytest
import torch

pytest.importorskip("sklearn")

from benchmarks import report, study  # noqa: E402


def _tables(section: str) -> dict[str, list[list[str]]]:
    """task name -> cells of its table rows (header and rule dropped)."""
    tables: dict[str, list[list[str]]] = {}
    task = None
    for line in section.splitlines():
        heading = re.match(r"### (\w+): ", line)
        if heading:
            task = heading.group(1)
        elif line.startswith("|") and task is not None:
            tables.setdefault(task, []).append([c.strip() for c in line.strip("|").split("|")])
    return {t: rows[2:] for t, rows in tables.items()}


def _number(cell: str) -> float:
    return float(cell)                  # "NaN" and "inf" parse too; anything else raises


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("study")
    out = tmp / "RESULTS.md"
    out.write_text("# results\n\n<!-- begin overhead -->\nkeep me\n<!-- end overhead -->\n")
    res = study.main(["--quick", "--jobs", "1", "--inits", "2", "--out", str(out),
                      "--plots", str(tmp / "plots")])
    return res, out, tmp


def test_every_method_row_for_every_task(quick):
    res, out, _ = quick
    text = out.read_text()
    assert "keep me" in text, "another section was overwritten"
    section = report.read_section("study", out)
    assert section is not None and section == res["text"].rstrip() + "\n"
    expected = [m.name for m in study.METHODS.values() if study.available(m)]
    missing = [m.name for m in study.METHODS.values() if not study.available(m)]
    assert [m.name for m in res["methods"]] == expected
    for name in missing:
        assert f"skipped: {name}" in section
    for lrfree in ("prodigy", "schedulefree", "dadaptation"):
        if lrfree in missing:
            print(f"{lrfree} not installed: its rows are skipped (pip install '.[lrfree]')")
    tables = _tables(section)
    assert sorted(tables) == sorted(study.TASKS)
    for task, rows in tables.items():
        names = [r[0] for r in rows]
        assert names[:len(expected)] == expected, (task, names)
        assert names[len(expected):] == ["random search (SGD) best-of-2 (cost: 2 runs)",
                                         "random search (Adam) best-of-2 (cost: 2 runs)"], names
        runs_by_method = {m: res["results"][(task, m)] for m in expected}
        for row in rows[:len(expected)]:
            runs = runs_by_method[row[0]]
            assert row[1] == "2"
            nan = sum(not math.isfinite(r["test_loss"]) for r in runs)
            assert row[5] == str(nan), (task, row)          # the NaN count
            median, mean = _number(row[2]), _number(row[3])
            if nan == 0:
                assert math.isfinite(median) and math.isfinite(mean) and median > 0, (task, row)
                lo, hi = (_number(x) for x in row[4].split(" - "))
                assert lo <= median <= hi, (task, row)
                finite = sorted(r["test_loss"] for r in runs)
                assert median == pytest.approx(sum(finite) / 2, rel=1e-3)
            assert _number(row[-1]) >= 0 and _number(row[-2]) >= 0     # wall times
            if task == "lstm" and nan == 0:     # perplexity = exp(loss) per character
                ppl = sorted(math.exp(r["test_loss"]) for r in runs)
                assert _number(row[6]) == pytest.approx(sum(ppl) / 2, rel=1e-3)
                assert min(ppl) <= _number(row[6]) <= max(ppl)
        # random search: the fixed run with the lower validation loss, its test loss (SGD's
        # and Adam's; the Adam rows are judged against the latter)
        for offset, name in enumerate(("fixed", "fixed adam")):
            fixed = res["results"][(task, name)]
            best = min(fixed, key=lambda r: r["val_loss"] if math.isfinite(r["val_loss"])
                       else math.inf)
            rs = rows[len(expected) + offset]
            if math.isfinite(best["test_loss"]):
                assert _number(rs[2]) == pytest.approx(best["test_loss"], rel=1e-3)
                if name == "fixed adam":
                    assert re.search(r"- greedy adam: (MET|NOT met)[^\n]*random-search \(Adam\) "
                                     rf"best-of-2 {re.escape(rs[2])} ", section), rs
        # every one of our methods gets a verdict line, and the task a final verdict
        for m in res["methods"]:
            if m.family == "ours":
                assert re.search(rf"- {re.escape(m.name)}: (MET|NOT met)", section)
        assert re.search(rf"^- {task}: (met by|not met by)", section, re.M)
    assert "### Verdict" in section


def test_runs_are_paired_and_ours_move_the_hyperparameters(quick):
    res, _, _ = quick
    inits = res["settings"]["inits"]
    assert len(inits) == 2 and inits[0] != inits[1]
    for h in inits:
        assert 1e-6 <= h["lr"] <= 1e-1 and 1e-7 <= h["weight_decay"] <= 1e-2
        assert 0 <= h["momentum"] < 1
    assert inits == study.draw_inits(5)[:2], "the i-th initialisation must not depend on N"
    for (task, method), runs in res["results"].items():
        assert [r["index"] for r in runs] == [0, 1]
        for r in runs:
            assert r["error"] is None, (task, method, r.get("traceback"))
            assert r["steps_done"] == res["settings"]["steps"][task] or r["diverged"]
        if study.METHODS[method].family == "ours":
            for r in runs:
                t = r["traj"]
                assert t and len(t["lr"]) == len(t["step"]) >= 2
                final = r["final_hyper"]
                # every method makes at least one hyper-step in the quick budget (>= 10 steps):
                # some value moves (a per-tensor lr's geometric mean can barely move while its
                # entries move apart, so all three kinds are looked at)
                assert any(final[k] != pytest.approx(r["init"][k], rel=1e-4)
                           for k in ("lr", "momentum", "weight_decay")), (task, method)
                assert 0 <= final["momentum"] < 1


def test_plots_written(quick):
    pytest.importorskip("matplotlib")
    res, _, tmp = quick
    pngs = sorted(p.name for p in (tmp / "plots").glob("*.png"))
    assert pngs == sorted(["study_test_loss.png"] + [f"study_{t}_trajectories.png"
                                                      for t in study.TASKS])
    for p in (tmp / "plots").glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for p in pngs:
        assert p in res["text"]


def test_statistics_and_divergence_are_counted_not_dropped():
    s = study.summary([1.0, math.nan, 3.0, math.inf])
    assert s["nan"] == 2 and s["mean"] == 2.0
    assert s["median"] == math.inf                 # two of four diverged: ranked last
    s = study.summary([1.0, 2.0, 3.0, 4.0, math.nan])
    assert s["median"] == 3.0 and s["q25"] == 2.0 and s["q75"] == 4.0
    runs = [{"index": i, "val_loss": v, "test_loss": t}
            for i, (v, t) in enumerate([(0.5, 0.6), (math.nan, math.nan), (0.2, 0.3),
                                        (0.9, 1.0)])]
    bo = study.best_of(runs)
    assert bo["best"]["index"] == 2
    # best-of-2 over the 6 pairs: 3 contain index 2 (0.3); of the other 3, two contain
    # index 0 (0.6) and one is {1, 3}, whose best is 3 (1.0)
    study.BEST_OF_K, saved = (2,), study.BEST_OF_K
    try:
        bo = study.best_of(runs)
    finally:
        study.BEST_OF_K = saved
    assert bo["k"][2]["expected"] == pytest.approx((3 * 0.3 + 2 * 0.6 + 1.0) / 6)
    assert bo["k"][2]["p_nan"] == 0


def test_a_diverging_run_is_a_nan_result_not_a_crash():
    settings = {"quick": True, "seed": 0, "steps": {"diabetes": 5}, "points": 2,
                "inits": [{"lr": 1e6, "momentum": 0.9, "weight_decay": 0.0}]}
    r = study.run_one("diabetes", "fixed", 0, settings)
    assert r["error"] is None and r["diverged"] and math.isnan(r["test_loss"])
    r = study.run_one("nonexistent", "fixed", 0, settings)
    assert r["error"] and math.isnan(r["test_loss"])


def test_a_missing_package_skips_its_rows_with_a_message(tmp_path, monkeypatch, capsys):
    ghost = study.Method("ghost", "lrfree", "needs a package that is not installed",
                         study._prodigy, requires="no_such_package_hyperopt_wrap_study")
    monkeypatch.setitem(study.METHODS, "ghost", ghost)
    out = tmp_path / "RESULTS.md"
    res = study.main(["--quick", "--jobs", "1", "--inits", "2", "--tasks", "diabetes",
                      "--methods", "fixed,ghost", "--no-plots", "--out", str(out)])
    err = capsys.readouterr().err
    assert "skipping ghost" in err and "not installed" in err
    section = report.read_section("study", out)
    assert "skipped: ghost" in section
    assert [r[0] for r in _tables(section)["diabetes"]][:1] == ["fixed"]
    assert not any(r[0] == "ghost" for r in _tables(section)["diabetes"])
    assert list(res["results"]) == [("diabetes", "fixed")]


def test_the_hyper_optimizer_experiment_runs():
    from benchmarks import hyper_optimizers
    res = hyper_optimizers.main(["--tasks", "digits", "--methods", "greedy", "--inits", "1",
                                 "--steps", "12", "--jobs", "1", "--hypers", "adam,normalized"])
    assert len(res) == 6 and all(math.isfinite(v[0][0]) and math.isfinite(v[0][1])
                                 for v in res.values())
    # Hierarchical at a spread and momentum bound of one's own (its level: the method's rule)
    res = hyper_optimizers.main(["--tasks", "digits", "--methods", "greedy,implicit",
                                 "--inits", "1", "--steps", "12", "--jobs", "1",
                                 "--hypers", "hierarchical", "--granularities", "element",
                                 "--spread", "1.25", "--momentum-bound", "0.9999"])
    assert sorted(n for _, n in res) == ["greedy element hierarchical",
                                         "implicit element hierarchical"]
    assert all(math.isfinite(v[0][0]) for v in res.values())
    make = hyper_optimizers._make("implicit", "element", "hierarchical",
                                  {"spread": 1.25, "momentum_bound": 0.9999})
    opt = make(torch.nn.Linear(2, 1).parameters(),
               {"lr": 0.1, "momentum": 0.9999, "weight_decay": 1e-4}, lambda: torch.zeros(()))
    groups = {g["kind"]: g for g in opt._controller.hyper_optimizer.param_groups}
    assert groups["lr"]["level"] == "adam" and groups["lr"]["spread"] == pytest.approx(
        math.log(1.25)) and groups["momentum"]["spread"] is None
    for bad in (["--spread", "0.5"], ["--hypers", "sgd"], ["--granularities", "row"]):
        with pytest.raises(SystemExit):
            hyper_optimizers.main(["--inits", "1", *bad])


def test_a_run_of_some_rows_writes_its_own_section(tmp_path):
    out = tmp_path / "RESULTS.md"
    out.write_text("<!-- begin study -->\nthe full study\n<!-- end study -->\n")
    res = study.main(["--quick", "--jobs", "1", "--inits", "2", "--tasks", "diabetes",
                      "--methods", "fixed adam,greedy adam", "--out", str(out),
                      "--plots", str(tmp_path / "plots"), "--section", "study-adam"])
    assert report.read_section("study", out) == "the full study\n"
    import importlib.util
    drawn = importlib.util.find_spec("matplotlib") is not None
    assert bool(res["settings"].get("plots_written")) == drawn
    # named after the section: the study's own plots stay as they are
    assert sorted(p.name for p in (tmp_path / "plots").glob("*.png")) == ([
        "study-adam_diabetes_trajectories.png", "study-adam_test_loss.png"] if drawn else [])
    section = report.read_section("study-adam", out)
    assert section.startswith("## Tuning quality: one run from a random initialisation "
                              "(fixed adam, greedy adam)")
    assert section == res["text"].rstrip() + "\n"
    rows = [r[0] for r in _tables(section)["diabetes"]]
    assert rows == ["fixed adam", "greedy adam", "random search (Adam) best-of-2 (cost: 2 runs)"]
    # without an SGD random search the Adam row is judged against Adam's
    assert re.search(r"- greedy adam: (MET|NOT met)[^\n]*: median \S+ vs random-search \(Adam\)",
                     section)
    with pytest.raises(SystemExit):
        study.main(["--quick", "--section", "Study Adam", "--out", str(out)])


@pytest.mark.parametrize("method", ["greedy", "greedy adam", "prodigy"])
def test_a_run_is_reproducible_bit_for_bit(method):
    """The same task, row and initialisation give the same numbers on a second run (one torch
    thread, seeded weights and batches): a row that moves between two runs of the study on one
    machine moved because its code did."""
    if not study.available(study.METHODS[method]):
        pytest.skip(f"{study.METHODS[method].requires} is not installed")
    settings = {"quick": True, "seed": 0, "steps": {"diabetes": 30}, "points": 3,
                "inits": study.draw_inits(2)}
    first, second = (study.run_one("diabetes", method, 1, settings) for _ in range(2))
    assert first["error"] is None and math.isfinite(first["test_loss"])
    for key in ("test_loss", "val_loss", "skipped_steps", "traj", "final_hyper"):
        assert first.get(key) == second.get(key), key
