"""The curvature sources and the replay protocol of second-order methods, on real modules.

What a user of ``Implicit``/``Unroll`` relies on: after ``step()`` the weights, ``p.grad``,
torch's RNG stream and (with ``FiniteDifferences(model=...)``) BatchNorm buffers are exactly
what the plain loop would leave; dropout masks repeat in a replay; the two sources agree;
missing sources and closures that do not bind their batch raise errors that show the fix;
a non-finite gradient on a recorded step skips the hyper-step; ``hyper_lr=0`` reproduces
torch.optim with either source; save/resume and deepcopy mid-window restart the window.
"""
from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from problems import forbid_host_sync

from hyperopt_wrap import CurvatureError, FiniteDifferences, HyperOptimizer, Implicit, Unroll

DT = torch.float64


def _data(n=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=gen, dtype=DT)
    y = torch.randint(0, 3, (n,), generator=gen)
    return x, y


def _model(dropout=0.0, batchnorm=False, seed=1):
    torch.manual_seed(seed)
    layers = [nn.Linear(6, 8)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(8))
    layers += [nn.Tanh(), nn.Dropout(dropout), nn.Linear(8, 3)]
    return nn.Sequential(*layers).to(DT)


def _batches(x, y, size=8):
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


def _closure(opt, model, x, y):
    opt.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return loss


def _train(method, source, *, steps=9, dropout=0.0, batchnorm=False, opt_cls=torch.optim.SGD,
           curvature="auto", seed=1, **kw):
    model = _model(dropout, batchnorm, seed)
    opt = HyperOptimizer(opt_cls, model.parameters(), method=method, update_every=4,
                         curvature=curvature, tune=("lr", "momentum"),
                         **({"lr": 0.1, "momentum": 0.9} if opt_cls is torch.optim.SGD
                            else {"lr": 0.01}), **kw)
    x, y = _data()
    torch.manual_seed(123)
    for t, (xb, yb) in zip(range(steps), _batches(x, y) * 3):
        _step(opt, model, xb, yb, source)
    return model, opt


def _step(opt, model, x, y, source):
    """One training step feeding the given curvature source."""
    if source == "graph":
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward(create_graph=opt.needs_graph)
        opt.step()
    else:
        opt.step(functools.partial(_closure, opt, model, x, y))


def _lr(opt):
    return float(opt.hyperparameters()["lr"][0])


@pytest.mark.parametrize("method", [Implicit(3), Unroll(3)], ids=repr)
def test_graph_and_closure_sources_agree(method):
    _, g = _train(method, "graph")
    _, c = _train(method, "closure")
    _, cc = _train(method, "closure", curvature=FiniteDifferences(central=True))
    hg = {k: v for k, v in g.last_hypergradient().items()}
    for other, tol in ((c, 1e-6), (cc, 1e-8)):
        for kind, v in other.last_hypergradient().items():
            assert torch.allclose(v[0], hg[kind][0], rtol=tol, atol=0), (kind, v, hg[kind])
    assert g.hypersteps == 2


@pytest.mark.parametrize("source", ["graph", "closure"])
@pytest.mark.parametrize("method", [Implicit(3), Unroll(4)], ids=repr)
def test_weights_grads_and_rng_are_what_the_plain_loop_leaves(method, source):
    """hyper_lr=0: the weights follow torch.optim bit-exactly (replays restore them), p.grad
    after step() is the user's gradient, the user's RNG stream is untouched, and data_ptr never
    changes."""
    model, opt = _train(method, source, dropout=0.3, hyper_lr=0.0)
    rng_after = torch.get_rng_state()
    ref = _model(0.3)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    x, y = _data()
    torch.manual_seed(123)
    ptrs = [p.data_ptr() for p in model.parameters()]
    for t, (xb, yb) in zip(range(9), _batches(x, y) * 3):
        ref_opt.step(functools.partial(_closure, ref_opt, ref, xb, yb))
    assert torch.equal(torch.get_rng_state(), rng_after)
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(p.grad, q.grad) and not p.grad.requires_grad
    assert ptrs == [p.data_ptr() for p in model.parameters()]
    assert opt.hypersteps == 2


def test_dropout_masks_repeat_in_closure_replays():
    """With dropout the closure's finite differences match the exact graph products only
    because the replay restores the RNG the step started from."""
    _, g = _train(Unroll(3), "graph", dropout=0.5)
    _, c = _train(Unroll(3), "closure", dropout=0.5)
    a, b = g.last_hypergradient()["lr"][0], c.last_hypergradient()["lr"][0]
    assert torch.allclose(a, b, rtol=1e-6, atol=0), (a, b)


def test_batchnorm_buffers_protected_with_model():
    def run(protect: bool):
        model = _model(batchnorm=True)
        opt = HyperOptimizer(torch.optim.SGD, model.parameters(), method=Unroll(3),
                             update_every=4, hyper_lr=0.0, lr=0.1, momentum=0.9,
                             curvature=FiniteDifferences(model=model if protect else None))
        for xb, yb in _batches(*_data()):
            opt.step(functools.partial(_closure, opt, model, xb, yb))
        assert opt.hypersteps == 1          # 8 steps: window 1 replayed at step 5
        return [b.clone() for b in model.buffers()]

    ref = _model(batchnorm=True)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    for xb, yb in _batches(*_data()):
        ref_opt.step(functools.partial(_closure, ref_opt, ref, xb, yb))
    expected = [b.clone() for b in ref.buffers()]
    assert all(torch.equal(a, b) for a, b in zip(run(True), expected))
    # without model= the replays' forward passes move the running statistics
    assert not all(torch.equal(a, b) for a, b in zip(run(False), expected))


def test_closure_capturing_its_batch_by_reference_is_caught():
    model = _model()
    opt = HyperOptimizer(torch.optim.SGD, model.parameters(), method=Unroll(3), update_every=4,
                         lr=0.1, momentum=0.9)
    x, y = _data()
    w_before = None
    with pytest.raises(CurvatureError, match="bind the batch"):
        for xb, yb in _batches(x, y):
            def closure():                       # the common mistake: xb, yb by reference
                opt.zero_grad()
                loss = F.cross_entropy(model(xb), yb)
                loss.backward()
                return loss
            w_before = [p.detach().clone() for p in model.parameters()]
            opt.step(closure)
    # the raising step restored the weights it had replayed over
    for p, w in zip(model.parameters(), w_before):
        assert torch.equal(p, w)


@pytest.mark.parametrize("method", [Implicit(), Unroll(2)], ids=repr)
def test_plain_loop_without_a_source_raises_with_both_fixes(method):
    model = _model()
    opt = HyperOptimizer(torch.optim.SGD, model.parameters(), method=method, lr=0.1)
    x, y = _data()
    with pytest.raises(CurvatureError) as err:
        for _ in range(12):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            before = [p.detach().clone() for p in model.parameters()]
            opt.step()
    msg = str(err.value)
    assert "create_graph=opt.needs_graph" in msg and "opt.step(closure)" in msg
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_graph_curvature_requires_a_graph():
    model = _model()
    opt = HyperOptimizer(torch.optim.SGD, model.parameters(), method=Implicit(), lr=0.1,
                         update_every=1, curvature="graph")
    x, y = _data()
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(CurvatureError, match="create_graph=opt.needs_graph"):
        opt.step(functools.partial(_closure, opt, model, x, y))


def test_needs_graph_only_on_recorded_steps():
    for method, expected in ((Implicit(), [False] * 9 + [True]),
                             (Unroll(3), [False] * 7 + [True] * 3)):
        model = _model()
        opt = HyperOptimizer(torch.optim.SGD, model.parameters(), method=method, lr=0.1)
        x, y = _data()
        seen = []
        for _ in range(2):
            for _ in range(10):
                seen.append(opt.needs_graph)
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward(create_graph=opt.needs_graph)
                opt.step()
        assert seen == expected * 2, (method, seen)
    fd = HyperOptimizer(torch.optim.SGD, _model().parameters(), method=Implicit(), lr=0.1,
                        curvature="closure", update_every=1)
    assert not fd.needs_graph


def test_stale_graph_raises_after_the_window_like_after_a_torch_step():
    model = _model()
    opt = HyperOptimizer(torch.optim.SGD, model.parameters(), method=Implicit(), lr=0.1,
                         update_every=1, val_loss=lambda: F.cross_entropy(model(x), y))
    x, y = _data()
    loss = F.cross_entropy(model(x), y)
    loss.backward(create_graph=True, retain_graph=True)
    opt.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_nan_gradient_on_a_recorded_step_skips_the_hyper_step():
    model = _model()
    opt = HyperOptimizer(torch.optim.SGD, model.parameters(), method=Unroll(2), update_every=3,
                         lr=0.1, momentum=0.9, recovery=None)      # (the skip alone)
    x, y = _data()
    lr0 = _lr(opt)
    for t in range(4):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward(create_graph=opt.needs_graph)
        if t == 2:
            next(model.parameters()).grad.detach_()[0, 0] = float("nan")
        opt.step()
    assert opt.skipped_steps == 1 and opt.skipped_hypersteps == 1
    assert _lr(opt) == lr0
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("method", [Implicit(2), Unroll(2)], ids=repr)
def test_save_resume_and_deepcopy_mid_window_restart_the_window(method):
    model, opt = _train(method, "graph", steps=6)     # 2 steps into window 2
    clone = copy.deepcopy(opt)
    assert clone.tape == [] and not opt.window_complete
    sd = opt.state_dict()
    model2 = copy.deepcopy(model)
    opt2 = HyperOptimizer(torch.optim.SGD, model2.parameters(), method=method, update_every=4,
                          tune=("lr", "momentum"), lr=0.1, momentum=0.9)
    opt2.load_state_dict(sd)
    assert opt2.tape == [] and opt2.hypersteps == opt.hypersteps
    x, y = _data()
    for _ in range(5):        # a full window after resuming: one more hyper-step, finite
        opt2.zero_grad()
        F.cross_entropy(model2(x), y).backward(create_graph=opt2.needs_graph)
        opt2.step()
    assert opt2.hypersteps == opt.hypersteps + 1
    assert torch.isfinite(opt2.last_hypergradient()["lr"][0])


@pytest.mark.parametrize("opt_cls", [torch.optim.SGD, torch.optim.Adam])
def test_adam_and_sgd_train_with_either_source(opt_cls):
    """A short run moves lr without NaNs and lowers the training loss."""
    x, y = _data()
    with torch.no_grad():
        before = float(F.cross_entropy(_model()(x), y))
    for source in ("graph", "closure"):
        model, opt = _train(Implicit(), source, steps=40, opt_cls=opt_cls)
        assert opt.hypersteps >= 3 and opt.skipped_hypersteps == 0
        assert _lr(opt) != opt.tuned["lr"].initial
        assert torch.isfinite(torch.stack([p.sum() for p in model.parameters()])).all()
        with torch.no_grad():
            assert float(F.cross_entropy(model(x), y)) < before


def test_bad_input():
    with pytest.raises(ValueError, match="neumann_terms"):
        Implicit(neumann_terms=0)
    with pytest.raises(ValueError, match="horizon"):
        Unroll(horizon=0)
    with pytest.raises(ValueError, match="update_every >= 5"):
        HyperOptimizer(torch.optim.SGD, _model().parameters(), method=Unroll(5),
                       update_every=3, lr=0.1)
    with pytest.raises(ValueError, match="curvature"):
        HyperOptimizer(torch.optim.SGD, _model().parameters(), method=Implicit(), lr=0.1,
                       curvature="hessian")
    with pytest.raises(ValueError, match="rel_eps"):
        FiniteDifferences(rel_eps=2.0)
    with pytest.raises(TypeError, match="nn.Module"):
        FiniteDifferences(model="net")


def test_defaults_are_the_authors():
    opt = HyperOptimizer(torch.optim.SGD, _model().parameters(), method="implicit", lr=0.1,
                         momentum=0.9, tune=("lr", "momentum"))
    assert opt.update_every == 10 and opt.method.neumann_terms == 5
    assert not opt.method.include_state
    lrs = {g["kind"]: g["lr"] for g in opt.hyper_optimizer.param_groups}
    assert lrs["lr"] == pytest.approx(0.05 * 2.302585092994046) and lrs["momentum"] == 0.05
    un = HyperOptimizer(torch.optim.SGD, _model().parameters(), method="unroll", lr=0.1)
    assert un.method.horizon == 5 and un.update_every == 10


@pytest.mark.parametrize("source", ["graph", "closure"])
@pytest.mark.parametrize("method", [Implicit(3), Unroll(3)], ids=repr)
def test_second_order_steps_make_no_host_synchronisation(monkeypatch, method, source):
    """Recording, replaying and the hyper-step decide on the device.  The one exception is
    the check, at the first replay of an earlier step's closure, that the closure binds its
    batch (one comparison in the run), so the guarded steps come after it."""
    model, opt = _train(method, source, steps=8)       # two windows: the check has run
    assert opt.hypersteps >= 1
    x, y = _data()
    allowed = set()
    for xb, yb in _batches(x, y)[:8]:
        allowed |= {id(s["step"]) for s in opt.hyper_optimizer.state.values() if "step" in s}
        with forbid_host_sync(monkeypatch, allowed):
            _step(opt, model, xb, yb, source)
    assert opt.hypersteps >= 3
