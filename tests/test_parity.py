"""With ``hyper_lr=0`` HyperOptimizer is the optimizer it wraps: parity with torch.optim.

For every configuration in ``cases.CASES`` and every granularity, a HyperOptimizer that tunes
every tunable kind but has ``hyper_lr=0`` is stepped 50 times in float64 next to
``cls(params, foreach=False, **kwargs)`` on an identically seeded MLP; the parameters and the
optimizer state (by torch's names) must agree, and the tuned hyperparameters must still be
bit-exactly their initial values.  Also with two param groups of different lr, and against
torch's foreach kernels.

Measured (torch 2.13 CPU, float64): the worst normwise relative difference over all cases,
granularities, kernels and buffers is 6.8e-16 (parameters 6.6e-16); an earlier revision of
the rules reached 5.6e-15 (Adam ``exp_avg`` with beta1=0.8).  RTOL keeps an 18x margin over
the latter.  ``step`` must match exactly.
"""
from __future__ import annotations

import copy
import functools
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

from cases import CASE_IDS, CASES, GRANULARITIES, OptimizerCase
from problems import DTYPE, flat, mlp, objective, rel_err

from hyperopt_wrap import HyperOptimizer

STEPS = 50
RTOL = 1e-13          # normwise relative, parameters and every state buffer
STATE_NAMES = ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "square_avg",
               "grad_avg", "sum", "step")
SECOND_GROUP_LR_FACTOR = 0.5
PROBLEM = mlp(biases=False)   # two layers = two param groups; two tensors keep 50 steps cheap

# One configuration per rule with every option on: the two-group runs use these.
FULL_CASES = [CASES[CASE_IDS.index(i)] for i in (
    "SGD(momentum=0.9,nesterov,weight_decay=0.01,maximize)",
    "SGD(momentum=0.8,dampening=0.2,weight_decay=0.01,maximize)",
    "Adam(weight_decay=0.05,amsgrad,decoupled_weight_decay,maximize)",
    "AdamW(weight_decay=0.1,amsgrad,maximize)",
    "RMSprop(alpha=0.95,momentum=0.5,centered,weight_decay=0.01,maximize)",
    "Adagrad(lr_decay=0.01,weight_decay=0.01,initial_accumulator_value=0.1,eps=1e-06,maximize)",
)]


@dataclass
class Run:
    """The end of a 50-step run: weights, optimizer state and the hyperparameters."""
    weights: list[Tensor]
    state: list[dict[str, Tensor]]
    hyper_before: dict[str, list] | None = None
    hyper_after: dict[str, list] | None = None


def _param_groups(case: OptimizerCase, weights: list[Tensor], two_groups: bool):
    if not two_groups:
        return weights
    first, second = PROBLEM.split(weights)
    lr = case.kwargs["lr"]
    return [{"params": first, "lr": lr}, {"params": second, "lr": lr * SECOND_GROUP_LR_FACTOR}]


def _train(opt: torch.optim.Optimizer, weights: list[Tensor], case: OptimizerCase) -> Run:
    problem = PROBLEM
    f = objective(problem, case.maximize)
    for t in range(STEPS):
        opt.zero_grad()
        f(weights, problem.batch(t)).backward()
        opt.step()
    state = [{k: (v.detach().clone() if isinstance(v, Tensor) else v)
              for k, v in opt.state[w].items()} for w in weights]
    return Run([w.detach().clone() for w in weights], state)


@functools.lru_cache(maxsize=None)
def _torch_run(case_id: str, two_groups: bool, foreach: bool) -> Run:
    case = CASES[CASE_IDS.index(case_id)]
    weights = PROBLEM.weights()
    opt = case.cls(_param_groups(case, weights, two_groups), foreach=foreach, **case.kwargs)
    return _train(opt, weights, case)


@functools.lru_cache(maxsize=None)
def _our_run(case_id: str, granularity: str, two_groups: bool) -> Run:
    case = CASES[CASE_IDS.index(case_id)]
    weights = PROBLEM.weights()
    opt = HyperOptimizer(case.cls, _param_groups(case, weights, two_groups), hyper_lr=0.0,
                         tune=case.tunable, granularity=granularity, **case.kwargs)
    before = opt.hyperparameters()
    run = _train(opt, weights, case)
    run.hyper_before, run.hyper_after = before, opt.hyperparameters()
    return run


def _assert_parameters_match(ours: Run, theirs: Run) -> None:
    for i, (a, b) in enumerate(zip(ours.weights, theirs.weights)):
        err = rel_err(a, b)
        assert err <= RTOL, f"parameter {i} after {STEPS} steps: relative error {err:.3g} > {RTOL}"


def _assert_state_matches(ours: Run, theirs: Run) -> None:
    for i, (mine, torchs) in enumerate(zip(ours.state, theirs.state)):
        assert set(mine) - {"hyper"} == set(torchs), (
            f"parameter {i}: state keys {sorted(set(mine) - {'hyper'})}, torch has {sorted(torchs)}")
        assert set(torchs) <= set(STATE_NAMES), f"unexpected torch state {sorted(torchs)}"
        for name in torchs:
            if name == "step":
                # ours on the parameter's device, torch's on the CPU; both of torch's dtype
                # (test_step_counters_have_torchs_dtype)
                assert mine[name].dtype == torchs[name].dtype, (
                    f"parameter {i}: step is {mine[name].dtype}, torch's {torchs[name].dtype}")
                assert float(mine[name]) == float(torchs[name]) == STEPS, (
                    f"parameter {i}: step {float(mine[name])}, torch {float(torchs[name])}")
                continue
            err = rel_err(mine[name], torchs[name])
            assert err <= RTOL, (
                f"parameter {i} state {name!r}: relative error {err:.3g} > {RTOL}")


ALL = [pytest.param(c.id, g, id=f"{c.id}-{g}") for c in CASES for g in GRANULARITIES]
TWO_GROUPS = [pytest.param(c.id, g, id=f"{c.id}-{g}") for c in FULL_CASES for g in GRANULARITIES]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_registry_tunable_kinds_are_what_hyperoptimizer_accepts(case):
    w = PROBLEM.weights()
    HyperOptimizer(case.cls, w, hyper_lr=0.0, tune=case.tunable, **case.kwargs)
    for kind in case.untunable:
        with pytest.raises(ValueError):
            HyperOptimizer(case.cls, w, hyper_lr=0.0, tune=(kind,), **case.kwargs)


@pytest.mark.parametrize("case_id,granularity", ALL)
def test_parameters_equal_torch_after_50_steps(case_id, granularity):
    _assert_parameters_match(_our_run(case_id, granularity, False),
                             _torch_run(case_id, False, False))


@pytest.mark.parametrize("case_id,granularity", ALL)
def test_optimizer_state_equals_torch_after_50_steps(case_id, granularity):
    _assert_state_matches(_our_run(case_id, granularity, False), _torch_run(case_id, False, False))


@pytest.mark.parametrize("case_id,granularity", ALL)
def test_hyperparameters_bit_exactly_initial_after_50_steps(case_id, granularity):
    case = CASES[CASE_IDS.index(case_id)]
    run = _our_run(case_id, granularity, False)
    assert set(run.hyper_after) == set(run.hyper_before)
    for kind in case.tunable:
        before, after = flat(run.hyper_before[kind]), flat(run.hyper_after[kind])
        assert before.dtype == after.dtype == DTYPE
        configured = case.initial(kind)
        assert torch.equal(before, torch.full_like(before, configured)), (
            f"{kind} starts at {before.unique().tolist()}, configured {configured!r}")
        changed = int((before != after).sum())
        assert torch.equal(after, before), (
            f"{kind}: {changed} of {before.numel()} values moved with hyper_lr=0; max change "
            f"{float((after - before).abs().max()):.3g}")


@pytest.mark.parametrize("case_id,granularity", TWO_GROUPS)
def test_two_param_groups_with_different_lr_equal_torch(case_id, granularity):
    ours, theirs = _our_run(case_id, granularity, True), _torch_run(case_id, True, False)
    lr = CASES[CASE_IDS.index(case_id)].kwargs["lr"]
    for gi, configured in enumerate((lr, lr * SECOND_GROUP_LR_FACTOR)):
        # the factor is a power of two, so the lr each group steps with is exact
        used = flat([ours.hyper_before["lr"][gi]])
        assert torch.equal(used, torch.full_like(used, configured)), (
            f"{granularity} granularity: param group {gi} was configured with lr={configured} "
            f"but HyperOptimizer steps it with lr={used.unique().tolist()}")
    _assert_parameters_match(ours, theirs)
    _assert_state_matches(ours, theirs)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_torch_foreach_kernel_equals_our_rule(case):
    """Our rule equals torch whichever of torch's kernels runs (foreach here)."""
    ours, theirs = _our_run(case.id, "element", False), _torch_run(case.id, False, True)
    _assert_parameters_match(ours, theirs)
    _assert_state_matches(ours, theirs)


# --- the step counters: torch's dtype ----------------------------------------------------------
STEP_CASES = [pytest.param(torch.optim.Adam, {}, id="Adam"),
              pytest.param(torch.optim.AdamW, {}, id="AdamW"),
              pytest.param(torch.optim.RMSprop, {}, id="RMSprop"),
              pytest.param(torch.optim.Adagrad, dict(lr_decay=0.01), id="Adagrad")]


@pytest.fixture(params=[torch.float32, torch.float64], ids=["default-float32", "default-float64"])
def default_dtype(request):
    """Runs the test under this default dtype (what torch's step dtype follows), then restores
    the previous one."""
    saved = torch.get_default_dtype()
    torch.set_default_dtype(request.param)
    try:
        yield request.param
    finally:
        torch.set_default_dtype(saved)


def _step_both(opts_and_weights, steps: int) -> None:
    for opt, weights in opts_and_weights:
        for _ in range(steps):
            opt.zero_grad()
            sum((w * w).sum() + w.sum() for w in weights).backward()
            opt.step()


def _leaves(seed: int = 0) -> list[Tensor]:
    """Two small leaves in the default dtype."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(3, 4, generator=gen).requires_grad_(),
            torch.randn(4, generator=gen).requires_grad_()]


@pytest.mark.parametrize("foreach", [None, False], ids=["foreach", "per-tensor"])
@pytest.mark.parametrize("cls,kwargs", STEP_CASES)
def test_step_counters_have_torchs_dtype(cls, kwargs, foreach, default_dtype):
    """``opt.state[p]["step"]`` has the dtype of torch's own optimizer's (float32, float64
    under a float64 default dtype) and its value after every step; the weights match torch's
    (the bias corrections read the counter in float64, as torch reads ``step.item()``)."""
    ours, theirs = _leaves(), _leaves()
    opt = HyperOptimizer(cls, ours, lr=0.01, hyper_lr=0, foreach=foreach, **kwargs)
    ref = cls(theirs, lr=0.01, foreach=foreach, **kwargs)
    for t in range(1, 4):
        _step_both([(opt, ours), (ref, theirs)], 1)
        for p, q in zip(ours, theirs):
            mine, torchs = opt.state[p]["step"], ref.state[q]["step"]
            assert mine.dtype == torchs.dtype == default_dtype, (
                f"step {t}: our counter is {mine.dtype}, torch's {torchs.dtype}")
            assert mine.shape == torchs.shape == ()
            assert mine.item() == torchs.item() == t
    tol = dict(rtol=1e-13, atol=0) if default_dtype == torch.float64 else {}
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.detach(), q.detach(), **tol)


@pytest.mark.parametrize("foreach", [None, False], ids=["foreach", "per-tensor"])
@pytest.mark.parametrize("cls,kwargs", STEP_CASES)
def test_float64_step_counters_of_old_checkpoints_step_bit_exactly_as_before(cls, kwargs, foreach):
    """Checkpoints written before the counters took torch's dtype hold float64 counters: loaded
    as they are, they keep counting, and every step is bit-exactly the float32 counters'."""
    ours = _leaves()
    opt = HyperOptimizer(cls, ours, lr=0.01, hyper_lr=0, foreach=foreach, **kwargs)
    _step_both([(opt, ours)], 2)
    saved = copy.deepcopy(opt.state_dict())
    for st in saved["state"].values():
        st["step"] = st["step"].to(torch.float64)
    old = [w.detach().clone().requires_grad_() for w in ours]
    resumed = HyperOptimizer(cls, old, lr=0.01, hyper_lr=0, foreach=foreach, **kwargs)
    resumed.load_state_dict(saved)
    _step_both([(opt, ours), (resumed, old)], 3)
    for p, q in zip(ours, old):
        assert opt.state[p]["step"].dtype == torch.float32
        assert resumed.state[q]["step"].dtype == torch.float64
        assert opt.state[p]["step"].item() == resumed.state[q]["step"].item() == 5
        assert torch.equal(p, q)
        for name, value in opt.state[p].items():
            if name != "step" and isinstance(value, Tensor):
                assert torch.equal(value, resumed.state[q][name]), name
