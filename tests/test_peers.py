"""Independent checks of our hypergradients against peer implementations (the optional extra
``peers``: gdtuo, higher, torchopt), float64, with no code of ours on the peer side.

Measured (torch 2.13 CPU, float64; normwise relative error ||ours - peer|| / ||peer||, all
kinds and steps/windows of a test stacked into one vector; each test prints its numbers with
``-s``, lines starting ``[peers]``):

* greedy vs gdtuo (``gradient_descent_the_ultimate_optimizer.gdtuo``), the one-step
  hypergradient read from gdtuo's hyperparameters' ``.grad`` after the next step's backward,
  7 steps: SGD(momentum=0.9) lr and momentum 2.4e-16; AdamBaydin lr 2.4e-16; Adam lr and beta1
  2.4e-16, gdtuo's Adam state primed with torch's zero moments (as shipped, gdtuo starts the
  second moment at 1e-8: gap 0.17, ``test_gdtuo_adam_fudge_factor``).
* unroll vs higher (``monkeypatch``/``innerloop_ctx`` with ``override`` tensors),
  Unroll(horizon=3), windows of 5 steps, val_loss meta-objective, two windows (the second
  starts mid-training, from moved hyperparameters and a non-empty optimizer state):
  SGD(momentum, weight decay) lr/momentum/weight decay 1.7e-16, SGD(nesterov) 2.7e-16, Adam
  lr/beta1/weight decay 1.3e-17 with higher's eps converted to torch's convention per step
  (unconverted: 7.4e-7, ``test_higher_adam_eps_convention``).
* unroll vs torchopt (``MetaSGD`` / ``MetaAdam``): SGD lr and momentum 1.7e-16 (0.069 on the
  second window without priming torchopt's first-step flag), Adam lr 0 (6.5e-6 unless torch's
  default dtype is float64 while torchopt steps: its bias corrections are computed in the
  default dtype).
* implicit vs torchopt (``torchopt.diff.implicit.custom_root``) on ridge logistic regression
  with full-batch SGD: Implicit(neumann_terms=i) equals torchopt's Neumann solve with
  ``maxiter=i-1`` term by term (at most 2.9e-16 for i in 1, 5, 20, 100, 300) and converges to
  torchopt's exact (and CG) solve: 0.74 (i=1), 0.23 (5), 3.7e-3 (20), 2.9e-11 (100), 8.9e-16
  (300); spectral radius of A = dPhi/dw 0.80.
"""
from __future__ import annotations

import copy
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

_REASON = "peer libraries not installed: pip install -e '.[peers]'"
gdtuo = pytest.importorskip("gradient_descent_the_ultimate_optimizer.gdtuo", reason=_REASON)
higher = pytest.importorskip("higher", reason=_REASON)
torchopt = pytest.importorskip("torchopt", reason=_REASON)

from torchopt import pytree  # noqa: E402
from torchopt.transform.scale_by_adam import ScaleByAdamState  # noqa: E402
from torchopt.transform.trace import TraceState  # noqa: E402

from hyperopt_wrap import HyperOptimizer, Implicit, Unroll  # noqa: E402

D = torch.float64
TIGHT = 1e-10
pytestmark = [pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True"),
              # torchopt 0.7.3 calls functorch.vjp / jacfwd, deprecated in torch >= 2.0
              pytest.mark.filterwarnings("ignore:We've integrated functorch:FutureWarning")]


# ---------------------------------------------------------------------------- problem
def _model() -> nn.Module:
    """A float64 tanh MLP 4-6-3 (an nn.Module: higher, torchopt and gdtuo all want one)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(D)


def _data(n_batches: int = 12):
    gen = torch.Generator().manual_seed(1)
    centres = torch.randn(3, 4, generator=gen, dtype=D)

    def batch(n):
        y = torch.randint(0, 3, (n,), generator=gen)
        return centres[y] + torch.randn(n, 4, generator=gen, dtype=D), y

    return [batch(8) for _ in range(n_batches)], batch(16)


BATCHES, VAL = _data()


def _loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def _stack(values) -> torch.Tensor:
    return torch.stack([torch.as_tensor(v, dtype=D).reshape(()) for v in values])


def _rel(got, expected) -> float:
    got, expected = _stack(got), _stack(expected)
    assert expected.norm() > 0, "the peer's hypergradient is all zeros: a vacuous comparison"
    assert torch.isfinite(got).all() and torch.isfinite(expected).all()
    return float((got - expected).norm() / expected.norm())


def _report(name: str, err: float) -> None:
    print(f"\n[peers] {name}: relative error {err:.2g}")


# ---------------------------------------------------------------------------- greedy vs gdtuo
def _float64_default(make):
    """``make()`` with float64 as torch's default dtype: gdtuo builds its hyperparameters with
    ``torch.tensor(x)``, and torchopt's Adam computes its bias corrections as
    ``1 - pow(beta, count)`` with an int64 count, both in the default dtype (float32 otherwise,
    whatever the model's dtype)."""
    saved = torch.get_default_dtype()
    torch.set_default_dtype(D)
    try:
        return make()
    finally:
        torch.set_default_dtype(saved)


def _sigmoid_clamp_slope(raw: torch.Tensor) -> torch.Tensor:
    """gdtuo's Adam stores beta as ``raw`` with beta = (tanh(raw) + 1) / 2, so
    dE/draw = dE/dbeta * 2 beta (1 - beta)."""
    beta = gdtuo.Adam.clamp(raw.detach())
    return 2 * beta * (1 - beta)


def _greedy_ours(cls, tune, steps, **kwargs):
    """Our greedy hypergradient after each step (frozen hyperparameters: hyper_lr=0), and the
    weights after each step."""
    model = _model()
    opt = HyperOptimizer(cls, model.parameters(), tune=tune, hyper_lr=0.0, **kwargs)
    out = []
    for batch in BATCHES[:steps]:
        opt.zero_grad()
        _loss(model, batch).backward()
        opt.step()
        out.append((opt.last_hypergradient(), [p.detach().clone() for p in model.parameters()]))
    return out


def _greedy_gdtuo(hyperopt, steps, prime_adam=False):
    """gdtuo's ModuleWrapper loop; its hyperparameters' ``.grad`` after step t's backward is
    dL_t(w_t)/dlam through the update of step t-1 (the top of the stack is NoOpOptimizer, so the
    hyperparameters stay fixed, as ours with hyper_lr=0)."""
    model = _model()
    wrapper = gdtuo.ModuleWrapper(model, optimizer=hyperopt)
    wrapper.initialize()
    if prime_adam:      # torch's initial Adam state: both moments zero (gdtuo: v_0 = eps)
        for name, p in model.named_parameters():
            hyperopt.cache[name] = {"m": torch.zeros_like(p), "v": torch.zeros_like(p)}
    grads, weights = [], []
    for batch in BATCHES[:steps]:
        wrapper.begin()
        wrapper.zero_grad()
        _loss(wrapper.forward, batch).backward()
        grads.append({k: v.grad.detach().clone() for k, v in hyperopt.parameters.items()})
        wrapper.step()
        weights.append([wrapper.parameters[k].detach().clone()
                        for k, _ in model.named_parameters()])
    return grads[1:], weights     # grads[t] belongs to the update of step t - 1


def _greedy_pairs(ours, theirs, conversions):
    got, expected = [], []
    for (hg, _), g in zip(ours[1:], theirs, strict=True):
        for kind, (name, convert) in conversions.items():
            got.append(hg[kind][0])
            expected.append(convert(g[name]))
    return got, expected


def _assert_same_trajectory(ours, theirs_weights, rtol=1e-12):
    for (_, w_ours), w_theirs in zip(ours, theirs_weights):
        for a, b in zip(w_ours, w_theirs):
            assert float((a - b).norm() / b.norm()) <= rtol


def test_greedy_equals_gdtuo_sgd():
    """SGD(momentum=0.9), lr and momentum: gdtuo.SGD(alpha, mu) keeps both in natural units and
    detaches the momentum buffer and the gradient (the greedy convention), so dE/dalpha and
    dE/dmu are ours with no conversion.  gdtuo's SGD has no weight decay, dampening or Nesterov.
    Measured: 2.4e-16 over 7 steps."""
    steps = 8
    ours = _greedy_ours(torch.optim.SGD, ("lr", "momentum"), steps, lr=0.1, momentum=0.9)
    hopt = _float64_default(lambda: gdtuo.SGD(alpha=0.1, mu=0.9))
    grads, weights = _greedy_gdtuo(hopt, steps)
    _assert_same_trajectory(ours, weights)
    got, expected = _greedy_pairs(ours, grads, {"lr": ("alpha", lambda g: g),
                                                "momentum": ("mu", lambda g: g)})
    err = _rel(got, expected)
    _report("greedy vs gdtuo SGD lr+momentum", err)
    assert err <= TIGHT


@pytest.mark.parametrize("variant", ["AdamBaydin", "Adam"])
def test_greedy_equals_gdtuo_adam(variant):
    """Adam learning rate (AdamBaydin, lr only) and lr + beta1 (gdtuo.Adam, which also tunes
    beta2; we do not, and its beta2 gradient is not compared).  gdtuo's alpha is in natural
    units; its beta1 is stored as raw with beta1 = (tanh(raw) + 1) / 2, converted to dE/dbeta1
    by dividing by 2 beta1 (1 - beta1).  gdtuo's lr hypergradient is -grad . m_hat /
    (sqrt(v_hat) + eps) with the moments' history detached, as ours; its beta1 hypergradient
    differentiates the new moment and the bias correction 1/(1 - beta1^t), as ours.  The one
    genuine difference is the initial second moment (gdtuo v_0 = eps = 1e-8, torch 0), so
    gdtuo's cache is primed with torch's zero moments here (the gap without priming:
    ``test_gdtuo_adam_fudge_factor``).  Measured: AdamBaydin 2.4e-16, Adam 2.4e-16 over 7 steps."""
    steps = 8
    if variant == "Adam":
        tune = ("lr", "momentum")
        hopt = _float64_default(lambda: gdtuo.Adam(alpha=0.01, beta1=0.9, beta2=0.999))
        conv = {"lr": ("alpha", lambda g: g),
                "momentum": ("beta1", lambda g: g / _sigmoid_clamp_slope(hopt.parameters["beta1"]))}
    else:
        tune = ("lr",)
        hopt = _float64_default(lambda: gdtuo.AdamBaydin(alpha=0.01))
        conv = {"lr": ("alpha", lambda g: g)}
    ours = _greedy_ours(torch.optim.Adam, tune, steps, lr=0.01, betas=(0.9, 0.999), eps=1e-8)
    grads, weights = _greedy_gdtuo(hopt, steps, prime_adam=True)
    _assert_same_trajectory(ours, weights)
    got, expected = _greedy_pairs(ours, grads, conv)
    err = _rel(got, expected)
    _report(f"greedy vs gdtuo {variant} {'+'.join(tune)}", err)
    assert err <= TIGHT


def test_gdtuo_adam_fudge_factor():
    """gdtuo's Adam starts the second moment at v_0 = eps (= 1e-8, its "fudge factor because
    sqrt is not differentiable at exactly zero") where torch starts at 0, which changes the
    first steps' updates (v_1 = beta2 eps + (1 - beta2) g^2 is comparable to eps for small
    gradients) and so the trajectory and the hypergradient.  With gdtuo as shipped the lr
    hypergradients differ from ours (torch's Adam) by 0.17 (measured, 7 steps); priming
    gdtuo's cache with zero moments removes the whole gap (test above)."""
    steps = 8
    ours = _greedy_ours(torch.optim.Adam, ("lr",), steps, lr=0.01, betas=(0.9, 0.999), eps=1e-8)
    hopt = _float64_default(lambda: gdtuo.AdamBaydin(alpha=0.01))
    grads, _ = _greedy_gdtuo(hopt, steps, prime_adam=False)
    err = _rel(*_greedy_pairs(ours, grads, {"lr": ("alpha", lambda g: g)}))
    _report("greedy vs gdtuo AdamBaydin, gdtuo's v_0 = eps (not converted)", err)
    assert 1e-3 <= err <= 0.5, "the v_0 = eps difference should show, and only it"


# ---------------------------------------------------------------------------- unroll vs higher
K, T = 3, 5       # unroll horizon; window length (the first T - K steps of a window are not
                  # differentiated through: weights and state at step T - K are constants)


def _unroll_ours(cls, tune, windows=2, **kwargs):
    """Unroll(K) with val_loss over ``windows`` windows of T steps; per window: the weights,
    base-optimizer state and hyperparameters at step T - K of the window (where the unrolled
    part starts), the batches of its last K steps and our hypergradient."""
    model = _model()
    opt = HyperOptimizer(cls, model.parameters(), method=Unroll(horizon=K), update_every=T,
                         tune=tune, hyper_lr=0.05, val_loss=lambda: _loss(model, VAL), **kwargs)
    out = []
    for t in range(windows * T):
        if t % T == T - K:
            params = list(model.parameters())
            snap = {"weights": copy.deepcopy(model.state_dict()),
                    "state": [{k: v.detach().clone() for k, v in opt.state[p].items()
                               if k != "hyper"} for p in params],
                    "hyper": {k: float(v[0]) for k, v in opt.hyperparameters().items()
                              if k in tune},
                    "batches": BATCHES[t:t + K]}
        opt.zero_grad()
        _loss(model, BATCHES[t]).backward(create_graph=opt.needs_graph)
        opt.step()
        if t % T == T - 1:
            assert opt.hypersteps == t // T + 1
            snap["hypergradient"] = {k: float(v[0]) for k, v in opt.last_hypergradient().items()}
            out.append(snap)
    return out


def _higher_hypergradient(cls, window, tune, eps_convention="torch", **kwargs):
    """dE/dlam of K steps of ``higher.innerloop_ctx`` from the window's snapshot, the tuned
    values given as ``override`` tensors (Adam's beta1 inside ``betas``)."""
    model = _model()
    model.load_state_dict(window["weights"])
    base = cls(model.parameters(), **kwargs)
    step0 = 0
    for p, state in zip(model.parameters(), window["state"]):
        if state:
            base.state[p] = {k: (int(v) if k == "step" else v.clone()) for k, v in state.items()}
            step0 = int(state.get("step", 0))
    lam = {k: torch.tensor(v, dtype=D, requires_grad=True) for k, v in window["hyper"].items()}
    override = {"lr": [lam["lr"]]}
    if "weight_decay" in lam:
        override["weight_decay"] = [lam["weight_decay"]]
    if "momentum" in lam:
        if cls is torch.optim.Adam:
            override["betas"] = [(lam["momentum"], base.param_groups[0]["betas"][1])]
        else:
            override["momentum"] = [lam["momentum"]]
    with higher.innerloop_ctx(model, base, override=override,
                              copy_initial_weights=True) as (fmodel, diffopt):
        for j, batch in enumerate(window["batches"]):
            step_override = None
            if cls is torch.optim.Adam and eps_convention == "torch":
                # higher's Adam adds eps to sqrt(v) before the bias correction
                # (lr sqrt(bc2)/bc1 * m / (sqrt(v) + eps)); torch adds it after
                # (lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps)).  The same update needs
                # eps_higher = eps * sqrt(bc2) at step t.
                bc2 = 1 - base.param_groups[0]["betas"][1] ** (step0 + j + 1)
                step_override = {"eps": [base.param_groups[0]["eps"] * math.sqrt(bc2)]}
            diffopt.step(_loss(fmodel, batch), override=step_override)
        meta = _loss(fmodel, VAL)
        grads = torch.autograd.grad(meta, list(lam.values()))
    return dict(zip(lam, (float(g) for g in grads)))


def _compare(windows, peer):
    got, expected = [], []
    for window, theirs in zip(windows, peer):
        for kind, value in theirs.items():
            got.append(window["hypergradient"][kind])
            expected.append(value)
    return _rel(got, expected)


HIGHER_CASES = {
    "SGD(momentum,weight_decay)": (torch.optim.SGD, ("lr", "momentum", "weight_decay"),
                                   {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01}),
    "SGD(nesterov)": (torch.optim.SGD, ("lr", "momentum", "weight_decay"),
                      {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01, "nesterov": True}),
    "Adam(weight_decay)": (torch.optim.Adam, ("lr", "momentum", "weight_decay"),
                           {"lr": 0.01, "betas": (0.9, 0.999), "weight_decay": 0.01}),
}


@pytest.mark.parametrize("case", list(HIGHER_CASES))
def test_unroll_equals_higher(case):
    """Unroll(horizon=3) in windows of 5 steps with a val_loss: our hypergradient is that of the
    validation loss after the window's last 3 steps, with the weights and optimizer state at
    step 2 of the window held constant.  higher reproduces exactly that: innerloop_ctx from a
    torch optimizer loaded with the snapshot of step 2 (weights, momentum buffer / Adam moments
    and step), the hyperparameters in use as ``override`` tensors (higher's differentiable SGD
    and Adam accept lr, momentum / betas[0] and weight_decay), 3 steps, then the gradient of the
    validation loss.  Two windows: the second starts mid-training from moved hyperparameters.
    higher's Adam puts eps in the un-corrected denominator; converted per step (see
    ``_higher_hypergradient``).  Measured: SGD(momentum, weight decay) 1.7e-16,
    SGD(nesterov) 2.7e-16, Adam 1.3e-17."""
    cls, tune, kwargs = HIGHER_CASES[case]
    windows = _unroll_ours(cls, tune, **kwargs)
    err = _compare(windows, [_higher_hypergradient(cls, w, tune, **kwargs) for w in windows])
    _report(f"unroll K={K} vs higher {case}, {'+'.join(tune)}", err)
    assert err <= TIGHT


def test_higher_adam_eps_convention():
    """Without the eps conversion, higher's Adam is a slightly different optimizer (eps
    effectively eps * sqrt(1 - beta2^t), 30x smaller at step 1), and the hypergradients differ
    from torch's Adam by 7.4e-7 (measured; the gap grows as gradients shrink towards eps)."""
    cls, tune, kwargs = HIGHER_CASES["Adam(weight_decay)"]
    windows = _unroll_ours(cls, tune, **kwargs)
    err = _compare(windows, [_higher_hypergradient(cls, w, tune, eps_convention="higher",
                                                   **kwargs) for w in windows])
    _report("unroll vs higher Adam, higher's eps convention (not converted)", err)
    assert 1e-8 <= err <= 1e-1


# ---------------------------------------------------------------------------- unroll vs torchopt
def _torchopt_state(opt, model, window, cls):
    """torchopt's state for the window's snapshot: its flat parameter order (pytree order of the
    module's parameter dicts) mapped onto ours by identity."""
    flat, _ = pytree.tree_flatten_as_tuple(opt.param_containers_groups[0])
    index = {id(p): i for i, p in enumerate(model.parameters())}
    states = [window["state"][index[id(p)]] for p in flat]
    out = []
    for part in opt.impl.init(flat):
        if isinstance(part, TraceState):
            part = TraceState(trace=[s["momentum_buffer"].clone() for s in states])
        elif isinstance(part, ScaleByAdamState):
            part = ScaleByAdamState(
                mu=[s["exp_avg"].clone() for s in states],
                nu=[s["exp_avg_sq"].clone() for s in states],
                count=[torch.tensor(int(s["step"]), dtype=c.dtype)
                       for s, c in zip(states, part.count)])
        out.append(part)
    return (tuple(out),)


def _torchopt_hypergradient(cls, window, prime=True, float64_counts=True, **kwargs):
    if float64_counts:
        return _float64_default(lambda: _torchopt_hypergradient(
            cls, window, prime=prime, float64_counts=False, **kwargs))
    model = _model()
    model.load_state_dict(window["weights"])
    lam = {k: torch.tensor(v, dtype=D, requires_grad=True) for k, v in window["hyper"].items()}
    if cls is torch.optim.SGD:
        opt = torchopt.MetaSGD(model, lr=lam["lr"], momentum=lam["momentum"],
                               weight_decay=kwargs["weight_decay"])
    else:
        opt = torchopt.MetaAdam(model, lr=lam["lr"], betas=kwargs["betas"],
                                weight_decay=kwargs["weight_decay"])
    if any(window["state"]):
        if prime:
            # torchopt's trace() decides "first step: buffer = g" by a flag in its closure that
            # flips on the transformation's first update, not by the state it is handed; one
            # throwaway update on a throwaway state flips it
            flat, _ = pytree.tree_flatten_as_tuple(opt.param_containers_groups[0])
            opt.impl.update([torch.zeros_like(p) for p in flat], opt.impl.init(flat),
                            params=flat, inplace=False)
        opt.load_state_dict(_torchopt_state(opt, model, window, cls))
    for batch in window["batches"]:
        opt.step(_loss(model, batch))
    meta = _loss(model, VAL)
    grads = torch.autograd.grad(meta, list(lam.values()))
    return dict(zip(lam, (float(g) for g in grads)))


TORCHOPT_CASES = {
    "MetaSGD(momentum,weight_decay)": (torch.optim.SGD, ("lr", "momentum"),
                                       {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01}),
    "MetaAdam(weight_decay)": (torch.optim.Adam, ("lr",),
                               {"lr": 0.01, "betas": (0.9, 0.999), "weight_decay": 0.01}),
}


@pytest.mark.parametrize("case", list(TORCHOPT_CASES))
def test_unroll_equals_torchopt(case):
    """The same comparison with torchopt's MetaSGD / MetaAdam (module API, ``step(loss)``
    differentiates through the update).  What torchopt takes as a tensor: lr (documented as
    "float or callable", but a tensor works), and MetaSGD's momentum (documented as float; a
    tensor works, used here).  Weight decay (both) and Adam's betas must be Python numbers
    (``add(..., alpha=tensor)`` raises TypeError), so they are not tuned here.  The second
    window loads the snapshot's state in torchopt's layout (its parameters in pytree order,
    bias before weight) and primes MetaSGD's momentum: as shipped, the first step after a
    state is loaded ignores the loaded buffer's decay (buffer + g, not momentum * buffer + g),
    a gap of 0.069 measured here.  torchopt's Adam uses torch's eps convention, but computes
    its bias corrections ``1 - pow(beta, count)`` (int64 count) in torch's default dtype:
    float32 unless the default is float64 while it steps (done here; without it the gap is
    6.5e-6).  Measured: MetaSGD lr+momentum 1.7e-16, MetaAdam lr 0 (two windows)."""
    cls, tune, kwargs = TORCHOPT_CASES[case]
    windows = _unroll_ours(cls, tune, **kwargs)
    err = _compare(windows, [_torchopt_hypergradient(cls, w, **kwargs) for w in windows])
    _report(f"unroll K={K} vs torchopt {case}, {'+'.join(tune)}", err)
    assert err <= TIGHT
    if cls is torch.optim.SGD:
        unprimed = _compare(windows[1:], [_torchopt_hypergradient(cls, windows[1], prime=False,
                                                                  **kwargs)])
        _report("unroll vs torchopt MetaSGD window 2 without priming (first_call flag)",
                unprimed)
        assert unprimed >= 1e-4
    else:
        float32 = _compare(windows, [_torchopt_hypergradient(cls, w, float64_counts=False,
                                                             **kwargs) for w in windows])
        _report("unroll vs torchopt MetaAdam, bias corrections in float32 (default dtype)",
                float32)
        assert 1e-10 <= float32 <= 1e-3


# ---------------------------------------------------------------------------- implicit vs torchopt
def _ridge_logistic(seed: int = 3, n: int = 64, d: int = 5):
    gen = torch.Generator().manual_seed(seed)
    w_true = torch.randn(d, generator=gen, dtype=D)

    def data(m):
        x = torch.randn(m, d, generator=gen, dtype=D)
        return x, ((x @ w_true + 0.5 * torch.randn(m, generator=gen, dtype=D)) > 0).to(D)

    return data(n), data(n), 0.1 * torch.randn(d, generator=gen, dtype=D)


def _bce(w, batch):
    x, y = batch
    return F.binary_cross_entropy_with_logits(x @ w, y)


def _implicit_ours(terms: int, train, val, w0, lr, wd, steps):
    """Full-batch SGD(lr, weight_decay) for ``steps`` steps, one window; Implicit's
    hypergradient of the validation loss, the weights of the window's last step (where A and B
    are taken) and the validation gradient at the new weights."""
    w = w0.clone().requires_grad_(True)
    opt = HyperOptimizer(torch.optim.SGD, [w], lr=lr, weight_decay=wd,
                         tune=("lr", "weight_decay"), method=Implicit(neumann_terms=terms),
                         update_every=steps, hyper_lr=0.0, val_loss=lambda: _bce(w, val))
    for t in range(steps):
        if t == steps - 1:
            w_last = w.detach().clone()
        opt.zero_grad()
        _bce(w, train).backward(create_graph=opt.needs_graph)
        opt.step()
    assert opt.hypersteps == 1
    v = torch.autograd.grad(_bce(w, val), w)[0]
    return {k: float(x[0]) for k, x in opt.last_hypergradient().items()}, w_last, v


def _torchopt_implicit(solve, train, w_at, v, lr, wd):
    """v (dw*/dlam) by torchopt's custom_root with the fixed-point residual of one SGD step,
    F(w; lr, wd) = w - Phi(w) = lr (grad L(w) + wd w) (gradient written out: functorch-pure),
    linearised at ``w_at``: dw*/dlam = (I - A)^{-1} B, A = dPhi/dw, B = dPhi/dlam."""
    x, y = train

    def residual(w, lr_, wd_):
        grad = x.T @ (torch.sigmoid(x @ w) - y) / x.shape[0]
        return lr_ * (grad + wd_ * w)

    @torchopt.diff.implicit.custom_root(residual, argnums=(1, 2), solve=solve)
    def solver(w_init, lr_, wd_):
        return w_at.clone()        # the point the method linearises at, as given

    lr_t = torch.tensor(lr, dtype=D, requires_grad=True)
    wd_t = torch.tensor(wd, dtype=D, requires_grad=True)
    out = solver(w_at.clone(), lr_t, wd_t)
    g_lr, g_wd = torch.autograd.grad(out, (lr_t, wd_t), grad_outputs=v)
    return {"lr": float(g_lr), "weight_decay": float(g_wd)}


IMPLICIT_TERMS = (1, 5, 20, 100, 300)


def test_implicit_equals_torchopt_custom_root():
    """Implicit(neumann_terms=i) on ridge logistic regression (5 weights, 64 examples), full
    batch SGD lr=1, weight decay 0.1 (the loss is strongly convex; the update is a contraction
    with spectral radius 0.80), 40 steps = one window, val_loss.  Ours: v sum_{j<i} A^j B with A,
    B of the window's last step (weights w_39, the one batch), v = grad E(w_40); SGD without
    momentum has no state, so include_state does not matter.  torchopt: custom_root on the
    residual F = w - Phi(w), linearised at the same w_39, VJP with the same v; its backward
    solves (dF/dw)^T u = -v, and with ``solve_inv(ns=True, maxiter=i-1)`` its Neumann series for
    (I - A^T)^{-1} has the same i terms sum_j (A^T)^j: equal term by term (measured <= 1.0e-15).
    Against the exact solve (``solve_inv()``; CG agrees with it to 1e-10) the series converges
    as rho^i (rho = 0.80): measured 0.74 (i=1), 0.23 (5), 3.7e-3 (20), 2.9e-11 (100), 8.9e-16
    (300).

    Written as the usual stationarity condition grad L + wd w = 0 instead, lr drops out of
    the fixed point (dw*/dlr = 0, at the converged point ours tends to 0 too) while dE/dwd is
    the same (both factors carry lr); shown for wd at i=300."""
    train, val, w0 = _ridge_logistic()
    lr, wd, steps = 1.0, 0.1, 40
    exact = cg = None
    errs = {}
    for terms in IMPLICIT_TERMS:
        ours, w_at, v = _implicit_ours(terms, train, val, w0, lr, wd, steps)
        if exact is None:
            exact = _torchopt_implicit(torchopt.linear_solve.solve_inv(), train, w_at, v, lr, wd)
            cg = _torchopt_implicit(torchopt.linear_solve.solve_cg(maxiter=100, rtol=1e-14),
                                    train, w_at, v, lr, wd)
            assert _rel(cg.values(), exact.values()) <= 1e-10
        neumann = _torchopt_implicit(torchopt.linear_solve.solve_inv(ns=True, maxiter=terms - 1),
                                     train, w_at, v, lr, wd)
        same = _rel(ours.values(), neumann.values())
        errs[terms] = _rel(ours.values(), exact.values())
        _report(f"implicit i={terms} vs torchopt Neumann maxiter={terms - 1}", same)
        _report(f"implicit i={terms} vs torchopt exact solve (rho^i convergence)", errs[terms])
        assert same <= TIGHT
    values = [errs[t] for t in IMPLICIT_TERMS]
    assert all(a > b for a, b in zip(values, values[1:])), errs
    assert errs[1] > 0.5 and errs[IMPLICIT_TERMS[-1]] <= 1e-12, errs

    # the stationarity form: same dE/dwd, no lr dependence
    x, y = train

    def stationarity(w, lr_, wd_):
        return x.T @ (torch.sigmoid(x @ w) - y) / x.shape[0] + wd_ * w + 0 * lr_

    @torchopt.diff.implicit.custom_root(stationarity, argnums=(1, 2),
                                        solve=torchopt.linear_solve.solve_inv())
    def solver(w_init, lr_, wd_):
        return w_at.clone()

    lr_t = torch.tensor(lr, dtype=D, requires_grad=True)
    wd_t = torch.tensor(wd, dtype=D, requires_grad=True)
    g_lr, g_wd = torch.autograd.grad(solver(w_at.clone(), lr_t, wd_t), (lr_t, wd_t),
                                     grad_outputs=v)
    assert float(g_lr) == 0.0
    err_wd = _rel([ours["weight_decay"]], [g_wd])
    _report("implicit i=300 dE/dwd vs torchopt stationarity form", err_wd)
    assert err_wd <= 1e-10


# ---------------------------------------------------------------------------- benchmarks.peers
def test_peers_script_smoke(tmp_path, capsys):
    """``python -m benchmarks.peers`` at tiny sizes: every case runs, times are finite, the
    markdown section is written."""
    from benchmarks import peers, report

    out = tmp_path / "RESULTS.md"
    peers.main(["--widths", "8", "--cnn-widths", "2", "--bases", "SGD", "--rounds", "1",
                "--steps", "2", "--warmup", "1", "--no-memory", "--out", str(out)])
    text = report.read_section("peers", out)
    assert text is not None and "CPU:" in text and "torch" in text
    rows = [[c.strip() for c in line.strip("|").split("|")]
            for line in text.splitlines() if line.startswith("| MLP") or line.startswith("| CNN")]
    cases = {r[1] for r in rows}
    assert {"vanilla", "ours greedy", "gdtuo", "ours unroll K=5", "higher K=5",
            "torchopt K=5"} <= cases, cases
    assert len({r[0] for r in rows}) == 2
    for row in rows:
        assert float(row[3]) > 0 and math.isfinite(float(row[3])), row
        assert re.fullmatch(r"\d+\.\d\dx", row[4]), row
    assert "written to" in capsys.readouterr().out
