"""RTRL (forward sensitivities) against the brute-force float64 reference.

* discount 1, global and group granularity: the exact hypergradient of ``E(w_20)`` through all
  20 steps (``reference.unrolled_hypergradient`` over the whole run), lr, momentum and weight
  decay tuned together, every rule, the graph source (1e-8) and the closure source (1e-6);
* ``hessian_free`` equals the reference with ``H = 0`` at every granularity (there the per-kind
  tangent is exact); a discount below 1 equals the discounted reference;
* per-tensor and per-element with the Hessian: the per-kind (block-diagonal) approximation's
  bias against the exact per-tensor value, measured and bounded;
* the protocol: the plain loop with the graph, closures, resume mid-window in lockstep, a
  shared method object, NaN steps, bad options.
"""
from __future__ import annotations

import copy

import pytest
import torch

from problems import PROBLEMS, flat, mlp
from training import SourceRun, _assert_close, _case, _errors

from tiny import X, Y, reloaded, tiny_model as _model, train as _train

from hyperopt_wrap import RTRL, CurvatureError, FiniteDifferences, HyperOptimizer

STEPS = 20
RTOL_EXACT = 1e-8
RTOL_CLOSURE = 1e-6
CASES = ["SGD(momentum=0.9,nesterov,weight_decay=0.01,maximize)", "SGD(momentum=0.9)",
         "Adam(weight_decay=0.01)", "AdamW(weight_decay=0.1,amsgrad,maximize)",
         "RMSprop(momentum=0.9)", "Adagrad(weight_decay=0.01)"]


def Run(case, problem, granularity, source="graph", **options):
    """A run with the hyperparameters held where they are (the reference's constant values)."""
    return SourceRun(case, problem, granularity, source, frozen=True, **options)


def _rtrl_vs_reference(case_id, problem, granularity, source="graph", method=None, **ref):
    """RTRL over the whole run (one window of STEPS steps, E = the validation loss) and the
    reference from the initial weights."""
    run = Run(_case(case_id), problem, granularity, source, method=method or RTRL(),
              update_every=STEPS)
    run.opt.val_loss = lambda: run.val_objective(run.weights)
    snapshot, used = run.snapshot(), run.opt.hyperparameters()
    for _ in range(STEPS):
        run.step()
    assert run.opt.hypersteps == 1
    expected = run.reference(snapshot, [run.problem.batch(t) for t in range(STEPS)],
                             run.val_meta, used, **ref)
    return run.opt.last_hypergradient(), expected





@pytest.mark.parametrize("granularity", ["global", "group"])
@pytest.mark.parametrize("case_id", CASES)
def test_rtrl_equals_the_full_history_reference(case_id, granularity):
    got, expected = _rtrl_vs_reference(case_id, mlp(), granularity)
    _assert_close(got, expected, RTOL_EXACT, f"RTRL over {STEPS} steps")


@pytest.mark.parametrize("problem", sorted(PROBLEMS))
def test_rtrl_exact_on_every_problem(problem):
    got, expected = _rtrl_vs_reference("SGD(momentum=0.9,nesterov,weight_decay=0.01,maximize)",
                                       PROBLEMS[problem](), "group")
    _assert_close(got, expected, RTOL_EXACT, f"RTRL on {problem}")


@pytest.mark.parametrize("source", ["closure", "central"])
@pytest.mark.parametrize("case_id", ["SGD(momentum=0.9,nesterov,weight_decay=0.01,maximize)",
                                     "Adam(weight_decay=0.01)"])
def test_rtrl_closure_source_float64(case_id, source):
    got, expected = _rtrl_vs_reference(case_id, mlp(), "global", source)
    errs = _errors(got, expected)
    assert max(errs.values()) <= RTOL_CLOSURE, errs


@pytest.mark.parametrize("granularity", ["global", "tensor", "element"])
@pytest.mark.parametrize("case_id", CASES)
def test_hessian_free_equals_the_reference_without_curvature(case_id, granularity):
    """With H = 0 every tangent block depends only on its own slot, so the per-kind tangent of
    tensor and element granularity is exact too."""
    got, expected = _rtrl_vs_reference(case_id, mlp(), granularity,
                                       method=RTRL(hessian_free=True, per_kind_elements=True),
                                       second_order=False)
    _assert_close(got, expected, 1e-10, "hessian-free RTRL vs reference with H=0")


@pytest.mark.parametrize("discount", [0.5, 0.9])
@pytest.mark.parametrize("case_id", ["SGD(momentum=0.9,nesterov,weight_decay=0.01,maximize)",
                                     "Adam(weight_decay=0.01)", "RMSprop(momentum=0.9)"])
def test_discount_equals_the_discounted_reference(case_id, discount):
    got, expected = _rtrl_vs_reference(case_id, mlp(), "global",
                                       method=RTRL(discount=discount), discount=discount)
    _assert_close(got, expected, RTOL_EXACT, f"RTRL(discount={discount})")
    exact, _ = _rtrl_vs_reference(case_id, mlp(), "global")
    assert max(_errors(got, exact).values()) > 1e-3     # the discount does change the value


@pytest.mark.parametrize("case_id", ["SGD(momentum=0.9)", "Adam()"])
def test_per_kind_bias_at_tensor_granularity(case_id):
    """OHO's block-diagonal reading with cross-tensor curvature: an approximation, measured on
    the MLP (normwise relative error against the exact per-tensor value over 20 steps;
    SGD(momentum=0.9): lr 1.29, momentum 0.84 -- large: the layers' curvature couples them)."""
    got, expected = _rtrl_vs_reference(case_id, mlp(), "tensor")
    errs = _errors(got, expected)
    print(f"per-kind RTRL bias, tensor granularity, {case_id}: "
          + ", ".join(f"{k} {v:.3g}" for k, v in errs.items()))
    assert 1e-6 < max(errs.values()) < 10, errs
    assert all(torch.isfinite(flat(v)).all() for v in got.values())


@pytest.mark.parametrize("granularity", ["tensor", "element"])
@pytest.mark.parametrize("cls,kwargs", [
    (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-2}),
    (torch.optim.Adam, {"lr": 0.01, "weight_decay": 1e-2})])
def test_per_kind_tangent_is_exact_without_cross_curvature(cls, kwargs, granularity):
    """The limit of the approximation: a loss that separates by tensor (and, for element
    granularity, by element) has a block-diagonal Hessian, and there the per-kind tangent is
    the exact hypergradient, with the Hessian term included."""
    from hyperopt_wrap.reference import unrolled_hypergradient
    gen = torch.Generator().manual_seed(11)
    shapes = [(3, 4), (5,), (2, 2)]
    w0 = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    data = [[torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
            for _ in range(STEPS)]
    target = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]

    def loss_fn(ws, batch):      # elementwise: sum_i cosh(w_i - c_i) + (w_i c_i)^2
        return sum((torch.cosh(w - c) + (w * c) ** 2).sum() for w, c in zip(ws, batch))

    def meta(ws):
        return sum(((w - t) ** 2).sum() for w, t in zip(ws, target))

    tune = ("lr", "momentum", "weight_decay")
    weights = [w.clone().requires_grad_() for w in w0]
    opt = HyperOptimizer(cls, weights, hyper_lr=0.0, tune=tune, granularity=granularity,
                         update_every=STEPS, method=RTRL(per_kind_elements=True),
                         val_loss=lambda: meta(weights), **kwargs)
    used = opt.hyperparameters()
    for batch in data:
        opt.zero_grad()
        loss_fn(weights, batch).backward(create_graph=opt.needs_graph)
        opt.step()
    expected = unrolled_hypergradient(cls, w0, loss_fn, data, meta, tune=tune,
                                      granularity=granularity, hyper_values=used, **kwargs)
    _assert_close(opt.last_hypergradient(), expected, RTOL_EXACT, "per-kind RTRL, separable")


def test_element_granularity_needs_the_opt_in():
    m = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="per_kind_elements=True"):
        HyperOptimizer(torch.optim.SGD, m.parameters(), lr=0.1, method=RTRL(),
                       granularity="element")
    HyperOptimizer(torch.optim.SGD, m.parameters(), lr=0.1, granularity="element",
                   method=RTRL(per_kind_elements=True))


@pytest.mark.parametrize("kwargs,match", [
    ({"discount": 0}, "discount"), ({"discount": 1.5}, "discount"),
    ({"discount": True}, "discount"), ({"reset_every": 0}, "reset_every"),
    ({"reset_every": 2.0}, "reset_every")])
def test_bad_options_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RTRL(**kwargs)


# ----------------------------------------------------------------------------- the protocol
def _make(model, **kw):
    kw.setdefault("method", RTRL())
    return HyperOptimizer(torch.optim.SGD, model.parameters(), lr=0.05, momentum=0.9,
                          weight_decay=1e-3, tune=("lr", "momentum", "weight_decay"),
                          update_every=3, **kw)


def test_needs_graph_every_step_and_the_sources_agree():
    results = []
    for closure in (False, True):
        m = _model()
        opt = _make(m, curvature=FiniteDifferences(central=True) if closure else "auto")
        assert opt.needs_graph is (not closure)
        _train(opt, m, 10, closure=closure)
        results.append(opt.last_hypergradient())
    assert max(_errors(results[1], results[0]).values()) < 1e-6


def test_missing_curvature_source_names_both_fixes():
    m = _model()
    opt = _make(m)
    loss = ((m(X[:8]) - Y[:8]) ** 2).mean()
    loss.backward()
    with pytest.raises(CurvatureError, match="create_graph=opt.needs_graph"):
        opt.step()
    # hessian_free needs no curvature at all
    opt = _make(m, method=RTRL(hessian_free=True))
    opt.step()


@pytest.mark.parametrize("closure", [False, True])
def test_resume_mid_window_runs_in_lockstep(closure):
    m1 = _model()
    o1 = _make(m1)
    _train(o1, m1, 4, closure=closure)       # mid-window (update_every=3)
    m2, o2, _ = reloaded(m1, o1, _make)
    _train(o1, m1, 5, start=4, closure=closure)
    _train(o2, m2, 5, start=4, closure=closure)
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    h1, h2 = o1.hyperparameters(), o2.hyperparameters()
    for k in h1:
        assert torch.equal(flat(h1[k]), flat(h2[k])), k


def test_deepcopy_and_a_shared_method_object():
    method = RTRL()
    m1, m2 = _model(), _model()
    o1, o2 = _make(m1, method=method), _make(m2, method=method)
    _train(o1, m1, 6)
    _train(o2, m2, 6)
    assert torch.equal(flat(o1.last_hypergradient()["lr"]), flat(o2.last_hypergradient()["lr"]))
    o3 = copy.deepcopy(o1)        # a copy of a running optimizer steps on its own
    m3 = next(iter(o3.param_groups[0]["params"]))
    assert m3 is not next(m1.parameters())
    h = o3.hyperparameters()["lr"][0]
    assert torch.equal(h, o1.hyperparameters()["lr"][0])


def test_a_nan_step_is_skipped_and_leaves_the_sensitivities_as_they_were():
    m = _model()
    opt = _make(m, method=RTRL(hessian_free=True))
    _train(opt, m, 2)
    z_before = copy.deepcopy(opt.state_dict()["hyper"]["method"]["Z"])
    weights = [p.detach().clone() for p in m.parameters()]
    opt.zero_grad()
    ((m(X[:8]) - Y[:8]) ** 2).mean().backward()
    next(m.parameters()).grad[0, 0] = float("nan")
    opt.step()
    assert opt.skipped_steps == 1
    for a, b in zip(m.parameters(), weights):
        assert torch.equal(a, b)
    z_after = opt.state_dict()["hyper"]["method"]["Z"]
    for za, zb in zip(z_after, z_before):
        for key in zb["w"]:
            assert torch.equal(za["w"][key], zb["w"][key])
    # a skipped step is the identity, so the tangents through it stay exact: the window's
    # hyper-step (read out at step 3's finite gradient) is taken
    _train(opt, m, 3, start=3)
    assert opt.skipped_hypersteps == 0 and opt.hypersteps == 1
    # a NaN gradient where the hypergradient is read out skips that hyper-step
    opt.zero_grad()
    ((m(X[:8]) - Y[:8]) ** 2).mean().backward()
    next(m.parameters()).grad[0, 0] = float("inf")
    opt.step()
    assert opt.skipped_hypersteps == 1 and opt.hypersteps == 2
    assert all(torch.isfinite(flat(v)).all() for v in opt.hyperparameters().values()
               if not isinstance(v[0], float))


def test_reset_every_zeroes_the_sensitivities():
    m = _model()
    opt = _make(m, method=RTRL(reset_every=1), val_loss=lambda: (m(X) ** 2).mean())
    _train(opt, m, 3)
    assert all(not z["w"] for z in opt.state_dict()["hyper"]["method"]["Z"])


def test_an_expanded_hessian_product_from_the_graph():
    """A loss of ``w.sum()`` makes the graph's Hessian-vector product an expanded (stride-0)
    tensor, which the in-place recurrence cannot write into (it raised "more than one element
    of the written-to tensor refers to a single memory location"): it is copied first, and the
    hypergradient agrees with the closure source's."""
    results = []
    for curvature in ("graph", "closure"):
        w = torch.nn.Parameter(torch.linspace(0.1, 0.5, 5, dtype=torch.float64))
        opt = HyperOptimizer(torch.optim.SGD, [w], lr=0.05, momentum=0.9, method="rtrl",
                             tune=("lr", "momentum"), curvature=curvature, hyper_lr=0.0,
                             update_every=4)
        for _ in range(5):
            def closure():
                opt.zero_grad()
                loss = torch.cos(w.sum())
                loss.backward(create_graph=opt.needs_graph)
                return loss
            if curvature == "graph":
                closure()
                opt.step()
            else:
                opt.step(closure)
        assert opt.hypersteps == 1
        results.append(opt.last_hypergradient())
    for kind in results[0]:
        a, b = flat(results[0][kind]), flat(results[1][kind])
        assert torch.count_nonzero(a) > 0 and torch.isfinite(a).all(), kind
        assert float((a - b).abs().max()) <= 1e-5 * float(a.abs().max()), (kind, a, b)
