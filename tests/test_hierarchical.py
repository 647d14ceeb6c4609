"""Hierarchical, the default hyper-optimizer for per-tensor and per-element values: a shared
level moved as the global value is, plus bounded deviations.  With the spread at 0 a per-tensor
or per-element run is the global run; the deviations stay bounded and centred; a skipped step
moves nothing; save/resume is exact; bad options are refused; the defaults pick it."""
import io
import math

import pytest
import torch

from hyperopt_wrap import Hierarchical, HyperOptimizer, NormalizedMomentum

from tiny import reloaded, tiny_batch, tiny_model, train

KINDS = ("lr", "momentum", "weight_decay")


def _make(model, granularity, method="greedy", val=True, **kw):
    dtype = next(model.parameters()).dtype
    xv, yv = (t.to(dtype) for t in tiny_batch(5))
    val_loss = (lambda: ((model(xv) - yv) ** 2).mean()) if val else None
    return HyperOptimizer(torch.optim.SGD, model.parameters(), lr=0.05, momentum=0.5,
                          weight_decay=1e-3, tune=KINDS, method=method, val_loss=val_loss,
                          granularity={"lr": granularity, "momentum": "global",
                                       "weight_decay": "global"}, **kw)


def _lrs(opt):
    lr = opt.hyperparameters()["lr"][0]
    if isinstance(lr, list):
        return torch.cat([t.reshape(-1) for t in lr])
    return lr.reshape(-1)


@pytest.mark.parametrize("granularity", ["tensor", "element"])
@pytest.mark.parametrize("method,val", [("greedy", True), ("greedy", False),
                                        ("implicit", True)],
                         ids=["greedy-normalized-level", "greedy-adam-level",
                              "implicit-adam-level"])
def test_spread_zero_reproduces_the_global_run(granularity, method, val):
    """With every deviation held at 0 the level is the global value: its hypergradient is the
    entries' sum and it steps by the global run's rule, so weights and hyperparameters follow
    the global run (float64, 30 steps; the sums are taken in another order: rounding only)."""
    runs = {}
    for gran, kw in (("global", {}), (granularity, {"hyper_optimizer_kwargs": {"spread": 0.0}})):
        model = tiny_model()
        opt = _make(model, gran, method, val, **kw)
        train(opt, model, 30, closure=method == "implicit")
        runs[gran] = (model, opt)
    (m0, o0), (m1, o1) = runs["global"], runs[granularity]
    assert type(o1._controller.hyper_optimizer) is Hierarchical
    lr0 = float(_lrs(o0)[0])
    assert lr0 != pytest.approx(0.05, rel=1e-3)     # the lr moved
    torch.testing.assert_close(_lrs(o1), torch.full_like(_lrs(o1), lr0), rtol=1e-8, atol=0)
    for k in ("momentum", "weight_decay"):
        torch.testing.assert_close(o1.hyperparameters()[k][0], o0.hyperparameters()[k][0],
                                   rtol=1e-8, atol=0)
    for a, b in zip(m1.parameters(), m0.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("granularity", ["tensor", "element"])
def test_deviations_are_bounded(granularity):
    spread = math.log(1.5)
    model = tiny_model()
    opt = _make(model, granularity, hyper_optimizer_kwargs={"spread": spread,
                                                            "deviation_lr": 1.0})
    train(opt, model, 60)
    raw = _lrs(opt).log()
    dev = raw - raw.mean()
    assert dev.abs().max() > 0.5 * spread            # the entries moved apart...
    assert dev.abs().max() <= 2 * spread + 1e-12     # ...within the bound (after re-centring)
    assert sum(p.isfinite().all() for p in model.parameters()) == 4


def test_a_skipped_step_moves_nothing():
    """found_inf set: raw values and every state tensor, counters included, bit-exact."""
    blocks = [torch.randn(3, 4, dtype=torch.float64), torch.randn(5, dtype=torch.float64)]
    opt = Hierarchical([{"params": blocks}], lr=0.1)
    for b in blocks:
        b.grad = torch.randn_like(b)
    opt.step(found_inf=torch.zeros(()))
    before = [b.clone() for b in blocks]
    state = {k: v.clone() for st in opt.state.values() for k, v in st.items()}
    for b in blocks:
        b.grad = torch.randn_like(b)
    opt.step(found_inf=torch.ones(()))
    for b, old in zip(blocks, before):
        assert torch.equal(b, old)
    after = {k: v for st in opt.state.values() for k, v in st.items()}
    assert all(torch.equal(after[k], v) for k, v in state.items())


def test_a_nan_hypergradient_is_zeroed_before_it_reaches_the_state():
    blocks = [torch.zeros(4, dtype=torch.float64)]
    opt = Hierarchical([{"params": blocks}], lr=0.1)
    blocks[0].grad = torch.tensor([1.0, float("nan"), -1.0, 2.0], dtype=torch.float64)
    opt.step(found_inf=torch.ones(()))
    blocks[0].grad = torch.tensor([1.0, 1.0, -1.0, 2.0], dtype=torch.float64)
    opt.step(found_inf=torch.zeros(()))
    assert blocks[0].isfinite().all()
    assert all(v.isfinite().all() for st in opt.state.values() for v in st.values())


@pytest.mark.parametrize("granularity", ["tensor", "element"])
def test_save_and_resume_is_exact(granularity):
    model = tiny_model()
    opt = _make(model, granularity)
    train(opt, model, 7)
    model2, opt2, _ = reloaded(model, opt, lambda m: _make(m, granularity))
    train(opt, model, 6, start=7)
    train(opt2, model2, 6, start=7)
    assert torch.equal(_lrs(opt), _lrs(opt2))
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_save_and_resume_is_exact_in_float32():
    """torch's load_state_dict casts state to the blocks' dtype: the level's state is kept in
    it, so a float32 run resumes bit for bit too."""
    def make(model):
        return _make(model, "element")
    model = tiny_model().float()
    opt = make(model)

    def run(opt, model, steps, start):
        for i in range(start, start + steps):
            x, y = tiny_batch(i)
            opt.zero_grad()
            ((model(x.float()) - y.float()) ** 2).mean().backward()
            opt.step()
    run(opt, model, 7, 0)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    model2 = tiny_model(seed=9).float()
    model2.load_state_dict(saved["model"])
    opt2 = make(model2)
    opt2.load_state_dict(saved["opt"])
    run(opt, model, 6, 7)
    run(opt2, model2, 6, 7)
    assert torch.equal(_lrs(opt), _lrs(opt2))
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("spread", [0.0, math.log(2)])
def test_entries_that_start_apart_keep_their_offsets(spread):
    """Two param groups at lr 0.1 and 0.01, per tensor: the level is the entries' mean shift
    from where they started, so the groups keep their ratio of 10 (spread 0: exactly) or stay
    within the spread of it; nothing is pulled together at the first step."""
    model = tiny_model()
    first, second = list(model.parameters())[:2], list(model.parameters())[2:]
    xv, yv = tiny_batch(5)
    opt = HyperOptimizer(torch.optim.SGD, [{"params": first}, {"params": second, "lr": 0.01}],
                         lr=0.1, momentum=0.5, granularity="tensor", tune=("lr",),
                         val_loss=lambda: ((model(xv) - yv) ** 2).mean(),
                         hyper_optimizer_kwargs={"spread": spread, "deviation_lr": 1.0})
    train(opt, model, 1)
    lrs = [g for g in opt.hyperparameters()["lr"]]
    assert float(lrs[0][0]) / float(lrs[1][0]) == pytest.approx(10.0, rel=0.2)
    train(opt, model, 40, start=1)
    lrs = torch.cat([t.reshape(-1) for t in opt.hyperparameters()["lr"]])
    ratio = (lrs[:2].log().mean() - lrs[2:].log().mean()).exp()
    if spread == 0:
        assert float(ratio) == pytest.approx(10.0, rel=1e-9)
        assert float(lrs[0]) != pytest.approx(0.1, rel=1e-3)      # the level moved
    else:
        assert 10.0 / 4.0 ** 2 <= float(ratio) <= 10.0 * 4.0 ** 2


def test_a_checkpoint_of_another_hyper_optimizer_is_refused():
    model = tiny_model()
    opt = _make(model, "tensor", hyper_optimizer=NormalizedMomentum)
    train(opt, model, 3)
    with pytest.raises(Exception, match="another hyper-optimizer class"):
        reloaded(model, opt, lambda m: _make(m, "tensor"))


@pytest.mark.parametrize("kwargs,match", [
    ({"level": "sgd"}, "level must be one of"),
    ({"spread": -1.0}, "spread must be a finite number >= 0"),
    ({"spread": math.inf}, "spread must be a finite number >= 0"),
    ({"deviation_lr": -0.1}, "deviation_lr must be >= 0"),
    ({"betas": (0.9, 1.0)}, "betas must be two numbers"),
    ({"adam_eps": 0.0}, "adam_eps must be > 0"),
    ({"params": [{"params": [torch.zeros(3)], "spread": -2.0}]}, "spread must be"),
    ({"params": [{"params": [torch.zeros(3)], "level": "sgd"}]}, "level must be"),
    ({"lr": -1.0}, "Invalid learning rate"),
    ({"momentum": 1.0}, "Invalid momentum"),
    ({"eps": 0.0}, "Invalid eps"),
])
def test_bad_options_are_refused(kwargs, match):
    params = kwargs.pop("params", [torch.zeros(3)])
    with pytest.raises(ValueError, match=match):
        Hierarchical(params, **kwargs)


@pytest.mark.parametrize("granularity,method,val,expected", [
    ("tensor", "greedy", True, ("Hierarchical", "normalized")),
    ("element", "greedy", True, ("Hierarchical", "normalized")),
    ("element", "greedy", False, ("Hierarchical", "adam")),
    ("element", "implicit", True, ("Hierarchical", "adam")),
    ("element", "unroll", True, ("Hierarchical", "adam")),
    ("global", "greedy", True, ("NormalizedMomentum", None)),
    ("group", "greedy", True, ("NormalizedMomentum", None)),
    ("global", "implicit", True, ("Adam", None)),
])
def test_the_default_hyper_optimizer(granularity, method, val, expected):
    model = tiny_model()
    opt = _make(model, granularity, method, val)
    h = opt._controller.hyper_optimizer
    assert (type(h).__name__, h.defaults.get("level")) == expected
    if expected[0] == "Hierarchical":      # the kinds tuned globally: a level each, no spread
        spreads = {g["kind"]: g["spread"] for g in h.param_groups}
        assert spreads["momentum"] is None and spreads["weight_decay"] is None
        assert spreads["lr"] == pytest.approx(math.log(2 if granularity == "tensor" else 1.1))


def test_a_hyper_optimizer_named_by_the_user_is_kept():
    model = tiny_model()
    opt = _make(model, "element", hyper_optimizer=NormalizedMomentum)
    assert type(opt._controller.hyper_optimizer) is NormalizedMomentum


def test_a_param_group_added_later_joins_its_kinds_level():
    """add_param_group: the new group's per-tensor entries join the kind's one level (not one
    of their own), starting at the lr the user gave them; with spread 0 their ratio to the
    others stays fixed from then on."""
    model = tiny_model()
    params = list(model.parameters())
    xv, yv = tiny_batch(5)
    opt = HyperOptimizer(torch.optim.SGD, [{"params": params[:2]}], lr=0.05, momentum=0.5,
                         granularity="tensor", tune=("lr",),
                         val_loss=lambda: ((model(xv) - yv) ** 2).mean(),
                         hyper_optimizer_kwargs={"spread": 0.0})
    train(opt, model, 5)
    opt.add_param_group({"params": params[2:], "lr": 0.02})
    groups = opt.hyper_optimizer.param_groups
    assert [g["kind"] for g in groups] == ["lr"] and len(groups[0]["params"]) == 2
    new = opt.hyperparameters()["lr"][1]
    assert torch.allclose(new, torch.full_like(new, 0.02))     # the user's value, kept
    old = float(opt.hyperparameters()["lr"][0][0])
    train(opt, model, 10, start=5)
    lrs = opt.hyperparameters()["lr"]
    assert float(lrs[1][0]) / float(lrs[0][0]) == pytest.approx(0.02 / old, rel=1e-9)
    assert float(lrs[0][0]) != pytest.approx(old, rel=1e-3)    # the level moved


def test_a_value_written_to_a_group_is_kept():
    """Writing weight decay to one param group (per-tensor values under Hierarchical) rebases
    its entries onto the level: the write is not clamped back, the other group not dragged."""
    model = tiny_model()
    params = list(model.parameters())
    xv, yv = tiny_batch(5)
    opt = HyperOptimizer(torch.optim.SGD, [{"params": params[:2]}, {"params": params[2:]}],
                         lr=0.05, momentum=0.5, weight_decay=1e-3, granularity="tensor",
                         tune=("lr", "weight_decay"), hyper_lr=0.01,
                         val_loss=lambda: ((model(xv) - yv) ** 2).mean())
    train(opt, model, 3)
    before = opt.hyperparameters()["weight_decay"]
    opt.param_groups[1]["weight_decay"] = 1e-5
    train(opt, model, 1, start=3)
    after = opt.hyperparameters()["weight_decay"]
    assert torch.allclose(after[1], torch.full_like(after[1], 1e-5), rtol=0.05)
    assert torch.allclose(after[0], before[0], rtol=0.05)


@pytest.mark.parametrize("method,granularity,options,expected", [
    ("implicit", "tensor", {"amsgrad": True}, "Adam"),
    ("implicit", "tensor", {"weight_decay": 0.0}, "Adam"),
    ("greedy", "element", {"normalize": "group"}, "NormalizedMomentum"),
    ("greedy", "element", {"momentum": 0.8}, "Hierarchical"),
    ("implicit", "element", {"betas": (0.8, 0.99)}, "Hierarchical"),
])
def test_options_for_the_methods_own_class_keep_it(method, granularity, options, expected):
    model = tiny_model()
    opt = _make(model, granularity, method, hyper_optimizer_kwargs=options)
    assert type(opt.hyper_optimizer).__name__ == expected


def test_eps_for_an_adam_level_is_adams():
    model = tiny_model()
    opt = _make(model, "element", "implicit", hyper_optimizer_kwargs={"eps": 1e-3})
    group = opt.hyper_optimizer.param_groups[0]
    assert (group["level"], group["adam_eps"], group["eps"]) == ("adam", 1e-3, 1e-8)


@pytest.mark.parametrize("shared", [True, False], ids=["shared-level", "own-levels"])
def test_huge_hypergradients_never_make_a_nan(shared):
    """float32 hypergradients near the top of the range (a run blowing up in finite
    arithmetic): the Adam level's squares stay finite, so neither a step nor a skipped step
    turns a value or the state into NaN (inf - inf)."""
    blocks = [torch.zeros(4), torch.zeros(3)]
    group = {"params": blocks} if shared else {"params": blocks, "spread": None}
    opt = Hierarchical([group], lr=0.1, level="adam")
    for grad, skip in ((3e19, 0.0), (3e19, 1.0), (1.0, 0.0), (3e38, 0.0), (1.0, 0.0)):
        for b in blocks:
            b.grad = torch.full_like(b, grad)
        opt.step(found_inf=torch.tensor(skip))
        assert all(b.isfinite().all() for b in blocks), (grad, skip)
        assert all(v.isfinite().all() for st in opt.state.values() for v in st.values())


def test_a_loaded_value_above_a_default_bound_widens_it():
    """A checkpoint of 0.5 (momentum's bound then 0.9999) holding momentum 0.995 resumes at
    0.995: the default bound widens to contain a loaded value as it does an initial one."""
    def make(model, **kw):
        xv, yv = tiny_batch(5)
        return HyperOptimizer(torch.optim.SGD, model.parameters(), lr=0.05, momentum=0.5,
                              tune=("lr", "momentum"), hyper_lr={"lr": 0.01, "momentum": 0.0},
                              val_loss=lambda: ((model(xv) - yv) ** 2).mean(), **kw)
    model = tiny_model()
    opt = make(model, bounds={"momentum": (0.0, 0.9999)})
    opt.param_groups[0]["momentum"] = 0.995
    train(opt, model, 2)
    model2, opt2, _ = reloaded(model, opt, make)
    train(opt2, model2, 2, start=2)
    assert float(opt2.hyperparameters()["momentum"][0]) == pytest.approx(0.995)
    assert opt2._controller.tuned["momentum"].bounds[1] == pytest.approx(0.995)


@pytest.mark.parametrize("level", ["normalized", "adam"])
def test_many_small_blocks_step_on_one_flat_vector_as_block_by_block(level, monkeypatch):
    """More than FLAT_BLOCKS small blocks take the flat path: the same arithmetic as block by
    block (float64, 25 steps with a skipped one and a NaN in it), the sums in another order;
    the blocks' exp_avg are views into one buffer, rebuilt after a rebase."""
    import hyperopt_wrap.hierarchical as hierarchical
    gen = torch.Generator().manual_seed(0)
    shapes = [(5, 4)] * 6 + [(3,)] * 6
    start = [torch.full(s, -2.0, dtype=torch.float64) for s in shapes]
    start[3] = start[3] - 0.5                   # a block that starts apart
    runs = []
    for flat_blocks in (hierarchical.FLAT_BLOCKS, 10 ** 6):
        monkeypatch.setattr(hierarchical, "FLAT_BLOCKS", flat_blocks)
        blocks = [b.clone() for b in start]
        opt = Hierarchical([{"params": blocks}], lr=0.1, level=level, spread=math.log(1.5),
                           deviation_lr=1.0)
        g = torch.Generator().manual_seed(1)
        for i in range(25):
            for b in blocks:
                b.grad = torch.randn(b.shape, generator=g, dtype=torch.float64)
            if i == 7:
                blocks[2].grad[0, 0] = math.nan
            if i == 12:
                opt.rebase(blocks[4], None, opt.level_of(blocks[4]))
            opt.step(found_inf=torch.tensor(float(i == 7), dtype=torch.float64),
                     eps_scale={b: b.exp() for b in blocks})
        runs.append((blocks, opt))
    (flat, fopt), (blockwise, bopt) = runs
    assert "_flat_shared" in fopt.__dict__ and "_flat_shared" not in bopt.__dict__
    views = fopt.__dict__["_flat_shared"]["views"]
    assert all(fopt.state[b]["exp_avg"] is v for b, v in zip(flat, views))
    for a, b in zip(flat, blockwise):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(fopt.state[a]["exp_avg"], bopt.state[b]["exp_avg"],
                                   rtol=1e-12, atol=1e-12)
    assert not torch.equal(flat[0], start[0])
