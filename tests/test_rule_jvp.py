"""Forward (tangent) products of a whole step, ``UpdateRule.jvp``: every built-in rule's closed
form equals the forward-mode default through ``update`` (float64, rtol 1e-12) in every option
combination, first and later steps, every subset of tuned kinds (0-dim and per-element), and
random tangents with any of their parts missing; the default itself equals ``torch.func.jvp``;
a user's rule works through the default; the closed forms are finite (and equal to central
differences) where Adam/RMSprop/Adagrad's second moment is exactly 0; nothing is modified and
no output aliases an input."""
import itertools

import pytest
import torch
from torch import Tensor

from hyperopt_wrap.rules import (AdagradRule, AdamRule, RMSpropRule, SGDRule, Tangent,
                                 UpdateRule)

from problems import SignRule

DT = torch.float64
N = 12


def _t(x):
    return torch.tensor(x, dtype=DT)


# ----------------------------------------------------------------------------- configurations

def _configs():
    """``(id, rule, options, values)``: every option combination of every built-in rule, with
    the constant value of each kind (0 where the option is off)."""
    for (damp, nest), mx, mu, wd in itertools.product(
            [(0.0, False), (0.3, False), (0.0, True)], [False, True], [0.0, 0.9], [0.0, 0.03]):
        if nest and not mu:
            continue
        yield (f"sgd-damp{damp}-nest{nest}-max{mx}-mu{mu}-wd{wd}", SGDRule(),
               {"dampening": damp, "nesterov": nest, "maximize": mx},
               {"lr": 0.05, "momentum": mu, "weight_decay": wd})
    for dec, ams, mx, wd in itertools.product([False, True], [False, True], [False, True],
                                              [0.0, 0.03]):
        yield (f"adam-decoupled{dec}-amsgrad{ams}-max{mx}-wd{wd}", AdamRule(dec),
               {"beta2": 0.99, "eps": 1e-8, "amsgrad": ams, "maximize": mx, "decoupled": dec},
               {"lr": 0.01, "momentum": 0.9, "weight_decay": wd})
    for cen, mom, mx, wd in itertools.product([False, True], repeat=4):
        yield (f"rmsprop-centered{cen}-momentum{mom}-max{mx}-wd{wd}", RMSpropRule(),
               {"alpha": 0.9, "eps": 1e-8, "centered": cen, "maximize": mx, "has_momentum": mom},
               {"lr": 0.01, "momentum": 0.5 if mom else 0.0, "weight_decay": 0.03 if wd else 0.0})
    for ld, mx, wd, iav in itertools.product([0.0, 0.1], [False, True], [0.0, 0.03], [0.0, 0.1]):
        yield (f"adagrad-lr_decay{ld}-max{mx}-wd{wd}-iav{iav}", AdagradRule(),
               {"lr_decay": ld, "eps": 1e-10, "maximize": mx, "initial_accumulator_value": iav},
               {"lr": 0.1, "weight_decay": wd})


CONFIGS = list(_configs())


def _later_state(rule, param, options, values, gen, steps=3):
    """The state after a few real steps (constant hyperparameters, random gradients)."""
    state = rule.init_state(param, options)
    hyper = {k: values[k] for k in rule.kinds}
    with torch.no_grad():
        for _ in range(steps):
            param, state = rule.update(param, torch.randn(N, generator=gen, dtype=DT), state,
                                       hyper, options)
    return state


def _differentiable(name, value, param):
    return (name != "step" and isinstance(value, Tensor) and value.is_floating_point()
            and value.shape == param.shape)


def _hyper(rule, values, tuned, elementwise, gen):
    """Tuned kinds as tensors (per element, around the value, or 0-dim); the rest floats."""
    def value(k):
        if k not in tuned:
            return values[k]
        if elementwise:
            return _t(values[k]) * (1 + 0.1 * torch.rand(N, generator=gen, dtype=DT))
        return _t(values[k])
    return {k: value(k) for k in rule.kinds}


def _random_tangents(state, hyper, param, gen, count):
    """``count`` tangents whose parts are independently present (random) or absent."""
    def maybe():
        return bool(torch.rand((), generator=gen) < 0.7)

    def rnd(shape=(N,)):
        return torch.randn(shape, generator=gen, dtype=DT)

    tangents = []
    for _ in range(count):
        z_state = {k: rnd() for k, v in state.items() if _differentiable(k, v, param) and maybe()}
        z_hyper = {}
        for k, v in hyper.items():
            if isinstance(v, Tensor) and maybe():
                # a per-element value gets a per-element or a 0-dim (broadcast) tangent
                z_hyper[k] = rnd(v.shape if maybe() else ())
        tangents.append(Tangent(param=rnd() if maybe() else None, grad=rnd() if maybe() else None,
                                state=z_state, hyper=z_hyper))
    return tangents


def _tensors(param, grad, state, hyper, tangents):
    out = [param, grad, *state.values(), *[v for v in hyper.values() if isinstance(v, Tensor)]]
    for tan in tangents:
        out += [x for x in (tan.param, tan.grad, *tan.state.values(), *tan.hyper.values())
                if x is not None]
    return out


def _rel_err(got, ref):
    scale = ref.abs().max().clamp(min=1e-300)
    return float((got - ref).abs().max() / scale)


def _assert_same(got, ref, new_state, param, where, rtol=1e-12):
    """Two jvp results agree; every differentiable new-state entry has a tangent.

    Elementwise to ``rtol``, with an absolute floor of ``1e-13`` times the largest output of the
    same tangent: an output can be a cancellation of much larger terms (on Adam's first step
    ``r = m'/D`` is nearly ``sign(g)``, and the weight tangent along the weight decay is ~1e-7
    of the moment tangents it is made of), where both sides carry round-off of those terms.
    Returns the worst error, max |got - ref| over that scale."""
    assert len(got) == len(ref), where
    names = {k for k, v in new_state.items() if _differentiable(k, v, param)}
    worst = 0.0
    for i, ((zp, zs), (rp, rs)) in enumerate(zip(got, ref)):
        assert set(zs) == names == set(rs), (where, i, set(zs), set(rs), names)
        pairs = [("param", zp, rp)] + [(k, zs[k], rs[k]) for k in sorted(names)]
        scale = max(float(y.abs().max()) for _, _, y in pairs)
        for name, x, y in pairs:
            assert x.shape == param.shape and x.dtype == DT, (where, i, name)
            torch.testing.assert_close(x, y, rtol=rtol, atol=1e-13 * scale + 1e-300,
                                       msg=lambda m: f"{where}, tangent {i}, {name}: {m}")
            if scale > 0:
                worst = max(worst, float((x - y).abs().max()) / scale)
    return worst


def _func_jvp(rule, param, grad, state, hyper, options, tan):
    """``torch.func.jvp`` of ``update`` flattened to tensors: the check of the default."""
    names = [k for k, v in state.items() if _differentiable(k, v, param)]
    lam = {k: z for k, z in tan.hyper.items() if isinstance(hyper.get(k), Tensor)}
    kinds = sorted(lam)
    shapes = {k: torch.broadcast_shapes(hyper[k].shape, lam[k].shape) for k in kinds}

    def f(p, g, *rest):
        s = dict(state, **dict(zip(names, rest[:len(names)])))
        h = dict(hyper, **dict(zip(kinds, rest[len(names):])))
        new_p, new_s = rule.update(p, g, s, h, options)
        out_names = [k for k, v in new_s.items() if _differentiable(k, v, param)]
        return (new_p, *[new_s[k] for k in out_names])

    zeros = torch.zeros_like(param)
    primals = (param, grad, *[state[k] for k in names],
               *[hyper[k].expand(shapes[k]).clone() for k in kinds])
    tangents = (zeros if tan.param is None else tan.param, zeros if tan.grad is None else tan.grad,
                *[tan.state.get(k, zeros) for k in names],
                *[lam[k].expand(shapes[k]).clone() for k in kinds])
    _, out = torch.func.jvp(f, primals, tangents)
    with torch.no_grad():
        new_state = rule.update(param, grad, state, hyper, options)[1]
    out_names = [k for k, v in new_state.items() if _differentiable(k, v, param)]
    return out[0], dict(zip(out_names, out[1:]))


@pytest.mark.parametrize("config", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_closed_form_jvp_matches_forward_mode_default(config):
    """Every subset of tuned kinds, 0-dim and per-element values, first and later steps, 1-3
    random tangents: closed form == ``UpdateRule.jvp`` (forward mode through ``update``) to
    rtol 1e-12; the default == ``torch.func.jvp`` on some of the cases; inputs are unchanged
    and no output shares storage with an input or another output."""
    name, rule, options, values = config
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    param = torch.randn(N, generator=gen, dtype=DT)
    grad = torch.randn(N, generator=gen, dtype=DT)
    tunable = [k for k in rule.kinds if values[k] != 0]
    subsets = [c for r in range(len(tunable) + 1) for c in itertools.combinations(tunable, r)]
    states = {"first": rule.init_state(param, options),
              "later": _later_state(rule, param, options, values, gen)}
    assert type(rule).jvp is not UpdateRule.jvp, "built-in rules have a closed form"
    worst, checked = 0.0, 0
    for (when, state), tuned, elementwise in itertools.product(states.items(), subsets,
                                                                (False, True)):
        if elementwise and not tuned:
            continue
        hyper = _hyper(rule, values, tuned, elementwise, gen)
        count = int(torch.randint(1, 4, (), generator=gen))
        tangents = _random_tangents(state, hyper, param, gen, count)
        where = f"{when} step, tuned={tuned}, elementwise={elementwise}"
        inputs = _tensors(param, grad, state, hyper, tangents)
        before = [x.clone() for x in inputs]
        with torch.no_grad():
            got = rule.jvp(param, grad, state, hyper, options, tangents)
            ref = UpdateRule.jvp(rule, param, grad, state, hyper, options, tangents)
            new_state = rule.update(param, grad, state, hyper, options)[1]
        for x, y in zip(inputs, before):
            assert torch.equal(x, y), f"{where}: an input was modified"
        for result in (got, ref):
            outs = [t for zp, zs in result for t in (zp, *zs.values())]
            ptrs = [t.untyped_storage().data_ptr() for t in outs]
            assert len(set(ptrs)) == len(ptrs), f"{where}: two outputs share storage"
            assert not set(ptrs) & {x.untyped_storage().data_ptr() for x in inputs}, \
                f"{where}: an output aliases an input"
        worst = max(worst, _assert_same(got, ref, new_state, param, where))
        if checked % 3 == 0:      # the default itself, against torch.func
            zp, zs = _func_jvp(rule, param, grad, state, hyper, options, tangents[0])
            _assert_same([ref[0]], [(zp, zs)], new_state, param, where + " (torch.func)",
                         rtol=1e-13)
        checked += 1
    assert checked > 0
    assert worst < 1e-12, worst


def test_sgd_first_step_buffer_tangent_is_the_direction_and_fresh():
    """SGD's first step creates ``momentum_buffer`` from the direction: its tangent is ``s G``
    (no dampening), a new tensor even where it equals the incoming ``G`` exactly."""
    rule = SGDRule()
    param, grad, g_t = torch.randn(N, dtype=DT), torch.randn(N, dtype=DT), torch.randn(N, dtype=DT)
    for mx in (False, True):
        options = {"dampening": 0.3, "nesterov": False, "maximize": mx}
        hyper = {"lr": 0.1, "momentum": _t(0.9), "weight_decay": 0.0}
        tan = Tangent(param=None, grad=g_t, state={}, hyper={"momentum": _t(1.0)})
        for jvp in (rule.jvp, lambda *a: UpdateRule.jvp(rule, *a)):
            with torch.no_grad():
                [(zp, zs)] = jvp(param, grad, {}, hyper, options, [tan])
            expected = -g_t if mx else g_t
            torch.testing.assert_close(zs["momentum_buffer"], expected, rtol=1e-15, atol=0)
            torch.testing.assert_close(zp, -0.1 * expected, rtol=1e-15, atol=0)
            assert (zs["momentum_buffer"].untyped_storage().data_ptr()
                    != g_t.untyped_storage().data_ptr())


@pytest.mark.parametrize("maximize", [False, True])
def test_amsgrad_ties_take_the_mean_like_forward_mode(maximize):
    """``max(vh, v')`` has a kink where ``vh == v'``: there the closed form takes the mean of the
    two tangents, as forward mode through ``torch.maximum`` does."""
    rule = AdamRule(False)
    options = {"beta2": 0.99, "eps": 1e-8, "amsgrad": True, "maximize": maximize,
               "decoupled": False}
    gen = torch.Generator().manual_seed(7)
    param, grad = torch.randn(N, generator=gen, dtype=DT), torch.randn(N, generator=gen, dtype=DT)
    state = _later_state(rule, param, options, {"lr": 0.01, "momentum": 0.9,
                                                "weight_decay": 0.0}, gen)
    with torch.no_grad():
        v_new = rule.update(param, grad, state, {"lr": 0.01, "momentum": 0.9,
                                                  "weight_decay": 0.0}, options)[1]["exp_avg_sq"]
    tie = torch.arange(N) % 3 == 0
    state["max_exp_avg_sq"] = torch.where(tie, v_new, state["max_exp_avg_sq"])
    hyper = {"lr": _t(0.01), "momentum": _t(0.9), "weight_decay": 0.0}
    tangents = _random_tangents(state, hyper, param, gen, 3)
    tangents.append(Tangent(param=None, grad=torch.randn(N, generator=gen, dtype=DT),
                            state={"max_exp_avg_sq": torch.randn(N, generator=gen, dtype=DT)}))
    with torch.no_grad():
        got = rule.jvp(param, grad, state, hyper, options, tangents)
        ref = UpdateRule.jvp(rule, param, grad, state, hyper, options, tangents)
        new_state = rule.update(param, grad, state, hyper, options)[1]
    assert torch.equal(new_state["max_exp_avg_sq"][tie], v_new[tie])
    _assert_same(got, ref, new_state, param, "amsgrad ties")


# ----------------------------------------------------------------------------- user rules

class _SmoothRule(UpdateRule):
    """A user rule with state: an EMA ``avg`` of the gradient and ``w' = w - lr a / (1 + |a|)``;
    its new state has a float step, an integer counter, and an entry the step creates."""
    kinds = ("lr", "momentum")

    def options(self, group):
        return {}

    def init_state(self, param, options):
        return {"step": torch.zeros((), dtype=DT), "avg": torch.zeros_like(param),
                "count": torch.zeros(param.shape, dtype=torch.int64)}

    def update(self, param, grad, state, hyper, options):
        mu = hyper["momentum"]
        avg = mu * state["avg"] + (1 - mu) * grad
        new = param - hyper["lr"] * avg / (1 + avg.abs())
        return new, {"step": state["step"] + 1, "avg": avg, "count": state["count"] + 1,
                     "last_grad": grad}        # created by the step; passes G straight through


def test_user_rule_works_through_the_default():
    rule = _SmoothRule()
    gen = torch.Generator().manual_seed(5)
    rnd = lambda: torch.randn(N, generator=gen, dtype=DT)
    param, grad = rnd(), rnd()
    state = rule.init_state(param, {})
    state["avg"] = rnd()
    hyper = {"lr": _t(0.1) * (1 + 0.1 * torch.rand(N, generator=gen, dtype=DT)),
             "momentum": _t(0.8)}
    tangents = [Tangent(param=rnd(), grad=rnd(), state={"avg": rnd()},
                        hyper={"lr": rnd(), "momentum": _t(0.7)}),
                Tangent(param=None, grad=rnd(), state={}, hyper={"lr": _t(2.0)}),   # broadcast
                Tangent(param=None, grad=None, state={}, hyper={})]                 # all zero
    before = [x.clone() for x in _tensors(param, grad, state, hyper, tangents)]
    with torch.no_grad():
        got = rule.jvp(param, grad, state, hyper, {}, tangents)
    for x, y in zip(_tensors(param, grad, state, hyper, tangents), before):
        assert torch.equal(x, y)
    mu, lr, m = 0.8, hyper["lr"], state["avg"]
    a = mu * m + (1 - mu) * grad
    for tan, (zp, zs) in zip(tangents, got):
        assert set(zs) == {"avg", "last_grad"}        # not the step counter nor the integers
        zero = torch.zeros(N, dtype=DT)
        g_t = zero if tan.grad is None else tan.grad
        l_mu = tan.hyper.get("momentum", _t(0.0))
        l_lr = tan.hyper.get("lr", _t(0.0))
        da = mu * tan.state.get("avg", zero) + (1 - mu) * g_t + (m - grad) * l_mu
        expected = ((zero if tan.param is None else tan.param) - l_lr * a / (1 + a.abs())
                    - lr * da / (1 + a.abs()) ** 2)
        torch.testing.assert_close(zp, expected, rtol=1e-13, atol=1e-15)
        torch.testing.assert_close(zs["avg"], da, rtol=1e-13, atol=1e-15)
        torch.testing.assert_close(zs["last_grad"], g_t, rtol=0, atol=0)
        # a pass-through is copied, never the caller's own tensor
        assert tan.grad is None or zs["last_grad"].untyped_storage().data_ptr() != \
            tan.grad.untyped_storage().data_ptr()
    zp, zs = _func_jvp(rule, param, grad, state, hyper, {}, tangents[0])
    torch.testing.assert_close(got[0][0], zp, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(got[0][1]["avg"], zs["avg"], rtol=1e-13, atol=1e-15)


def test_default_ignores_constants_and_serves_sign_sgd():
    """Tangents for a float (constant) kind, for ``step`` or for unknown state entries are
    ignored; sign SGD (the library's own user-rule example) gets ``Z_w - sign(g) L_lr``."""
    param, grad, z = torch.randn(N, dtype=DT), torch.randn(N, dtype=DT), torch.randn(N, dtype=DT)
    rule = SignRule()
    tan = Tangent(param=z, grad=torch.randn(N, dtype=DT), state={"nope": z},
                  hyper={"lr": _t(3.0)})
    with torch.no_grad():
        [(zp, zs)] = rule.jvp(param, grad, {}, {"lr": _t(0.1)}, {}, [tan])
        [(zc, _)] = rule.jvp(param, grad, {}, {"lr": 0.1}, {}, [tan])
    torch.testing.assert_close(zp, z - 3.0 * grad.sign(), rtol=1e-15, atol=0)
    assert zs == {}
    torch.testing.assert_close(zc, z, rtol=0, atol=0)
    assert zc.untyped_storage().data_ptr() != z.untyped_storage().data_ptr()
    # a built-in rule, with a constant kind's tangent, a step tangent and an empty list
    rule, options = AdamRule(), {"beta2": 0.99, "eps": 1e-8, "amsgrad": False,
                                  "maximize": False, "decoupled": False}
    state = rule.init_state(param, options)
    hyper = {"lr": _t(0.01), "momentum": 0.9, "weight_decay": 0.0}
    tan = Tangent(param=z, grad=z, state={"step": _t(1.0)}, hyper={"momentum": _t(1.0)})
    with torch.no_grad():
        assert rule.jvp(param, grad, state, hyper, options, []) == []
        got = rule.jvp(param, grad, state, hyper, options, [tan])
        ref = UpdateRule.jvp(rule, param, grad, state, hyper, options, [tan])
        new_state = rule.update(param, grad, state, hyper, options)[1]
    _assert_same(got, ref, new_state, param, "constants")


# ----------------------------------------------------------------------------- zero moments

def _adam(**kw):
    return {"beta2": 0.99, "eps": 1e-8, "amsgrad": False, "maximize": False, "decoupled": False,
            **kw}


def _rmsprop(**kw):
    return {"alpha": 0.9, "eps": 1e-8, "centered": False, "maximize": False,
            "has_momentum": False, **kw}


ZERO_CASES = [
    ("adam", AdamRule(False), _adam(), {"lr": 0.01, "momentum": 0.9, "weight_decay": 0.03}),
    ("adam-amsgrad-max", AdamRule(False), _adam(amsgrad=True, maximize=True),
     {"lr": 0.01, "momentum": 0.9, "weight_decay": 0.0}),
    ("adamw", AdamRule(True), _adam(beta2=0.999, decoupled=True),
     {"lr": 0.01, "momentum": 0.9, "weight_decay": 0.05}),
    ("rmsprop", RMSpropRule(), _rmsprop(), {"lr": 0.01, "momentum": 0.0, "weight_decay": 0.0}),
    ("rmsprop-centered-momentum-max", RMSpropRule(),
     _rmsprop(centered=True, maximize=True, has_momentum=True),
     {"lr": 0.01, "momentum": 0.5, "weight_decay": 0.02}),
    ("adagrad", AdagradRule(), {"lr_decay": 0.1, "eps": 1e-10, "maximize": False,
                                "initial_accumulator_value": 0.0},
     {"lr": 0.1, "weight_decay": 0.02}),
]


@pytest.mark.parametrize("later", [False, True], ids=["first", "later"])
@pytest.mark.parametrize("case", ZERO_CASES, ids=[c[0] for c in ZERO_CASES])
def test_closed_form_is_the_limit_where_the_second_moment_is_zero(case, later):
    """Entries whose gradient and moments are all 0 (a dead unit): forward mode through
    ``sqrt(0)`` gives NaN there; the closed form takes the limit, which equals central
    differences of ``update`` along the tangent (a feasible one: no tangent of a zero second
    moment, which could only grow, like sqrt(h)).  Elsewhere it equals the default."""
    name, rule, options, values = case
    gen = torch.Generator().manual_seed(6)
    rnd = lambda: torch.randn(N, generator=gen, dtype=DT)
    dead = torch.arange(N) < N // 2
    param, grad = rnd(), rnd()
    # a dead unit: gradient, moments and weight 0 (so that coupled weight decay adds nothing,
    # and the perturbations of the central differences below are exact there)
    grad[dead], param[dead] = 0.0, 0.0
    state = rule.init_state(param, options)
    if later:   # real steps whose gradients are 0 on the dead entries keep their moments 0
        with torch.no_grad():
            for _ in range(3):
                g = rnd().masked_fill(dead, 0.0)
                param, state = rule.update(param, g, state, {k: values[k] for k in rule.kinds},
                                           options)
    hyper = {k: _t(v) for k, v in values.items() if k in rule.kinds and v != 0}
    hyper.update({k: v for k, v in values.items() if k in rule.kinds and v == 0})
    z_state = {}
    for k, v in state.items():
        if _differentiable(k, v, param):
            z = rnd()
            if k != "exp_avg" and k != "momentum_buffer":     # second moments and grad_avg
                z[dead] = 0.0
            z_state[k] = z
    tan = Tangent(param=rnd(), grad=rnd(), state=z_state,
                  hyper={k: rnd() if k == "lr" else _t(0.5) for k, v in hyper.items()
                         if isinstance(v, Tensor)})
    with torch.no_grad():
        [(zp, zs)] = rule.jvp(param, grad, state, hyper, options, [tan])
        [(rp, rs)] = UpdateRule.jvp(rule, param, grad, state, hyper, options, [tan])
    outs = [("param", zp, rp)] + [(k, zs[k], rs[k]) for k in zs]
    for k, x, _ in outs:
        assert torch.isfinite(x).all(), k
    assert torch.isnan(rp[dead]).all()                # forward mode's 0 * inf
    for k, x, y in outs:
        torch.testing.assert_close(x[~dead], y[~dead], rtol=1e-12, atol=1e-14, msg=k)

    # central differences on the dead entries; the step must stay far below eps / |G|, where
    # sqrt(v') stops being negligible next to eps (the truncation error is ~ h |G| / eps);
    # every input is 0 there, so the perturbed inputs are exact
    h = 1e-8 * options["eps"]

    def at(x):
        s = {k: v + x * tan.state[k] if k in tan.state else v for k, v in state.items()}
        hp = {k: v + x * tan.hyper[k] if k in tan.hyper else v for k, v in hyper.items()}
        new_p, new_s = rule.update(param + x * tan.param, grad + x * tan.grad, s, hp, options)
        return [new_p] + [new_s[k] for k in zs]

    with torch.no_grad():
        fd = [(u - d) / (2 * h) for u, d in zip(at(h), at(-h))]
    scale = max(float(f[dead].abs().max()) for f in fd)   # v' is ~h^2 there: its tangent 0
    for (k, x, _), f in zip(outs, fd):
        torch.testing.assert_close(x[dead], f[dead], rtol=1e-6, atol=1e-6 * scale,
                                   msg=lambda m: f"{name} {k}: {m}")


# ----------------------------------------------------------------------------- bucketed, in place
FOREACH_CONFIGS = [c for c in CONFIGS
                   if type(c[1]).carry_foreach is not UpdateRule.carry_foreach]


def test_the_bucketed_recurrence_covers_sgd_and_adam():
    assert {type(c[1]) for c in FOREACH_CONFIGS} == {SGDRule, AdamRule}


@pytest.mark.parametrize("config", FOREACH_CONFIGS, ids=[c[0] for c in FOREACH_CONFIGS])
def test_bucketed_recurrence_equals_the_per_tensor_jvp(config):
    """``carry_foreach`` on a bucket of two parameters, in place, equals :meth:`jvp` per tensor
    with the incoming tangents discounted (``Z <- delta A Z + B``) to rtol 1e-12, for every
    subset of tuned kinds (0-dim values shared by the bucket, or per element one per param),
    first and later steps, random tangents with parts missing; on a skipped step (``ok = 0``,
    zero gradients) every tangent is kept bit for bit.  Params, gradients, state and
    hyperparameters are not modified.  (amsgrad declines: None, nothing changed.)"""
    name, rule, options, values = config
    gen = torch.Generator().manual_seed(sum(map(ord, name)) + 1)
    params = [torch.randn(N, generator=gen, dtype=DT) for _ in range(2)]
    tunable = [k for k in rule.kinds if values[k] != 0]
    subsets = [c for r in range(len(tunable) + 1) for c in itertools.combinations(tunable, r)]
    checked = 0
    for when, tuned, elementwise, delta, ok in itertools.product(
            ("first", "later"), subsets, (False, True), (1.0, 0.7), (1.0, 0.0)):
        if elementwise and not tuned:
            continue
        grads = [torch.randn(N, generator=gen, dtype=DT) * ok for _ in range(2)]
        states = [rule.init_state(p, options) if when == "first" else
                  _later_state(rule, p, options, values, gen) for p in params]
        per_param = [_hyper(rule, values, tuned, elementwise, gen) for _ in params]
        hyper = {k: ([h[k] for h in per_param] if elementwise and k in tuned else per_param[0][k])
                 for k in rule.kinds}
        items_hyper = [{k: (v[i] if isinstance(v, list) else v) for k, v in hyper.items()}
                       for i in range(2)]
        count = int(torch.randint(1, 4, (), generator=gen))
        per_item = [_random_tangents(states[i], items_hyper[i], params[i], gen, count)
                    for i in range(2)]
        where = f"{when} step, tuned={tuned}, elementwise={elementwise}, delta={delta}, ok={ok}"
        inputs = [*params, *grads, *[v for s in states for v in s.values()
                                     if isinstance(v, Tensor)],
                  *[x for v in hyper.values() for x in (v if isinstance(v, list) else [v])
                    if isinstance(x, Tensor)]]
        before = [x.clone() for x in inputs]
        with torch.no_grad():
            refs = []
            for i in range(2):
                scaled = [Tangent(None if t.param is None else t.param * delta,
                                  None if t.grad is None else t.grad * delta,
                                  {k: v * delta for k, v in t.state.items()}, t.hyper)
                          for t in per_item[i]]
                refs.append(rule.jvp(params[i], grads[i], states[i], items_hyper[i], options,
                                     scaled))
            names = {k for k, v in rule.update(params[0], grads[0], states[0], items_hyper[0],
                                               options)[1].items()
                     if _differentiable(k, v, params[0])}
            calls = []
            for j in range(count):
                ts = [per_item[i][j] for i in range(2)]
                state_names = {k for t in ts for k in t.state}
                calls.append({
                    "w": [torch.zeros(N, dtype=DT) if t.param is None else t.param.clone()
                          for t in ts],
                    "g": None if all(t.grad is None for t in ts) else
                    [torch.zeros(N, dtype=DT) if t.grad is None else t.grad.clone() for t in ts],
                    "s": {k: [None if k not in t.state else t.state[k].clone() for t in ts]
                          for k in state_names},
                    "hyper": {k: [t.hyper.get(k) for t in ts]
                              for k in {k for t in ts for k in t.hyper}}})
            olds = [{"w": list(c["w"]), "s": {k: list(v) for k, v in c["s"].items()}}
                    for c in calls]
            old_values = [{"w": [w.clone() for w in c["w"]],
                           "s": {k: [None if x is None else x.clone() for x in v]
                                 for k, v in c["s"].items()}} for c in calls]
            out = rule.carry_foreach(params, grads, states, hyper, options, calls,
                                     _t(ok), delta)
        for x, y in zip(inputs, before):
            assert torch.equal(x, y), f"{where}: an input was modified"
        if options.get("amsgrad"):
            assert out is None, where
            continue
        assert out is not None and len(out) == count, where
        for j in range(count):
            assert set(out[j]) == names, (where, set(out[j]), names)
            for i in range(2):
                zw, zs = calls[j]["w"][i], {k: out[j][k][i] for k in names}
                assert zw is olds[j]["w"][i], f"{where}: Z_w not updated in place"
                if ok == 0:     # the identity, bit for bit (a missing entry stays zero)
                    assert torch.equal(zw, old_values[j]["w"][i]), where
                    for k in names:
                        old = old_values[j]["s"].get(k, [None, None])[i]
                        assert torch.equal(zs[k], torch.zeros(N, dtype=DT) if old is None
                                           else old), (where, k)
                    continue
                rp, rs = refs[i][j]
                _assert_same([(zw, zs)], [(rp, rs)], {k: params[0] for k in names},
                             params[i], f"{where}, param {i}")
        checked += 1
    assert checked > 20 or (options.get("amsgrad") and checked == 0), checked
