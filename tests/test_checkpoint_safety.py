"""Checkpoints and inputs that must be refused cleanly, and resumes that must not drift.

* A malformed ``state_dict`` is refused by ``load_state_dict`` *before anything changes*: the
  optimizer's own ``state_dict()`` is equal afterwards to what it was, and it steps exactly like
  an untouched deep copy of itself.  That includes a checkpoint of a model of another width
  (accepted by torch's shape-blind load, after which every step failed) and hyper-optimizer
  state of the wrong size (a moment shorter than its raw block, which the fused Adam kernel
  would read and write past its end).
* NaN/inf written into a param group is refused at the next step with the weights and the
  tuned values as they were.
* A ``val_loss`` that does not depend on the optimizer's parameters (another model; the
  callable a ``copy.deepcopy`` kept, which still reads the original model) is a clear error.
* A ``val_loss`` of +inf with a finite gradient skips the hyper-step.
* Momentum bounds reaching 1, and constructor arguments that would be ignored or fail late, are
  refused at construction with the fix.
* Resuming from ``state_dict()`` and ``copy.deepcopy`` agree, for every method, at a window
  boundary and inside a window.
"""
from __future__ import annotations

import copy
import io
import math
import re

import pytest
import torch
from torch import Tensor

from hyperopt_wrap import HyperOptimizer
from hyperopt_wrap.methods import RTRL, SGLD, Distill, ForwardGradient, Greedy, Implicit, Unroll

from problems import flat
from tiny import reloaded, tiny_model, train as tiny_train

DTYPE = torch.float64

_gen = torch.Generator().manual_seed(11)
X = torch.randn(48, 3, generator=_gen, dtype=DTYPE)
Y = torch.randn(48, 2, generator=_gen, dtype=DTYPE)
XV, YV = X[40:], Y[40:]


# ----------------------------------------------------------------------------- helpers
def assert_state_dicts_equal(a, b, path: str = "state_dict") -> None:
    """Recursive equality: tensors by dtype, shape, device and ``torch.equal``; dicts by keys;
    lists and tuples by length and type; everything else by ``==``."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        assert isinstance(a, Tensor) and isinstance(b, Tensor), f"{path}: {a!r} vs {b!r}"
        meta_a, meta_b = (a.dtype, tuple(a.shape), a.device), (b.dtype, tuple(b.shape), b.device)
        assert meta_a == meta_b, f"{path}: {meta_a} vs {meta_b}"
        assert torch.equal(a, b), f"{path}: {a} vs {b}"
    elif isinstance(a, dict):
        assert isinstance(b, dict), f"{path}: dict vs {type(b).__name__}"
        assert set(a) == set(b), f"{path}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"
        for k in a:
            assert_state_dicts_equal(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), f"{path}: {a!r} vs {b!r}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_state_dicts_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"


def _linear(n_out: int = 2, seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(3, n_out).to(DTYPE)


def _loss(model, i: int) -> Tensor:
    j = (i * 8) % 40
    out = model(X[j:j + 8])
    return ((out - Y[j:j + 8, :1].expand_as(out)) ** 2).mean()


def _train(opt, model, steps: int, start: int = 0) -> None:
    for i in range(start, start + steps):
        opt.zero_grad()
        _loss(model, i).backward()
        opt.step()


def _same_hyperparameters(a, b) -> bool:
    ha, hb = a.hyperparameters(), b.hyperparameters()
    return ha.keys() == hb.keys() and all(torch.equal(flat(ha[k]), flat(hb[k])) for k in ha)


def _check_message(exc: BaseException, patterns) -> None:
    text = str(exc)
    for pattern in patterns:
        assert re.search(pattern, text), f"message {text!r} does not match {pattern!r}"


def _tuned_snapshot(opt) -> dict:
    return {k: [t.detach().clone() for t in (*tk.values, *tk.raws)] for k, tk in opt.tuned.items()}


def _assert_tuned_equal(opt, snapshot) -> None:
    now = _tuned_snapshot(opt)
    assert now.keys() == snapshot.keys()
    for k in now:
        assert all(torch.equal(a, b) for a, b in zip(now[k], snapshot[k])), k


# ============================================================================= 1. no half-loads
def _make(model, lr: float, granularity: str = "global", **kw):
    return HyperOptimizer(torch.optim.SGD, model.parameters(), lr=lr, momentum=0.9,
                          granularity=granularity, **kw)


def _saved_and_target(granularity: str, target_width: int = 2, **kw):
    """A checkpoint of lr tuned from 0.1 for 3 steps (through torch.save/torch.load), and a
    target built with lr=0.5 and trained 2 steps on other batches, so a half-load shows."""
    m_src = _linear(2, seed=0)
    src = _make(m_src, 0.1, granularity, **kw)
    _train(src, m_src, 3)
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    m_tgt = _linear(target_width, seed=1)
    tgt = _make(m_tgt, 0.5, granularity, **kw)
    _train(tgt, m_tgt, 2, start=3)
    return m_src, src, saved, m_tgt, tgt


def _assert_refused_without_trace(opt, model, bad, exc, patterns) -> None:
    before = copy.deepcopy(opt.state_dict())
    twin_model, twin = copy.deepcopy((model, opt))
    with pytest.raises(exc) as info:
        opt.load_state_dict(bad)
    _check_message(info.value, patterns)
    assert_state_dicts_equal(opt.state_dict(), before)
    for i in range(3):         # and it steps exactly like its untouched copy
        _train(opt, model, 1, start=10 + i)
        _train(twin, twin_model, 1, start=10 + i)
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin_model.parameters()))
        assert _same_hyperparameters(opt, twin)
    assert_state_dicts_equal(opt.state_dict(), twin.state_dict())


def _ctl(sd):
    return sd["hyper"]["controller"]


def _set(where, key, value):
    where[key] = value


def _delete(*path):
    def mutate(sd):
        node = sd
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
    return mutate


def _hyper_state(sd):
    return _ctl(sd)["hyper_optimizer"]["state"][0]


def _names(*words):
    """Every word in the message (regex alternatives allowed), in any order."""
    return [f"(?i){w}" for w in words]


MISSING = (ValueError, KeyError)
WRONG_TYPE = (ValueError, TypeError)
SHAPE = "shape|size"
NONFINITE = "nan|inf|finite"

MALFORMED = [
    # id, granularity, mutation, exception, patterns
    *[(f"no-controller-{key}", "global", _delete("hyper", "controller", key), MISSING,
       _names(key)) for key in ("raws", "accums", "last", "hyper_optimizer", "counters",
                                "skipped", "values")],
    ("no-hyper-method", "global", _delete("hyper", "method"), MISSING, _names("method")),
    ("no-hyper-counters", "global", _delete("hyper", "counters"), MISSING, _names("counters")),
    ("no-hyper-config", "global", _delete("hyper", "config"), MISSING, _names("config")),
    # shapes
    ("raws-shape-global", "global",
     lambda sd: _set(_ctl(sd)["raws"], "lr", [torch.full((2,), math.log(0.1), dtype=DTYPE)]),
     ValueError, _names("raws", SHAPE)),
    ("raws-0dim-global", "global",           # would broadcast silently into the (1,) block
     lambda sd: _set(_ctl(sd)["raws"], "lr", [torch.tensor(math.log(0.1), dtype=DTYPE)]),
     ValueError, _names("raws", SHAPE)),
    ("raws-shape-tensor", "tensor",
     lambda sd: _set(_ctl(sd)["raws"], "lr", [torch.full((3,), math.log(0.1), dtype=DTYPE)]),
     ValueError, _names("raws", SHAPE)),
    ("raws-broadcastable-tensor", "tensor",  # (1,) where (2,) is saved: copy_ would broadcast
     lambda sd: _set(_ctl(sd)["raws"], "lr", [torch.full((1,), math.log(0.1), dtype=DTYPE)]),
     ValueError, _names("raws", SHAPE)),
    ("accums-shape-global", "global",
     lambda sd: _set(_ctl(sd)["accums"], "lr", [torch.zeros(2, dtype=DTYPE)]),
     ValueError, _names("accums", SHAPE)),
    ("accums-shape-tensor", "tensor",
     lambda sd: _set(_ctl(sd)["accums"], "lr", [torch.zeros(3, dtype=DTYPE)]),
     ValueError, _names("accums", SHAPE)),
    ("last-shape-global", "global",
     lambda sd: _set(_ctl(sd)["last"], "lr", [torch.zeros(2, dtype=DTYPE)]),
     ValueError, _names("last", SHAPE)),
    ("values-shape-global", "global",
     lambda sd: _set(_ctl(sd)["values"], "lr", [torch.full((2,), 0.1, dtype=DTYPE)]),
     ValueError, _names("values", SHAPE)),
    ("values-shape-tensor", "tensor",
     lambda sd: _set(_ctl(sd)["values"], "lr", [torch.full((3,), 0.1, dtype=DTYPE)]),
     ValueError, _names("values", SHAPE)),
    # the hyper-optimizer's state, which torch loads without looking at shapes (the fused Adam
    # kernel takes its sizes from the raw blocks: a shorter moment is accessed past its end)
    ("hyper-exp_avg-longer-global", "global",
     lambda sd: _set(_hyper_state(sd), "exp_avg", torch.zeros(4, dtype=DTYPE)),
     ValueError, _names("exp_avg|hyper_optimizer", SHAPE)),
    ("hyper-exp_avg-longer-tensor", "tensor",
     lambda sd: _set(_hyper_state(sd), "exp_avg", torch.zeros(5, dtype=DTYPE)),
     ValueError, _names("exp_avg|hyper_optimizer", SHAPE)),
    ("hyper-exp_avg-shorter-tensor", "tensor",     # today: the kernel runs past its end
     lambda sd: _set(_hyper_state(sd), "exp_avg", torch.zeros(1, dtype=DTYPE)),
     ValueError, _names("exp_avg|hyper_optimizer", SHAPE)),
    # (a float16 moment is cast to the raw block's dtype on load, as torch does; an integer
    # one is refused)
    ("hyper-exp_avg-int64", "global",
     lambda sd: _set(_hyper_state(sd), "exp_avg", torch.zeros(1, dtype=torch.int64)),
     ValueError, _names("exp_avg|hyper_optimizer", "floating|dtype|int64")),
    ("hyper-exp_avg-meta", "global",
     lambda sd: _set(_hyper_state(sd), "exp_avg", torch.empty(1, dtype=DTYPE, device="meta")),
     ValueError, _names("exp_avg|hyper_optimizer", "device|meta")),
    # the base optimizer's state
    ("momentum_buffer-shape", "global",
     lambda sd: _set(sd["state"][0], "momentum_buffer", torch.zeros(3, 3, dtype=DTYPE)),
     ValueError, _names("momentum_buffer|state", SHAPE)),
    # non-finite tuned values
    ("values-nan", "global",
     lambda sd: _set(_ctl(sd)["values"], "lr", [torch.full((1,), math.nan, dtype=DTYPE)]),
     ValueError, _names("lr", NONFINITE)),
    ("values-inf", "global",
     lambda sd: _set(_ctl(sd)["values"], "lr", [torch.full((1,), math.inf, dtype=DTYPE)]),
     ValueError, _names("lr", NONFINITE)),
    ("values-one-nan-tensor", "tensor",
     lambda sd: _set(_ctl(sd)["values"], "lr",
                     [torch.tensor([0.1, math.nan], dtype=DTYPE)]),
     ValueError, _names("lr", NONFINITE)),
    ("raws-nan", "global",
     lambda sd: _set(_ctl(sd)["raws"], "lr", [torch.full((1,), math.nan, dtype=DTYPE)]),
     ValueError, _names("lr", NONFINITE)),
    ("raws-inf", "global",
     lambda sd: _set(_ctl(sd)["raws"], "lr", [torch.full((1,), math.inf, dtype=DTYPE)]),
     ValueError, _names("lr", NONFINITE)),
    # wrong types
    ("raws-list-of-floats", "global",
     lambda sd: _set(_ctl(sd)["raws"], "lr", [math.log(0.1)]),
     WRONG_TYPE, _names("raws", "tensor|type|float")),
    ("values-a-float", "global",
     lambda sd: _set(_ctl(sd)["values"], "lr", 0.1),
     WRONG_TYPE, _names("values", "tensor|type|float|list")),
]


@pytest.mark.parametrize("granularity,mutate,exc,patterns",
                         [case[1:] for case in MALFORMED], ids=[case[0] for case in MALFORMED])
def test_a_malformed_checkpoint_is_refused_before_anything_changes(granularity, mutate, exc,
                                                                   patterns):
    _, _, saved, m_tgt, tgt = _saved_and_target(granularity)
    bad = copy.deepcopy(saved)
    mutate(bad)
    _assert_refused_without_trace(tgt, m_tgt, bad, exc, patterns)


WIDTH_METHODS = {
    "greedy": {},
    # no recorded step within the 3 + 2 steps, and no per-parameter method state: only the
    # base optimizer's momentum buffers tell the widths apart
    "implicit": dict(method=Implicit(), update_every=10),
}


@pytest.mark.parametrize("method", list(WIDTH_METHODS))
@pytest.mark.parametrize("granularity", ["global", "tensor"])
def test_a_checkpoint_of_a_model_of_another_width_is_refused_at_load(granularity, method):
    """Linear(3, 2) and Linear(3, 5) have the same number of tensors and, at global or tensor
    granularity, the same tuned blocks; torch's load does not look at the state's shapes, so
    today the momentum buffers of the narrow model load and every later step fails with
    'inconsistent tensor size'."""
    _, _, saved, m_tgt, tgt = _saved_and_target(granularity, target_width=5,
                                                **WIDTH_METHODS[method])
    _assert_refused_without_trace(tgt, m_tgt, saved, ValueError, _names(SHAPE))


@pytest.mark.parametrize("granularity", ["global", "tensor"])
def test_an_unmodified_checkpoint_loads_and_steps_in_lockstep(granularity):
    m_src, src, saved, m_tgt, tgt = _saved_and_target(granularity)
    m_tgt.load_state_dict(m_src.state_dict())
    tgt.load_state_dict(saved)
    assert_state_dicts_equal(tgt.state_dict(), src.state_dict())
    for i in range(3):
        _train(src, m_src, 1, start=10 + i)
        _train(tgt, m_tgt, 1, start=10 + i)
    assert all(torch.equal(a, b) for a, b in zip(m_src.parameters(), m_tgt.parameters()))
    assert _same_hyperparameters(src, tgt)
    assert tgt.hypersteps == src.hypersteps == 5


# ============================================================ 2. non-finite param-group writes
KINDS = ("lr", "momentum", "weight_decay")
GOOD = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3}
WRITES = [(kind, True, bad) for kind in KINDS for bad in ("nan", "inf", "negative")] + \
         [(kind, False, bad) for kind in KINDS for bad in ("nan", "inf")]


@pytest.mark.parametrize("kind,tuned,bad", WRITES,
                         ids=[f"{k}-{'tuned' if t else 'untuned'}-{b}" for k, t, b in WRITES])
def test_a_nonfinite_param_group_write_is_refused_at_the_next_step(kind, tuned, bad):
    """For a tuned lr, group['lr'] is a scheduler scale; NaN, inf or a negative scale there
    is refused as well (it would make every weight NaN, or step uphill)."""
    other = "momentum" if kind == "lr" else "lr"
    m = _linear()
    opt = HyperOptimizer(torch.optim.SGD, m.parameters(), **GOOD,
                         tune=(kind,) if tuned else (other,))
    _train(opt, m, 2)
    weights = [p.detach().clone() for p in m.parameters()]
    buffers = [opt.state[p]["momentum_buffer"].clone() for p in m.parameters()]
    tuned_before = _tuned_snapshot(opt)
    opt.param_groups[0][kind] = {"nan": math.nan, "inf": math.inf, "negative": -0.5}[bad]
    opt.zero_grad()
    _loss(m, 2).backward()
    with pytest.raises(ValueError) as info:
        opt.step()
    _check_message(info.value, [re.escape(kind), "group"])
    assert all(torch.equal(a, p) for a, p in zip(weights, m.parameters()))
    assert all(torch.equal(a, opt.state[p]["momentum_buffer"])
               for a, p in zip(buffers, m.parameters()))
    _assert_tuned_equal(opt, tuned_before)
    # a valid value written back: training goes on
    opt.param_groups[0][kind] = GOOD[kind]
    _train(opt, m, 2, start=3)
    assert all(bool(p.isfinite().all()) for p in m.parameters())
    assert not all(torch.equal(a, p) for a, p in zip(weights, m.parameters()))


# ================================================ 3. a val_loss that ignores the parameters
def _functional_loss(params, x, y):
    w, b = params
    return ((x @ w.T + b - y) ** 2).mean()


def _functional_train(opt, steps: int, start: int = 0) -> None:
    params = opt.param_groups[0]["params"]
    for i in range(start, start + steps):
        j = (i * 8) % 40
        opt.zero_grad()
        _functional_loss(params, X[j:j + 8], Y[j:j + 8]).backward()
        opt.step()


@pytest.mark.parametrize("case", ["other-model", "deepcopy-of-the-optimizer",
                                  "deepcopy-of-model-and-optimizer"])
def test_a_val_loss_that_does_not_depend_on_the_parameters_is_a_clear_error(case):
    patterns = _names("val_loss", "depend", "param")
    if case == "other-model":
        m, other = _linear(seed=0), _linear(seed=1)
        fixed = lambda: ((m(XV) - YV) ** 2).mean()     # noqa: E731
        opt = HyperOptimizer(torch.optim.SGD, m.parameters(), lr=0.1, momentum=0.9,
                             val_loss=fixed)
        _train(opt, m, 2)
        opt.val_loss = lambda: other(XV).pow(2).mean()
        target = opt
        train = lambda o, n, s: _train(o, m, n, s)        # noqa: E731
    elif case == "deepcopy-of-the-optimizer":
        torch.manual_seed(0)
        params = [torch.randn(2, 3, dtype=DTYPE, requires_grad=True),
                  torch.randn(2, dtype=DTYPE, requires_grad=True)]
        opt = HyperOptimizer(torch.optim.SGD, params, lr=0.1, momentum=0.9,
                             val_loss=lambda: _functional_loss(params, XV, YV))
        _functional_train(opt, 2)
        target = copy.deepcopy(opt)      # its own parameters; the callable reads the original
        copied = target.param_groups[0]["params"]
        assert copied[0] is not params[0]
        train = lambda o, n, s: _functional_train(o, n, s)  # noqa: E731
        fixed = lambda: _functional_loss(copied, XV, YV)  # noqa: E731
        patterns = patterns + _names("cop")
    else:
        m = _linear(seed=0)
        opt = HyperOptimizer(torch.optim.SGD, m.parameters(), lr=0.1, momentum=0.9,
                             val_loss=lambda: ((m(XV) - YV) ** 2).mean())
        _train(opt, m, 2)
        m2, target = copy.deepcopy((m, opt))
        train = lambda o, n, s: _train(o, m2, n, s)       # noqa: E731
        fixed = lambda: ((m2(XV) - YV) ** 2).mean()       # noqa: E731
        patterns = patterns + _names("cop")
    hypersteps = target.hypersteps
    with pytest.raises(RuntimeError) as info:
        train(target, 1, 5)
    _check_message(info.value, patterns)
    # usable again once val_loss reads its own parameters
    values = _tuned_snapshot(target)
    target.val_loss = fixed
    train(target, 2, 6)
    assert target.hypersteps == hypersteps + 2 and target.skipped_hypersteps == 0
    assert not torch.equal(target.tuned["lr"].values[0], values["lr"][0])
    assert all(bool(p.isfinite().all()) for p in target.param_groups[0]["params"])


# ============================================ 4. an infinite val_loss with a finite gradient
def _val_loss(model, poison: dict, how: str):
    def val_loss():
        loss = ((model(XV) - YV) ** 2).mean()
        if not poison["on"]:
            return loss
        return loss + math.inf if how == "plus-inf" else loss * 0 + math.inf
    return val_loss


@pytest.mark.parametrize("how", ["plus-inf", "times-zero-plus-inf"])
def test_an_infinite_val_loss_with_a_finite_gradient_skips_the_hyperstep(how):
    m = _linear()
    poison = {"on": False}
    opt = HyperOptimizer(torch.optim.SGD, m.parameters(), lr=0.1, momentum=0.9,
                         tune=("lr", "momentum"), val_loss=_val_loss(m, poison, how))
    _train(opt, m, 3)
    twin_m, twin = copy.deepcopy((m, opt))
    twin.val_loss = _val_loss(twin_m, {"on": False}, how)
    before_w = [p.detach().clone() for p in m.parameters()]
    tuned_before = _tuned_snapshot(opt)
    hyper_state = copy.deepcopy(opt.hyper_optimizer.state_dict())
    poison["on"] = True
    _train(opt, m, 1, start=3)
    _train(twin, twin_m, 1, start=3)
    assert opt.skipped_hypersteps == 1
    _assert_tuned_equal(opt, tuned_before)
    assert_state_dicts_equal(opt.hyper_optimizer.state_dict(), hyper_state, "hyper_optimizer")
    # the base step was taken, as by the twin whose val_loss is finite ...
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), twin_m.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(m.parameters(), before_w))
    # ... whose hyper-step did move the hyperparameters
    assert twin.skipped_hypersteps == 0 and not _same_hyperparameters(opt, twin)
    poison["on"] = False
    _train(opt, m, 2, start=4)
    assert opt.skipped_hypersteps == 1
    assert not torch.equal(opt.tuned["lr"].values[0], tuned_before["lr"][0])


# ====================================================================== 5. momentum bounds
@pytest.mark.parametrize("bounds", [(0.0, 1.0), (0.5, 1.0)], ids=str)
def test_momentum_bounds_reaching_one_are_refused(bounds):
    """sigmoid(raw) reaches 1 only at raw = inf: an upper bound of 1 is no bound in logit
    space, and momentum rounds to exactly 1.0 in float32 (after which it cannot move)."""
    with pytest.raises(ValueError) as info:
        HyperOptimizer(torch.optim.SGD, _linear().parameters(), lr=0.1, momentum=0.9,
                       tune=("lr", "momentum"), bounds={"momentum": bounds})
    _check_message(info.value, _names("momentum", "1"))


@pytest.mark.parametrize("bounds", [(0.5, 0.999), (0.0, 0.9999)], ids=str)
def test_momentum_bounds_below_one_are_accepted(bounds):
    m = _linear()
    opt = HyperOptimizer(torch.optim.SGD, m.parameters(), lr=0.1, momentum=0.9, hyper_lr=1.0,
                         tune=("lr", "momentum"), bounds={"momentum": bounds})
    _train(opt, m, 6)
    mom = float(opt.hyperparameters()["momentum"][0])
    assert bounds[0] <= mom <= bounds[1]


# ================================================================= 6. constructor arguments
def _adam_instance():
    return torch.optim.Adam([torch.zeros(1, requires_grad=True)])


OPTIMIZER_NAMES = "Optimizer"      # the expected form: a torch.optim.Optimizer subclass
CONSTRUCTOR = [
    ("hyper_optimizer_kwargs-lr", lambda: dict(hyper_optimizer_kwargs={"lr": 0.3}),
     ValueError, ["hyper_lr="]),
    ("hyper_optimizer-LBFGS", lambda: dict(hyper_optimizer=torch.optim.LBFGS),
     ValueError, ["closure", "Adam|SGD"]),
    ("hyper_optimizer-a-string", lambda: dict(hyper_optimizer="adam"),
     TypeError, ["hyper_optimizer", OPTIMIZER_NAMES]),
    ("hyper_optimizer-an-instance", lambda: dict(hyper_optimizer=_adam_instance()),
     TypeError, ["hyper_optimizer", OPTIMIZER_NAMES]),
    ("hyper_optimizer-dict", lambda: dict(hyper_optimizer=dict),
     TypeError, ["hyper_optimizer", OPTIMIZER_NAMES]),
    ("hyper_optimizer-a-scheduler", lambda: dict(hyper_optimizer=torch.optim.lr_scheduler.StepLR),
     TypeError, ["hyper_optimizer", OPTIMIZER_NAMES]),
    ("tune-None", lambda: dict(tune=None), TypeError, ["tune="]),
    ("tune-5", lambda: dict(tune=5), TypeError, ["tune="]),
    ("bounds-of-untuned-momentum", lambda: dict(bounds={"momentum": (0, 0.9)}),
     ValueError, ["momentum", "tune="]),
    ("lr-True", lambda: dict(lr=True), (TypeError, ValueError), [r"\blr\b"]),
    ("update_every-True", lambda: dict(update_every=True), ValueError, ["update_every"]),
]


@pytest.mark.parametrize("kwargs,exc,patterns", [c[1:] for c in CONSTRUCTOR],
                         ids=[c[0] for c in CONSTRUCTOR])
def test_bad_constructor_arguments_are_refused_with_the_fix(kwargs, exc, patterns):
    kw = dict(lr=0.1, momentum=0.9)
    kw.update(kwargs())
    with pytest.raises(exc) as info:
        HyperOptimizer(torch.optim.SGD, _linear().parameters(), **kw)
    _check_message(info.value, patterns)


def test_the_same_parameter_twice_in_a_group_is_refused():
    """torch only warns; stepping a parameter twice per step silently diverges from the model
    the user meant, so HyperOptimizer refuses it."""
    w = torch.nn.Parameter(torch.ones(3, dtype=DTYPE))
    with pytest.raises(ValueError) as info:
        HyperOptimizer(torch.optim.SGD, [w, w], lr=0.1)
    _check_message(info.value, ["(?i)duplicate|twice|more than once|same parameter"])


# ================================================== 7. resume and deepcopy agree, every method
METHODS = {
    "greedy": lambda: Greedy(),
    "implicit": lambda: Implicit(neumann_terms=2),
    "unroll": lambda: Unroll(horizon=2),
    "rtrl": lambda: RTRL(),
    "forward_gradient": lambda: ForwardGradient(seed=3),
    "sgld": lambda: SGLD(seed=3),
    "distill": lambda: Distill(gamma=0.9, horizon=2, refit_every=2),
}
RECORDING = ("implicit", "unroll", "distill")
WINDOW = 3
# 3, 6: at a window boundary (the window's hyper-step waits for the next step's gradient);
# 4: one step into a window; 5: two steps in (Unroll has recorded a step)
POINTS = (3, 4, 5, 6)


def _make_method(name: str):
    def make(model):
        return HyperOptimizer(torch.optim.SGD, model.parameters(), lr=0.05, momentum=0.9,
                              weight_decay=1e-3, tune=("lr", "momentum", "weight_decay"),
                              method=METHODS[name](), update_every=WINDOW)
    return make


def _agree(pair_a, pair_b) -> list[str]:
    (ma, oa), (mb, ob) = pair_a, pair_b
    wrong = []
    if not all(torch.equal(a, b) for a, b in zip(ma.parameters(), mb.parameters())):
        wrong.append("weights")
    if not _same_hyperparameters(oa, ob):
        wrong.append("hyperparameters")
    if oa.hypersteps != ob.hypersteps:
        wrong.append(f"hypersteps {oa.hypersteps} vs {ob.hypersteps}")
    return wrong


@pytest.mark.parametrize("steps", POINTS, ids=lambda s: f"after{s}")
@pytest.mark.parametrize("name", list(METHODS))
def test_resume_and_deepcopy_agree_without_val_loss(name, steps):
    """Without val_loss the meta-objective is the next minibatch's loss.  An optimizer resumed
    from state_dict() (torch.save / torch.load(weights_only=True)) and a deepcopy taken at the
    same moment step in lockstep with the original wherever the window has no recorded step.
    Recorded steps (a gradient graph or a closure on that step's minibatch) cannot be saved or
    copied: where the window has one (for a recording method one step into a window, or at a
    window boundary, where the finished window's hyper-step waits for the next gradient) the
    resumed optimizer and the copy must restart the window the same way."""
    make = _make_method(name)
    m1 = tiny_model()
    o1 = make(m1)
    tiny_train(o1, m1, steps, closure=True)
    recorded = bool(o1.tape)
    if name in ("implicit", "unroll") and steps % WINDOW == 0:
        assert recorded          # the restart case is exercised
    if name not in RECORDING:
        assert not recorded
    m2, o2, _ = reloaded(m1, o1, make)
    m3, o3 = copy.deepcopy((m1, o1))
    for i in range(steps, steps + 6):
        for o, m in ((o1, m1), (o2, m2), (o3, m3)):
            tiny_train(o, m, 1, start=i, closure=True)
    assert o1.hypersteps > 0
    problems = {"resume vs deepcopy": _agree((m2, o2), (m3, o3))}
    if not recorded:
        problems["resume vs original"] = _agree((m2, o2), (m1, o1))
        problems["deepcopy vs original"] = _agree((m3, o3), (m1, o1))
    problems = {k: v for k, v in problems.items() if v}
    assert not problems, problems


def test_load_state_dict_does_not_run_the_state_dict_hooks():
    """load_state_dict takes its own snapshot (to restore after a failed load) without the
    user's state_dict hooks: they run once per state_dict() call, never inside a load."""
    model = torch.nn.Linear(3, 2).double()
    opt = HyperOptimizer(torch.optim.SGD, model.parameters(), lr=0.1, momentum=0.9)
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append("pre"))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append("post"))
    sd = opt.state_dict()
    assert calls == ["pre", "post"]
    opt.load_state_dict(sd)
    assert calls == ["pre", "post"]
