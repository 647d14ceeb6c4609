"""Greedy hypergradients against ``reference.unrolled_hypergradient``, and the reference itself
against answers that do not use our rules.

* Greedy equals the float64 reference at horizon 1, for every rule, every granularity, two
  param groups of different lr, tuning every tunable kind, with both meta-objectives:

  (a) no ``val_loss``: E of step t is the training objective on step t+1's batch; the
      hypergradient completes (and the hyper-step runs) at the *start* of step t+1;
  (b) ``val_loss``: E is a fixed validation objective; the hyper-step runs at the end of step t.

  and with ``update_every=3`` in mode (a), where it is the mean of three one-step values.
* The reference agrees with a closed form for plain SGD on a quadratic (K=1 and K=3 steps, so
  second-order terms included), and with central finite differences through torch.optim
  itself (K=3, every rule).
* At horizon K>1 the exact hypergradient differs from what greedy reports for the same window
  (greedy's one-step bias), and from the first-order value that ignores how the gradients
  depend on the hyperparameters.

Sign convention: the training loop backpropagates ``objective`` (minus the loss when the case
maximizes), and ``val_loss`` returns the validation counterpart of the same objective.  Greedy
reports dE/dlam for E = the objective when minimizing and E = minus the objective when
maximizing, i.e. E is always the loss here.

Measured (torch 2.13 CPU, float64), normwise relative errors: greedy vs the horizon-1
reference at most 1.2e-14 (1.0e-13 on an earlier revision of the rules), update_every=3
4e-16; reference vs the closed form 8e-16; reference vs five-point differences 2.1e-9.
Gaps that must stay large: greedy vs horizon-3 reference 0.69 .. 1.6, first-order vs exact
horizon-3 0.026 (MLP) and 0.39 (quadratic).
"""
from __future__ import annotations

import pytest
import torch

from cases import CASES, GRANULARITIES, OptimizerCase
from problems import DTYPE, PROBLEMS, flat, mlp, objective, rel_err
from training import (CASE_GRID, KEY_CASES, Training, _assert_close, _case, _groups,
                      _in_raw_units, _mean)

from hyperopt_wrap.reference import unrolled_hypergradient

WARMUP = 2                     # steps before the compared one: state exists, values have moved
RTOL_GREEDY = 1e-12            # greedy vs reference, horizon 1
RTOL_CLOSED_FORM = 1e-14       # reference vs closed form (quadratic)
RTOL_FINITE_DIFF = 2e-8        # reference vs central differences through torch.optim
FD_STEP = 1e-3                 # relative step of the five-point stencil (error O(h^4))
MIN_HORIZON_GAP = 1e-6         # horizon-K reference vs greedy / first-order values


# ---------------------------------------------------------------------------- greedy = reference
@pytest.mark.parametrize("case_id,problem,granularity", CASE_GRID)
def test_greedy_equals_reference_next_batch_objective(case_id, problem, granularity):
    """(a) E = training objective on the next batch; compared after the next step."""
    run = Training(_case(case_id), PROBLEMS[problem](), granularity)
    for _ in range(WARMUP):
        run.step()
    t, before = run.t, run.snapshot()
    run.step()                               # hyper-step at its start, then base step t
    used = run.opt.hyperparameters()         # the values base step t ran with
    run.step()                               # completes step t's hypergradient, hyper-steps
    expected = run.reference(before, [run.problem.batch(t)], run.next_batch_meta(t + 1), used)
    _assert_close(run.opt.last_hypergradient(), expected, RTOL_GREEDY,
                  f"greedy vs horizon-1 reference, next-batch E, step {t}")


@pytest.mark.parametrize("case_id,problem,granularity", CASE_GRID)
def test_greedy_equals_reference_validation_objective(case_id, problem, granularity):
    """(b) E = fixed validation objective; the hyper-step runs at the end of step t."""
    run = Training(_case(case_id), PROBLEMS[problem](), granularity,
                   val_loss=lambda: run.val_objective(run.weights))
    for _ in range(WARMUP):
        run.step()
    t, before, used = run.t, run.snapshot(), run.opt.hyperparameters()
    run.step()
    expected = run.reference(before, [run.problem.batch(t)], run.val_meta, used)
    _assert_close(run.opt.last_hypergradient(), expected, RTOL_GREEDY,
                  f"greedy vs horizon-1 reference, validation E, step {t}")


@pytest.mark.parametrize("mode", ["next-batch", "validation"])
@pytest.mark.parametrize("case_id,granularity", [
    pytest.param(c.id, GRANULARITIES[i % 4], id=f"{c.id}-mlp-{GRANULARITIES[i % 4]}")
    for i, c in enumerate(CASES)])
def test_greedy_equals_reference_on_the_first_step(case_id, granularity, mode):
    """Step 0 starts from empty state (SGD's buffer is a copy of the first direction, Adam's
    bias corrections at t=1), which the later-step comparisons never see."""
    val = mode == "validation"
    run = Training(_case(case_id), mlp(), granularity,
                   **({"val_loss": lambda: run.val_objective(run.weights)} if val else {}))
    before, used = run.snapshot(), run.opt.hyperparameters()
    # fresh: no state, or (Adagrad, which torch creates at construction) state at step 0
    assert before[1] is None or all(int(st["step"]) == 0 for st in before[1])
    run.step()
    meta = run.val_meta if val else run.next_batch_meta(1)
    if not val:
        run.step()
    got = run.opt.last_hypergradient()
    expected = run.reference(before, [run.problem.batch(0)], meta, used)
    assert set(got) == set(expected)
    # Some first-step hypergradients are exactly 0 (SGD and RMSprop momentum: the old buffer
    # is empty; Adam beta1: m_1 / (1 - beta1) = g) or O(eps) by cancellation (coupled weight
    # decay when sqrt(v_1) = |g|, as g / |g| is scale-free), so a per-kind relative error would
    # weigh rounding noise against rounding noise.  Compare the raw-space vector dE/dr over all
    # kinds instead: the direction the hyper-optimizer is given.
    got_raw, expected_raw = _in_raw_units(got, used), _in_raw_units(expected, used)
    assert got_raw.dtype == DTYPE and torch.count_nonzero(expected_raw) > 0
    err = rel_err(got_raw, expected_raw)
    assert err <= RTOL_GREEDY, (
        f"greedy vs horizon-1 reference, {mode} E, first step: raw-space relative error "
        f"{err:.3g} > {RTOL_GREEDY}; per kind: "
        f"{ {k: f'{rel_err(flat(got[k]), flat(expected[k])):.3g}' for k in expected} }")


@pytest.mark.parametrize("case_id,granularity", [
    pytest.param(c.id, g, id=f"{c.id}-mlp-{g}") for c in KEY_CASES for g in GRANULARITIES])
def test_update_every_3_is_mean_of_three_one_step_references(case_id, granularity):
    """Mode (a), update_every=3: the hyper-step at the start of step 6 averages the one-step
    hypergradients of steps 3, 4 and 5, which all ran with the values set at the start of 3."""
    run = Training(_case(case_id), mlp(), granularity, update_every=3)
    for _ in range(3):
        run.step()
    snapshots, used = [], None
    for t in (3, 4, 5):
        snapshots.append((t, run.snapshot()))
        run.step()
        now = run.opt.hyperparameters()
        if used is None:
            used = now
        for kind in now:
            assert torch.equal(flat(now[kind]), flat(used[kind])), \
                f"{kind} moved inside an update_every=3 window (after step {t})"
    run.step()
    expected = _mean([run.reference(snap, [run.problem.batch(t)], run.next_batch_meta(t + 1), used)
                      for t, snap in snapshots])
    _assert_close(run.opt.last_hypergradient(), expected, RTOL_GREEDY,
                  "update_every=3 vs mean of three horizon-1 references")


# ---------------------------------------------------------------------------- reference checks
def _quadratic(n: int = 6, seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=gen, dtype=DTYPE)
    h = a @ a.T / n + 0.5 * torch.eye(n, dtype=DTYPE)
    b = torch.randn(n, generator=gen, dtype=DTYPE)
    c = torch.randn(n, n, generator=gen, dtype=DTYPE)
    q = c @ c.T / n + 0.1 * torch.eye(n, dtype=DTYPE)
    r = torch.randn(n, generator=gen, dtype=DTYPE)
    w0 = torch.randn(n, generator=gen, dtype=DTYPE)
    return h, b, q, r, w0


@pytest.mark.parametrize("steps", [1, 3], ids=["K=1", "K=3"])
def test_reference_equals_closed_form_for_sgd_on_a_quadratic(steps):
    """L(w) = 0.5 w'Hw - b'w, plain SGD: w_{t+1} = M w_t + lr b, M = I - lr H, so with
    w* = H^-1 b, w_K - w* = M^K (w_0 - w*) and, since H and M commute,
    dw_K/dlr = -K H M^(K-1) (w_0 - w*).  E(w) = 0.5 w'Qw - r'w, dE/dlr = (Q w_K - r) . dw_K/dlr.
    """
    h, b, q, r, w0 = _quadratic()
    lr = 0.3
    loss = lambda ws, _batch: 0.5 * ws[0] @ h @ ws[0] - b @ ws[0]
    meta = lambda ws: 0.5 * ws[0] @ q @ ws[0] - r @ ws[0]
    got = unrolled_hypergradient(torch.optim.SGD, [w0], loss, [None] * steps, meta,
                                 tune=("lr",), lr=lr)
    n = w0.numel()
    m = torch.eye(n, dtype=DTYPE) - lr * h
    w_star = torch.linalg.solve(h, b)
    w_k = w_star + torch.linalg.matrix_power(m, steps) @ (w0 - w_star)
    dw_dlr = -steps * h @ torch.linalg.matrix_power(m, steps - 1) @ (w0 - w_star)
    closed = (q @ w_k - r) @ dw_dlr
    err = rel_err(got["lr"][0], closed)
    assert err <= RTOL_CLOSED_FORM, (
        f"reference {float(got['lr'][0])!r} vs closed form {float(closed)!r}: relative "
        f"error {err:.3g} > {RTOL_CLOSED_FORM}")
    if steps > 1:   # the second-order terms matter: dropping them is far off
        first_order = -(q @ w_k - r) @ sum(h @ w - b for w in _sgd_path(h, b, w0, lr, steps))
        assert rel_err(first_order, closed) > MIN_HORIZON_GAP


def _sgd_path(h, b, w0, lr, steps):
    w = w0
    for _ in range(steps):
        yield w
        w = w - lr * (h @ w - b)


def _with_value(case: OptimizerCase, kind: str, value: float) -> dict:
    kwargs = dict(case.kwargs)
    if kind == "momentum" and case.cls in (torch.optim.Adam, torch.optim.AdamW):
        kwargs["betas"] = (value, kwargs.get("betas", (0.9, 0.999))[1])
    else:
        kwargs[kind] = value
    return kwargs


FD_CASES = [_case(i) for i in (
    "SGD(momentum=0.9,nesterov,weight_decay=0.01,maximize)",
    "SGD(momentum=0.8,dampening=0.2,weight_decay=0.01,maximize)", "Adam(weight_decay=0.01)",
    "Adam(weight_decay=0.05,amsgrad,decoupled_weight_decay,maximize)",
    "AdamW(weight_decay=0.1,amsgrad,maximize)",
    "RMSprop(alpha=0.95,momentum=0.5,centered,weight_decay=0.01,maximize)",
    "Adagrad(lr_decay=0.01,weight_decay=0.01,initial_accumulator_value=0.1,eps=1e-06,maximize)")]


@pytest.mark.parametrize("case", FD_CASES, ids=[c.id for c in FD_CASES])
def test_reference_equals_central_differences_through_torch_optim(case):
    """K=3 steps from fresh state on the MLP: the reference (our rules, autograd) against the
    five-point central difference of E(lam), where E runs torch.optim itself."""
    problem, steps = mlp(), 3
    f = objective(problem, case.maximize)
    batches = [problem.batch(t) for t in range(steps)]
    meta = lambda ws: problem.loss_fn(ws, problem.val_batch)

    def e(kwargs) -> float:
        weights = problem.weights()
        opt = case.cls(weights, foreach=False, **kwargs)
        for batch in batches:
            opt.zero_grad()
            f(weights, batch).backward()
            opt.step()
        with torch.no_grad():
            return float(meta(weights))

    got = unrolled_hypergradient(case.cls, problem.weights(), f, batches, meta,
                                 tune=case.tunable, **case.kwargs)
    for kind in case.tunable:
        value = case.initial(kind)
        h = FD_STEP * value
        at = lambda x: e(_with_value(case, kind, value + x * h))
        fd = (8 * (at(1) - at(-1)) - (at(2) - at(-2))) / (12 * h)
        err = rel_err(got[kind][0], torch.tensor(fd, dtype=DTYPE))
        assert err <= RTOL_FINITE_DIFF, (
            f"dE/d{kind}: reference {float(got[kind][0])!r} vs central difference {fd!r}: "
            f"relative error {err:.3g} > {RTOL_FINITE_DIFF}")


HORIZON_CASES = [_case(i) for i in ("SGD()", "SGD(momentum=0.9)", "Adam()")]


@pytest.mark.parametrize("case", HORIZON_CASES, ids=[c.id for c in HORIZON_CASES])
def test_horizon_3_reference_differs_from_greedy_window_value(case):
    """With val_loss and update_every=K, greedy reports grad E(w_{t+K}) . B_{t+K-1} (the
    window's last step only).  The exact K-step hypergradient of the same window differs: the
    gap is greedy's bias.  Greedy still equals the horizon-1 reference of the last step."""
    k = 3
    problem = mlp()
    run = Training(case, problem, "group", update_every=k,
                   val_loss=lambda: run.val_objective(run.weights))
    for _ in range(k):           # first window
        run.step()
    start, window_start = run.t, run.snapshot()
    used = run.opt.hyperparameters()
    for _ in range(k - 1):
        run.step()
    last_t, last_snapshot = run.t, run.snapshot()
    run.step()                   # ends the window: hyper-step
    got = run.opt.last_hypergradient()

    horizon_1 = run.reference(last_snapshot, [problem.batch(last_t)], run.val_meta, used)
    _assert_close(got, horizon_1, RTOL_GREEDY, "greedy window value vs horizon-1 reference")

    horizon_k = run.reference(window_start, [problem.batch(t) for t in range(start, start + k)],
                              run.val_meta, used)
    gaps = {kind: rel_err(flat(got[kind]), flat(horizon_k[kind])) for kind in horizon_k}
    assert all(g > MIN_HORIZON_GAP for g in gaps.values()), (
        f"greedy vs horizon-{k} reference: relative gap {gaps} is not > {MIN_HORIZON_GAP}")


def test_horizon_3_reference_includes_second_order_terms_on_mlp():
    """Plain SGD on the MLP: holding the gradients fixed, w_K = w_0 - lr_g sum_s g_s per group,
    so the first-order dE/dlr_g = -sum_s grad_g E(w_K) . g_s.  The exact reference must differ
    (the gradients depend on lr through the weights)."""
    k, problem = 3, mlp()
    case = _case("SGD()")
    w0 = problem.weights()
    groups = _groups(case, problem, w0)
    batches = [problem.batch(t) for t in range(k)]
    meta = lambda ws: problem.loss_fn(ws, problem.val_batch)
    exact = unrolled_hypergradient(torch.optim.SGD, groups, problem.loss_fn, batches, meta,
                                   tune=("lr",), granularity="group", lr=case.kwargs["lr"])
    lrs = [g["lr"] for g in groups]
    owner = [gi for gi, g in enumerate(groups) for _ in g["params"]]
    weights, grad_sums = [w.detach().clone().requires_grad_(True) for w in w0], None
    for batch in batches:
        grads = torch.autograd.grad(problem.loss_fn(weights, batch), weights)
        grad_sums = list(grads) if grad_sums is None else [a + g for a, g in zip(grad_sums, grads)]
        weights = [(w - lrs[gi] * g).detach().requires_grad_(True)
                   for w, g, gi in zip(weights, grads, owner)]
    meta_grads = torch.autograd.grad(meta(weights), weights)
    first_order = [sum(-(mg * s).sum() for mg, s, o in zip(meta_grads, grad_sums, owner) if o == gi)
                   for gi in range(len(groups))]
    gap = rel_err(flat(first_order), flat(exact["lr"]))
    assert gap > MIN_HORIZON_GAP, (
        f"horizon-{k} reference vs first-order value: relative gap {gap:.3g} is not > "
        f"{MIN_HORIZON_GAP}; the reference seems to drop second-order terms")
