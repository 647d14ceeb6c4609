"""Which hyper-optimizer: the experiment behind greedy's default (RESULTS.md, "hyper-optimizer").

    python -m benchmarks.hyper_optimizers                 # digits and diabetes, 10 inits
    python -m benchmarks.hyper_optimizers --inits 3 --tasks digits
    python -m benchmarks.hyper_optimizers --hypers hierarchical --spread 1.25 \
        --granularities tensor,element --momentum-bound 0.9999      # one row of the 0.6 sweep

The study's protocol (same tasks, initialisations, weights and batches; SGD with lr, momentum
and weight decay tuned on the validation loss) for greedy, implicit and unroll at global,
per-tensor and per-element lr granularity, with torch's Adam, NormalizedMomentum or Hierarchical
(``hierarchical``: its level the method's global rule, normalised for greedy, Adam otherwise;
``--spread``: the entries' largest factor from the level, default HyperOptimizer's) as the
hyper-optimizer.  Prints the median final test loss, the median final validation loss (a row
that fits the validation set shows it lower while its test loss is higher) and the number of
diverged runs per row.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import math
from typing import Sequence

import torch

from hyperopt_wrap import Hierarchical, HyperOptimizer, NormalizedMomentum

from . import study

GRANULARITY = {"global": "global",
               "tensor": {"lr": "tensor", "momentum": "global", "weight_decay": "global"},
               "element": {"lr": "element", "momentum": "global", "weight_decay": "global"}}
HYPER = {"adam": (torch.optim.Adam, None),
         "normalized": (NormalizedMomentum, None),
         "normalized-group": (NormalizedMomentum, {"normalize": "group"}),
         "hierarchical": (Hierarchical, None)}


def _make(method: str, granularity: str, hyper: str, options: dict):
    cls, kwargs = HYPER[hyper]
    kwargs = dict(kwargs or {})
    if cls is Hierarchical:
        kwargs["level"] = "normalized" if method == "greedy" else "adam"
        if options.get("spread") is not None:
            kwargs["spread"] = math.log(options["spread"])
    bound = options.get("momentum_bound")

    def make(params, h, val_loss):
        extra = {}
        if bound is not None:
            extra["bounds"] = {"momentum": (0.0, bound)}
        return HyperOptimizer(torch.optim.SGD, params, method=method, tune=study.KINDS,
                              val_loss=val_loss, lr=h["lr"],
                              momentum=h["momentum"] if bound is None
                              else min(h["momentum"], bound * 0.999),
                              weight_decay=h["weight_decay"],
                              granularity=GRANULARITY[granularity], hyper_optimizer=cls,
                              hyper_optimizer_kwargs=kwargs or None, **extra)
    return make


def rows(methods: Sequence[str], hypers: Sequence[str], granularities: Sequence[str],
         options: dict) -> list[str]:
    names = []
    for method in methods:
        for granularity in granularities:
            for hyper in hypers:
                name = f"{method} {granularity} {hyper}"
                study.METHODS[name] = study.Method(name, "ours", name,
                                                   _make(method, granularity, hyper, options),
                                                   curvature=method != "greedy")
                names.append(name)
    return names


def _job(args):
    task, name, index, settings, methods, hypers, granularities, options = args
    rows(methods, hypers, granularities, options)   # (worker processes build the table)
    result = study.run_one(task, name, index, settings)
    return task, name, index, result["test_loss"], result["val_loss"]


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.hyper_optimizers",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default="digits,diabetes")
    p.add_argument("--methods", default="greedy,implicit,unroll")
    p.add_argument("--hypers", default="adam,normalized")
    p.add_argument("--inits", type=int, default=10)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--steps", type=int, default=None, help="step budget (default: the study's)")
    p.add_argument("--granularities", default=",".join(GRANULARITY))
    p.add_argument("--spread", type=float, default=None,
                   help="hierarchical: the largest factor of an entry from the level (e.g. 2)")
    p.add_argument("--momentum-bound", type=float, default=None,
                   help="momentum's upper bound; initial momenta above it are lowered to "
                        "0.999 x it (default: HyperOptimizer's 0.99, which widens to contain an "
                        "initial momentum above it instead)")
    args = p.parse_args(argv)
    tasks, methods = args.tasks.split(","), args.methods.split(",")
    hypers, granularities = args.hypers.split(","), args.granularities.split(",")
    for name, given, known in (("hypers", hypers, HYPER), ("granularities", granularities,
                                                          GRANULARITY)):
        wrong = [x for x in given if x not in known]
        if wrong:
            p.error(f"--{name}: unknown {wrong}; choose from {', '.join(known)}")
    if args.spread is not None and not args.spread >= 1:
        p.error("--spread is a factor >= 1 (1: every entry at the level)")
    options = {"spread": args.spread, "momentum_bound": args.momentum_bound}
    names = rows(methods, hypers, granularities, options)
    settings = {"inits": study.draw_inits(args.inits), "seed": study.SEED, "quick": False,
                "points": 2, "steps": {t: args.steps or study.TASKS[t].steps for t in tasks}}
    jobs = [(t, n, i, settings, methods, hypers, granularities, options) for t in tasks
            for n in names for i in range(args.inits)]
    results: dict = {}
    with cf.ProcessPoolExecutor(args.jobs) as pool:
        for task, name, _, loss, val in pool.map(_job, jobs):
            results.setdefault((task, name), []).append((loss, val))
    print("| task | method granularity hyper-optimizer | median test loss | median val loss "
          "| diverged |")
    print("|---|---|--:|--:|--:|")
    for (task, name), pairs in sorted(results.items()):
        median = [_median([pair[j] for pair in pairs]) for j in (0, 1)]
        nan = sum(not math.isfinite(loss) for loss, _ in pairs)
        print(f"| {task} | {name} | {median[0]:.4f} | {median[1]:.4f} | {nan} |")
    return results


def _median(values: list[float]) -> float:
    """The median, a diverged (non-finite) run ranked last."""
    ranked = sorted(x if math.isfinite(x) else math.inf for x in values)
    return ranked[(len(ranked) - 1) // 2]


if __name__ == "__main__":
    main()
