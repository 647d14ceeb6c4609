"""HyperMonitor: its records equal what ``opt.hyperparameters()`` / ``last_hypergradient()`` and
the skip counters say after each step that made a hyper-step (read independently in the loop),
for global / group / tensor / element granularity, with LR schedulers, with update_every > 1
(greedy, and unroll with a closure); it reads nothing on the host inside ``step()``; writers,
plot, state_dict and bad input."""
from __future__ import annotations

import copy
import functools
import math
import sys

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from hyperopt_wrap import HyperMonitor, HyperOptimizer, Unroll
from hyperopt_wrap.monitor import readout
from problems import forbid_host_sync

STEPS = 10


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))


def _batch(i, n=16):
    g = torch.Generator().manual_seed(100 + i)
    return torch.randn(n, 5, generator=g), torch.randn(n, 3, generator=g)


def _loss(model, x, y):
    return ((model(x) - y) ** 2).mean()


def _closure(opt, model, x, y):
    opt.zero_grad()
    loss = _loss(model, x, y)
    loss.backward()
    return loss


def _two_groups(model, lr):
    w = [p for n, p in model.named_parameters() if n.endswith("weight")]
    b = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return [{"params": w}, {"params": b, "lr": lr / 2}]


# name -> (build(model) -> (opt, scheduler), granularity per kind, uses a closure, NaN step)
CONFIGS = {
    "greedy-global-steplr-2groups": (
        lambda m: _with(HyperOptimizer(torch.optim.SGD, _two_groups(m, 0.1), lr=0.1, momentum=0.9),
                        lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5)),
        {"lr": "global"}, False, 4),
    "greedy-tensor-adam-val": (
        lambda m: _with(HyperOptimizer(
            torch.optim.Adam, m.parameters(), lr=0.01, weight_decay=1e-3,
            tune=("lr", "momentum", "weight_decay"), granularity="tensor",
            val_loss=lambda: _loss(m, *_batch(99))),
            lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.3)),
        {"lr": "tensor", "momentum": "tensor", "weight_decay": "tensor"}, False, None),
    "greedy-element-lambdalr": (
        lambda m: _with(HyperOptimizer(torch.optim.SGD, m.parameters(), lr=0.05, momentum=0.5,
                                       granularity="element"),
                        lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1 / (1 + s))),
        {"lr": "element"}, False, None),
    "greedy-tensor-lr-entry": (        # torch's idiom lr=torch.tensor(...), a scheduler fill_s it
        lambda m: _with(HyperOptimizer(torch.optim.SGD, m.parameters(), lr=torch.tensor(0.1),
                                       momentum=0.9),
                        lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5)),
        {"lr": "global"}, False, None),
    "greedy-update_every-3": (
        lambda m: _with(HyperOptimizer(torch.optim.SGD, m.parameters(), lr=0.1, momentum=0.9,
                                       update_every=3),
                        lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=4, gamma=0.5)),
        {"lr": "global"}, False, None),
    "unroll-closure-group": (
        lambda m: _with(HyperOptimizer(torch.optim.SGD, _two_groups(m, 0.1), lr=0.1, momentum=0.9,
                                       method=Unroll(horizon=2), update_every=3,
                                       tune=("lr", "momentum"), granularity="group"),
                        lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.7)),
        {"lr": "group", "momentum": "group"}, True, None),
}


def _with(opt, make_scheduler):
    return opt, make_scheduler(opt)


def _truth(opt, granularity) -> dict[str, float]:
    """The record expected now, from the public reads only."""
    out = {}
    for kind, entries in opt.hyperparameters().items():
        for gi, entry in enumerate(entries):
            name = f"{kind}/{gi}"
            if isinstance(entry, list) or (torch.is_tensor(entry) and entry.dim() == 1):
                flat = torch.cat([t.reshape(-1) for t in (entry if isinstance(entry, list)
                                                          else [entry])]).double()
                out.update({f"{name}/mean": float(flat.mean()), f"{name}/min": float(flat.min()),
                            f"{name}/max": float(flat.max())})
            else:
                out[name] = float(entry)
    for kind, entries in opt.last_hypergradient().items():
        if granularity[kind] == "global":      # one value, listed once per group
            entries = entries[:1]
        flat = [t.reshape(-1) for e in entries for t in (e if isinstance(e, list) else [e])
                if torch.is_tensor(t)]
        out[f"hypergrad_norm/{kind}"] = float(torch.cat(flat).double().norm())
    out["skipped_steps"] = opt.skipped_steps
    out["skipped_hypersteps"] = opt.skipped_hypersteps
    return out


def _step(opt, model, i, closure, nan=False):
    x, y = _batch(i)
    if closure:
        opt.step(functools.partial(_closure, opt, model, x, y))
        return
    opt.zero_grad()
    _loss(model, x, y).backward()
    if nan:
        next(model.parameters()).grad[0, 0] = math.nan
    opt.step()


def _run(name, steps=STEPS):
    """Train ``steps`` steps with a monitor; returns it and the truth read in the loop after
    every step that made a hyper-step (before the scheduler's step, as the hook sees it)."""
    build, granularity, closure, nan_step = CONFIGS[name]
    model = _model()
    opt, scheduler = build(model)
    monitor = HyperMonitor(opt)
    expected = [(0, 0, _truth(opt, granularity))]
    seen = opt.hypersteps
    for i in range(steps):
        _step(opt, model, i, closure, nan=i == nan_step)
        if opt.hypersteps != seen:
            seen = opt.hypersteps
            expected.append((i + 1, seen, _truth(opt, granularity)))
        scheduler.step()
    return opt, monitor, expected, model


def _same(actual: float, expected: float, name: str) -> bool:
    if math.isnan(expected):
        return math.isnan(actual)
    if name.endswith("/mean") or name.startswith("hypergrad_norm"):
        return actual == pytest.approx(expected, rel=1e-6, abs=1e-12)
    return actual == expected


@pytest.mark.parametrize("name", CONFIGS)
def test_records_equal_the_public_reads_at_each_hyperstep(name):
    opt, monitor, expected, _ = _run(name)
    h = monitor.history()
    assert h["step"] == [s for s, _, _ in expected]
    assert h["hyperstep"] == [k for _, k, _ in expected]
    if opt.update_every > 1:            # records only at hyper-steps, not every step
        assert len(h["step"]) < STEPS // 2
    names = set(expected[0][2])
    assert set(h) - {"step", "hyperstep"} == names
    for r, (_, _, truth) in enumerate(expected):
        bad = {n: (h[n][r], truth[n]) for n in names if not _same(h[n][r], truth[n], n)}
        assert not bad, f"record {r}: {bad}"
    # the scheduler scale is in: the recorded lr is not the tuned value alone
    lr_name = next(n for n in names if n.startswith("lr/0"))
    assert h[lr_name][-1] != pytest.approx(float(opt.tuned["lr"].values[0].reshape(-1)[0]),
                                           rel=1e-3)
    assert monitor.latest() == {"step": h["step"][-1], "hyperstep": h["hyperstep"][-1],
                                **{n: h[n][-1] for n in names}}


def test_skips_are_counted():
    opt, monitor, _, _ = _run("greedy-global-steplr-2groups")
    h = monitor.history()
    assert opt.skipped_steps == 1 and h["skipped_steps"][-1] == 1
    assert h["skipped_steps"][:3] == [0, 0, 0]


def test_every_records_every_nth_hyperstep():
    model = _model()
    opt = HyperOptimizer(torch.optim.SGD, model.parameters(), lr=0.1, momentum=0.9)
    monitor = HyperMonitor(opt, every=3)
    for i in range(STEPS):
        _step(opt, model, i, closure=False)
    h = monitor.history()
    assert h["hyperstep"] == [0, 3, 6, 9] and opt.hypersteps == 9
    assert h["step"] == [0, 4, 7, 10]          # greedy: hyper-step k completes at step k + 1


class _NoDeviceRead(TorchDispatchMode):
    """Fails on any read of a tensor's value on the host, from Python or C++."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default):
            raise AssertionError(f"host synchronisation: {func}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", ["greedy-global-steplr-2groups", "greedy-tensor-adam-val",
                                  "greedy-element-lambdalr", "greedy-tensor-lr-entry",
                                  "unroll-closure-group"])
def test_the_hook_reads_nothing_on_the_host(name, monkeypatch):
    """step() with a monitor attached, under the suite's host-read guard (``.item()``,
    ``.tolist()``, ``float()``, ``bool()``, ...); and a record alone under a dispatch mode that
    catches reads from C++ too.  The hyper-optimizer's CPU step counters are the library's own
    exception (see test_optimizer.py); so is a tensor lr entry that a scheduler wrote, which the
    step validates on the host (a CPU tensor here; the record alone is checked without it)."""
    build, _, closure, _ = CONFIGS[name]
    model = _model()
    opt, scheduler = build(model)
    monitor = HyperMonitor(opt)
    for i in range(4):                          # past the first window's one-off checks
        _step(opt, model, i, closure)
        scheduler.step()
    before = len(monitor)
    for i in range(4, 10):
        allowed = {id(s["step"]) for s in opt.hyper_optimizer.state.values() if "step" in s}
        allowed |= {id(g["lr"]) for g in opt.param_groups if torch.is_tensor(g["lr"])}
        with forbid_host_sync(monkeypatch, allowed):
            _step(opt, model, i, closure)
        scheduler.step()
    assert len(monitor) > before + 1
    with _NoDeviceRead():
        monitor._record()
        readout(opt)
    # the guard is not blind: reading the records is a host read
    with pytest.raises(AssertionError, match="host synchronisation"):
        with forbid_host_sync(monkeypatch):
            monitor.latest()


def test_a_new_param_group_adds_its_series():
    model = _model()
    params = list(model.parameters())
    opt = HyperOptimizer(torch.optim.SGD, params[:2], lr=0.1, momentum=0.9,
                         granularity="group")
    monitor = HyperMonitor(opt)
    for i in range(3):
        _step(opt, model, i, closure=False)
    opt.add_param_group({"params": params[2:], "lr": 0.02})
    for i in range(3, 6):
        _step(opt, model, i, closure=False)
    h = monitor.history()
    assert h["step"] == [0, 2, 3, 4, 5, 6]
    assert all(math.isnan(v) for v in h["lr/1"][:3]) and h["lr/1"][3] == pytest.approx(0.02, rel=0.2)
    assert h["lr/1"][-1] == float(opt.hyperparameters()["lr"][1])


def _copy_and_step(opt):
    twin = copy.deepcopy(opt)
    for _ in range(4):
        for p in twin.param_groups[0]["params"]:
            p.grad = torch.full_like(p, 0.01)
        twin.step()
    return twin


def test_a_deep_copy_leaves_the_monitor_behind():
    model = _model()
    opt = HyperOptimizer(torch.optim.SGD, model.parameters(), lr=0.1, momentum=0.9)
    monitor = HyperMonitor(opt)
    for i in range(3):
        _step(opt, model, i, closure=False)
    n, hypersteps = len(monitor), opt.hypersteps
    twin = _copy_and_step(opt)
    assert twin.hypersteps == hypersteps + 4 and opt.hypersteps == hypersteps
    assert len(monitor) == n


def test_a_deep_copy_with_a_scheduler_steps_itself():
    """(HyperOptimizer.__getstate__ used to copy the step wrapper an LR scheduler sets on the
    instance, so a copy's step() stepped the original, and pickle failed.)"""
    opt, monitor, _, _ = _run("greedy-global-steplr-2groups", steps=3)
    n, hypersteps = len(monitor), opt.hypersteps
    twin = _copy_and_step(opt)
    assert opt.hypersteps == hypersteps and len(monitor) == n
    assert twin.hypersteps == hypersteps + 4


def test_close_detaches_and_records_stay():
    opt, monitor, expected, model = _run("greedy-update_every-3", steps=6)
    n = len(monitor)
    with monitor:
        pass                                    # the context manager closes it
    monitor.close()
    assert not monitor.attached
    for i in range(6, 12):
        _step(opt, model, i, closure=False)
    assert opt.hypersteps > expected[-1][1]
    assert len(monitor) == n and monitor.history()["step"] == [s for s, _, _ in expected]


def test_bad_input_raises_clearly():
    model = _model()
    with pytest.raises(TypeError, match="HyperOptimizer.*SGD"):
        HyperMonitor(torch.optim.SGD(model.parameters(), lr=0.1))
    opt = HyperOptimizer(torch.optim.SGD, model.parameters(), lr=0.1)
    for every in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="every"):
            HyperMonitor(opt, every=every)

    class Wrapper:                      # accelerate / Lightning style: .optimizer is the real one
        optimizer = opt
    assert HyperMonitor(Wrapper()).opt is opt
    monitor = HyperMonitor(opt)
    with pytest.raises(ValueError, match="HyperMonitor"):
        monitor.load_state_dict({"every": 1})
    with pytest.raises(TypeError, match="SummaryWriter"):
        monitor.write_tensorboard(object())


def test_state_dict_round_trip():
    _, monitor, _, _ = _run("greedy-tensor-adam-val", steps=4)
    sd = monitor.state_dict()
    model = _model()
    other = HyperMonitor(HyperOptimizer(torch.optim.SGD, model.parameters(), lr=0.1))
    other.load_state_dict(sd)
    assert other.history() == monitor.history() and other.every == monitor.every
    broken = dict(sd, rows=[(0, 0, 0, [1.0])])
    with pytest.raises(ValueError, match="inconsistent"):
        other.load_state_dict(broken)
    assert other.history() == monitor.history()        # unchanged after a refused load


def test_write_tensorboard_writes_the_history(tmp_path):
    event_accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator")
    opt, monitor, _, _ = _run("greedy-global-steplr-2groups", steps=4)
    assert monitor.write_tensorboard(tmp_path / "a") == len(monitor)
    from torch.utils.tensorboard import SummaryWriter
    writer = SummaryWriter(str(tmp_path / "b"))
    assert monitor.write_tensorboard(writer) == 0        # everything written already
    writer.close()
    acc = event_accumulator.EventAccumulator(str(tmp_path / "a"))
    acc.Reload()
    h = monitor.history()
    assert sorted(acc.Tags()["scalars"]) == sorted(f"hyper/{n}" for n in h
                                                   if n not in ("step", "hyperstep"))
    events = acc.Scalars("hyper/lr/1")
    assert [e.step for e in events] == h["step"]
    assert [e.value for e in events] == pytest.approx(h["lr/1"], rel=1e-6)   # stored as float32


def test_write_tensorboard_appends_only_new_records(tmp_path):
    event_accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator")
    model = _model()
    opt = HyperOptimizer(torch.optim.SGD, model.parameters(), lr=0.1)
    monitor = HyperMonitor(opt)
    for i in range(3):
        _step(opt, model, i, closure=False)
    assert monitor.write_tensorboard(tmp_path) == 3       # records at steps 0, 2, 3
    for i in range(3, 5):
        _step(opt, model, i, closure=False)
    assert monitor.write_tensorboard(tmp_path) == 2
    acc = event_accumulator.EventAccumulator(str(tmp_path))
    acc.Reload()
    assert [e.step for e in acc.Scalars("hyper/lr/0")] == [0, 2, 3, 4, 5]


def test_optional_dependencies_name_their_install(monkeypatch, tmp_path):
    model = _model()
    monitor = HyperMonitor(HyperOptimizer(torch.optim.SGD, model.parameters(), lr=0.1))
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match="pip install tensorboard"):
        monitor.write_tensorboard(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        monitor.plot()


def test_plot_draws_one_panel_per_tuned_kind(tmp_path):
    pytest.importorskip("matplotlib")
    _, monitor, _, _ = _run("greedy-tensor-adam-val", steps=5)
    path = tmp_path / "hyper.png"
    fig = monitor.plot(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    axes = fig.axes
    assert [a.get_title() for a in axes] == ["lr in use", "momentum in use",
                                             "weight_decay in use", "hypergradient norm"]
    assert [a.get_yscale() for a in axes] == ["log", "linear", "log", "log"]
    h = monitor.history()
    line = axes[0].get_lines()[0]
    assert list(line.get_xdata()) == h["step"] and list(line.get_ydata()) == h["lr/0/mean"]
    assert [ln.get_label() for ln in axes[3].get_lines()] == ["lr", "momentum", "weight_decay"]


def test_an_optimizer_with_a_scheduler_pickles():
    import pickle
    model = _model()
    opt = HyperOptimizer(torch.optim.SGD, model.parameters(), lr=0.1)
    torch.optim.lr_scheduler.StepLR(opt, step_size=2)
    again = pickle.loads(pickle.dumps(opt))
    assert "step" not in again.__dict__
    assert again.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
