"""Which hyper-optimizer: the experiment behind greedy's default (RESULTS.md, "hyper-optimizer").

    python -m benchmarks.hyper_optimizers                 # digits and diabetes, 10 inits
    python -m benchmarks.hyper_optimizers --inits 3 --tasks digits

The study's protocol (same tasks, initialisations, weights and batches; SGD with lr, momentum
and weight decay tuned on the validation loss) for greedy, implicit and unroll at global,
per-tensor and per-element lr granularity, with torch's Adam and with NormalizedMomentum as the
hyper-optimizer.  Prints the median final test loss and the number of diverged runs per row.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import math
from typing import Sequence

import torch

from hyperopt_wrap import HyperOptimizer, NormalizedMomentum

from . import study

GRANULARITY = {"global": "global",
               "tensor": {"lr": "tensor", "momentum": "global", "weight_decay": "global"},
               "element": {"lr": "element", "momentum": "global", "weight_decay": "global"}}
HYPER = {"adam": (torch.optim.Adam, None),
         "normalized": (NormalizedMomentum, None),
         "normalized-group": (NormalizedMomentum, {"normalize": "group"})}


def _make(method: str, granularity: str, hyper: str):
    cls, kwargs = HYPER[hyper]

    def make(params, h, val_loss):
        return HyperOptimizer(torch.optim.SGD, params, method=method, tune=study.KINDS,
                              val_loss=val_loss, lr=h["lr"], momentum=h["momentum"],
                              weight_decay=h["weight_decay"],
                              granularity=GRANULARITY[granularity], hyper_optimizer=cls,
                              hyper_optimizer_kwargs=kwargs)
    return make


def rows(methods: Sequence[str], hypers: Sequence[str]) -> list[str]:
    names = []
    for method in methods:
        for granularity in GRANULARITY:
            for hyper in hypers:
                name = f"{method} {granularity} {hyper}"
                study.METHODS[name] = study.Method(name, "ours", name,
                                                   _make(method, granularity, hyper),
                                                   curvature=method != "greedy")
                names.append(name)
    return names


def _job(args):
    task, name, index, settings, methods, hypers = args
    rows(methods, hypers)              # (worker processes build the table themselves)
    return task, name, index, study.run_one(task, name, index, settings)["test_loss"]


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.hyper_optimizers",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default="digits,diabetes")
    p.add_argument("--methods", default="greedy,implicit,unroll")
    p.add_argument("--hypers", default="adam,normalized")
    p.add_argument("--inits", type=int, default=10)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--steps", type=int, default=None, help="step budget (default: the study's)")
    args = p.parse_args(argv)
    tasks, methods = args.tasks.split(","), args.methods.split(",")
    hypers = args.hypers.split(",")
    names = rows(methods, hypers)
    settings = {"inits": study.draw_inits(args.inits), "seed": study.SEED, "quick": False,
                "points": 2, "steps": {t: args.steps or study.TASKS[t].steps for t in tasks}}
    jobs = [(t, n, i, settings, methods, hypers) for t in tasks for n in names
            for i in range(args.inits)]
    results: dict = {}
    with cf.ProcessPoolExecutor(args.jobs) as pool:
        for task, name, _, loss in pool.map(_job, jobs):
            results.setdefault((task, name), []).append(loss)
    print("| task | method granularity hyper-optimizer | median test loss | diverged |")
    print("|---|---|--:|--:|")
    for (task, name), losses in sorted(results.items()):
        ranked = sorted(x if math.isfinite(x) else math.inf for x in losses)
        nan = sum(not math.isfinite(x) for x in losses)
        print(f"| {task} | {name} | {ranked[(len(ranked) - 1) // 2]:.4f} | {nan} |")
    return results


if __name__ == "__main__":
    main()
