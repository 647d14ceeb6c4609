"""Forward sensitivities: real-time recurrent hypergradients (Franceschi et al. 2017, "RTHO";
Im, Savin & Cho 2021, "OHO"; Donini et al. 2020, "MARTHE" for the discount).

The state of training is ``x = (w, s)``: the weights and the base optimizer's state (momentum
buffer, Adam moments).  RTRL carries its sensitivity to the hyperparameters forward through
every base step::

    Z_0 = 0,    Z_{t+1} = mu * A_t Z_t + B_t,       A_t = dPhi_t/dx,   B_t = dPhi_t/dlam
    A_t Z = (dPhi/dw Z_w + dPhi/dg H_t Z_w + dPhi/ds Z_s)

with ``H_t`` the Hessian of the training loss at ``w_t`` on step t's minibatch, taken *before*
the step writes the weights (OHO's reference code evaluates it at ``w_{t+1}``, a different
matrix).  At each hyper-step ``dE/dlam = grad_w E(w_t) . Z_w``.  The products through the rule
are its closed-form tangent products (:meth:`UpdateRule.jvp`, forward-mode autograd through
``update`` for registered rules); ``H_t Z_w`` is one Hessian-vector product per tangent and
step, from the gradient graph (``loss.backward(create_graph=opt.needs_graph)``) or the closure
(finite differences, one gradient each).

Which tangents:

* global and group granularity: one tangent per tuned scalar (``lr``, ``momentum`` and
  ``weight_decay`` global: three).  With ``discount=1`` this is the exact hypergradient of
  ``E`` through the whole run with the hyperparameters held at their current values (the tests
  check it against ``hyperopt_wrap.reference`` to 1e-8 in float64); the hyperparameters do move
  at each hyper-step, and ``Z`` is not corrected for that (the usual online approximation).
* tensor granularity: one tangent per *kind* (OHO's block-diagonal construction).  Its block
  at tensor ``i`` is read as ``dw_i/dlam_i``; it is really ``sum_j dw_i/dlam_j``, so it is exact
  only when no sensitivity crosses tensors: when ``H`` is block-diagonal by tensor (no
  curvature couples two tensors) or with ``hessian_free=True``.  The tests report its bias.
* element granularity: the same per-kind tangent read element by element (exact only where
  ``H`` is diagonal).  That is a strong approximation, so it is refused unless asked for with
  ``RTRL(per_kind_elements=True)``.

Options: ``discount`` (mu in (0, 1]; below 1 old history fades, MARTHE's damping);
``hessian_free`` (drop the ``H`` term: no products at all, ``Z`` then follows only the rule's
own Jacobians, as in the Hessian-free variants of OHO/MARTHE); ``reset_every`` (zero ``Z``
after that many hyper-steps; None: never).

Cost per base step: one Hessian-vector product per tangent (three global kinds: three products,
about 3 extra gradients with the closure), plus the rule's tangent products; memory: one copy of
the weights and of the differentiable optimizer state per tangent.
"""
from __future__ import annotations

import torch

from .base import HypergradientMethod, MetaGradients, propagate


class RTRL(HypergradientMethod):
    name = "rtrl"
    default_update_every = 10
    default_hyper_lr = {"lr": 0.05, "weight_decay": 0.05, "momentum": 0.05}

    def __init__(self, discount: float = 1.0, hessian_free: bool = False,
                 reset_every: int | None = None, per_kind_elements: bool = False):
        if isinstance(discount, bool) or not isinstance(discount, (int, float)) \
                or not 0 < discount <= 1:
            raise ValueError(f"discount must be a number in (0, 1] (1: the exact recurrence), "
                             f"got {discount!r}; e.g. RTRL(discount=0.99)")
        if reset_every is not None and (isinstance(reset_every, bool)
                                        or not isinstance(reset_every, int) or reset_every < 1):
            raise ValueError(f"reset_every must be None or an int >= 1 (hyper-steps between "
                             f"resets of the sensitivities), got {reset_every!r}")
        self.discount = float(discount)
        self.hessian_free = bool(hessian_free)
        self.reset_every = reset_every
        self.per_kind_elements = bool(per_kind_elements)

    def bind(self, ctx) -> None:
        element = [k for k, tk in ctx.tuned.items() if tk.granularity == "element"]
        if element and not self.per_kind_elements:
            raise ValueError(
                f"RTRL at element granularity ({', '.join(element)}) would carry one tangent "
                "per element; it carries one per kind instead only when asked: "
                "RTRL(per_kind_elements=True) (exact only where the Hessian is diagonal; see "
                "hyperopt_wrap.methods.rtrl). For many hyperparameters see also "
                "granularity='tensor' or the greedy and implicit methods")

    def init_state(self, ctx):
        tangents = []
        for kind, tk in ctx.tuned.items():
            if tk.granularity in ("global", "group"):
                tangents += [(kind, block, 0) for block in range(len(tk.values))]
            else:
                tangents.append((kind, None, None))
        # Z[j]: per parameter (group index, param index) the tangent of the weights ("w") and
        # of the differentiable optimizer state ("s"); missing entries are zero
        return {"tangents": tangents, "Z": [{"w": {}, "s": {}} for _ in tangents],
                "windows": 0}

    # ------------------------------------------------------------------ carrying
    def carries(self, ctx, state) -> bool:
        return True

    def carry_curvature(self, ctx, state) -> bool:
        return not self.hessian_free

    @staticmethod
    def _touches(ctx, tangent, item) -> bool:
        """Whether ``tangent``'s hyperparameter enters this parameter's step: its kind is tuned
        in the parameter's group and, for one scalar's tangent, the parameter uses that slot."""
        kind, block, index = tangent
        slots = ctx.tuned[kind].group_slots[item.group_index]
        if slots is None:
            return False
        return block is None or slots[item.param_index] == (block, index)

    def carry(self, ctx, state, view) -> None:
        coefficients: dict = {}

        def hyper_tangent(j, item):
            tangent = state["tangents"][j]
            if not self._touches(ctx, tangent, item):
                return {}
            kind = tangent[0]
            key = (kind, item.group_index, item.param.device, item.param.dtype)
            if key not in coefficients:     # a fill on the device, not a copy from the host
                coefficients[key] = torch.full((), ctx.hyper_scale(kind, item.group_index),
                                               dtype=item.param.dtype, device=item.param.device)
            return {kind: coefficients[key]}
        propagate(view, state["Z"], hyper_tangent, self.discount)

    # ------------------------------------------------------------------ the readout
    def hypergradient(self, ctx, state, meta: MetaGradients) -> int:
        if not (ctx.has_val_loss or ctx.window_complete):
            return 0
        used = read_out(ctx, state["tangents"], state["Z"], meta)
        state["windows"] += 1
        if self.reset_every is not None and state["windows"] % self.reset_every == 0:
            state["Z"] = [{"w": {}, "s": {}} for _ in state["tangents"]]
        return int(used)


def read_out(ctx, tangents: list, sensitivities: list[dict], meta: MetaGradients) -> bool:
    """``dE/dlam = grad E . Z_w`` into the accumulators, for RTRL's tangents (``(kind, block,
    index)`` of one tuned scalar, or ``(kind, None, None)`` for a per-kind tangent read block
    by block); whether anything was added."""
    metas = meta.by_index()
    used = False
    for (kind, block, index), z in zip(tangents, sensitivities):
        pairs = [(key, metas[key], zw) for key, zw in z["w"].items() if key in metas]
        if not pairs:
            continue
        used = True
        if block is None:      # per kind: each parameter's block into its own slot
            ctx.accumulate(kind, [(gi, pi, m, zw, 1.0) for (gi, pi), m, zw in pairs])
        else:                  # one scalar: every parameter's sensitivity to it
            total = sum(ctx.sign(gi) * torch.vdot(m.reshape(-1), zw.reshape(-1))
                        for (gi, pi), m, zw in pairs)
            ctx.add_to_slot(kind, block, index, total)
    return used
