"""Base stepping: buckets of parameters, the finite check, the rule's foreach step, the tape.

A *bucket* is the trainable parameters of one (param group, device, dtype), in group order, as
torch's ``Optimizer._group_tensors_by_device_and_dtype`` groups them.  Each bucket owns a flat
gradient scratch buffer (and flat tangent buffers) whose views the rule steps on, so the
per-step work is a handful of whole-bucket operations instead of a Python loop over tensors:

1. :meth:`Stepper.load_grads` copies every gradient into its bucket's flat buffer (one
   ``torch.cat``), decides on the device whether all of them are finite and zeroes the buffer
   where they are not (one ``torch.where``): the rule never sees a NaN, and a skipped step is
   a bit-exact no-op;
2. :meth:`Stepper.step` runs the rule's ``step_foreach`` on each bucket (the per-tensor
   ``step_`` where the rule declines, and ``update_with_tangents`` where that declines too),
   writing ``B = dPhi/dlam`` into the bucket's flat tangent buffers when a method asks for it.

Where nothing else needs the gradients (no recorded step, no carried tangents, no curvature,
clipping, rollback or shards) and the rule and method allow it, the step instead runs on
torch's fused kernel (:meth:`Stepper.fused_plan`, :meth:`Stepper.check_grads`,
:meth:`Stepper.step_fused`): the gradients are neither copied nor selected, the kernel skips a
non-finite step on the device (``found_inf``), and the tangents stay in the optimizer's state
(:class:`~hyperopt_wrap.rules.base.StateAlias`: SGD's lr tangent is minus the new momentum
buffer).  Greedy with a global or per-tensor lr on SGD with momentum (from its second step) or
Adam steps this way, and so do implicit and unroll between their recorded steps.

Before the write a method may ask :meth:`Stepper.view` for the step as it is about to happen:
per parameter its weights, gradient, state and hyperparameters, with ``jvp`` (the rule's
tangent products) and ``hvp`` (Hessian-vector products at ``w_t``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import math

import torch
from torch import Tensor

from .rules import UpdateRule
from .rules.base import FUSED_DEVICES, TensorPool, pooled, scratch
from .tape import TapedParam, TapedStep


# Buckets of at most _DIRECT_MAX tensors, or of tensors of _DIRECT_NUMEL elements on average,
# are checked and copied tensor by tensor (torch.cat is several times slower than a copy on
# large CPU tensors); buckets of many small tensors take one cat.
_DIRECT_MAX = 8
_DIRECT_NUMEL = 4096
_FUSED_DTYPES = (torch.float32, torch.float64)


class Bucket:
    """The trainable parameters of one (param group, device, dtype) with flat scratch."""

    def __init__(self, group_index: int, param_indices: list[int], params: list[Tensor]):
        self.group_index = group_index
        self.param_indices = param_indices
        self.params = params
        self.device, self.dtype = params[0].device, params[0].dtype
        self.numels = [p.numel() for p in params]
        self.numel = sum(self.numels)
        self.key = (group_index, tuple(param_indices))
        self._flats: dict[str, tuple[Tensor, list[Tensor]]] = {}
        self._lengths: Tensor | None = None
        self.states: list[dict] | None = None    # the params' state dicts, once initialised
        self.detached: list[tuple[Tensor, dict]] = []  # empty ones, not (yet) in opt.state
        self.slots: dict[str, Any] = {}          # per tuned kind: TunedKind.slots_of(...)
        self.work: dict = {}                     # a fused step's scratch (the rule's)

    def tuned_values(self, kind: str, tuned) -> Any:
        """This bucket's tuned values of ``kind`` as the rule takes them: one 0-dim view shared
        by the bucket (global/group), 0-dim views per tensor or the element blocks, memoised
        (the values are updated in place, so the views stay current)."""
        key = "values." + kind
        if key not in self.slots:
            how, *where = self.slots_of(kind, tuned)
            if how == "scalar":
                value: Any = tuned.values[where[0]][where[1]]
            elif how == "tensor":
                value = [tuned.values[where[0]][i] for i in where[1]]
            else:
                value = [tuned.values[b] for b in where[0]]
            self.slots[key] = value
        return self.slots[key]

    def slots_of(self, kind: str, tuned) -> Any:
        """``tuned.slots_of`` for this bucket, memoised (layouts change only with the param
        groups, which rebuild the buckets)."""
        if kind not in self.slots:
            self.slots[kind] = tuned.slots_of(self.group_index, self.param_indices)
        return self.slots[kind]

    @property
    def grad(self) -> Tensor:
        """The flat gradient buffer (allocated when a step first copies into it)."""
        return self.flat("grad")[0]

    @property
    def grads(self) -> list[Tensor]:
        """Its per-parameter views."""
        return self.flat("grad")[1]

    def release_step_buffers(self) -> None:
        """Forget the flat gradient and tangent buffers (a fused step needs neither; a later
        copying step allocates them again)."""
        for name in [n for n in self._flats if n == "grad" or n.startswith("t_")]:
            del self._flats[name]

    def flat(self, name: str) -> tuple[Tensor, list[Tensor]]:
        """A persistent flat buffer of this bucket and its per-parameter views."""
        hit = self._flats.get(name)
        if hit is None:
            buf = torch.empty(self.numel, dtype=self.dtype, device=self.device)
            hit = self._flats[name] = (buf, self.views(buf))
        return hit

    def views(self, flat: Tensor) -> list[Tensor]:
        return [v.view_as(p) for v, p in zip(flat.split(self.numels), self.params)]

    @property
    def lengths(self) -> Tensor:
        if self._lengths is None:
            self._lengths = torch.tensor(self.numels, device=self.device)
        return self._lengths

    def segment_sums(self, flat: Tensor) -> Tensor:
        """Per-parameter sums of a flat tensor laid out like this bucket."""
        if len(self.params) == 1:
            return flat.sum().reshape(1)
        return torch.segment_reduce(flat, "sum", lengths=self.lengths)


@dataclass
class StepRecord:
    """What one base step did: the buckets it stepped and, per bucket, the flat tangents
    ``B_k = d w_new / d lam_k`` (elementwise) of the kinds a method asked for."""
    buckets: list[Bucket]
    tangents: list[dict[str, Tensor]]
    lr_scales: list[float]
    finite: Tensor


@dataclass
class StepItem:
    """One parameter as the coming step sees it (before the write)."""
    group_index: int
    param_index: int
    param: Tensor
    grad: Tensor | None           # the finite gradient the step uses (None: a fused step's
    #                               view, for a carry that reads none)
    state: dict[str, Any]
    hyper: dict[str, Any]         # what the rule reads (tuned lr already times its scale)
    options: dict[str, Any]


@dataclass
class StepView:
    """The coming step, for methods that carry tangents through it (see :meth:`jvp`)."""
    items: list[StepItem]
    finite: Tensor
    rule: UpdateRule
    hvp: Callable[[list[Tensor]], list[Tensor]] | None = None
    extra: dict = field(default_factory=dict)
    #: the step's curvature source (a ``GraphSource`` or ``ClosureSource`` of
    #: :mod:`hyperopt_wrap.curvature`; None where the method asked for none), e.g. for
    #: ``curvature.step_gradient_at`` (the training gradient at other weights)
    source: Any = None

    pool: TensorPool | None = None
    #: the buckets as ``(start, stop, hyper, options)``: ``items[start:stop]`` share a param
    #: group, device and dtype; ``hyper`` as :meth:`UpdateRule.step_foreach` takes it
    spans: list = field(default_factory=list)

    def jvp(self, tangents: list[list]) -> list[list[tuple[Tensor, dict[str, Tensor]]]]:
        """Per item, the rule's forward products of the step for its list of tangents (their
        outputs in buffers from :attr:`pool` where it has them: :meth:`retire` gives back
        tangents that are no longer used)."""
        if self.items and self.items[0].grad is None:
            raise RuntimeError("internal error: the rule's tangent products on a fused step's "
                               "view, which has no gradients (the method's "
                               "carry_reads_gradients said False)")
        with pooled(self.pool):
            return [self.rule.jvp(it.param, it.grad, it.state, it.hyper, it.options, ts)
                    for it, ts in zip(self.items, tangents)]

    def retire(self, t: Tensor | None) -> None:
        """A tangent nothing refers to any more: its storage may hold a later product."""
        if t is not None and self.pool is not None:
            self.pool.give(t)


class Stepper:
    def __init__(self, rule: UpdateRule, state):
        self.rule = rule
        self.state = state                 # the optimizer's per-parameter state (torch's)
        self._buckets: dict[tuple, list[Bucket]] = {}
        self._work: dict[Tensor, dict[str, Tensor]] = {}   # per-tensor scratch (fallbacks)
        self._tape_buffers: list[dict] = []
        self._amp: dict = {}
        self._pool = TensorPool()
        self._oks: dict | None = None     # the factor load_grads made, handed to step()
        self._skips: dict | None = None   # check_grads' found_inf per device, for step_fused()
        self._snapshots: dict = {}         # recovery="rollback": weights and state per param
        self._restore: dict = {}           # recovery="restore": the restore point per param
        self.guard_ref: Tensor | None = None   # the blow-up test's reference gradient norm

    def __getstate__(self):
        """Pickling and deepcopy leave the caches behind (rebuilt on demand)."""
        state = dict(self.__dict__)
        state.update(_buckets={}, _work={}, _tape_buffers=[], _amp={}, _pool=TensorPool(),
                     _oks=None, _skips=None)
        state["_snapshots"] = {}     # (a copy's rollback starts afresh; guard_ref is kept)
        state["_restore"] = {}
        return state

    def invalidate(self) -> None:
        """Forget the buckets (after add_param_group / load_state_dict)."""
        self._buckets = {}

    # ------------------------------------------------------------------ buckets
    def buckets(self, param_groups: list[dict]) -> list[Bucket]:
        """The buckets of the parameters that have a gradient now (cached per layout)."""
        trainable = []
        for gi, group in enumerate(param_groups):
            for pi, p in enumerate(group["params"]):
                if p.grad is not None:
                    if p.grad.is_sparse:
                        raise RuntimeError("HyperOptimizer does not support sparse gradients; use "
                                           "dense gradients (e.g. nn.Embedding(sparse=False))")
                    trainable.append((gi, pi, p))
        key = tuple((gi, pi, id(p)) for gi, pi, p in trainable)
        hit = self._buckets.get(key)
        if hit is None:
            if len(self._buckets) > 8:      # layouts that come and go: keep a few
                self._buckets.clear()
            split: dict[tuple, tuple[list, list]] = {}
            for gi, pi, p in trainable:
                pis, ps = split.setdefault((gi, p.device, p.dtype), ([], []))
                pis.append(pi)
                ps.append(p)
            hit = self._buckets[key] = [Bucket(gi, pis, ps)
                                        for (gi, _, _), (pis, ps) in split.items()]
        return hit

    def load_grads(self, buckets: list[Bucket], device: torch.device,
                   found_inf: Tensor | None = None, grad_scale: Tensor | None = None,
                   check_in_place: bool = False, growth: float | None = None
                   ) -> tuple[Tensor, Tensor]:
        """Copy the gradients into the buckets' flat buffers; return whether the step is taken
        and whether every gradient is finite (bools on ``device``), and zero the buffers where
        the step is not taken.  ``found_inf`` (GradScaler's convention: nonzero = skip) and
        ``grad_scale`` (divide the gradients by it) come from an AMP-aware caller, as for
        torch's fused optimizers.  With ``growth`` (``recovery="rollback"``) the step is also
        put to :meth:`guard_norm`'s blow-up test, on the unscaled gradients before the select
        (no pass of its own but the norm's).

        The check is GradScaler's own kernel (``_amp_foreach_non_finite_check_and_unscale_``:
        exact, one pass, one call per device and dtype); the select is ``g * ok`` followed by
        ``nan_to_num``, which gives ``g`` where every gradient is finite and zeros (never NaN)
        where not.  With ``check_in_place`` (the gradients carry no graph and are not rescaled)
        a bucket of few or large tensors is checked on ``p.grad`` itself, which the kernel
        multiplies by 1 (the same values), and copied with the ``* ok`` on the way: three passes
        instead of four (copy, check, multiply, zero)."""
        direct = [check_in_place and grad_scale is None
                  and (len(b.params) <= _DIRECT_MAX or b.numel >= _DIRECT_NUMEL * len(b.params))
                  and all(p.grad.grad_fn is None for p in b.params) for b in buckets]
        for b, d in zip(buckets, direct):
            if not d:
                torch.cat([p.grad.reshape(-1) for p in b.params], out=b.grad)
        checked: dict[torch.device, dict[torch.dtype, list[Tensor]]] = {}
        for b, d in zip(buckets, direct):
            checked.setdefault(b.device, {}).setdefault(b.dtype, []).extend(
                [p.grad for p in b.params] if d else [b.grad])
        bad = self._amp_check(checked, device, found_inf, grad_scale)
        finite = taken = bad == 0
        if growth is not None:
            n = self.grad_norm([t for by in checked.values() for ts in by.values() for t in ts],
                               device)
            taken = self.guard_norm(n, finite, growth)
            bad = torch.where(taken, bad, 1.0)
        ok = 1 - bad
        oks = self._oks = {}       # the 0/1 factor per (device, dtype), for the step too
        for b, d in zip(buckets, direct):
            key = (b.device, b.dtype)
            if key not in oks:
                oks[key] = ok if (ok.device, ok.dtype) == key else \
                    ok.to(b.device, b.dtype, non_blocking=True)
            if d:
                for p, view in zip(b.params, b.grads):
                    torch.mul(p.grad, oks[key], out=view)
            else:
                b.grad.mul_(oks[key])
            b.grad.nan_to_num_(0.0, 0.0, 0.0)
        return taken, finite

    def fused_plan(self, buckets: list[Bucket], hyper: list[dict[str, Any]],
                   options: list[dict], kinds: tuple[str, ...], foreach: list[bool]
                   ) -> list[dict] | None:
        """Per bucket, the tangents the rule's fused kernel would leave behind
        (:meth:`UpdateRule.fused_tangents`), when every bucket's step can take it; else None.

        It needs initialised state; contiguous float32 or float64 weights, gradients (without
        a graph) and state (torch's CPU kernels walk storage order and pair the wrong elements
        of a channels_last weight with a contiguous buffer); a device with fused kernels;
        foreach not turned off; and few tensors or large ones (the dots and the per-tensor
        calls are a Python loop: on 200 tensors of 16x16 greedy Adam took 19.9 ms a step fused
        against 18.2 ms copied).  Low precision keeps the copying path: torch 2.13's CPU kernel
        in bfloat16 ends 10 steps of a small regression 0.56 away from torch's own for-loop
        SGD, on weights of size 0.54."""
        plan = []
        for b, h in zip(buckets, hyper):
            if b.states is None or not foreach[b.group_index] \
                    or b.device.type not in FUSED_DEVICES or b.dtype not in _FUSED_DTYPES \
                    or not (len(b.params) <= _DIRECT_MAX
                            or b.numel >= _DIRECT_NUMEL * len(b.params)) \
                    or any(p.grad.grad_fn is not None or not p.is_contiguous()
                           or not p.grad.is_contiguous() for p in b.params):
                return None
            tangents = self.rule.fused_tangents(b.states, h, options[b.group_index], kinds,
                                                b.work)
            if tangents is None:
                return None
            plan.append(tangents)
        return plan

    def check_grads(self, buckets: list[Bucket], device: torch.device, plan: list[dict],
                    found_inf: Tensor | None = None, with_dots: bool = True
                    ) -> tuple[Tensor, list[Tensor] | None]:
        """For a fused step: whether every gradient is finite (a bool on ``device``), nothing
        copied; the step's skip flags wait in ``self._skips`` as float ``found_inf`` per device.

        Where every bucket is on ``device``, the check is the gradients' dots with the state
        the plan's lr tangent aliases (as the previous step left it), returned per bucket and
        tensor: a dot is non-finite whenever any gradient element is (``inf * 0`` and
        ``nan * x`` are NaN, and no sum with a non-finite term is finite), and greedy's
        hypergradient is that same dot, so the check costs no pass of its own.  A gradient so
        large that the dot overflows counts as non-finite.  Elsewhere GradScaler's kernel
        checks ``p.grad`` itself (it multiplies it by 1) and the dots are None; so it does
        without ``with_dots`` (no method reads them this step)."""
        checked: dict[torch.device, dict[torch.dtype, list[Tensor]]] = {}
        if with_dots and all(b.device == device for b in buckets):
            dots = [tangents["lr"].dots([p.grad for p in b.params])
                    for b, tangents in zip(buckets, plan)]
            for d in dots:          # (the check on the dots: one small kernel per dtype)
                checked.setdefault(device, {}).setdefault(d.dtype, []).append(d)
        else:
            dots = None
            for b in buckets:
                checked.setdefault(b.device, {}).setdefault(b.dtype, []).extend(
                    p.grad for p in b.params)
        bad = self._amp_check(checked, device, found_inf)
        self._skips = {dev: bad if dev == bad.device else bad.to(dev, non_blocking=True)
                       for dev in checked}
        return bad == 0, dots

    def step_fused(self, buckets: list[Bucket], hyper: list[dict[str, Any]],
                   options: list[dict], plan: list[dict], finite: Tensor,
                   lr_scales: list[float], release: bool = True) -> StepRecord:
        """The step of every bucket on the rule's fused kernel (after :meth:`check_grads`);
        the record's tangents are the plan's :class:`StateAlias`es.  With ``release`` the
        buckets' flat gradient and tangent buffers are let go (a method whose every later
        step is fused; one that records steps between fused ones keeps them: allocating them
        afresh each window costs page faults on the CPU)."""
        skips, self._skips = self._skips, None
        for b, h in zip(buckets, hyper):
            self.rule.step_fused(b.params, [p.grad for p in b.params], b.states, h,
                                 options[b.group_index], skips[b.device])
            if release:
                b.release_step_buffers()
        return StepRecord(buckets, plan, lr_scales, finite)

    def clip(self, buckets: list[Bucket], max_norm: float, device: torch.device,
             reduce_sq: Callable[[Tensor], Tensor] | None = None):
        """``max_grad_norm``: scale every bucket's gradient by ``torch.nn.utils.clip_grad_norm_``'s
        coefficient ``min(1, max_norm / (||g|| + 1e-6))``, the norm over all of them; returns
        ``(coef, norm)`` as 0-dim tensors on ``device`` (float32, float64 for a float64 model; no
        host read).  ``reduce_sq`` sums the squared norm over the ranks (FSDP2 shards)."""
        dtype = torch.float64 if any(b.dtype == torch.float64 for b in buckets) else torch.float32
        norms = torch._foreach_norm([b.grad for b in buckets])
        sq = torch.stack([n.to(device, dtype) for n in norms]).square().sum()
        if reduce_sq is not None:     # sharded parameters: the sum over every rank's shard
            sq = reduce_sq(sq)
        norm = sq.sqrt()
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for b in buckets:
            b.grad.mul_(coef.to(b.device, b.dtype))
        return coef, norm

    def restrict(self, buckets: list[Bucket], finite: Tensor) -> Tensor:
        """After :meth:`load_grads`: the step is taken only where ``finite`` (a device bool,
        e.g. agreed across ranks) says so too; a step skipped here is skipped exactly as a
        non-finite one (zero gradients, the rule's 0/1 factor at 0)."""
        for key, ok in (self._oks or {}).items():
            ok.mul_(finite.to(ok.device, ok.dtype))
        for b in buckets:
            b.grad.mul_(self._oks[(b.device, b.dtype)])
        return finite

    def grad_norm(self, grads: list[Tensor], device: torch.device) -> Tensor:
        """The 2-norm over every tensor of ``grads`` (0-dim float32 on ``device``; one
        ``_foreach_norm``, accumulated in float32: a half-precision norm overflows at 65504
        with every element finite)."""
        low = [g for g in grads if g.dtype in (torch.float16, torch.bfloat16)]
        rest = [g for g in grads if g.dtype not in (torch.float16, torch.bfloat16)]
        norms = [t if t.device == device and t.dtype == torch.float32
                 else t.to(device, torch.float32, non_blocking=True)
                 for t in [*(torch._foreach_norm(rest) if rest else ()),
                           *(torch._foreach_norm(low, 2, dtype=torch.float32) if low else ())]]
        return norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms))

    def guard_norm(self, n: Tensor, finite: Tensor, growth: float) -> Tensor:
        """``recovery="rollback"``'s blow-up test on a step's gradient norm ``n`` (0-dim
        float32, on the device of ``finite``): the step is taken when it is finite and its
        norm is at most ``growth`` times a reference that follows the taken steps' norms down
        at once and up by at most 2x a step (a run diverging in finite arithmetic grows its
        norm faster and soon outpaces it).  A rejected finite step doubles the reference, so
        that a real change of scale is accepted after a few steps.  The first step, and every
        step until a nonzero finite norm has been seen, is taken (the reference starts as NaN;
        a zero norm leaves it as it was: a reference of 0 would reject every later step).
        Returns the flag; decided on the device in about ten small operations, no host read.

        Measured, and why it is not the default: in a run whose minibatch gradients come and go
        (a model that fits most batches exactly, 0.003 on most and 0.6 on some) it rejects
        healthy steps; a reference that falls slowly instead (0.99 a step) passes those but
        lets a blow-up under per-tensor tuning through (each rejection doubles the reference
        while the weights stay where the gradient is large)."""
        ref = self.guard_ref
        if ref is None or ref.device != n.device:
            ref = self.guard_ref = torch.full((), math.nan, device=n.device)
        up = ref * 2
        rejected = n > ref * growth          # (False for a NaN norm, and while ref is NaN)
        take = finite & ~rejected
        follow = torch.where(n > 0, torch.fmin(n, up), ref)
        torch.where(take, follow, torch.where(rejected & finite, up, ref), out=ref)
        return take

    def rollback(self, buckets: list[Bucket], take: Tensor) -> None:
        """``recovery="rollback"``, after :meth:`load_grads` with the blow-up test: where the
        step is not taken the weights and state return to where the last taken step started;
        a taken step remembers them.  Decided on the device: an exact select per tensor
        (``torch.where``, exact also for weights that overflowed to inf, where ``lerp`` with a
        0/1 weight would give NaN), then one ``_foreach_copy_`` per device and dtype into the
        copy: two passes over the weights and state a step, besides the norm's over the
        gradients, and one copy of them kept."""
        by: dict[tuple, tuple[list, list]] = {}
        keep: dict[torch.device, Tensor] = {}
        for b in buckets:
            for p, st in zip(b.params, b.states or [{}] * len(b.params)):
                pairs = _kept_tensors(p, st)
                mine = self._snapshots.setdefault(p, {})
                for name, cur in pairs:
                    snap = mine.get(name)
                    if snap is None or snap.shape != cur.shape or snap.dtype != cur.dtype \
                            or snap.device != cur.device:
                        mine[name] = cur.clone()     # nothing earlier to return to
                        continue
                    ok = keep.get(cur.device)
                    if ok is None:
                        ok = keep[cur.device] = take.to(cur.device, non_blocking=True)
                    torch.where(ok, cur, snap, out=cur)
                    lists = by.setdefault((cur.device, cur.dtype), ([], []))
                    lists[0].append(snap)
                    lists[1].append(cur)
        for snaps, curs in by.values():
            torch._foreach_copy_(snaps, curs)

    def has_restore_point(self) -> bool:
        return bool(self._restore)

    def keep_restore_point(self, params: list[tuple[Tensor, dict]], ok: "Tensor | bool") -> None:
        """``recovery="restore"``: copy the weights and floating-point optimizer state of
        ``params`` (``(param, state)`` pairs) into the restore point, where ``ok`` (a Python
        bool, or a 0-dim device bool: then an exact select per tensor, decided on the device).
        Parameters no longer given are forgotten."""
        old, self._restore = self._restore, {}
        copies: dict[tuple, tuple[list, list]] = {}
        flags: dict[torch.device, Tensor] = {}
        for p, st in params:
            mine = self._restore[p] = old.get(p, {})
            pairs = _kept_tensors(p, st)
            names = {name for name, _ in pairs}
            for name in [n for n in mine if n not in names]:
                del mine[name]
            for name, cur in pairs:
                snap = mine.get(name)
                if snap is None or snap.shape != cur.shape or snap.dtype != cur.dtype \
                        or snap.device != cur.device:
                    # a parameter new here is copied as it is; a state entry created since the
                    # last copy, where ``ok`` refuses, as 0 (what a return does without one)
                    if name == "weights" or ok is True:
                        mine[name] = cur.clone()
                    elif ok is False:
                        mine[name] = torch.zeros_like(cur)
                    else:
                        mine[name] = torch.where(ok.to(cur.device), cur, 0.0)
                elif ok is True:
                    lists = copies.setdefault((cur.device, cur.dtype), ([], []))
                    lists[0].append(snap)
                    lists[1].append(cur)
                elif ok is not False:
                    flag = flags.get(cur.device)
                    if flag is None:
                        flag = flags[cur.device] = ok.to(cur.device, non_blocking=True)
                    torch.where(flag, cur, snap, out=snap)
        for snaps, curs in copies.values():
            torch._foreach_copy_(snaps, curs)

    def restore(self) -> list[Tensor]:
        """Return every parameter with a restore point, and its optimizer state, to it (a
        floating-point state entry the point does not hold, created since, is zeroed); returns
        the parameters written."""
        copies: dict[tuple, tuple[list, list]] = {}
        written = []
        for p, mine in self._restore.items():
            try:
                st = self.state.get(p) or {}
            except KeyError:    # (a sharded parameter whose local shard was re-cached)
                continue
            pairs = _kept_tensors(p, st)
            for name, cur in pairs:
                snap = mine.get(name)
                if snap is None or snap.shape != cur.shape or snap.dtype != cur.dtype \
                        or snap.device != cur.device:
                    cur.zero_()
                    continue
                lists = copies.setdefault((cur.device, cur.dtype), ([], []))
                lists[0].append(cur)
                lists[1].append(snap)
            written.append(p)
        for curs, snaps in copies.values():
            torch._foreach_copy_(curs, snaps)
        return written

    def _amp_check(self, checked: dict, device: torch.device, found_inf: Tensor | None = None,
                   grad_scale: Tensor | None = None) -> Tensor:
        """GradScaler's check (``_amp_foreach_non_finite_check_and_unscale_``: exact, one pass,
        one call per device and dtype; it multiplies the tensors by ``1 / grad_scale``, by 1
        without one) of ``checked[device][dtype]``; returns the skip flag on ``device`` (float,
        nonzero where a value is not finite), ``found_inf`` folded in."""
        flags = []
        for dev, by_dtype in checked.items():
            bad, one = self._amp_buffers(dev)
            bad.zero_()
            inv = one if grad_scale is None else grad_scale.to(dev, torch.float32).reciprocal()
            for tensors in by_dtype.values():
                torch._amp_foreach_non_finite_check_and_unscale_(tensors, bad, inv)
            flags.append(bad if dev == device else bad.to(device, non_blocking=True))
        bad = flags[0] if len(flags) == 1 else torch.stack(flags).amax()
        if found_inf is not None:
            bad = torch.maximum(bad, found_inf.to(device, torch.float32))
        return bad

    def _amp_buffers(self, device) -> tuple[Tensor, Tensor]:
        hit = self._amp.get(device)
        if hit is None:
            hit = self._amp[device] = (torch.zeros((), dtype=torch.float32, device=device),
                                       torch.ones((), dtype=torch.float32, device=device))
        return hit

    # ------------------------------------------------------------------ the step
    def init_states(self, buckets: list[Bucket], options: list[dict]) -> None:
        """Create the rule's state where a parameter has none yet (once per bucket)."""
        for b in buckets:
            if b.states is None:
                states = []
                for p in b.params:
                    state = self.state.get(p)
                    if not state:
                        state = self.rule.init_state(p, options[b.group_index])
                        if state:     # as torch: no entry for a stateless step (plain SGD)
                            self.state[p] = state
                    states.append(state)
                b.states = states
                b.detached = [(p, st) for p, st in zip(b.params, states) if not st]

    def adopt_states(self, buckets: list[Bucket]) -> None:
        """Enter the state a rule created lazily during the step (SGD's momentum buffer, once
        a group's momentum is set) into the optimizer's state."""
        for b in buckets:
            if b.detached:
                for p, st in b.detached:
                    if st and p not in self.state:
                        self.state[p] = st
                b.detached = [(p, st) for p, st in b.detached if not st]

    def view(self, buckets: list[Bucket], hyper: list[dict[str, Any]], options: list[dict],
             finite: Tensor, grads: bool = True) -> StepView:
        """The coming step as :meth:`HypergradientMethod.carry` sees it; without ``grads`` (a
        fused step: the buckets' flat gradients were not loaded) its items have none."""
        items, spans = [], []
        for b, h in zip(buckets, hyper):
            start = len(items)
            gs = b.grads if grads else [None] * len(b.params)
            for i, (pi, p, g) in enumerate(zip(b.param_indices, b.params, gs)):
                items.append(StepItem(b.group_index, pi, p, g, b.states[i], _item_hyper(h, i),
                                      options[b.group_index]))
            spans.append((start, len(items), h, options[b.group_index]))
        return StepView(items, finite, self.rule, pool=self._pool, spans=spans)

    def step(self, buckets: list[Bucket], hyper: list[dict[str, Any]], options: list[dict],
             kinds: tuple[str, ...], finite: Tensor, lr_scales: list[float],
             foreach: list[bool], unversioned: bool = False) -> StepRecord:
        """Run the rule on every bucket; write the results back in place.  ``foreach`` per
        group: the rule's ``step_foreach`` (else its per-tensor ``step_``).  With
        ``unversioned`` (a recorded gradient graph is kept) the parameters are written through
        ``p.data``."""
        rule = self.rule
        oks: dict = self._oks if self._oks is not None else {}
        self._oks = None
        tangents = []
        for b, h in zip(buckets, hyper):
            key = (b.device, b.dtype)
            ok = oks.get(key)
            if ok is None:
                ok = oks[key] = finite.to(device=b.device, dtype=b.dtype, non_blocking=True)
            opts = options[b.group_index]
            params = [p.data for p in b.params] if unversioned else b.params
            states = b.states
            flat_t = {k: b.flat("t_" + k) for k in kinds}
            views = {k: v for k, (_, v) in flat_t.items()}
            done = foreach[b.group_index] and rule.step_foreach(params, b.grads, states, h, opts,
                                                                kinds, ok, views)
            if not done:
                for i, (p, g, st) in enumerate(zip(params, b.grads, states)):
                    hi = _item_hyper(h, i)
                    work = self._work.setdefault(b.params[i], {})
                    out = rule.step_(p, g, st, hi, opts, kinds, ok, work)
                    if out is None:
                        out = self._step_out_of_place(p, g, st, hi, opts, kinds, ok)
                    for k in kinds:
                        views[k][i].copy_(out[k])
            tangents.append({k: flat for k, (flat, _) in flat_t.items()})
        self.adopt_states(buckets)
        return StepRecord(buckets, tangents, lr_scales, finite)

    def _step_out_of_place(self, p, grad, state, hyper, options, kinds, ok) -> dict[str, Tensor]:
        """For rules without ``step_``: run ``update_with_tangents`` and write the results back
        with ``old.lerp_(new, ok)``, bit-exactly ``new`` for ok=1 and ``old`` for ok=0 (the
        rule saw a zero gradient, so its outputs are finite)."""
        tuned = tuple(k for k in kinds if isinstance(hyper.get(k), Tensor))   # (others: 0)
        new_p, new_state, tangents = self.rule.update_with_tangents(p, grad, dict(state), hyper,
                                                                    options, tuned)
        tangents = {k: tangents[k] if k in tangents else torch.zeros_like(p) for k in kinds}
        p.lerp_(new_p, ok)
        for name, value in new_state.items():
            old = state.get(name)
            if old is None:
                state[name] = value * ok
            else:
                old.lerp_(value, ok if old.dtype == ok.dtype else ok.to(old.dtype))
        return tangents

    # ------------------------------------------------------------------ the tape
    def snapshot(self, position: int, buckets: list[Bucket], hyper: list[dict[str, Any]],
                 options: list[dict], lr_scales: list[float], source, finite) -> TapedStep:
        """Copies of what the coming step reads, in buffers reused from window to window (a
        released tape's buffers are free again): no allocation per step."""
        while len(self._tape_buffers) <= position:
            self._tape_buffers.append({})
        items = []
        for b, h in zip(buckets, hyper):
            gi = b.group_index
            for i, (pi, p, g) in enumerate(zip(b.param_indices, b.params, b.grads)):
                bufs = self._tape_buffers[position].setdefault(p, {})
                state = b.states[i]
                copies = {k: (scratch(bufs, "state." + k, v).copy_(v)
                              if isinstance(v, Tensor) else v) for k, v in state.items()}
                items.append(TapedParam(gi, pi, p, scratch(bufs, "weights", p).copy_(p), copies,
                                        scratch(bufs, "grad", p).copy_(g), _item_hyper(h, i),
                                        options[gi], lr_scales[gi]))
        return TapedStep(items, source, finite)

    def drop_scratch(self) -> None:
        self._tape_buffers = []

    def drop_snapshots(self) -> None:
        """Forget rollback's copy and the restore point (after a load: the next step remembers
        the loaded weights)."""
        self._snapshots = {}
        self._restore = {}

    def scratch_tensors(self) -> list[Tensor]:
        """Every persistent scratch tensor (for memory accounting)."""
        out = []
        seen = set()
        for layout in self._buckets.values():
            for b in layout:
                for flat in [f for f, _ in b._flats.values()] + [
                        t for t in b.work.values() if isinstance(t, Tensor)]:
                    if id(flat) not in seen:
                        seen.add(id(flat))
                        out.append(flat)
        for d in list(self._work.values()) + list(self._snapshots.values()) + \
                list(self._restore.values()) + [
                x for pos in self._tape_buffers for x in pos.values()]:
            out.extend(t for t in d.values() if isinstance(t, Tensor))
        return out


def _kept_tensors(p: Tensor, state: dict) -> list[tuple[str, Tensor]]:
    """What rollback and the restore point keep of a parameter: its weights and every
    floating-point tensor of its optimizer state, named."""
    return [("weights", p.data)] + [(k, v) for k, v in state.items()
                                    if isinstance(v, Tensor) and v.is_floating_point()]


def _item_hyper(hyper: dict[str, Any], i: int) -> dict[str, Any]:
    """One parameter's hyperparameters from a bucket's (float, shared tensor or list)."""
    return {k: (v[i] if isinstance(v, list) else v) for k, v in hyper.items()}
