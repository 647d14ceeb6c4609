"""HyperOptimizer as a torch.optim.Optimizer: API, in-place updates, no host sync, save/resume,
LR schedulers, bad input, NaN safety."""
import copy
import io
import math

import pytest
import torch

from hyperopt_wrap import HyperOptimizer, register_rule
from hyperopt_wrap.methods import Greedy

from problems import SignRule, forbid_host_sync

ALL = ("lr", "momentum", "weight_decay")


def _model(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(),
                               torch.nn.Linear(8, 3)).to(dtype)


def _data(seed=1, n=96, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=dtype), torch.randn(n, 3, generator=g, dtype=dtype)


X, Y = _data()


def _batch(i, bs=16):
    j = (i * bs) % len(X)
    return X[j:j + bs], Y[j:j + bs]


def _train(opt, model, steps, start=0, closure=False):
    losses = []
    for i in range(start, start + steps):
        x, y = _batch(i)

        def loss_closure():
            opt.zero_grad()
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
            return loss

        if closure:
            losses.append(opt.step(loss_closure))
        else:
            loss = loss_closure()
            opt.step()
            losses.append(loss.detach())
    return losses


# --------------------------------------------------------------------------- API
def test_is_a_torch_optimizer_with_the_usual_param_groups():
    m = _model()
    opt = HyperOptimizer(torch.optim.SGD, m.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    assert isinstance(opt, torch.optim.Optimizer)
    g = opt.param_groups[0]
    for key in ("lr", "momentum", "dampening", "nesterov", "weight_decay", "maximize"):
        assert key in g
    assert g["lr"] == 0.1 and g["momentum"] == 0.9
    loss = _train(opt, m, 1, closure=True)[0]
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0
    opt.zero_grad()
    assert all(p.grad is None for p in m.parameters())
    assert opt.step() is None   # no gradients: nothing to do, nothing breaks


def test_hyperparameters_layout_dtype_device_per_granularity():
    m = _model()
    params = list(m.parameters())
    groups = [{"params": params[:2]}, {"params": params[2:], "lr": 0.05}]
    opt = HyperOptimizer(torch.optim.SGD, groups, lr=0.1, momentum=0.9, weight_decay=1e-4,
                         tune=ALL, granularity={"lr": "element", "momentum": "tensor",
                                                "weight_decay": "group"})
    hp = opt.hyperparameters()
    assert [p.shape for p in hp["lr"][0]] == [p.shape for p in params[:2]]
    assert torch.all(hp["lr"][1][0] == 0.05)
    assert hp["momentum"][0].shape == (2,) and hp["weight_decay"][1].shape == ()
    for entry in (hp["lr"][0][0], hp["momentum"][0], hp["weight_decay"][0]):
        assert entry.dtype == params[0].dtype and entry.device == params[0].device
    hg = opt.last_hypergradient()
    assert [p.shape for p in hg["lr"][0]] == [p.shape for p in params[:2]]
    # global: one value, shared by every group
    opt2 = HyperOptimizer(torch.optim.SGD, groups, lr=0.1)
    assert len(opt2.tuned["lr"].values) == 1


def test_parameters_are_updated_in_place():
    m = _model()
    ptrs = [p.data_ptr() for p in m.parameters()]
    opt = HyperOptimizer(torch.optim.Adam, m.parameters(), lr=1e-2, tune=ALL, weight_decay=1e-3,
                         granularity="element")
    before = [p.detach().clone() for p in m.parameters()]
    _train(opt, m, 5)
    assert [p.data_ptr() for p in m.parameters()] == ptrs
    assert all(not torch.equal(a, b) for a, b in zip(before, m.parameters()))
    state_ptrs = {id(p): opt.state[p]["exp_avg"].data_ptr() for p in m.parameters()}
    _train(opt, m, 3, start=5)
    assert {id(p): opt.state[p]["exp_avg"].data_ptr() for p in m.parameters()} == state_ptrs


@pytest.mark.parametrize("val", [False, True], ids=["next-batch", "val_loss"])
@pytest.mark.parametrize("cls,kwargs", [
    (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True)),
    (torch.optim.Adam, dict(lr=1e-2, weight_decay=1e-3, amsgrad=True)),
    (torch.optim.RMSprop, dict(lr=1e-2, momentum=0.5, weight_decay=1e-3, centered=True)),
], ids=["sgd", "adam", "rmsprop"])
@pytest.mark.parametrize("recovery", ["restore", "backoff", "rollback"])
def test_step_makes_no_host_synchronisation(monkeypatch, cls, kwargs, val, recovery):
    """Anything that would read a tensor's value on the host inside step() raises here.

    torch.optim.Adam (the hyper-optimizer) keeps its step counter on the CPU and reads it with
    .item(); that counter is never on the GPU, so it is the one exception."""
    m = _model()
    xv, yv = _batch(50)
    kw = dict(val_loss=lambda: ((m(xv) - yv) ** 2).mean()) if val else {}
    opt = HyperOptimizer(cls, m.parameters(), tune=ALL, granularity="tensor", **kw, **kwargs,
                         recovery=recovery)
    _train(opt, m, 2)
    allowed = set()
    for _ in range(2):
        allowed |= {id(s["step"]) for s in opt.hyper_optimizer.state.values() if "step" in s}
        _train_checked(opt, m, monkeypatch, allowed)


def _train_checked(opt, m, monkeypatch, allowed):
    x, y = _batch(3)
    opt.zero_grad()
    ((m(x) - y) ** 2).mean().backward()
    with forbid_host_sync(monkeypatch, allowed):
        opt.step()


def test_add_param_group_gets_its_own_hyperparameters():
    m = _model()
    params = list(m.parameters())
    opt = HyperOptimizer(torch.optim.SGD, params[:2], lr=0.1, momentum=0.9, tune=("lr", "momentum"),
                         granularity="group")
    opt.add_param_group({"params": params[2:], "lr": 0.01})
    hp = opt.hyperparameters()
    assert float(hp["lr"][1]) == pytest.approx(0.01) and float(hp["momentum"][1]) == pytest.approx(0.9)
    _train(opt, m, 6)
    assert opt.hypersteps == 5
    assert all(p.grad is not None for p in params)
    with pytest.raises(ValueError, match="momentum"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))],
                             "momentum": 1.5})
    assert len(opt.param_groups) == 2


def test_hyper_lr_zero_freezes_hyperparameters_bit_exactly():
    m = _model()
    opt = HyperOptimizer(torch.optim.SGD, m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3,
                         tune=ALL, granularity="element", hyper_lr=0.0)
    _train(opt, m, 10)
    hp = opt.hyperparameters()
    assert all(torch.all(v == 0.1) for v in hp["lr"][0])
    assert all(torch.all(v == 0.9) for v in hp["momentum"][0])
    assert all(torch.all(v == 1e-3) for v in hp["weight_decay"][0])
    assert opt.hypersteps == 9   # hyper-steps ran; the hypergradient is real, only frozen
    assert any(float(g.abs().sum()) > 0 for g in opt.last_hypergradient()["lr"][0])


def test_hyperparameters_stay_inside_bounds():
    m = _model()
    bounds = {"lr": (1e-3, 0.2), "momentum": (0.5, 0.95), "weight_decay": (1e-5, 1e-2)}
    opt = HyperOptimizer(torch.optim.SGD, m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3,
                         tune=ALL, granularity="element", hyper_lr=1.0, bounds=bounds)
    _train(opt, m, 30)
    for kind, (lo, hi) in bounds.items():
        for v in opt.hyperparameters()[kind][0]:
            assert float(v.min()) >= lo * (1 - 1e-12) and float(v.max()) <= hi * (1 + 1e-12), kind
    assert all(math.isfinite(float(p.detach().sum())) for p in m.parameters())


def test_greedy_sgd_is_baydin_hypergradient_descent():
    """With no validation objective, dE/dlr = -g_{t+1} . d_t for plain SGD (Baydin et al.)."""
    m = _model()
    opt = HyperOptimizer(torch.optim.SGD, m.parameters(), lr=0.05, hyper_lr=0.0)
    _train(opt, m, 1)
    g0 = [p.grad.clone() for p in m.parameters()]
    _train(opt, m, 1, start=1)
    g1 = [p.grad for p in m.parameters()]
    expected = -sum(float((a * b).sum()) for a, b in zip(g0, g1))
    assert float(opt.last_hypergradient()["lr"][0]) == pytest.approx(expected, rel=1e-12)


# --------------------------------------------------------------------------- save / resume
@pytest.mark.parametrize("cfg", [
    dict(cls=torch.optim.SGD, kw=dict(lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True,
                                      tune=ALL, granularity="element")),
    dict(cls=torch.optim.Adam, kw=dict(lr=1e-2, tune=ALL, weight_decay=1e-3,
                                       granularity={"lr": "tensor"})),
    dict(cls=torch.optim.AdamW, kw=dict(lr=1e-2, tune=("lr",), update_every=3)),
    dict(cls=torch.optim.RMSprop, kw=dict(lr=1e-2, momentum=0.5, tune=("lr", "momentum"),
                                          granularity="group", update_every=4, val=True)),
], ids=["sgd-element", "adam-tensor", "adamw-window3", "rmsprop-val-window4"])
def test_state_dict_round_trip_runs_in_bit_identical_lockstep(cfg):
    def build(model):
        kw = dict(cfg["kw"])
        if kw.pop("val", False):
            xv, yv = _batch(40)
            kw["val_loss"] = lambda: ((model(xv) - yv) ** 2).mean()
        return HyperOptimizer(cfg["cls"], model.parameters(), **kw)

    m1 = _model()
    opt1 = build(m1)
    _train(opt1, m1, 21)    # ends mid-window for update_every 3 and 4
    buffer = io.BytesIO()
    torch.save({"model": m1.state_dict(), "opt": opt1.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    m2 = _model(seed=123)
    m2.load_state_dict(saved["model"])
    opt2 = build(m2)
    opt2.load_state_dict(saved["opt"])
    for i in range(21, 41):
        _train(opt1, m1, 1, start=i)
        _train(opt2, m2, 1, start=i)
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    for kind in opt1.tuned:
        for a, b in zip(opt1.tuned[kind].values, opt2.tuned[kind].values):
            assert torch.equal(a, b)
    assert opt1.hypersteps == opt2.hypersteps > 0


def test_load_state_dict_rejects_other_configurations_with_the_fix():
    m = _model()
    opt = HyperOptimizer(torch.optim.SGD, m.parameters(), lr=0.1, momentum=0.9)
    _train(opt, m, 2)
    sd = opt.state_dict()
    other = HyperOptimizer(torch.optim.SGD, m.parameters(), lr=0.1, momentum=0.9,
                           granularity="element")
    with pytest.raises(ValueError, match="granularity.*Construct the HyperOptimizer"):
        other.load_state_dict(sd)
    other = HyperOptimizer(torch.optim.Adam, m.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="optimizer"):
        other.load_state_dict(sd)
    plain = torch.optim.SGD(m.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="not saved by HyperOptimizer"):
        opt.load_state_dict(plain.state_dict())
    bigger = _model()
    bigger[0] = torch.nn.Linear(6, 9).double()
    bigger[2] = torch.nn.Linear(9, 3).double()
    other = HyperOptimizer(torch.optim.SGD, bigger.parameters(), lr=0.1, momentum=0.9,
                           granularity="element")
    sd_el = HyperOptimizer(torch.optim.SGD, m.parameters(), lr=0.1, momentum=0.9,
                           granularity="element").state_dict()
    with pytest.raises(ValueError, match="same model architecture"):
        other.load_state_dict(sd_el)


# --------------------------------------------------------------------------- schedulers
def test_lr_schedulers_scale_the_tuned_lr():
    m = _model()
    opt = HyperOptimizer(torch.optim.SGD, m.parameters(), lr=0.1, momentum=0.9, hyper_lr=0.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for i in range(4):
        _train(opt, m, 1, start=i)
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)
    assert float(opt.hyperparameters()["lr"][0]) == pytest.approx(0.025)
    # the effective lr is what the step used: compare with torch.optim.SGD under the same schedule
    m_ref = _model()
    ref = torch.optim.SGD(m_ref.parameters(), lr=0.1, momentum=0.9)
    sched_ref = torch.optim.lr_scheduler.StepLR(ref, step_size=2, gamma=0.5)
    for i in range(4):
        _train(ref, m_ref, 1, start=i)
        sched_ref.step()
    for a, b in zip(m.parameters(), m_ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("make", [
    lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=10),
    lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.2, total_steps=20),
    lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda e: 1 / (1 + e)),
    lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.9),
], ids=["cosine", "onecycle", "lambda", "exponential"])
def test_lr_schedulers_do_not_crash(make):
    m = _model()
    opt = HyperOptimizer(torch.optim.SGD, m.parameters(), lr=0.1, momentum=0.9,
                         tune=("lr", "momentum"))
    sched = make(opt)
    for i in range(8):
        _train(opt, m, 1, start=i)
        sched.step()
    assert all(math.isfinite(float(p.detach().sum())) for p in m.parameters())
    mom = float(opt.hyperparameters()["momentum"][0])
    if isinstance(sched, torch.optim.lr_scheduler.OneCycleLR):
        # OneCycle writes group["momentum"]; a write to a tuned kind resets it to that value
        assert mom == pytest.approx(opt.param_groups[0]["momentum"], abs=0.02)


def test_reduce_lr_on_plateau_and_group_writes():
    m = _model()
    opt = HyperOptimizer(torch.optim.SGD, m.parameters(), lr=0.1, momentum=0.9,
                         tune=("lr", "momentum"), hyper_lr=0.0)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5)
    for i in range(3):
        _train(opt, m, 1, start=i)
        sched.step(1.0)
    assert float(opt.hyperparameters()["lr"][0]) == pytest.approx(opt.param_groups[0]["lr"])
    opt.param_groups[0]["momentum"] = 0.5
    _train(opt, m, 1, start=5)
    assert float(opt.hyperparameters()["momentum"][0]) == 0.5
    opt.param_groups[0]["momentum"] = 2.0
    with pytest.raises(ValueError, match="momentum must lie in"):
        _train(opt, m, 1)


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(lr=0.0), ValueError, r"every param group has lr=0.*out of\s+tune="),
    (dict(lr=-1.0), ValueError, "finite number >= 0"),
    (dict(lr=float("nan")), ValueError, "finite number >= 0"),
    (dict(lr=float("inf")), ValueError, "finite number >= 0"),
    (dict(lr=0.1, momentum=1.0), ValueError, r"\[0, 1\)"),
    (dict(lr=0.1, momentum=-0.1), ValueError, r"\[0, 1\)"),
    (dict(lr=0.1, weight_decay=-1e-4), ValueError, ">= 0"),
    (dict(lr=0.1, tune=("learning_rate",)), ValueError, "choose from"),
    (dict(lr=0.1, tune=()), ValueError, "at least one"),
    (dict(lr=0.1, granularity="layer"), ValueError, "granularity.*choose one of"),
    (dict(lr=0.1, granularity={"momentum": "tensor"}), ValueError, "add them to tune="),
    (dict(lr=0.1, tune=("momentum",)), ValueError, "momentum=0.9"),
    (dict(lr=0.1, momentum=0.9, tune=("weight_decay",)), ValueError, "weight_decay=5e-4"),
    (dict(lr=0.1, method="newton"), ValueError, "unknown hypergradient method.*greedy"),
    (dict(lr=0.1, update_every=0), ValueError, "update_every"),
    (dict(lr=0.1, hyper_lr=-1.0), ValueError, "hyper_lr"),
    (dict(lr=0.1, val_loss=3.0), TypeError, "zero-argument callable"),
    (dict(lr=0.1, bounds={"lr": (0.0, 1.0)}), ValueError, "log space"),
    (dict(lr=2.0, bounds={"lr": (1e-6, 1.0)}), ValueError, "outside bounds.*bounds="),
    (dict(lr=0.1, nesterov=True), ValueError, "Nesterov"),
], ids=lambda v: str(v)[:40])
def test_bad_input_is_a_clear_error(kwargs, exc, match):
    m = _model()
    with pytest.raises(exc, match=match):
        HyperOptimizer(torch.optim.SGD, m.parameters(), **kwargs)


def test_unsupported_optimizer_names_register_rule():
    m = _model()
    with pytest.raises(TypeError, match="register_rule.*UpdateRule|UpdateRule.*register_rule"):
        HyperOptimizer(torch.optim.LBFGS, m.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="no 'momentum' to tune"):
        HyperOptimizer(torch.optim.Adagrad, m.parameters(), lr=0.1, tune=("momentum",))
    with pytest.raises(TypeError, match="not a set"):
        HyperOptimizer(torch.optim.SGD, set(m.parameters()), lr=0.1)


def test_sparse_gradients_are_refused():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = HyperOptimizer(torch.optim.SGD, emb.parameters(), lr=0.1)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients.*sparse=False"):
        opt.step()


def test_register_rule_for_a_custom_optimizer():
    class SignSGD(torch.optim.SGD):
        pass

    with pytest.raises(TypeError, match="UpdateRule"):
        register_rule(SignSGD, object())
    register_rule(SignSGD, SignRule())
    m = _model()
    before = [p.detach().clone() for p in m.parameters()]
    opt = HyperOptimizer(SignSGD, m.parameters(), lr=0.01)
    _train(opt, m, 1)
    for b, p in zip(before, m.parameters()):
        torch.testing.assert_close(p.detach(), b - 0.01 * p.grad.sign())
    _train(opt, m, 3, start=1)
    assert opt.hypersteps == 3


# --------------------------------------------------------------------------- NaN safety
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_nonfinite_gradient_skips_the_step_and_the_hyperstep(bad):
    """(recovery=None: the skip alone; the lr's backoff is tested in test_recovery.py)"""
    m = _model()
    opt = HyperOptimizer(torch.optim.Adam, m.parameters(), lr=1e-2, tune=ALL, weight_decay=1e-3,
                         granularity="element", recovery=None)
    _train(opt, m, 5)
    weights = [p.detach().clone() for p in m.parameters()]
    states = {id(p): {k: v.clone() for k, v in opt.state[p].items() if k != "hyper"}
              for p in m.parameters()}
    hyper = {k: [v.clone() for v in tk.values] for k, tk in opt.tuned.items()}
    opt.zero_grad()
    ((m(X[:8]) - Y[:8]) ** 2).mean().backward()
    next(m.parameters()).grad[0, 0] = bad
    opt.step()
    for w, p in zip(weights, m.parameters()):
        assert torch.equal(w, p.detach())
    for p in m.parameters():
        for k, v in states[id(p)].items():
            assert torch.equal(v, opt.state[p][k]), k
    assert opt.skipped_steps == 1
    # the hyper-step at the next step sees the poisoned window and is skipped too
    _train(opt, m, 1, start=7)
    assert opt.skipped_hypersteps >= 1
    for k, tk in opt.tuned.items():
        for a, b in zip(hyper[k], tk.values):
            assert torch.equal(a, b), k
    # and training carries on normally afterwards
    _train(opt, m, 5, start=8)
    assert all(torch.isfinite(p).all() for p in m.parameters())
    assert all(torch.isfinite(v).all() for tk in opt.tuned.values() for v in tk.values)


def test_nonfinite_validation_loss_skips_the_hyperstep():
    m = _model()
    poison = {"on": False}

    def val_loss():
        loss = ((m(X[:8]) - Y[:8]) ** 2).mean()
        return loss * float("nan") if poison["on"] else loss

    opt = HyperOptimizer(torch.optim.SGD, m.parameters(), lr=0.1, momentum=0.9, tune=ALL,
                         weight_decay=1e-3, val_loss=val_loss, granularity="tensor")
    _train(opt, m, 3)
    hyper = {k: [v.clone() for v in tk.values] for k, tk in opt.tuned.items()}
    adam_state = copy.deepcopy(opt.hyper_optimizer.state_dict()["state"])
    poison["on"] = True
    _train(opt, m, 1, start=3)
    assert opt.skipped_hypersteps == 1
    for k, tk in opt.tuned.items():
        for a, b in zip(hyper[k], tk.values):
            assert torch.equal(a, b)
    for i, st in opt.hyper_optimizer.state_dict()["state"].items():
        for name in st:
            assert torch.equal(st[name], adam_state[i][name])
    poison["on"] = False
    _train(opt, m, 2, start=4)
    assert opt.skipped_hypersteps == 1 and opt.hypersteps == 6


def test_val_loss_must_return_a_scalar():
    m = _model()
    opt = HyperOptimizer(torch.optim.SGD, m.parameters(), lr=0.1,
                         val_loss=lambda: (m(X[:4]) - Y[:4]) ** 2)
    with pytest.raises(TypeError, match="scalar"):
        _train(opt, m, 1)


def test_method_objects_and_repr():
    m = _model()
    opt = HyperOptimizer(torch.optim.SGD, m.parameters(), lr=0.1, method=Greedy())
    assert "Greedy" in repr(opt) and opt.update_every == 1


def test_fused_hyper_adam_fast_path_equals_torch_adam_step():
    """hyper_optimizer=torch.optim.Adam (fused, stepped by calling its kernel directly) moves
    the hyperparameters bit-identically to torch.optim.Adam's own single-tensor step()."""
    runs = []
    for hyper_kwargs in (None, {"foreach": False}):
        m = _model()
        opt = HyperOptimizer(torch.optim.SGD, m.parameters(), lr=0.05, momentum=0.9,
                             weight_decay=1e-3, tune=ALL, hyper_optimizer_kwargs=hyper_kwargs,
                             hyper_optimizer=torch.optim.Adam,
                             granularity={"lr": "element", "momentum": "tensor"})
        _train(opt, m, 30)
        runs.append((m, opt))
    (m1, o1), (m2, o2) = runs
    assert o1.hyper_optimizer.defaults["fused"] and not o2.hyper_optimizer.defaults.get("fused")
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    for kind in ALL:
        for a, b in zip(o1.tuned[kind].values, o2.tuned[kind].values):
            assert torch.equal(a, b), kind


def test_tensor_lr_is_accepted_and_complex_parameters_are_refused():
    m = _model()
    opt = HyperOptimizer(torch.optim.Adam, m.parameters(), lr=torch.tensor(0.01))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)
    _train(opt, m, 3)
    z = torch.nn.Parameter(torch.zeros(3, dtype=torch.complex128))
    with pytest.raises(ValueError, match="view_as_real"):
        HyperOptimizer(torch.optim.Adam, [z], lr=0.01)


def test_global_granularity_across_groups():
    """Global lr is one shared factor: each group keeps its configured ratio to the first
    group's lr. Momentum and weight decay tuned globally must agree across groups."""
    m = _model()
    params = list(m.parameters())
    groups = [{"params": params[:2]}, {"params": params[2:], "lr": 0.025}]
    opt = HyperOptimizer(torch.optim.SGD, groups, lr=0.05, momentum=0.9, hyper_lr=0.0)
    hp = opt.hyperparameters()["lr"]
    assert float(hp[0]) == 0.05 and float(hp[1]) == 0.025
    bad = [{"params": params[:2]}, {"params": params[2:], "momentum": 0.8}]
    with pytest.raises(ValueError, match="granularity=\\{'momentum': 'group'\\}"):
        HyperOptimizer(torch.optim.SGD, bad, lr=0.05, momentum=0.9, tune=("lr", "momentum"))


@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.RMSprop, torch.optim.Adagrad],
                         ids=lambda c: c.__name__)
def test_zero_gradient_on_zero_weights_does_not_poison_weight_decay_tuning(cls):
    """A zero-initialised bias whose gradient is exactly 0 (a dead unit) makes the second
    moment 0; d/d(weight decay) there is 0/0, whose limit 0 must be used, not NaN (which would
    skip every hyper-step for the rest of training)."""
    w = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    b = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    opt = HyperOptimizer(cls, [w, b], lr=0.01, weight_decay=1e-2, tune=("lr", "weight_decay"))
    for _ in range(5):
        opt.zero_grad()
        (w ** 2).sum().backward()
        b.grad = torch.zeros_like(b)
        opt.step()
    assert opt.hypersteps == 4 and opt.skipped_hypersteps == 0
    assert float(opt.hyperparameters()["weight_decay"][0]) != 1e-2


def test_tensor_granularity_with_a_parameter_missing_its_gradient():
    """Per-tensor hypergradients of plain SGD are -g_{t+1,i} . g_{t,i}; a tensor without a
    gradient at either step contributes nothing, and the others are unaffected."""
    a = torch.nn.Parameter(torch.randn(4, dtype=torch.float64))
    b = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    c = torch.nn.Parameter(torch.randn(2, dtype=torch.float64))
    opt = HyperOptimizer(torch.optim.SGD, [a, b, c], lr=0.05, granularity="tensor", hyper_lr=0.0)

    def step(use_b):
        opt.zero_grad()
        loss = (a ** 2).sum() * 1.5 + (c ** 3).sum() + ((b ** 2).sum() if use_b else 0)
        loss.backward()
        grads = [None if p.grad is None else p.grad.clone() for p in (a, b, c)]
        opt.step()
        return grads

    g0 = step(use_b=True)
    g1 = step(use_b=False)          # b has no gradient: its pending tangent is dropped
    got = opt.last_hypergradient()["lr"][0]
    assert float(got[1]) == 0.0
    for i in (0, 2):
        assert float(got[i]) == pytest.approx(-float((g0[i] * g1[i]).sum()), rel=1e-12)
    g2 = step(use_b=True)           # b was not stepped at step 1: no tangent to pair with
    got = opt.last_hypergradient()["lr"][0]
    assert float(got[1]) == 0.0
    for i in (0, 2):
        assert float(got[i]) == pytest.approx(-float((g1[i] * g2[i]).sum()), rel=1e-12)


def test_an_unchanged_tensor_lr_is_not_read_inside_step(monkeypatch):
    """A tensor lr (torch's idiom; on an accelerator a read is a host sync) is compared by
    identity and version, so step() reads it only after it was written; a write (``fill_``,
    as torch's schedulers do) is honoured like torch's."""
    m, twin = _model(), _model()
    lr, lr_twin = torch.tensor(0.05, dtype=torch.float64), torch.tensor(0.05, dtype=torch.float64)
    opt = HyperOptimizer(torch.optim.SGD, m.parameters(), lr=lr, momentum=0.9,
                         tune=("momentum",), hyper_lr=0.0)
    ref = torch.optim.SGD(twin.parameters(), lr=lr_twin, momentum=0.9)
    assert opt.param_groups[0]["lr"] is lr
    _train(opt, m, 2)
    _train(ref, twin, 2)
    for _ in range(2):
        _train_checked(opt, m, monkeypatch, set())
        _train_checked(ref, twin, monkeypatch, set())
    lr.fill_(0.02)
    lr_twin.fill_(0.02)
    _train(opt, m, 3, start=7)
    _train(ref, twin, 3, start=7)
    for a, b in zip(m.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
