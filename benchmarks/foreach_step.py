"""The rules' bucketed step, ``UpdateRule.step_foreach``, against the per-tensor ``step_`` loop
and torch.optim's own ``foreach=True`` step on the same tensors (float32, one thread).

    python -m benchmarks.foreach_step [--repeats 300]

Cases: 200 tensors of 16x16 (a deep model's many small tensors: where the per-tensor Python
loop costs most) and an MLP 784-256-10 (4 tensors, arithmetic-bound).  SGD momentum 0.9 and Adam
(betas 0.9, 0.999) with a tuned global lr (a 0-dim tensor) and its tangent (kinds=("lr",));
torch's optimizers step with a float lr and no tangents.  Only the step is timed: the gradient
scratch copies the rules may overwrite are refilled outside the timed region.  The variants
run interleaved, round after round; the table gives the median microseconds per step, and the
median over rounds of each round's ratio (robust to load drifting on a shared machine).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from hyperopt_wrap.rules import AdamRule, SGDRule

CASES = {"200 x 16x16": [(16, 16)] * 200,
         "MLP 784-256-10": [(256, 784), (256,), (10, 256), (10,)]}


def _setup(rule_name, shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen) * 0.1 for s in shapes]
    grads = [torch.randn(s, generator=gen) * 1e-2 for s in shapes]
    if rule_name == "SGD":
        rule, options = SGDRule(), {"dampening": 0.0, "nesterov": False, "maximize": False}
        hyper = {"lr": torch.tensor(1e-3), "momentum": 0.9, "weight_decay": 0.0}
        make_torch = lambda ps, fe: torch.optim.SGD(ps, lr=1e-3, momentum=0.9, foreach=fe)
    else:
        rule = AdamRule()
        options = {"beta2": 0.999, "eps": 1e-8, "amsgrad": False, "maximize": False,
                   "decoupled": False}
        hyper = {"lr": torch.tensor(1e-4), "momentum": 0.9, "weight_decay": 0.0}
        make_torch = lambda ps, fe: torch.optim.Adam(ps, lr=1e-4, foreach=fe)
    ok = torch.tensor(1.0)
    kinds = ("lr",)

    def ours(foreach):
        ps = [p.clone() for p in params]
        states = [rule.init_state(p, options) for p in ps]
        scratch = [torch.empty_like(g) for g in grads]
        flat = torch.empty(sum(p.numel() for p in ps))
        tangents = {"lr": list(torch.split(flat, [p.numel() for p in ps]))}
        tangents["lr"] = [t.view(p.shape) for t, p in zip(tangents["lr"], ps)]
        works = [{} for _ in ps]

        def prepare():
            torch._foreach_copy_(scratch, grads)

        if foreach:
            def step():
                assert rule.step_foreach(ps, scratch, states, hyper, options, kinds, ok, tangents)
        else:
            def step():
                for p, g, s, w in zip(ps, scratch, states, works):
                    rule.step_(p, g, s, hyper, options, kinds, ok, w)
        return prepare, step

    def theirs(foreach):
        ps = [torch.nn.Parameter(p.clone()) for p in params]
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        opt = make_torch(ps, foreach)
        return (lambda: None), opt.step

    return {"step_foreach": ours(True), "step_ loop": ours(False),
            f"torch {rule_name} foreach": theirs(True), f"torch {rule_name} for-loop": theirs(False)}


def main(repeats: int = 300) -> None:
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    print(f"torch {torch.__version__}, 1 thread; median us per step over {repeats} interleaved "
          "rounds")
    print("| case | rule | step_foreach | step_ loop | torch foreach | torch for-loop | "
          "loop / foreach | torch foreach / ours |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for case, shapes in CASES.items():
        for rule_name in ("SGD", "Adam"):
            variants = _setup(rule_name, shapes)
            times = {k: [] for k in variants}
            with torch.no_grad():
                for _ in range(20):                          # warm-up
                    for prepare, step in variants.values():
                        prepare()
                        step()
                for _ in range(repeats):
                    for name, (prepare, step) in variants.items():
                        prepare()
                        t0 = time.perf_counter()
                        step()
                        times[name].append(time.perf_counter() - t0)
            med = {k: statistics.median(v) * 1e6 for k, v in times.items()}
            ratio = lambda k: statistics.median(a / b for a, b in zip(times[k],
                                                                      times["step_foreach"]))
            ours, loop = med["step_foreach"], med["step_ loop"]
            tf, tl = med[f"torch {rule_name} foreach"], med[f"torch {rule_name} for-loop"]
            print(f"| {case} | {rule_name} | {ours:.0f} | {loop:.0f} | {tf:.0f} | {tl:.0f} | "
                  f"{ratio('step_ loop'):.2f}x | {ratio(f'torch {rule_name} foreach'):.2f}x |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=300)
    main(parser.parse_args().repeats)
