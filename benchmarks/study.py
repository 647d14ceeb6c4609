"""Tuning-quality study: one run from a random initialisation against random search and the
learning-rate-free optimizers (protocol after Clarke, Oldewage & Hernandez-Lobato, ICLR 2022).

    python -m benchmarks.study                    # the full study (about an hour, --jobs 2)
    python -m benchmarks.study --quick            # tiny sizes, seconds
    python -m benchmarks.study --tasks digits --methods fixed,greedy --inits 5 --no-plots

The tasks (data, models, minibatches, losses) are ``benchmarks.tasks.TASKS``; the methods are
the table ``METHODS`` below.  For each task, N random initialisations are drawn (log10 lr ~
U(-6, -1), log10 weight decay ~ U(-7, -2), momentum ~ U(0, 1); the i-th also fixes the initial
weights and the minibatch order) and every method trains once from each of them with the same
step budget:

* ``fixed``: plain ``torch.optim.SGD`` at the initial hyperparameters.  The N fixed runs are also
  the N trials of random search: best-of-N picks the run with the lowest final validation loss.
* our methods (``HyperOptimizer`` tuning lr, momentum and weight decay on a validation loss):
  greedy, implicit, unroll, rtrl, forward_gradient, sgld, distill (their defaults); greedy,
  implicit and unroll per tensor and per element; forward_gradient per element.
* the same with ``torch.optim.Adam`` as the base (``fixed adam``, ``greedy adam`` global, per
  tensor and per element, ``implicit adam``; the drawn momentum is beta1): ``fixed adam``'s
  runs are the random search of the Adam rows, which are judged against it.
* learning-rate-free optimizers at their documented defaults (Prodigy, Schedule-Free AdamW,
  D-Adaptation Adam), once per initialisation seed (same weights and batches; they take no
  initial hyperparameters); skipped with a message when the package is missing.

The section "study" (``--section``) of ``benchmarks/RESULTS.md`` is rewritten
(``report.write_section``), the same text is printed, and plots go to ``benchmarks/plots/`` (box
plots of the final test loss, hyperparameter trajectories; named after the section).  Progress
goes to stderr.  A run that diverges (non-finite loss or weights) counts as NaN; it is reported,
never dropped.  ``main(argv)`` returns the results.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import math
import multiprocessing
import os
import re
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from hyperopt_wrap import HyperOptimizer

from . import report, tasks
from .tasks import TASKS, Task
from .timing import training_step

HERE = Path(__file__).resolve().parent
SEED = 0                 # the draw of the initialisations (the data splits: tasks.SEED)
INITS = 20
TOLERANCE = 0.02         # "no worse than best-of-N": median test loss <= best-of-N * (1 + this)
BEST_OF_K = (5,)         # expected best-of-k random search, exact over all k-subsets of the N
LOG10_LR = (-6.0, -1.0)
LOG10_WD = (-7.0, -2.0)
KINDS = ("lr", "momentum", "weight_decay")
ADAM_BETA2 = 0.999       # the Adam rows: torch's default; beta1 is the drawn momentum
BUDGET_NOTE = (
    "chosen so that the whole default study (3 tasks x 8 methods x 20 initialisations) runs in "
    "about 25 minutes on this 2-core machine with 2 workers when it is otherwise idle. "
    "Measured alone (1 process), one step of all 8 methods together costs about 12 ms "
    "(digits), 11.5 ms (diabetes) and 100 ms (LSTM, with implicit and unroll taking their "
    "Hessian-vector products from the closure: a double backward through the LSTM made them "
    "about 25 ms a step each, the closure about 13; greedy about 20 ms, a validation forward "
    "and backward every step). Diabetes keeps the authors' 4000 full-batch steps; digits gets "
    "1500 steps (about 70 epochs of 1078 images); the LSTM 800 steps (about 2.2 epochs of the "
    "training text), short of convergence: its numbers compare progress within a fixed "
    "budget. Implicit and unroll (a hyper-step every 10 steps) get 10x fewer hyper-steps than "
    "greedy in the same budget. The rtrl row came later (its time is not in the 25 minutes): "
    "measured alone, one of its steps costs about 2.5 ms (digits), 3 ms (diabetes) and 17 ms "
    "(LSTM, Hessian-vector products from the closure), about 5 more minutes with 2 workers; "
    "like implicit and unroll it makes a hyper-step every 10 steps. The five Adam rows (fixed "
    "adam, greedy adam global, per tensor and per element, implicit adam) came with 0.6.4: "
    "about 2100 s of runs in all, 17 more minutes with 2 workers")


# ============================================================================ methods
@dataclass
class Method:
    """One row of the study.  ``make(params, hyper, val_loss)`` returns the optimizer;
    ``family``: "fixed" (the base optimizer at the initial values: the random search of the
    rows with its ``base``), "ours" (HyperOptimizer; its hyperparameter trajectories are
    recorded) or "lrfree" (no initial hyperparameters)."""
    name: str
    family: str
    describe: str
    make: Callable
    base: str = "SGD"                    # the torch.optim optimizer underneath (fixed, ours)
    requires: str | None = None          # importable package it needs
    cost: float = 1.0                    # relative cost, only to order the job queue
    train_mode: bool = False             # optimizer.train() / .eval() (Schedule-Free)
    # takes Hessian-vector products (implicit, unroll, rtrl): steps with the task's curvature
    # source (Task.curvature), the graph or a closure
    curvature: bool = False
    # evaluates the training loss elsewhere (Distill): always steps with a closure
    closure: bool = False


def _sgd(params, h, val_loss):
    return torch.optim.SGD(params, lr=h["lr"], momentum=h["momentum"],
                           weight_decay=h["weight_decay"])


def _adam(params, h, val_loss):
    return torch.optim.Adam(params, lr=h["lr"], betas=(h["momentum"], ADAM_BETA2),
                            weight_decay=h["weight_decay"])


def _ours(method, base: str = "SGD", **extra):
    def make(params, h, val_loss):
        cls, first = (torch.optim.Adam, {"betas": (h["momentum"], ADAM_BETA2)}) \
            if base == "Adam" else (torch.optim.SGD, {"momentum": h["momentum"]})
        return HyperOptimizer(cls, params, method=method, tune=KINDS, val_loss=val_loss,
                              lr=h["lr"], weight_decay=h["weight_decay"], **first, **extra)
    return make


def _prodigy(params, h, val_loss):
    from prodigyopt import Prodigy
    return Prodigy(params)


def _schedulefree(params, h, val_loss):
    from schedulefree import AdamWScheduleFree
    return AdamWScheduleFree(params)


def _dadapt(params, h, val_loss):
    from dadaptation import DAdaptAdam
    return DAdaptAdam(params)


ELEMENT_LR = {"lr": "element", "momentum": "global", "weight_decay": "global"}
TENSOR_LR = {"lr": "tensor", "momentum": "global", "weight_decay": "global"}


def _granular(method: str, granularity: dict) -> str:
    """A per-tensor / per-element row's description (its default hyper-optimizer since 0.6)."""
    within = "2" if granularity["lr"] == "tensor" else "1.1"
    return (f"{method} with granularity {granularity}; default hyper-optimizer: Hierarchical (a "
            f"level moved as the global lr is, entries within x{within} of it)")
# rtrl's cost relative to the others', for the job queue only: measured alone, one of its steps
# costs about 1.5-2.5x greedy's on digits and diabetes and 2.2x on the LSTM (closure source)
RTRL_COST = 3.5

# A future method (forward_gradient, sgld, distill) is one more entry here.
METHODS: dict[str, Method] = {m.name: m for m in (
    Method("fixed", "fixed", "torch.optim.SGD at the initial lr / momentum / weight decay",
           _sgd, cost=0.5),
    Method("greedy", "ours", "HyperOptimizer(method='greedy'), lr + momentum + weight decay "
           "global, val_loss", _ours("greedy"), cost=1.5),
    Method("implicit", "ours", "HyperOptimizer(method='implicit') at its defaults (Neumann "
           "terms 5, update_every 10), global, val_loss; curvature from the graph (closure on the "
           "LSTM)",
           _ours("implicit"), cost=1.5, curvature=True),
    Method("unroll", "ours", "HyperOptimizer(method='unroll') at its defaults (horizon 5, "
           "update_every 10), global, val_loss; curvature from the graph (closure on the LSTM)",
           _ours("unroll"), cost=2.0, curvature=True),
    Method("greedy element-lr", "ours", _granular("greedy", ELEMENT_LR),
           _ours("greedy", granularity=ELEMENT_LR), cost=1.7),
    Method("greedy tensor-lr", "ours", _granular("greedy", TENSOR_LR),
           _ours("greedy", granularity=TENSOR_LR), cost=1.6),
    Method("implicit element-lr", "ours", _granular("implicit", ELEMENT_LR),
           _ours("implicit", granularity=ELEMENT_LR), cost=1.7, curvature=True),
    Method("implicit tensor-lr", "ours", _granular("implicit", TENSOR_LR),
           _ours("implicit", granularity=TENSOR_LR), cost=1.6, curvature=True),
    Method("unroll element-lr", "ours", _granular("unroll", ELEMENT_LR),
           _ours("unroll", granularity=ELEMENT_LR), cost=2.2, curvature=True),
    Method("unroll tensor-lr", "ours", _granular("unroll", TENSOR_LR),
           _ours("unroll", granularity=TENSOR_LR), cost=2.1, curvature=True),
    Method("rtrl", "ours", "HyperOptimizer(method='rtrl') at its defaults (forward "
           "sensitivities of the three kinds, discount 1, update_every 10), global, val_loss; "
           "three Hessian-vector products every step, from the graph (closure on the LSTM)",
           _ours("rtrl"), cost=RTRL_COST, curvature=True),
    Method("forward_gradient", "ours", "HyperOptimizer(method='forward_gradient') at its "
           "defaults ((FG)^2U, 2 Rademacher directions, update_every 10), global, val_loss; two "
           "Hessian-vector products a step (graph; closure on the LSTM)",
           _ours("forward_gradient"), cost=2.5, curvature=True),
    Method("forward_gradient element-lr", "ours", _granular("forward_gradient", ELEMENT_LR),
           _ours("forward_gradient", granularity=ELEMENT_LR), cost=2.7,
           curvature=True),
    Method("sgld", "ours", "HyperOptimizer(method='sgld') at its defaults (temperature 1e-4, "
           "first-order recurrence, discount 0.9, update_every 10), global, val_loss",
           _ours("sgld"), cost=1.5),
    Method("distill", "ours", "HyperOptimizer(method='distill') at its defaults (gamma 0.99, "
           "theta refitted every 50 hyper-steps against a 10-step unroll), global, val_loss; "
           "closure steps (one more gradient a step, at the distilled weights)",
           _ours("distill"), cost=2.0, closure=True),
    Method("fixed adam", "fixed", "torch.optim.Adam at the initial lr / beta1 (the drawn "
           "momentum) / weight decay (L2, coupled), beta2 0.999: the random search of the Adam "
           "rows", _adam, base="Adam", cost=0.5),
    Method("greedy adam", "ours", "HyperOptimizer(torch.optim.Adam, method='greedy'), lr + "
           "beta1 + weight decay global, val_loss", _ours("greedy", base="Adam"), base="Adam",
           cost=1.6),
    Method("implicit adam", "ours", "HyperOptimizer(torch.optim.Adam, method='implicit') at "
           "its defaults, lr + beta1 + weight decay global, val_loss; curvature as implicit's",
           _ours("implicit", base="Adam"), base="Adam", cost=1.6, curvature=True),
    Method("greedy adam tensor-lr", "ours", _granular("greedy adam", TENSOR_LR),
           _ours("greedy", base="Adam", granularity=TENSOR_LR), base="Adam", cost=1.7),
    Method("greedy adam element-lr", "ours", _granular("greedy adam", ELEMENT_LR),
           _ours("greedy", base="Adam", granularity=ELEMENT_LR), base="Adam", cost=1.8),
    Method("prodigy", "lrfree", "prodigyopt.Prodigy(params), documented defaults (lr=1)",
           _prodigy, requires="prodigyopt"),
    Method("schedulefree", "lrfree", "schedulefree.AdamWScheduleFree(params), documented "
           "defaults (lr=0.0025, no warm-up); .train() / .eval() around evaluation",
           _schedulefree, requires="schedulefree", train_mode=True),
    Method("dadaptation", "lrfree", "dadaptation.DAdaptAdam(params), documented defaults "
           "(lr=1)", _dadapt, requires="dadaptation"),
)}


def available(method: Method) -> bool:
    if method.requires is None:
        return True
    import importlib.util
    return importlib.util.find_spec(method.requires) is not None


# ============================================================================ one run
def draw_inits(n: int, seed: int = SEED) -> list[dict[str, float]]:
    """The i-th initial hyperparameters (the first k are the same for every n >= k)."""
    gen = torch.Generator().manual_seed(seed + 12345)
    out = []
    for _ in range(n):
        u = torch.rand(3, generator=gen, dtype=torch.float64).tolist()
        out.append({"lr": 10 ** (LOG10_LR[0] + u[0] * (LOG10_LR[1] - LOG10_LR[0])),
                    "momentum": u[1],
                    "weight_decay": 10 ** (LOG10_WD[0] + u[2] * (LOG10_WD[1] - LOG10_WD[0]))})
    return out


def _hyper_snapshot(opt) -> dict[str, float]:
    """Current lr / momentum / weight decay (per-tensor or per-element lr: geometric mean)."""
    out = {}
    for kind, entries in opt.hyperparameters().items():
        v = entries[0]
        if isinstance(v, list):
            v = torch.cat([t.detach().reshape(-1).double() for t in v])
        if isinstance(v, Tensor) and v.numel() > 1:     # tensor / element: geometric mean
            out[kind] = float(v.double().clamp_min(1e-300).log().mean().exp())
        else:
            out[kind] = float(v)
    return out


def _all_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def _quiet() -> None:
    # the documented graph source (README): backward(create_graph=opt.needs_graph)
    warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
    # recovery="restore"'s note that a run returned to its copy: counted in the diagnostics
    warnings.filterwarnings("ignore", message="HyperOptimizer: at least")


def _empty_result(task_name: str, method_name: str, index: int, settings: dict) -> dict:
    inits = settings.get("inits", [])
    return {"task": task_name, "method": method_name, "index": index,
            "init": inits[index] if 0 <= index < len(inits) else None,
            "test_loss": math.nan, "val_loss": math.nan, "seconds": 0.0, "steps_done": 0,
            "diverged": False, "error": None, "traj": None, "skipped_steps": 0, "restores": 0}


def run_one(task_name: str, method_name: str, index: int, settings: dict) -> dict:
    """Train once; return the final losses, wall time and (ours) the hyperparameter
    trajectory.  Never raises: an exception becomes a NaN result with its message."""
    torch.set_num_threads(1)
    _quiet()
    result = _empty_result(task_name, method_name, index, settings)
    try:
        task, method = TASKS[task_name], METHODS[method_name]
        h = settings["inits"][index]
        steps = settings["steps"][task_name]
        seed = settings["seed"] * 1000 + index
        data = tasks.built(task, settings)
        model = task.model(data, seed)
        batches = task.batches(data, steps, seed)
        opt = method.make(model.parameters(), h, task.val_loss(model, data, seed))
        ours = isinstance(opt, HyperOptimizer)
        closure_steps = ours and (method.closure
                                  or (method.curvature and task.curvature == "closure"))
        # the graph is built only on the steps a second-order method records
        step = training_step(opt, model, iter(batches),
                             "closure" if closure_steps else "graph" if ours else "plain",
                             loss=lambda model, batch: task.train_loss(model, data, batch))
        record_every = max(1, steps // settings["points"])
        traj = {"step": [], "train_loss": [], **{k: [] for k in KINDS}} if ours else None
        if method.train_mode:
            opt.train()
        last = math.nan
        done = 0
        seconds = 0.0
        while done < steps:
            n = min(record_every, steps - done)
            start = time.perf_counter()
            for _ in range(n):
                loss = step()
            seconds += time.perf_counter() - start
            done += n
            last = float(loss.detach())
            if ours:
                traj["step"].append(done)
                traj["train_loss"].append(last)
                for k, v in _hyper_snapshot(opt).items():
                    traj[k].append(v)
            if not _all_finite(model):     # diverged for good (HyperOptimizer skips NaN steps)
                result["diverged"] = True
                break
        result["seconds"] = seconds
        result["steps_done"] = done
        result["traj"] = traj
        if ours:
            result["skipped_steps"] = int(opt.skipped_steps)
            result["restores"] = int(opt.restores)
            result["final_hyper"] = _hyper_snapshot(opt)
        if method.train_mode:
            opt.eval()
        model.eval()
        with torch.no_grad():
            if not result["diverged"]:
                for split in ("val", "test"):
                    v = task.evaluate(model, data, split)
                    result[f"{split}_loss"] = v if math.isfinite(v) else math.nan
        if not math.isfinite(result["test_loss"]):
            result["diverged"] = True
            result["test_loss"] = math.nan
    except Exception as exc:             # noqa: BLE001 - a crash is a result, not the end
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc()
        result["test_loss"] = result["val_loss"] = math.nan
    return result


def _worker_init() -> None:
    torch.set_num_threads(1)
    _quiet()


# ============================================================================ statistics
def _quantile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default) of a sorted list; inf allowed."""
    if not sorted_values:
        return math.nan
    pos = q * (len(sorted_values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    a, b = sorted_values[lo], sorted_values[hi]
    if lo == hi or a == b:
        return a
    if math.isinf(b):
        return b if pos > lo else a
    return a + (b - a) * (pos - lo)


def summary(values: Sequence[float]) -> dict[str, float]:
    """Median and quartiles with diverged runs ranked last (as +inf), mean of the finite ones,
    NaN count."""
    ranked = sorted(v if math.isfinite(v) else math.inf for v in values)
    finite = [v for v in values if math.isfinite(v)]
    return {"n": len(values), "nan": len(values) - len(finite),
            "median": _quantile(ranked, 0.5), "q25": _quantile(ranked, 0.25),
            "q75": _quantile(ranked, 0.75),
            "mean": sum(finite) / len(finite) if finite else math.nan}


def best_of(fixed: list[dict]) -> dict:
    """Random search from the N fixed runs: best-of-N (lowest final validation loss; diverged
    runs never win unless all diverged) and the exact expectation of best-of-k over all
    k-subsets of the N runs, for k in BEST_OF_K."""
    key = [(r["val_loss"] if math.isfinite(r["val_loss"]) else math.inf, r["index"])
           for r in fixed]
    order = [fixed[i] for i in sorted(range(len(fixed)), key=lambda i: key[i])]
    out = {"n": len(fixed), "best": order[0] if order else None, "k": {}}
    n = len(order)
    for k in BEST_OF_K:
        if k >= n:
            continue
        total = math.comb(n, k)
        expect, p_nan = 0.0, 0.0
        for rank, r in enumerate(order):        # P(rank is the best of a random k-subset)
            p = math.comb(n - 1 - rank, k - 1) / total
            if math.isfinite(r["test_loss"]):
                expect += p * r["test_loss"]
            else:
                p_nan += p
        out["k"][k] = {"expected": expect / (1 - p_nan) if p_nan < 1 else math.nan,
                       "p_nan": p_nan}
    return out


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Rank correlation (diverged = +inf ranks last; ties by order)."""
    def ranks(v):
        v = [x if math.isfinite(x) else math.inf for x in v]
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        for pos, i in enumerate(order):
            r[i] = float(pos)
        return r
    if len(a) < 3:
        return math.nan
    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va = math.sqrt(sum((x - ma) ** 2 for x in ra))
    vb = math.sqrt(sum((y - mb) ** 2 for y in rb))
    return cov / (va * vb) if va > 0 and vb > 0 else math.nan


# ============================================================================ report
def _f(x: float, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "NaN"
    if math.isinf(x):
        return "inf"
    return f"{x:.{digits}g}"


def _ppl(loss: float) -> float:
    if not math.isfinite(loss):
        return loss
    return math.exp(loss) if loss < 700 else math.inf


def task_table(task: Task, methods: list[Method], results: dict, settings: dict) -> list[str]:
    lm = task.metric == "perplexity"
    head = ["method", "runs", "median test loss", "mean (finite)", "IQR (q25 - q75)", "NaN"]
    if lm:
        head += ["median test ppl", "mean test ppl (finite)"]
    head += ["median wall s/run", "total wall s"]
    lines = ["| " + " | ".join(head) + " |",
             "|" + "|".join(["---"] + ["--:"] * (len(head) - 1)) + "|"]
    for m in methods:
        runs = results.get((task.name, m.name), [])
        if not runs:
            continue
        s = summary([r["test_loss"] for r in runs])
        secs = sorted(r["seconds"] for r in runs)
        row = [m.name, str(s["n"]), _f(s["median"]), _f(s["mean"]),
               f"{_f(s['q25'])} - {_f(s['q75'])}", str(s["nan"])]
        if lm:
            ppls = [_ppl(r["test_loss"]) for r in runs]
            ps = summary(ppls)
            row += [_f(ps["median"]), _f(ps["mean"])]
        row += [f"{_quantile(secs, 0.5):.2f}", f"{sum(secs):.1f}"]
        lines.append("| " + " | ".join(row) + " |")
    for base, fixed in random_searches(task.name, results).items():
        bo = best_of(fixed)
        best = bo["best"]
        n = bo["n"]
        cost = sum(r["seconds"] for r in fixed)
        row = [f"random search ({base}) best-of-{n} (cost: {n} runs)", "1", _f(best["test_loss"]),
               "", "", "1" if not math.isfinite(best["test_loss"]) else "0"]
        if lm:
            row += [_f(_ppl(best["test_loss"])), ""]
        row += ["", f"{cost:.1f}"]
        lines.append("| " + " | ".join(row) + " |")
        for k, v in bo["k"].items():
            row = [f"random search ({base}) best-of-{k}, expected (cost: {k} runs)", "",
                   _f(v["expected"]), "", "", f"P(all {k} diverged) = {v['p_nan']:.2g}"]
            if lm:
                row += [_f(_ppl(v["expected"])), ""]
            row += ["", ""]
            lines.append("| " + " | ".join(row) + " |")
    return lines


def random_searches(task_name: str, results: dict) -> dict[str, list[dict]]:
    """Base optimizer -> the runs of its ``fixed`` row on the task (the random search that
    rows with that base are judged against), for the fixed rows that ran."""
    return {m.base: results[(task_name, m.name)] for m in METHODS.values()
            if m.family == "fixed" and (task_name, m.name) in results}


def verdicts(task: Task, methods: list[Method], results: dict) -> tuple[list[str], dict]:
    """Plain sentences: is one run of each of our methods no worse than best-of-N random
    search with the same base optimizer and better than every learning-rate-free optimizer
    (medians)?"""
    out, met = [], {}
    searches = random_searches(task.name, results)
    lrfree = {m.name: summary([r["test_loss"] for r in results[(task.name, m.name)]])["median"]
              for m in methods if m.family == "lrfree" and (task.name, m.name) in results}
    best_free = min(lrfree.values()) if lrfree else math.nan
    for m in methods:
        if m.family != "ours" or (task.name, m.name) not in results:
            continue
        med = summary([r["test_loss"] for r in results[(task.name, m.name)]])["median"]
        parts = []
        fixed = searches.get(m.base)
        rs = best_of(fixed)["best"]["test_loss"] if fixed else math.nan
        rs = rs if math.isfinite(rs) else math.inf
        ok_rs = med <= rs * (1 + TOLERANCE) if fixed else None
        if fixed:
            parts.append(f"median {_f(med)} vs random-search ({m.base}) best-of-{len(fixed)} "
                         f"{_f(rs)} ({'no worse' if ok_rs else 'WORSE'}, ratio {_f(med / rs, 3)})")
        ok_free = None
        if lrfree:
            ok_free = all(med < v for v in lrfree.values())
            beaten = [k for k, v in lrfree.items() if med < v]
            parts.append(f"best learning-rate-free median {_f(best_free)} "
                         f"({'better than all' if ok_free else 'better than ' + (', '.join(beaten) or 'none')})")
        checked = [c for c in (ok_rs, ok_free) if c is not None]
        goal = bool(checked) and all(checked)
        met[m.name] = goal
        partial = "" if len(checked) == 2 else " (only partly checked: a comparison is missing)"
        out.append(f"  - {m.name}: {'MET' if goal else 'NOT met'}{partial}: "
                   + "; ".join(parts) + ".")
    return out, met


def diagnostics(task: Task, methods: list[Method], results: dict) -> list[str]:
    """Why a method falls short, read off the runs: where the hyperparameters end up, whether
    the final loss still depends on the initial lr, diverged / crashed runs."""
    out = []
    for m in methods:
        runs = results.get((task.name, m.name))
        if not runs:
            continue
        errors = [r for r in runs if r["error"]]
        if errors:
            out.append(f"  - {m.name}: {len(errors)} run(s) raised, e.g. {errors[0]['error']}")
        if m.family not in ("ours", "fixed"):
            continue
        init_lr = [r["init"]["lr"] for r in runs]
        rho = spearman([-math.log10(x) for x in init_lr], [r["test_loss"] for r in runs])
        line = (f"  - {m.name}: Spearman correlation of final test loss with -log10(initial lr) "
                f"{_f(rho, 2)}")
        if m.family == "ours":
            finals = [r.get("final_hyper") for r in runs if r.get("final_hyper")]
            if finals:
                def rng(kind, log=True):
                    vals = sorted(f[kind] for f in finals)
                    med = _quantile(vals, 0.5)
                    if log:
                        return (f"{kind} median {_f(med, 3)} (range {_f(vals[0], 2)} .. "
                                f"{_f(vals[-1], 2)}; initial {_f(min(r['init'][kind] for r in runs), 2)}"
                                f" .. {_f(max(r['init'][kind] for r in runs), 2)})")
                    return f"{kind} median {_f(med, 3)} (range {vals[0]:.3f} .. {vals[-1]:.3f})"
                line += "; final " + "; ".join([rng("lr"), rng("momentum", log=False),
                                                rng("weight_decay")])
            moved = []
            for r in runs:
                if r["traj"] and r["traj"]["lr"]:
                    moved.append(abs(math.log10(r["traj"]["lr"][-1] / r["init"]["lr"])))
            if moved:
                line += (f"; median |log10(final lr / initial lr)| "
                         f"{_f(_quantile(sorted(moved), 0.5), 2)}")
            tail = []
            wd_top = sum(f["weight_decay"] >= 0.5 for f in finals)
            mom_top = sum(f["momentum"] >= 0.99 for f in finals)
            if wd_top:
                tail.append(f"{wd_top}/{len(finals)} ended with weight decay >= 0.5 (bound 1)")
            if mom_top:
                tail.append(f"{mom_top}/{len(finals)} with momentum >= 0.99")
            rising = 0
            for r in runs:
                lr = r["traj"]["lr"] if r["traj"] else []
                if len(lr) >= 5 and lr[-1] > 2 * lr[int(0.8 * (len(lr) - 1))]:
                    rising += 1
            if rising:
                tail.append(f"{rising}/{len(runs)} with the lr still rising at the end (more "
                            "than 2x over the last 20% of the steps: the budget ran out first)")
            if tail:
                line += "; " + "; ".join(tail)
            skipped = sum(r["skipped_steps"] for r in runs)
            if skipped:
                line += f"; {skipped} base steps skipped as non-finite"
            returned = [r.get("restores", 0) for r in runs]
            if sum(returned):
                line += (f"; {sum(1 for n in returned if n)} run(s) returned to their copy "
                         f"({sum(returned)} time(s) in all)")
        div = sum(1 for r in runs if r["diverged"])
        if div:
            line += f"; {div} diverged"
        out.append(line + ".")
    return out


def render(settings: dict, methods: list[Method], skipped: list[str], results: dict,
           wall: float, jobs: int) -> str:
    info = report.machine_info(threads=1)
    n = settings["n_inits"]
    title = "Tuning quality: one run from a random initialisation"
    if settings.get("section", "study") != "study":
        title += f" ({', '.join(m.name for m in methods)})"
    lines = [f"## {title}", "",
             f"Generated by `python -m benchmarks.study{settings['argv']}` on {info['date']} "
             f"in {wall / 60:.1f} min wall time ({jobs} worker process(es), 1 torch thread "
             "each).", ""]
    lines += report.machine_lines(info)
    lines += [
        f"- protocol (after Clarke et al. 2022): {n} initialisations, log10 lr ~ U{LOG10_LR}, "
        f"log10 weight decay ~ U{LOG10_WD}, momentum ~ U(0, 1), drawn with seed {settings['seed']}; "
        "initialisation i also fixes the initial weights and the minibatch order, the same for "
        "every method; base optimizer SGD with momentum and weight decay (on every parameter); "
        f"the `adam` rows: torch.optim.Adam with beta1 the drawn momentum, beta2 {ADAM_BETA2:g} "
        "and L2 weight decay",
        "- each cell: final test loss over the runs; median and quartiles rank diverged runs "
        "(non-finite loss or weights) last, as +inf; the mean is over the finite runs; NaN counts "
        "them; wall time is the training loop's (validation-loss calls of the meta-objective "
        "included, evaluation excluded)",
        "- random search (SGD) = the N `fixed` runs as N trials, random search (Adam) the N "
        "`fixed adam` runs: the one with the lowest final validation loss, its test loss; "
        "best-of-k expected: exact average over all k-subsets of those N runs; a row of ours is "
        "judged against the random search of its base optimizer",
        f"- goal: one run from a random initialisation is no worse than best-of-N random search "
        f"with the same base optimizer (median test loss <= best-of-N x {1 + TOLERANCE:g}) and "
        "better than the "
        "learning-rate-free optimizers (median below each of their medians)",
        f"- step budgets: {BUDGET_NOTE}" if not settings["quick"] else
        "- step budgets: --quick (tiny; the numbers mean nothing)",
        "- methods:"]
    lines += [f"  - `{m.name}`: {m.describe}" for m in methods]
    for s in skipped:
        lines.append(f"  - skipped: {s}")
    verdict_lines = []
    for name in settings["tasks"]:
        task = TASKS[name]
        steps = settings["steps"][name]
        lines += ["", f"### {name}: {task.title}", "",
                  f"{task.describe(settings)}; {steps} steps per run.", ""]
        lines += task_table(task, methods, results, settings)
        v, met = verdicts(task, methods, results)
        lines += ["", "Goal:"] + v
        d = diagnostics(task, methods, results)
        if d:
            lines += ["", "Diagnostics (initial lr against the outcome; where the "
                      "hyperparameters end up):"] + d
        good = [k for k, ok in met.items() if ok]
        verdict_lines.append(f"- {name}: " + (f"met by {', '.join(good)}" if good else
                                             "not met by any of our methods") + ".")
    lines += ["", "Reading the diagnostics: the hyper-optimizer (greedy: normalised momentum; the "
              "others: Adam; per tensor or per element: Hierarchical, whose level moves so) "
              "moves a raw value (log lr, "
              "log weight decay, logit momentum) by about its step size per hyper-step whatever "
              "the hypergradient's magnitude, as long as its sign holds: greedy 0.05 every step, "
              "implicit 0.115, unroll and rtrl 0.05 every 10 steps (their defaults). Going from "
              "lr = 1e-6 to 1e-1 is 11.5 in log units: about 230 steps for greedy, 1000 for "
              "implicit and 2300 for unroll and rtrl, so within these budgets implicit, unroll "
              "and rtrl cannot rescue the "
              "smallest initial learning rates (a high Spearman correlation between the initial "
              "lr and the final loss shows it). Greedy gets there fast, but its one-step "
              "validation objective can also push weight decay or momentum to their bounds "
              "early (short-horizon bias), where the run stays."]
    if settings.get("plots_written"):
        lines += ["", "Plots: " + ", ".join(f"`{p}`" for p in settings["plots_written"]) + "."]
    elif settings.get("plots_note"):
        lines += ["", settings["plots_note"]]
    lines += ["", "### Verdict", ""] + verdict_lines
    return "\n".join(lines) + "\n"


# ============================================================================ plots
COLORS = {"greedy": "tab:blue", "implicit": "tab:orange", "unroll": "tab:green",
          "greedy element-lr": "tab:purple", "rtrl": "tab:red"}


def _log_axis(ax) -> None:
    """Log y axis with plain labels at 10^k, or 1, 2, 5 x 10^k on narrow ranges (matplotlib's
    default labels minor ticks in mathtext there, which costs seconds over many panels)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter, NullLocator

    ax.set_yscale("log")
    lo, hi = ax.get_ylim()                    # call after plotting: decades only on wide ranges
    wide = lo > 0 and hi / lo > 100
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0,) if wide else (1.0, 2.0, 5.0), numticks=8))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_minor_formatter(NullFormatter())


def make_plots(settings: dict, methods: list[Method], results: dict, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    tasks = settings["tasks"]
    # box plots of the final test loss, one panel per task; diverged runs drawn as a count
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 5), squeeze=False)
    for ax, name in zip(axes[0], tasks):
        data, labels = [], []
        for m in methods:
            runs = results.get((name, m.name))
            if not runs:
                continue
            vals = [r["test_loss"] for r in runs if math.isfinite(r["test_loss"])]
            nan = len(runs) - len(vals)
            data.append(vals if vals else [math.nan])
            labels.append(m.name + (f"\n({nan} NaN)" if nan else ""))
        ax.boxplot(data, showfliers=True)
        ax.set_xticks(range(1, len(labels) + 1), labels, rotation=45, ha="right", fontsize=8)
        searches = random_searches(name, results)
        for (base, fixed), color in zip(searches.items(), ("red", "darkorange", "gray")):
            best = best_of(fixed)["best"]["test_loss"]
            if math.isfinite(best):
                ax.axhline(best, color=color, ls="--", lw=1,
                           label=f"random search ({base}) best-of-{len(fixed)}")
        if searches:
            ax.legend(fontsize=8)
        _log_axis(ax)
        ax.set_title(f"{name}: final test loss ({settings['steps'][name]} steps)")
        ax.set_ylabel("test loss" + (" (per character)" if TASKS[name].metric else ""))
    fig.subplots_adjust(left=0.06, right=0.99, bottom=0.3, top=0.93, wspace=0.25)
    stem = settings.get("section", "study")    # (a run of some rows keeps the study's plots)
    path = out_dir / f"{stem}_test_loss.png"
    fig.savefig(path, dpi=60 if settings["quick"] else 110)
    plt.close(fig)
    written.append(path)
    # hyperparameter trajectories: rows = our methods, columns = lr / momentum / weight decay
    ours = [m for m in methods if m.family == "ours"]
    for name in tasks:
        rows = [m for m in ours if (name, m.name) in results]
        if not rows:
            continue
        fig, axes = plt.subplots(len(rows), 4, figsize=(18, 3.2 * len(rows)), squeeze=False)
        for ax_row, m in zip(axes, rows):
            for r in results[(name, m.name)]:
                t = r["traj"]
                if not t or not t["step"]:
                    continue
                color = plt.cm.viridis((math.log10(r["init"]["lr"]) - LOG10_LR[0])
                                       / (LOG10_LR[1] - LOG10_LR[0]))
                for ax, kind in zip(ax_row, KINDS + ("train_loss",)):
                    x = [0] + t["step"] if kind != "train_loss" else t["step"]
                    y = ([r["init"][kind]] + t[kind]) if kind != "train_loss" else t[kind]
                    ax.plot(x, y, color=color, lw=0.8, alpha=0.8)
            for ax, kind in zip(ax_row, KINDS + ("train_loss",)):
                label = {"lr": "lr" + (" (geo. mean)" if "element" in m.name else ""),
                         "momentum": "momentum", "weight_decay": "weight decay",
                         "train_loss": "minibatch train loss"}[kind]
                ax.set_title(f"{name} / {m.name}: {label}", fontsize=9)
                if kind != "momentum":
                    _log_axis(ax)
                ax.set_xlabel("step", fontsize=8)
        fig.suptitle(f"{name}: hyperparameter trajectories, one line per initialisation "
                     "(colour: initial log10 lr, dark = 1e-6, yellow = 1e-1)", fontsize=10)
        # fixed margins: tight_layout over many log axes costs seconds
        fig.subplots_adjust(left=0.05, right=0.98, bottom=0.06, top=0.93, wspace=0.25,
                            hspace=0.45)
        path = out_dir / f"{stem}_{name}_trajectories.png"
        fig.savefig(path, dpi=50 if settings["quick"] else 100)
        plt.close(fig)
        written.append(path)
    return [str(p) for p in written]


# ============================================================================ driver
class Progress:
    """One status line on stderr: rewritten in place on a terminal, a line every few seconds
    (and at the end) otherwise."""

    def __init__(self, total: int, stream=sys.stderr):
        self.total, self.done, self.stream = total, 0, stream
        self.start = time.perf_counter()
        self.last_print = 0.0
        self.tty = hasattr(stream, "isatty") and stream.isatty()
        self.nan = 0

    def update(self, result: dict) -> None:
        self.done += 1
        self.nan += not math.isfinite(result["test_loss"])
        now = time.perf_counter()
        if not self.tty and now - self.last_print < 5 and self.done < self.total:
            return
        self.last_print = now
        el = now - self.start
        eta = el / self.done * (self.total - self.done)
        msg = (f"[study] {self.done}/{self.total} runs, {self.nan} NaN, last "
               f"{result['task']}/{result['method']}#{result['index']}; elapsed "
               f"{el / 60:.1f} min, ETA {eta / 60:.1f} min")
        if result["error"]:
            msg += f" (error: {result['error'][:80]})"
        if self.tty:
            self.stream.write("\r" + msg.ljust(110)[:150])
            if self.done == self.total:
                self.stream.write("\n")
        else:
            self.stream.write(msg + "\n")
        self.stream.flush()


def run_all(jobs_list: list[tuple[str, str, int]], settings: dict, jobs: int) -> dict:
    progress = Progress(len(jobs_list))
    results: dict = {}

    def collect(r):
        results.setdefault((r["task"], r["method"]), []).append(r)
        progress.update(r)

    if jobs <= 1:
        for job in jobs_list:
            collect(run_one(*job, settings))
    else:
        ctx = multiprocessing.get_context("spawn")      # no fork of a torch process
        with cf.ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_worker_init) as pool:
            futures = {pool.submit(run_one, *job, settings): job for job in jobs_list}
            for fut in cf.as_completed(futures):
                try:
                    r = fut.result()
                except Exception as exc:      # noqa: BLE001 - a dead worker is a NaN run
                    r = _empty_result(*futures[fut], settings)
                    r["error"] = f"{type(exc).__name__}: {exc}"
                collect(r)
    for runs in results.values():
        runs.sort(key=lambda r: r["index"])
    return results


def _parse_steps(text: str | None, tasks: list[str], quick: bool) -> dict[str, int]:
    steps = {t: (TASKS[t].quick_steps if quick else TASKS[t].steps) for t in tasks}
    if not text:
        return steps
    for part in text.split(","):
        name, _, value = part.rpartition("=")
        n = int(value)
        if n < 1:
            raise ValueError("steps must be >= 1")
        if name:
            if name not in TASKS:
                raise ValueError(f"unknown task {name!r}")
            if name in steps:
                steps[name] = n
        else:
            steps = {t: n for t in steps}
    return steps


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.study",
                                description=__doc__.split("\n")[0])
    p.add_argument("--tasks", default=",".join(TASKS),
                   help=f"comma-separated, of {', '.join(TASKS)} (default: all)")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated, of {', '.join(METHODS)} (default: all)")
    p.add_argument("--inits", type=int, default=None,
                   help=f"random initialisations N (default {INITS}; --quick: 2)")
    p.add_argument("--steps", default=None,
                   help="step budget: N for every task, or task=N[,task=N] (defaults: "
                        + ", ".join(f"{t.name} {t.steps}" for t in TASKS.values()) + ")")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes (a few steps, 2 inits, a small LSTM), seconds")
    p.add_argument("--jobs", type=int, default=2,
                   help="worker processes (default 2; each uses 1 torch thread; 1 = in-process)")
    p.add_argument("--seed", type=int, default=SEED,
                   help="seed of the initialisations, weights and batch orders")
    p.add_argument("--points", type=int, default=None,
                   help="trajectory points per run (default 100; --quick: 4)")
    p.add_argument("--out", default=str(report.RESULTS),
                   help="markdown file whose section --section is rewritten (default "
                        "benchmarks/RESULTS.md)")
    p.add_argument("--section", default="study",
                   help="the section of --out to rewrite (default 'study': the full study; "
                        "name another for a run of some rows, e.g. 'study-adam')")
    p.add_argument("--plots", metavar="DIR", default=str(HERE / "plots"),
                   help="folder for the PNG plots, named after --section (default "
                        "benchmarks/plots)")
    p.add_argument("--no-plots", action="store_true", help="draw no plots")
    args = p.parse_args(argv)
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not re.fullmatch(r"[a-z0-9_-]+", args.section):
        p.error(f"--section {args.section!r}: use lower-case letters, digits, '-' or '_'")
    for t in args.tasks:
        if t not in TASKS:
            p.error(f"unknown task {t!r}; choose from {', '.join(TASKS)}")
    for m in args.methods:
        if m not in METHODS:
            p.error(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    if args.inits is None:
        args.inits = 2 if args.quick else INITS
    if args.points is None:
        args.points = 4 if args.quick else 100
    for name in ("inits", "jobs", "points"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    try:
        args.steps = _parse_steps(args.steps, args.tasks, args.quick)
    except ValueError as exc:
        p.error(f"--steps: {exc}")
    return args


def _shown(path: str) -> str:
    """A path relative to the repository when it lies inside it."""
    rel = os.path.relpath(path, HERE.parent)
    return path if rel.startswith("..") else rel


def main(argv: Sequence[str] | None = None) -> dict:
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(raw)
    torch.set_num_threads(1)
    methods, skipped = [], []
    for name in args.methods:
        m = METHODS[name]
        if available(m):
            methods.append(m)
        else:
            msg = f"{name} (package {m.requires!r} is not installed: pip install '.[lrfree]')"
            print(f"study: skipping {msg}", file=sys.stderr)
            skipped.append(msg)
    settings = {"quick": args.quick, "seed": args.seed, "steps": args.steps,
                "inits": draw_inits(args.inits, args.seed), "n_inits": args.inits,
                "points": args.points, "tasks": args.tasks, "section": args.section,
                "argv": (" " + " ".join(raw)) if raw else ""}
    # longest first, so that the pool's two workers finish together
    jobs_list = [(t, m.name, i) for t in args.tasks for m in methods for i in range(args.inits)]
    weight = {"lstm": 10.0, "diabetes": 2.0, "digits": 1.0}
    jobs_list.sort(key=lambda j: -weight.get(j[0], 1.0) * METHODS[j[1]].cost)
    print(f"study: {len(jobs_list)} runs ({len(args.tasks)} task(s) x {len(methods)} method(s) x "
          f"{args.inits} initialisation(s)), steps {args.steps}, {args.jobs} job(s)",
          file=sys.stderr)
    start = time.perf_counter()
    results = run_all(jobs_list, settings, args.jobs)
    wall = time.perf_counter() - start
    for runs in results.values():
        for r in runs:
            if r["error"]:
                print(f"study: {r['task']}/{r['method']}#{r['index']} raised:\n"
                      f"{r.get('traceback', r['error'])}", file=sys.stderr)
    if not args.no_plots:
        try:
            written = make_plots(settings, methods, results, Path(args.plots))
            settings["plots_written"] = [_shown(p) for p in written]
            print("study: plots written: " + ", ".join(written), file=sys.stderr)
        except ImportError:
            settings["plots_note"] = "Plots skipped: matplotlib is not installed."
            print("study: matplotlib is not installed; no plots", file=sys.stderr)
    text = render(settings, methods, skipped, results, wall, args.jobs)
    report.write_section(args.section, text, Path(args.out))
    print(text)
    return {"results": results, "settings": settings, "text": text, "methods": methods,
            "skipped": skipped}


if __name__ == "__main__":
    main()
