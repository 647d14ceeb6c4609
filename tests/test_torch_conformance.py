"""HyperOptimizer against torch's own optimizer tests, in the spirit of pytorch's
``TestOptimRenewed`` (test/test_optim.py) and driven by its ``optim_db``.

Every configuration torch tests for SGD, Adam, AdamW, RMSprop and Adagrad
(``optim_info.optim_inputs_func(device="cpu")``) runs twice: *frozen* (``hyper_lr=0``, where the
HyperOptimizer must step exactly like the torch optimizer) and *tuned* (the default hyper_lr,
tuning lr plus the configuration's nonzero momentum and weight decay).  A tuned run is still
compared with torch step by step: before each torch step, torch's param groups get the values
the HyperOptimizer's step used (``opt.hyperparameters()`` after that step), so the base step
must still be torch's.  Every comparison is against what torch actually does, never against
hard-coded numbers.

The checks that the options hardly touch (hooks, repr, zero_grad, deepcopy, add_param_group,
schedulers, float-step checkpoints) run on a representative subset of the configurations
(``SOME``) so the module stays fast. The others run on all 34.
"""
import copy
import functools
import io
import re

import pytest
import torch
from torch import Tensor
from torch.optim.optimizer import (register_optimizer_step_post_hook,
                                   register_optimizer_step_pre_hook)

from hyperopt_wrap import HyperOptimizer

from problems import flat, rel_err

pytest.importorskip("expecttest", reason="torch's optim_db needs expecttest: "
                                         "pip install -e '.[test]'")
from torch.testing._internal.common_optimizers import optim_db  # noqa: E402

NAMES = ("SGD", "Adam", "AdamW", "RMSprop", "Adagrad")
INFOS = [oi for oi in optim_db if oi.optim_cls.__name__ in NAMES]
RTOL = 1e-12        # float64 parity with torch, normwise per tensor (weights and state)


def _id(cls, desc: str) -> str:
    return f"{cls.__name__}-{re.sub(r'[^0-9A-Za-z]+', '_', desc).strip('_')}"


CONFIGS = [pytest.param(oi.optim_cls, inp.kwargs, id=_id(oi.optim_cls, inp.desc))
           for oi in INFOS for inp in oi.optim_inputs_func(device="cpu")]
DEFAULTS = [pytest.param(oi.optim_cls, {}, id=oi.optim_cls.__name__) for oi in INFOS]
TENSOR_LR = [c for c in CONFIGS if isinstance(c.values[1].get("lr"), Tensor)]


def _some():
    """Each optimizer's default, its most combined configuration (the last in optim_db's
    order), and the tensor-lr ones.  For Adam the last is amsgrad with coupled weight decay,
    whose step takes the forward-mode fallback (tens of ms per step); "maximize" stands in
    for it there (the checks over every configuration still run amsgrad)."""
    out = []
    for oi in INFOS:
        mine = [c for c in CONFIGS if c.values[0] is oi.optim_cls]
        last = mine[-2] if oi.optim_cls is torch.optim.Adam else mine[-1]
        out += [c for c in mine
                if c is mine[0] or c is last or isinstance(c.values[1].get("lr"), Tensor)]
    return out


SOME = _some()
configs = pytest.mark.parametrize("cls,kwargs", CONFIGS)
some_configs = pytest.mark.parametrize("cls,kwargs", SOME)
SOME_WITH_STEP = [c for c in SOME if c.values[0] is not torch.optim.SGD]   # SGD has no counter
modes = pytest.mark.parametrize("tuned", [False, True], ids=["frozen", "tuned"])


def _variants():
    """The implementation flags derived the way torch's
    ``_get_optim_inputs_including_global_cliquey_kwargs`` does it (every flag False, then each
    one True), except that foreach is kept on the CPU (torch leaves it out there only because
    its foreach kernels fall back to a loop) and capturable is added where the optimizer has
    it."""
    off, refused = [], []
    for oi in INFOS:
        flags = [f for f in oi.supported_impls if f != "fused" or "cpu" in oi.supports_fused_on]
        if oi.has_capturable_arg:
            flags.append("capturable")
        for inp in oi.optim_inputs_func(device="cpu"):
            base = dict(copy.deepcopy(inp.kwargs), **{f: False for f in flags})
            name = _id(oi.optim_cls, inp.desc)
            off.append(pytest.param(oi.optim_cls, base, id=name))
            refused += [pytest.param(oi.optim_cls, dict(base, **{f: True}), f, id=f"{name}-{f}")
                        for f in flags if f != "foreach"]
    return off, refused


FLAGS_OFF, FLAGS_REFUSED = _variants()


# --------------------------------------------------------------------------- helpers
def _model(seed=0):
    """A float64 4-3-2 tanh MLP, its weights drawn from a private seeded generator."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(),
                                torch.nn.Linear(3, 2)).double()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.rand(p.shape, generator=gen, dtype=torch.float64) - 0.5)
    return model


_gen = torch.Generator().manual_seed(1)
X = torch.randn(6, 8, 4, generator=_gen, dtype=torch.float64)
Y = torch.randn(6, 8, 2, generator=_gen, dtype=torch.float64)


def _loss(model, i=0):
    return ((model(X[i % len(X)]) - Y[i % len(Y)]) ** 2).mean()


def _kw(kwargs, **over):
    """A private copy of a configuration. Optimizers must not share a tensor lr, because a
    scheduler fills it in place."""
    return dict(copy.deepcopy(kwargs), **over)


def _fresh(spec):
    """Fresh param-group dicts around the same parameters. torch keeps the dicts it is given
    and fills them in, so two optimizers must never share them."""
    if spec and isinstance(spec[0], dict):
        return [{k: list(v) if k == "params" else copy.deepcopy(v) for k, v in g.items()}
                for g in spec]
    return list(spec)


@functools.cache
def _rule(cls):
    p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    return HyperOptimizer(cls, [p], lr=0.01, hyper_lr=0.0).rule


def _tuning(cls, groups) -> dict:
    """tune=/granularity= for torch's param groups. lr is always tuned. Momentum is tuned
    where every group has some (0 means no buffer). Weight decay is tuned where a group has
    some (groups at 0 stay untuned). Granularity is per group where the groups disagree."""
    rule = _rule(cls)
    tune, granularity = ["lr"], {}
    for kind in ("momentum", "weight_decay"):
        if kind not in rule.kinds:
            continue
        values = [rule.read(g, kind) for g in groups]
        nonzero = {v for v in values if v != 0}
        if not nonzero or (kind == "momentum" and 0 in values):
            continue
        tune.append(kind)
        if len(nonzero) > 1:
            granularity[kind] = "group"
    return dict(tune=tuple(tune), granularity=granularity or "global")


def _torch(cls, spec, kwargs):
    return cls(_fresh(spec), **_kw(kwargs))


def _hyper(cls, spec, kwargs, tuned, **extra):
    """The HyperOptimizer for a configuration, frozen (hyper_lr=0) or tuning at the default
    hyper_lr. Both modes tune the same kinds."""
    for key, value in _tuning(cls, _torch(cls, spec, kwargs).param_groups).items():
        extra.setdefault(key, value)
    if not tuned:
        extra.setdefault("hyper_lr", 0.0)
    return HyperOptimizer(cls, _fresh(spec), **_kw(kwargs), **extra)


def _follow(ref, opt):
    """Give torch's param groups the values the HyperOptimizer's last step used."""
    hp = opt.hyperparameters()
    for gi, group in enumerate(ref.param_groups):
        for kind in opt.tuned_kinds:
            value = float(hp[kind][gi])
            if kind == "momentum" and "betas" in group:
                group["betas"] = (value, group["betas"][1])
            else:
                group[kind] = value


def _lockstep(opt, ref, backward, backward_ref, steps, tuned, start=0, after=None):
    """Run both optimizers for ``steps`` steps. ``backward(i)`` fills the gradients of step
    ``i`` and returns the loss. In a tuned run torch takes the values the HyperOptimizer's
    step used. Returns the HyperOptimizer's losses."""
    losses = []
    for i in range(start, start + steps):
        opt.zero_grad()
        losses.append(float(backward(i)))
        ref.zero_grad()
        backward_ref(i)
        opt.step()
        if tuned:
            _follow(ref, opt)
        ref.step()
        if after is not None:
            after(i)
    return losses


def _backward(model):
    def fn(i):
        loss = _loss(model, i)
        loss.backward()
        return loss.detach()
    return fn


def _pair(cls, kwargs, tuned, **extra):
    """A model with the HyperOptimizer, and an identical model with the torch optimizer."""
    m, mr = _model(), _model()
    opt = _hyper(cls, list(m.parameters()), kwargs, tuned, **extra)
    ref = _torch(cls, list(mr.parameters()), kwargs)
    return m, opt, mr, ref


def _run_pair(m, opt, mr, ref, steps, tuned, **kw):
    return _lockstep(opt, ref, _backward(m), _backward(mr), steps, tuned, **kw)


def _train(opt, model, steps, start=0):
    for i in range(start, start + steps):
        opt.zero_grad()
        _loss(model, i).backward()
        opt.step()


def _assert_like_torch(opt, ref, params, ref_params, rtol=RTOL):
    """The weights, and each parameter's optimizer state (its keys and values), match torch's."""
    params, ref_params = list(params), list(ref_params)
    for i, (p, q) in enumerate(zip(params, ref_params)):
        assert rel_err(p.detach(), q.detach()) <= rtol, f"param {i}"
    for i, (p, q) in enumerate(zip(params, ref_params)):
        mine, theirs = opt.state.get(p, {}), ref.state.get(q, {})
        assert sorted(mine) == sorted(theirs), f"state keys of param {i}"
        for key, value in theirs.items():
            assert rel_err(torch.as_tensor(mine[key]), torch.as_tensor(value)) <= rtol, \
                f"state[{i}][{key!r}]"


def _same(a, b) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return (isinstance(a, Tensor) and isinstance(b, Tensor) and a.dtype == b.dtype
                and torch.equal(a, b))
    return type(a) is type(b) and a == b


def _assert_identical(run_a, run_b):
    """Two (model, HyperOptimizer) runs are bit-identical: weights, tuned values, state."""
    (ma, oa), (mb, ob) = run_a, run_b
    for a, b in zip(ma.parameters(), mb.parameters()):
        assert torch.equal(a, b)
    ha, hb = oa.hyperparameters(), ob.hyperparameters()
    assert ha.keys() == hb.keys()
    for kind in ha:
        assert torch.equal(flat(ha[kind]), flat(hb[kind])), kind
    for i, (pa, pb) in enumerate(zip(ma.parameters(), mb.parameters())):
        sa, sb = oa.state.get(pa, {}), ob.state.get(pb, {})
        assert sorted(sa) == sorted(sb), f"state keys of param {i}"
        for key in sa:
            assert _same(sa[key], sb[key]), f"state[{i}][{key!r}]: {sa[key]!r} vs {sb[key]!r}"
    assert oa.hypersteps == ob.hypersteps


def _round_trip(sd):
    buffer = io.BytesIO()
    torch.save(sd, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _resumed(cls, kwargs, tuned, model, saved):
    """A fresh model and HyperOptimizer, loaded with ``model``'s weights and ``saved``."""
    m2 = _model(seed=7)
    m2.load_state_dict(model.state_dict())
    opt2 = _hyper(cls, list(m2.parameters()), kwargs, tuned)
    opt2.load_state_dict(saved)
    return m2, opt2


def _assert_moved_or_frozen(opt, initial_lr, tuned):
    lr = float(opt.hyperparameters()["lr"][0])
    if tuned:
        assert opt.hypersteps > 0 and opt.skipped_hypersteps == 0
        assert lr != initial_lr
    else:
        assert lr == initial_lr


# =========================================================================== 1. parity
@configs
@modes
def test_steps_like_torch_including_the_state(cls, kwargs, tuned):
    m, opt, mr, ref = _pair(cls, kwargs, tuned)
    lr0 = float(opt.hyperparameters()["lr"][0])
    _run_pair(m, opt, mr, ref, 5, tuned)
    _assert_like_torch(opt, ref, m.parameters(), mr.parameters())
    assert opt.skipped_steps == 0
    _assert_moved_or_frozen(opt, lr0, tuned)


# --------------------------------------------------------------------------- impl. flags
@pytest.mark.parametrize("cls,kwargs", FLAGS_OFF)
@modes
def test_foreach_true_and_false_step_like_torch_and_agree(cls, kwargs, tuned):
    runs = []
    for foreach in (False, True):
        m, opt, mr, ref = _pair(cls, _kw(kwargs, foreach=foreach), tuned)
        _run_pair(m, opt, mr, ref, 3, tuned)
        _assert_like_torch(opt, ref, m.parameters(), mr.parameters())
        assert opt.param_groups[0]["foreach"] is foreach
        runs.append((m, opt))
    (m0, o0), (m1, o1) = runs
    for a, b in zip(m0.parameters(), m1.parameters()):
        assert rel_err(a.detach(), b.detach()) <= RTOL
    for kind in o0.tuned_kinds:
        assert rel_err(flat(o0.hyperparameters()[kind]), flat(o1.hyperparameters()[kind])) <= RTOL


@pytest.mark.parametrize("cls,kwargs,flag", FLAGS_REFUSED)
@modes
def test_fused_differentiable_and_capturable_are_refused_at_construction(cls, kwargs, flag,
                                                                          tuned):
    """torch constructs these, and HyperOptimizer refuses them by design with a ValueError that
    names the flag: the fused kernel cannot give the step's derivatives, the library
    differentiates the step itself, and capture is not supported."""
    m = _model()
    _torch(cls, list(m.parameters()), kwargs)
    with pytest.raises(ValueError, match=flag):
        _hyper(cls, list(m.parameters()), kwargs, tuned)


# =========================================================================== 2. groups, lr
def _groups_problem(seed=0):
    """torch's test_param_groups_* problem, smaller: ``(w x + b)^2``, plus a third parameter
    that gets a random gradient at every step."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.nn.Parameter(torch.randn(4, 3, generator=gen, dtype=torch.float64))
    bias = torch.nn.Parameter(torch.randn(4, generator=gen, dtype=torch.float64))
    other = torch.nn.Parameter(torch.randn(2, generator=gen, dtype=torch.float64))
    x = torch.randn(3, generator=gen, dtype=torch.float64)
    other_grads = [torch.rand(2, generator=gen, dtype=torch.float64) for _ in range(8)]

    def backward(i):
        loss = (weight.mv(x) + bias).pow(2).sum()
        loss.backward()
        other.grad = other_grads[i].clone()
        return loss.detach()
    return (weight, bias, other), backward


def _loss_moved_the_right_way(kwargs, losses):
    if kwargs.get("maximize", False):
        assert losses[-1] > losses[0]
    else:
        assert losses[-1] < losses[0]


@configs
@modes
def test_param_groups_lr(cls, kwargs, tuned):
    """torch's test_param_groups_lr. The second group's lr of 1e-28 is outside the default
    bounds, which widen to contain it, and that group's parameter stays bit-exactly
    unchanged."""
    kwargs = _kw(kwargs)
    if "lr" not in kwargs or kwargs["lr"] == 0:
        kwargs["lr"] = 1e-3
    (w, b, other), backward = _groups_problem()
    (wr, br, other_r), backward_r = _groups_problem()
    before = other.detach().clone()
    opt = _hyper(cls, [dict(params=[w, b], **kwargs), dict(params=[other])], {"lr": 1e-28}, tuned)
    ref = _torch(cls, [dict(params=[wr, br], **kwargs), dict(params=[other_r])], {"lr": 1e-28})
    losses = _lockstep(opt, ref, backward, backward_r, 6, tuned)
    _loss_moved_the_right_way(kwargs, losses)
    assert torch.equal(other, before) and torch.equal(other_r, before)
    _assert_like_torch(opt, ref, (w, b, other), (wr, br, other_r))


@configs
@modes
def test_a_group_frozen_with_lr_zero_stays_frozen(cls, kwargs, tuned):
    """The common way to freeze part of a model. That group's lr stays untuned at 0 and its
    parameters never move. torch still updates the group's state (its moments), so we must
    too."""
    (w, b, frozen), backward = _groups_problem()
    (wr, br, frozen_r), backward_r = _groups_problem()
    before = frozen.detach().clone()
    opt = _hyper(cls, [dict(params=[w, b]), dict(params=[frozen], lr=0.0)], kwargs, tuned)
    ref = _torch(cls, [dict(params=[wr, br]), dict(params=[frozen_r], lr=0.0)], kwargs)
    lr0 = float(opt.hyperparameters()["lr"][0])
    _lockstep(opt, ref, backward, backward_r, 4, tuned)
    assert torch.equal(frozen, before) and torch.equal(frozen_r, before)
    assert float(opt.hyperparameters()["lr"][1]) == 0.0 and opt.param_groups[1]["lr"] == 0
    _assert_like_torch(opt, ref, (w, b, frozen), (wr, br, frozen_r))
    _assert_moved_or_frozen(opt, lr0, tuned)


@pytest.mark.parametrize("cls,kwargs", DEFAULTS)
@modes
@pytest.mark.parametrize("lr", [1e-12, 2.0])
def test_an_initial_lr_outside_the_default_bounds_is_accepted(cls, kwargs, tuned, lr):
    """The default bounds (lr in [1e-10, 1]) widen to contain the initial value."""
    m, opt, mr, ref = _pair(cls, _kw(kwargs, lr=lr), tuned)
    assert float(opt.hyperparameters()["lr"][0]) == pytest.approx(lr, rel=1e-12)
    _run_pair(m, opt, mr, ref, 3, tuned)
    _assert_like_torch(opt, ref, m.parameters(), mr.parameters())


@pytest.mark.parametrize("cls,kwargs", DEFAULTS)
@modes
@pytest.mark.parametrize("lr,bounds", [(1e-12, (1e-10, 1.0)), (2.0, (1e-10, 1.0)),
                                       (0.1, (0.2, 0.5))])
def test_explicit_bounds_that_exclude_the_initial_lr_raise(cls, kwargs, tuned, lr, bounds):
    m = _model()
    with pytest.raises(ValueError, match="bounds"):
        _hyper(cls, list(m.parameters()), _kw(kwargs, lr=lr), tuned, bounds={"lr": bounds})


# =========================================================================== 3. groups, wd
@configs
@modes
def test_param_groups_weight_decay(cls, kwargs, tuned):
    """torch's test_param_groups_weight_decay: one group with the configuration's weight decay,
    one with weight_decay=0 (which stays at 0 when weight decay is tuned)."""
    (w, b, _), backward = _groups_problem(seed=3)
    (wr, br, _), backward_r = _groups_problem(seed=3)
    no_decay = _kw(kwargs, weight_decay=0.0)
    opt = _hyper(cls, [dict(params=[w], **kwargs), dict(params=[b], **no_decay)], {}, tuned)
    ref = _torch(cls, [dict(params=[wr], **kwargs), dict(params=[br], **no_decay)], {})
    losses = _lockstep(opt, ref, backward, backward_r, 6, tuned)
    _loss_moved_the_right_way(kwargs, losses)
    assert float(opt.hyperparameters()["weight_decay"][1]) == 0.0
    _assert_like_torch(opt, ref, (w, b), (wr, br))


# =========================================================================== 4. old checkpoints
@functools.cache
def _setstate_defaults(cls) -> tuple[tuple[str, object], ...]:
    """The param-group keys that torch's own ``cls.__setstate__`` fills in when a checkpoint
    lacks them (options added to torch after the checkpoint was written), with the values it
    fills in."""
    ref = cls([torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))])
    filled = []
    for key in ref.param_groups[0]:
        if key == "params":
            continue
        state = copy.deepcopy(ref.__getstate__())
        del state["param_groups"][0][key]
        probe = cls.__new__(cls)
        probe.__setstate__(state)
        if key in probe.param_groups[0]:
            filled.append((key, probe.param_groups[0][key]))
    return tuple(filled)


def _resume_both(cls, kwargs, tuned, edit):
    """Train, save, and resume twice for 2 steps: once from the checkpoint as saved, once from
    ``edit(copy)``."""
    m = _model()
    opt = _hyper(cls, list(m.parameters()), kwargs, tuned)
    _train(opt, m, 3)
    sd = copy.deepcopy(opt.state_dict())
    old = copy.deepcopy(sd)
    edit(old)
    runs = []
    for saved in (sd, old):
        m2, opt2 = _resumed(cls, kwargs, tuned, m, saved)
        _train(opt2, m2, 2, start=3)
        runs.append((m2, opt2))
    _assert_identical(*runs)
    return runs


@configs
@modes
def test_a_checkpoint_without_the_newer_group_keys_resumes_identically(cls, kwargs, tuned):
    """A checkpoint older than an option has no key for it, and it meant the value torch fills
    in. So every such key whose saved value is that default is deleted."""
    deleted = set()

    def edit(sd):
        for group in sd["param_groups"]:
            for key, default in _setstate_defaults(cls):
                assert key in group, key
                if group[key] == default:
                    del group[key]
                    deleted.add(key)
    (_, opt_a), (_, opt_b) = _resume_both(cls, kwargs, tuned, edit)
    assert deleted
    for key in deleted:      # filled in again, as torch's __setstate__ does
        assert opt_b.param_groups[0][key] == opt_a.param_groups[0][key], key


@pytest.mark.parametrize("cls,kwargs", SOME_WITH_STEP)
@modes
def test_a_checkpoint_with_a_float_step_resumes_identically(cls, kwargs, tuned):
    """Older torch saved ``state[i]["step"]`` as a Python number, which torch converts on
    load."""
    def edit(sd):
        assert sd["state"] and all("step" in st for st in sd["state"].values())
        for st in sd["state"].values():
            st["step"] = float(st["step"])
    _resume_both(cls, kwargs, tuned, edit)


# =========================================================================== 5. resume
@configs
@modes
def test_resume_is_bit_exact(cls, kwargs, tuned):
    m = _model()
    opt = _hyper(cls, list(m.parameters()), kwargs, tuned)
    _train(opt, m, 3)
    saved = _round_trip({"model": m.state_dict(), "opt": opt.state_dict()})
    m2 = _model(seed=7)
    m2.load_state_dict(saved["model"])
    opt2 = _hyper(cls, list(m2.parameters()), kwargs, tuned)
    opt2.load_state_dict(saved["opt"])
    _assert_identical((m, opt), (m2, opt2))
    _train(opt, m, 3, start=3)
    _train(opt2, m2, 3, start=3)
    _assert_identical((m, opt), (m2, opt2))


# =========================================================================== 6. hooks
@some_configs
@modes
def test_state_dict_hooks_fire_once_and_see_the_hyper_entry(cls, kwargs, tuned):
    m = _model()
    opt = _hyper(cls, list(m.parameters()), kwargs, tuned)
    _train(opt, m, 3)
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append("pre"))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append(("post", "hyper" in sd)))
    sd = opt.state_dict()
    assert calls == ["pre", ("post", True)] and "hyper" in sd
    opt.state_dict()
    assert len(calls) == 4
    saved_lr = float(opt.hyperparameters()["lr"][0])

    m2 = _model(seed=7)
    m2.load_state_dict(m.state_dict())
    fresh = _hyper(cls, list(m2.parameters()), kwargs, tuned)
    seen = []
    fresh.register_load_state_dict_pre_hook(lambda o, sd: seen.append(("pre", "hyper" in sd)))
    fresh.register_load_state_dict_post_hook(
        lambda o: seen.append(("post", float(o.hyperparameters()["lr"][0]))))
    fresh.load_state_dict(copy.deepcopy(sd))
    assert seen == [("pre", True), ("post", saved_lr)]


@some_configs
@modes
def test_step_hooks_fire_once_per_step_like_torch(cls, kwargs, tuned):
    m, opt, mr, ref = _pair(cls, kwargs, tuned)
    orders = []
    for o, model in ((opt, m), (ref, mr)):
        calls = []

        def hook(tag, o=o, calls=calls):
            return lambda self, args, kw: calls.append(tag) if self is o else None
        handles = [o.register_step_pre_hook(hook("pre")),
                   o.register_step_post_hook(hook("post")),
                   register_optimizer_step_pre_hook(hook("global-pre")),
                   register_optimizer_step_post_hook(hook("global-post"))]
        try:
            _train(o, model, 3)
        finally:
            for h in handles:
                h.remove()
        orders.append(calls)
    assert orders[0] == orders[1] and len(orders[0]) == 12


# =========================================================================== 7. tensor lr
@pytest.mark.parametrize("cls,kwargs", TENSOR_LR)
@modes
def test_a_tensor_lr_stays_a_tensor_like_torch(cls, kwargs, tuned):
    m, opt, mr, ref = _pair(cls, kwargs, tuned)
    assert isinstance(ref.param_groups[0]["lr"], Tensor)
    assert isinstance(opt.param_groups[0]["lr"], Tensor)
    assert float(opt.param_groups[0]["lr"]) == float(ref.param_groups[0]["lr"])
    _run_pair(m, opt, mr, ref, 3, tuned)
    assert isinstance(opt.param_groups[0]["lr"], Tensor)
    _assert_like_torch(opt, ref, m.parameters(), mr.parameters())


@configs
@modes
def test_a_scheduler_then_a_tensor_written_into_lr_steps_like_torch(cls, kwargs, tuned):
    """StepLR for two steps, then a float64 tensor written into group["lr"] (bit-for-bit
    parity), then a float32 tensor. torch does its step-size arithmetic (Adam's
    ``lr / bias_correction1``, Adagrad's lr decay) in the tensor's dtype, so the float32
    phase is compared at float32 precision."""
    m, opt, mr, ref = _pair(cls, kwargs, tuned)
    schedulers = [torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5) for o in (opt, ref)]
    _run_pair(m, opt, mr, ref, 2, tuned, after=lambda i: [s.step() for s in schedulers])
    for dtype, rtol, start in ((torch.float64, RTOL, 2), (torch.float32, 1e-6, 4)):
        for o in (opt, ref):
            o.param_groups[0]["lr"] = torch.tensor(0.05, dtype=dtype)
        _run_pair(m, opt, mr, ref, 2, tuned, start=start)
        assert isinstance(opt.param_groups[0]["lr"], Tensor)
        _assert_like_torch(opt, ref, m.parameters(), mr.parameters(), rtol=rtol)


@pytest.mark.parametrize("cls,kwargs", DEFAULTS)
@modes
def test_a_two_element_tensor_lr_is_refused_like_torch(cls, kwargs, tuned):
    m = _model()
    kw = _kw(kwargs, lr=torch.tensor([0.01, 0.02]))
    with pytest.raises(Exception) as theirs:
        _torch(cls, list(m.parameters()), kw)
    with pytest.raises(theirs.type):
        HyperOptimizer(cls, list(m.parameters()), **({} if tuned else {"hyper_lr": 0.0}), **kw)


# =========================================================================== 8. state layout
def _layout(opt, params):
    """Per parameter: None (no state) or {key: (type, dtype, shape, device)}."""
    out = []
    for p in params:
        if p not in opt.state:
            out.append(None)
            continue
        out.append({k: (type(v).__name__, getattr(v, "dtype", None),
                        tuple(getattr(v, "shape", ())), getattr(v, "device", None))
                    for k, v in opt.state[p].items()})
    return out


@configs
@modes
def test_state_layout_and_dtypes_are_torchs(cls, kwargs, tuned):
    """The same state entries as torch, with the same dtypes (``step`` is float32 under the
    float32 default dtype), created when torch creates them: Adagrad's in __init__, and never
    any for SGD without momentum. On the CPU the devices agree too. On an accelerator our
    ``step`` lives on the parameter's device while torch keeps it on the CPU, a documented
    difference."""
    m, opt, mr, ref = _pair(cls, kwargs, tuned)
    assert len(opt.state) == len(ref.state)
    assert _layout(opt, m.parameters()) == _layout(ref, mr.parameters())
    _run_pair(m, opt, mr, ref, 2, tuned)
    assert len(opt.state) == len(ref.state)
    assert _layout(opt, m.parameters()) == _layout(ref, mr.parameters())


# =========================================================================== 9. repr
@some_configs
@modes
def test_repr_lists_the_param_groups_like_torch_and_the_configuration(cls, kwargs, tuned):
    def spec(model):
        return [dict(params=list(model[0].parameters())), dict(params=list(model[2].parameters()))]
    m, mr = _model(), _model()
    opt = _hyper(cls, spec(m), kwargs, tuned)
    ref = _torch(cls, spec(mr), kwargs)
    mine = repr(opt).splitlines()
    for line in repr(ref).splitlines()[1:-1]:    # "Parameter Group i" and "    key: value"
        if line:
            assert line in mine, line
    text = repr(opt)
    assert "HyperOptimizer" in text and cls.__name__ in text
    assert "Greedy" in text and "update_every=1" in text and "tune=" in text


# =========================================================================== 10. the rest
@some_configs
@modes
def test_a_step_without_gradients_is_a_no_op_like_torch(cls, kwargs, tuned):
    """Parameters without ``.grad`` are skipped: they are untouched, and no state is made for
    them wherever torch makes none. Adagrad's eager state is left to the layout test."""
    m, opt, mr, ref = _pair(cls, kwargs, tuned)
    before = [p.detach().clone() for p in m.parameters()]

    def no_state_made(params, ref_params):
        for p, q in zip(params, ref_params):
            if not ref.state.get(q):
                assert not opt.state.get(p)
    assert opt.step() is None and ref.step() is None
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
    no_state_made(m.parameters(), mr.parameters())
    assert opt.hypersteps == 0
    # only the first layer's weight has a gradient: the others stay untouched
    for o, model in ((opt, m), (ref, mr)):
        o.zero_grad()
        _loss(model).backward()
        for p in list(model.parameters())[1:]:
            p.grad = None
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(before[1:], list(m.parameters())[1:]))
    no_state_made(list(m.parameters())[1:], list(mr.parameters())[1:])
    _assert_like_torch(opt, ref, [m[0].weight], [mr[0].weight])


@some_configs
@modes
def test_zero_grad_like_torch(cls, kwargs, tuned):
    m, opt, mr, ref = _pair(cls, kwargs, tuned)
    for set_to_none in (False, True):
        grads = []
        for o, model in ((opt, m), (ref, mr)):
            _loss(model).backward()
            o.zero_grad(set_to_none=set_to_none)
            grads.append([p.grad for p in model.parameters()])
        for g, gr in zip(*grads):
            assert (g is None) == (gr is None)
            if g is not None:
                assert torch.equal(g, gr) and g.requires_grad == gr.requires_grad


@some_configs
@modes
def test_deepcopy_is_an_independent_optimizer_in_lockstep(cls, kwargs, tuned):
    m = _model()
    opt = _hyper(cls, list(m.parameters()), kwargs, tuned)
    _train(opt, m, 2)
    m2, opt2 = copy.deepcopy((m, opt))
    assert all(a is not b for a, b in zip(m.parameters(), m2.parameters()))
    assert all(p2 is q for p2, q in zip(opt2.param_groups[0]["params"], m2.parameters()))
    _train(opt, m, 2, start=2)
    _train(opt2, m2, 2, start=2)
    _assert_identical((m, opt), (m2, opt2))
    _train(opt, m, 1, start=4)           # the original moves on alone
    assert not torch.equal(m[0].weight, m2[0].weight)


@some_configs
@modes
def test_add_param_group_steps_like_torch(cls, kwargs, tuned):
    m, mr = _model(), _model()
    opt = _hyper(cls, list(m[0].parameters()), kwargs, tuned)
    ref = _torch(cls, list(mr[0].parameters()), kwargs)
    _run_pair(m, opt, mr, ref, 2, tuned)
    for o, model in ((opt, m), (ref, mr)):
        o.add_param_group({"params": list(model[2].parameters()), "lr": 0.02})
    assert len(opt.param_groups) == 2
    assert all(k in opt.param_groups[1] for k in ref.param_groups[1])
    _run_pair(m, opt, mr, ref, 2, tuned, start=2)
    _assert_like_torch(opt, ref, m.parameters(), mr.parameters())


@some_configs
@modes
@pytest.mark.parametrize("make", [
    lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
    lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.8),
], ids=["StepLR", "ExponentialLR"])
def test_lr_schedulers_like_torch(cls, kwargs, tuned, make):
    """The schedule as torch's (group["lr"]), the steps as torch's. Tuned, the effective lr is
    the tuned value times the schedule's scale."""
    m, opt, mr, ref = _pair(cls, kwargs, tuned)
    lr0 = float(opt.param_groups[0]["lr"])
    probe = _torch(cls, list(_model().parameters()), kwargs)   # the schedule alone
    schedulers = [make(o) for o in (opt, ref, probe)]

    def after(i):
        probe.step()          # no gradients: a no-op, so the scheduler sees a step first
        for s in schedulers:
            s.step()
    _run_pair(m, opt, mr, ref, 4, tuned, after=after)
    scheduled = float(probe.param_groups[0]["lr"])
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(scheduled, rel=1e-12)
    _assert_like_torch(opt, ref, m.parameters(), mr.parameters())
    if tuned:
        assert float(opt.hyperparameters()["lr"][0]) == pytest.approx(
            float(opt.tuned["lr"].values[0]) * scheduled / lr0, rel=1e-12)
