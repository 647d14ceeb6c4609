"""What trainers do around step(), made right or refused with the fix.

* a closure that does not reproduce the step's gradient (gradient accumulation: the closure of
  the last micro-batch, after backward() on the others) is detected at its first replay, by
  every closure-curvature method, in a hand loop and under Lightning's
  ``accumulate_grad_batches``; the hand loop without accumulation is unaffected;
* ``opt.replaying`` tells a closure that logs when it is being re-run, and ``step()`` returns
  the step's own loss;
* a scheduler that writes a tuned momentum every step (OneCycleLR) is warned about once, and
  ``cycle_momentum=False`` tunes momentum under the schedule's lr;
* a checkpoint loaded into the torch optimizer continues at the tuned values (global and group
  granularity), and without the ``hyper_nominal`` key;
* a graph without a second derivative (fused attention) names the closure source.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from hyperopt_wrap import CurvatureError, HyperOptimizer

METHODS = ["implicit", "unroll", "rtrl", "forward_gradient"]


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1)).double()


def _data(n=40):
    gen = torch.Generator().manual_seed(1)
    return (torch.randn(n, 4, 5, generator=gen, dtype=torch.double),
            torch.randn(n, 4, 1, generator=gen, dtype=torch.double))


def _accumulating_loop(method, accumulate, steps=12):
    m = _model()
    opt = HyperOptimizer(torch.optim.SGD, m.parameters(), lr=0.1, method=method,
                         curvature="closure", update_every=5)
    x, y = _data(4 * steps)
    for t in range(steps):
        opt.zero_grad()
        if accumulate:
            for k in range(3):
                ((m(x[4 * t + k]) - y[4 * t + k]) ** 2).mean().div(4).backward()

        def closure(xb=x[4 * t + 3], yb=y[4 * t + 3]):
            if not accumulate:
                opt.zero_grad()
            loss = ((m(xb) - yb) ** 2).mean().div(4 if accumulate else 1)
            loss.backward()
            return loss
        opt.step(closure)
    return opt


@pytest.mark.parametrize("method", METHODS)
def test_a_closure_over_one_micro_batch_of_an_accumulated_step_is_refused(method):
    opt = _accumulating_loop(method, accumulate=False)
    assert opt.hypersteps >= 1
    with pytest.raises(CurvatureError, match="accumulated over micro-batches"):
        _accumulating_loop(method, accumulate=True)


def test_replaying_flag_and_the_returned_loss():
    m = _model()
    opt = HyperOptimizer(torch.optim.SGD, m.parameters(), lr=0.1, method="unroll",
                         curvature="closure", update_every=5)
    x, y = _data()
    logged, returned, own = [], [], []
    for t in range(11):
        def closure(xb=x[t], yb=y[t]):
            opt.zero_grad()
            loss = ((m(xb) - yb) ** 2).mean()
            loss.backward()
            if not opt.replaying:
                logged.append(float(loss.detach()))
            return loss
        with torch.no_grad():
            own.append(float(((m(x[t]) - y[t]) ** 2).mean()))
        returned.append(float(opt.step(closure).detach()))
    assert opt.hypersteps == 2        # replays happened (at steps 6 and 11: E is the next batch's)
    assert logged == returned == pytest.approx(own, rel=1e-12)


def _scheduled_steps(opt, sched, m, x, y, steps):
    for t in range(steps):
        opt.zero_grad()
        ((m(x[t]) - y[t]) ** 2).mean().backward()
        opt.step()
        sched.step()


def test_one_cycle_momentum_is_warned_once_and_cycle_momentum_false_tunes():
    m = _model()
    opt = HyperOptimizer(torch.optim.SGD, m.parameters(), lr=0.05, momentum=0.9,
                         tune=("lr", "momentum"))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=30)
    x, y = _data()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        _scheduled_steps(opt, sched, m, x, y, 8)
    ours = [w for w in rec if "cycle_momentum=False" in str(w.message)]
    assert len(ours) == 1
    # the composition that works: the schedule drives lr (a scale on the tuned lr), momentum tuned
    m = _model()
    opt = HyperOptimizer(torch.optim.SGD, m.parameters(), lr=0.05, momentum=0.9,
                         tune=("lr", "momentum"))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=30,
                                                cycle_momentum=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _scheduled_steps(opt, sched, m, x, y, 8)
    assert float(opt.hyperparameters()["momentum"][0]) != pytest.approx(0.9, abs=1e-6)


@pytest.mark.parametrize("granularity", ["global", "group"])
@pytest.mark.parametrize("cls,kw", [(torch.optim.SGD, {"momentum": 0.9, "weight_decay": 1e-3}),
                                    (torch.optim.Adam, {"weight_decay": 1e-3})])
def test_torch_optimizer_continues_at_the_tuned_values(cls, kw, granularity):
    m = _model()
    groups = [{"params": m[0].parameters()}, {"params": m[2].parameters(), "lr": 0.02}]
    tune = ("lr", "momentum", "weight_decay")
    opt = HyperOptimizer(cls, groups, lr=0.01, tune=tune, granularity=granularity,
                         hyper_lr=0.05, **kw)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    x, y = _data()
    for t in range(7):
        opt.zero_grad()
        ((m(x[t]) - y[t]) ** 2).mean().backward()
        opt.step()
        sched.step()
    sd = opt.state_dict()
    in_use = opt.hyperparameters()
    plain = cls([{"params": m[0].parameters()}, {"params": m[2].parameters()}], lr=1.0, **kw)
    plain.load_state_dict(copy.deepcopy(sd))     # (torch's load keeps the state's tensors)
    for gi, group in enumerate(plain.param_groups):
        assert "hyper_nominal" not in group
        for kind in tune:
            got = group["betas"][0] if kind == "momentum" and "betas" in group else group[kind]
            assert got == pytest.approx(float(in_use[kind][gi]), rel=1e-6), (gi, kind)
    assert float(in_use["lr"][0]) != pytest.approx(0.01 * 0.25, rel=1e-3)   # it did move
    # ours, resumed with the hyper-optimizer frozen, and the plain optimizer take the same step
    twin = copy.deepcopy(m)
    ours = HyperOptimizer(cls, [{"params": twin[0].parameters()},
                                {"params": twin[2].parameters(), "lr": 0.02}],
                          lr=0.01, tune=tune, granularity=granularity, hyper_lr=0.05, **kw)
    ours.load_state_dict(copy.deepcopy(sd))
    assert ours.state_dict()["param_groups"] == sd["param_groups"]
    for group, saved in zip(ours.param_groups, sd["hyper"]["groups"]):
        assert group["lr"] == saved["lr"]          # the schedule's lr, as kept before saving
    for g in ours.hyper_optimizer.param_groups:
        g["lr"] = 0.0
    for model, o in ((m, plain), (twin, ours)):
        o.zero_grad()
        ((model(x[7]) - y[7]) ** 2).mean().backward()
        o.step()
    for p, q in zip(m.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-9)


def test_tensor_granularity_keeps_the_schedule_entries():
    m = _model()
    opt = HyperOptimizer(torch.optim.SGD, m.parameters(), lr=0.01, granularity="tensor")
    x, y = _data()
    for t in range(3):
        opt.zero_grad()
        ((m(x[t]) - y[t]) ** 2).mean().backward()
        opt.step()
    sd = opt.state_dict()
    assert sd["param_groups"][0]["lr"] == 0.01 and "hyper_nominal" not in sd["param_groups"][0]
    again = HyperOptimizer(torch.optim.SGD, m.parameters(), lr=0.01, granularity="tensor")
    again.load_state_dict(sd)
    torch.testing.assert_close(again.hyperparameters()["lr"][0], opt.hyperparameters()["lr"][0],
                               rtol=0, atol=0)


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        q = self.proj(x).view(x.shape[0], 2, x.shape[1], 4)
        return F.scaled_dot_product_attention(q, q, q).sum()


def test_fused_attention_without_double_backward_names_the_closure():
    torch.manual_seed(0)
    model = _Attention()
    opt = HyperOptimizer(torch.optim.SGD, model.parameters(), lr=0.1, method="implicit",
                         update_every=2)
    x = torch.randn(3, 5, 8)
    with pytest.raises(CurvatureError, match="curvature='closure'"):
        for _ in range(4):
            opt.zero_grad()
            model(x).backward(create_graph=opt.needs_graph)
            opt.step()
    # the closure source works on the same model
    opt = HyperOptimizer(torch.optim.SGD, model.parameters(), lr=0.1, method="implicit",
                         update_every=2, curvature="closure")
    for _ in range(5):
        def closure():
            opt.zero_grad()
            loss = model(x)
            loss.backward()
            return loss
        opt.step(closure)
    assert opt.hypersteps == 2


def test_transformers_sdpa_names_the_closure_and_eager_attention_works():
    transformers = pytest.importorskip("transformers")

    def model(attn):
        torch.manual_seed(0)
        cfg = transformers.GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1,
                                      n_head=2, bos_token_id=0, eos_token_id=0,
                                      attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0,
                                      attn_implementation=attn)    # (no dropout: the flash kernel)
        m = transformers.GPT2LMHeadModel(cfg)
        assert m.config._attn_implementation == attn
        return m

    tokens = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(0))

    def train(m, steps=3):
        opt = HyperOptimizer(torch.optim.SGD, m.parameters(), lr=0.01, method="implicit",
                             update_every=2)
        for _ in range(steps):
            opt.zero_grad()
            m(input_ids=tokens, labels=tokens).loss.backward(create_graph=opt.needs_graph)
            opt.step()
        return opt

    with pytest.raises(CurvatureError, match="attn_implementation='eager'"):
        train(model("sdpa"))
    assert train(model("eager")).hypersteps == 1


def test_zero_grad_in_place_on_parameters_a_closure_does_not_use_is_not_clipping():
    """Only the gradients the closure's own backward produced are checked for in-place writes
    after it: a parameter it leaves out, zeroed in place by zero_grad(set_to_none=False), is
    not mistaken for a clipped one."""
    torch.manual_seed(0)
    a, b = nn.Linear(3, 1).double(), nn.Linear(3, 1).double()
    opt = HyperOptimizer(torch.optim.SGD, [*a.parameters(), *b.parameters()], lr=0.1,
                         method="unroll", curvature="closure", update_every=5)
    x = torch.randn(4, 3, dtype=torch.double)
    for t in range(12):
        def closure(t=t):
            opt.zero_grad(set_to_none=False)
            loss = (a if t % 2 else b)(x).pow(2).mean()
            loss.backward()
            return loss
        opt.step(closure)
    assert opt.hypersteps == 2
    with pytest.raises(CurvatureError, match="changed p.grad in place after its backward"):
        for t in range(6):
            def clipping(t=t):
                opt.zero_grad(set_to_none=False)
                loss = (a if t % 2 else b)(x).pow(2).mean()
                loss.backward()
                torch.nn.utils.clip_grad_norm_([*a.parameters(), *b.parameters()], 1e-3)
                return loss
            opt.step(clipping)
