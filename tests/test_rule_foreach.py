"""``UpdateRule.step_foreach`` (a whole bucket per call with ``torch._foreach_*`` ops) equals the
per-tensor ``step_`` loop and ``update`` in float64: every option combination of every built-in
rule, every form of the hyperparameters (float constants, one shared 0-dim tensor, one 0-dim
tensor per param, per-element tensors, and a mix), every subset of tuned kinds, three
consecutive steps from fresh state; a skipped step (ok=0) leaves params and states bit-exactly
as they were; the tangents land in views of one flat buffer; no host synchronisation."""
import contextlib
import itertools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hyperopt_wrap.rules import AdagradRule, AdamRule, RMSpropRule, SGDRule

from problems import SignRule

DT = torch.float64
SHAPES = [(7,), (3, 4), (2, 1, 3)]
VALUES = {"lr": 0.05, "momentum": 0.8, "weight_decay": 0.03}


def _rule_configs():
    for damp, nest, mx, mu in itertools.product([0.0, 0.3], [False, True], [False, True],
                                                [0.9, 0.0]):
        if nest and (damp or not mu):
            continue
        yield (f"sgd-damp{damp}-nest{nest}-max{mx}-mu{mu}", SGDRule(),
               {"dampening": damp, "nesterov": nest, "maximize": mx}, {"momentum": mu})
    for dec, ams, mx in itertools.product([False, True], repeat=3):
        yield (f"adam-decoupled{dec}-amsgrad{ams}-max{mx}", AdamRule(dec),
               {"beta2": 0.99, "eps": 1e-8, "amsgrad": ams, "maximize": mx, "decoupled": dec},
               {"momentum": 0.9})
    for cen, mom, mx in itertools.product([False, True], repeat=3):
        yield (f"rmsprop-centered{cen}-momentum{mom}-max{mx}", RMSpropRule(),
               {"alpha": 0.9, "eps": 1e-8, "centered": cen, "maximize": mx, "has_momentum": mom},
               {"momentum": 0.5 if mom else 0.0})
    for ld, mx, init in itertools.product([0.0, 0.1], [False, True], [0.0, 0.1]):
        yield (f"adagrad-lr_decay{ld}-max{mx}-init{init}", AdagradRule(),
               {"lr_decay": ld, "eps": 1e-10, "maximize": mx, "initial_accumulator_value": init},
               {})


CONFIGS = list(_rule_configs())
FORMS = ("shared", "per-tensor", "per-element", "mixed")


def _tunable(rule, consts):
    return [k for k in rule.kinds if not (k == "momentum" and consts.get("momentum", 1) == 0)]


def _hyper(rule, consts, tensor_kinds, form, wd_const, gen):
    """Floats for the constant kinds; the others in ``form`` ("mixed": per-element, per-tensor,
    shared in turn), a little different per param and per element where they may be."""
    values = {**VALUES, **consts, "weight_decay": wd_const}
    forms = ("per-element", "per-tensor", "shared")
    hyper = {}
    for i, k in enumerate(rule.kinds):
        if k not in tensor_kinds:
            hyper[k] = values[k]
            continue
        f = forms[i % 3] if form == "mixed" else form
        base = VALUES[k]
        if f == "shared":
            hyper[k] = torch.tensor(base, dtype=DT)
        elif f == "per-tensor":
            hyper[k] = [torch.tensor(base * (1 + 0.1 * j), dtype=DT) for j in range(len(SHAPES))]
        else:
            hyper[k] = [base * (1 + 0.1 * torch.rand(s, generator=gen, dtype=DT)) for s in SHAPES]
    return hyper


def _per_param(hyper, i):
    return {k: (v[i] if isinstance(v, list) else v) for k, v in hyper.items()}


def _clone(states):
    return [{k: v.clone() for k, v in s.items()} for s in states]


def _flat_tangents(kinds):
    """One NaN-filled flat buffer; the tangents of each kind are views into it."""
    sizes = [torch.Size(s).numel() for s in SHAPES]
    flat = torch.full((len(kinds) * sum(sizes),), float("nan"), dtype=DT)
    out, pos = {}, 0
    for kind in kinds:
        views = []
        for shape, size in zip(SHAPES, sizes):
            views.append(flat[pos:pos + size].view(shape))
            pos += size
        out[kind] = views
    return flat, out


class NoHostSync(TorchDispatchMode):
    """Fails on a tensor read on the host (``.item()``, a tensor where a Scalar is expected)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default):
            raise AssertionError(f"host synchronisation: {func}")
        return func(*args, **(kwargs or {}))


def _close(actual, expected, what, exact=False, atol=1e-15):
    if exact:
        assert torch.equal(actual, expected), f"{what}: not bit-exact"
    else:
        if not torch.allclose(actual, expected, rtol=1e-13, atol=atol):   # fast path first
            torch.testing.assert_close(actual, expected, rtol=1e-13, atol=atol,
                                       msg=lambda m: f"{what}: {m}")


def _bit_exact(rule, options) -> bool:
    """Where the foreach step does the step_ loop's arithmetic op for op: SGD, RMSprop, Adagrad
    without lr_decay.  Adam folds the bias corrections into its denominator (another rounding),
    and per-parameter scalars go through fused packed-scalar ops."""
    return not isinstance(rule, AdamRule) and not (isinstance(rule, AdagradRule)
                                                   and options["lr_decay"])


def _equal_states(a, b, what):
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k}"


def _run(rule, options, hyper, kinds, steps=3, seed=0, watch=False):
    """``steps`` steps of the foreach path, the step_ loop and ``update`` side by side, each
    preceded by a skipped one; False where the rule declines (then nothing has moved).  With
    ``watch`` the foreach calls run under :class:`NoHostSync`."""
    mode = NoHostSync if watch else contextlib.nullcontext
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen, dtype=DT) for s in SHAPES]
    params[0][:2] = 0.0                 # a dead unit: zero weight, zero gradient, zero moments
    states = [rule.init_state(p, options) for p in params]
    fe_p, fe_s = [p.clone() for p in params], _clone(states)
    lp_p, lp_s = [p.clone() for p in params], _clone(states)
    works = [{} for _ in params]
    one, zero = torch.tensor(1.0, dtype=DT), torch.tensor(0.0, dtype=DT)
    handled = True
    for step in range(steps):
        grads = [torch.randn(s, generator=gen, dtype=DT) for s in SHAPES]
        grads[0][:2] = 0.0
        with torch.no_grad():
            # a skipped step first: nothing moves
            skip_p, skip_s = [p.clone() for p in fe_p], _clone(fe_s)
            _, t_skip = _flat_tangents(kinds)
            zeros = [torch.zeros_like(g) for g in grads]
            with mode():
                handled = rule.step_foreach(skip_p, zeros, skip_s, hyper, options, kinds, zero,
                                            t_skip)
            if not handled:
                assert all(torch.equal(a, b) for a, b in zip(skip_p, fe_p))
                for a, b in zip(skip_s, fe_s):
                    _equal_states(a, b, "declined")
                return False
            ref_skip_s = _clone(lp_s)       # step_'s own ok=0 (SGD adds a zero buffer first)
            for i, p in enumerate(lp_p):
                rule.step_(p.clone(), torch.zeros_like(p), ref_skip_s[i], _per_param(hyper, i),
                           options, kinds, zero, {})
            for i in range(len(params)):
                assert torch.equal(skip_p[i], fe_p[i]), f"skipped step moved param {i}"
                for k in fe_s[i]:
                    assert torch.equal(skip_s[i][k], fe_s[i][k]), f"skipped step moved {k}"
                assert skip_s[i].keys() == ref_skip_s[i].keys()
            # the real step
            ref = [rule.update(p, g, s, _per_param(hyper, i), options)
                   for i, (p, g, s) in enumerate(zip(fe_p, grads, fe_s))]
            flat, tangents = _flat_tangents(kinds)
            copies = [g.clone() for g in grads]
            with mode():
                assert rule.step_foreach(fe_p, copies, fe_s, hyper, options, kinds, one,
                                         tangents)
            assert not torch.isnan(flat).any(), "a tangent entry was not written"
            loop_t = [rule.step_(p, g.clone(), s, _per_param(hyper, i), options, kinds, one, w)
                      for i, (p, g, s, w) in enumerate(zip(lp_p, grads, lp_s, works))]
        where, exact = f"step {step}", _bit_exact(rule, options)
        for i in range(len(params)):
            _close(fe_p[i], lp_p[i], f"{where}, param {i} vs step_", exact)
            _close(fe_p[i], ref[i][0], f"{where}, param {i} vs update")
            assert fe_s[i].keys() == lp_s[i].keys() == ref[i][1].keys()
            for k in fe_s[i]:
                _close(fe_s[i][k], lp_s[i][k], f"{where}, state {k} {i} vs step_", exact)
                _close(fe_s[i][k], ref[i][1][k], f"{where}, state {k} {i} vs update")
            for k in kinds:
                # absolute 1e-13: Adam's coupled weight-decay tangent is a near-cancellation,
                # O(eps) on the first step (Adam's first step is sign-like), of O(1) terms
                _close(tangents[k][i], loop_t[i][k], f"{where}, tangent {k} {i}", exact,
                       atol=1e-13)
    return handled


def _cases():
    for name, rule, options, consts in CONFIGS:
        tunable = _tunable(rule, consts)
        for r in range(len(tunable) + 1):
            for tensor_kinds in itertools.combinations(tunable, r):
                forms = FORMS if tensor_kinds else ("float",)
                yield name, rule, options, consts, tensor_kinds, forms


CASES = list(_cases())


@pytest.mark.parametrize("case", CASES,
                         ids=[f"{c[0]}-{'+'.join(c[4]) or 'constants'}" for c in CASES])
def test_foreach_step_matches_step_loop_and_update(case):
    """Every subset of tensor-valued kinds, in every form, tuned (tangents asked for) or not;
    the other kinds float constants, weight decay zero and not."""
    name, rule, options, consts, tensor_kinds, forms = case
    gen = torch.Generator().manual_seed(5)
    handled = 0
    for form, wd_const in itertools.product(forms, (0.0, 0.03)):
        if "weight_decay" in tensor_kinds and wd_const:
            continue
        hyper = _hyper(rule, consts, tensor_kinds, form, wd_const, gen)
        for kinds in {tensor_kinds, ()}:   # tangents for all of them, and tensors untuned
            ok = _run(rule, options, hyper, kinds)
            declines = (isinstance(rule, AdamRule) and options["amsgrad"]
                        and not options["decoupled"] and "weight_decay" in kinds)
            assert ok == (not declines), (form, wd_const, kinds)
            handled += ok
    assert handled or "weight_decay" in tensor_kinds


def test_sgd_bucket_with_buffers_on_some_params_only():
    """A param that gets its first gradient later joins a bucket whose others have momentum
    buffers: the bucket is split, each part stepped as step_ does."""
    rule, options = SGDRule(), {"dampening": 0.3, "nesterov": False, "maximize": False}
    gen = torch.Generator().manual_seed(7)
    params = [torch.randn(s, generator=gen, dtype=DT) for s in SHAPES]
    grads = [torch.randn(s, generator=gen, dtype=DT) for s in SHAPES]
    states = [{"momentum_buffer": torch.randn(SHAPES[0], generator=gen, dtype=DT)}, {},
              {"momentum_buffer": torch.randn(SHAPES[2], generator=gen, dtype=DT)}]
    kinds = ("lr", "momentum", "weight_decay")
    hyper = {"lr": [torch.tensor(0.1 + 0.01 * i, dtype=DT) for i in range(3)],
             "momentum": torch.tensor(0.9, dtype=DT), "weight_decay": torch.tensor(0.01, dtype=DT)}
    lp_p, lp_s = [p.clone() for p in params], _clone(states)
    _, tangents = _flat_tangents(kinds)
    with torch.no_grad():
        assert rule.step_foreach(params, [g.clone() for g in grads], states, hyper, options,
                                 kinds, torch.tensor(1.0, dtype=DT), tangents)
        loop_t = [rule.step_(p, g.clone(), s, _per_param(hyper, i), options, kinds,
                             torch.tensor(1.0, dtype=DT), {})
                  for i, (p, g, s) in enumerate(zip(lp_p, grads, lp_s))]
    for i in range(3):
        _close(params[i], lp_p[i], f"param {i}")
        _close(states[i]["momentum_buffer"], lp_s[i]["momentum_buffer"], f"buffer {i}")
        for k in kinds:
            _close(tangents[k][i], loop_t[i][k], f"tangent {k} {i}")


def test_tangents_written_into_views_of_one_flat_buffer():
    """The optimizer hands views into one flat buffer: every entry is written, in place (the
    list entries are the same tensor objects afterwards), and nothing outside them moves."""
    rule = AdamRule()
    options = {"beta2": 0.99, "eps": 1e-8, "amsgrad": False, "maximize": False, "decoupled": False}
    gen = torch.Generator().manual_seed(8)
    params = [torch.randn(s, generator=gen, dtype=DT) for s in SHAPES]
    states = [rule.init_state(p, options) for p in params]
    kinds = ("lr", "momentum", "weight_decay")
    sizes = [torch.Size(s).numel() for s in SHAPES]
    flat = torch.full((2 + 3 * sum(sizes),), float("nan"), dtype=DT)
    flat[0], flat[-1] = 7.0, 9.0                # guards either side
    views, pos = {}, 1
    for kind in kinds:
        views[kind] = []
        for shape, size in zip(SHAPES, sizes):
            views[kind].append(flat[pos:pos + size].view(shape))
            pos += size
    ids = {k: [id(t) for t in v] for k, v in views.items()}
    hyper = {k: torch.tensor(VALUES[k], dtype=DT) for k in kinds}
    grads = [torch.randn(s, generator=gen, dtype=DT) for s in SHAPES]
    lp_p, lp_s = [p.clone() for p in params], _clone(states)
    with torch.no_grad():
        assert rule.step_foreach(params, [g.clone() for g in grads], states, hyper, options,
                                 kinds, torch.tensor(1.0, dtype=DT), views)
        loop_t = [rule.step_(p, g.clone(), s, hyper, options, kinds, torch.tensor(1.0, dtype=DT),
                             {}) for p, g, s in zip(lp_p, grads, lp_s)]
    assert flat[0] == 7.0 and flat[-1] == 9.0
    assert not torch.isnan(flat).any()
    assert {k: [id(t) for t in v] for k, v in views.items()} == ids
    for k in kinds:
        for i in range(3):
            _close(views[k][i], loop_t[i][k], f"tangent {k} {i}")


def test_default_declines_for_a_user_rule():
    rule = SignRule()
    params = [torch.randn(3, dtype=DT)]
    before = params[0].clone()
    assert rule.step_foreach(params, [torch.randn(3, dtype=DT)], [{}],
                             {"lr": torch.tensor(0.1, dtype=DT)}, {}, ("lr",),
                             torch.tensor(1.0, dtype=DT), {"lr": [torch.empty(3, dtype=DT)]}) is False
    assert torch.equal(params[0], before)


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_float32_bucket_matches_step_loop(name):
    """The benchmark configuration (float32, momentum 0.9 / Adam defaults, a shared tuned lr)
    for a few steps: same params, states and lr tangents as the step_ loop."""
    if name == "sgd":
        rule, options = SGDRule(), {"dampening": 0.0, "nesterov": False, "maximize": False}
        hyper = {"lr": torch.tensor(0.01), "momentum": 0.9, "weight_decay": 0.0}
    else:
        rule = AdamRule()
        options = {"beta2": 0.999, "eps": 1e-8, "amsgrad": False, "maximize": False,
                   "decoupled": False}
        hyper = {"lr": torch.tensor(1e-3), "momentum": 0.9, "weight_decay": 0.0}
    gen = torch.Generator().manual_seed(9)
    params = [torch.randn(16, 16, generator=gen) for _ in range(20)]
    states = [rule.init_state(p, options) for p in params]
    lp_p, lp_s = [p.clone() for p in params], _clone(states)
    ok = torch.tensor(1.0)
    for _ in range(3):
        grads = [torch.randn(16, 16, generator=gen) for _ in params]
        tangents = {"lr": [torch.empty_like(p) for p in params]}
        with torch.no_grad():
            assert rule.step_foreach(params, [g.clone() for g in grads], states, hyper, options,
                                     ("lr",), ok, tangents)
            loop_t = [rule.step_(p, g.clone(), s, hyper, options, ("lr",), ok, {})
                      for p, g, s in zip(lp_p, grads, lp_s)]
        for i in range(len(params)):
            torch.testing.assert_close(params[i], lp_p[i], rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(tangents["lr"][i], loop_t[i]["lr"], rtol=1e-5, atol=1e-7)
            for k in states[i]:
                torch.testing.assert_close(states[i][k], lp_s[i][k], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("config", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_no_host_synchronisation(config):
    """No ``.item()`` (nor a 0-dim tensor read where a Scalar is expected) in any configuration:
    every tunable kind tensor-valued and tuned, in every form; and all of them constants."""
    name, rule, options, consts = config
    tunable = tuple(_tunable(rule, consts))
    gen = torch.Generator().manual_seed(6)
    for form in FORMS:
        hyper = _hyper(rule, consts, tunable, form, 0.0, gen)
        declines = isinstance(rule, AdamRule) and options["amsgrad"] and not options["decoupled"]
        assert _run(rule, options, hyper, tunable, steps=2, watch=True) is not declines
        if declines:
            assert _run(rule, options, hyper, tunable[:-1], steps=2, watch=True)
    assert _run(rule, options, _hyper(rule, consts, (), "float", 0.03, gen), (), steps=2,
                watch=True)


@pytest.mark.parametrize("variant", ["per-tensor loops", "non-CPU branches"])
@pytest.mark.parametrize("config", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_other_code_paths(config, variant, monkeypatch):
    """The branches the float64 cases above do not reach on their small CPU tensors: the
    one-pass ``out=`` loops for big tensors, and the forms used off the CPU (vecs unbound
    instead of the CPU-only packed-scalar overloads), forced here on the CPU."""
    from hyperopt_wrap.rules import _foreach as F
    if variant == "per-tensor loops":
        monkeypatch.setattr(F, "PER_TENSOR_NUMEL", 0)
    else:
        monkeypatch.setattr(F, "_cpu", lambda xs: False)
    name, rule, options, consts = config
    tunable = tuple(_tunable(rule, consts))
    if isinstance(rule, AdamRule) and options["amsgrad"] and not options["decoupled"]:
        tunable = tunable[:-1]                      # declined with a weight-decay tangent
    gen = torch.Generator().manual_seed(10)
    for form in FORMS:
        for wd in ((0.03,) if "weight_decay" not in tunable else (0.0,)):
            assert _run(rule, options, _hyper(rule, consts, tunable, form, wd, gen), tunable,
                        steps=2)


def test_traces_whole_under_torch_compile():
    """No graph break (fullgraph=True) for Adam with every kind tuned, per-tensor lr: nothing
    in the foreach path that dynamo cannot trace (a tensor's ``__dict__``, ``.item()``, the
    packed-scalar overloads, which need host data), and the same step as eagerly."""
    rule = AdamRule()
    options = {"beta2": 0.99, "eps": 1e-8, "amsgrad": False, "maximize": True, "decoupled": False}
    kinds = ("lr", "momentum", "weight_decay")
    gen = torch.Generator().manual_seed(11)
    hyper = _hyper(rule, {}, kinds, "mixed", 0.0, gen)
    params = [torch.randn(s, generator=gen, dtype=DT) for s in SHAPES]
    grads = [torch.randn(s, generator=gen, dtype=DT) for s in SHAPES]
    eager_p, eager_s = [p.clone() for p in params], [rule.init_state(p, options) for p in params]
    states = _clone(eager_s)
    step = torch.compile(rule.step_foreach, backend="eager", fullgraph=True)
    _, tangents = _flat_tangents(kinds)
    _, eager_t = _flat_tangents(kinds)
    one = torch.tensor(1.0, dtype=DT)
    with torch.no_grad():
        assert step(params, [g.clone() for g in grads], states, hyper, options, kinds, one,
                    tangents)
        assert rule.step_foreach(eager_p, [g.clone() for g in grads], eager_s, hyper, options,
                                 kinds, one, eager_t)
    for i in range(len(SHAPES)):
        _close(params[i], eager_p[i], f"param {i}")
        for k in kinds:
            _close(tangents[k][i], eager_t[k][i], f"tangent {k} {i}", atol=1e-13)
