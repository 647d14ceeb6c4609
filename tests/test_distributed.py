"""torch.distributed: 2 gloo processes on the CPU, float64, a tiny MLP, a few steps.

One spawn runs every scenario (DDP, DDP with a per-rank ``val_loss``, FSDP2 with SGD, Adam
and a per-rank ``val_loss``, ZeRO, the refusals) and saves what each rank saw; the tests
compare it with a single-process run on the concatenated batch, computed here:

* the tuned hyperparameters are identical (bit for bit) on both ranks, and equal to the single
  process's within float64 rounding (the sums are split across ranks);
* a checkpoint resumes them: DDP's ``state_dict()`` (any rank's: they are equal), FSDP2's per
  rank (sharded) ``state_dict()``, each saved with ``torch.save``, loaded into a fresh model and
  optimizer, continued, equal to the uninterrupted run;
* DDP with a ``val_loss`` on a different validation batch per rank: the averaged hypergradient
  keeps the hyperparameters identical and equal to the single process's on the joint validation
  batch, where ``process_group=None`` lets the ranks drift apart;
* ``step()`` reads no tensor on the host, collectives included (the suite's guard);
* a non-finite gradient shard, or validation loss, on one rank skips the step, or the
  hyper-step, on every rank;
* ``ZeroRedundancyOptimizer(optimizer_class=HyperOptimizer...)`` and what FSDP2 does not
  support are refused with a message naming what works.
"""
from __future__ import annotations

import datetime
import functools
import os
import time
import traceback

import pytest
import torch
from torch import nn

import hyperopt_wrap
from hyperopt_wrap import HyperOptimizer

dist = torch.distributed
pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")

WORLD = 2
STEPS, SAVE_AT = 6, 3
PER_RANK = 4        # examples per rank and step


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS, WORLD * PER_RANK, 3, generator=g, dtype=torch.float64)
    y = torch.randn(STEPS, WORLD * PER_RANK, 1, generator=g, dtype=torch.float64)
    xv = torch.randn(WORLD * PER_RANK, 3, generator=g, dtype=torch.float64)
    yv = torch.randn(WORLD * PER_RANK, 1, generator=g, dtype=torch.float64)
    return x, y, xv, yv


def _model():
    # Linear(4, 1): under FSDP2 rank 1's shards of its weight and bias are empty
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()


CONFIGS = {
    "sgd": dict(optimizer_cls=torch.optim.SGD, lr=0.05, momentum=0.9, tune=("lr", "momentum"),
                granularity={"lr": "tensor", "momentum": "global"}, hyper_lr=0.05),
    "sgd_group": dict(optimizer_cls=torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=1e-3,
                      tune=("lr", "weight_decay"), granularity="group", hyper_lr=0.05),
    "adam": dict(optimizer_cls=torch.optim.Adam, lr=0.01, tune=("lr", "momentum"),
                 granularity="group", hyper_lr=0.05, update_every=2),
    "sgd_clip": dict(optimizer_cls=torch.optim.SGD, lr=0.05, momentum=0.9, tune=("lr",),
                     granularity="tensor", hyper_lr=0.05, max_grad_norm=0.05),
    "sgd_noclip": dict(optimizer_cls=torch.optim.SGD, lr=0.05, momentum=0.9, tune=("lr",),
                       granularity="tensor", hyper_lr=0.05),
    "sgd_element": dict(optimizer_cls=torch.optim.SGD, lr=0.05, momentum=0.9, tune=("lr",),
                        granularity="element", hyper_lr=0.05),
}


def _optimizer(module, config, **extra):
    kw = dict(CONFIGS[config], **extra)
    cls = kw.pop("optimizer_cls")
    groups = [{"params": list(module[0].parameters())}, {"params": list(module[2].parameters())}]
    return HyperOptimizer(cls, groups, **kw)


def _train(model, opt, rows, steps):
    x, y, _, _ = _data()
    for t in steps:
        opt.zero_grad()
        nn.functional.mse_loss(model(x[t][rows]), y[t][rows]).backward()
        opt.step()


def _hyper(opt):
    """The tuned values as plain tensors (kind -> per group)."""
    def flat(v):    # element granularity: one tensor per parameter
        return torch.cat([t.reshape(-1) for t in v]) if isinstance(v, list) else torch.as_tensor(v)
    return {k: [flat(v).detach().clone() for v in vs]
            for k, vs in opt.hyperparameters().items() if k in opt.tuned}


def _val_loss(module, rows):
    _, _, xv, yv = _data()
    return lambda: nn.functional.mse_loss(module(xv[rows]), yv[rows])


def single_process(config, val=False):
    """The reference: one process, the concatenated batch (and validation batch)."""
    model = _model()
    rows = slice(None)
    opt = _optimizer(model, config, val_loss=_val_loss(model, rows) if val else None)
    _train(model, opt, rows, range(STEPS))
    return {"hyper": _hyper(opt), "weights": [p.detach().clone() for p in model.parameters()]}


# ---------------------------------------------------------------------- the scenarios (per rank)
def _rows(rank):
    return slice(rank * PER_RANK, (rank + 1) * PER_RANK)


def _ddp(rank, tmp, config="sgd", val=False, **extra):
    from torch.nn.parallel import DistributedDataParallel as DDP

    def build():
        model = DDP(_model())
        opt = _optimizer(model.module, config, **extra,
                         val_loss=_val_loss(model.module, _rows(rank)) if val else None)
        return model, opt

    model, opt = build()
    _train(model, opt, _rows(rank), range(STEPS))
    out = {"hyper": _hyper(opt), "weights": [p.detach().clone() for p in model.parameters()]}
    if val:
        return out
    model, opt = build()        # interrupted at SAVE_AT, resumed in a fresh model and optimizer
    _train(model, opt, _rows(rank), range(SAVE_AT))
    path = os.path.join(tmp, f"ddp.{rank}.pt")
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path)
    model, opt = build()
    saved = torch.load(path)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    _train(model, opt, _rows(rank), range(SAVE_AT, STEPS))
    out["resumed"] = _hyper(opt)
    return out


def _fsdp(rank, tmp, config, val=False):
    from torch.distributed.fsdp import fully_shard

    def build():
        model = _model()
        for layer in (model[0], model[2], model):   # per layer, then the root: as FSDP2 is used
            fully_shard(layer)
        return model, _optimizer(model, config,
                                 val_loss=_val_loss(model, _rows(rank)) if val else None)

    model, opt = build()
    _train(model, opt, _rows(rank), range(STEPS))
    out = {"hyper": _hyper(opt), "weights": [p.full_tensor() for p in model.parameters()]}
    if val:
        return out
    model, opt = build()
    _train(model, opt, _rows(rank), range(SAVE_AT))
    path = os.path.join(tmp, f"fsdp.{rank}.pt")      # a sharded checkpoint: one file per rank
    torch.save({"model": [p.to_local() for p in model.parameters()], "opt": opt.state_dict()},
               path)
    model, opt = build()
    saved = torch.load(path)
    with torch.no_grad():
        for p, local in zip(model.parameters(), saved["model"]):
            p.to_local().copy_(local)
    opt.load_state_dict(saved["opt"])
    _train(model, opt, _rows(rank), range(SAVE_AT, STEPS))
    out["resumed"] = _hyper(opt)
    out["resumed_weights"] = [p.full_tensor() for p in model.parameters()]
    return out


def _fsdp_nan(rank, tmp):
    """A NaN in rank 0's gradient shard only: the step is skipped on both ranks."""
    from torch.distributed.fsdp import fully_shard
    x, y, _, _ = _data()
    model = _model()
    fully_shard(model)
    opt = _optimizer(model, "sgd")
    _train(model, opt, _rows(rank), range(2))
    before = [p.full_tensor() for p in model.parameters()]
    opt.zero_grad()
    nn.functional.mse_loss(model(x[2][_rows(rank)]), y[2][_rows(rank)]).backward()
    if rank == 0:
        next(model.parameters()).grad.to_local()[0, 0] = float("nan")
    opt.step()
    after = [p.full_tensor() for p in model.parameters()]
    _train(model, opt, _rows(rank), range(3, STEPS))
    return {"unchanged": all(torch.equal(a, b) for a, b in zip(before, after)),
            "skipped": opt.skipped_steps, "hyper": _hyper(opt)}


def _fsdp_restore(rank, tmp):
    """recovery="restore" under FSDP2: a NaN on rank 0 only at steps 60-62 (skipped on every
    rank); the look after step 100 returns every rank's shards to their copy from step 50."""
    import math
    import warnings
    from torch.distributed.fsdp import fully_shard
    model = _model()
    fully_shard(model)
    opt = _optimizer(model, "sgd")
    g = torch.Generator().manual_seed(3 + rank)
    at_50 = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(1, 101):
            x = torch.randn(PER_RANK, 3, dtype=torch.float64, generator=g)
            if rank == 0 and i in (60, 61, 62):
                x[0, 0] = math.nan
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
            if i == 50:
                at_50 = [p.full_tensor() for p in model.parameters()]
    back = all(torch.equal(p.full_tensor(), q) for p, q in zip(model.parameters(), at_50))
    return {"back": back, "restores": opt.restores, "skipped": opt.skipped_steps,
            "hyper": _hyper(opt)}


def _ddp_val_inf(rank, tmp):
    """Rank 1's validation loss is inf (its gradient finite) once: the hyper-step is skipped on
    both ranks."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    model = DDP(_model())
    val = _val_loss(model.module, _rows(rank))
    calls = []

    def val_loss():
        calls.append(None)
        bad = rank == 1 and len(calls) == 3
        return val() + (float("inf") if bad else 0.0)
    opt = _optimizer(model.module, "sgd", val_loss=val_loss)
    _train(model, opt, _rows(rank), range(STEPS))
    return {"skipped": opt.skipped_hypersteps, "hyper": _hyper(opt)}


def _no_host_sync(rank, tmp):
    """Steps (and hyper-steps, with their collectives) read no tensor on the host: FSDP2 with a
    val_loss, DDP with a val_loss."""
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP
    from problems import forbid_host_sync
    x, y, _, _ = _data()
    out = {}
    for name in ("fsdp", "ddp"):
        if name == "fsdp":
            model = _model()
            fully_shard(model)
            opt = _optimizer(model, "sgd_group", val_loss=_val_loss(model, _rows(rank)))
            inner = model
        else:
            model = DDP(_model())
            inner = model.module
            opt = _optimizer(inner, "sgd", val_loss=_val_loss(inner, _rows(rank)))
        _train(model, opt, _rows(rank), range(2))
        for t in range(2, 4):
            opt.zero_grad()
            nn.functional.mse_loss(model(x[t][_rows(rank)]), y[t][_rows(rank)]).backward()
            with pytest.MonkeyPatch.context() as mp, forbid_host_sync(mp):
                opt.step()
        out[name] = opt.hypersteps
    return out


def _zero(rank, tmp):
    from torch.distributed.optim import ZeroRedundancyOptimizer
    model = _model()
    try:
        ZeroRedundancyOptimizer(model.parameters(),
                                optimizer_class=functools.partial(HyperOptimizer,
                                                                  torch.optim.SGD), lr=0.05)
    except ValueError as e:
        return {"refused": str(e)}
    return {"refused": None}


def _fsdp_refusals(rank, tmp):
    from torch.distributed.fsdp import fully_shard
    model = _model()
    fully_shard(model)
    out = {}
    cases = {"element": dict(granularity="element"), "implicit": dict(method="implicit"),
             "rollback": dict(recovery="rollback"), "process_group_none": dict(process_group=None)}
    for name, kw in cases.items():
        try:
            HyperOptimizer(torch.optim.SGD, model.parameters(), lr=0.1, **kw)
            out[name] = None
        except ValueError as e:
            out[name] = str(e)
    opt = HyperOptimizer(torch.optim.SGD, model.parameters(), lr=0.1)
    try:
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2, dtype=torch.float64))]})
        out["plain_group_later"] = None
    except ValueError as e:
        out["plain_group_later"] = str(e)
    out["groups_after"] = len(opt.param_groups)
    return out


SCENARIOS = {
    "ddp": lambda rank, tmp: _ddp(rank, tmp),
    "ddp_no_collective": lambda rank, tmp: _ddp(rank, tmp, process_group=None),
    "ddp_val": lambda rank, tmp: _ddp(rank, tmp, val=True),
    "ddp_val_no_collective": lambda rank, tmp: _ddp(rank, tmp, val=True, process_group=None),
    "ddp_val_element": lambda rank, tmp: _ddp(rank, tmp, "sgd_element", val=True),
    "fsdp_sgd": lambda rank, tmp: _fsdp(rank, tmp, "sgd"),
    "fsdp_sgd_group": lambda rank, tmp: _fsdp(rank, tmp, "sgd_group"),
    "fsdp_adam": lambda rank, tmp: _fsdp(rank, tmp, "adam"),
    "fsdp_sgd_clip": lambda rank, tmp: _fsdp(rank, tmp, "sgd_clip"),
    "fsdp_val": lambda rank, tmp: _fsdp(rank, tmp, "sgd_group", val=True),
    "fsdp_nan": _fsdp_nan,
    "fsdp_restore": _fsdp_restore,
    "ddp_val_inf": _ddp_val_inf,
    "no_host_sync": _no_host_sync,
    "zero": _zero,
    "fsdp_refusals": _fsdp_refusals,
}


def _worker(rank, tmp):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="file://" + os.path.join(tmp, "store"),
                            rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    results = {"library": hyperopt_wrap.__file__}
    for name, scenario in SCENARIOS.items():
        start = time.perf_counter()
        try:
            results[name] = scenario(rank, tmp)
        except Exception:
            results[name] = {"error": traceback.format_exc()}
        results[name]["seconds"] = time.perf_counter() - start
        dist.barrier()
    torch.save(results, os.path.join(tmp, f"results.{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """What each rank saw, per scenario (one spawn for the whole file)."""
    import torch.multiprocessing as mp
    tmp = str(tmp_path_factory.mktemp("dist"))
    context = mp.spawn(_worker, args=(tmp,), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 240
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail("the distributed scenarios did not finish in 240 s")
    return [torch.load(os.path.join(tmp, f"results.{r}.pt")) for r in range(WORLD)]


def _scenario(ranks, name):
    out = [r[name] for r in ranks]
    for r, o in enumerate(out):
        assert "error" not in o, f"rank {r} failed in {name}:\n{o['error']}"
    return out


def _max_diff(a, b) -> float:
    return max(float((x - y).abs().max()) for k in a for x, y in zip(a[k], b[k]) if x.numel())


def _assert_close(a, b, rtol=1e-10):
    for k in a:
        for x, y in zip(a[k], b[k]):
            torch.testing.assert_close(x, y, rtol=rtol, atol=1e-14, msg=lambda m: f"{k}: {m}")


def _assert_identical(a, b):
    for k in a:
        for x, y in zip(a[k], b[k]):
            assert torch.equal(x, y), f"{k} differs across ranks: {x} vs {y}"


def test_spawned_processes_use_this_library(ranks):
    for r in ranks:
        assert r["library"] == hyperopt_wrap.__file__


@pytest.mark.parametrize("name", ["ddp", "ddp_no_collective"])
def test_ddp_hyperparameters_identical_and_equal_to_one_process(ranks, name):
    out = _scenario(ranks, name)
    _assert_identical(out[0]["hyper"], out[1]["hyper"])
    ref = single_process("sgd")
    _assert_close(out[0]["hyper"], ref["hyper"])
    for w, v in zip(out[0]["weights"], ref["weights"]):
        torch.testing.assert_close(w, v, rtol=1e-10, atol=1e-14)
    assert ref["hyper"]["lr"][0].ne(CONFIGS["sgd"]["lr"]).all()     # it did tune


def test_ddp_checkpoint_resumes(ranks):
    out = _scenario(ranks, "ddp")
    for o in out:
        _assert_close(o["resumed"], o["hyper"], rtol=1e-13)


@pytest.mark.parametrize("config", ["sgd", "sgd_element"])
def test_ddp_val_loss_per_rank_is_averaged(ranks, config):
    """Each rank validates on its own batch: the hypergradient is averaged across ranks, so the
    hyperparameters stay identical and equal those of one process on the joint validation
    batch; without the collective they drift apart."""
    out = _scenario(ranks, "ddp_val" + ("" if config == "sgd" else "_element"))
    _assert_identical(out[0]["hyper"], out[1]["hyper"])
    ref = single_process(config, val=True)
    _assert_close(out[0]["hyper"], ref["hyper"])
    if config == "sgd":
        apart = _scenario(ranks, "ddp_val_no_collective")
        assert _max_diff(apart[0]["hyper"], apart[1]["hyper"]) > 1e-6


@pytest.mark.parametrize("config", ["sgd", "sgd_group", "adam", "sgd_clip"])
def test_fsdp2_hyperparameters_identical_and_equal_to_one_process(ranks, config):
    out = _scenario(ranks, "fsdp_" + config)
    _assert_identical(out[0]["hyper"], out[1]["hyper"])
    ref = single_process(config)
    _assert_close(out[0]["hyper"], ref["hyper"])
    for w, v in zip(out[0]["weights"], ref["weights"]):
        torch.testing.assert_close(w, v, rtol=1e-10, atol=1e-14)


def test_fsdp2_max_grad_norm_takes_the_norm_over_every_shard(ranks):
    """max_grad_norm under FSDP2 clips by the whole gradient's norm (the squared norms summed
    over the ranks): the clip is active here (the unclipped run differs), and the sharded run
    equals one process (test above), which a per-shard norm would not."""
    clipped, unclipped = single_process("sgd_clip"), single_process("sgd_noclip")
    assert _max_diff(clipped["hyper"], unclipped["hyper"]) > 1e-6
    out = _scenario(ranks, "fsdp_sgd_clip")
    _assert_close(out[1]["hyper"], clipped["hyper"])


def test_fsdp2_val_loss_per_rank(ranks):
    """FSDP2 with a validation batch per rank (weight decay tuned on it): the validation
    gradient is FSDP2's average over the ranks, the hypergradient the sum over the shards; equal
    to one process on the joint validation batch."""
    out = _scenario(ranks, "fsdp_val")
    _assert_identical(out[0]["hyper"], out[1]["hyper"])
    ref = single_process("sgd_group", val=True)
    _assert_close(out[0]["hyper"], ref["hyper"])
    for w, v in zip(out[0]["weights"], ref["weights"]):
        torch.testing.assert_close(w, v, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("config", ["sgd", "adam"])
def test_fsdp2_sharded_checkpoint_resumes(ranks, config):
    out = _scenario(ranks, "fsdp_" + config)
    for o in out:
        _assert_close(o["resumed"], o["hyper"], rtol=1e-13)
        for w, v in zip(o["resumed_weights"], o["weights"]):
            torch.testing.assert_close(w, v, rtol=1e-13, atol=1e-15)


def test_fsdp2_nonfinite_gradient_on_one_rank_skips_the_step_on_every_rank(ranks):
    out = _scenario(ranks, "fsdp_nan")
    for o in out:
        assert o["unchanged"] and o["skipped"] == 1
    _assert_identical(out[0]["hyper"], out[1]["hyper"])


def test_fsdp2_restore_returns_every_rank_to_its_copy(ranks):
    out = _scenario(ranks, "fsdp_restore")
    for o in out:
        assert o["back"] and o["restores"] == 1 and o["skipped"] == 3
    _assert_identical(out[0]["hyper"], out[1]["hyper"])


def test_ddp_nonfinite_val_loss_on_one_rank_skips_the_hyperstep_on_every_rank(ranks):
    out = _scenario(ranks, "ddp_val_inf")
    assert [o["skipped"] for o in out] == [1, 1]
    _assert_identical(out[0]["hyper"], out[1]["hyper"])


def test_no_host_sync_in_step_with_the_collectives(ranks):
    for o in _scenario(ranks, "no_host_sync"):
        assert o["fsdp"] == o["ddp"] == 4


def test_zero_is_refused_naming_what_works(ranks):
    for o in _scenario(ranks, "zero"):
        assert o["refused"] is not None, "ZeroRedundancyOptimizer was accepted"
        assert "ZeroRedundancyOptimizer" in o["refused"] and "FSDP2" in o["refused"] \
            and "DDP" in o["refused"]


def test_fsdp2_refuses_what_it_does_not_support(ranks):
    for o in _scenario(ranks, "fsdp_refusals"):
        for name in ("element", "implicit", "rollback", "process_group_none",
                     "plain_group_later"):
            assert o[name] is not None, f"{name} was accepted under FSDP2"
        for name in ("element", "implicit"):
            assert "greedy" in o[name] and "FSDP2" in o[name]
        assert "backoff" in o["rollback"]
        assert "DTensor" in o["plain_group_later"] and o["groups_after"] == 1


def test_process_group_argument_is_validated():
    model = _model()
    with pytest.raises(ValueError, match="process_group must be"):
        HyperOptimizer(torch.optim.SGD, model.parameters(), lr=0.1, process_group="world")
    if not dist.is_initialized():
        with pytest.raises(ValueError, match="not initialised"):
            HyperOptimizer(torch.optim.SGD, model.parameters(), lr=0.1,
                           process_group=object())
