"""ForwardGradient ((FG)^2U) against the brute-force float64 reference.

The reference of a window is ``reference.unrolled_hypergradient`` over that window's steps,
from the weights and base-optimizer state at the window's start (the truncated hypergradient,
which ``Unroll(horizon=update_every)`` computes exactly):

* ``distribution="basis"`` with one direction per tuned scalar is exact (1e-10, graph source)
  at every granularity, per-element included, for both meta-objectives, and equals
  ``Unroll(horizon=T)`` step for step; with the closure source within finite-difference
  tolerances;
* every random estimate is exactly ``mean_i (h . v_i) v_i`` for its own directions ``v_i`` and
  the reference ``h`` (1e-10): the linear structure of the estimator, per-element included;
* over many windows from the same start the mean converges to ``h`` within a few standard
  errors, with the variance the theory predicts (Rademacher ``(||h||^2 - h_j^2) / b``, Gaussian
  ``(||h||^2 + h_j^2) / b``), reported against ``b``;
* the protocol: graph and closure sources, ``needs_graph`` False on a window's first step,
  resume mid-window in lockstep (generator state included), NaN steps, bad options, a
  scheduler scale, a param group added mid-window.

Measured (torch 2.13 CPU, float64), normwise relative errors: basis vs reference at most
4.7e-15 over the 21 cases here (graph source); vs Unroll(T) after three windows with moving
hyperparameters ~1e-15; closure source (group granularity, five rules) forward differences at
most 1.4e-8, central 8e-11; a random estimate vs ``mean_i (h . v_i) v_i`` at most 5.3e-16.
Bias and variance over 400 windows of 4 steps on linear regression (N = 6 tuned scalars; the
test runs 160 windows of 2 steps and prints its table with ``pytest -s``): the largest entry of
``|mean - h|`` is 1.1, 0.9, 1.7 standard errors for Rademacher b = 1, 2, 8 (1.2 for Gaussian
b = 2); measured / predicted variance 1.04, 0.99, 0.98 (Gaussian 0.91); one estimate's
``|h_hat - h| / |h|`` 2.28, 1.57, 0.78 against the predicted ``sqrt((N - 1) / b)`` = 2.24, 1.58,
0.79 (Gaussian 1.78 against ``sqrt((N + 1) / b)`` = 1.87).
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

from problems import DTYPE, flat, forbid_host_sync, linear_regression, mlp, rel_err
from training import SourceRun, _assert_close, _case, _errors

from tiny import X, Y, reloaded, tiny_batch as _batch, tiny_model as _model, train as _train

from hyperopt_wrap import CurvatureError, FiniteDifferences, HyperOptimizer, Unroll
from hyperopt_wrap.methods.forward_gradient import ForwardGradient

T = 4                          # the window (update_every)
RTOL_EXACT = 1e-10
RTOL_CLOSURE = {"closure": 1e-6, "central": 1e-8}
CASES = ["SGD(momentum=0.9,nesterov,weight_decay=0.01,maximize)", "Adam(weight_decay=0.01)",
         "AdamW(weight_decay=0.1,amsgrad,maximize)",
         "RMSprop(alpha=0.95,momentum=0.5,centered,weight_decay=0.01,maximize)",
         "Adagrad(weight_decay=0.01)"]


Run = SourceRun


def _scalars(opt) -> int:
    """N: how many tuned scalars the optimizer has (every slot of every kind)."""
    return sum(v.numel() for tk in opt.tuned.values() for v in tk.values)


def _basis(case, problem, granularity, **kw) -> ForwardGradient:
    probe = Run(case, problem, granularity, method=Unroll(T), update_every=T)
    return ForwardGradient(directions=_scalars(probe.opt), distribution="basis", **kw)


def _window_vs_reference(run: Run, mode: str):
    """Window 2 of a run with windows of T steps (window 1 moves the hyperparameters and fills
    the optimizer state), against the reference from window 2's start."""
    val = mode == "val"
    if val:
        run.opt.val_loss = lambda: run.val_objective(run.weights)
    for _ in range(T):
        run.step()
    snapshot, start = run.snapshot(), run.t
    run.step()          # window 2's first step (without val_loss, after window 1's hyper-step)
    used = run.opt.hyperparameters()
    while run.t < start + T:
        run.step()
    if val:
        meta = run.val_meta
    else:
        meta = run.next_batch_meta(run.t)
        run.step()      # reads window 2 out at its gradient, then starts window 3
    assert run.opt.hypersteps == 2
    expected = run.reference(snapshot, [run.problem.batch(t) for t in range(start, start + T)],
                             meta, used)
    return run.opt.last_hypergradient(), expected


# ----------------------------------------------------------------------------- exactness
EXACT_GRID = ([pytest.param(c, "mlp", g, m, id=f"{c}-mlp-{g}-{m}")
               for c in CASES[:2] for g in ("global", "group", "tensor") for m in ("next", "val")]
              + [pytest.param(c, "mlp", "tensor", "next", id=f"{c}-mlp-tensor-next")
                 for c in CASES[2:]]
              + [pytest.param(c, "linreg", "element", m, id=f"{c}-linreg-element-{m}")
                 for c in CASES[:3] for m in ("next", "val")])
PROBLEMS = {"mlp": lambda: mlp(), "linreg": lambda: linear_regression()}


@pytest.mark.parametrize("case_id,problem,granularity,mode", EXACT_GRID)
def test_basis_directions_are_exact(case_id, problem, granularity, mode):
    """One scaled coordinate direction per tuned scalar: (1/N) sum_j (h . sqrt(N) e_j)
    sqrt(N) e_j = h, the exact truncated hypergradient of the window."""
    case, prob = _case(case_id), PROBLEMS[problem]()
    run = Run(case, prob, granularity, method=_basis(case, prob, granularity), update_every=T)
    got, expected = _window_vs_reference(run, mode)
    _assert_close(got, expected, RTOL_EXACT, "ForwardGradient(basis, b=N) vs reference")


@pytest.mark.parametrize("granularity", ["group", "element"])
def test_basis_directions_equal_unroll_over_the_window(granularity):
    """The same quantity as Unroll(horizon=update_every), window after window, with the
    hyperparameters moving (so the trajectories stay together only if every window agrees)."""
    case = _case("SGD(momentum=0.9,nesterov,weight_decay=0.01,maximize)")
    prob = linear_regression() if granularity == "element" else mlp()
    runs = [Run(case, prob, granularity, method=m, update_every=T)
            for m in (Unroll(T), _basis(case, prob, granularity))]
    for _ in range(3 * T + 1):
        for run in runs:
            run.step()
    assert runs[1].opt.hypersteps == 3
    _assert_close(runs[1].opt.last_hypergradient(), runs[0].opt.last_hypergradient(), 1e-10,
                  "ForwardGradient(basis) vs Unroll(T)")
    for kind, values in runs[0].opt.hyperparameters().items():
        assert rel_err(flat(runs[1].opt.hyperparameters()[kind]), flat(values)) <= 1e-12


@pytest.mark.parametrize("source", ["closure", "central"])
@pytest.mark.parametrize("case_id", CASES[:2])
def test_basis_directions_with_the_closure_source(case_id, source):
    case, prob = _case(case_id), mlp()
    run = Run(case, prob, "group", source, method=_basis(case, prob, "group"), update_every=T)
    got, expected = _window_vs_reference(run, "next")
    errs = _errors(got, expected)
    print(f"ForwardGradient(basis), {source} source, {case_id}: "
          + ", ".join(f"{k} {v:.2g}" for k, v in errs.items()))
    assert max(errs.values()) <= RTOL_CLOSURE[source], errs


def _per_group(opt, direction: dict) -> dict:
    """A direction (kind -> blocks) in the layout of ``last_hypergradient()``."""
    return {k: opt.tuned[k].per_group(blocks) for k, blocks in direction.items()}


def _dot(a: dict, b: dict) -> torch.Tensor:
    return sum(torch.dot(flat(a[k]), flat(b[k])) for k in a)


def _combine(entries: list, coefs: list):
    """sum_i coefs[i] * entries[i] for one group's entry (a tensor, or a list of tensors)."""
    if isinstance(entries[0], list):
        return [_combine(list(parts), coefs) for parts in zip(*entries)]
    return sum(c * e for c, e in zip(coefs, entries))


@pytest.mark.parametrize("distribution,directions,granularity,problem", [
    ("rademacher", 3, "element", "mlp"), ("rademacher", 1, "tensor", "mlp"),
    ("gaussian", 2, "group", "mlp"), ("gaussian", 2, "element", "linreg")])
def test_each_estimate_is_the_mean_of_directional_derivatives(distribution, directions,
                                                              granularity, problem):
    """h_hat = (1/b) sum_i (h . v_i) v_i for the window's own directions and the reference h:
    the tangents are the exact directional derivatives J v_i, per element included."""
    case = _case("Adam(weight_decay=0.01)")
    run = Run(case, PROBLEMS[problem](), granularity,
              method=ForwardGradient(directions, distribution, seed=7), update_every=T)
    got, h = _window_vs_reference(run, "val")
    drawn = run.opt.state_dict()["hyper"]["method"]["directions"]
    assert len(drawn) == directions
    if granularity == "element":      # a per-element direction is shaped like its parameter
        for kind in drawn[0]:
            assert [tuple(v.shape) for v in drawn[0][kind]] == \
                [tuple(w.shape) for w in run.weights]
    vs = [_per_group(run.opt, d) for d in drawn]
    if distribution == "rademacher":
        assert all(torch.equal(flat(v[k]).abs(), torch.ones_like(flat(v[k])))
                   for v in vs for k in v)
    coefs = [_dot(h, v) / directions for v in vs]
    expected = {k: [_combine([v[k][gi] for v in vs], coefs) for gi in range(len(h[k]))]
                for k in h}
    _assert_close(got, expected, RTOL_EXACT, "estimate vs mean_i (h . v_i) v_i")
    assert max(_errors(got, h).values()) > 1e-3      # and it is an estimate, not h


# ----------------------------------------------------------------------------- bias, variance
def _windows_from_one_start(method: ForwardGradient, windows: int, steps: int):
    """``windows`` estimates of the same window of ``steps`` steps (the weights and optimizer
    state put back to the window's start before each; hyperparameters frozen), and the
    reference h."""
    case = _case("SGD(momentum=0.9,nesterov,weight_decay=0.01,maximize)")
    run = Run(case, linear_regression(), "tensor", method=method, update_every=steps,
              frozen=True)
    run.opt.val_loss = lambda: run.val_objective(run.weights)
    for _ in range(steps):                 # a first window: momentum buffers at the start
        run.step()
    snapshot, used, start = run.snapshot(), run.opt.hyperparameters(), run.t
    weights, states = snapshot
    h = run.reference(snapshot, [run.problem.batch(t) for t in range(start, start + steps)],
                      run.val_meta, used)
    samples = []
    for _ in range(windows):
        with torch.no_grad():
            for w, w0, s0 in zip(run.weights, weights, states):
                w.copy_(w0)
                for name, value in s0.items():
                    run.opt.state[w][name].copy_(value)
        run.t = start
        for _ in range(steps):
            run.step()
        got = run.opt.last_hypergradient()
        samples.append(torch.cat([flat(got[k]) for k in sorted(got)]))
    return torch.stack(samples), torch.cat([flat(h[k]) for k in sorted(h)])


def test_mean_converges_and_the_variance_is_as_predicted():
    """Unbiased: the mean of many estimates of one window approaches h; the variance matches
    the closed form, so it falls like 1/b.  Windows of 2 steps (the second takes the Hessian
    term) keep the test fast; the docstring reports a longer run."""
    windows, steps = 160, 2
    report = []
    for distribution, b in [("rademacher", 1), ("rademacher", 2), ("rademacher", 8),
                            ("gaussian", 2)]:
        samples, h = _windows_from_one_start(ForwardGradient(b, distribution, seed=b),
                                              windows, steps)
        n = h.numel()
        sq = h.pow(2)
        var = ((sq.sum() - sq) if distribution == "rademacher" else (sq.sum() + sq)) / b
        mean = samples.mean(0)
        # unbiased: every entry of the mean within 4 standard errors of the reference
        assert ((mean - h).abs() <= 4 * (var / windows).sqrt()).all(), (distribution, b, mean, h)
        measured = samples.var(0).sum() / var.sum()
        assert 0.7 < measured < 1.4, (distribution, b, float(measured))
        spread = float(((samples - h).pow(2).sum(1).mean() / sq.sum()).sqrt())
        predicted = math.sqrt((n - 1 if distribution == "rademacher" else n + 1) / b)
        report.append(f"{distribution:10s} b={b}: bias |mean - h|/|h| = "
                      f"{float((mean - h).norm() / h.norm()):.3f} (4 s.e. "
                      f"{float(4 * (var.sum() / windows).sqrt() / h.norm()):.3f}); variance "
                      f"measured/predicted {float(measured):.2f}; one estimate's |h_hat - h|/|h| "
                      f"{spread:.2f} (predicted {predicted:.2f})")
    print(f"\nForwardGradient over {windows} windows of {steps} steps, N = {n} tuned scalars:\n"
          + "\n".join(report))


# ----------------------------------------------------------------------------- the protocol
def _make(model, method=None, **kw):
    return HyperOptimizer(torch.optim.SGD, model.parameters(), lr=0.05, momentum=0.9,
                          weight_decay=1e-3, tune=("lr", "momentum", "weight_decay"),
                          update_every=3, method=method or ForwardGradient(), **kw)


@pytest.mark.parametrize("val", [False, True])
def test_no_graph_on_a_window_first_step(val):
    """Every tangent is zero at a window's first step: no Hessian-vector product there, so the
    plain loop builds the (costlier) graph on the other steps only."""
    m = _model()
    opt = _make(m, val_loss=(lambda: (m(X) ** 2).mean()) if val else None)
    graphs = []
    _train(opt, m, 9, graphs=graphs)
    assert graphs == [False, True, True] * 3
    assert opt.hypersteps == (3 if val else 2)
    # a window's first step needs no graph; the next one does
    m = _model()
    opt = _make(m)
    ((m(X[:8]) - Y[:8]) ** 2).mean().backward()
    opt.step()
    opt.zero_grad()
    ((m(X[:8]) - Y[:8]) ** 2).mean().backward()
    with pytest.raises(CurvatureError, match="create_graph=opt.needs_graph"):
        opt.step()


def test_graph_and_closure_sources_agree():
    results = []
    for closure in (False, True):
        m = _model()
        opt = _make(m, curvature=FiniteDifferences(central=True) if closure else "auto")
        _train(opt, m, 10, closure=closure)
        results.append(opt.last_hypergradient())
    errs = _errors(results[1], results[0])
    assert max(errs.values()) < 1e-6, errs


def test_the_seed_decides_the_directions():
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        m = _model()
        opt = _make(m, method=ForwardGradient(seed=seed))
        _train(opt, m, 7)
        runs[name] = flat(opt.last_hypergradient()["lr"])
    assert torch.equal(runs["a"], runs["b"])
    assert not torch.equal(runs["a"], runs["c"])


@pytest.mark.parametrize("closure", [False, True])
def test_resume_mid_window_runs_in_lockstep(closure):
    m1 = _model()
    o1 = _make(m1)
    _train(o1, m1, 4, closure=closure)       # mid-window (update_every=3)
    # the saved generator state wins over the new optimizer's seed
    m2, o2, saved = reloaded(m1, o1, lambda m: _make(m, method=ForwardGradient(seed=123)))
    _train(o1, m1, 7, start=4, closure=closure)       # two more windows: new directions
    _train(o2, m2, 7, start=4, closure=closure)
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    h1, h2 = o1.hyperparameters(), o2.hyperparameters()
    for k in h1:
        assert torch.equal(flat(h1[k]), flat(h2[k])), k
    s1, s2 = (o.state_dict()["hyper"]["method"] for o in (o1, o2))
    assert s1["generator"].dtype == torch.uint8
    assert torch.equal(s1["generator"], s2["generator"])
    for d1, d2 in zip(s1["directions"], s2["directions"]):
        for k in d1:
            assert all(torch.equal(a, b) for a, b in zip(d1[k], d2[k]))


def test_deepcopy_and_a_shared_method_object():
    method = ForwardGradient(directions=3)
    m1, m2 = _model(), _model()
    o1, o2 = _make(m1, method=method), _make(m2, method=method)
    _train(o1, m1, 7)
    _train(o2, m2, 7)       # its own generator, seeded the same: the same directions
    assert torch.equal(flat(o1.last_hypergradient()["lr"]), flat(o2.last_hypergradient()["lr"]))
    m3, o3 = copy.deepcopy((m1, o1))     # mid-window: its own tangents and generator state
    _train(o1, m1, 6, start=7)
    _train(o3, m3, 6, start=7)
    assert o3.hypersteps == o1.hypersteps == 4
    for a, b in zip(m1.parameters(), m3.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(flat(o1.hyperparameters()["lr"]), flat(o3.hyperparameters()["lr"]))


def _method_state_finite(opt) -> bool:
    state = opt.state_dict()["hyper"]["method"]
    tensors = [v for d in state["directions"] for blocks in d.values() for v in blocks]
    tensors += [v for z in state["Z"] for v in z["w"].values()]
    tensors += [v for z in state["Z"] for s in z["s"].values() for v in s.values()]
    return all(torch.isfinite(t).all() for t in tensors)


def _nan_step(opt, m, i, value=float("nan")):
    opt.zero_grad()
    x, y = _batch(i)
    # the NaN enters through a gradient hook, inside the graph (writing p.grad in place after
    # a backward that kept the graph is refused: the graph would not see it)
    w = next(m.parameters())
    mask = torch.zeros_like(w, dtype=torch.bool)
    mask[0, 0] = True
    hook = w.register_hook(lambda g: torch.where(mask, torch.full_like(g, value), g))
    ((m(x) - y) ** 2).mean().backward(create_graph=opt.needs_graph)
    hook.remove()
    assert not torch.isfinite(w.grad[0, 0])
    opt.step()


def test_a_nan_step_is_skipped_and_the_hyper_step_where_it_is_read_out():
    m = _model()
    opt = _make(m, recovery=None)       # (the skip alone; the lr's backoff: test_recovery.py)
    _train(opt, m, 2)
    z_before = copy.deepcopy(opt.state_dict()["hyper"]["method"]["Z"])
    weights = [p.detach().clone() for p in m.parameters()]
    _nan_step(opt, m, 2)                     # the window's last step
    assert opt.skipped_steps == 1
    for a, b in zip(m.parameters(), weights):
        assert torch.equal(a, b)
    z_after = opt.state_dict()["hyper"]["method"]["Z"]
    for za, zb in zip(z_after, z_before):    # a skipped step is the identity for the tangents
        for key in zb["w"]:
            assert torch.equal(za["w"][key], zb["w"][key])
    _train(opt, m, 3, start=3)               # read out at a finite gradient: taken
    assert opt.skipped_hypersteps == 0 and opt.hypersteps == 1
    values = copy.deepcopy(opt.hyperparameters())
    _nan_step(opt, m, 6, float("inf"))       # read out at a non-finite gradient: skipped
    assert opt.skipped_hypersteps == 1 and opt.hypersteps == 2
    for k, v in opt.hyperparameters().items():
        assert torch.equal(flat(v), flat(values[k])), k
    _train(opt, m, 4, start=7)               # and the next windows go on as usual
    assert opt.skipped_hypersteps == 1 and opt.hypersteps == 3
    assert all(torch.isfinite(flat(v)).all() for v in opt.hyperparameters().values())
    assert all(torch.isfinite(flat(v)).all() for v in opt.last_hypergradient().values())
    assert _method_state_finite(opt)


def test_a_nan_validation_loss_skips_the_hyper_step():
    m = _model()
    poisoned = [False]

    def val_loss():
        loss = (m(X) ** 2).mean()
        return loss * float("nan") if poisoned[0] else loss
    opt = _make(m, val_loss=val_loss)
    _train(opt, m, 3)
    values = copy.deepcopy(opt.hyperparameters())
    poisoned[0] = True
    _train(opt, m, 3, start=3)
    assert opt.skipped_hypersteps == 1 and opt.hypersteps == 2
    for k, v in opt.hyperparameters().items():
        assert torch.equal(flat(v), flat(values[k])), k
    poisoned[0] = False
    _train(opt, m, 3, start=6)
    assert opt.skipped_hypersteps == 1
    assert _method_state_finite(opt)


def test_a_scheduler_scale_enters_the_tangents_like_unroll():
    """``ctx.hyper_scale``: the rule reads lr times the scheduler scale, and dE/d(tuned lr)
    includes it; a scale written mid-window must agree with Unroll's recorded scales."""
    case = _case("SGD(momentum=0.9,nesterov,weight_decay=0.01,maximize)")
    prob = mlp()
    runs = [Run(case, prob, "tensor", method=m, update_every=T)
            for m in (Unroll(T), _basis(case, prob, "tensor"))]
    for t in range(2 * T + 1):
        for run in runs:
            if t in (2, T + 1):
                for g in run.opt.param_groups:
                    g["lr"] *= 0.5
            run.step()
    _assert_close(runs[1].opt.last_hypergradient(), runs[0].opt.last_hypergradient(), 1e-10,
                  "with a scheduler scale")


def test_a_param_group_added_mid_window_joins_at_the_next_window():
    torch.manual_seed(0)
    first, second = torch.nn.Linear(5, 8).double(), torch.nn.Linear(8, 2).double()
    opt = HyperOptimizer(torch.optim.SGD, first.parameters(), lr=0.05, momentum=0.9,
                         tune=("lr",), granularity="group", update_every=3,
                         method=ForwardGradient(directions=2))

    def train(steps, start):
        for i in range(start, start + steps):
            x, y = _batch(i)
            opt.zero_grad()
            ((second(torch.tanh(first(x))) - y) ** 2).mean().backward(
                create_graph=opt.needs_graph)
            opt.step()
    train(2, 0)
    opt.add_param_group({"params": list(second.parameters()), "lr": 0.02})
    train(5, 2)             # the rest of window 1, window 2, the read-out of window 2
    assert opt.hypersteps == 2
    last = opt.last_hypergradient()["lr"]
    assert len(last) == 2 and all(torch.isfinite(v) and v != 0 for v in last)


@pytest.mark.parametrize("granularity", ["global", "element"])
@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                         reason="no CUDA device here"))])
def test_step_makes_no_host_synchronisation(device, granularity, monkeypatch):
    """Drawing the directions (on the CPU generator, one copy to the device per window),
    carrying the tangents and the read-out read nothing back from the device."""
    dtype = DTYPE if device == "cpu" else torch.float32
    m = _model().to(device, dtype)
    opt = _make(m, granularity=granularity)
    xs, ys = X.to(device, dtype), Y.to(device, dtype)
    for i in range(7):
        x, y = xs[(i * 8) % 64:(i * 8) % 64 + 8], ys[(i * 8) % 64:(i * 8) % 64 + 8]
        opt.zero_grad()
        ((m(x) - y) ** 2).mean().backward(create_graph=opt.needs_graph)
        if i < 3:          # a first window creates the lazy state
            opt.step()
            continue
        allowed = {id(st["step"]) for st in opt.hyper_optimizer.state.values() if "step" in st}
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            with forbid_host_sync(monkeypatch, allowed):
                opt.step()
        finally:
            if device == "cuda":
                torch.cuda.set_sync_debug_mode(0)
    assert opt.hypersteps == 2 and opt.skipped_hypersteps == 0


@pytest.mark.parametrize("kwargs,match", [
    ({"directions": 0}, "directions"), ({"directions": -2}, "directions"),
    ({"directions": 2.0}, "directions"), ({"directions": True}, "directions"),
    ({"directions": "4"}, "directions"), ({"distribution": "uniform"}, "distribution"),
    ({"distribution": None}, "distribution"), ({"seed": -1}, "seed"),
    ({"seed": 1.5}, "seed")])
def test_bad_options_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ForwardGradient(**kwargs)


def test_defaults_and_repr():
    method = ForwardGradient()
    assert (method.directions, method.distribution, method.seed) == (2, "rademacher", 0)
    assert method.default_update_every == Unroll().default_update_every
    assert repr(method) == "ForwardGradient(directions=2, distribution='rademacher', seed=0)"
    m = _model()
    opt = HyperOptimizer(torch.optim.SGD, m.parameters(), lr=0.05, method=method)
    assert opt.update_every == 10
