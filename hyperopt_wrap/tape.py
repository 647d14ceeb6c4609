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
    from .methods.base import MethodContext


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


def _as_rule_sees(item: TapedParam, kind: str, value: Tensor) -> Tensor:
    """A tuned value as the recorded step's rule read it: in the weights' dtype, lr times the
    group's scheduler scale."""
    v = value.to(item.weights.dtype)
    return v * item.lr_scale if kind == "lr" and item.lr_scale != 1 else v


class StepGraph:
    """Reverse products through ``Phi`` of one recorded step.

    Per parameter, the rule's closed form (:meth:`UpdateRule.vjp`) where it has one; otherwise
    ``Phi`` is rebuilt as an autograd graph through ``rule.update`` (once, on first use) and
    products reuse it.  Both give the same numbers (tested in float64)."""

    def __init__(self, ctx: "MethodContext", step: TapedStep, with_state: bool):
        self.rule = ctx.rule
        self.with_state = with_state
        self.items = step.params
        # per parameter: the rule's hyper dict with tuned entries as the step used them, and
        # the tuned kinds (their values) the hypergradient is taken for
        self.hyper: list[dict[str, Any]] = []
        self.lam: list[dict[str, Tensor]] = []
        for item in step.params:
            hyper, lam = dict(item.hyper), {}
            for kind, tk in ctx.tuned.items():
                if not tk.is_tuned(item.group_index):
                    continue
                value = lam[kind] = tk.value(item.group_index, item.param_index).detach()
                hyper[kind] = _as_rule_sees(item, kind, value)
            self.hyper.append(hyper)
            self.lam.append(lam)
        self._graphs: dict[int, tuple] = {}

    def _closed_form(self, i: int, cot_w, cot_s, inputs: bool, hyper: bool):
        item, lam = self.items[i], self.lam[i]
        res = self.rule.vjp(item.weights, item.grad, item.state, self.hyper[i], item.options,
                            cot_w, cot_s if (self.with_state and cot_s) else {}, inputs,
                            tuple(lam) if hyper else ())
        if res is None:
            return None
        dw, dg, ds, dh = res
        if inputs and self.with_state:
            ds = {name: ds[name] if name in ds else torch.zeros_like(value)
                  for name, value in item.state.items()
                  if _differentiable_state(name, value, item.weights)}
        else:
            ds = {}
        # d(value) = d(hyper) * d(hyper)/d(value): the lr scale, and back to the value's dtype
        dlam = {kind: (dh[kind] * item.lr_scale if kind == "lr" and item.lr_scale != 1
                       else dh[kind]).to(value.dtype)
                for kind, value in lam.items()} if hyper else {}
        return [dw, dg, ds, dlam]

    def _graph(self, i: int):
        """``Phi`` of parameter ``i`` as an autograd graph: leaves and outputs."""
        if i not in self._graphs:
            item = self.items[i]
            with torch.enable_grad():
                w = item.weights.detach().requires_grad_()
                g = item.grad.detach().requires_grad_()
                state, leaves = {}, {}
                for name, value in item.state.items():
                    if self.with_state and _differentiable_state(name, value, w):
                        value = leaves[name] = value.detach().requires_grad_()
                    state[name] = value
                hyper, lam = dict(self.hyper[i]), {}
                for kind, value in self.lam[i].items():
                    leaf = lam[kind] = value.clone().requires_grad_()
                    hyper[kind] = _as_rule_sees(item, kind, leaf)
                w_new, s_new = self.rule.update(w, g, state, hyper, item.options)
                s_new = {k: v for k, v in s_new.items()
                         if isinstance(v, Tensor) and v.requires_grad
                         and _differentiable_state(k, v, w)}
            self._graphs[i] = (w, g, leaves, lam, w_new, s_new)
        return self._graphs[i]

    def vjp(self, cot_w: list[Tensor | None], cot_s: list[dict[str, Tensor]] | None,
            inputs: bool = True, hyper: bool = True):
        """Cotangents of the step's inputs for output cotangents ``cot_w`` (weights) and
        ``cot_s`` (state). Returns per parameter ``(dw, dg, ds: dict, dlam: dict)``."""
        n = len(self.items)
        result: list = [None] * n
        fallback = []
        with torch.no_grad():
            for i in range(n):
                if cot_w[i] is None and not (cot_s and cot_s[i]):
                    result[i] = self._zeros(i, inputs, hyper)
                    continue
                result[i] = self._closed_form(i, cot_w[i], cot_s[i] if cot_s else None,
                                              inputs, hyper)
                if result[i] is None:
                    fallback.append(i)
        if fallback:
            self._autograd(fallback, cot_w, cot_s, inputs, hyper, result)
        return result

    def _zeros(self, i: int, inputs: bool, hyper: bool):
        """The products for zero cotangents."""
        item = self.items[i]
        ds = {name: torch.zeros_like(value) for name, value in item.state.items()
              if self.with_state and _differentiable_state(name, value, item.weights)}
        return [torch.zeros_like(item.weights) if inputs else None,
                torch.zeros_like(item.grad) if inputs else None, ds if inputs else {},
                {k: torch.zeros_like(v) for k, v in self.lam[i].items()} if hyper else {}]

    def _autograd(self, indices, cot_w, cot_s, inputs, hyper, result) -> None:
        outs, cots, wanted, slots = [], [], [], []
        for i in indices:
            w, g, leaves, lam, w_new, s_new = self._graph(i)
            if cot_w[i] is not None:
                outs.append(w_new)
                cots.append(cot_w[i])
            if cot_s is not None:
                for name, c in cot_s[i].items():
                    if c is not None and name in s_new:
                        outs.append(s_new[name])
                        cots.append(c)
            result[i] = [None, None, {}, {}]
            if inputs:
                slots += [(i, "w", None), (i, "g", None)]
                wanted += [w, g]
                for name, leaf in leaves.items():
                    slots.append((i, "s", name))
                    wanted.append(leaf)
            if hyper:
                for kind, leaf in lam.items():
                    slots.append((i, "lam", kind))
                    wanted.append(leaf)
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


def add_hypergradient(ctx: "MethodContext", step: TapedStep, dlam: list[dict[str, Tensor]]):
    """Add ``dE/dlam`` of one recorded step's parameters into the tuned kinds' accumulators
    (the context flips the sign for ``maximize`` groups, whose meta-objective is maximised)."""
    terms: dict[str, list] = {kind: [] for kind in ctx.tuned}
    for item, per_kind in zip(step.params, dlam):
        for kind, value in per_kind.items():
            terms[kind].append((item.group_index, item.param_index, value))
    for kind, kind_terms in terms.items():
        ctx.add_contributions(kind, kind_terms)


class Replay(contextlib.AbstractContextManager):
    """Within a hypergradient pass: products at recorded steps, then everything restored.

    On exit the parameters get their current values back bit-exactly (through ``p.data``, so a
    kept graph stays valid), ``p.grad`` the user's gradients (the same tensor objects) and, for
    closure sources with ``model=``, the module's buffers.
    """

    def __init__(self, ctx: "MethodContext", steps: list[TapedStep]):
        self.ctx = ctx
        seen: dict[int, Tensor] = {}
        for st in steps:
            for item in st.params:
                seen.setdefault(id(item.param), item.param)
        self.params = list(seen.values())
        models = {id(st.source.config.model): st.source.config.model for st in steps
                  if isinstance(st.source, ClosureSource) and st.source.config.model is not None}
        self.guards = [BufferGuard(m) for m in models.values()]

    def __enter__(self):
        self.ctx.flags.replaying = True
        self.current = [p.detach().clone() for p in self.params]
        self.grads = [(p, p.grad) for p in self.ctx.all_params()]
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
        self.ctx.flags.replaying = False
        return False

    def hvp(self, step: TapedStep, us: list[Tensor]) -> list[Tensor]:
        """``H_t u`` for the recorded step (one vector per parameter of the step)."""
        params = [item.param for item in step.params]
        weights = [item.weights for item in step.params]
        grads = [item.grad for item in step.params]
        src = step.source
        clip = src.clip     # max_grad_norm: cotangents go back through H J (J symmetric)
        with torch.no_grad():
            if clip is not None:
                us, grads = clip.apply(us, grads), clip.unclipped(grads)
            if isinstance(src, GraphSource):
                for p, w in zip(params, weights):
                    p.data.copy_(w)
                return src.hvp(params, us)
            flags = self.ctx.flags
            if src.call != flags.step_calls and not flags.replay_checked:
                compared = src.check_binding(params, weights, grads, step.finite)
                flags.replay_checked = True
                flags.grad_checked = flags.grad_checked or compared
            elif not flags.grad_checked:
                flags.grad_checked = src.check_binding(params, weights, grads, step.finite,
                                                       loss=False)
            return src.hvp(params, us, weights=weights, grads=grads)


def reverse_pass(ctx: "MethodContext", steps: list[TapedStep], cotangents: dict[int, Tensor]):
    """Exact reverse mode through the recorded ``steps`` (oldest first), newest first: yields
    ``(k, step, graph, res)`` for each, ``res`` the step's products (``StepGraph.vjp``, the
    hyperparameters' ``res[i][3]`` included) for the cotangent ``a`` of its output, which starts
    at ``cotangents`` (``grad E``, keyed by ``id(param)``) and after each yield but the oldest
    moves one step back, ``a <- a A_t = a dPhi/dx + H_t (a dPhi/dg)`` (one Hessian-vector
    product).  The weights are restored when the pass ends (:class:`Replay`)."""
    a_w, a_s = dict(cotangents), {}
    with Replay(ctx, steps) as replay:
        for k, step in enumerate(reversed(steps)):
            oldest = k == len(steps) - 1
            ids = [id(item.param) for item in step.params]
            graph = StepGraph(ctx, step, with_state=True)
            res = graph.vjp([a_w.get(i) for i in ids], [a_s.get(i, {}) for i in ids],
                            inputs=not oldest, hyper=True)
            yield k, step, graph, res
            if not oldest:
                hv = replay.hvp(step, [r[1] for r in res])
                for i, r, h in zip(ids, res, hv):
                    a_w[i] = r[0] + h     # not in place: autograd may hand back a cotangent
                    a_s[i] = r[2]


def meta_cotangents(meta) -> dict[int, Tensor]:
    """``grad_w E`` keyed by ``id(param)`` (parameters E does not depend on are left out)."""
    return meta.by_param()
