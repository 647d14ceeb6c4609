"""Forward-gradient hypergradients: (FG)^2U (Shen et al., NeurIPS 2024, "Memory-efficient
gradient unrolling for large-scale bi-level optimization").

An unbiased stochastic estimate of the window's *truncated* hypergradient (the weights and the
optimizer state at the window's start held constant; the quantity ``Unroll(horizon=T)``
computes exactly, ``T = update_every``) for any number of tuned values, at a cost that does not
grow with that number.  ``lam`` is the vector of every tuned value: one scalar per global,
group or tensor slot, one entry per element of an element slot.  At the start of each window
draw ``b = directions`` random directions ``v_1 .. v_b`` in that space and carry one forward
tangent per direction through the window's base steps, over the weights *and* the optimizer
state ``x = (w, s)``::

    z_i = 0 at the window start,   z_i <- A_t z_i + B_t v_i,   A_t = dPhi_t/dx,  B_t = dPhi_t/dlam
    A_t z + B_t v = dPhi/dw z_w + dPhi/dg (H_t z_w) + dPhi/ds z_s + dPhi/dlam v

(``H_t`` the Hessian of the step's minibatch loss at ``w_t``, before the write: one
Hessian-vector product per direction and step, from the gradient graph or the closure; the
rest are the rule's closed-form tangent products, :meth:`UpdateRule.jvp`).  ``z_i`` is then the
directional derivative ``J v_i`` of the window's end point, ``J = dx_T/dlam``, and with
``h = grad E(w_T)^T J`` the exact truncated hypergradient the estimate is::

    h_hat = (1/b) sum_i (grad E(w_T) . z_i) v_i = (1/b) sum_i (h . v_i) v_i

**Unbiased** because the directions are isotropic, ``E[v v^T] = I``: ``E[h_hat] = E[v v^T] h =
h``.  Rademacher entries (``+-1``, the default) and standard Gaussian entries both satisfy it.
Its variance, per entry ``j`` of ``N`` tuned scalars::

    Rademacher:  Var[h_hat_j] = (1/b) sum_{k != j} h_k^2,   E|h_hat - h|^2 = (N - 1) |h|^2 / b
    Gaussian:    Var[h_hat_j] = (1/b) (|h|^2 + h_j^2),        E|h_hat - h|^2 = (N + 1) |h|^2 / b

so the relative noise of one estimate is about ``sqrt(N / b)`` (Rademacher is always the less
noisy of the two), and a small entry of ``h`` drowns in the noise of the large ones; the
hyper-optimizer averages the noise over hyper-steps.

``distribution="basis"`` replaces the random draw by scaled coordinate directions
``v_i = sqrt(N) e_{j_i}``, ``j_i = (c + i) mod N`` with a counter ``c`` advanced by ``b`` each
window, so every tuned scalar is visited in turn.  With ``directions = N`` (or a multiple of it)
every window's estimate is the exact truncated hypergradient, ``(1/b) sum_j N h_j e_j = h``:
full forward mode, one tangent per tuned scalar, which is what the tests check against
``hyperopt_wrap.reference``.  With fewer directions it is a cyclic block-coordinate estimate
(each window sees ``b`` of the ``N`` coordinates, scaled by ``N / b``), unbiased on average over
a cycle rather than per window.

The directions come from a CPU ``torch.Generator`` seeded from ``seed``; its state (a
ByteTensor) and the window's directions live in the method state, which the optimizer saves, so
a resumed run draws the same directions and continues the window in lockstep.  Two optimizers
that share one ``ForwardGradient(seed=0)`` draw the same sequence (pass different seeds for
independent streams).

Cost per base step: ``b`` Hessian-vector products (none on a window's first step, where every
``z`` is zero, so ``opt.needs_graph`` is False there) -- with the closure source ``b`` extra
gradients (``2 b`` for central differences) -- plus ``b`` of the rule's tangent products.
Memory: ``b`` copies of the weights and of the differentiable optimizer state (SGD with
momentum: one buffer, Adam: two moments, amsgrad: three), plus the ``b`` directions (``b``
copies of the tuned values: ``b`` scalars per slot, ``b`` copies of the weights per
element-granular kind).  Nothing is recorded and no graph is kept across steps, so neither cost
grows with ``update_every``.

When to choose it: many tuned values (``granularity="tensor"`` or ``"element"``), where exact
forward mode needs one tangent per value (RTRL falls back to its per-kind approximation there),
and windows long enough that Unroll's memory (``update_every`` recorded steps, or their graphs)
is what limits you: this costs ``b`` copies of the weights and state whatever the window, at
``b (T - 1)`` products per window against Unroll's ``T - 1``.  For a handful of global values
prefer Unroll (the same truncated hypergradient, exact, fewer products) or RTRL (exact through
the whole history, ``N`` tangents): neither has variance.  Like Unroll it sees only the window
(the short-horizon bias of truncation).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import HypergradientMethod, MetaGradients, propagate

DISTRIBUTIONS = ("rademacher", "gaussian", "basis")


class ForwardGradient(HypergradientMethod):
    """(FG)^2U: ``b`` random forward tangents per window, ``dE/dlam ~ mean_i (grad E . z_i) v_i``.

    Args:
        directions: ``b``, the random directions (forward tangents) carried per window; cost
            and memory grow linearly with it, the variance falls as ``1/b``.  Default 2.
        distribution: ``"rademacher"`` (entries ``+-1``, default), ``"gaussian"`` (standard
            normal) or ``"basis"`` (scaled coordinate directions, cycled; exact with
            ``directions`` = the number of tuned scalars).
        seed: seed of the directions' generator (saved and restored with the optimizer).
    """
    name = "forward_gradient"
    default_update_every = 10
    default_hyper_lr = {"lr": 0.05, "weight_decay": 0.05, "momentum": 0.05}

    def __init__(self, directions: int = 2, distribution: str = "rademacher", seed: int = 0):
        if isinstance(directions, bool) or not isinstance(directions, int) or directions < 1:
            raise ValueError(f"directions must be an int >= 1 (the random tangents carried per "
                             f"window), got {directions!r}; e.g. ForwardGradient(directions=4)")
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"unknown distribution {distribution!r} for the directions; choose "
                             f"one of {DISTRIBUTIONS}, e.g. ForwardGradient(distribution="
                             f"'rademacher')")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 64:
            raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}; e.g. "
                             f"ForwardGradient(seed=0)")
        self.directions = directions
        self.distribution = distribution
        self.seed = seed

    def init_state(self, ctx):
        generator = torch.Generator()
        generator.manual_seed(self.seed)
        # directions[i]: kind -> one tensor per block of ctx.tuned[kind].values (v_i there);
        # Z[i]: per parameter (group index, param index) the tangent of the weights ("w") and of
        # the differentiable optimizer state ("s"), missing entries zero; "fresh": the next
        # carried step starts a window (draws new directions, z = 0); "cursor": the next
        # coordinate of the basis cycle
        return {"generator": generator.get_state(), "directions": [], "Z": [], "fresh": True,
                "cursor": 0}

    # ------------------------------------------------------------------ the directions
    @staticmethod
    def _blocks(ctx) -> list[tuple[str, int, Tensor]]:
        """Every block of tuned values, ``(kind, block index, values)``, in a fixed order."""
        return [(kind, block, value) for kind, tk in ctx.tuned.items()
                for block, value in enumerate(tk.values)]

    def _start_window(self, ctx, state) -> None:
        blocks = self._blocks(ctx)
        b = self.directions
        directions = [{kind: [] for kind in ctx.tuned} for _ in range(b)]
        if self.distribution == "basis":
            sizes = [v.numel() for _, _, v in blocks]
            n = sum(sizes)
            scale = math.sqrt(n)
            for i, d in enumerate(directions):
                j = (state["cursor"] + i) % n
                coordinate = torch.zeros(n, dtype=torch.float64)
                coordinate[j] = scale
                for (kind, _, v), part in zip(blocks, coordinate.split(sizes)):
                    d[kind].append(part.reshape(v.shape).to(v.device, v.dtype, non_blocking=True))
            state["cursor"] = (state["cursor"] + b) % n
        else:
            generator = torch.Generator()
            generator.set_state(state["generator"])
            for d in directions:
                for kind, _, v in blocks:
                    if self.distribution == "rademacher":
                        draw = torch.randint(0, 2, v.shape, generator=generator,
                                             dtype=torch.int8).mul_(2).sub_(1)
                    else:
                        draw = torch.randn(v.shape, generator=generator, dtype=torch.float64)
                    # one small host-to-device copy per window, no synchronisation
                    d[kind].append(draw.to(v.device, v.dtype, non_blocking=True))
            state["generator"] = generator.get_state()
        state["directions"] = directions
        state["Z"] = [{"w": {}, "s": {}} for _ in range(b)]
        state["fresh"] = False

    @staticmethod
    def _hyper_tangent(ctx, direction: dict, item) -> dict[str, Tensor]:
        """``L``: the direction at this parameter's slots, times d(value the rule reads) /
        d(tuned value); 0-dim for scalar slots, shaped like the parameter for element slots."""
        out = {}
        for kind, blocks in direction.items():
            slots = ctx.tuned[kind].group_slots[item.group_index]
            if slots is None:          # e.g. a no-decay group: not tuned
                continue
            block, index = slots[item.param_index]
            if block >= len(blocks):   # a group added mid-window: directions from the next
                continue
            v = blocks[block] if index is None else blocks[block][index]
            v = v.to(item.param.device, item.param.dtype, non_blocking=True)
            scale = ctx.hyper_scale(kind, item.group_index)
            out[kind] = v * scale if scale != 1.0 else v
        return out

    # ------------------------------------------------------------------ carrying
    def carries(self, ctx, state) -> bool:
        return True

    def _window_starts(self, ctx, state) -> bool:
        """The coming step is a window's first (every z is zero there): either the previous
        window was read out, or (no val_loss) it is read out at the coming step."""
        return state["fresh"] or (ctx.window_complete and not ctx.has_val_loss)

    def carry_curvature(self, ctx, state) -> bool:
        return not self._window_starts(ctx, state)

    def carry(self, ctx, state, view) -> None:
        if state["fresh"]:
            self._start_window(ctx, state)
        directions = state["directions"]
        propagate(view, state["Z"], lambda j, item: self._hyper_tangent(ctx, directions[j], item))

    # ------------------------------------------------------------------ the readout
    def hypergradient(self, ctx, state, meta: MetaGradients) -> int:
        if state["fresh"] or not ctx.window_complete:
            return 0
        state["fresh"] = True          # whatever happens, the next carried step starts anew
        metas = meta.by_index()
        home = next(iter(ctx.tuned.values())).values[0].device
        derivatives = []               # grad E . z_i, the maximize sign per parameter's group
        for z in state["Z"]:
            dots = []
            for (gi, pi), zw in z["w"].items():
                m = metas.get((gi, pi))
                if m is not None:
                    dtype = torch.promote_types(zw.dtype, torch.float32)
                    dot = torch.dot(m.reshape(-1).to(dtype), zw.reshape(-1).to(dtype))
                    dots.append((dot if ctx.sign(gi) == 1.0 else -dot).to(home))
            if not dots:               # every tangent covers the same parameters
                return 0
            derivatives.append(torch.stack(dots).sum())
        derivatives = torch.stack(derivatives)
        b = len(derivatives)
        for kind in ctx.tuned:         # (1/b) sum_i (grad E . z_i) v_i, block by block
            for block in range(len(state["directions"][0][kind])):
                vs = torch.stack([v[kind][block] for v in state["directions"]])
                estimate = torch.tensordot(derivatives.to(vs.device, vs.dtype), vs, dims=1)
                ctx.add_to_slot(kind, block, None, estimate.div_(b))
        return 1

    def abandon(self, ctx, state) -> None:
        state.update(directions=[], Z=[], fresh=True)

    def restart(self, ctx, state) -> None:
        """A new window with new directions; the generator and the basis cycle go on (a fresh
        :meth:`init_state` would replay the run's first directions)."""
        self.abandon(ctx, state)
