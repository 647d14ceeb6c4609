"""The hypergradient-method protocol and the narrow context a method sees.

A method object holds options only (its constructor's keyword arguments), so one ``Greedy()``
can serve several optimizers.  Everything a method keeps between steps lives in its *state*, a
plain dict created by :meth:`HypergradientMethod.init_state` and owned by the optimizer, which
saves it in ``state_dict()`` and restores it in ``load_state_dict()``.

A method never sees the optimizer.  It gets a :class:`MethodContext`: the tuned-slot layout
(``ctx.tuned``), the window (``update_every``, ``position``, ``window_complete``), the recorded
steps (``ctx.tape``), the maximize sign and scheduler scale per group (``ctx.sign``,
``ctx.lr_scale``) and the accumulators (``ctx.accumulate``, ``ctx.add_contributions``, which
apply the sign).  Each base step the optimizer

0. asks ``records_step(ctx, state, position)`` whether to record the step on ``ctx.tape``
   (methods that differentiate through past steps: implicit, unroll);
1. asks ``tangent_kinds(ctx, state, ends_window)`` which ``B = dPhi/dlam`` the step itself
   must produce (greedy), and ``carries(ctx, state)`` whether it wants the step *before* the
   write (:meth:`carry`, forward-mode methods: RTRL), with Hessian-vector products at ``w_t``;
2. when the meta-gradient ``grad_w E`` is known (the next step's gradient, or ``val_loss`` at
   the end of a window) calls ``hypergradient(ctx, state, meta)``, which adds ``dE/dlam`` in
   natural units into the accumulators and returns how many contributions it added;
3. runs the step and hands ``observe(ctx, state, record)`` what it did.

A step whose gradient was not finite is skipped (``finite`` is False on the device); a method
that uses such a step calls ``ctx.mark_window(finite)`` so the hyper-step is skipped rather than
fed a made-up derivative.  Every ``update_every`` contributions the optimizer makes a hyper-step.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from ..checkpoint import check_method_state
from ..hyperparams import TunedKind
from ..rules import UpdateRule
from ..rules.base import Tangent, pooled


@dataclass
class MetaGradients:
    """``grad_w E`` per trainable parameter, in bucket layout: ``flats[i]`` is bucket ``i``'s
    flat meta-gradient (None where E does not depend on any of its parameters)."""
    buckets: list
    flats: list[Tensor | None]
    #: a fused step's meta-gradients instead (``flats`` all None): per bucket the gradients
    #: themselves, per tensor, not yet known to be finite; ``finite`` says whether they are
    grads: list[list[Tensor]] | None = None
    finite: Tensor | None = None
    #: and per bucket, where the step's check computed it: the ``key`` of a
    #: :class:`~hyperopt_wrap.rules.base.StateAlias` and its dots with the gradients (one per
    #: tensor, unchecked), as the previous step left the state
    state_dots: list[tuple[tuple, Tensor]] | None = None

    def by_param(self) -> dict[int, Tensor]:
        """Per-parameter views keyed by ``id(param)``."""
        out = {}
        for b, flat in zip(self.buckets, self.flats):
            if flat is not None:
                for p, v in zip(b.params, b.views(flat)):
                    out[id(p)] = v
        return out

    def by_index(self) -> dict[tuple[int, int], Tensor]:
        out = {}
        for b, flat in zip(self.buckets, self.flats):
            if flat is not None:
                for pi, v in zip(b.param_indices, b.views(flat)):
                    out[b.group_index, pi] = v
        return out


class ReplayFlags:
    """Mutable flags shared by the optimizer and the tape's replays."""
    grad_checked = False      # (copies pickled before 0.4 lack the attribute)

    def __init__(self):
        self.replaying = False
        self.replay_checked = False   # an old step's closure was checked to bind its batch
        self.grad_checked = False     # a closure was checked to reproduce its step's gradient
        self.step_calls = 0


class MethodContext:
    """What a method sees of its optimizer (never the optimizer itself)."""

    def __init__(self, *, rule: UpdateRule, tuned: dict[str, TunedKind], controller,
                 param_groups: list[dict], update_every: int, val_loss: bool,
                 flags: ReplayFlags, tuned_kinds: tuple[str, ...]):
        self.rule = rule
        self.tuned = tuned
        self.tuned_kinds = tuned_kinds
        self.update_every = update_every
        self.has_val_loss = val_loss
        self.flags = flags
        self._controller = controller
        self._groups = param_groups
        self.position = 0                 # base steps taken in the current window
        self.tape: list = []
        self.lr_scales: list[float] = [1.0] * len(param_groups)

    # the window
    @property
    def window_complete(self) -> bool:
        return self.position >= self.update_every

    def release_tape(self) -> None:
        self.tape = []

    def mark_window(self, finite: Tensor) -> None:
        self._controller.mark_window(finite)

    # the layout
    def group_params(self, group_index: int) -> list[Tensor]:
        return self._groups[group_index]["params"]

    @property
    def num_groups(self) -> int:
        return len(self._groups)

    def all_params(self) -> list[Tensor]:
        return [p for g in self._groups for p in g["params"]]

    def sign(self, group_index: int) -> float:
        """-1 for a ``maximize`` group (its meta-objective is maximised), else 1."""
        return -1.0 if self._groups[group_index].get("maximize", False) else 1.0

    def lr_scale(self, group_index: int) -> float:
        """Effective lr over tuned lr in this group (the LR scheduler's factor)."""
        return self.lr_scales[group_index]

    def hyper_scale(self, kind: str, group_index: int) -> float:
        """d(value the rule reads) / d(tuned value): the scheduler scale for lr, else 1."""
        return self.lr_scales[group_index] if kind == "lr" else 1.0

    # the accumulators
    def accumulate(self, kind: str, terms) -> None:
        """``accum += sign * scale * <meta, tangent>`` reduced to each slot, for ``terms`` =
        ``(group_index, param_index, meta, tangent, scale)``."""
        self.tuned[kind].accumulate((gi, pi, m, t, s * self.sign(gi)) for gi, pi, m, t, s in terms)

    def add_contributions(self, kind: str, terms) -> None:
        """``accum += sign * value`` for ``terms`` = ``(group_index, param_index, value)``,
        ``value`` already reduced to the slot's shape."""
        self.tuned[kind].add_contributions(
            (gi, pi, v if self.sign(gi) == 1.0 else -v) for gi, pi, v in terms)

    def add_to_slot(self, kind: str, block: int, index: int | None, value: Tensor) -> None:
        """``accum += value`` for one slot (``index`` None: a whole element block); the caller
        has applied the sign."""
        acc = self.tuned[kind].accums[block]
        (acc if index is None else acc[index]).add_(value.to(acc.dtype))

    def accumulate_flat(self, kind: str, bucket, meta: Tensor, tangent: Tensor,
                        scale: float) -> None:
        """``accumulate`` for a whole bucket in flat layout (one or two ops for scalar slots)."""
        tk = self.tuned[kind]
        slots = bucket.slots_of(kind, tk)
        if slots is None:
            return
        scale = scale * self.sign(bucket.group_index)
        tk.accumulate_bucket(slots, bucket, meta, tangent, scale)

    def accumulate_dots(self, kind: str, bucket, metas: list[Tensor], tangents: list[Tensor],
                        scale: float, finite: Tensor) -> None:
        """``accumulate`` for a bucket's per-tensor meta-gradients that are not yet known to be
        finite (a fused step's, :attr:`MetaGradients.grads`): a non-finite step adds 0."""
        tk = self.tuned[kind]
        slots = bucket.slots_of(kind, tk)
        if slots is not None:
            tk.accumulate_dots(slots, metas, tangents, scale * self.sign(bucket.group_index),
                               finite)

    def add_dots(self, kind: str, bucket, dots: Tensor, scale: float, finite: Tensor) -> None:
        """``accum += sign * scale * dots`` for a bucket's per-tensor dots of its meta-gradient
        with a tangent (1-D, :attr:`MetaGradients.state_dots`), 0 where ``finite`` is False."""
        tk = self.tuned[kind]
        slots = bucket.slots_of(kind, tk)
        if slots is not None:
            tk.add_dots(slots, dots, scale * self.sign(bucket.group_index), finite)


class HypergradientMethod:
    name = "method"
    default_update_every = 1
    default_hyper_lr: "float | dict[str, float]" = 0.01
    #: the hyper-optimizer class when the user names none (a torch.optim.Optimizer subclass);
    #: :meth:`hyper_optimizer_for` may choose by the meta-objective
    default_hyper_optimizer: type = torch.optim.Adam

    def hyper_optimizer_for(self, val_loss: bool) -> type:
        """The default hyper-optimizer class for a run with (or without) ``val_loss``."""
        return self.default_hyper_optimizer
    #: the method records steps and asks for Hessian-vector products (a gradient graph or a
    #: closure, see :mod:`hyperopt_wrap.curvature`) on them
    needs_curvature = False
    #: the method evaluates the training loss elsewhere than at the step's weights (Distill), so
    #: its curvature source must be the closure: ``opt.needs_graph`` stays False and a step
    #: without a closure is refused with the fix
    needs_closure = False

    def bind(self, ctx: MethodContext) -> None:
        """Check that the method can serve this optimizer; raise otherwise."""

    def init_state(self, ctx: MethodContext) -> dict[str, Any]:
        """The method's running state for one optimizer (saved by the optimizer)."""
        return {}

    def takes_fused_step(self, ctx: MethodContext, state: dict, buckets: list) -> bool:
        """Whether the coming step may run on the rule's fused kernel (asked only where the
        step records nothing, needs no curvature and carries nothing, or a carry that reads no
        gradient, :meth:`carry_reads_gradients`): the step's tangents then
        come as :class:`~hyperopt_wrap.rules.base.StateAlias`es of the optimizer's state, and
        without ``val_loss`` :meth:`hypergradient` gets the step's gradients per tensor and
        unchecked (:attr:`MetaGradients.grads`).  The default is False."""
        return False

    def reads_state_dots(self, ctx: MethodContext, state: dict) -> bool:
        """Whether :meth:`hypergradient`, after a fused step without ``val_loss``, reads the
        gradients' dots with the state as the previous step left it
        (:attr:`MetaGradients.state_dots`).  Only then does the step's finite check compute
        them (where they double as the check); otherwise it checks the gradients themselves,
        one pass instead of the dots' (Adam's: its ratio ``m / (sqrt(v) + eps)`` first).  The
        default is False."""
        return False

    def records_step(self, ctx: MethodContext, state: dict, position: int) -> bool:
        """Whether the base step at ``position`` (0-based) in the window is recorded on
        ``ctx.tape`` (weights, state, gradient and curvature source before the update) for a
        later reverse pass.  A method that records steps reads them in :meth:`hypergradient`
        once ``ctx.window_complete`` and then calls ``ctx.release_tape()``."""
        return False

    def carries(self, ctx: MethodContext, state: dict) -> bool:
        """Whether :meth:`carry` runs on the coming step (with per-step curvature when
        :attr:`carry_curvature` says so)."""
        return False

    def carry_curvature(self, ctx: MethodContext, state: dict) -> bool:
        """Whether :meth:`carry` needs Hessian-vector products at this step."""
        return False

    def carry_reads_gradients(self, ctx: MethodContext, state: dict) -> bool:
        """Whether :meth:`carry` on the coming step reads its gradients (``StepItem.grad``)
        or its tangent products.  Where it reads only the weights, the state and
        ``view.finite`` (Distill between its readouts), the step may still run on the rule's
        fused kernel (:meth:`takes_fused_step` asked as for a step that carries nothing); the
        view's items then have ``grad = None``.  The default is True."""
        return True

    def carry(self, ctx: MethodContext, state: dict, view) -> None:
        """Before the write: ``view`` (a :class:`~hyperopt_wrap.stepper.StepView`) is the step
        about to happen, with ``view.jvp`` and ``view.hvp``."""

    def tangent_kinds(self, ctx: MethodContext, state: dict, ends_window: bool
                      ) -> tuple[str, ...]:
        return ()

    def observe(self, ctx: MethodContext, state: dict, record) -> None:
        pass

    def hypergradient(self, ctx: MethodContext, state: dict, meta: MetaGradients) -> int:
        raise NotImplementedError

    def abandon(self, ctx: MethodContext, state: dict) -> None:
        """The window was dropped (an error, or a resume that cannot continue it)."""

    def restart(self, ctx: MethodContext, state: dict) -> None:
        """The weights went back to an earlier copy (``recovery="restore"``): what the method
        carried along the abandoned stretch of the run no longer describes it.  The default
        starts the state afresh (:meth:`init_state`)."""
        state.clear()
        state.update(self.init_state(ctx))

    def state_dict(self, state: dict) -> dict[str, Any]:
        return _clone(state)

    def check_loadable(self, ctx: MethodContext, saved: Any) -> None:
        """Raise (a ``CheckpointError``) unless ``saved``, a :meth:`state_dict` of this
        method, fits the optimizer's parameters; called before anything is loaded.  The default
        checks the tensors kept per parameter (under ``(group, index)`` keys) for shape."""
        check_method_state([ctx.group_params(gi) for gi in range(ctx.num_groups)], saved)

    def load_state_dict(self, state: dict, saved: dict[str, Any]) -> None:
        state.clear()
        state.update(_clone(saved))

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({opts})"


def propagate(view, tangents: list[dict], hyper_tangent: Callable, discount: float = 1.0) -> None:
    """One step of the forward recurrence ``Z <- discount * A_t Z + B_t`` for every tangent in
    ``tangents`` (each ``{"w": {(gi, pi): Z_w}, "s": {(gi, pi): {name: Z_s}}}``, missing entries
    zero), in place, before the step's write: ``view.hvp`` gives ``H_t Z_w`` (one product per
    tangent; none when ``view.hvp`` is None: the Hessian-free recurrence), ``view.jvp`` the
    rule's tangent products, ``hyper_tangent(j, item)`` the hyperparameter tangent ``L`` of
    tangent ``j`` at a parameter (``{kind: 0-dim or param-shaped tensor}``).

    A skipped step (non-finite gradient) is the identity, so there every tangent keeps its
    value.  A rule with :meth:`~hyperopt_wrap.rules.base.UpdateRule.carry_foreach` (SGD, Adam)
    runs each bucket in place with the 0/1 flag folded into its coefficients (``x * 1 + 0 * y``,
    exact because the products are finite: the rule saw zero gradients, and non-finite
    Hessian-vector products are zeroed first); otherwise, per tensor through ``jvp``,
    ``Z' = Z'_new * ok + Z * (1 - ok)`` -- ``lerp`` with the 0/1 weight into the old tangent's
    storage, not ``torch.where`` (several times slower here)."""
    items = view.items
    if items and items[0].grad is None:
        raise RuntimeError("internal error: a tangent recurrence on a fused step's view, which "
                           "has no gradients (the method's carry_reads_gradients said False)")
    keys = [(it.group_index, it.param_index) for it in items]
    hz: list = [None] * len(tangents)
    if view.hvp is not None:
        for j, z in enumerate(tangents):
            if any(k in z["w"] for k in keys):
                us = [z["w"].get(k) for k in keys]
                hz[j] = [h.clone() if h.numel() > 1 and 0 in h.stride() else h   # expanded
                         for h in view.hvp([torch.zeros_like(it.param) if u is None else u
                                            for u, it in zip(us, items)])]
                for h in hz[j]:
                    h.nan_to_num_(0.0, 0.0, 0.0)   # leaves a finite (or aliased) input as it is
    lams = [[hyper_tangent(j, it) for j in range(len(tangents))] for it in items]
    rest = range(len(items))
    if type(view.rule).carry_foreach is not UpdateRule.carry_foreach and view.spans:
        rest = []
        for start, stop, hyper, options in view.spans:
            if not _carry_span(view, tangents, keys, hz, lams, discount, start, stop, hyper,
                               options):
                rest.extend(range(start, stop))
        if not rest:
            return
    per_item = []
    for i in rest:
        it, key = items[i], keys[i]
        row = []
        for j, z in enumerate(tangents):
            zw, zs = z["w"].get(key), z["s"].get(key, {})
            g = hz[j][i] if hz[j] is not None else None
            if discount != 1.0:
                zw = None if zw is None else zw * discount
                g = None if g is None else g * discount
                zs = {n: v * discount for n, v in zs.items()}
            row.append(Tangent(zw, g, zs, lams[i][j]))
        per_item.append(row)
    with pooled(view.pool):
        out = [view.rule.jvp(items[i].param, items[i].grad, items[i].state, items[i].hyper,
                             items[i].options, row) for i, row in zip(rest, per_item)]
    gates: dict = {}
    for i, results in zip(rest, out):
        it, key = items[i], keys[i]
        dk = (it.param.device, it.param.dtype)
        if dk not in gates:
            gates[dk] = view.finite.to(it.param.device, it.param.dtype)
        ok = gates[dk]
        for z, (zw_new, zs_new) in zip(tangents, results):
            z["w"][key] = _keep_if_skipped(zw_new, z["w"].get(key), ok, view)
            olds = z["s"].get(key, {})
            z["s"][key] = {n: _keep_if_skipped(v, olds.get(n), ok, view)
                           for n, v in zs_new.items()}
            for n, v in olds.items():
                if n not in zs_new:
                    view.retire(v)


def _carry_span(view, tangents: list[dict], keys: list, hz: list, lams: list, discount: float,
                start: int, stop: int, hyper: dict, options: dict) -> bool:
    """:func:`propagate` on one bucket through the rule's in-place
    :meth:`~hyperopt_wrap.rules.base.UpdateRule.carry_foreach`; False where it declines."""
    items = view.items[start:stop]
    params = [it.param for it in items]
    span_keys = keys[start:stop]
    ok = view.finite.to(params[0].device, params[0].dtype)
    args, live = [], []
    for j, z in enumerate(tangents):
        zw = [z["w"].get(k) for k in span_keys]
        lam = {}                     # a kind only where some param of the bucket has an L
        for i in range(start, stop):
            for kind, v in lams[i][j].items():
                if v is not None:
                    lam.setdefault(kind, [None] * (stop - start))[i - start] = v
        zs_items = [z["s"].get(k, {}) for k in span_keys]
        if all(w is None for w in zw) and not lam and not any(zs_items) and hz[j] is None:
            continue                 # zero in, nothing of it in this bucket's step: zero out
        g = hz[j][start:stop] if hz[j] is not None else None
        names = {n for d in zs_items for n in d}
        zs = {n: [d.get(n) for d in zs_items] for n in names}
        if g is not None:            # an output of the product that aliases an input: copy it
            taken = {x.untyped_storage().data_ptr() for x in
                     (*params, *(w for w in zw if w is not None),
                      *(x for xs in zs.values() for x in xs if x is not None))}
            g = [h.clone() if h.untyped_storage().data_ptr() in taken else h for h in g]
        args.append({"w": zw, "g": g, "s": zs, "hyper": lam})
        live.append(j)
    if not args:
        return True
    new_zw = [[torch.zeros_like(p) if w is None else w for w, p in zip(a["w"], params)]
              for a in args]
    calls = [dict(a, w=w) for a, w in zip(args, new_zw)]
    out = view.rule.carry_foreach(params, [it.grad for it in items], [it.state for it in items],
                                  hyper, options, calls, ok, discount)
    if out is None:
        return False
    for j, a, zw, new_s in zip(live, args, new_zw, out):
        z = tangents[j]
        for k, w in zip(span_keys, zw):
            z["w"][k] = w
        for i, k in enumerate(span_keys):
            olds = z["s"].get(k, {})
            z["s"][k] = {n: xs[i] for n, xs in new_s.items()}
            for n, v in olds.items():
                if v is not None and z["s"][k].get(n) is not v:
                    view.retire(v)
    return True


def _keep_if_skipped(new: Tensor, old: Tensor | None, ok: Tensor, view) -> Tensor:
    """``new`` where the step was taken, ``old`` (zero if None) where it was skipped: ``lerp``
    with a 0/1 weight is an exact select (``b - (b - a) * 0`` and ``a + 0 * (b - a)``), one
    pass into ``old``'s storage; the other buffer goes back to the pool."""
    if old is None or old.shape != new.shape or old.dtype != new.dtype:
        view.retire(old)
        return new.mul_(ok)
    old.lerp_(new, ok)
    view.retire(new)
    return old


def _clone(obj):
    if isinstance(obj, Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone(v) for v in obj)
    return copy.copy(obj)


class RecordingMethod(HypergradientMethod):
    """A method that differentiates through recorded steps (implicit, unroll): no tangents in
    the base step; :meth:`hypergradient` reads ``ctx.tape`` once the window is complete (see
    :meth:`window_ready`) and releases it."""
    needs_curvature = True

    @staticmethod
    def window_ready(ctx: MethodContext) -> bool:
        return ctx.window_complete and bool(ctx.tape)

    def takes_fused_step(self, ctx: MethodContext, state: dict, buckets: list) -> bool:
        """The steps between recordings need nothing of the step, except the one whose
        gradient completes a recorded window (its flat meta-gradient is read)."""
        return ctx.has_val_loss or not self.window_ready(ctx)
