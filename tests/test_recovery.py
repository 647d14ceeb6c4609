"""Runs that recover: a learning rate far too small is rescued (scale-free hypergradients), a
step skipped for a non-finite gradient backs the lr off, the default ``recovery="restore"``
returns a run that diverged to its last copy, ``recovery="rollback"`` catches a blow-up in
finite arithmetic a step at a time, and the default hyper-optimizer (NormalizedMomentum) skips,
saves and resumes exactly."""
import copy
import io
import math

import warnings

import pytest
import torch
from torch import nn

import hyperopt_wrap.optimizer as optimizer_module
from hyperopt_wrap import NormalizedMomentum, HyperOptimizer
from hyperopt_wrap.demo import load_digits_split, make_model, minibatches

_DIGITS = load_digits_split(0)
_CE = nn.CrossEntropyLoss()


def _digits_run(cls, kwargs, lr0, steps, **hyper):
    model = make_model(0, 50, "tanh")
    d = _DIGITS
    xv, yv = d.x_val[:100], d.y_val[:100]
    opt = HyperOptimizer(cls, model.parameters(), lr=lr0, **kwargs, **hyper,
                         val_loss=lambda: _CE(model(xv), yv))
    lrs, losses = [], []
    for idx in minibatches(len(d.x_train), steps, 50, 0):
        opt.zero_grad()
        loss = _CE(model(d.x_train[idx]), d.y_train[idx])
        loss.backward()
        opt.step()
        lrs.append(float(opt.hyperparameters()["lr"][0]))
        losses.append(float(loss.detach()))
    return lrs, losses


@pytest.mark.parametrize("lr0", [1e-9, 1e-10])
@pytest.mark.parametrize("cls,kwargs,useful", [
    (torch.optim.SGD, {}, 1e-2),
    (torch.optim.SGD, {"momentum": 0.9}, 1e-2),
    (torch.optim.Adam, {}, 1e-3),
], ids=["sgd", "sgd-momentum", "adam"])
def test_a_learning_rate_far_too_small_is_rescued_within_a_few_hundred_steps(cls, kwargs,
                                                                            useful, lr0):
    """From lr 1e-9 (and from the default lower bound 1e-10) on digits, with a validation
    loss, the raw hypergradient ``lr dE/dlr`` is about 1e-10: torch's Adam as the
    hyper-optimizer, whose eps is 1e-8, barely moves it.  Greedy's default with val_loss,
    NormalizedMomentum, steps relative to the hypergradient's own scale, so log lr grows at
    hyper_lr a step."""
    lrs, losses = _digits_run(cls, kwargs, lr0, 450)
    reached = next((i for i, lr in enumerate(lrs) if lr >= useful), None)
    assert reached is not None and reached < 400, (reached, lrs[-1])
    assert sum(losses[-20:]) / 20 < 0.5 * losses[0]
    # the same run with torch's Adam as the hyper-optimizer, for contrast: stuck
    if cls is torch.optim.SGD and not kwargs and lr0 == 1e-10:
        stuck, _ = _digits_run(cls, kwargs, lr0, 450, hyper_optimizer=torch.optim.Adam)
        assert max(stuck) < 1e-8, max(stuck)


def _diabetes():
    from sklearn.datasets import load_diabetes
    x, y = load_diabetes(return_X_y=True)
    x = torch.as_tensor(x, dtype=torch.float32)
    y = torch.as_tensor(y, dtype=torch.float32).unsqueeze(1)
    x = (x - x.mean(0)) / x.std(0)
    y = (y - y.mean(0)) / y.std(0)
    return x, y


@pytest.mark.parametrize("val", [True, False], ids=["val_loss", "next-batch"])
@pytest.mark.parametrize("tune,extra", [
    (("lr",), {}),
    (("lr", "momentum", "weight_decay"), {"momentum": 0.9, "weight_decay": 1e-4}),
], ids=["lr", "lr-momentum-wd"])
def test_a_run_that_blew_up_recovers(tune, extra, val):
    """SGD at lr=10 on diabetes (MSE, ReLU MLP): the loss grows by orders of magnitude a step
    until every gradient overflows.  Skipping alone freezes the run there (296 of 300 steps
    skipped, the loss inf; 1496 of 1500), and so does backing the lr off (the weights stay
    where every gradient overflows).  The default ``recovery="restore"`` returns to the copy
    of the weights taken before the first step, with the lr backed off (at most 3 halvings a
    50-step stretch: frozen, every step would halve it down to its bound, where the
    hyper-optimizer of a run without ``val_loss``, Adam, cannot lift it), and
    ``recovery="rollback"`` to where the last good step started, halving the lr each time:
    both runs end below their initial loss, with and without a validation loss."""
    x, y = _diabetes()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 50), nn.ReLU(), nn.Linear(50, 1))
    mse = nn.MSELoss()
    results = {}
    for recovery in (None, "backoff", "rollback", "restore"):
        m = copy.deepcopy(model)
        opt = HyperOptimizer(torch.optim.SGD, m.parameters(), lr=10.0, tune=tune,
                             bounds={"lr": (1e-10, 10.0)}, recovery=recovery,
                             val_loss=(lambda m=m: mse(m(x), y)) if val else None, **extra)
        with torch.no_grad():
            initial = float(mse(m(x), y))
        # (1200 steps: at 600 the run with lr, momentum and weight decay tuned is still
        # oscillating back from its blow-up, above or below its initial loss by the CPU's
        # rounding: 2.86 on one machine; by 1000 it descends steadily, 0.45 at 1200)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(1200 if recovery in ("rollback", "restore") else 300):
                opt.zero_grad()
                mse(m(x), y).backward()
                opt.step()
        with torch.no_grad():
            results[recovery] = (initial, float(mse(m(x), y)), opt.skipped_steps, opt.restores,
                                 [str(w.message) for w in caught])
    for recovery, most in (("rollback", 100), ("restore", 400)):
        initial, final, skipped, _, _ = results[recovery]
        assert math.isfinite(final) and final < initial, results
        assert 0 < skipped < most, results
    for recovery in (None, "backoff"):     # the trap
        assert not math.isfinite(results[recovery][1]) and results[recovery][2] > 290, results
        assert results[recovery][3] == 0
    restores, messages = results["restore"][3:]
    assert restores >= 1
    said = [m for m in messages if "returned to their last copy" in m]
    assert len(said) == 1 and "opt.restores" in said[0] and "recovery='backoff'" in said[0]


def _steps(opt, model, n, gen, bad=(), closure=False):
    """``n`` steps of a quadratic loss on fresh inputs; the gradient is NaN at the steps
    (counted from 1 by ``opt.steps``) in ``bad``."""
    for _ in range(n):
        x = torch.randn(5, 4, dtype=torch.float64, generator=gen)
        if opt.steps + 1 in bad:
            x[0, 0] = math.nan
        if closure:
            def loss(x=x):
                opt.zero_grad()
                value = model(x).pow(2).sum()
                value.backward()
                return value
            opt.step(loss)
            continue
        opt.zero_grad()
        model(x).pow(2).sum().backward(create_graph=opt.needs_graph)
        opt.step()


def _weights_and_state(opt, model):
    out = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        out += [v.clone() for v in opt.state[p].values() if torch.is_tensor(v)]
    return out


@pytest.mark.parametrize("cls,kwargs", [
    (torch.optim.SGD, {"momentum": 0.9}),
    (torch.optim.Adam, {"weight_decay": 1e-3}),
], ids=["sgd-momentum", "adam"])
@pytest.mark.parametrize("method", ["greedy", "rtrl"])
def test_the_restore_point_changes_nothing_in_a_run_without_skips(cls, kwargs, method):
    """Without a skipped step the default ``recovery="restore"`` is bit for bit the run of
    ``recovery="backoff"`` (it only copies, every 50 steps), and a single bad batch is only
    skipped (no return)."""
    runs = []
    for recovery in ("restore", "backoff"):
        model = _tiny()
        opt = HyperOptimizer(cls, model.parameters(), lr=0.01, tune=("lr",), method=method,
                             recovery=recovery, **kwargs)
        _steps(opt, model, 120, torch.Generator().manual_seed(1), bad=(70,))
        runs.append((opt, _weights_and_state(opt, model), opt.hyperparameters()["lr"][0]))
    (a, wa, la), (b, wb, lb) = runs
    assert a.skipped_steps == b.skipped_steps == 1 and a.restores == 0
    assert all(torch.equal(x, y) for x, y in zip(wa, wb)) and torch.equal(la, lb)


@pytest.mark.parametrize("at_once", [True, False], ids=["cpu-read", "deferred-read"])
@pytest.mark.parametrize("method", ["greedy", "rtrl"])
@pytest.mark.filterwarnings("ignore:HyperOptimizer. at least")
def test_a_diverged_stretch_returns_to_the_last_copy_exactly(monkeypatch, at_once, method):
    """Three NaN steps among steps 51-100: at the look after step 100 the weights and
    optimizer state return bit for bit to their copy from step 50, the method's carried state
    starts afresh and the lr keeps its back-off.  Off the CPU the count is read a look later
    (no host synchronisation): the return then comes after step 150, to the same copy (the
    stretch with skips refreshed nothing)."""
    if not at_once:
        monkeypatch.setattr(optimizer_module, "_reads_at_once", lambda device: False)
    model = _tiny()
    opt = HyperOptimizer(torch.optim.SGD, model.parameters(), lr=0.05, momentum=0.9,
                         tune=("lr", "momentum"), method=method)
    gen = torch.Generator().manual_seed(2)
    _steps(opt, model, 50, gen)
    copy_at_50 = _weights_and_state(opt, model)
    lr_at_50 = float(opt.hyperparameters()["lr"][0])
    _steps(opt, model, 50, gen, bad=(60, 61, 62))
    assert opt.skipped_steps == 3
    if not at_once:
        assert opt.restores == 0
        _steps(opt, model, 50, gen)
    assert opt.restores == 1
    assert all(torch.equal(x, y) for x, y in zip(_weights_and_state(opt, model), copy_at_50))
    # the lr is not part of the copy: it keeps the three halvings (and the hyper-steps since)
    assert float(opt.hyperparameters()["lr"][0]) != lr_at_50
    if method == "rtrl":
        assert all(not z["w"] for z in opt._method_state["Z"])   # the tangents start at 0
    else:
        assert opt._method_state == {"pending": None}            # greedy's one-step tangent
    _steps(opt, model, 60, gen)              # and the run goes on from there
    assert opt.restores == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.filterwarnings("ignore:HyperOptimizer. at least")
def test_a_return_keeps_a_capped_back_off_and_puts_a_ceiling_on_the_lr():
    """Ten NaN steps in a stretch halve the lr three times, not ten (frozen, every step would
    halve it down to its bound); after the return the lr may rise to at most 4x that, half
    the lr that diverged, also across a checkpoint."""
    model = _tiny()
    opt = HyperOptimizer(torch.optim.SGD, model.parameters(), lr=0.05, momentum=0.9,
                         hyper_lr=1e-9)          # (the hyper-steps move the lr by ~1e-9)
    gen = torch.Generator().manual_seed(7)
    _steps(opt, model, 50, gen)
    lr50 = float(opt.hyperparameters()["lr"][0])
    _steps(opt, model, 50, gen, bad=range(60, 70))
    assert opt.skipped_steps == 10 and opt.restores == 1
    assert float(opt.hyperparameters()["lr"][0]) == pytest.approx(lr50 / 8, rel=1e-6)
    (ceiling,) = opt._controller.lr_ceilings
    assert math.exp(float(ceiling)) == pytest.approx(lr50 / 2, rel=1e-6)
    with torch.no_grad():                        # a scheduler-free way to push the lr up:
        opt._controller.tuned["lr"].raws[0].add_(10.0)    # the next hyper-step clamps it
    _steps(opt, model, 2, gen)      # (the restarted greedy's first hyper-step is at its second)
    assert float(opt.hyperparameters()["lr"][0]) == pytest.approx(lr50 / 2, rel=1e-6)
    state = copy.deepcopy(opt.state_dict())
    twin_model = _tiny()
    twin = HyperOptimizer(torch.optim.SGD, twin_model.parameters(), lr=0.05, momentum=0.9,
                          hyper_lr=1e-9)
    twin.load_state_dict(state)
    assert torch.equal(twin._controller.lr_ceilings[0], ceiling)
    bad = copy.deepcopy(state)
    bad["hyper"]["controller"]["lr_ceilings"] = [torch.zeros(3)]
    with pytest.raises(Exception, match="lr_ceilings"):
        twin.load_state_dict(bad)


@pytest.mark.filterwarnings("ignore:HyperOptimizer. at least")
@pytest.mark.parametrize("granularity", ["group", "tensor", "element"])
def test_a_group_added_after_a_return_has_no_ceiling_and_the_run_saves(granularity):
    """The lr ceiling is per lr block; a param group added after a return brings blocks that
    have none (until the next return), and the run's checkpoint loads into a twin."""
    model = _tiny()
    extra = nn.Linear(4, 2).double()
    opt = HyperOptimizer(torch.optim.SGD, model.parameters(), lr=0.05, momentum=0.9,
                         granularity=granularity)
    gen = torch.Generator().manual_seed(11)
    _steps(opt, model, 100, gen, bad=(60, 61, 62))
    assert opt.restores == 1
    opt.add_param_group({"params": list(extra.parameters()), "lr": 0.01})
    for _ in range(3):
        opt.zero_grad()
        x = torch.randn(5, 4, dtype=torch.float64, generator=gen)
        (model(x).pow(2).sum() + extra(x).pow(2).sum()).backward()
        opt.step()
    state = copy.deepcopy(opt.state_dict())
    twin = HyperOptimizer(torch.optim.SGD, _tiny().parameters(), lr=0.05, momentum=0.9,
                          granularity=granularity)
    twin.add_param_group({"params": list(nn.Linear(4, 2).double().parameters()), "lr": 0.01})
    twin.load_state_dict(state)
    assert len(twin._controller.lr_ceilings) < len(twin._controller.tuned["lr"].raws)
    twin._controller.lower_lr_ceiling(0.0)       # a second return covers every block
    assert len(twin._controller.lr_ceilings) == len(twin._controller.tuned["lr"].raws)


@pytest.mark.filterwarnings("ignore:HyperOptimizer. at least")
def test_the_copy_holds_parameters_without_a_gradient_at_the_look():
    """A parameter with no gradient on the step of the look is copied too (the copy is of
    one moment), and a return puts it back with the others."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 3)).double()
    opt = HyperOptimizer(torch.optim.SGD, model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(8)

    def step(nan=False, second=True):
        opt.zero_grad()
        x = torch.randn(5, 4, dtype=torch.float64, generator=gen)
        if nan:
            x[0, 0] = math.nan
        model(x).pow(2).sum().backward()
        if not second:
            for p in model[1].parameters():
                p.grad = None
        opt.step()

    for i in range(1, 51):
        step(second=i != 50)
    at_50 = [p.detach().clone() for p in model.parameters()]
    for i in range(51, 101):
        step(nan=i in (60, 61, 62))
    assert opt.restores == 1
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), at_50))


@pytest.mark.filterwarnings("ignore:HyperOptimizer. at least")
@pytest.mark.parametrize("method", ["sgld", "forward_gradient", "distill"])
def test_a_return_restarts_a_method_without_replaying_its_randomness(method):
    """SGLD's noise, ForwardGradient's directions and Distill's fitted theta go on across a
    return (a fresh init_state would draw a new seed from torch's global RNG inside step(),
    replay the first directions, or forget the fit); the carried tangents start afresh."""
    from hyperopt_wrap import Distill
    model = _tiny()
    opt = HyperOptimizer(torch.optim.SGD, model.parameters(), lr=0.05, momentum=0.9,
                         tune=("lr", "momentum"), update_every=5,
                         method=Distill(refit_every=2, horizon=5) if method == "distill"
                         else method)
    closure = method == "distill"
    gen = torch.Generator().manual_seed(9)
    _steps(opt, model, 99, gen, bad=(60, 61, 62), closure=closure)
    before = copy.deepcopy(opt._method_state)
    rng = torch.get_rng_state()
    _steps(opt, model, 1, gen, closure=closure)       # step 100: the return
    assert opt.restores == 1
    assert torch.equal(torch.get_rng_state(), rng)
    after = opt._method_state
    if method == "sgld":
        assert after["seed"] == before["seed"]
        start = torch.Generator().manual_seed(before["seed"]).get_state()
        assert not torch.equal(after["rng"]["cpu"], start)      # not replayed from the start
        assert all(not z["w"] for z in after["Z"])
    elif method == "forward_gradient":
        assert after["fresh"] and after["Z"] == [] and after["directions"] == []
        start = torch.Generator().manual_seed(opt.method.seed).get_state()
        assert not torch.equal(after["generator"], start)
    else:
        assert after["w"] == {} and after["pending"] is None and float(after["t"]) == 0
        assert after["fits"] == before["fits"] > 0 and after["windows"] == before["windows"]
        assert all(torch.equal(after["theta"][k], before["theta"][k]) for k in after["theta"])


@pytest.mark.filterwarnings("ignore:HyperOptimizer. at least")
def test_off_the_cpu_the_look_waits_on_an_event_a_look_old_and_copies_drop_it(monkeypatch):
    """The deferred read records an event with its copy and waits on it only at the next look
    (50 steps later); deepcopy and pickle drop the pending look (an Event cannot be copied)."""
    events = []

    class FakeEvent:
        def __init__(self):
            self.waited = 0
            self.unpicklable = lambda: None      # as torch.Event: copy and pickle raise

        def synchronize(self):
            self.waited += 1

    def fake_event(device):
        events.append(FakeEvent())
        return events[-1]

    monkeypatch.setattr(optimizer_module, "_reads_at_once", lambda device: False)
    monkeypatch.setattr(optimizer_module, "_event", fake_event)
    model = _tiny()
    opt = HyperOptimizer(torch.optim.SGD, model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(10)
    _steps(opt, model, 100, gen, bad=(60, 61, 62))
    assert len(events) == 2 and events[0].waited == 1 and events[1].waited == 0
    assert opt.restores == 0 and opt._pending_restore[1] is events[1]
    twin = copy.deepcopy(opt)
    assert twin._pending_restore is None and not twin._stepper.has_restore_point()
    _steps(opt, model, 50, gen)
    assert opt.restores == 1 and events[1].waited == 1


@pytest.mark.filterwarnings("ignore:HyperOptimizer. at least")
def test_the_deferred_read_makes_no_host_synchronisation(monkeypatch):
    """Off the CPU the look reads only its own copy of the last look's count, made without
    waiting a look (50 steps) earlier."""
    from problems import forbid_host_sync
    monkeypatch.setattr(optimizer_module, "_reads_at_once", lambda device: False)
    model = _tiny()
    opt = HyperOptimizer(torch.optim.SGD, model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(4)
    _steps(opt, model, 99, gen, bad=(60, 61, 62))
    pending = opt._pending_restore
    assert pending is not None and pending[1] is None      # (a CPU tensor has no event)
    for _ in range(2):                       # steps 100 (a look) and 101
        opt.zero_grad()
        model(torch.randn(5, 4, dtype=torch.float64, generator=gen)).pow(2).sum().backward()
        with forbid_host_sync(monkeypatch, {id(pending[0])}):
            opt.step()
    assert opt.restores == 0                 # (step 100's count is read at step 150)
    _steps(opt, model, 49, gen)
    assert opt.restores == 1


@pytest.mark.filterwarnings("ignore:HyperOptimizer. at least")
def test_the_restore_point_is_counted_saved_and_forgotten_on_load():
    """The copy is in the memory accounting, a deepcopy starts without one, ``restores`` is
    saved and loaded (a checkpoint from before 0.6.3 loads as 0), and a load forgets the copy:
    a later return goes to the loaded weights, never to weights from before the load."""
    model = _tiny()
    opt = HyperOptimizer(torch.optim.SGD, model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(6)
    _steps(opt, model, 100, gen, bad=(60, 61, 62))
    assert opt.restores == 1
    numel = sum(t.numel() for t in opt.scratch_tensors())
    assert numel >= 2 * sum(p.numel() for p in model.parameters())   # weights + momentum copy
    twin = copy.deepcopy(opt)
    assert not twin._stepper.has_restore_point()
    state = copy.deepcopy(opt.state_dict())
    assert state["hyper"]["counters"]["restores"] == 1
    model2 = _tiny()
    fresh = HyperOptimizer(torch.optim.SGD, model2.parameters(), lr=0.05, momentum=0.9)
    _steps(fresh, model2, 30, gen)
    with torch.no_grad():
        for p, q in zip(model2.parameters(), model.parameters()):
            p.copy_(q)
    fresh.load_state_dict(state)
    assert fresh.restores == 1 and not fresh._stepper.has_restore_point()
    loaded = _weights_and_state(fresh, model2)
    # the first step after the load copies before it updates; the look after step 150 finds
    # three skips: back to the loaded weights and state, not to the fresh run's
    _steps(fresh, model2, 50, gen, bad=(110, 111, 112))
    assert fresh.restores == 2
    assert all(torch.equal(x, y) for x, y in zip(_weights_and_state(fresh, model2), loaded))
    old = copy.deepcopy(state)
    del old["hyper"]["counters"]["restores"]
    fresh.load_state_dict(old)
    assert fresh.restores == 0


def _tiny():
    torch.manual_seed(0)
    return nn.Linear(4, 3).double()


def _nan_step(opt, model, bad):
    opt.zero_grad()
    model(torch.randn(5, 4, dtype=torch.float64)).pow(2).sum().backward()
    if bad:
        model.weight.grad[0, 0] = math.nan
    opt.step()


@pytest.mark.parametrize("recovery", ["backoff", None])
def test_a_skipped_step_halves_the_tuned_lr_unless_recovery_is_off(recovery):
    model = _tiny()
    opt = HyperOptimizer(torch.optim.SGD, model.parameters(), lr=0.1, recovery=recovery,
                         tune=("lr", "momentum"), momentum=0.5)
    _nan_step(opt, model, False)
    before = {k: float(v[0]) for k, v in opt.hyperparameters().items()}
    w = model.weight.detach().clone()
    twin = copy.deepcopy((model, opt))
    _nan_step(opt, model, True)
    _nan_step(twin[1], twin[0], False)   # (the same RNG draw is not needed: only lr is read)
    after = {k: float(v[0]) for k, v in opt.hyperparameters().items()}
    assert torch.equal(model.weight, w) and opt.skipped_steps == 1
    assert after["momentum"] == before["momentum"]      # only the lr backs off
    expected = before["lr"] * (0.5 if recovery else 1.0)
    assert after["lr"] == pytest.approx(expected, rel=1e-6)


def test_an_amp_overflow_does_not_back_the_lr_off():
    """GradScaler's skips (``found_inf`` set by an AMP-aware caller) are loss-scale overflows,
    not a learning rate that is too large."""
    model = _tiny()
    opt = HyperOptimizer(torch.optim.SGD, model.parameters(), lr=0.1)
    _nan_step(opt, model, False)
    lr = float(opt.hyperparameters()["lr"][0])
    opt.found_inf = torch.ones(())
    _nan_step(opt, model, True)
    del opt.found_inf
    assert opt.skipped_steps == 1 and float(opt.hyperparameters()["lr"][0]) == lr


def test_normalized_momentum_skips_exactly_and_resumes_bit_for_bit():
    torch.manual_seed(0)
    blocks = [torch.randn(()).requires_grad_(), torch.randn(3).requires_grad_(),
              torch.randn(2, 4).requires_grad_()]
    opt = NormalizedMomentum(blocks, lr=0.05)
    grads = [[torch.randn_like(b) * 10 ** k for b in blocks] for k in range(-3, 3)]
    for gs in grads[:3]:
        for b, g in zip(blocks, gs):
            b.grad = g
        opt.step(found_inf=torch.zeros(()))
    values = [b.detach().clone() for b in blocks]
    state = copy.deepcopy(opt.state_dict())
    for b in blocks:
        b.grad = torch.full_like(b, math.nan)
    opt.step(found_inf=torch.ones(()))                    # skipped: nothing moves
    assert all(torch.equal(b, v) for b, v in zip(blocks, values))
    after = opt.state_dict()["state"]
    assert all(torch.equal(after[i][k], state["state"][i][k]) for i in after for k in after[i])
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    twin_blocks = [b.detach().clone().requires_grad_() for b in blocks]
    twin = NormalizedMomentum(twin_blocks, lr=0.05)
    twin.load_state_dict(torch.load(buf, weights_only=True))
    for gs in grads[3:]:
        for o, bs in ((opt, blocks), (twin, twin_blocks)):
            for b, g in zip(bs, gs):
                b.grad = g.clone()
            o.step()
    assert all(torch.equal(a, b) for a, b in zip(blocks, twin_blocks))


@pytest.mark.parametrize("normalize", ["block", "group"])
def test_normalized_momentum_moves_an_entry_in_proportion_to_its_share_of_the_signal(normalize):
    """In a block with one strong and one weak steady signal, the strong entry moves by about
    lr a step and the weak one proportionally less (Adam moves both by lr); a scalar block
    moves by lr whatever the scale of its hypergradient once its dead zone is scaled like its
    value (a tiny lr), and not at all when its hypergradient is below the dead zone."""
    strong_weak = torch.zeros(2, requires_grad=True)
    tiny_lr = torch.zeros((), requires_grad=True)
    noise = torch.zeros((), requires_grad=True)
    ours = NormalizedMomentum([strong_weak], lr=0.01, normalize=normalize)
    scalars = NormalizedMomentum([tiny_lr, noise], lr=0.01)
    adam_blocks = torch.zeros(2, requires_grad=True)
    adam = torch.optim.Adam([adam_blocks], lr=0.01)
    for _ in range(50):
        strong_weak.grad = torch.tensor([1.0, 0.01])
        tiny_lr.grad = torch.tensor(1e-12)       # d value / d raw 1e-12: lr = 1e-12
        noise.grad = torch.tensor(1e-19)         # rounding noise of a zero hypergradient
        adam_blocks.grad = torch.tensor([1.0, 0.01])
        ours.step()
        scalars.step(eps_scale={tiny_lr: torch.tensor(1e-12), noise: torch.tensor(0.09)})
        adam.step()
    s, w = (-strong_weak.detach()).tolist()
    assert s == pytest.approx(0.5, rel=0.05) and w < 0.05 * s
    assert float(-tiny_lr.detach()) == pytest.approx(0.5, rel=0.05)
    assert abs(float(noise.detach())) < 1e-6
    a_s, a_w = (-adam_blocks.detach()).tolist()
    assert a_w == pytest.approx(a_s, rel=0.05)


def test_bad_hyper_optimizer_and_recovery_arguments_are_clear_errors():
    p = [torch.zeros(1, requires_grad=True)]
    with pytest.raises(ValueError, match="learning rate"):
        NormalizedMomentum(p, lr=-1)
    with pytest.raises(ValueError, match="momentum"):
        NormalizedMomentum(p, momentum=1.0)
    with pytest.raises(ValueError, match="normalize"):
        NormalizedMomentum(p, normalize="kind")
    with pytest.raises(ValueError, match="recovery"):
        HyperOptimizer(torch.optim.SGD, [torch.zeros(1, requires_grad=True)], lr=0.1,
                       recovery="undo")
    with pytest.raises(ValueError, match="'restore', 'backoff', 'rollback' or None"):
        HyperOptimizer(torch.optim.SGD, [torch.zeros(1, requires_grad=True)], lr=0.1,
                       recovery="Restore")


def test_rollback_keeps_its_copy_in_the_memory_accounting_and_survives_deepcopy():
    model = _tiny()
    opt = HyperOptimizer(torch.optim.SGD, model.parameters(), lr=0.1, momentum=0.9,
                         recovery="rollback")
    for bad in (False, False, True, False):
        _nan_step(opt, model, bad)
    assert opt.skipped_steps == 1
    ids = {id(t) for t in opt.scratch_tensors()}
    numel = sum(t.numel() for t in opt.scratch_tensors())
    assert numel >= 2 * sum(p.numel() for p in model.parameters())   # weights + momentum copy
    assert len(ids) == len(opt.scratch_tensors())
    m2, o2 = copy.deepcopy((model, opt))
    _nan_step(o2, m2, False)
    assert o2.skipped_steps == 1


@pytest.mark.parametrize("normalize", ["block", "group"])
def test_normalized_momentum_flat_and_block_by_block_paths_agree(monkeypatch, normalize):
    """Small blocks are stepped on one flat vector, large ones block by block: the same step."""
    from hyperopt_wrap import normalized_momentum as nm
    torch.manual_seed(0)
    shapes = [(), (3,), (4, 5)]
    runs = []
    for flat_max in (10 ** 9, 0):
        monkeypatch.setattr(nm, "_FLAT_MAX", flat_max)
        blocks = [torch.zeros(s, requires_grad=True) for s in shapes]
        opt = nm.NormalizedMomentum(blocks, lr=0.05, normalize=normalize)
        gen = torch.Generator().manual_seed(1)
        for k in range(6):
            for b in blocks:
                b.grad = torch.randn(b.shape, generator=gen) * 10.0 ** (k - 3)
            opt.step(found_inf=torch.tensor(float(k == 2)),
                     eps_scale={b: torch.full(b.shape, 1e-3) for b in blocks})
        runs.append(blocks)
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------ rollback's blow-up test
def test_the_blow_up_test_follows_the_gradient_norm_and_rejects_a_jump():
    """The reference follows the taken steps' norms down at once and up by at most 2x a step;
    a norm more than 10x it is rejected and doubles it; NaN, zero and non-finite steps leave it
    alone (before 0.6.1 a zero norm set it to 0, and every later step was rejected)."""
    from hyperopt_wrap.stepper import Stepper
    s = Stepper(None, {})
    yes, no = torch.tensor(True), torch.tensor(False)

    def run(norms, finite=None):
        out = []
        for i, n in enumerate(norms):
            f = yes if finite is None else finite[i]
            out.append(bool(s.guard_norm(torch.tensor(float(n)), f, 10.0)))
        return out

    assert run([math.nan], [no]) == [False] and math.isnan(float(s.guard_ref))
    assert run([0.0]) == [True] and math.isnan(float(s.guard_ref))   # nothing learnt yet
    # a sustained new scale 13x the last is accepted after one rejection (the reference
    # doubles: 0.9 -> 1.8, and 12 <= 18), then rises by 2x a step
    assert run([1.0, 1.5, 0.9, 12.0, 12.0]) == [True, True, True, False, True]
    assert float(s.guard_ref) == pytest.approx(3.6)
    # a zero norm and a skipped non-finite step leave it as it was; the zero is taken
    before = float(s.guard_ref)
    assert run([0.0, 1e6], [yes, no]) == [True, False] and float(s.guard_ref) == before
    assert run([3.0]) == [True]
    # a run diverging by 3x a step passes for a few steps and is stopped 81x above its start
    # (the reference rises 2x a step: 3^k > 10 * 2^(k-1) from k = 4)
    s.guard_ref = None
    assert run([3.0 ** k for k in range(8)]) == [True] * 4 + [False] * 4
    # its limit: gradients that come and go by more than 10x (a model that fits most
    # minibatches exactly) are rejected too; that is why it is not the default
    s.guard_ref = None
    assert run([0.6, 0.003, 0.6]) == [True, True, False]


def _spike_run(recovery, spike_at=6, steps=10):
    model = _tiny()
    opt = HyperOptimizer(torch.optim.SGD, model.parameters(), lr=0.1, momentum=0.9,
                         recovery=recovery, update_every=1)
    gen = torch.Generator().manual_seed(3)
    history = []
    lrs = []
    for i in range(steps):
        opt.zero_grad()
        model(torch.randn(5, 4, dtype=torch.float64, generator=gen)).pow(2).sum().backward()
        if i == spike_at:
            for p in model.parameters():
                p.grad.mul_(1e4)
        history.append([p.detach().clone() for p in model.parameters()])
        lrs.append(float(opt.hyperparameters()["lr"][0]))
        opt.step()
    history.append([p.detach().clone() for p in model.parameters()])
    lrs.append(float(opt.hyperparameters()["lr"][0]))
    return opt, history, lrs


def test_rollback_skips_a_gradient_spike_and_returns_to_the_last_good_start():
    """A finite gradient 1e4 times the last (a run diverging in finite arithmetic, which no
    non-finite check sees) is rejected: the weights return to where the step before it
    started, ``skipped_steps`` counts it and the tuned lr halves.  The default (backoff) takes
    it, as torch does."""
    k = 6
    opt, history, lrs = _spike_run("rollback", spike_at=k)
    assert opt.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(history[k + 1], history[k - 1]))
    assert lrs[k + 1] == pytest.approx(0.5 * lrs[k], rel=0.02)   # (and the hyper-step's move)
    opt, history, _ = _spike_run("backoff", spike_at=k)
    assert opt.skipped_steps == 0
    assert not all(torch.equal(a, b) for a, b in zip(history[k + 1], history[k]))


def test_rollback_keeps_its_reference_in_the_checkpoint_and_refuses_a_bad_one():
    """A resumed run keeps the blow-up test's reference, so it decides as the uninterrupted
    run does (a fresh reference would take a spike right after the resume); a corrupt entry
    raises before anything is written."""
    from hyperopt_wrap.checkpoint import CheckpointError
    opt, _, _ = _spike_run("rollback", spike_at=-1, steps=6)
    state = opt.state_dict()
    assert state["hyper"]["guard"].dim() == 0 and float(state["hyper"]["guard"]) > 0
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    fresh = HyperOptimizer(torch.optim.SGD, _tiny().parameters(), lr=0.1, momentum=0.9,
                           recovery="rollback", update_every=1)
    fresh.load_state_dict(loaded)
    assert torch.equal(fresh._stepper.guard_ref, state["hyper"]["guard"])
    for bad in (torch.tensor(-1.0), torch.tensor(0.0), torch.ones(2), "1.0"):
        broken = copy.deepcopy(loaded)
        broken["hyper"]["guard"] = bad
        with pytest.raises(CheckpointError, match="guard"):
            fresh.load_state_dict(broken)
    assert torch.equal(fresh._stepper.guard_ref, state["hyper"]["guard"])
    assert "guard" not in _spike_run("backoff", spike_at=-1, steps=2)[0].state_dict()["hyper"]


@pytest.mark.filterwarnings("ignore:HyperOptimizer. at least")
def test_rollback_recovers_the_study_run_that_tuning_drove_into_a_blow_up():
    """The study's diabetes run from initialisation 10 (lr 0.086, momentum 0.158, weight decay
    0.0013; fixed SGD there ends at 0.726): greedy raises the lr to about 0.48 by step 37, the
    gradient norm then grows from 0.3 to 1e12 in a dozen finite steps and the weights overflow.
    With the default recovery every later step is skipped and the run is lost; with rollback it
    ends below fixed SGD (0.4579 on an AMD EPYC, 3 steps skipped)."""
    pytest.importorskip("sklearn")
    from benchmarks import study
    settings = dict(inits=study.draw_inits(20), steps={"diabetes": 4000}, seed=study.SEED,
                    points=10, quick=False)
    name = "greedy rollback"
    study.METHODS[name] = study.Method(name, "ours", "greedy, recovery='rollback'",
                                       study._ours("greedy", recovery="rollback"))
    try:
        ours = study.run_one("diabetes", name, 10, settings)
        name = "greedy backoff"
        study.METHODS[name] = study.Method(name, "ours", "greedy, recovery='backoff'",
                                           study._ours("greedy", recovery="backoff"))
        lost = study.run_one("diabetes", name, 10, dict(settings, steps={"diabetes": 300}))
    finally:
        study.METHODS.pop("greedy rollback", None)
        study.METHODS.pop("greedy backoff", None)
    assert lost["diverged"] and lost["error"] is None
    fixed = study.run_one("diabetes", "fixed", 10, settings)
    default = study.run_one("diabetes", "greedy", 10, settings)     # recovery="restore"
    for run in (ours, default):
        assert run["error"] is None and not run["diverged"], run["error"]
        assert 0 < run["skipped_steps"] < 100
        assert run["test_loss"] < fixed["test_loss"], (run["test_loss"], fixed["test_loss"])


def test_rollback_returns_weights_that_overflowed_to_inf_exactly():
    """The select is exact also for non-finite weights (``lerp`` with a 0/1 weight gives NaN
    from inf): a step at lr 1e31 overflows the weights, the next gradient is not finite, and
    the weights return to the last good start bit for bit."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)                     # (float32: it overflows at 3.4e38)
    opt = HyperOptimizer(torch.optim.SGD, model.parameters(), lr=0.1, recovery="rollback",
                         bounds={"lr": (1e-10, 1e31)}, hyper_lr=0.0)
    x = torch.randn(5, 4) * 1e4

    def step():
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        opt.step()

    step()
    for g in opt.param_groups:
        g["lr"] = 1e31
    start = None
    for _ in range(4):      # (the first step at 1e31 may be rejected by the norm test)
        before = [p.detach().clone() for p in model.parameters()]
        step()
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            start = before  # a taken step overflowed the weights
            break
    assert start is not None
    step()                  # not finite: back to where that step started, bit for bit
    assert all(torch.equal(p, s) for p, s in zip(model.parameters(), start))


def test_rollback_after_loading_a_checkpoint_returns_to_the_loaded_run():
    """Loading into a running optimizer forgets rollback's copy: a rejected step after the load
    returns to the loaded weights, never to weights from before the load."""
    opt, _, _ = _spike_run("rollback", spike_at=-1, steps=4)
    state = copy.deepcopy(opt.state_dict())
    model = _tiny()
    run = HyperOptimizer(torch.optim.SGD, model.parameters(), lr=0.1, momentum=0.9,
                         recovery="rollback", update_every=1)
    gen = torch.Generator().manual_seed(5)

    def step(scale=1.0):
        run.zero_grad()
        model(torch.randn(5, 4, dtype=torch.float64, generator=gen)).pow(2).sum().backward()
        for p in model.parameters():
            p.grad.mul_(scale)
        run.step()

    for _ in range(3):
        step()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)                          # the weights the checkpoint goes with
    loaded = [p.detach().clone() for p in model.parameters()]
    run.load_state_dict(state)
    before = run.skipped_steps
    step(1e4)                                   # rejected with nothing remembered: stays put
    assert run.skipped_steps == before + 1
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), loaded))


def test_the_blow_up_test_norm_of_half_precision_gradients_does_not_overflow():
    """A float16 norm overflows at 65504 with every element finite; the test's norm is
    accumulated in float32 (so a 10x jump from 9.5e3 is one rejection, not a trapped run)."""
    from hyperopt_wrap.stepper import Stepper
    g = torch.full((100,), 9500.0, dtype=torch.float16)      # norm 9.5e4
    n = Stepper(None, {}).grad_norm([g, torch.ones(4, dtype=torch.float64)], torch.device("cpu"))
    assert n.dtype == torch.float32 and float(n) == pytest.approx(95000.0, rel=1e-3)


def test_with_rollback_an_amp_overflow_skips_without_going_back():
    """``found_inf`` from an AMP-aware caller (a loss-scale overflow, not a blow-up) skips the
    step, but with rollback it does not also undo the step before it, and does not back off."""
    model = _tiny()
    opt = HyperOptimizer(torch.optim.SGD, model.parameters(), lr=0.1, momentum=0.9,
                         recovery="rollback")
    for _ in range(3):
        _nan_step(opt, model, False)
    w = [p.detach().clone() for p in model.parameters()]
    lr = float(opt.hyperparameters()["lr"][0])
    opt.found_inf = torch.ones(())
    _nan_step(opt, model, True)
    del opt.found_inf
    assert opt.skipped_steps == 1 and float(opt.hyperparameters()["lr"][0]) == lr
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), w))
