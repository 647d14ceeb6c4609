"""Recorded base steps and exact reverse-mode products through them (for second-order methods).

A method that differentiates through past steps asks the optimizer to *record* them
(``HypergradientMethod.records_step``).  A recorded step keeps what the step actually used:
per parameter the weights ``w_t``, the base optimizer's state ``s_t`` and the (finite) gradient
``g_t`` before the update, the hyperparameters, and a curvature source (the gradient graph or
the closure, :mod:`hyperopt_wrap.curvature`) for ``H_t``.

:class:`StepGraph` rebuilds ``Phi`` of a recorded step with autograd through the rule's
``update`` (elementwise, a few ops per parameter) and gives vector-Jacobian products::

    a . dPhi/dlam                          (B: the hypergradient contribution)
    a . dPhi/dw,  a . dPhi/dg,  a . dPhi/ds
    a . dPhi/dx = a . dPhi/dw + H_t (a . dPhi/dg)    (A: with one Hessian-vector product)

so ``A`` and ``B`` are derived from the rule itself (Adam's included), never hand-written.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .curvature import BufferGuard, ClosureSource, GraphSource

if TYPE_CHECKING:  # pragma: no cover
    from .optimizer import HyperOptimizer


@dataclass
class TapedParam:
    group_index: int
    param_index: int
    param: Tensor
    weights: Tensor                 # w_t (a copy)
    state: dict[str, Any]           # s_t (copies)
    grad: Tensor                    # g_t as the step used it (a copy)
    hyper: dict[str, Any]           # what the rule read (tuned entries are rebuilt as leaves)
    options: dict[str, Any]
    lr_scale: float


@dataclass
class TapedStep:
    params: list[TapedParam]
    source: GraphSource | ClosureSource
    finite: Tensor


def _differentiable_state(name: str, value: Any, like: Tensor) -> bool:
    return (isinstance(value, Tensor) and value.is_floating_point()
            and value.shape == like.shape and name != "step")


class StepGraph:
    """``Phi`` of one recorded step as an autograd graph; products reuse it."""

    def __init__(self, opt: "HyperOptimizer", step: TapedStep, with_state: bool):
        self.w, self.g, self.s, self.lam = [], [], [], []
        self.w_new, self.s_new = [], []
        rule = opt.rule
        with torch.enable_grad():
            for item in step.params:
                w = item.weights.detach().requires_grad_()
                g = item.grad.detach().requires_grad_()
                state, leaves = {}, {}
                for name, value in item.state.items():
                    if with_state and _differentiable_state(name, value, w):
                        value = leaves[name] = value.detach().requires_grad_()
                    state[name] = value
                hyper, lam = dict(item.hyper), {}
                for kind, tk in opt.tuned.items():
                    if not tk.is_tuned(item.group_index):
                        continue
                    leaf = lam[kind] = tk.value(item.group_index, item.param_index) \
                        .detach().clone().requires_grad_()
                    v = leaf.to(w.dtype)
                    hyper[kind] = v * item.lr_scale if kind == "lr" and item.lr_scale != 1 else v
                w_new, s_new = rule.update(w, g, state, hyper, item.options)
                self.w.append(w)
                self.g.append(g)
                self.s.append(leaves)
                self.lam.append(lam)
                self.w_new.append(w_new)
                self.s_new.append({k: v for k, v in s_new.items()
                                   if isinstance(v, Tensor) and v.requires_grad
                                   and _differentiable_state(k, v, w)})

    def vjp(self, cot_w: list[Tensor | None], cot_s: list[dict[str, Tensor]] | None,
            inputs: bool = True, hyper: bool = True):
        """Cotangents of the step's inputs for output cotangents ``cot_w`` (weights) and
        ``cot_s`` (state). Returns per parameter ``(dw, dg, ds: dict, dlam: dict)``."""
        outs, cots = [], []
        for i, cw in enumerate(cot_w):
            if cw is not None:
                outs.append(self.w_new[i])
                cots.append(cw)
            if cot_s is not None:
                for name, c in cot_s[i].items():
                    if c is not None and name in self.s_new[i]:
                        outs.append(self.s_new[i][name])
                        cots.append(c)
        wanted: list[Tensor] = []
        slots = []
        for i in range(len(self.w)):
            if inputs:
                slots.append((i, "w", None))
                wanted.append(self.w[i])
                slots.append((i, "g", None))
                wanted.append(self.g[i])
                for name, leaf in self.s[i].items():
                    slots.append((i, "s", name))
                    wanted.append(leaf)
            if hyper:
                for kind, leaf in self.lam[i].items():
                    slots.append((i, "lam", kind))
                    wanted.append(leaf)
        n = len(self.w)
        result = [[None, None, {}, {}] for _ in range(n)]
        if not outs or not wanted:
            grads = [None] * len(wanted)
        else:
            with torch.enable_grad():
                grads = torch.autograd.grad(outs, wanted, cots, retain_graph=True,
                                            allow_unused=True)
        for (i, what, name), leaf, gr in zip(slots, wanted, grads):
            gr = torch.zeros_like(leaf) if gr is None else gr
            if what == "w":
                result[i][0] = gr
            elif what == "g":
                result[i][1] = gr
            elif what == "s":
                result[i][2][name] = gr
            else:
                result[i][3][name] = gr
        return result


def add_hypergradient(opt: "HyperOptimizer", step: TapedStep, dlam: list[dict[str, Tensor]]):
    """Add ``dE/dlam`` of one recorded step's parameters into the tuned kinds' accumulators
    (sign flipped for ``maximize`` groups, whose meta-objective is maximised)."""
    terms: dict[str, list] = {kind: [] for kind in opt.tuned}
    for item, per_kind in zip(step.params, dlam):
        sign = -1.0 if opt.param_groups[item.group_index].get("maximize", False) else 1.0
        for kind, value in per_kind.items():
            terms[kind].append((item.group_index, item.param_index,
                                value if sign == 1.0 else -value))
    for kind, kind_terms in terms.items():
        opt.tuned[kind].add_contributions(kind_terms)


class Replay(contextlib.AbstractContextManager):
    """Within a hypergradient pass: products at recorded steps, then everything restored.

    On exit the parameters get their current values back bit-exactly (through ``p.data``, so a
    kept graph stays valid), ``p.grad`` the user's gradients (the same tensor objects) and, for
    closure sources with ``model=``, the module's buffers.
    """

    def __init__(self, opt: "HyperOptimizer", steps: list[TapedStep]):
        self.opt = opt
        seen: dict[int, Tensor] = {}
        for st in steps:
            for item in st.params:
                seen.setdefault(id(item.param), item.param)
        self.params = list(seen.values())
        models = {id(st.source.config.model): st.source.config.model for st in steps
                  if isinstance(st.source, ClosureSource) and st.source.config.model is not None}
        self.guards = [BufferGuard(m) for m in models.values()]

    def __enter__(self):
        self.opt._replaying = True
        self.current = [p.detach().clone() for p in self.params]
        self.grads = [(p, p.grad) for g in self.opt.param_groups for p in g["params"]]
        for guard in self.guards:
            guard.__enter__()
        return self

    def __exit__(self, *exc):
        with torch.no_grad():
            for p, w in zip(self.params, self.current):
                p.data.copy_(w)
        for p, g in self.grads:
            p.grad = g
        for guard in self.guards:
            guard.__exit__(*exc)
        self.opt._replaying = False
        return False

    def hvp(self, step: TapedStep, us: list[Tensor]) -> list[Tensor]:
        """``H_t u`` for the recorded step (one vector per parameter of the step)."""
        params = [item.param for item in step.params]
        weights = [item.weights for item in step.params]
        src = step.source
        with torch.no_grad():
            if isinstance(src, GraphSource):
                for p, w in zip(params, weights):
                    p.data.copy_(w)
                return src.hvp(params, us)
            opt = self.opt
            if src.call != opt._step_calls and not opt._replay_checked:
                src.check_binding(params, weights)
                opt._replay_checked = True
            return src.hvp(params, us, weights=weights,
                           grads=[item.grad for item in step.params])


def meta_cotangents(meta_grads) -> dict[int, Tensor]:
    """``grad_w E`` keyed by ``id(param)`` (parameters E does not depend on are left out)."""
    return {id(mg.param): mg.grad for mg in meta_grads if mg.grad is not None}
