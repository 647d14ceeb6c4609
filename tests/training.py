"""Shared by the hypergradient tests: the option cases as a training run on a float64 problem,
with the snapshots and the reference call each comparison needs, and the comparison helpers."""
from __future__ import annotations

import pytest
import torch
from torch import Tensor

from cases import CASE_IDS, CASES, GRANULARITIES, OptimizerCase
from problems import DTYPE, PROBLEMS, Problem, flat, objective, rel_err

from hyperopt_wrap import FiniteDifferences, HyperOptimizer
from hyperopt_wrap.reference import unrolled_hypergradient

HYPER_LR = 0.05                # the hyperparameters move, so element-wise values differ
SECOND_GROUP_LR_FACTOR = 0.5


def _case(case_id: str) -> OptimizerCase:
    return CASES[CASE_IDS.index(case_id)]


KEY_CASES = [_case(i) for i in (
    "SGD(momentum=0.9)", "SGD(momentum=0.9,nesterov)", "SGD(weight_decay=0.01)",
    "SGD(momentum=0.9,nesterov,weight_decay=0.01,maximize)", "Adam()",
    "Adam(weight_decay=0.01)", "AdamW()", "AdamW(weight_decay=0.1,amsgrad,maximize)")]
OTHER_CASES = [c for c in CASES if c not in KEY_CASES]

# Key cases: every problem x granularity.  The other cases: the MLP, one granularity each,
# rotating so that every rule meets every granularity somewhere.
CASE_GRID = (
    [pytest.param(c.id, p, g, id=f"{c.id}-{p}-{g}")
     for c in KEY_CASES for p in PROBLEMS for g in GRANULARITIES]
    + [pytest.param(c.id, "mlp", GRANULARITIES[i % 4], id=f"{c.id}-mlp-{GRANULARITIES[i % 4]}")
       for i, c in enumerate(OTHER_CASES)])

# ---------------------------------------------------------------------------- helpers
def _groups(case: OptimizerCase, problem: Problem, weights: list[Tensor]) -> list[dict]:
    first, second = problem.split(weights)
    lr = case.kwargs["lr"]
    return [{"params": first, "lr": lr}, {"params": second, "lr": lr * SECOND_GROUP_LR_FACTOR}]


def _sign(case: OptimizerCase) -> float:
    return -1.0 if case.maximize else 1.0


class Training:
    """A HyperOptimizer on a problem, with snapshots of what the reference needs."""

    def __init__(self, case: OptimizerCase, problem: Problem, granularity: str, **options):
        self.case, self.problem, self.granularity = case, problem, granularity
        self.f = objective(problem, case.maximize)
        self.weights = problem.weights()
        self.opt = HyperOptimizer(case.cls, _groups(case, problem, self.weights),
                                  hyper_lr=HYPER_LR, tune=case.tunable, granularity=granularity,
                                  **options, **case.kwargs)
        self.t = 0

    def step(self) -> None:
        self.opt.zero_grad()
        self.f(self.weights, self.problem.batch(self.t)).backward()
        self.opt.step()
        self.t += 1

    def snapshot(self) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
        """Weights and base-optimizer state (without the method's "hyper" buffers)."""
        weights = [w.detach().clone() for w in self.weights]
        states = [{k: v.clone() for k, v in self.opt.state[w].items() if k != "hyper"}
                  for w in self.weights]
        return weights, (states if any(states) else None)   # None: fresh, before step 0

    def reference(self, snapshot, batches, meta_loss, hyper_values, **options) -> dict[str, list]:
        """The reference from ``snapshot`` over ``batches`` (``options``: the reference's own,
        e.g. ``second_order=False`` or ``discount``)."""
        weights, states = snapshot
        return unrolled_hypergradient(
            self.case.cls, _groups(self.case, self.problem, weights), self.f, batches, meta_loss,
            tune=self.case.tunable, granularity=self.granularity, hyper_values=hyper_values,
            states=states, **options, **self.case.kwargs)

    def next_batch_meta(self, t: int):
        batch, sign = self.problem.batch(t), _sign(self.case)
        return lambda w: sign * self.f(w, batch)

    def val_objective(self, weights: list[Tensor]) -> Tensor:
        return self.f(weights, self.problem.val_batch)

    def val_meta(self, w: list[Tensor]) -> Tensor:
        return _sign(self.case) * self.val_objective(w)


class SourceRun(Training):
    """A Training whose steps feed a curvature source: ``"graph"``
    (``loss.backward(create_graph=opt.needs_graph)``), ``"closure"`` (forward differences) or
    ``"central"`` (central differences), each step's closure binding its batch.  ``frozen``:
    the hyper learning rates are 0, so the hyperparameters stay where they are."""

    def __init__(self, case, problem, granularity, source="graph", frozen=False, **options):
        if source == "closure":
            options.setdefault("curvature", "closure")
        elif source == "central":
            options.setdefault("curvature", FiniteDifferences(central=True))
        super().__init__(case, problem, granularity, **options)
        self.source = source
        if frozen:
            for g in self.opt.hyper_optimizer.param_groups:
                g["lr"] = 0.0

    def step(self) -> None:
        batch = self.problem.batch(self.t)
        if self.source == "graph":
            self.opt.zero_grad()
            self.f(self.weights, batch).backward(create_graph=self.opt.needs_graph)
            self.opt.step()
        else:
            def closure(batch=batch):
                self.opt.zero_grad()
                loss = self.f(self.weights, batch)
                loss.backward()
                return loss
            self.opt.step(closure)
        self.t += 1


def _errors(got: dict[str, list], expected: dict[str, list]) -> dict[str, float]:
    assert set(got) == set(expected), f"kinds {sorted(got)} vs {sorted(expected)}"
    out = {}
    for kind in expected:
        e, g = flat(expected[kind]), flat(got[kind])
        assert g.dtype == e.dtype == DTYPE, f"dE/d{kind} in {g.dtype}, reference in {e.dtype}"
        assert torch.count_nonzero(e) > 0, f"reference dE/d{kind} is all zeros: a vacuous test"
        assert torch.isfinite(e).all()
        out[kind] = rel_err(g, e)
    return out


def _assert_close(got, expected, rtol: float, what: str) -> None:
    errs = _errors(got, expected)
    bad = {k: f"{v:.3g}" for k, v in errs.items() if not v <= rtol}
    assert not bad, f"{what}: relative error {bad} > {rtol} (all: " \
                    f"{ {k: f'{v:.3g}' for k, v in errs.items()} })"


def _in_raw_units(hypergradient: dict[str, list], values: dict[str, list]) -> Tensor:
    """dE/dr for every tuned value, all kinds in one vector: dE/dlam * dlam/dr with
    lam = exp(r) (lr, weight decay) or sigmoid(r) (momentum), which is what the hyper-optimizer
    consumes."""
    parts = []
    for kind in sorted(hypergradient):
        lam = flat(values[kind])
        dlam_dr = lam * (1 - lam) if kind == "momentum" else lam
        parts.append(flat(hypergradient[kind]) * dlam_dr)
    return torch.cat(parts)


def _mean(hypergradients: list[dict[str, list]]) -> dict[str, list]:
    def mean(entries):
        if isinstance(entries[0], list):
            return [mean(list(x)) for x in zip(*entries)]
        return sum(entries) / len(entries)
    return {k: [mean([h[k][gi] for h in hypergradients])
                for gi in range(len(hypergradients[0][k]))] for k in hypergradients[0]}
