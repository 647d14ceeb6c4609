"""Device-parametrised checks: the CPU always, CUDA when a GPU is present (skipped otherwise).

For every method and both curvature sources: with the hyper learning rate at 0 the weights
follow the wrapped torch.optim optimizer step for step; parameters and their state are updated
in place (``data_ptr`` unchanged); ``step()`` makes no host synchronisation (on CUDA under
``torch.cuda.set_sync_debug_mode("error")``, everywhere with the host-read guard of
``problems.forbid_host_sync``).
"""
from __future__ import annotations

import contextlib

import pytest
import torch

from problems import forbid_host_sync

from hyperopt_wrap import RTRL, SGLD, Distill, ForwardGradient, HyperOptimizer, Implicit, Unroll

DEVICES = [pytest.param("cpu", id="cpu"),
           pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(
               not torch.cuda.is_available(), reason="no CUDA device here"))]
METHODS = {"greedy": lambda: "greedy", "implicit": lambda: Implicit(neumann_terms=3),
           "unroll": lambda: Unroll(horizon=2), "rtrl": lambda: RTRL(),
           "forward_gradient": lambda: ForwardGradient(directions=2),
           # temperature 0 in the parity test: Langevin noise moves the weights off torch's path
           "sgld": lambda: SGLD(temperature=1e-4, seed=0),
           "distill": lambda: Distill(gamma=0.9, refit_every=1, horizon=2)}
CLOSURE_ONLY = {"distill"}     # evaluates the loss at the distilled weights: needs a closure
BASES = {"sgd": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-3, nesterov=True)),
         "adam": (torch.optim.Adam, dict(lr=1e-2, weight_decay=1e-3))}
KINDS = ("lr", "momentum", "weight_decay")


def _model(device, dtype):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(),
                               torch.nn.Linear(16, 3)).to(device, dtype)


def _batches(device, dtype, n=8):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 6, generator=g, dtype=dtype).to(device),
             torch.randn(16, 3, generator=g, dtype=dtype).to(device)) for _ in range(n)]


def _step(opt, model, batch, source):
    x, y = batch

    def closure(x=x, y=y):
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward(create_graph=source == "graph" and opt.needs_graph)
        return loss
    if source == "closure":
        opt.step(closure)
    else:
        closure()
        opt.step()


def _make(model, base, method, source, hyper_lr=None):
    cls, kwargs = BASES[base]
    extra = {} if hyper_lr is None else {"hyper_lr": hyper_lr}
    made = METHODS[method]()
    if method == "sgld" and hyper_lr == 0:
        made = SGLD(temperature=0.0)
    return HyperOptimizer(cls, model.parameters(), method=made, tune=KINDS,
                          update_every=3, curvature="closure" if source == "closure" else "auto",
                          **extra, **kwargs)


def _dtype(device):
    return torch.float64 if device == "cpu" else torch.float32


# every method with each curvature source it takes
METHOD_SOURCES = [(m, s) for m in sorted(METHODS) for s in ("graph", "closure")
                  if not (m in CLOSURE_ONLY and s == "graph")]


@pytest.mark.parametrize("method,source", METHOD_SOURCES)
@pytest.mark.parametrize("base", sorted(BASES))
@pytest.mark.parametrize("device", DEVICES)
def test_hyper_lr_zero_follows_torch_in_place(device, base, method, source):
    dtype = _dtype(device)
    ours_model, torch_model = _model(device, dtype), _model(device, dtype)
    opt = _make(ours_model, base, method, source, hyper_lr=0.0)
    cls, kwargs = BASES[base]
    ref = cls(torch_model.parameters(), **kwargs)
    batches = _batches(device, dtype)
    _step(opt, ours_model, batches[0], source)
    ptrs = [p.data_ptr() for p in ours_model.parameters()]
    state_ptrs = [v.data_ptr() for p in ours_model.parameters() for v in opt.state[p].values()
                  if isinstance(v, torch.Tensor)]
    _step(ref, torch_model, batches[0], "plain")
    for batch in batches[1:]:
        _step(opt, ours_model, batch, source)
        _step(ref, torch_model, batch, "plain")
    assert [p.data_ptr() for p in ours_model.parameters()] == ptrs
    assert [v.data_ptr() for p in ours_model.parameters() for v in opt.state[p].values()
            if isinstance(v, torch.Tensor)] == state_ptrs
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    for a, b in zip(ours_model.parameters(), torch_model.parameters()):
        torch.testing.assert_close(a, b, **tol)
    assert opt.hypersteps >= 2


@contextlib.contextmanager
def _no_sync(device, monkeypatch, allowed):
    if device == "cuda":
        torch.cuda.synchronize()
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            with forbid_host_sync(monkeypatch, allowed):
                yield
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    else:
        with forbid_host_sync(monkeypatch, allowed):
            yield


@pytest.mark.parametrize("method,source", METHOD_SOURCES)
@pytest.mark.parametrize("base", sorted(BASES))
@pytest.mark.parametrize("device", DEVICES)
def test_step_makes_no_host_synchronisation(device, base, method, source, monkeypatch):
    """Every step of two whole windows (recorded steps, replays, hyper-steps included), after a
    first window that warms up lazily created state (and checks an old closure's binding once:
    the one read on the host that is allowed, outside this check)."""
    dtype = _dtype(device)
    model = _model(device, dtype)
    opt = _make(model, base, method, source)
    batches = _batches(device, dtype)
    for batch in batches[:4]:
        _step(opt, model, batch, source)
    # torch's Adam hyper-optimizer keeps a CPU step counter that only exists on the CPU
    allowed = {id(s["step"]) for s in opt.hyper_optimizer.state.values() if "step" in s}
    for batch in batches[4:]:
        # the closure (user code) runs inside step(); only the optimizer's own work is checked
        x, y = batch
        if source == "closure":
            with _no_sync(device, monkeypatch, allowed):
                opt.step(lambda x=x, y=y: _closure_loss(opt, model, x, y))
        else:
            opt.zero_grad()
            ((model(x) - y) ** 2).mean().backward(create_graph=opt.needs_graph)
            with _no_sync(device, monkeypatch, allowed):
                opt.step()
    assert opt.hypersteps >= 2 and opt.skipped_hypersteps == 0


def _closure_loss(opt, model, x, y):
    opt.zero_grad()
    loss = ((model(x) - y) ** 2).mean()
    loss.backward()
    return loss


# the fused step (torch's _fused_sgd_ / _fused_adam_ on the gradients themselves): greedy with a
# shared or per-tensor lr on heavy-ball SGD or Adam, and implicit between its recorded steps
FUSED_BASES = {"sgd": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-3)),
               "adam": (torch.optim.Adam, dict(lr=1e-2, weight_decay=1e-3))}


@pytest.mark.parametrize("method", ["greedy", "implicit"])
@pytest.mark.parametrize("granularity", ["global", "tensor"])
@pytest.mark.parametrize("base", sorted(FUSED_BASES))
@pytest.mark.parametrize("device", DEVICES)
def test_the_fused_step_follows_torch_in_place_without_host_sync(device, base, granularity,
                                                                  method, monkeypatch):
    from hyperopt_wrap.stepper import Stepper
    calls = []
    original = Stepper.step_fused

    def spy(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)
    monkeypatch.setattr(Stepper, "step_fused", spy)
    dtype = _dtype(device)
    cls, kwargs = FUSED_BASES[base]
    batches = _batches(device, dtype)

    def make(model, hyper_lr=None):
        extra = {} if hyper_lr is None else {"hyper_lr": hyper_lr}
        return HyperOptimizer(cls, model.parameters(), method=method, tune=("lr",),
                              granularity=granularity, update_every=3, **extra, **kwargs)
    # parity with torch at hyper_lr 0, parameters and state written in place
    ours_model, torch_model = _model(device, dtype), _model(device, dtype)
    opt, ref = make(ours_model, hyper_lr=0.0), cls(torch_model.parameters(), **kwargs)
    _step(opt, ours_model, batches[0], "closure")
    _step(ref, torch_model, batches[0], "plain")
    ptrs = [p.data_ptr() for p in ours_model.parameters()] + [
        v.data_ptr() for p in ours_model.parameters() for v in opt.state[p].values()]
    for batch in batches[1:]:
        _step(opt, ours_model, batch, "closure")
        _step(ref, torch_model, batch, "plain")
    assert calls, "the fused step was not taken"
    assert [p.data_ptr() for p in ours_model.parameters()] + [
        v.data_ptr() for p in ours_model.parameters() for v in opt.state[p].values()] == ptrs
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    for a, b in zip(ours_model.parameters(), torch_model.parameters()):
        torch.testing.assert_close(a, b, **tol)
    # no host synchronisation in the fused steps (tuning on)
    model = _model(device, dtype)
    opt = make(model)
    for batch in batches[:4]:
        _step(opt, model, batch, "closure")
    allowed = {id(s["step"]) for s in opt.hyper_optimizer.state.values() if "step" in s}
    before = len(calls)
    for x, y in batches[4:]:
        with _no_sync(device, monkeypatch, allowed):
            opt.step(lambda x=x, y=y: _closure_loss(opt, model, x, y))
    assert len(calls) > before and opt.skipped_hypersteps == 0
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("method", ["greedy", "implicit"])
@pytest.mark.parametrize("granularity", ["tensor", "element"])
@pytest.mark.parametrize("device", DEVICES)
def test_hierarchical_steps_on_the_device_without_host_sync(device, granularity, method,
                                                            monkeypatch):
    """The default hyper-optimizer per tensor and per element (Hierarchical: a normalised
    level for greedy with val_loss, an Adam level for implicit) makes no host synchronisation;
    its state and the tuned values stay on the parameters' device."""
    from hyperopt_wrap import Hierarchical
    dtype = _dtype(device)
    model = _model(device, dtype)
    xv, yv = _batches(device, dtype, 9)[-1]
    opt = HyperOptimizer(torch.optim.SGD, model.parameters(), method=method, tune=KINDS,
                         granularity={"lr": granularity, "momentum": "global",
                                      "weight_decay": "global"},
                         update_every=1 if method == "greedy" else 3, lr=0.05, momentum=0.9,
                         weight_decay=1e-3, val_loss=lambda: ((model(xv) - yv) ** 2).mean())
    assert type(opt.hyper_optimizer) is Hierarchical
    batches = _batches(device, dtype)
    for batch in batches[:4]:
        _step(opt, model, batch, "closure")
    for x, y in batches[4:]:
        with _no_sync(device, monkeypatch, set()):
            opt.step(lambda x=x, y=y: _closure_loss(opt, model, x, y))
    assert opt.hypersteps >= 2 and opt.skipped_hypersteps == 0
    states = [v for st in opt.hyper_optimizer.state.values() for v in st.values()]
    assert states and all(v.device.type == device for v in states)
    lrs = opt.hyperparameters()["lr"][0]
    lrs = lrs if isinstance(lrs, list) else [lrs]
    assert all(t.device.type == device and torch.isfinite(t).all() for t in lrs)
    assert len({float(v) for t in lrs for v in t.reshape(-1)}) > 1     # the entries differ
