"""Demo: a hypergradient-tuned learning rate against plain SGD, on sklearn's digits.

    python -m hyperopt_wrap.demo                 # well under a minute on 2 CPU cores
    python -m hyperopt_wrap.demo --plot out.png  # also draws loss curves and the lr trajectory
                                                 # (and the monitor's panels: out.hyper1.png ...)

An MLP 64-50-10 is trained on the 8x8 digits (a fixed, seeded 60/20/20 split into
train / validation / test, features standardised with the training statistics) by
``torch.optim.SGD(momentum=0.9)`` and by ``HyperOptimizer(torch.optim.SGD, ...,
method="greedy", tune=("lr",))``, from the same initial weights on the same minibatches:

* from a poor learning rate (default 1e-4), where plain SGD barely moves;
* plain SGD at a good learning rate, for context;
* from a too-large learning rate (default 3), where plain SGD overshoots.

The runs advance in lockstep, a chunk of steps each in turn, so that machine noise hits
them alike; only the training steps are timed (evaluation is not).  A
:class:`~hyperopt_wrap.HyperMonitor` on each tuned run records the lr in use and the
hypergradient norm every ``MONITOR_EVERY``-th hyper-step (its hook is inside the timed steps);
a few rows of that trajectory are printed.  Every number printed is measured by this run.
``main(argv)`` returns the results, for tests and notebooks.
"""
from __future__ import annotations

import argparse
import math
import os
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor, nn

from .monitor import HyperMonitor
from .optimizer import HyperOptimizer

DEFAULTS = {"steps": 3000, "seed": 0, "lr": 1e-4, "good_lr": 0.1, "large_lr": 3.0,
            "batch_size": 50, "hidden": 50, "eval_every": 50}
QUICK = {"steps": 60, "eval_every": 20}
MONITOR_EVERY = 10          # hyper-steps between the HyperMonitor's records
TRAJECTORY_ROWS = 6


# ---------------------------------------------------------------------------- data and model
@dataclass
class Split:
    """Train / validation / test tensors of a supervised dataset."""
    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor


def load_digits_split(seed: int) -> Split:
    """sklearn's digits, split 60/20/20 by a seeded permutation, standardised on train."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.as_tensor(x, dtype=torch.float32)
    y = torch.as_tensor(y, dtype=torch.int64)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_train, n_val = int(0.6 * len(x)), int(0.2 * len(x))
    train, val, test = order[:n_train], order[n_train:n_train + n_val], order[n_train + n_val:]
    mean = x[train].mean(0)
    std = x[train].std(0)
    std = torch.where(std > 0, std, torch.ones_like(std))   # constant border pixels
    x = (x - mean) / std
    return Split(x[train], y[train], x[val], y[val], x[test], y[test])


def make_model(seed: int, hidden: int, activation: str) -> nn.Module:
    torch.manual_seed(seed)
    act = {"tanh": nn.Tanh, "relu": nn.ReLU}[activation]
    return nn.Sequential(nn.Linear(64, hidden), act(), nn.Linear(hidden, 10))


def minibatches(n: int, steps: int, batch_size: int, seed: int) -> Tensor:
    """Indices of ``steps`` minibatches: seeded reshuffles each epoch, last partial batch dropped."""
    gen = torch.Generator().manual_seed(seed + 1)
    per_epoch = n // batch_size
    epochs = -(-steps // per_epoch)
    rows = [torch.randperm(n, generator=gen)[:per_epoch * batch_size].view(per_epoch, batch_size)
            for _ in range(epochs)]
    return torch.cat(rows)[:steps]


# ---------------------------------------------------------------------------- one training run
@dataclass
class Run:
    """One optimizer configuration and everything measured about it."""
    name: str
    lr0: float
    tuned: bool
    baseline: str | None = None       # name of the vanilla run with the same initial lr
    seconds: float = 0.0              # wall time of the training steps only
    steps_done: int = 0
    curve_steps: list[int] = field(default_factory=list)
    curve_train: list[float] = field(default_factory=list)
    curve_val: list[float] = field(default_factory=list)
    curve_lr: list[float] = field(default_factory=list)
    final: dict[str, float] = field(default_factory=dict)
    monitor: HyperMonitor | None = None   # the tuned runs' recorder (its history() is the data)


class _Trainer:
    def __init__(self, run: Run, model: nn.Module, opt: torch.optim.Optimizer, data: Split,
                 batches: Tensor):
        self.run, self.model, self.opt, self.data, self.batches = run, model, opt, data, batches
        self.loss_fn = nn.CrossEntropyLoss()

    def advance(self, n: int) -> None:
        model, opt, loss_fn, data = self.model, self.opt, self.loss_fn, self.data
        start = time.perf_counter()
        for i in range(self.run.steps_done, self.run.steps_done + n):
            idx = self.batches[i]
            opt.zero_grad()
            loss = loss_fn(model(data.x_train[idx]), data.y_train[idx])
            # the graph is built only on steps a second-order method records
            loss.backward(create_graph=getattr(opt, "needs_graph", False))
            opt.step()
        self.run.seconds += time.perf_counter() - start
        self.run.steps_done += n

    def current_lr(self) -> float:
        if isinstance(self.opt, HyperOptimizer):
            return float(self.opt.hyperparameters()["lr"][0])
        return float(self.opt.param_groups[0]["lr"])

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        d, f = self.data, self.loss_fn
        logits_test = self.model(d.x_test)
        return {"train_loss": float(f(self.model(d.x_train), d.y_train)),
                "val_loss": float(f(self.model(d.x_val), d.y_val)),
                "test_loss": float(f(logits_test, d.y_test)),
                "test_acc": float((logits_test.argmax(1) == d.y_test).float().mean()),
                "lr": self.current_lr()}

    def record(self) -> None:
        ev = self.evaluate()
        self.run.curve_steps.append(self.run.steps_done)
        self.run.curve_train.append(ev["train_loss"])
        self.run.curve_val.append(ev["val_loss"])
        self.run.curve_lr.append(ev["lr"])


def build_runs(args) -> list[tuple[Run, dict]]:
    """The configurations to compare: (run, optimizer settings)."""
    hyper = {"method": args.method, "tune": ("lr",), "granularity": "global"}
    if args.hyper_lr is not None:
        hyper["hyper_lr"] = args.hyper_lr
    # lr is tuned in log space and clamped to bounds; the default upper bound (1.0) would
    # reject a start at a too-large lr above it, so the demo widens it.
    hyper["bounds"] = {"lr": (1e-10, max(10.0, 10 * args.large_lr))}
    runs = [(Run(f"SGD lr={args.lr:g} (poor)", args.lr, False), {}),
            (Run(f"Hyper from lr={args.lr:g}", args.lr, True,
                 baseline=f"SGD lr={args.lr:g} (poor)"), hyper)]
    if not args.no_context:
        runs += [(Run(f"SGD lr={args.good_lr:g} (good)", args.good_lr, False), {}),
                 (Run(f"SGD lr={args.large_lr:g} (too large)", args.large_lr, False), {}),
                 (Run(f"Hyper from lr={args.large_lr:g}", args.large_lr, True,
                      baseline=f"SGD lr={args.large_lr:g} (too large)"), hyper)]
    return runs


def train_all(args, data: Split) -> list[Run]:
    init = make_model(args.seed, args.hidden, args.activation).state_dict()
    batches = minibatches(len(data.x_train), args.steps, args.batch_size, args.seed)
    trainers = []
    for run, hyper in build_runs(args):
        model = make_model(args.seed, args.hidden, args.activation)
        model.load_state_dict(init)                       # identical initial weights
        if run.tuned:
            opt = HyperOptimizer(torch.optim.SGD, model.parameters(), lr=run.lr0, momentum=0.9,
                                 **hyper)
            run.monitor = HyperMonitor(opt, every=MONITOR_EVERY)
        else:
            opt = torch.optim.SGD(model.parameters(), lr=run.lr0, momentum=0.9)
        trainers.append(_Trainer(run, model, opt, data, batches))
    for t in trainers:
        t.record()
    # Lockstep: every run does one chunk in turn (rotating who goes first), so that drift
    # in machine load hits every run alike.
    for chunk, start in enumerate(range(0, args.steps, args.eval_every)):
        n = min(args.eval_every, args.steps - start)
        k = chunk % len(trainers)
        for t in trainers[k:] + trainers[:k]:
            t.advance(n)
        for t in trainers:
            t.record()
    for t in trainers:
        t.run.final = t.evaluate()
        if t.run.monitor is not None:
            t.run.monitor.close()
    return [t.run for t in trainers]


# ---------------------------------------------------------------------------- reporting
def format_table(runs: list[Run]) -> str:
    by_name = {r.name: r for r in runs}
    header = (f"| {'run':<26} | {'final lr':>9} | {'train loss':>10} | {'val loss':>8} | "
              f"{'test loss':>9} | {'test acc':>8} | {'wall s':>6} | {'ms/step':>7} | "
              f"{'time vs SGD same lr0':>20} |")
    rule = "|" + "|".join("-" * (len(c) - 2) + ("-:" if i else "--")
                          for i, c in enumerate(header.split("|")[1:-1])) + "|"
    lines = [header, rule]
    for r in runs:
        f = r.final
        base = by_name.get(r.baseline) if r.baseline else None
        ratio = f"{r.seconds / base.seconds:.2f}x" if base and base.seconds > 0 else "1.00x (ref)"
        lines.append(
            f"| {r.name:<26} | {f['lr']:>9.3g} | {f['train_loss']:>10.4g} | {f['val_loss']:>8.4g} | "
            f"{f['test_loss']:>9.4g} | {f['test_acc']:>8.4f} | {r.seconds:>6.2f} | "
            f"{1e3 * r.seconds / max(r.steps_done, 1):>7.3f} | {ratio:>20} |")
    return "\n".join(lines)


def _compare(a: float, b: float, what: str) -> str:
    """'lower'/'higher' sentence fragment for a against b, from the numbers themselves."""
    if not (math.isfinite(a) and math.isfinite(b)):
        return f"{what} {a:.4g} vs {b:.4g}"
    if a == b:
        return f"{what} equal ({a:.4g})"
    word = "lower" if a < b else "higher"
    return f"{what} {a:.4g} vs {b:.4g} ({word})"


def summarise(runs: list[Run]) -> list[str]:
    """Plain sentences about the measured numbers (nothing here is a fixed claim)."""
    by_name = {r.name: r for r in runs}
    good = next((r for r in runs if r.name.endswith("(good)")), None)
    out = []
    for r in runs:
        if not r.tuned:
            continue
        base = by_name[r.baseline]
        fr, fb = r.final, base.final
        out.append(f"{r.name}: lr {r.lr0:g} -> {fr['lr']:.3g}; "
                   + _compare(fr["train_loss"], fb["train_loss"], "train loss") + ", "
                   + _compare(fr["test_loss"], fb["test_loss"], "test loss") + ", "
                   + f"test acc {fr['test_acc']:.4f} vs {fb['test_acc']:.4f}, "
                   + f"against {base.name}; wall time {r.seconds / base.seconds:.2f}x.")
        if good is not None:
            fg = good.final
            out.append(f"  against {good.name}: "
                       + _compare(fr["train_loss"], fg["train_loss"], "train loss") + ", "
                       + _compare(fr["test_loss"], fg["test_loss"], "test loss") + ", "
                       + f"test acc {fr['test_acc']:.4f} vs {fg['test_acc']:.4f}.")
    return out


def format_trajectory(run: Run, rows: int = TRAJECTORY_ROWS) -> str:
    """A few evenly spaced records of a tuned run's HyperMonitor: step, lr in use, |dE/dlr|."""
    h = run.monitor.history()
    n = len(h["step"])
    k = min(rows, n)
    picks = sorted({round(i * (n - 1) / max(k - 1, 1)) for i in range(k)})
    lines = [f"{run.name}: lr in use every {run.monitor.every}th hyper-step (HyperMonitor)",
             f"  {'step':>6} {'hyper-step':>10} {'lr in use':>10} {'|dE/dlr|':>10}"]
    lines += [f"  {h['step'][i]:>6} {h['hyperstep'][i]:>10} {h['lr/0'][i]:>10.4g} "
              f"{h['hypergrad_norm/lr'][i]:>10.3g}" for i in picks]
    return "\n".join(lines)


def plot(runs: list[Run], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in runs:
        line, = ax_loss.plot(r.curve_steps, r.curve_train, label=f"{r.name} train")
        ax_loss.plot(r.curve_steps, r.curve_val, "--", color=line.get_color(), alpha=0.7)
        ax_lr.plot(r.curve_steps, r.curve_lr, color=line.get_color(), label=r.name)
    ax_loss.set(yscale="log", xlabel="step", ylabel="loss (solid: train, dashed: validation)",
                title="Digits MLP: full-set losses")
    ax_lr.set(yscale="log", xlabel="step", ylabel="learning rate", title="Learning rate")
    ax_loss.legend(fontsize=7)
    ax_lr.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_plots(runs: list[Run], path: str) -> None:
    """The demo's figure at ``path`` and each tuned run's monitor panels beside it
    (``out.png`` -> ``out.hyper1.png``, ...); without matplotlib, a note instead."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("--plot needs matplotlib (pip install matplotlib); no plot written")
        return
    plot(runs, path)
    print(f"plot written to {path}")
    root, ext = os.path.splitext(path)
    for i, run in enumerate((r for r in runs if r.monitor is not None), 1):
        hyper_path = f"{root}.hyper{i}{ext or '.png'}"
        run.monitor.plot(hyper_path)
        print(f"{run.name}: HyperMonitor panels written to {hyper_path}")


# ---------------------------------------------------------------------------- command line
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m hyperopt_wrap.demo",
                                description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=None,
                   help=f"training steps per run (default {DEFAULTS['steps']}; "
                        f"--quick: {QUICK['steps']})")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"],
                   help="seed of the split, the initial weights and the minibatch order")
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"], help="the poor initial learning rate")
    p.add_argument("--good-lr", type=float, default=DEFAULTS["good_lr"],
                   help="learning rate of the plain-SGD reference run")
    p.add_argument("--large-lr", type=float, default=DEFAULTS["large_lr"],
                   help="the too-large initial learning rate")
    p.add_argument("--method", choices=("greedy", "implicit", "unroll"), default="greedy",
                   help="the hypergradient method (default greedy; implicit and unroll take "
                        "their curvature from the gradient graph on the steps they record)")
    p.add_argument("--hyper-lr", type=float, default=None,
                   help="HyperOptimizer's hyper_lr (default: the method's own)")
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    p.add_argument("--hidden", type=int, default=DEFAULTS["hidden"])
    p.add_argument("--activation", choices=("tanh", "relu"), default="tanh")
    p.add_argument("--eval-every", type=int, default=None,
                   help="steps between evaluations (and between turns of the lockstep)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for the runs")
    p.add_argument("--no-context", action="store_true",
                   help="only the two runs from the poor learning rate")
    p.add_argument("--quick", action="store_true", help="a tiny run, for tests")
    p.add_argument("--plot", metavar="PATH", default=None,
                   help="save loss curves and the lr trajectory (needs matplotlib)")
    args = p.parse_args(argv)
    preset = QUICK if args.quick else DEFAULTS
    if args.steps is None:
        args.steps = preset["steps"]
    if args.eval_every is None:
        args.eval_every = preset["eval_every"]
    for name in ("steps", "eval_every", "batch_size", "hidden", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("lr", "good_lr", "large_lr"):
        if not getattr(args, name) > 0:
            p.error(f"--{name.replace('_', '-')} must be > 0")
    return args


def main(argv: Sequence[str] | None = None) -> list[Run]:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        data = load_digits_split(args.seed)
        print(f"digits: {len(data.x_train)} train / {len(data.x_val)} validation / "
              f"{len(data.x_test)} test; MLP 64-{args.hidden}-10 ({args.activation}); "
              f"SGD momentum 0.9; batch {args.batch_size}; {args.steps} steps; seed {args.seed}; "
              f"torch {torch.__version__}, {args.threads} thread(s)")
        hyper_lr = "method default" if args.hyper_lr is None else f"{args.hyper_lr:g}"
        print(f"Hyper = HyperOptimizer(torch.optim.SGD, method={args.method!r}, tune=('lr',), "
              f"granularity='global', hyper_lr={hyper_lr}); meta-objective: next minibatch loss")
        runs = train_all(args, data)
        print()
        print(format_table(runs))
        print()
        for line in summarise(runs):
            print(line)
        for run in runs:
            if run.monitor is not None:
                print()
                print(format_trajectory(run))
        if args.plot:
            write_plots(runs, args.plot)
    finally:
        torch.set_num_threads(threads)
    return runs


if __name__ == "__main__":
    main()
