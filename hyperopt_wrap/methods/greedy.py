"""Greedy one-step hypergradients (hypergradient descent, Baydin et al. 2018).

One-step horizon, gradient and optimizer state held fixed at step t:

    dE(w_{t+1}) / dlam  ~=  grad_w E(w_{t+1}) . B_t,     B_t = d Phi(x_t, g_t, lam) / dlam

``B_t`` comes out of the rule's own step (closed form, one tangent per tuned kind;
elementwise, so it serves every granularity).  With no validation objective
``grad_w E(w_{t+1})`` is the next step's training gradient, and for plain SGD this is exactly
Baydin et al.'s ``dE/dlr = -g_{t+1} . g_t``.  No Hessian-vector products; it works in the plain
``loss.backward(); opt.step()`` loop.  With ``update_every = T`` the T one-step hypergradients
of a window are averaged (with ``val_loss``, only the window's last step is used).

State: the pending step's tangents (flat, one per bucket and kind; after a fused step, a
:class:`~hyperopt_wrap.rules.base.StateAlias` of the optimizer state: SGD's momentum buffers,
Adam's moments; saved as a flat tensor of its own), its scheduler scales and whether it was
taken.  A fused step hands the next step's gradient over per tensor with its dots with that
state already computed (the step's finite check), so the hypergradient costs no pass of its
own there.
"""
from __future__ import annotations

import torch

from ..checkpoint import CheckpointError, require
from ..normalized_momentum import NormalizedMomentum
from ..rules.base import StateAlias
from .base import HypergradientMethod, MetaGradients


class Greedy(HypergradientMethod):
    name = "greedy"
    default_update_every = 1
    default_hyper_lr = 0.05
    def hyper_optimizer_for(self, val_loss: bool) -> type:
        """With ``val_loss``: normalised momentum (scale-free: a tiny lr is rescued; spike-proof;
        per-tensor values move by their share of the signal; on the study's digits task it
        halves greedy's test loss).  Without it, torch's Adam: the next minibatch's one-step
        hypergradient turns into a small, steady "smaller lr" late in training, which a
        normalised step follows at full speed (the demo's lr fell from 0.11 to the bound 1e-10
        by step 2250), while Adam's memory of the early magnitudes all but ignores it.
        Measured in RESULTS.md ("Which hyper-optimizer")."""
        return NormalizedMomentum if val_loss else torch.optim.Adam

    def init_state(self, ctx):
        return {"pending": None}

    def check_loadable(self, ctx, saved) -> None:
        require(saved, ("pending",), "hyper['method']")
        pending = saved["pending"]
        if pending is None:
            return
        require(pending, ("layout", "tangents", "scales", "finite"), "hyper['method']['pending']")
        layout, tangents = pending["layout"], pending["tangents"]
        try:
            numels = [sum(ctx.group_params(gi)[pi].numel() for pi in pis) for gi, pis in layout]
        except (TypeError, ValueError, IndexError):
            raise CheckpointError("hyper['method']['pending'] names parameters this optimizer "
                                  "does not have; load it into the same model architecture") from None
        if len(tangents) != len(numels) or any(
                not isinstance(t, dict) or any(not hasattr(v, "numel") or v.numel() != n
                                               for v in t.values())
                for t, n in zip(tangents, numels)):
            raise CheckpointError("hyper['method']['pending'] holds tangents of another size "
                                  "than this model's parameters; load it into the same "
                                  "model architecture")
        in_state = pending.get("in_state")
        if in_state is not None and not (
                isinstance(in_state, (list, tuple)) and len(in_state) == len(tangents)
                and all(isinstance(ks, dict) and all(k in t and isinstance(v, (list, tuple))
                                                     for k, v in ks.items())
                        for ks, t in zip(in_state, tangents))):
            raise CheckpointError("hyper['method']['pending']['in_state'] must hold, per "
                                  "bucket, the kinds of its tangents that the optimizer state "
                                  "holds and their settings; the checkpoint is corrupt")

    def tangent_kinds(self, ctx, state, ends_window):
        if not ctx.has_val_loss or ends_window:
            return ctx.tuned_kinds
        return ()

    def observe(self, ctx, state, record) -> None:
        if record.buckets and any(record.tangents):
            state["pending"] = {"layout": [b.key for b in record.buckets],
                                "tangents": record.tangents, "scales": list(record.lr_scales),
                                "finite": record.finite}
        else:
            state["pending"] = None

    def reads_state_dots(self, ctx, state) -> bool:
        """Where the pending tangents are the state's (a fused step's aliases, or a resumed
        one's ``in_state``): :meth:`hypergradient` then reads the check's dots."""
        pending = state["pending"]
        return pending is not None and (
            pending.get("in_state") is not None
            or any(isinstance(t, StateAlias) for ts in pending["tangents"] for t in ts.values()))

    def takes_fused_step(self, ctx, state, buckets) -> bool:
        pending = state["pending"]
        return pending is None or ctx.has_val_loss \
            or pending["layout"] == [b.key for b in buckets]

    def state_dict(self, state):
        """A fused step's tangents live in the optimizer's state: saved as tangents of their
        own (the checkpoint's layout does not depend on which kernel took the step)."""
        pending = state["pending"]
        if pending is not None and any(isinstance(t, StateAlias)
                                       for ts in pending["tangents"] for t in ts.values()):
            pending = dict(pending, tangents=[
                {k: t.materialize() if isinstance(t, StateAlias) else t for k, t in ts.items()}
                for ts in pending["tangents"]],
                # the values the state itself gives: a resumed fused step reads them from the
                # restored state as the uninterrupted one does, bit for bit
                in_state=[{k: list(t.settings) for k, t in ts.items()
                           if isinstance(t, StateAlias)} for ts in pending["tangents"]])
            state = dict(state, pending=pending)
        return super().state_dict(state)

    def hypergradient(self, ctx, state, meta: MetaGradients) -> int:
        pending = state["pending"]
        if pending is None:
            return 0
        state["pending"] = None
        scales = pending["scales"]
        in_state = pending.get("in_state") or [{}] * len(pending["tangents"])
        used = False
        if [b.key for b in meta.buckets] == pending["layout"]:
            for i, (b, tangents) in enumerate(zip(meta.buckets, pending["tangents"])):
                m = meta.flats[i]
                grads = meta.grads[i] if meta.grads is not None else None
                if m is None and grads is None:
                    continue
                for kind, t in tangents.items():
                    s = scales[b.group_index] if kind == "lr" else 1.0
                    if grads is not None:       # a fused step's gradients, per tensor
                        if meta.state_dots and (
                                meta.state_dots[i][0] == t.key if isinstance(t, StateAlias)
                                else tuple(in_state[i].get(kind, (None,)))
                                == meta.state_dots[i][0][1]):
                            # the dots the step's finite check computed
                            ctx.add_dots(kind, b, meta.state_dots[i][1], s, meta.finite)
                        elif isinstance(t, StateAlias):
                            ctx.add_dots(kind, b, t.dots(grads), s, meta.finite)
                        else:
                            ctx.accumulate_dots(kind, b, grads, b.views(t), s, meta.finite)
                    elif isinstance(t, StateAlias):
                        ts, factor = t.parts()
                        ctx.accumulate(kind, [(b.group_index, pi, v, a * factor, s)
                                              for pi, v, a in zip(b.param_indices, b.views(m),
                                                                  ts)])
                    else:
                        ctx.accumulate_flat(kind, b, m, t, s)
                    used = True
        else:   # the parameters with a gradient changed: match them one by one
            metas = meta.by_index()
            for (gi, pis), tangents in zip(pending["layout"], pending["tangents"]):
                shapes = [ctx.group_params(gi)[pi] for pi in pis]
                for kind, flat in tangents.items():
                    if isinstance(flat, StateAlias):
                        flat = flat.materialize()
                    views = [v.view_as(p) for v, p in zip(flat.split([p.numel() for p in shapes]),
                                                          shapes)]
                    s = scales[gi] if kind == "lr" else 1.0
                    terms = [(gi, pi, metas[gi, pi], v, s) for pi, v in zip(pis, views)
                             if (gi, pi) in metas]
                    used |= bool(terms)
                    ctx.accumulate(kind, terms)
        if used:
            ctx.mark_window(pending["finite"])
        return int(used)
