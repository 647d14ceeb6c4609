"""The fast step of every built-in rule equals its readable ``update`` and its closed-form
tangents equal forward-mode AD through ``update``, in float64, for every option combination,
first and later steps, and every subset of tuned kinds (the rest as plain floats, zero too)."""
import itertools

import pytest
import torch

from hyperopt_wrap.rules import AdagradRule, AdamRule, RMSpropRule, SGDRule, UpdateRule

from problems import SignRule

DT = torch.float64
N = 40


def _t(x):
    return torch.tensor(x, dtype=DT)


def _rule_cases():
    gen = torch.Generator().manual_seed(0)
    rnd = lambda: torch.randn(N, generator=gen, dtype=DT)
    pos = lambda: torch.rand(N, generator=gen, dtype=DT) + 0.1
    for damp, nest, mx, first in itertools.product([0.0, 0.3], [False, True], [False, True],
                                                   [True, False]):
        if nest and damp:
            continue
        state = {} if first else {"momentum_buffer": rnd()}
        yield (f"sgd-damp{damp}-nest{nest}-max{mx}-first{first}", SGDRule(), state,
               {"dampening": damp, "nesterov": nest, "maximize": mx}, {"momentum": 0.9})
    for dec, ams, mx in itertools.product([False, True], repeat=3):
        state = {"step": _t(3.0), "exp_avg": rnd(), "exp_avg_sq": pos()}
        if ams:   # amsgrad's invariant: the running max is at least the current average
            state["max_exp_avg_sq"] = torch.maximum(pos() * 1.5, state["exp_avg_sq"])
        yield (f"adam-decoupled{dec}-amsgrad{ams}-max{mx}", AdamRule(dec), state,
               {"beta2": 0.99, "eps": 1e-8, "amsgrad": ams, "maximize": mx, "decoupled": dec},
               {"momentum": 0.9})
    for cen, mom, mx in itertools.product([False, True], repeat=3):
        state = {"step": _t(3.0), "square_avg": pos() + 1}
        if mom:
            state["momentum_buffer"] = rnd()
        if cen:
            state["grad_avg"] = rnd() * 0.1
        yield (f"rmsprop-centered{cen}-momentum{mom}-max{mx}", RMSpropRule(), state,
               {"alpha": 0.9, "eps": 1e-8, "centered": cen, "maximize": mx, "has_momentum": mom},
               {"momentum": 0.5 if mom else 0.0})
    for ld, mx in itertools.product([0.0, 0.1], [False, True]):
        yield (f"adagrad-lr_decay{ld}-max{mx}", AdagradRule(), {"step": _t(3.0), "sum": pos()},
               {"lr_decay": ld, "eps": 1e-10, "maximize": mx, "initial_accumulator_value": 0.0},
               {})


CASES = list(_rule_cases())


def _subsets(rule, consts):
    kinds = [k for k in rule.kinds if not (k == "momentum" and consts.get("momentum", 1) == 0)]
    for r in range(1, len(kinds) + 1):
        yield from itertools.combinations(kinds, r)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_forward_mode_fallback_matches_update_and_finite_differences(case):
    """The generic path (what a user's rule gets, and the rare configurations a built-in
    ``step_`` declines): ``update_with_tangents`` returns ``update``'s step exactly, and
    tangents equal to central differences of ``update`` in float64."""
    _, rule, state, options, consts = case
    gen = torch.Generator().manual_seed(1)
    param = torch.randn(N, generator=gen, dtype=DT)
    grad = torch.randn(N, generator=gen, dtype=DT)
    values = {"lr": 0.05, "momentum": consts.get("momentum", 0.8), "weight_decay": 0.03}
    kinds = tuple(_subsets(rule, consts))[-1]           # every tunable kind
    hyper = {k: (_t(values[k]) if k in kinds else values[k]) for k in rule.kinds}
    with torch.no_grad():
        new_p, new_s, tangents = UpdateRule.update_with_tangents(rule, param, grad, state, hyper,
                                                                 options, kinds)
        ref_p, ref_s = rule.update(param, grad, state, hyper, options)
        assert torch.equal(new_p, ref_p)
        assert all(torch.equal(new_s[k], ref_s[k]) for k in ref_s)
        for kind in kinds:
            # five-point stencil in float64: truncation ~h^4, round-off ~eps/h, both < 1e-11
            h = 1e-3 * values[kind]

            def at(x):
                return rule.update(param, grad, state,
                                   dict(hyper, **{kind: _t(values[kind] + x * h)}), options)[0]

            fd = (8 * (at(1) - at(-1)) - (at(2) - at(-2))) / (12 * h)
            torch.testing.assert_close(tangents[kind], fd, rtol=1e-7, atol=1e-9,
                                       msg=lambda m: f"tangent {kind}: {m}")


def test_forward_ad_default_serves_a_user_rule():
    p, g = torch.randn(5, dtype=DT), torch.randn(5, dtype=DT)
    with torch.no_grad():
        new_p, _, tangents = SignRule().update_with_tangents(p, g, {}, {"lr": _t(0.1)}, {}, ("lr",))
    torch.testing.assert_close(new_p, p - 0.1 * g.sign())
    torch.testing.assert_close(tangents["lr"], -g.sign())


def _clone_state(state):
    return {k: v.clone() for k, v in state.items()}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_in_place_step_matches_reference_and_is_a_no_op_when_skipped(case):
    """``step_`` (the allocation-free fast path every built-in rule has) updates param and state
    like ``update`` and returns closed-form tangents equal to forward mode through ``update``;
    with ok=0 (a skipped step: zero gradient) it leaves param and state bit-exactly unchanged."""
    _, rule, state, options, consts = case
    gen = torch.Generator().manual_seed(2)
    param = torch.randn(N, generator=gen, dtype=DT)
    grad = torch.randn(N, generator=gen, dtype=DT)
    values = {"lr": 0.05, "momentum": consts.get("momentum", 0.8), "weight_decay": 0.03}
    handled = 0
    for tuned in _subsets(rule, consts):
        for wd_const in (0.0, 0.03):
            hyper = {k: (_t(values[k]) if k in tuned else
                         (wd_const if k == "weight_decay" else values[k])) for k in rule.kinds}
            with torch.no_grad():
                ref_p, ref_s = rule.update(param, grad, state, hyper, options)
                _, _, ad_t = UpdateRule.update_with_tangents(rule, param, grad, state, hyper,
                                                             options, tuned)
                p, s = param.clone(), _clone_state(state)
                tangents = rule.step_(p, grad.clone(), s, hyper, options, tuned, _t(1.0), {})
                if tangents is None:
                    continue
                handled += 1
                torch.testing.assert_close(p, ref_p, rtol=1e-14, atol=1e-15)
                assert s.keys() == ref_s.keys()
                for k in ref_s:
                    torch.testing.assert_close(s[k], ref_s[k], rtol=1e-14, atol=1e-15)
                assert set(tangents) == set(tuned)
                for k in tuned:
                    torch.testing.assert_close(tangents[k], ad_t[k], rtol=1e-12, atol=1e-15,
                                               msg=lambda m: f"tangent {k}, tuned={tuned}: {m}")
                # skipped step: the optimizer hands a zero gradient and ok=0
                p, s = param.clone(), _clone_state(state)
                rule.step_(p, torch.zeros_like(grad), s, hyper, options, tuned, _t(0.0), {})
                assert torch.equal(p, param)
                for k in state:
                    assert torch.equal(s[k], state[k]), k
    assert handled > 0, f"{type(rule).__name__} must have an in-place fast path"


def _has_closed_form_vjp(rule, options) -> bool:
    """Written out by hand: SGD always; Adam/AdamW except amsgrad (torch.maximum's kink)."""
    return isinstance(rule, SGDRule) or (isinstance(rule, AdamRule) and not options["amsgrad"])


def _reverse_mode(rule, param, grad, state, hyper, options, cot_p, cot_s, tuned):
    """Reverse-mode autograd through ``update``: the reference of the closed forms."""
    with torch.enable_grad():
        w = param.clone().requires_grad_()
        g = grad.clone().requires_grad_()
        s = {k: v.clone().requires_grad_() if k != "step" else v.clone() for k, v in state.items()}
        h = {k: v.clone().requires_grad_() if k in tuned else v for k, v in hyper.items()}
        new_p, new_s = rule.update(w, g, s, h, options)
        outs, cots = [new_p], [cot_p]
        for k, c in cot_s.items():
            if k in new_s and new_s[k].requires_grad:
                outs.append(new_s[k])
                cots.append(c)
        leaves = [w, g] + [s[k] for k in state if k != "step"] + [h[k] for k in tuned]
        grads = torch.autograd.grad(outs, leaves, cots, allow_unused=True)
    grads = [torch.zeros_like(x) if d is None else d for x, d in zip(leaves, grads)]
    names = [k for k in state if k != "step"]
    return (grads[0], grads[1], dict(zip(names, grads[2:2 + len(names)])),
            dict(zip(tuned, grads[2 + len(names):])))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_closed_form_vjp_matches_reverse_mode(case):
    """``rule.vjp`` (closed-form reverse products, used by implicit and unroll instead of
    autograd through ``update``) equals reverse-mode autograd in float64: every subset of tuned
    kinds, scalar and per-element hyperparameters, with and without state cotangents, and with
    only the hyperparameter products asked for.  Rules without a closed form return None."""
    _, rule, state, options, consts = case
    gen = torch.Generator().manual_seed(3)
    param = torch.randn(N, generator=gen, dtype=DT)
    grad = torch.randn(N, generator=gen, dtype=DT)
    cot_p = torch.randn(N, generator=gen, dtype=DT)
    values = {"lr": 0.05, "momentum": consts.get("momentum", 0.8), "weight_decay": 0.03}
    with torch.no_grad():
        new_state = rule.update(param, grad, state, {k: values[k] for k in rule.kinds},
                                options)[1]
    cot_s_full = {k: torch.randn(N, generator=gen, dtype=DT) for k in new_state if k != "step"}
    if not _has_closed_form_vjp(rule, options):
        hyper = {k: values[k] for k in rule.kinds}
        assert rule.vjp(param, grad, state, hyper, options, cot_p, {}, True, ()) is None
        return
    checked = 0
    for tuned in _subsets(rule, consts):
        mu_consts = (values["momentum"], 0.0) if "momentum" not in tuned else (None,)
        # which tuned kinds are per element (the rest 0-dim), e.g. per-element lr with a
        # global momentum and weight decay
        shapes = [set(c) for r in range(len(tuned) + 1) for c in itertools.combinations(tuned, r)]
        for wd_const, mu_const, elementwise, with_cot_s, inputs in itertools.product(
                (0.0, 0.03), mu_consts, shapes, (False, True), (True, False)):
            spread = lambda k: (_t(values[k]) * (1 + 0.1 * torch.rand(N, generator=gen, dtype=DT))
                                if k in elementwise else _t(values[k]))
            consts_now = {**values, "weight_decay": wd_const, "momentum": mu_const}
            hyper = {k: spread(k) if k in tuned else consts_now[k] for k in rule.kinds}
            cot_s = cot_s_full if with_cot_s else {}
            with torch.no_grad():
                got = rule.vjp(param, grad, state, hyper, options, cot_p, cot_s, inputs, tuned)
            ref = _reverse_mode(rule, param, grad, state, hyper, options, cot_p, cot_s, tuned)
            where = (f"tuned={tuned}, wd={wd_const}, momentum={mu_const}, "
                     f"elementwise={elementwise}, cot_s={with_cot_s}")
            assert set(got[3]) == set(tuned), where
            for k in tuned:
                assert got[3][k].shape == hyper[k].shape, (k, where)
                torch.testing.assert_close(got[3][k], ref[3][k], rtol=1e-12, atol=1e-14,
                                           msg=lambda m: f"d {k}, {where}: {m}")
            if inputs:
                torch.testing.assert_close(got[0], ref[0], rtol=1e-12, atol=1e-14)
                torch.testing.assert_close(got[1], ref[1], rtol=1e-12, atol=1e-14)
                assert set(got[2]) <= set(ref[2]), where
                for k, v in ref[2].items():
                    torch.testing.assert_close(got[2].get(k, torch.zeros_like(v)), v,
                                               rtol=1e-12, atol=1e-14,
                                               msg=lambda m: f"d state {k}, {where}: {m}")
            else:
                assert got[0] is None and got[1] is None and got[2] == {}, where
            checked += 1
    assert checked > 0


@pytest.mark.parametrize("decoupled", [False, True])
def test_adam_closed_form_vjp_is_finite_where_gradient_and_moments_are_zero(decoupled):
    """Entries whose gradient and moments are all 0 (a dead unit, an unused embedding row):
    autograd through ``sqrt(v')`` gives NaN there; the closed form takes the limit, and its
    gradient cotangent equals central differences of ``update`` (the derivative exists: r is
    (1-b1) g / (c|g| + eps) near g = 0)."""
    rule = AdamRule(decoupled)
    options = {"beta2": 0.99, "eps": 1e-8, "amsgrad": False, "maximize": False,
               "decoupled": decoupled}
    gen = torch.Generator().manual_seed(4)
    param, cot = torch.randn(N, generator=gen, dtype=DT), torch.randn(N, generator=gen, dtype=DT)
    grad = torch.randn(N, generator=gen, dtype=DT)
    m, v = torch.randn(N, generator=gen, dtype=DT), torch.rand(N, generator=gen, dtype=DT) + 0.1
    dead = torch.arange(N) < N // 2
    grad[dead], m[dead], v[dead] = 0.0, 0.0, 0.0
    state = {"step": _t(3.0), "exp_avg": m, "exp_avg_sq": v}
    # coupled weight decay would make those gradients nonzero (g + wd w): none there
    tuned = ("lr", "momentum", "weight_decay") if decoupled else ("lr", "momentum")
    hyper = {"lr": _t(0.05), "momentum": _t(0.9),
             "weight_decay": _t(0.03) if decoupled else 0.0}
    with torch.no_grad():
        d_param, d_grad, d_state, d_hyper = rule.vjp(param, grad, state, hyper, options, cot,
                                                     {}, True, tuned)
    for x in (d_param, d_grad, *d_state.values(), *d_hyper.values()):
        assert torch.isfinite(x).all()
    ref = _reverse_mode(rule, param, grad, state, hyper, options, cot, {}, ())
    assert torch.isnan(ref[1][dead]).all()          # autograd's 0 * inf
    torch.testing.assert_close(d_grad[~dead], ref[1][~dead], rtol=1e-12, atol=1e-14)
    h = 1e-13
    with torch.no_grad():
        up = rule.update(param, grad + h * dead, state, hyper, options)[0]
        down = rule.update(param, grad - h * dead, state, hyper, options)[0]
    fd = cot * (up - down) / (2 * h)
    torch.testing.assert_close(d_grad[dead], fd[dead], rtol=1e-4, atol=0)
