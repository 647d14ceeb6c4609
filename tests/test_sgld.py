"""SGLD (Langevin inner sampling, pathwise hypergradients along the chain).

* temperature 0: no noise at all, and the recurrence is RTRL's with the same approximation:
  the first-order default equals ``RTRL(hessian_free=True, discount=0.9)`` bit for bit and the
  reference with ``H = 0`` and the same discount (1e-10, float64), at every granularity; the
  exact variant equals the full reference (graph 1e-8, closure 1e-6); without ``val_loss`` the
  window's per-step samples average to the mean of the references over each horizon;
* a Gaussian toy, ``L = 0.5 a |w - c|^2`` with full-batch gradients (the chain is a linear
  Gaussian process) and ``E = 0.5 |w - d|^2``: the chain-averaged estimate of the exact variant
  matches the analytic derivative of the stationary expectation, discretisation included,
  within its Monte-Carlo error (SGD: closed form; SGD with momentum and dampening: a discrete
  Lyapunov equation differentiated by autograd); the first-order default matches its own
  analytic (biased) mean, and its bias is measured; the noise scale targets ``exp(-L / tau)``;
* with the noise on, the exact variant is the derivative of the seeded chain (central
  differences, SGD cases, two groups); the noise is ``sqrt(2 tau c) xi`` for every rule;
* the optimizer's generator: resume mid-run bit-exact (torch.save / weights_only=True);
  both curvature sources agree with the noise on; a NaN gradient skips the hyper-step and
  leaves everything finite; no host synchronisation in ``step()``; bad options.

Each toy coordinate is an independent chain (isotropic quadratic, element granularity): the
standard error is the spread of the per-coordinate chain averages around their analytic values
over sqrt(#coordinates).
"""
from __future__ import annotations

import math

import pytest
import torch

from problems import flat, forbid_host_sync, mlp, rel_err
from training import SourceRun, _assert_close, _case, _groups

from tiny import X, Y, reloaded, tiny_model as _model, train as _train

from hyperopt_wrap import RTRL, FiniteDifferences, HyperOptimizer
from hyperopt_wrap.methods.sgld import SGLD
from hyperopt_wrap.reference import unrolled_hypergradient

STEPS = 12
CASES = ["SGD(momentum=0.9,nesterov,weight_decay=0.01,maximize)", "Adam(weight_decay=0.01)",
         "RMSprop(momentum=0.9)", "Adagrad(weight_decay=0.01)"]
F64 = torch.float64


class Run(SourceRun):
    """A run on a float64 problem with the hyperparameters held where they are; ``"closure"``
    takes central differences."""

    def __init__(self, case_id, problem, granularity, source="graph", **options):
        super().__init__(_case(case_id), problem, granularity,
                         "central" if source == "closure" else source, frozen=True, **options)

    def reference_from(self, snapshot, steps, meta_loss, used, **options):
        weights, states = snapshot
        return unrolled_hypergradient(
            self.case.cls, _groups(self.case, self.problem, weights), self.f,
            [self.problem.batch(t) for t in range(steps)], meta_loss, tune=self.case.tunable,
            granularity=self.granularity, hyper_values=used, states=states, **options,
            **self.case.kwargs)


def _one_window(case_id, method, granularity="global", source="graph"):
    """One window of STEPS steps read out on the validation loss at its end."""
    run = Run(case_id, mlp(), granularity, source, method=method, update_every=STEPS)
    run.opt.val_loss = lambda: run.val_objective(run.weights)
    snapshot, used = run.snapshot(), run.opt.hyperparameters()
    for _ in range(STEPS):
        run.step()
    assert run.opt.hypersteps == 1
    return run, snapshot, used


# ----------------------------------------------------------------------------- temperature 0
@pytest.mark.parametrize("granularity", ["global", "tensor", "element"])
@pytest.mark.parametrize("case_id", CASES)
def test_temperature_zero_is_the_first_order_recurrence(case_id, granularity):
    run, snapshot, used = _one_window(case_id, SGLD(temperature=0.0), granularity)
    twin, _, _ = _one_window(case_id, RTRL(hessian_free=True, discount=0.9,
                                           per_kind_elements=True), granularity)
    got = run.opt.last_hypergradient()
    for kind, entries in twin.opt.last_hypergradient().items():
        assert torch.equal(flat(got[kind]), flat(entries)), kind
    for a, b in zip(run.weights, twin.weights):       # no noise at all
        assert torch.equal(a, b)
    expected = run.reference_from(snapshot, STEPS, run.val_meta, used, second_order=False,
                                  discount=0.9)
    _assert_close(got, expected, 1e-10, "SGLD(temperature=0) vs reference(H=0, discount=0.9)")


@pytest.mark.parametrize("source,rtol", [("graph", 1e-8), ("closure", 1e-6)])
@pytest.mark.parametrize("case_id", CASES[:2])
def test_temperature_zero_exact_variant_is_the_full_reference(case_id, source, rtol):
    method = SGLD(temperature=0.0, hessian_free=False, discount=1.0)
    run, snapshot, used = _one_window(case_id, method, "group", source)
    expected = run.reference_from(snapshot, STEPS, run.val_meta, used)
    _assert_close(run.opt.last_hypergradient(), expected, rtol,
                  f"SGLD(temperature=0, hessian_free=False), {source}")


def test_without_val_loss_every_step_is_a_sample_of_the_window_average():
    """E is the next minibatch's loss: the window's T samples ``grad L_t(w_t) . Z_t`` (t = 1..T)
    are averaged by the hyper-step, i.e. the mean of the T references of horizon t."""
    case_id, window = "SGD(momentum=0.9,nesterov,weight_decay=0.01,maximize)", 5
    run = Run(case_id, mlp(), "global", method=SGLD(temperature=0.0), update_every=window)
    snapshot, used = run.snapshot(), run.opt.hyperparameters()
    for _ in range(window + 1):        # the last call reads step `window` out and steps
        run.step()
    assert run.opt.hypersteps == 1
    refs = [run.reference_from(snapshot, t, run.next_batch_meta(t), used, second_order=False,
                               discount=0.9) for t in range(1, window + 1)]
    mean = {k: [sum(r[k][gi] for r in refs) / window for gi in range(len(refs[0][k]))]
            for k in refs[0]}
    _assert_close(run.opt.last_hypergradient(), mean, 1e-10, "per-step samples, averaged")


# ----------------------------------------------------------------------------- with noise, exact
def _chain_objective(case, perturb, tau, steps, seed):
    """E(w_T) (with the maximize sign) after ``steps`` SGLD steps from the problem's initial
    weights, the noise path fixed by ``seed``, param group ``gi``'s ``kind`` moved by ``h`` for
    each ``(kind, gi, h)`` in ``perturb``."""
    problem = mlp()
    weights = problem.weights()
    groups = _groups(case, problem, weights)
    for g in groups:
        g.update({k: v for k, v in case.kwargs.items() if k != "lr"})
    for kind, gi, h in perturb:
        groups[gi][kind] += h
    kwargs = {k: v for k, v in case.kwargs.items() if k != "lr"}
    opt = HyperOptimizer(case.cls, groups, method=SGLD(temperature=tau, seed=seed),
                         hyper_lr=0.0, update_every=10 ** 6, **kwargs)
    f = lambda w, b: -problem.loss_fn(w, b) if case.maximize else problem.loss_fn(w, b)
    for t in range(steps):
        opt.zero_grad()
        f(weights, problem.batch(t)).backward()
        opt.step()
    with torch.no_grad():
        return (-1.0 if case.maximize else 1.0) * f(weights, problem.val_batch)


@pytest.mark.parametrize("granularity", ["global", "group"])
@pytest.mark.parametrize("case_id", ["SGD(momentum=0.8,dampening=0.2,weight_decay=0.01,maximize)",
                                     "SGD(momentum=0.9,nesterov,weight_decay=0.01,maximize)"])
def test_exact_variant_is_the_pathwise_derivative_with_noise(case_id, granularity):
    """With the noise path held fixed (same seed) the chain is a smooth function of the
    hyperparameters; with the Hessian and no discount the recurrence, noise tangents
    ``n / (2 lr)`` and ``n / (2 (1 - mu))`` included, is its exact derivative: checked against
    central differences of E(w_T) over each tuned value (float64; two param groups whose
    global lr keeps a ratio of 0.5, which enters as the scale of the lr tangent)."""
    tau, seed, steps = 1e-3, 11, STEPS
    run = Run(case_id, mlp(), granularity, method=SGLD(temperature=tau, seed=seed,
                                                       hessian_free=False, discount=1.0),
              update_every=steps)
    run.opt.val_loss = lambda: run.val_objective(run.weights)
    for _ in range(steps):
        run.step()
    got = run.opt.last_hypergradient()
    case = run.case
    ratio = [1.0, 0.5]
    for kind in case.tunable:
        value = case.initial(kind)
        h = 1e-6 * value
        slots = [[0, 1]] if granularity == "global" else [[0], [1]]
        for gi_slot, members in enumerate(slots):
            # a global lr moves every group's lr in proportion; a group's only its own
            scale = lambda gi: ratio[gi] if kind == "lr" and granularity == "global" else 1.0
            up = [(kind, gi, h * scale(gi)) for gi in members]
            down = [(kind, gi, -h * scale(gi)) for gi in members]
            fd = (_chain_objective(case, up, tau, steps, seed)
                  - _chain_objective(case, down, tau, steps, seed)) / (2 * h)
            ours = got[kind][members[0]]
            print(f"{case_id} {granularity} d/d{kind}[{gi_slot}]: recurrence {float(ours):.10f}"
                  f", central differences {float(fd):.10f}")
            assert abs(float(ours) - float(fd)) <= 1e-6 * abs(float(fd)) + 1e-8, (kind, gi_slot)


# ----------------------------------------------------------------------------- the Gaussian toy
A_CURV, TAU = 2.0, 0.05
COORDS = 2000


class Toy:
    """``L = 0.5 a |w - c|^2`` (full batch), ``E = 0.5 |w - d|^2``, COORDS independent
    coordinates started at the stationary mean; element granularity, hyperparameters frozen,
    one sample per step (``update_every=1`` with ``val_loss``)."""

    def __init__(self, method, kinds, **sgd):
        gen = torch.Generator().manual_seed(0)
        self.c = torch.randn(COORDS, generator=gen, dtype=F64)
        self.d = torch.randn(COORDS, generator=gen, dtype=F64)
        self.k = A_CURV + sgd.get("weight_decay", 0.0)
        self.mean = A_CURV * self.c / self.k
        self.w = self.mean.clone().requires_grad_(True)
        self.opt = HyperOptimizer(torch.optim.SGD, [self.w], tune=kinds, granularity="element",
                                  method=method, hyper_lr=0.0, update_every=1,
                                  val_loss=lambda: 0.5 * ((self.w - self.d) ** 2).sum(), **sgd)

    def chain_average(self, steps: int, burn_in: int) -> dict[str, torch.Tensor]:
        """Per coordinate, the estimate averaged over the chain after the burn-in."""
        total = {k: torch.zeros(COORDS, dtype=F64) for k in self.opt.tuned_kinds}
        for t in range(steps):
            self.opt.zero_grad()
            (0.5 * A_CURV * ((self.w - self.c) ** 2).sum()).backward(
                create_graph=self.opt.needs_graph)
            self.opt.step()
            if t >= burn_in:
                for kind, entries in self.opt.last_hypergradient().items():
                    total[kind] += entries[0][0]
        return {k: v / (steps - burn_in) for k, v in total.items()}


def _compare(label, estimate, expected):
    """Mean over coordinates, its standard error (spread around the analytic values) and the
    z-score of the estimate against the expected value."""
    residual = estimate - expected
    se = float(residual.std() / math.sqrt(residual.numel()))
    z = float(residual.mean()) / se
    print(f"{label}: estimate {float(estimate.mean()):.5f}, analytic {float(expected.mean()):.5f}"
          f", standard error {se:.5f}, z {z:+.2f}")
    return z, se


def _sgd_toy_values(lr, wd, mean, c, d, a_hf=None):
    """Per coordinate, E[grad E(w_t) . Z_t] at stationarity for plain SGD on the toy:
    ``rho = 1 - lr k`` is the chain's contraction, ``A`` the recurrence's (``rho`` with the
    Hessian; ``discount (1 - lr wd)`` without).  With ``A = rho`` this is the analytic
    derivative of E[E]: ``tau / (2 - lr k)^2`` for lr, and for the weight decay
    ``(m - d) dm/dwd + 0.5 dVar/dwd``."""
    k = A_CURV + wd
    rho = 1 - lr * k
    a = rho if a_hf is None else a_hf
    var = 2 * TAU / (k * (2 - lr * k))
    d_lr = TAU * lr * k / ((2 - lr * k) * (1 - a * rho)) + 0 * c
    d_wd = -lr * (var * rho / (1 - a * rho) + (mean - d) * mean / (1 - a))
    return {"lr": d_lr, "weight_decay": d_wd}


def test_exact_variant_matches_the_analytic_derivative_sgd():
    """The SGLD chain of SGD on the toy is AR(1): ``w' = rho w + lr a c + sqrt(2 lr tau) xi``,
    stationary mean ``m = a c / k`` and variance ``2 tau / (k (2 - lr k))`` (1.36 tau/k here:
    the step size's discretisation effect)."""
    lr, wd = 0.25, 0.1
    toy = Toy(SGLD(temperature=TAU, hessian_free=False, discount=1.0, seed=1,
                   per_kind_elements=True), ("lr", "weight_decay"), lr=lr, weight_decay=wd)
    got = toy.chain_average(600, 50)
    exact = _sgd_toy_values(lr, wd, toy.mean, toy.c, toy.d)
    k = toy.k
    assert torch.allclose(exact["lr"], torch.full_like(exact["lr"], TAU / (2 - lr * k) ** 2))
    analytic_wd = ((toy.mean - toy.d) * (-A_CURV * toy.c / k ** 2)
                   - TAU * (2 - 2 * lr * k) / (k * (2 - lr * k)) ** 2)
    assert torch.allclose(exact["weight_decay"], analytic_wd, rtol=1e-12)
    for kind in ("lr", "weight_decay"):
        z, se = _compare(f"SGD toy, exact variant, dE/d{kind}", got[kind], exact[kind])
        assert abs(z) < 4 and se < 0.05 * float(exact[kind].abs().mean()), (kind, z, se)
    spread = float(((toy.w.detach() - toy.mean) ** 2).mean() * k / TAU)
    assert abs(spread - 2 / (2 - lr * k)) < 0.15, spread      # the stationary variance


def test_first_order_default_has_its_analytic_bias():
    """Without the Hessian and with the history decayed by mu_d, the recurrence's contraction
    is ``mu_d (1 - lr wd)`` instead of ``1 - lr k``: the estimate's mean is still analytic on
    the toy; it is measured against the exact derivative."""
    lr, wd = 0.25, 0.1
    toy = Toy(SGLD(temperature=TAU, seed=1), ("lr", "weight_decay"), lr=lr, weight_decay=wd)
    got = toy.chain_average(600, 50)
    biased = _sgd_toy_values(lr, wd, toy.mean, toy.c, toy.d, a_hf=0.9 * (1 - lr * wd))
    exact = _sgd_toy_values(lr, wd, toy.mean, toy.c, toy.d)
    for kind in ("lr", "weight_decay"):
        z, se = _compare(f"SGD toy, first-order default, dE/d{kind}", got[kind], biased[kind])
        assert abs(z) < 4, (kind, z)
        bias = float(got[kind].mean() / exact[kind].mean())
        print(f"  first-order / exact for {kind}: {bias:.3f}")
    assert float(got["weight_decay"].mean() / exact["weight_decay"].mean()) > 2   # the bias


def _momentum_toy_derivative(lr, mu, wd, dampening, toy):
    """Per coordinate, d E[E] / d(lr, momentum, weight decay) for heavy ball on the toy: the
    state (w, buf) is linear Gaussian, ``x' = M x + b + (n, 0)`` with noise variance
    ``2 tau lr (1 - dampening) / (1 - mu)``; stationary covariance from the discrete Lyapunov
    equation ``S = M S M^T + Q``, differentiated by autograd; the stationary mean of w is
    ``a c / k`` whatever lr and momentum."""
    hp = [torch.tensor(v, dtype=F64, requires_grad=True) for v in (lr, mu, wd)]
    lr_, mu_, wd_ = hp
    k, keep = A_CURV + wd_, 1 - dampening
    m_mat = torch.stack([torch.stack([1 - lr_ * keep * k, -lr_ * mu_]),
                         torch.stack([keep * k, mu_])])
    q = torch.zeros(4, dtype=F64).index_put((torch.tensor([0]),),
                                            2 * TAU * lr_ * keep / (1 - mu_))
    cov = torch.linalg.solve(torch.eye(4, dtype=F64) - torch.kron(m_mat, m_mat), q)
    d_var = torch.autograd.grad(cov[0], hp)
    mean_term = (toy.mean - toy.d) * (-A_CURV * toy.c / toy.k ** 2)
    return {"lr": 0.5 * d_var[0] + 0 * toy.c, "momentum": 0.5 * d_var[1] + 0 * toy.c,
            "weight_decay": 0.5 * d_var[2] + mean_term}, float(cov[0].detach())


def test_exact_variant_matches_the_analytic_derivative_momentum():
    """Heavy ball with dampening: the noise scale ``lr (1 - dampening) / (1 - mu)`` depends on
    the momentum, so its tangent ``n / (2 (1 - mu))`` is part of dE/dmomentum."""
    lr, mu, wd, dampening = 0.25, 0.5, 0.1, 0.2
    toy = Toy(SGLD(temperature=TAU, hessian_free=False, discount=1.0, seed=2,
                   per_kind_elements=True), ("lr", "momentum", "weight_decay"),
              lr=lr, momentum=mu, weight_decay=wd, dampening=dampening)
    got = toy.chain_average(600, 100)
    expected, var = _momentum_toy_derivative(lr, mu, wd, dampening, toy)
    for kind in ("lr", "momentum", "weight_decay"):
        z, se = _compare(f"momentum toy, exact variant, dE/d{kind}", got[kind], expected[kind])
        assert abs(z) < 4 and se < 0.05 * float(expected[kind].abs().mean()), (kind, z, se)
    spread = float(((toy.w.detach() - toy.mean) ** 2).mean()) / var
    assert abs(spread - 1) < 0.15, spread


def _expected_step_scale(base, kw, st, lr):
    """The effective step size ``c`` of the module docstring, written out per rule from the
    state the step just wrote."""
    if base is torch.optim.SGD:
        mu = kw.get("momentum", 0.0)
        gain = 1.0 if kw.get("nesterov") else 1.0 - kw.get("dampening", 0.0)
        return torch.tensor(lr if mu == 0 else lr * gain / (1 - mu), dtype=F64)
    if base in (torch.optim.Adam, torch.optim.AdamW):
        beta2 = kw.get("betas", (0.9, 0.999))[1]
        v = st["max_exp_avg_sq"] if kw.get("amsgrad") else st["exp_avg_sq"]
        t = float(st["step"])
        return lr / (v.sqrt() / math.sqrt(1 - beta2 ** t) + kw.get("eps", 1e-8))
    if base is torch.optim.RMSprop:
        v = st["square_avg"]
        if kw.get("centered"):
            v = v - st["grad_avg"] ** 2
        return lr / (v.sqrt() + kw.get("eps", 1e-8)) / (1 - kw.get("momentum", 0.0))
    t = float(st["step"])
    return lr / (1 + (t - 1) * kw.get("lr_decay", 0.0)) / (st["sum"].sqrt() + kw.get("eps", 1e-10))


@pytest.mark.parametrize("base,kw", [
    (torch.optim.SGD, dict(lr=0.1)),
    (torch.optim.SGD, dict(lr=0.1, momentum=0.9, dampening=0.3, weight_decay=0.1)),
    (torch.optim.SGD, dict(lr=0.1, momentum=0.8, nesterov=True, maximize=True)),
    (torch.optim.Adam, dict(lr=1e-2, amsgrad=True, weight_decay=0.1)),
    (torch.optim.AdamW, dict(lr=1e-2, betas=(0.8, 0.99))),
    (torch.optim.RMSprop, dict(lr=1e-2, centered=True, momentum=0.5)),
    (torch.optim.Adagrad, dict(lr=0.1, lr_decay=0.1))], ids=lambda x: getattr(x, "__name__", ""))
def test_the_noise_is_sqrt_2_tau_c_xi(base, kw):
    """Step by step, the noise (the difference from a noiseless twin that starts each step at the
    same weights) is ``sqrt(2 tau c) xi``, ``xi`` the seeded generator's next draw and ``c`` the
    rule's effective step size (momentum's gain, the bias-corrected preconditioner)."""
    tau, seed, n = 1e-2, 12, 50
    target = torch.linspace(-1, 1, n, dtype=F64)
    noisy = torch.zeros(n, dtype=F64, requires_grad=True)
    twin = torch.zeros(n, dtype=F64, requires_grad=True)
    tune = ("lr", "momentum") if kw.get("momentum") or base in (torch.optim.Adam,
                                                                 torch.optim.AdamW) else ("lr",)
    opts = [HyperOptimizer(base, [w], method=SGLD(temperature=t, seed=seed), tune=tune, **kw)
            for w, t in ((noisy, tau), (twin, 0.0))]
    gen = torch.Generator().manual_seed(seed)
    for _ in range(3):
        with torch.no_grad():
            twin.copy_(noisy)
        for w, opt in zip((noisy, twin), opts):
            opt.zero_grad()
            (((w - target) ** 2).sum() + (w ** 4).sum()).backward()
            opt.step()
        lr = float(opts[1].hyperparameters()["lr"][0])
        c = _expected_step_scale(base, kw, opts[1].state[twin], lr)
        expected = torch.sqrt(2 * tau * c) * torch.randn(n, generator=gen, dtype=F64)
        torch.testing.assert_close(noisy.detach() - twin.detach(), expected, rtol=1e-12,
                                   atol=1e-15)


@pytest.mark.parametrize("base,kwargs,tol", [
    (torch.optim.SGD, dict(lr=2e-3, momentum=0.9), 0.1),
    (torch.optim.Adam, dict(lr=1e-3), 0.35)])
def test_the_noise_scale_targets_the_gibbs_distribution(base, kwargs, tol):
    """For a small step the chain's stationary variance on ``0.5 a w^2`` is about ``tau / a``.
    SGD with momentum 0.9 at lr 2e-3 is checked against its exact value from the Lyapunov
    equation (1.19 tau/a, the discretisation effect); Adam against ``tau / a`` with room for
    pSGLD's dropped correction term (measured 1.15 here; see the module docstring)."""
    tau, a, n, steps = 1e-2, 1.0, 1000, 1200
    w = (0.1 * torch.randn(n, generator=torch.Generator().manual_seed(0), dtype=F64)
         ).requires_grad_(True)
    opt = HyperOptimizer(base, [w], method=SGLD(temperature=tau, seed=3), hyper_lr=0.0,
                         **kwargs)
    samples = []
    for t in range(steps):
        opt.zero_grad()
        (0.5 * a * (w ** 2).sum()).backward()
        opt.step()
        if t >= 400 and t % 10 == 0:
            samples.append(float((w.detach() ** 2).mean()) * a / tau)
    ratio = sum(samples) / len(samples)
    if base is torch.optim.SGD:
        lr, mu = kwargs["lr"], kwargs["momentum"]
        m_mat = torch.tensor([[1 - lr * a, -lr * mu], [a, mu]], dtype=F64)
        q = torch.tensor([2 * tau * lr / (1 - mu), 0, 0, 0], dtype=F64)
        target = float(torch.linalg.solve(torch.eye(4, dtype=F64) - torch.kron(m_mat, m_mat),
                                          q)[0]) * a / tau
    else:
        target = 1.0
    print(f"{base.__name__}: stationary variance {ratio:.3f} tau/a (target {target:.3f})")
    assert abs(ratio / target - 1) < tol, (ratio, target)


@pytest.mark.parametrize("base", [torch.optim.Adam, torch.optim.RMSprop, torch.optim.Adagrad])
def test_adaptive_rules_leave_never_seen_coordinates_alone(base):
    """A coordinate whose gradient has always been 0 has a zero second moment; it gets no
    noise (its preconditioner 1/eps would kick it by sqrt(2 lr tau / eps))."""
    seen = torch.zeros(10, dtype=F64, requires_grad=True)
    unseen = torch.zeros(10, dtype=F64, requires_grad=True)
    opt = HyperOptimizer(base, [seen, unseen], lr=1e-2, method=SGLD(temperature=1e-2, seed=8))
    for _ in range(5):
        opt.zero_grad()
        (((seen - 1) ** 2).sum() + 0 * unseen.sum()).backward()
        opt.step()
    assert torch.equal(unseen.detach(), torch.zeros(10, dtype=F64))
    assert torch.isfinite(seen).all() and (seen.detach() != 0).all()


def test_global_granularity_sums_the_coordinates():
    """The same chain (same seed) read at global granularity: one scalar tangent, whose sample
    is the sum of the per-element samples."""
    samples = []
    for granularity in ("element", "global"):
        w = torch.zeros(50, dtype=F64, requires_grad=True)
        c = torch.linspace(-1, 1, 50, dtype=F64)
        opt = HyperOptimizer(torch.optim.SGD, [w], lr=0.2, momentum=0.5, tune=("lr", "momentum"),
                             granularity=granularity, hyper_lr=0.0, update_every=1,
                             method=SGLD(temperature=TAU, seed=4), val_loss=lambda: (w ** 3).sum())
        for _ in range(30):
            opt.zero_grad()
            ((w - c) ** 2).sum().backward()
            opt.step()
        samples.append({k: flat(v).sum() for k, v in opt.last_hypergradient().items()})
    for kind in samples[0]:
        assert rel_err(samples[1][kind], samples[0][kind]) < 1e-12, kind


# ----------------------------------------------------------------------------- the protocol
def _make(model, base=torch.optim.SGD, **kw):
    kw.setdefault("method", SGLD(temperature=1e-3, seed=5))
    settings = dict(lr=0.05, momentum=0.9, weight_decay=1e-3) if base is torch.optim.SGD \
        else dict(lr=1e-2, weight_decay=1e-3)
    return HyperOptimizer(base, model.parameters(), tune=("lr", "momentum", "weight_decay"),
                          update_every=3, **settings, **kw)


def test_default_runs_in_the_plain_loop():
    m = _model()
    opt = HyperOptimizer(torch.optim.SGD, m.parameters(), lr=0.05, momentum=0.9, method=SGLD())
    assert not opt.needs_graph       # first order: no Hessian-vector products
    start = opt.hyperparameters()["lr"][0].clone()
    _train(opt, m, 25)
    lr = opt.hyperparameters()["lr"][0]
    assert opt.hypersteps == 2 and torch.isfinite(lr) and not torch.equal(lr, start)
    assert all(torch.isfinite(p).all() for p in m.parameters())


@pytest.mark.parametrize("base", [torch.optim.SGD, torch.optim.Adam])
@pytest.mark.parametrize("hessian_free", [True, False])
def test_resume_mid_run_is_bit_exact(base, hessian_free):
    method = lambda seed: SGLD(temperature=1e-3, seed=seed, hessian_free=hessian_free)
    m1 = _model()
    o1 = _make(m1, base, method=method(5))
    _train(o1, m1, 4)                          # mid-window (update_every=3)
    # the saved generator state wins over the new optimizer's seed
    m2, o2, saved = reloaded(m1, o1, lambda m: _make(m, base, method=method(123)))
    rng = saved["opt"]["hyper"]["method"]["rng"]["cpu"]
    assert isinstance(rng, torch.Tensor) and rng.dtype == torch.uint8
    _train(o1, m1, 5, start=4)
    _train(o2, m2, 5, start=4)
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    h1, h2 = o1.hyperparameters(), o2.hyperparameters()
    for k in h1:
        assert torch.equal(flat(h1[k]), flat(h2[k])), k
    # and the noise was on: a noiseless twin ends elsewhere
    m3 = _model()
    o3 = _make(m3, base, method=SGLD(temperature=0.0, hessian_free=hessian_free))
    _train(o3, m3, 9)
    assert not all(torch.equal(a, b) for a, b in zip(m1.parameters(), m3.parameters()))


def test_both_curvature_sources_agree_with_the_noise_on():
    """The same noise (same seed), the Hessian term from the gradient graph or from central
    differences through the closure."""
    results = []
    for closure in (False, True):
        m = _model()
        opt = _make(m, method=SGLD(temperature=1e-3, seed=6, hessian_free=False),
                    curvature=FiniteDifferences(central=True) if closure else "auto")
        assert opt.needs_graph is (not closure)
        for g in opt.hyper_optimizer.param_groups:
            g["lr"] = 0.0
        _train(opt, m, 10, closure=closure)
        results.append((opt.last_hypergradient(), [p.detach().clone() for p in m.parameters()]))
    (h_graph, w_graph), (h_closure, w_closure) = results
    for a, b in zip(w_graph, w_closure):
        assert torch.equal(a, b)          # the chain does not depend on the curvature source
    for kind in h_graph:
        assert rel_err(flat(h_closure[kind]), flat(h_graph[kind])) < 1e-6, kind


def test_temperature_zero_draws_nothing():
    m = _model()
    opt = _make(m, method=SGLD(temperature=0.0, seed=7))
    before = opt.state_dict()["hyper"]["method"]["rng"]["cpu"].clone()
    _train(opt, m, 4)
    assert torch.equal(opt.state_dict()["hyper"]["method"]["rng"]["cpu"], before)


@pytest.mark.parametrize("base", [torch.optim.SGD, torch.optim.Adam])
def test_a_nan_step_is_skipped_and_everything_stays_finite(base):
    m = _model()
    opt = _make(m, base)
    # a NaN on the very first step (Adam's state is still empty: the noise scale must stay
    # finite where it is multiplied by 0)
    opt.zero_grad()
    ((m(X[:8]) - Y[:8]) ** 2).mean().backward()
    next(m.parameters()).grad[0, 0] = float("nan")
    weights = [p.detach().clone() for p in m.parameters()]
    opt.step()
    assert opt.skipped_steps == 1
    for a, b in zip(m.parameters(), weights):
        assert torch.equal(a, b)
    _train(opt, m, 4, start=1)
    z_before = opt.state_dict()["hyper"]["method"]["Z"]
    weights = [p.detach().clone() for p in m.parameters()]
    opt.zero_grad()
    ((m(X[:8]) - Y[:8]) ** 2).mean().backward()
    next(m.parameters()).grad[0, 0] = float("inf")
    opt.step()
    assert opt.skipped_steps == 2
    for a, b in zip(m.parameters(), weights):      # neither the step nor its noise
        assert torch.equal(a, b)
    z_after = opt.state_dict()["hyper"]["method"]["Z"]
    for za, zb in zip(z_after, z_before):
        for key in zb["w"]:
            assert torch.equal(za["w"][key], zb["w"][key])
    _train(opt, m, 6, start=5)
    assert opt.skipped_hypersteps >= 1          # the windows that read a non-finite step
    assert opt.hypersteps > opt.skipped_hypersteps
    for v in opt.hyperparameters().values():
        assert torch.isfinite(flat(v)).all()
    assert all(torch.isfinite(p).all() for p in m.parameters())
    for z in opt.state_dict()["hyper"]["method"]["Z"]:
        assert all(torch.isfinite(t).all() for t in z["w"].values())


@pytest.mark.parametrize("base", [torch.optim.SGD, torch.optim.Adam])
def test_step_makes_no_host_synchronisation(base, monkeypatch):
    m = _model()
    opt = _make(m, base)
    _train(opt, m, 4)
    allowed = {id(s["step"]) for s in opt.hyper_optimizer.state.values() if "step" in s}
    ptrs = [p.data_ptr() for p in m.parameters()]
    for i in range(4, 10):
        x, y = X[i * 4:i * 4 + 8], Y[i * 4:i * 4 + 8]
        opt.zero_grad()
        ((m(x) - y) ** 2).mean().backward()
        with forbid_host_sync(monkeypatch, allowed):
            opt.step()
    assert [p.data_ptr() for p in m.parameters()] == ptrs
    assert opt.hypersteps >= 2


@pytest.mark.parametrize("kwargs,match", [
    ({"temperature": -0.1}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"temperature": float("inf")}, "temperature"), ({"temperature": True}, "temperature"),
    ({"temperature": "1e-4"}, "temperature"), ({"discount": 0}, "discount"),
    ({"discount": 1.5}, "discount"), ({"seed": -1}, "seed"), ({"seed": 1.5}, "seed"),
    ({"seed": True}, "seed"), ({"hessian_free": 1}, "hessian_free"),
    ({"per_kind_elements": "yes"}, "per_kind_elements")])
def test_bad_options_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SGLD(**kwargs)


def test_element_granularity_with_the_hessian_needs_the_opt_in():
    m = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="per_kind_elements=True"):
        HyperOptimizer(torch.optim.SGD, m.parameters(), lr=0.1, granularity="element",
                       method=SGLD(hessian_free=False))
    HyperOptimizer(torch.optim.SGD, m.parameters(), lr=0.1, granularity="element",
                   method=SGLD())
    HyperOptimizer(torch.optim.SGD, m.parameters(), lr=0.1, granularity="element",
                   method=SGLD(hessian_free=False, per_kind_elements=True))


@pytest.mark.parametrize("lr", [0.05, 0.0])
def test_an_untuned_lr_is_a_constant_of_the_noise(lr):
    """tune=("momentum",): lr is a float the rule reads (0 allowed when untuned: no noise)."""
    m = _model()
    opt = HyperOptimizer(torch.optim.SGD, m.parameters(), lr=lr, momentum=0.9,
                         tune=("momentum",), update_every=3, method=SGLD(temperature=1e-3))
    before = [p.detach().clone() for p in m.parameters()]
    _train(opt, m, 7)
    moved = not all(torch.equal(a, b) for a, b in zip(m.parameters(), before))
    assert moved is (lr > 0)
    assert opt.hypersteps == 2 and torch.isfinite(flat(opt.hyperparameters()["momentum"])).all()


def test_default_options_and_repr():
    method = SGLD()
    assert (method.temperature, method.hessian_free, method.discount, method.seed) == \
        (1e-4, True, 0.9, None)
    assert repr(method).startswith("SGLD(temperature=0.0001")
