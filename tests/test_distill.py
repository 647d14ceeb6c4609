"""HyperDistill (methods/distill.py): the distilled online hypergradient.

* gamma -> 0 is greedy: ``Distill(gamma=1e-12)`` with theta fixed at 1 equals ``Greedy()``
  to 1e-9 (float64) for SGD, Adam, RMSprop and Adagrad, global and element granularity, with
  and without ``val_loss``, dropout included (the replay at ``w*`` redraws the step's masks);
  with ``horizon=1`` the fit is exactly theta = 1;
* a quadratic whose step is ``A = rho I`` (the paper's assumption), one batch: with
  ``gamma = rho`` the fitted theta is 1 and ``h`` equals the full-history float64 reference
  (lr and weight decay) to 1e-8 at every window; with ``gamma != rho`` the fit recovers the
  closed form ``theta = K / sum_{k<K} (gamma/rho)^k``;
* the bias on a small MLP against the exact full-history hypergradient is measured and
  printed, split for plain SGD into the distillation's share (against the reference with
  ``H = 0`` and ``discount=gamma``, which is exactly the model's weighted sum) and the model's;
* the protocol: a closure is required (both wrong loops get an error naming the fix), weights,
  ``p.grad`` and the RNG stream are restored, save/resume mid-window (torch.save,
  weights_only=True) continues in lockstep, NaN gradients (the user's or only the one at
  ``w*``) skip the hyper-step and leave everything finite, Eq. 14's distilled batch, no host
  synchronisation, bad options.

Measured (torch 2.13 CPU, float64): Distill(gamma=1e-12) vs greedy at most 3.1e-12 over every
case above; the quadratic with gamma = rho: theta - 1 below 1e-14 and h against the reference
below 1e-14 (global, tensor, element); the closed-form theta (1.770 at gamma 0.5, 0.7587 at
gamma 0.95, rho 0.8, K 4) to 9e-15.  MLP 4-6-3 over 30 steps (mean over 6 windows of the
normwise relative error against the exact full-history hypergradient, gamma 0.9, K = 5):

    SGD()              distill lr 0.93          greedy 0.94         unroll(5) 0.60
    SGD(momentum=0.9)  distill lr 1.96, mu 0.65 greedy 0.90, 0.95   unroll(5) 0.67, 0.57
    Adam()             distill lr 0.47, b1 3.9  greedy 0.91, 2.4    unroll(5) 0.59, 2.8

(``batch="distilled"`` is worse on lr in all three: 1.48, 2.34, 0.61).  The distillation's own
share, plain SGD against the model's exact weighted sum: 0.0036 on one batch, 1.41 on four
minibatches of 8: one window's value is dominated by the minibatch standing for the history.
"""
from __future__ import annotations

import copy

import pytest
import torch

from problems import SignRule, flat, forbid_host_sync, mlp
from training import SourceRun, _assert_close, _case, _errors

from tiny import X, Y, reloaded, tiny_batch as _batch, tiny_model as _model

from hyperopt_wrap import (CurvatureError, FiniteDifferences, Greedy, HyperOptimizer, Unroll,
                           register_rule)
from hyperopt_wrap.methods.distill import Distill
from hyperopt_wrap.reference import unrolled_hypergradient

F64 = torch.float64
CASES = ["SGD(momentum=0.9,nesterov,weight_decay=0.01,maximize)", "Adam(weight_decay=0.01)",
         "AdamW(weight_decay=0.1,amsgrad,maximize)", "RMSprop(momentum=0.9)",
         "Adagrad(weight_decay=0.01)"]


def Run(case_id, problem, granularity, **options):
    """A run on a float64 problem through closures, the hyperparameters held where they are."""
    return SourceRun(_case(case_id), problem, granularity, "closure", frozen=True, **options)


def _method_state(opt):
    return opt.state_dict()["hyper"]["method"]


# ----------------------------------------------------------------------------- gamma -> 0
@pytest.mark.parametrize("val", [False, True], ids=["next-batch", "val_loss"])
@pytest.mark.parametrize("granularity", ["global", "element"])
@pytest.mark.parametrize("case_id", CASES)
def test_gamma_to_zero_is_greedy(case_id, granularity, val):
    """p_t -> 0 puts x* at the step's own point, c_t -> 1: theta = 1 gives greedy (without
    val_loss greedy averages every step of a window: ``read_every_step=True``)."""
    runs = [Run(case_id, mlp(), granularity, method=m, update_every=3)
            for m in (Distill(gamma=1e-12, refit_every=None, read_every_step=True), Greedy())]
    if val:
        for r in runs:
            r.opt.val_loss = lambda r=r: r.val_objective(r.weights)
    for _ in range(9 if val else 10):      # without val_loss a window is read out next step
        hs = []
        for r in runs:
            r.step()
            hs.append(r.opt.last_hypergradient())
        if runs[1].opt.hypersteps:
            _assert_close(hs[0], hs[1], 1e-9, "Distill(gamma=1e-12) vs greedy")
    assert runs[0].opt.hypersteps == runs[1].opt.hypersteps == 3


@pytest.mark.parametrize("case_id", CASES[:2])
def test_without_val_loss_a_window_is_read_once(case_id):
    """The default reads a window once, at its last step, against the next step's training
    gradient: at gamma -> 0 that is greedy's value of that one step (greedy read every step,
    the trajectories held equal at hyper_lr 0), at one extra closure call per window."""
    K = 3
    runs = [Run(case_id, mlp(), "global", method=m, update_every=u)
            for m, u in ((Distill(gamma=1e-12, refit_every=None), K), (Greedy(), 1))]
    calls = [0]
    closure_of = runs[0].opt.step

    def counting(closure=None):
        def counted():
            calls[0] += 1
            return closure()
        return closure_of(counted)
    runs[0].opt.step = counting
    steps = 4 * K
    for t in range(steps):
        for r in runs:
            r.step()
        if t >= K and t % K == 0:      # window (t // K - 1) read out in this step() call
            _assert_close(runs[0].opt.last_hypergradient(), runs[1].opt.last_hypergradient(),
                          1e-9, "one readout a window vs greedy's value of that step")
    assert runs[0].opt.hypersteps == steps // K - 1     # the last window's readout is to come
    assert calls[0] == steps + steps // K        # the user's call, and one at w* a window


def test_gamma_to_zero_with_a_one_step_fit_is_greedy_and_theta_one():
    runs = [Run("SGD(momentum=0.9,nesterov,weight_decay=0.01,maximize)", mlp(), "group",
                method=m, update_every=2) for m in (Distill(gamma=1e-12, horizon=1,
                                                            refit_every=1,
                                                            read_every_step=True), Greedy())]
    for _ in range(7):
        for r in runs:
            r.step()
    _assert_close(runs[0].opt.last_hypergradient(), runs[1].opt.last_hypergradient(), 1e-9,
                  "Distill(gamma=1e-12, horizon=1) vs greedy")
    st = _method_state(runs[0].opt)
    assert st["fits"] == 3
    for kind, theta in st["theta"].items():
        assert abs(float(theta) - 1) < 1e-12, (kind, float(theta))


def test_a_user_rule_without_closed_forms_is_greedy_at_gamma_zero():
    """A registered rule with neither ``step_`` nor ``jvp`` (sign SGD): the tangent at w* comes
    from forward mode through its ``update``."""
    class SignSGD(torch.optim.SGD):
        pass
    register_rule(SignSGD, SignRule())
    hs = []
    for method in (Distill(gamma=1e-12, refit_every=None, read_every_step=True), Greedy()):
        m = _model()
        opt = HyperOptimizer(SignSGD, m.parameters(), lr=0.01, method=method, update_every=2,
                             hyper_lr=0.0)
        _train(opt, m, 6)
        hs.append(opt.last_hypergradient())
    _assert_close(hs[0], hs[1], 1e-9, "sign SGD")


def test_a_scheduler_scale_enters_like_greedy():
    """group["lr"] is a scale on the tuned lr: the tangent at w* is taken w.r.t. the tuned
    value, as greedy's."""
    runs = [Run("SGD(momentum=0.9)", mlp(), "global", method=m, update_every=2)
            for m in (Distill(gamma=1e-12, refit_every=None, read_every_step=True), Greedy())]
    for t in range(8):
        if t == 3:
            for r in runs:
                for g in r.opt.param_groups:
                    g["lr"] *= 0.5
        for r in runs:
            r.step()
    _assert_close(runs[0].opt.last_hypergradient(), runs[1].opt.last_hypergradient(), 1e-9,
                  "with a scheduler scale")


def test_dropout_is_replayed_at_the_distilled_weights():
    """The gradient at w* sees the step's own dropout masks (torch's RNG as the closure started
    it): at gamma -> 0 it is the step's gradient, so Distill equals greedy; the user's RNG
    stream after step() is the one the closure alone leaves."""
    results = []
    for method in (Distill(gamma=1e-12, refit_every=None), Greedy()):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(),
                                    torch.nn.Dropout(0.5), torch.nn.Linear(16, 2)).double()
        opt = HyperOptimizer(torch.optim.SGD, model.parameters(), lr=0.05, momentum=0.9,
                             tune=("lr", "momentum"), method=method, update_every=1,
                             hyper_lr=0.0)
        x = torch.randn(32, 5, generator=torch.Generator().manual_seed(1), dtype=F64)
        y = torch.randn(32, 2, generator=torch.Generator().manual_seed(2), dtype=F64)
        hs, states = [], []
        for _ in range(5):
            def closure():
                opt.zero_grad()
                loss = ((model(x) - y) ** 2).mean()
                loss.backward()
                return loss
            opt.step(closure)
            hs.append(opt.last_hypergradient())
            states.append(torch.get_rng_state())
        results.append((hs, states))
    (h1, s1), (h2, s2) = results
    for a, b in zip(h1[2:], h2[2:]):      # (dE/dmomentum is 0 until a buffer exists)
        _assert_close(a, b, 1e-9, "with dropout")
    assert all(torch.equal(a, b) for a, b in zip(s1, s2))


# ----------------------------------------------------------------------------- the quadratic
def _quadratic(a=2.0, seed=5):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(3, 2), (4,)]
    w0 = [torch.randn(s, generator=gen, dtype=F64) for s in shapes]
    centre = [torch.randn(s, generator=gen, dtype=F64) for s in shapes]
    target = [torch.randn(s, generator=gen, dtype=F64) for s in shapes]

    def loss_fn(ws, batch):            # Hessian a I: SGD's step is A = (1 - lr (a + wd)) I
        return 0.5 * a * sum(((w - c) ** 2).sum() for w, c in zip(ws, batch))

    def meta(ws):
        return 0.5 * sum(((w - t) ** 2).sum() for w, t in zip(ws, target))

    return w0, centre, loss_fn, meta


def _run_quadratic(method, tune, lr, wd, windows, K, granularity="global"):
    w0, centre, loss_fn, meta = _quadratic()
    weights = [w.clone().requires_grad_() for w in w0]
    kw = {"weight_decay": wd} if wd else {}
    opt = HyperOptimizer(torch.optim.SGD, weights, lr=lr, tune=tune, method=method,
                         granularity=granularity, update_every=K, hyper_lr=0.0,
                         val_loss=lambda: meta(weights),
                         curvature=FiniteDifferences(rel_eps=1e-3), **kw)
    used = opt.hyperparameters()
    out = []
    for n in range(1, windows * K + 1):
        def closure():
            opt.zero_grad()
            loss = loss_fn(weights, centre)
            loss.backward()
            return loss
        opt.step(closure)
        if n % K == 0:
            expected = unrolled_hypergradient(torch.optim.SGD, w0, loss_fn, [centre] * n, meta,
                                              tune=tune, granularity=granularity,
                                              hyper_values=used, lr=lr, **kw)
            out.append((opt.last_hypergradient(), expected,
                        {k: float(v) for k, v in _method_state(opt)["theta"].items()}))
    return out


@pytest.mark.parametrize("granularity", ["global", "tensor", "element"])
def test_quadratic_gamma_equal_to_the_contraction_is_exact(granularity):
    """A = rho I and gamma = rho: the model is exact (theta = 1) and, the gradient being affine
    in w on one batch, so is the distilled point: h is the full-history hypergradient."""
    lr, wd, a, K = 0.1, 0.1, 2.0, 4
    rho = 1 - lr * (a + wd)
    out = _run_quadratic(Distill(gamma=rho, horizon=K, refit_every=1),
                         ("lr", "weight_decay"), lr, wd, windows=3, K=K,
                         granularity=granularity)
    for got, expected, theta in out:
        assert all(abs(v - 1) < 1e-10 for v in theta.values()), theta
        _assert_close(got, expected, 1e-8, "distilled h vs the full-history reference")
    errs = [max(_errors(g, e).values()) for g, e, _ in out]
    print(f"quadratic, gamma = rho = {rho:.3g}, {granularity}: max relative error of h "
          f"{max(errs):.2g}, of theta {max(abs(v - 1) for _, _, t in out for v in t.values()):.2g}")


@pytest.mark.parametrize("granularity", ["global", "element"])
@pytest.mark.parametrize("gamma", [0.5, 0.95])
def test_quadratic_fit_recovers_the_known_scale(gamma, granularity):
    """A = rho I, gamma != rho: on one batch the gradients are d_j = rho^j d_0, so the exact
    K-step value over the model's is the closed form K / sum_{k<K} (gamma/rho)^k, in every
    slot (element granularity: every element's ratio is the same)."""
    lr, a, K = 0.1, 2.0, 4
    rho = 1 - lr * a
    expected = K / sum((gamma / rho) ** k for k in range(K))
    out = _run_quadratic(Distill(gamma=gamma, horizon=K, refit_every=1), ("lr",), lr, 0.0,
                         windows=2, K=K, granularity=granularity)
    for _, _, theta in out:
        assert abs(theta["lr"] - expected) <= 1e-8 * expected, (theta, expected)


# ----------------------------------------------------------------------------- the bias
STEPS_BIAS, GAMMA_BIAS, K_BIAS = 30, 0.9, 5


def _windows_vs_reference(case_id, methods, problem, **ref):
    """The methods in lockstep on one trajectory (the hyperparameters are held, so it is the
    same for all), each window's hypergradient (val_loss) against the exact value over the
    whole history so far; returns, per method and kind, the errors of the windows."""
    runs = [Run(case_id, problem(), "global", method=m, update_every=K_BIAS) for m in methods]
    for r in runs:
        r.opt.val_loss = lambda r=r: r.val_objective(r.weights)
    snapshot, used = runs[0].snapshot(), runs[0].opt.hyperparameters()
    errors = [{} for _ in methods]
    for n in range(1, STEPS_BIAS + 1):
        for r in runs:
            r.step()
        if n % K_BIAS == 0:
            exact = runs[0].reference(snapshot, [runs[0].problem.batch(t) for t in range(n)],
                                      runs[0].val_meta, used, **ref)
            for r, errs in zip(runs, errors):
                h = r.opt.last_hypergradient()
                assert all(torch.isfinite(flat(v)).all() for v in h.values())
                for k, e in _errors(h, exact).items():
                    errs.setdefault(k, []).append(e)
    return errors


def _summary(name, errs):
    return f"{name}: " + ", ".join(f"{k} {sum(v) / len(v):.3g}" for k, v in errs.items())


@pytest.mark.parametrize("case_id", ["SGD()", "SGD(momentum=0.9)", "Adam()"])
def test_bias_against_the_exact_hypergradient_on_an_mlp(case_id):
    """Measured: the mean over 6 windows (5 steps each, 30 in all) of the normwise relative
    error of the window's hypergradient against the exact full-history value, float64 MLP
    4-6-3 on 4 minibatches of 8, gamma 0.9, K = 5, refit every window; greedy and Unroll(5) on
    the same trajectory for comparison.  One window's value mixes bias and minibatch noise."""
    methods = [Distill(gamma=GAMMA_BIAS, horizon=K_BIAS, refit_every=1),
               Distill(gamma=GAMMA_BIAS, horizon=K_BIAS, refit_every=1, batch="distilled"),
               Greedy(), Unroll(K_BIAS)]
    names = ["distill", "distill(batch=distilled)", "greedy", "unroll(5)"]
    errors = _windows_vs_reference(case_id, methods, mlp)
    print(f"{case_id}, mean relative error over windows: "
          + "; ".join(_summary(n, e) for n, e in zip(names, errors)))
    assert all(sum(v) / len(v) < 20 for v in errors[0].values()), errors[0]


def test_the_distillation_share_of_the_bias():
    """Plain SGD, where the model's sum_s gamma^(t-s) B_s is exactly the reference with H = 0
    and discount gamma: the distillation's own error (theta = 1) is small on one batch (the
    curvature between the averaged points only) and large on minibatches (one batch stands for
    the history's: one sample of a minibatch noise that a window of no-val_loss contributions
    averages)."""
    distill = Distill(gamma=GAMMA_BIAS, refit_every=None)
    one = _windows_vs_reference("SGD()", [distill], lambda: mlp(n_batches=1),
                                second_order=False, discount=GAMMA_BIAS)[0]["lr"]
    four = _windows_vs_reference("SGD()", [distill], mlp,
                                 second_order=False, discount=GAMMA_BIAS)[0]["lr"]
    print(f"distillation alone, SGD: one batch {sum(one) / len(one):.3g} (max {max(one):.3g}), "
          f"4 minibatches {sum(four) / len(four):.3g}")
    assert max(one) < 0.02
# ----------------------------------------------------------------------------- the protocol
def _train(opt, model, steps, start=0, nan_at=None, log=None):
    """Closure steps; ``nan_at = {step: call}`` puts a NaN into the gradient of that closure
    call within the step (0: the user's, 1: the replay at w*)."""
    for i in range(start, start + steps):
        x, y = _batch(i)
        calls = [0]

        def closure(x=x, y=y, i=i, calls=calls):
            opt.zero_grad()
            loss = ((model(x) - y) ** 2).mean()
            hook = None
            if nan_at is not None and nan_at.get(i) == calls[0]:
                # the NaN comes out of backward itself (a gradient hook), as a real one does: a
                # closure that writes p.grad after its backward is refused on recorded steps
                w = next(model.parameters())
                hook = w.register_hook(lambda g: g.index_put((torch.tensor([0]),
                                                              torch.tensor([0])),
                                                             torch.tensor(float("nan"),
                                                                          dtype=g.dtype)))
            loss.backward()
            if hook is not None:
                hook.remove()
                assert torch.isnan(next(model.parameters()).grad[0, 0])
            if log is not None:
                log.append((i, calls[0]))
            calls[0] += 1
            return loss
        opt.step(closure)


def _make(model, method=None, **kw):
    kw.setdefault("update_every", 3)
    kw.setdefault("tune", ("lr", "momentum", "weight_decay"))
    return HyperOptimizer(torch.optim.SGD, model.parameters(), lr=0.05, momentum=0.9,
                          weight_decay=1e-3,
                          method=method or Distill(gamma=0.9, horizon=2, refit_every=2), **kw)


def _all_finite(opt) -> bool:
    st = _method_state(opt)
    tensors = list(st["theta"].values()) + list(st["w"].values())
    tensors += [v for s in st["s"].values() for v in s.values()]
    if st["pending"] is not None:
        tensors += [b for per in st["pending"]["B"].values() for b in per.values()]
    tensors += [flat(v) for v in opt.last_hypergradient().values()]
    tensors += [flat(v) for k, v in opt.hyperparameters().items() if k in opt.tuned]
    return all(torch.isfinite(t).all() for t in tensors)


def test_a_closure_is_required_and_the_errors_name_the_fix():
    m = _model()
    opt = _make(m)
    ((m(X[:8]) - Y[:8]) ** 2).mean().backward()
    with pytest.raises(CurvatureError, match="closure"):      # no source at all
        opt.step()
    m = _model()
    opt = _make(m)
    assert not opt.needs_graph      # Distill needs the closure: the idiom builds no graph ...
    ((m(X[:8]) - Y[:8]) ** 2).mean().backward(create_graph=True)
    with pytest.raises(CurvatureError, match="closure"):   # ... and a graph cannot serve
        opt.step()
    m = _model()
    opt = _make(m, curvature="closure")
    assert not opt.needs_graph
    _train(opt, m, 4)
    assert opt.hypersteps == 1 and _all_finite(opt)


def test_weights_grads_and_the_rng_stream_are_restored():
    m = _model()
    opt = _make(m, method=Distill(gamma=0.9, refit_every=None), update_every=1)
    _train(opt, m, 2)
    x, y = _batch(2)
    seen = {}

    def closure():
        opt.zero_grad()
        loss = ((m(x) - y) ** 2).mean() + 0 * torch.rand(())
        loss.backward()
        if not seen:
            seen["grads"] = [p.grad for p in m.parameters()]
            seen["values"] = [p.grad.clone() for p in m.parameters()]
            seen["rng"] = torch.get_rng_state()
            seen["weights"] = [p.detach().clone() for p in m.parameters()]
        return loss
    ptrs = [p.data_ptr() for p in m.parameters()]
    torch.manual_seed(7)
    opt.step(closure)
    assert [p.data_ptr() for p in m.parameters()] == ptrs     # updated in place, as torch
    assert torch.equal(torch.get_rng_state(), seen["rng"])     # one draw, as without Distill
    for p, g, v in zip(m.parameters(), seen["grads"], seen["values"]):
        assert p.grad is g and torch.equal(p.grad, v)
    st = _method_state(opt)
    assert any(not torch.equal(st["w"][0, i], w.to(st["w"][0, i].dtype))
               for i, w in enumerate(seen["weights"]))         # w* is not w_t: a real swap


def test_the_base_step_is_torchs():
    """The replays at w* and the refits leave the step itself alone: with the hyperparameters
    held it is torch.optim.SGD's, bit for bit."""
    m1, m2 = _model(), _model()
    opt = _make(m1, method=Distill(gamma=0.9, horizon=2, refit_every=1), hyper_lr=0.0)
    ref = torch.optim.SGD(m2.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    _train(opt, m1, 8)
    _train(ref, m2, 8)
    assert _method_state(opt)["fits"] == 2
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))


def test_deepcopy_and_a_shared_method_object():
    method = Distill(gamma=0.9, horizon=2, refit_every=1, batch="distilled")
    m1, m2 = _model(), _model()
    o1, o2 = _make(m1, method=method), _make(m2, method=method)
    _train(o1, m1, 5)
    _train(o2, m2, 5)
    assert torch.equal(flat(o1.last_hypergradient()["lr"]), flat(o2.last_hypergradient()["lr"]))
    assert o1._method_state["kept"].source is not None
    m3, o3 = copy.deepcopy((m1, o1))        # the kept closure is dropped, not copied
    assert o3._method_state["kept"].source is None
    assert list(o3.param_groups[0]["params"])[0] is next(m3.parameters())
    _train(o3, m3, 4, start=5)
    assert o3.hypersteps == o1.hypersteps + 1 and _all_finite(o3)


@pytest.mark.parametrize("batch", ["current", "distilled"])
def test_resume_mid_window_runs_in_lockstep(batch):
    """The distilled state survives torch.save / torch.load(weights_only=True).  One step into
    a window nothing is recorded yet (horizon 2 of 3), so the resumed run continues the window
    and runs bit for bit with an uninterrupted one (through a refit window).  With
    batch="distilled" the kept closure of the distilled point cannot be saved, so the original
    is reloaded too and the two continue bit for bit."""
    method = Distill(gamma=0.9, horizon=2, refit_every=2, batch=batch)
    m0 = _model()
    o0 = _make(m0, method=method)
    _train(o0, m0, 16)
    m1 = _model()
    o1 = _make(m1, method=method)
    _train(o1, m1, 7)             # mid-window (update_every=3), after a refit
    assert _method_state(o1)["fits"] == 1 and not o1.tape
    m2, o2, saved = reloaded(m1, o1, lambda m: _make(m, method=method))
    if batch == "distilled":
        o1.load_state_dict(copy.deepcopy(saved["opt"]))
    s1, s2 = _method_state(o1), _method_state(o2)
    assert torch.equal(s1["t"], s2["t"]) and s1["t"] == 7
    assert all(torch.equal(s1["w"][k], s2["w"][k]) for k in s1["w"])
    _train(o1, m1, 9, start=7)
    _train(o2, m2, 9, start=7)
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    h1, h2 = o1.hyperparameters(), o2.hyperparameters()
    for k in o1.tuned:
        assert torch.equal(flat(h1[k]), flat(h2[k])), k
    s1, s2, s0 = _method_state(o1), _method_state(o2), _method_state(o0)
    assert s1["fits"] == s2["fits"] == s0["fits"] >= 2
    assert all(torch.equal(s1["theta"][k], s2["theta"][k]) for k in s1["theta"])
    assert o1.hypersteps == o2.hypersteps == o0.hypersteps
    if batch == "current":
        for a, b in zip(m0.parameters(), m2.parameters()):
            assert torch.equal(a, b)


def test_a_nan_gradient_skips_the_hyper_step_and_leaves_everything_finite():
    m = _model()
    opt = _make(m)
    _train(opt, m, 4)
    before = _method_state(opt)
    _train(opt, m, 1, start=4, nan_at={4: 0})           # the user's gradient, mid-window
    assert opt.skipped_steps == 1
    after = _method_state(opt)
    assert torch.equal(after["t"], before["t"])          # a skipped step is not distilled
    assert all(torch.equal(after["w"][k], before["w"][k]) for k in before["w"])
    _train(opt, m, 2, start=5)     # the identity: window 1's readout (step 5, against step
    assert opt.skipped_hypersteps == 0 and opt.hypersteps == 2     # 6's gradient) is taken
    _train(opt, m, 2, start=7)
    _train(opt, m, 1, start=9, nan_at={9: 0})           # the gradient window 2 is read against
    assert opt.skipped_hypersteps == 1 and opt.hypersteps == 3
    assert _all_finite(opt)


def test_a_nan_gradient_at_the_distilled_weights_skips_the_hyper_step():
    m = _model()
    opt = _make(m)
    _train(opt, m, 5)
    _train(opt, m, 1, start=5, nan_at={5: 1})           # only the replay at w* (window 1's)
    assert opt.skipped_steps == 0
    _train(opt, m, 4, start=6)                          # read out at step 6: window 1 skips
    assert opt.skipped_hypersteps == 1 and opt.hypersteps == 3
    assert _all_finite(opt)


def test_a_nan_in_a_refit_window_keeps_theta():
    m = _model()
    opt = _make(m)
    _train(opt, m, 4)             # window 0 fitted theta (refit_every=2: windows 0, 2, ...)
    theta = {k: v.clone() for k, v in _method_state(opt)["theta"].items()}
    assert all(float(v) != 1.0 for v in theta.values())
    _train(opt, m, 3, start=4)
    _train(opt, m, 2, start=7, nan_at={8: 0})          # a recorded step of refit window 2
    _train(opt, m, 2, start=9)
    st = _method_state(opt)
    assert st["fits"] == 2
    assert all(torch.equal(st["theta"][k], theta[k]) for k in theta)
    assert _all_finite(opt)


def test_the_distilled_batch_keeps_earlier_closures():
    """Eq. 14: the replay at w* uses an earlier step's closure with probability p_t; its batch
    is checked once to be bound (a closure that captures the loop's batch is caught)."""
    m = _model()
    opt = _make(m, method=Distill(gamma=0.9, refit_every=None, batch="distilled"))
    log = []
    _train(opt, m, 30, log=log)
    replays = {}
    for i, call in log:          # (the bound step, the call within the step it ran in)
        replays.setdefault(i, 0)
        replays[i] += 1
    reused = sum(n - 2 for n in replays.values() if n > 2)   # user call + its own replay
    assert 5 < reused < 30, replays
    st = _method_state(opt)     # drawn on every step (a window's reads only: 10 draws)
    assert st["draws"] == 30 == int(st["t"]), (st["draws"], st["t"])
    assert _all_finite(opt)

    m = _model()
    opt = _make(m, method=Distill(gamma=0.9, refit_every=None, batch="distilled"))
    state = {"i": 0}

    def unbound():                       # reads the newest batch, whatever step it came from
        opt.zero_grad()
        x, y = _batch(state["i"])
        loss = ((m(x) - y) ** 2).mean()
        loss.backward()
        return loss
    with pytest.raises(CurvatureError, match="bind the batch"):
        for i in range(30):
            state["i"] = i
            opt.step(unbound)


@pytest.mark.parametrize("fused", [False, True], ids=["lr+mom+wd", "lr only: fused steps"])
@pytest.mark.parametrize("val", [False, True], ids=["next-batch", "val_loss"])
def test_step_makes_no_host_synchronisation(monkeypatch, val, fused):
    """Readouts, refit windows and (with the lr the only tuned kind) the steps between
    readouts on torch's fused kernel (tests/test_fused_step.py) make no host synchronisation."""
    from hyperopt_wrap.stepper import Stepper
    m = _model()
    kw = dict(val_loss=lambda: ((m(X) - Y) ** 2).mean()) if val else {}
    if fused:
        kw.update(tune=("lr",), update_every=3)
    opt = _make(m, method=Distill(gamma=0.9, horizon=2, refit_every=2 if fused else 1), **kw)
    _train(opt, m, 4)
    calls = []
    original = Stepper.step_fused
    monkeypatch.setattr(Stepper, "step_fused",
                        lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    for i in range(4, 16 if fused else 10):       # through refit windows and readouts
        allowed = {id(s["step"]) for s in opt.hyper_optimizer.state.values() if "step" in s}
        x, y = _batch(i)

        def closure(x=x, y=y):
            opt.zero_grad()
            loss = ((m(x) - y) ** 2).mean()
            loss.backward()
            return loss
        with forbid_host_sync(monkeypatch, allowed):
            opt.step(closure)
    assert bool(calls) == fused          # tuned momentum and weight decay: never fused
    assert _method_state(opt)["fits"] >= (2 if fused else 3) and _all_finite(opt)


def test_it_tunes_a_small_network():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(),
                                torch.nn.Linear(16, 3)).double()
    centres = torch.randn(3, 5, generator=torch.Generator().manual_seed(1), dtype=F64) * 2
    gen = torch.Generator().manual_seed(2)
    opt = HyperOptimizer(torch.optim.SGD, model.parameters(), lr=0.02, momentum=0.5,
                         tune=("lr", "momentum"), method=Distill(refit_every=2))
    assert opt.update_every == 10
    losses = []
    for _ in range(60):
        y = torch.randint(0, 3, (16,), generator=gen)
        x = centres[y] + torch.randn(16, 5, generator=gen, dtype=F64)

        def closure(x=x, y=y):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss
        losses.append(float(opt.step(closure).detach()))
    st = _method_state(opt)
    assert opt.hypersteps == 5 and opt.skipped_hypersteps == 0 and st["fits"] == 3
    assert float(opt.hyperparameters()["lr"][0]) != 0.02
    assert sum(losses[-10:]) < sum(losses[:10]) and _all_finite(opt)


def test_horizon_longer_than_the_window_is_refused():
    m = _model()
    with pytest.raises(ValueError, match="update_every >= 5"):
        _make(m, method=Distill(horizon=5))
    _make(m, method=Distill(horizon=5, refit_every=None))


@pytest.mark.parametrize("kwargs,match", [
    ({"gamma": 0}, "gamma"), ({"gamma": 1}, "gamma"), ({"gamma": 1.5}, "gamma"),
    ({"gamma": -0.1}, "gamma"), ({"gamma": True}, "gamma"), ({"gamma": float("nan")}, "gamma"),
    ({"gamma": "0.9"}, "gamma"), ({"refit_every": 0}, "refit_every"),
    ({"refit_every": 2.0}, "refit_every"), ({"refit_every": True}, "refit_every"),
    ({"horizon": 0}, "horizon"), ({"horizon": 3.0}, "horizon"),
    ({"theta": float("inf")}, "theta"), ({"theta": "1"}, "theta"),
    ({"theta_memory": 1.0}, "theta_memory"), ({"theta_memory": -0.1}, "theta_memory"),
    ({"shared_theta": 1}, "shared_theta"), ({"batch": "past"}, "batch"),
    ({"seed": 1.5}, "seed"), ({"read_every_step": 1}, "read_every_step")])
def test_bad_options_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Distill(**kwargs)


def test_defaults_and_repr():
    d = Distill()
    assert (d.gamma, d.refit_every, d.horizon, d.theta, d.theta_memory, d.batch,
            d.read_every_step) == (0.99, 50, 10, 1.0, 0.9, "current", False)
    assert d.default_update_every == 10 and "gamma=0.99" in repr(d)


@pytest.mark.parametrize("memory", [0.0, 0.9])
def test_theta_is_the_least_squares_over_the_fits(memory):
    """theta_memory 0: the latest fit alone, <x, y> / <x, x>; else the discounted pool."""
    m = _model()
    opt = _make(m, method=Distill(gamma=0.9, horizon=2, refit_every=1, theta_memory=memory))
    _train(opt, m, 10)
    st = _method_state(opt)
    assert st["fits"] == 3
    for kind, theta in st["theta"].items():
        last = st["last_fit"][kind]
        alone = float(last["xy"] / last["xx"])
        sxy, sxx = st["fit_sums"][kind]
        assert abs(float(theta) - float(sxy / sxx)) <= 1e-12 * abs(float(theta))
        if memory == 0:
            assert abs(float(theta) - alone) <= 1e-12 * abs(alone)
        else:
            assert float(theta) != alone


def test_shared_theta_is_one_value_for_every_kind():
    m = _model()
    opt = _make(m, method=Distill(gamma=0.9, horizon=2, refit_every=1, shared_theta=True))
    _train(opt, m, 7)
    thetas = list(_method_state(opt)["theta"].values())
    assert all(torch.equal(t, thetas[0]) for t in thetas) and float(thetas[0]) != 1.0
