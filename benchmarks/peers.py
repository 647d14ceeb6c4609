"""Side by side with peer implementations: step time and memory of the same hypergradient work
in hyperopt_wrap and in gdtuo, higher and torchopt (the optional extra ``peers``).

    python -m benchmarks.peers                 # writes section "peers" of benchmarks/RESULTS.md
    python -m benchmarks.peers --quick         # a look in well under a minute, printed only
    python -m benchmarks.peers --widths 256 --cnn-widths 16 --rounds 11 --out /tmp/r.md
    python -m benchmarks.peers --profile "higher K=5" SGD 256    # where one case's time goes

Networks, minibatches and the measuring protocol are the overhead summary's (``models.Net``,
``timing``, ``memory.step_peak_bytes``): an MLP 784-H-10 (batch 128) and a CNN 1-C/2-C (batch
64), float32, one thread; every case of a network is built from the same initial weights,
warmed up, then timed in interleaved rounds (order rotating), each case's steps per round
rounded up to whole windows; reported: the median over rounds of the mean step time and the
median of the per-round ratio to vanilla (torch's optimizer, plain ``loss.backward();
opt.step()``) of the same base.

The same work per step (every case tunes the same hyperparameters with the same hypergradient):

* greedy (one-step hypergradient of the next minibatch's loss, a hyper-step every step):
  ``ours greedy``: ``HyperOptimizer(method="greedy")`` in the plain loop; ``gdtuo``:
  ``gdtuo.ModuleWrapper`` with ``gdtuo.SGD(alpha, mu)`` (which always differentiates both lr
  and momentum, so ours tunes ``("lr", "momentum")`` with SGD) or ``gdtuo.AdamBaydin(alpha)``
  (lr only, as ours with Adam); both with an Adam hyper-optimizer (gdtuo's own ``gdtuo.Adam``
  on top of the stack, in natural units; ours torch's Adam on log lr / logit momentum).
* unroll (K = 5 steps differentiated through, then the gradient of a fixed validation batch's
  loss with respect to lr, an Adam step on log lr, every 5 steps): ``ours unroll K=5``:
  ``Unroll(horizon=5)``, ``update_every=5``, ``val_loss``, the graph source
  (``loss.backward(create_graph=opt.needs_graph)``); ``higher K=5``: ``monkeypatch`` +
  ``get_diff_optim`` with the lr as an ``override`` tensor (what ``innerloop_ctx`` does), 5
  ``diffopt.step(loss)``, ``autograd.grad`` of the validation loss, then the fast weights and
  the optimizer state written back to the model and the torch optimizer; ``torchopt K=5``:
  ``MetaSGD`` / ``MetaAdam`` with a tensor lr, 5 ``step(loss)``, ``autograd.grad``, then
  ``torchopt.stop_gradient`` on model and optimizer.  ``ours unroll K=5 closure`` (finite-
  difference curvature, ``opt.step(closure)``) is shown for context: not the same arithmetic.
"""
from __future__ import annotations

import argparse
import itertools
import math
import statistics
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from hyperopt_wrap import HyperOptimizer, Unroll

from .memory import step_peak_bytes
from .models import Net, make_nets
from .profiling import ops_table, profiled
from .report import RESULTS as DEFAULT_OUT, format_bytes, grid, machine_info, machine_lines, \
    write_section
from .timing import Built, Case, check_protocol, interleaved, measuring, median_ratio, \
    training_step, warm_up

K = 5
BASES: dict[str, tuple[type, dict]] = {
    "SGD": (torch.optim.SGD, {"lr": 0.01, "momentum": 0.9}),
    "Adam": (torch.optim.Adam, {"lr": 1e-3}),
}
HYPER_LR = 0.05             # ours, higher, torchopt: Adam on log lr (logit momentum)
GDTUO_HYPER_REL = 1e-3      # gdtuo's hyper-Adam works in natural units: this times the value
CASES = ("vanilla", "ours greedy", "gdtuo", "ours unroll K=5", "higher K=5", "torchopt K=5",
         "ours unroll K=5 closure")
GREEDY, UNROLL = ("ours greedy", "gdtuo"), ("ours unroll K=5", "higher K=5", "torchopt K=5",
                                            "ours unroll K=5 closure")
WORK = {
    "vanilla": "torch.optim, no tuning",
    "ours greedy": "one-step hypergradient every step; SGD: lr and momentum, Adam: lr",
    "gdtuo": "the same (gdtuo.SGD differentiates lr and momentum; AdamBaydin lr)",
    "ours unroll K=5": "lr through 5 steps, val loss, every 5 steps (graph source)",
    "higher K=5": "the same, differentiable optimizer with an lr override tensor",
    "torchopt K=5": "the same, MetaSGD / MetaAdam with a tensor lr",
    "ours unroll K=5 closure": "as ours unroll, finite-difference curvature (other arithmetic)",
}


def _peers():
    """The peer modules (ImportError, with the fix, when the extra is missing)."""
    try:
        import higher
        import torchopt
        from gradient_descent_the_ultimate_optimizer import gdtuo
    except ImportError as e:       # pragma: no cover
        raise ImportError(f"{e}: install the peers: pip install -e '.[peers]'") from e
    return gdtuo, higher, torchopt


def _batches(net: Net, seed: int = 0):
    return itertools.cycle(net.batches(seed=seed))


def _val_batch(net: Net) -> tuple[Tensor, Tensor]:
    return net.batches(n=1, seed=1)[0]


class _LogLr:
    """A leaf lr tensor (what the peers' differentiable optimizers read) tuned by Adam on its
    log, as HyperOptimizer tunes its raw value: dE/dlog lr = dE/dlr * lr."""

    def __init__(self, lr: float):
        self.lr = torch.tensor(lr, requires_grad=True)
        self.raw = torch.tensor(math.log(lr), requires_grad=True)
        self.opt = torch.optim.Adam([self.raw], lr=HYPER_LR)

    def step(self, meta: Tensor) -> None:
        """One Adam step on log lr down the gradient of the meta-objective ``meta``."""
        (d_lr,) = torch.autograd.grad(meta, [self.lr])
        self.raw.grad = d_lr.detach() * self.lr.detach()
        self.opt.step()
        with torch.no_grad():
            self.lr.copy_(self.raw.exp())


def build(base: str, case: str, net: Net, seed: int = 0) -> Built:
    """One case: a function doing one full training step on the next minibatch."""
    gdtuo, higher, torchopt = _peers()
    key = Case(base, case, net)
    model = net.model(seed)
    cls, kwargs = BASES[base]
    batches = _batches(net, seed)
    loss_fn = nn.CrossEntropyLoss()
    xv, yv = _val_batch(net)

    if case == "vanilla":
        opt = cls(model.parameters(), **kwargs)
        return Built(key, training_step(opt, model, batches), 1)

    if case == "ours greedy":
        tune = ("lr", "momentum") if base == "SGD" else ("lr",)
        opt = HyperOptimizer(cls, model.parameters(), method="greedy", tune=tune, **kwargs)
        return Built(key, training_step(opt, model, batches), 1)

    if case == "gdtuo":
        lr = kwargs["lr"]
        top = gdtuo.Adam(alpha=GDTUO_HYPER_REL * lr)
        if base == "SGD":
            hyper = gdtuo.SGD(alpha=lr, mu=kwargs["momentum"], optimizer=top)
        else:
            hyper = gdtuo.AdamBaydin(alpha=lr, optimizer=top)
        wrapper = gdtuo.ModuleWrapper(model, optimizer=hyper)
        wrapper.initialize()

        def step():
            x, y = next(batches)
            wrapper.begin()
            wrapper.zero_grad()
            loss = loss_fn(wrapper.forward(x), y)
            loss.backward()
            wrapper.step()
            return loss
        return Built(key, step, 1)

    if case.startswith("ours unroll"):
        closure_style = case.endswith("closure")
        opt = HyperOptimizer(cls, model.parameters(), method=Unroll(horizon=K), update_every=K,
                             tune=("lr",), hyper_lr=HYPER_LR,
                             curvature="closure" if closure_style else "graph",
                             val_loss=lambda: loss_fn(model(xv), yv), **kwargs)
        step = training_step(opt, model, batches, "closure" if closure_style else "graph")
        return Built(key, step, K)

    if case == "higher K=5":
        base_opt = cls(model.parameters(), **kwargs)
        lr = _LogLr(kwargs["lr"])
        params = list(model.parameters())
        run = {"i": 0, "fmodel": None, "diffopt": None}

        def step():
            if run["i"] == 0:       # what innerloop_ctx does on entry
                run["fmodel"] = higher.patch.monkeypatch(model, copy_initial_weights=True)
                run["diffopt"] = higher.optim.get_diff_optim(
                    base_opt, params, fmodel=run["fmodel"], override={"lr": [lr.lr]})
            fmodel, diffopt = run["fmodel"], run["diffopt"]
            x, y = next(batches)
            loss = loss_fn(fmodel(x), y)
            diffopt.step(loss)
            run["i"] += 1
            if run["i"] == K:
                lr.step(loss_fn(fmodel(xv), yv))
                with torch.no_grad():      # carry on from the window's end
                    for p, fast in zip(params, fmodel.parameters()):
                        p.copy_(fast)
                    for gi, group in enumerate(base_opt.param_groups):
                        for pi, p in enumerate(group["params"]):
                            base_opt.state[p] = {
                                k: (v.detach() if torch.is_tensor(v) else v)
                                for k, v in diffopt.state[gi][pi].items()}
                run.update(i=0, fmodel=None, diffopt=None)
            return loss.detach()
        return Built(key, step, K)

    if case == "torchopt K=5":
        lr = _LogLr(kwargs["lr"])
        if base == "SGD":
            opt = torchopt.MetaSGD(model, lr=lr.lr, momentum=kwargs["momentum"])
        else:
            opt = torchopt.MetaAdam(model, lr=lr.lr)
        run = {"i": 0}

        def step():
            x, y = next(batches)
            loss = loss_fn(model(x), y)
            opt.step(loss)
            run["i"] += 1
            if run["i"] == K:
                lr.step(loss_fn(model(xv), yv))
                torchopt.stop_gradient(model)
                torchopt.stop_gradient(opt)
                run["i"] = 0
            return loss.detach()
        return Built(key, step, K)

    raise ValueError(f"unknown case {case!r}; choose from {CASES}")


def measure(nets: Sequence[Net], rounds: int = 11, steps: int = 20, warmup: int = 10,
            threads: int = 1, bases: Sequence[str] = tuple(BASES),
            cases: Sequence[str] = CASES, memory: bool = True) -> list[dict]:
    """Interleaved timings (and step peak memory over a window) of every case; one dict each."""
    check_protocol(rounds, steps, warmup)
    cases = ["vanilla", *[c for c in cases if c != "vanilla"]]
    results = []
    with measuring(threads), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
        warnings.filterwarnings("ignore", category=FutureWarning)
        for net in nets:
            built = [build(b, c, net) for b in bases for c in cases]
            warm_up(built, max(warmup, 1), whole=True)
            times, _ = interleaved(built, rounds, steps)
            for b in built:
                own, ref = times[b.case], times[replace(b.case, variant="vanilla")]
                losses = [float(b.step().detach()) for _ in range(b.window)]
                results.append({
                    "base": b.case.base, "case": b.case.variant, "net": net.label,
                    "median_s": statistics.median(own),
                    "ratio": median_ratio(own, ref),
                    "times_s": own,
                    "step_peak_bytes": step_peak_bytes(b.step, b.window) if memory else None,
                    "final_loss": losses[-1]})
    return results


def profile_case(base: str, case: str, net: Net, steps: int = 40, top: int = 20) -> str:
    """torch.profiler's table of one case (aten ops and Python-visible calls, self CPU time)."""
    prof, steps = profiled(lambda: build(base, case, net), steps, warmup=10)
    return ops_table(prof, steps, f"{base} {case} {net.label}", top)


def format_markdown(results: list[dict], info: dict[str, str], settings: dict) -> str:
    lines = ["## Side by side with peer implementations", "",
             f"Generated by `python -m benchmarks.peers` on {info['date']}.", "",
             *machine_lines(info),
             "- step: one training step on float32 networks (summary.py's MLP 784-H-10, batch "
             "128, and CNN 1-C/2-C, batch 64); "
             f"{settings['rounds']} interleaved rounds x {settings['steps']} steps (rounded up "
             f"to whole windows) after {settings['warmup']} warm-up steps; ratio: median over "
             "rounds of (step time / vanilla's step time of the same base in the same round)",
             "- bases: " + "; ".join(f"{k} {v[1]}" for k, v in BASES.items()),
             "- the work per step: " + "; ".join(f"**{c}**: {w}" for c, w in WORK.items()),
             "- step peak: highest bytes allocated during a whole window (5 steps for the "
             "unroll cases, 1 otherwise) above those held before it (torch.profiler)",
             "- hypergradient agreement of the same computations: tests/test_peers.py (float64, "
             "relative error <= 1e-10; conventions that differ are documented there)",
             "",
             "| network | case | base | median ms/step | ratio to vanilla | step peak |",
             "|---|---|---|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['net']} | {r['case']} | {r['base']} | {1e3 * r['median_s']:.3f} | "
                     f"{r['ratio']:.2f}x | {format_bytes(r['step_peak_bytes'])} |")
    by = {(r["base"], r["case"], r["net"]): r for r in results}
    nets = list(dict.fromkeys(r["net"] for r in results))

    def against(base: str, ours: str, peer: str, net: str) -> str:
        a, b = by.get((base, ours, net)), by.get((base, peer, net))
        return f"{a['median_s'] / b['median_s']:.2f}" if a and b else ""

    lines += ["", "### Ours against each peer (ratio of median step times; < 1: we are faster)",
              ""]
    lines += grid(["base", "comparison"], nets,
                  (([base, f"{ours} / {peer}"], [against(base, ours, peer, n) for n in nets])
                   for base in dict.fromkeys(r["base"] for r in results)
                   for ours, peer in (("ours greedy", "gdtuo"), ("ours unroll K=5", "higher K=5"),
                                      ("ours unroll K=5", "torchopt K=5"))))
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.peers",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", type=int, nargs="*", default=[256])
    parser.add_argument("--cnn-widths", type=int, nargs="*", default=[16])
    parser.add_argument("--bases", nargs="*", default=list(BASES), choices=list(BASES))
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--quick", action="store_true",
                        help="MLP 784-64-10 and CNN 1-4-8, 3 rounds; printed, not written")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--profile", nargs=3, metavar=("CASE", "BASE", "NET"),
                        help="print where one case's time goes, e.g. 'higher K=5' SGD 256")
    args = parser.parse_args(argv)
    if args.profile:
        case, base, net = args.profile
        print(profile_case(base, case, Net.parse(net)))
        return []
    if args.quick:
        args.widths, args.cnn_widths, args.rounds, args.steps, args.warmup = [64], [8], 3, 10, 5
    nets = make_nets(args.widths, args.cnn_widths)
    results = measure(nets, args.rounds, args.steps, args.warmup, args.threads, args.bases,
                      args.cases, memory=not args.no_memory)
    settings = {"rounds": args.rounds, "steps": args.steps, "warmup": args.warmup}
    text = format_markdown(results, machine_info(args.threads), settings)
    print(text)
    if not args.quick:
        write_section("peers", text, args.out)
        print(f"written to {args.out} (section 'peers')")
    return results


if __name__ == "__main__":
    main()
