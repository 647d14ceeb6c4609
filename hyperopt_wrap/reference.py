"""Exact hypergradients by brute-force unrolled autograd, the ground truth of the tests.

``unrolled_hypergradient`` runs ``K = len(batches)`` steps of the update rule
as one differentiable program,

    w_{t+1}, s_{t+1} = Phi(w_t, s_t, grad_w L(w_t; batch_t), lam),   t = 0 .. K-1
    E = meta_loss(w_K)

with ``grad_w L`` taken with ``create_graph=True`` (so second-order terms are
included), and returns ``dE/dlam`` in natural units, laid out like
``HyperOptimizer.last_hypergradient()``.  Nothing is approximated; use it in
float64 on problems small enough to unroll.  With ``K = 1`` it is exactly the
greedy (one-step) hypergradient, since ``w_0`` and ``s_0`` do not depend on lam.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from .hyperparams import resolve_granularity
from .rules import get_rule


def unrolled_hypergradient(optimizer_cls: type, params: Sequence, loss_fn: Callable,
                           batches: Sequence[Any], meta_loss: Callable[[list[Tensor]], Tensor], *,
                           tune=("lr",), granularity="global", hyper_values=None,
                           states: Sequence[dict] | None = None, second_order: bool = True,
                           discount: float = 1.0, max_grad_norm: float | None = None,
                           **optimizer_kwargs) -> dict[str, list]:
    """Exact ``dE/dlam`` after ``len(batches)`` steps.

    Args:
        optimizer_cls: base optimizer class (its registered rule is unrolled).
        params: initial weights: a list of tensors, or a list of param-group dicts.
        loss_fn: ``loss_fn(weights, batch) -> scalar``, weights a flat list in group order.
        batches: one batch per unrolled step.
        meta_loss: ``meta_loss(weights) -> scalar``, the meta-objective E at the final weights.
        tune, granularity: as for ``HyperOptimizer``.
        hyper_values: optional values to start from, laid out like
            ``HyperOptimizer.hyperparameters()``; default: the group settings.
        states: optional initial base-optimizer state per parameter (flat, group order).
        second_order: False holds each step's gradient constant (``H = 0``: the step's
            dependence on the weights through ``g`` is dropped, everything else kept).
        discount: ``mu`` in (0, 1]: every step's dependence on the previous weights and state
            is scaled by ``mu`` (``x_in = mu x + (1 - mu) stop_grad(x)``, the same value), so the
            result is ``sum_t (prod mu A) B_t``: the discounted forward recurrence
            ``Z <- mu A Z + B`` read out at the end.
        max_grad_norm: clip each step's gradient as ``torch.nn.utils.clip_grad_norm_`` does
            (``g * min(1, M / (||g|| + 1e-6))``, the norm over all weights), differentiably.
        **optimizer_kwargs: the base optimizer's settings.
    """
    tune = (tune,) if isinstance(tune, str) else tuple(tune)
    rule = get_rule(optimizer_cls)
    granularity = resolve_granularity(granularity, tune)
    if params and isinstance(params[0], dict):
        groups_in = [dict(g, params=[p.detach() for p in g["params"]]) for g in params]
    else:
        groups_in = [{"params": [p.detach() for p in params]}]
    groups = optimizer_cls(groups_in, **optimizer_kwargs).param_groups

    # One leaf per slot, natural units.
    leaves: dict[str, list[Tensor]] = {k: [] for k in tune}
    per_param: dict[str, list[list[Tensor]]] = {k: [] for k in tune}
    for kind in tune:
        gran = granularity[kind]
        for gi, group in enumerate(groups):
            row = []
            for pi, p in enumerate(group["params"]):
                if hyper_values is not None:
                    entry = hyper_values[kind][gi]
                    start = entry[pi] if gran in ("tensor", "element") else entry
                    start = torch.as_tensor(start, dtype=p.dtype, device=p.device)
                else:
                    start = torch.tensor(rule.read(group, kind), dtype=p.dtype, device=p.device)
                if gran == "element":
                    start = start.expand_as(p) if start.dim() == 0 else start
                new_leaf = (gran in ("tensor", "element") or pi == 0) and \
                    (gran != "global" or not leaves[kind])
                if new_leaf:
                    leaves[kind].append(start.detach().clone().requires_grad_(True))
                    first_value = start.detach()
                leaf = leaves[kind][-1]
                if gran == "global" and gi > 0:
                    # global: one value for every group; a group whose lr differs from the
                    # first group's keeps its ratio to it (HyperOptimizer's convention)
                    leaf = leaf * (start.detach() / first_value)
                row.append(leaf)
            per_param[kind].append(row)

    weights = [p.detach().clone().requires_grad_(True) for g in groups for p in g["params"]]
    flat_states = ([{k: v.detach().clone() for k, v in s.items()} for s in states]
                   if states is not None else [None] * len(weights))
    index = [(gi, pi) for gi, g in enumerate(groups) for pi in range(len(g["params"]))]
    options = [rule.options(g) for g in groups]
    with torch.enable_grad():
        for batch in batches:
            if discount != 1.0:
                weights = [discount * w + (1 - discount) * w.detach() for w in weights]
                flat_states = [None if s is None else
                               {k: (discount * v + (1 - discount) * v.detach()
                                    if v.is_floating_point() and v.shape == w.shape else v)
                                for k, v in s.items()}
                               for s, w in zip(flat_states, weights)]
            grads = torch.autograd.grad(loss_fn(weights, batch), weights,
                                        create_graph=second_order)
            if max_grad_norm is not None:
                norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g)
                                                             for g in grads]))
                coef = (max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
                grads = [g * coef for g in grads]
            new_weights = []
            for j, ((gi, pi), w, g) in enumerate(zip(index, weights, grads)):
                state = flat_states[j]
                if not state:   # None, or {} as a snapshot of opt.state before the first step
                    state = rule.init_state(w, options[gi])
                hyper = {k: (per_param[k][gi][pi] if k in tune else rule.read(groups[gi], k))
                         for k in rule.kinds}
                w_new, flat_states[j] = rule.update(w, g, state, hyper, options[gi])
                new_weights.append(w_new)
            weights = new_weights
        meta = meta_loss(weights)
        flat_leaves = [leaf for k in tune for leaf in leaves[k]]
        d = torch.autograd.grad(meta, flat_leaves, allow_unused=True)
    d = [torch.zeros_like(l) if x is None else x for l, x in zip(flat_leaves, d)]

    out: dict[str, list] = {}
    i = 0
    for kind in tune:
        grads_k = d[i:i + len(leaves[kind])]
        i += len(leaves[kind])
        gran = granularity[kind]
        entries = []
        offset = 0
        for gi, group in enumerate(groups):
            n = len(group["params"])
            if gran == "global":
                entries.append(grads_k[0].detach())
            elif gran == "group":
                entries.append(grads_k[gi].detach())
            elif gran == "tensor":
                entries.append(torch.stack(grads_k[offset:offset + n]).detach())
            else:
                entries.append([x.detach() for x in grads_k[offset:offset + n]])
            offset += n
        out[kind] = entries
    return out
