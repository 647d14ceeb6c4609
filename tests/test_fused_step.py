"""The fused step: greedy with a tuned lr shared by a bucket on SGD with heavy-ball momentum
runs torch's ``_fused_sgd_`` on the gradients themselves (no copy, no select), the lr tangent
left in the momentum buffer.  It must be the same optimizer as the copy-and-foreach path
(``foreach=False`` groups take that path): weights, buffers, tuned values and hypergradients
in float64 to 1e-12 step by step, a skipped step included; where it does not apply it is not
taken; a checkpoint saved between fused steps holds tangents of its own and resumes exactly."""
import io

import pytest
import torch

from hyperopt_wrap import HyperOptimizer
from hyperopt_wrap.stepper import Stepper

from tiny import tiny_batch, tiny_model

RTOL = 1e-12


@pytest.fixture
def fused_calls(monkeypatch):
    """How many buckets' steps ran on the fused kernel."""
    calls = []
    original = Stepper.step_fused

    def spy(self, buckets, *args, **kwargs):
        calls.append(len(buckets))
        return original(self, buckets, *args, **kwargs)
    monkeypatch.setattr(Stepper, "step_fused", spy)
    return calls


def _make(model, foreach=None, granularity="global", groups=None, base=None, cls=None,
          method="greedy", **kw):
    cls = cls or torch.optim.SGD
    settings = {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3} if cls is torch.optim.SGD \
        else {"lr": 0.01, "weight_decay": 1e-3}
    settings.update(base or {})
    if groups is not None:      # the first layer at groups[0], the second at groups[1]
        params = [{"params": list(model[0].parameters()), "lr": groups[0]},
                  {"params": list(model[2].parameters()), "lr": groups[1]}]
    else:
        params = model.parameters()
    return HyperOptimizer(cls, params, method=method, tune=("lr",),
                          granularity=granularity, hyper_lr=0.05, foreach=foreach, **settings,
                          **kw)


def _loss(model, i, nan_at=()):
    dtype = next(model.parameters()).dtype
    x, y = (t.to(dtype) for t in tiny_batch(i))
    loss = ((model(x) - y) ** 2).mean()
    return loss * float("nan") if i in nan_at else loss


def _snapshot(opt, model):
    """Weights, tuned values and the latest hypergradient after a step (float64 copies)."""
    return ([p.detach().clone() for p in model.parameters()],
            {k: _copy(vs) for k, vs in opt.hyperparameters().items()},
            {k: _copy(vs) for k, vs in opt.last_hypergradient().items()})


def _run(opt, model, steps, start=0, nan_at=()):
    trace = []
    for i in range(start, start + steps):
        opt.zero_grad()
        _loss(model, i, nan_at).backward()
        opt.step()
        trace.append(_snapshot(opt, model))
    return trace


def _run_closure(opt, model, steps, nan_at=()):
    """As :func:`_run`, each step through ``opt.step(closure)``."""
    trace = []
    for i in range(steps):
        def closure(i=i):
            opt.zero_grad()
            loss = _loss(model, i, nan_at)
            loss.backward()
            return loss
        opt.step(closure)
        trace.append(_snapshot(opt, model))
    return trace


def _copy(entries):
    """Entries as 1-D float64 tensors (a float, a 0-dim or 1-D tensor, or element blocks)."""
    out = []
    for v in entries:
        if isinstance(v, list):
            v = torch.cat([t.reshape(-1) for t in v])
        out.append(torch.as_tensor(v, dtype=torch.float64).reshape(-1).clone())
    return out


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def _assert_same(trace_a, trace_b, rtol=RTOL):
    for step, ((wa, ha, ga), (wb, hb, gb)) in enumerate(zip(trace_a, trace_b)):
        for x, y in zip(wa, wb):
            assert _rel(x, y) <= rtol, f"weights differ at step {step}"
        for k in ha:
            for x, y in zip(ha[k], hb[k]):
                assert _rel(x, y) <= rtol, f"{k} differs at step {step}"
        for k in ga:
            for x, y in zip(ga[k], gb[k]):
                assert torch.isfinite(x).all()
                assert (x - y).abs().max().item() <= rtol * max(y.abs().max().item(), 1e-30), \
                    f"hypergradient of {k} differs at step {step}"


CASES = {
    "global": {},
    "group granularity, two groups": {"granularity": "group", "groups": (0.03, 0.05)},
    "a frozen group (lr=0)": {"granularity": "group", "groups": (0.05, 0.0)},
    "dampening": {"base": {"dampening": 0.3}},
    "maximize": {"base": {"maximize": True}},
    "no weight decay": {"base": {"weight_decay": 0.0}},
    "update_every 3": {"update_every": 3},
    "per-tensor lr (a kernel call per tensor)": {"granularity": "tensor"},
    "per-tensor lr, two groups": {"granularity": "tensor", "groups": (0.03, 0.05)},
}


ADAM_CASES = {
    "Adam": {},
    "Adam, amsgrad": {"base": {"amsgrad": True}},
    "Adam, maximize": {"base": {"maximize": True}},
    "Adam, no weight decay": {"base": {"weight_decay": 0.0}},
    "AdamW without weight decay": {"cls": torch.optim.AdamW, "base": {"weight_decay": 0.0}},
    "Adam, two groups": {"granularity": "group", "groups": (0.02, 0.01)},
    "Adam, update_every 3": {"update_every": 3},
    "Adam, per-tensor lr": {"granularity": "tensor"},
}


@pytest.mark.parametrize("case", list(CASES) + list(ADAM_CASES))
def test_fused_step_equals_the_copy_and_foreach_path(case, fused_calls):
    kw = {**CASES, **ADAM_CASES}[case]
    adam = case in ADAM_CASES
    if adam:
        kw = {"cls": torch.optim.Adam, **kw}
    m1, m2 = tiny_model(), tiny_model()
    fused = _run(_make(m1, **kw), m1, 25)
    # every step but SGD's first (no momentum buffer yet); Adam's first too
    assert len(fused_calls) == (25 if adam else 24)
    plain = _run(_make(m2, foreach=False, **kw), m2, 25)
    assert len(fused_calls) == (25 if adam else 24)   # foreach=False: the copying path
    _assert_same(fused, plain)
    # the tuning moved lr: the comparison is not between two frozen runs
    lr0 = (kw.get("groups") or (0.01 if adam else 0.05,))[0]
    assert (fused[-1][1]["lr"][0] - lr0).abs().min().item() > 1e-4 * lr0


@pytest.mark.parametrize("cls", [torch.optim.SGD, torch.optim.Adam])
def test_a_non_finite_step_is_skipped_as_on_the_copy_path(cls, fused_calls):
    m1, m2 = tiny_model(), tiny_model()
    o1, o2 = _make(m1, cls=cls), _make(m2, foreach=False, cls=cls)
    fused = _run(o1, m1, 12, nan_at=(6,))
    plain = _run(o2, m2, 12, nan_at=(6,))
    assert len(fused_calls) == (11 if cls is torch.optim.SGD else 12)
    _assert_same(fused, plain)
    # the NaN step left the weights as they were, counted, and the lr backed off
    assert all(torch.equal(a, b) for a, b in zip(fused[5][0], fused[6][0]))
    assert o1.skipped_steps == 1 and o1.skipped_hypersteps == o2.skipped_hypersteps
    assert all(torch.isfinite(t).all() for p in m1.parameters() for t in o1.state[p].values())
    assert fused[7][1]["lr"][0].item() < 0.75 * fused[5][1]["lr"][0].item()
    if cls is torch.optim.Adam:     # 11 steps taken, the skipped one not counted
        assert o1.state[m1[0].weight]["step"].item() == 11 == o2.state[m2[0].weight]["step"]


def test_found_inf_on_the_wrapper_skips_the_fused_step(fused_calls):
    model = tiny_model()
    opt = _make(model)
    _run(opt, model, 3)
    before = [p.detach().clone() for p in model.parameters()]
    bufs = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    opt.found_inf = torch.ones(())
    _run(opt, model, 1, start=3)
    del opt.found_inf
    assert fused_calls and all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert all(torch.equal(b, opt.state[p]["momentum_buffer"])
               for b, p in zip(bufs, model.parameters()))
    assert opt.skipped_steps == 1


@pytest.mark.parametrize("cls", [torch.optim.SGD, torch.optim.Adam])
def test_a_checkpoint_between_fused_steps_holds_its_own_tangents_and_resumes_exactly(cls):
    m1 = tiny_model()
    o1 = _make(m1, cls=cls)
    _run(o1, m1, 7)
    saved = o1.state_dict()
    pending = saved["hyper"]["method"]["pending"]
    (tangent,) = [t["lr"] for t in pending["tangents"]]
    assert isinstance(tangent, torch.Tensor)      # not the live optimizer state
    assert pending["in_state"] == [{"lr": [] if cls is torch.optim.SGD
                                    else [0.9, 0.999, 1e-8, False]}]
    if cls is torch.optim.SGD:
        expected = -torch.cat([o1.state[p]["momentum_buffer"].reshape(-1)
                               for p in m1.parameters()])
    else:                                         # -m_hat / (sqrt(v_hat) + eps), by hand
        parts = []
        for p in m1.parameters():
            st = o1.state[p]
            t = st["step"].item()
            m_hat = st["exp_avg"] / (1 - 0.9 ** t)
            v_hat = st["exp_avg_sq"] / (1 - 0.999 ** t)
            parts.append((-m_hat / (v_hat.sqrt() + 1e-8)).reshape(-1))
        expected = torch.cat(parts)
    assert _rel(tangent, expected) <= 1e-12
    buf = io.BytesIO()
    torch.save({"model": m1.state_dict(), "opt": saved}, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    m2 = tiny_model(seed=5)
    m2.load_state_dict(loaded["model"])
    o2 = _make(m2, cls=cls)
    o2.load_state_dict(loaded["opt"])
    _assert_same(_run(o2, m2, 8, start=7), _run(o1, m1, 8, start=7), rtol=0.0)


@pytest.mark.parametrize("granularity", ["global", "tensor"])
def test_a_parameter_without_gradient_after_a_fused_step(granularity, fused_calls):
    """The layout changes between steps: the pending tangent (the momentum buffers) is matched
    parameter by parameter, as a flat one is; per-tensor slots of a bucket that covers part of
    its group are indexed."""
    def run(foreach):
        model = tiny_model()
        opt = _make(model, foreach=foreach, granularity=granularity)
        trace = _run(opt, model, 5)
        for i in range(5, 9):       # the last layer's bias gets no gradient for a while
            opt.zero_grad()
            _loss(model, i).backward()
            model[2].bias.grad = None
            opt.step()
        return trace + _run(opt, model, 5, start=9)
    fused = run(None)
    assert fused_calls
    _assert_same(fused, run(False))


def test_with_val_loss_the_fused_step_equals_the_copy_path(fused_calls):
    def run(foreach):
        model = tiny_model()
        xv, yv = tiny_batch(7)
        opt = _make(model, foreach=foreach, update_every=2,
                    val_loss=lambda: ((model(xv) - yv) ** 2).mean())
        return _run(opt, model, 12)
    fused = run(None)
    assert len(fused_calls) == 11
    _assert_same(fused, run(False))


NOT_FUSED = {
    "nesterov": {"base": {"nesterov": True}},
    "plain SGD (no buffer to hold the tangent)": {"base": {"momentum": 0.0}},
    "momentum tuned too": {"tune": ("lr", "momentum")},
    "per-element lr": {"granularity": "element"},
    "max_grad_norm": {"max_grad_norm": 1.0},
    "rollback": {"recovery": "rollback"},
    "bfloat16 (torch's CPU kernel drifts far from its for-loop)": {"dtype": torch.bfloat16},
    "AdamW with weight decay (its lr tangent reads the weights before the step)":
        {"cls": torch.optim.AdamW},
    "Adam, beta1 tuned too": {"cls": torch.optim.Adam, "tune": ("lr", "momentum")},
    "Adam, per-element lr": {"cls": torch.optim.Adam, "granularity": "element"},
}


@pytest.mark.parametrize("case", NOT_FUSED)
def test_the_fused_step_is_not_taken_where_it_does_not_apply(case, fused_calls):
    kw = dict(NOT_FUSED[case])
    model = tiny_model().to(kw.pop("dtype", torch.float64))
    tune = kw.pop("tune", None)
    if tune is not None:
        cls = kw.pop("cls", torch.optim.SGD)
        opt = HyperOptimizer(cls, model.parameters(), method="greedy", tune=tune,
                             **({"lr": 0.05, "momentum": 0.9} if cls is torch.optim.SGD
                                else {"lr": 0.01}))
    else:
        opt = _make(model, **kw)
    _run(opt, model, 6)
    assert fused_calls == []


@pytest.mark.parametrize("method", ["implicit", "unroll"])
@pytest.mark.parametrize("cls", [torch.optim.SGD, torch.optim.Adam])
def test_recording_methods_fuse_the_steps_between_recordings(method, cls, fused_calls):
    """Implicit records the window's last step, unroll its last 5; the others (but the one
    whose gradient completes a window, and SGD's first) take the fused kernel, and the run
    equals the copying path."""
    def run(foreach):
        model = tiny_model()
        opt = _make(model, foreach=foreach, cls=cls, granularity="tensor", method=method,
                    update_every=8)
        return _run_closure(opt, model, 24)
    fused = run(None)
    recorded = 1 if method == "implicit" else 5
    first = 1 if cls is torch.optim.SGD else 0
    assert len(fused_calls) == 24 - 3 * recorded - 2 - first     # (windows 2 and 3 start)
    plain = run(False)
    # (the closure's finite-difference products see weights that differ in the last bit, the
    # fused kernel rounding otherwise than the foreach ops: 2e-10 relative, measured)
    _assert_same(fused, plain, rtol=1e-8 if method == "implicit" or cls is torch.optim.Adam
                 else RTOL)
    assert fused[-1][2]["lr"][0].abs().min().item() > 0


@pytest.mark.parametrize("method", ["greedy", "implicit", "unroll"])
@pytest.mark.parametrize("cls", [torch.optim.SGD, torch.optim.Adam])
def test_the_check_computes_the_state_dots_only_for_a_method_that_reads_them(method, cls,
                                                                           monkeypatch):
    """Greedy without val_loss reads the fused step's dots of the gradients with the state (its
    hypergradient, computed by the finite check); implicit and unroll read none, so their
    fused steps check the gradients themselves (Adam's dots would first form m / (sqrt(v) +
    eps), three passes).  A non-finite gradient still skips the step either way."""
    from hyperopt_wrap.rules.base import StateAlias
    dots = []
    for t in (StateAlias, *StateAlias.__subclasses__()):     # (Adam's computes its ratios)
        if "dots" in vars(t):
            original = vars(t)["dots"]
            monkeypatch.setattr(t, "dots", lambda self, metas, _o=original:
                                dots.append(len(metas)) or _o(self, metas))
    model = tiny_model()
    opt = _make(model, cls=cls, method=method, update_every=8 if method != "greedy" else 1)
    for i in range(6):              # within the first window: no recorded step yet
        def closure(i=i):
            opt.zero_grad()
            loss = _loss(model, i, nan_at=(4,))
            loss.backward()
            return loss
        opt.step(closure)
    assert opt.skipped_steps == 1
    if method == "greedy":
        assert len(dots) >= 4
    else:
        assert dots == []


@pytest.mark.parametrize("bad", [float("inf"), -float("inf"), float("nan")])
@pytest.mark.parametrize("buffer_entry", [0.0, 1.0])
def test_one_non_finite_gradient_element_skips_the_fused_step(bad, buffer_entry, fused_calls):
    """The fused step's check is the gradient's dot with the momentum buffer: one bad element
    makes it non-finite even where the buffer holds 0 there (inf * 0 is NaN)."""
    model = tiny_model()
    opt = _make(model)
    _run(opt, model, 3)
    opt.zero_grad()
    _loss(model, 3).backward()
    w = model[0].weight
    w.grad[1, 2] = bad
    opt.state[w]["momentum_buffer"][1, 2] = buffer_entry
    before = [p.detach().clone() for p in model.parameters()]
    bufs = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    calls = len(fused_calls)
    opt.step()
    assert len(fused_calls) == calls + 1
    assert opt.skipped_steps == 1
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert all(torch.equal(b, opt.state[p]["momentum_buffer"])
               for b, p in zip(bufs, model.parameters()))
    _run(opt, model, 3, start=4)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert torch.isfinite(opt.hyperparameters()["lr"][0])


def test_a_finite_gradient_whose_dot_overflows_is_skipped_as_a_non_finite_one(fused_calls):
    """The documented limit of the dot check: float32, |g| * |buf| past 3.4e38."""
    model = tiny_model().float()
    opt = _make(model)
    _run(opt, model, 3)
    opt.zero_grad()
    _loss(model, 3).backward()
    w = model[0].weight
    w.grad.fill_(1e20)
    opt.state[w]["momentum_buffer"].fill_(1e20)
    before = w.detach().clone()
    opt.step()
    assert fused_calls and opt.skipped_steps == 1 and torch.equal(before, w)


def test_a_malformed_in_state_entry_is_refused_with_nothing_changed():
    from hyperopt_wrap.checkpoint import CheckpointError
    model = tiny_model()
    opt = _make(model, cls=torch.optim.Adam)
    _run(opt, model, 4)
    saved = opt.state_dict()
    before = opt.state_dict()
    for bad in ("lr", [["lr"]], [{"momentum": []}], [{"lr": []}, {"lr": []}], [{"lr": 0.9}]):
        broken = {**saved, "hyper": {**saved["hyper"], "method": {"pending": {
            **saved["hyper"]["method"]["pending"], "in_state": bad}}}}
        with pytest.raises(CheckpointError, match="in_state"):
            opt.load_state_dict(broken)
        after = opt.state_dict()
        assert torch.equal(after["hyper"]["method"]["pending"]["tangents"][0]["lr"],
                           before["hyper"]["method"]["pending"]["tangents"][0]["lr"])


def test_many_small_tensors_keep_the_copying_path(fused_calls):
    """The fused step's dots and per-tensor calls loop over tensors in Python; a bucket of
    many small ones (on average under 4096 elements, more than 8 tensors) is copied instead."""
    def chain(n):
        torch.manual_seed(0)
        return torch.nn.Sequential(*[torch.nn.Linear(5, 5, bias=False) for _ in range(n)],
                                   torch.nn.Linear(5, 2)).double()
    for n, fused in ((9, False), (6, True)):
        model = chain(n)
        opt = _make(model, cls=torch.optim.Adam)
        before = len(fused_calls)
        _run(opt, model, 3)
        assert (len(fused_calls) > before) == fused, n


def _sgd_net(memory_format):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), torch.nn.Tanh(), torch.nn.Flatten(),
                              torch.nn.Linear(4 * 3 * 3, 2)).double()
    return net.to(memory_format=memory_format)


def test_channels_last_weights_keep_the_copying_path_and_follow_torch(fused_calls):
    """torch's CPU kernels walk storage order: a channels_last weight with a contiguous
    momentum buffer (the copying path's) would pair the wrong elements.  Found in review:
    0.145 relative off torch's SGD after 6 steps before the layout check."""
    x = torch.randn(8, 2, 5, 5, dtype=torch.float64).to(memory_format=torch.channels_last)
    y = torch.randn(8, 2, dtype=torch.float64)
    ours, theirs = _sgd_net(torch.channels_last), _sgd_net(torch.channels_last)
    opt = HyperOptimizer(torch.optim.SGD, ours.parameters(), method="greedy", tune=("lr",),
                         hyper_lr=0.0, lr=0.05, momentum=0.9, weight_decay=1e-3)
    ref = torch.optim.SGD(theirs.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    for _ in range(6):
        for o, m in ((opt, ours), (ref, theirs)):
            o.zero_grad()
            ((m(x) - y) ** 2).mean().backward()
            o.step()
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert _rel(a.detach(), b.detach()) <= 1e-12


def test_a_non_contiguous_gradient_keeps_the_copying_path(fused_calls):
    model = tiny_model()
    opt = _make(model)
    _run(opt, model, 3)
    calls = len(fused_calls)
    opt.zero_grad()
    _loss(model, 3).backward()
    w = model[0].weight
    w.grad = w.grad.t().contiguous().t()            # the same values, transposed strides
    assert not w.grad.is_contiguous()
    opt.step()
    assert len(fused_calls) == calls


@pytest.mark.parametrize("change", ["betas", "eps", "amsgrad"])
def test_adam_settings_changed_between_steps_read_the_pending_tangent_as_it_was(change,
                                                                                 fused_calls):
    """The check's dots are formed with the coming step's betas and eps; a pending tangent
    formed with others is read with its own (found in review: 0.36 relative off with betas
    written every step, 8 off for one beta2 change, OneCycleLR's default)."""
    def run(foreach):
        model = tiny_model()
        opt = _make(model, cls=torch.optim.Adam, foreach=foreach)
        trace = []
        for i in range(10):
            g = opt.param_groups[0]
            if change == "betas":
                g["betas"] = (0.9 - 0.02 * i, 0.999 - 0.01 * i)
            elif change == "eps" and i == 5:
                g["eps"] = 1e-3
            elif change == "amsgrad" and i == 5:
                g["amsgrad"] = True
                for p in model.parameters():
                    opt.state[p].setdefault("max_exp_avg_sq", opt.state[p]["exp_avg_sq"].clone())
            trace += _run(opt, model, 1, start=i)
        return trace
    fused = run(None)
    assert fused_calls
    _assert_same(fused, run(False))


@pytest.mark.parametrize("refit", [None, 2])
@pytest.mark.parametrize("val", [False, True])
@pytest.mark.parametrize("cls", [torch.optim.SGD, torch.optim.Adam])
def test_distill_between_readouts_takes_the_fused_step(cls, val, refit, fused_calls):
    """Distill's carry between readouts moves x* and reads no gradient, so those steps run on
    the fused kernel: the same optimizer as the copying path, in float64 to 1e-12 step by
    step (1e-10 with refits: their closure products are finite differences; 1.9e-11
    measured).  Not fused: a readout (the closure at w*), without ``val_loss`` the step after it
    (its gradient is the readout's meta-gradient), a refit's recorded steps and SGD's first."""
    from hyperopt_wrap import Distill
    adam = cls is torch.optim.Adam

    def make(model, foreach=None):
        val_loss = (lambda: _loss(model, 99)) if val else None
        return _make(model, foreach=foreach, cls=cls, update_every=4, val_loss=val_loss,
                     curvature="closure",
                     method=Distill(gamma=0.9, refit_every=refit, horizon=2))
    m1, m2 = tiny_model(), tiny_model()
    fused = _run_closure(make(m1), m1, 24)
    n = len(fused_calls)
    if refit is None:
        # 6 windows of 4: positions 0-2 fused, 3 read; without val_loss position 0 after a
        # read is not either (the very first step is: nothing pends), and SGD's very first
        # step has no momentum buffer yet
        assert n == (6 * 3 - (0 if adam else 1) if val else 6 * 2 + (1 if adam else 0))
    else:
        # refit windows 0, 2, 4 record their positions 2-3 (horizon 2) and are read there
        assert n == ((15 if adam else 14) if val else (10 if adam else 9))
    plain = _run_closure(make(m2, foreach=False), m2, 24)
    assert len(fused_calls) == n                   # foreach=False: the copying path
    # a refit's finite-difference products divide the kernels' last-bit differences by eps
    _assert_same(fused, plain, RTOL if refit is None else 1e-10)
    lr0 = 0.01 if adam else 0.05
    assert abs(fused[-1][1]["lr"][0].item() - lr0) > 1e-4 * lr0   # the tuning moved lr


def _distill_opt(model, foreach=None, **method):
    from hyperopt_wrap import Distill
    return _make(model, foreach=foreach, update_every=4, curvature="closure",
                 method=Distill(gamma=0.9, refit_every=None, **method))


def test_distill_skips_a_non_finite_fused_step_as_the_copying_path(fused_calls):
    """A NaN gradient on a fused step between readouts (step 5: position 1 of the second
    window): skipped by the kernel, x* left where it was, the same run as the copying path."""
    m1, m2 = tiny_model(), tiny_model()
    o1, o2 = _distill_opt(m1), _distill_opt(m2, foreach=False)
    fused = _run_closure(o1, m1, 16, nan_at=(5,))
    assert len(fused_calls) == 4 * 2           # positions 1-2 of each window: the skip is the kernel's
    plain = _run_closure(o2, m2, 16, nan_at=(5,))
    _assert_same(fused, plain)
    assert all(torch.equal(a, b) for a, b in zip(fused[4][0], fused[5][0]))
    assert o1.skipped_steps == 1 == o2.skipped_steps
    st1 = o1.state_dict()["hyper"]["method"]
    st2 = o2.state_dict()["hyper"]["method"]
    assert st1["t"].item() == st2["t"].item() == 15           # the skipped step not counted
    for k, w in st2["w"].items():
        assert _rel(st1["w"][k].reshape(-1), w.reshape(-1)) <= RTOL


@pytest.mark.parametrize("method", [{"batch": "distilled"}, {"read_every_step": True}])
def test_distill_steps_that_need_their_gradient_are_not_fused(method, fused_calls):
    """Eq. 14's kept batches need every step's closure, and reading every step needs every
    step's gradient: neither takes the fused kernel."""
    model = tiny_model()
    _run_closure(_distill_opt(model, **method), model, 12)
    assert fused_calls == []
