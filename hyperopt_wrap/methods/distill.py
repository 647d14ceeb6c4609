"""HyperDistill: online hypergradients by distillation (Lee, Tack, Lee & Hwang, ICLR 2022,
"Online Hyperparameter Meta-Learning with Hypergradient Distillation").

**The online hypergradient.**  The state of training is ``x = (w, s)``, weights and the base
optimizer's state; step ``t`` (the paper's indexing: it reads ``x_{t-1}`` and the batch
``D_t``) is ``x_t = Phi(x_{t-1}, g_t, lam)`` with ``g_t = grad L(w_{t-1}; D_t)``.  For the
meta-objective ``E(w_t)``::

    dE/dlam = h_FO + h_SO,   h_FO = dE/dlam (direct),
    h_SO = alpha_t . sum_{s=1..t} A_t ... A_{s+1} B_s,   alpha_t = (grad E(w_t), 0),
    A_k = dPhi_k/dx,   B_s = dPhi_s/dlam.

``h_FO`` is zero here: ``E`` (the validation or the next training loss) does not depend on the
optimizer's lr, momentum or weight decay.  ``h_SO`` sums the effect of every past step (RTRL
carries it exactly, at one Hessian-vector product per tangent and step).

**The paper's model and the distilled point.**  HyperDistill takes ``A_k ~ gamma I`` (the
DrMAD-style contraction of a stable step), so ``h_SO ~ sum_s gamma^(t-s) grad E(w_t) . b_s``
with ``b_s = B_s^w`` the step's own tangent of the weights (greedy's ``B``: the rule's closed
form at the step's pre-step point ``(x_{s-1}, g_s)``).  The weighted sum of ``t`` tangents is
replaced by one tangent at a distilled point: minimising ``sum_s gamma^(t-s) |b(x) - b_s|^2``
with ``b`` linearised gives the weighted mean of the points (paper Eq. 13)::

    x*_1 = x_0,   x*_t = p_t x*_{t-1} + (1 - p_t) x_{t-1},   p_t = (gamma - gamma^t)/(1 - gamma^t)
    sum_s gamma^(t-s) b_s  ~  c_t b(x*_t, grad L(w*_t; D*_t)),   c_t = (1 - gamma^t)/(1 - gamma)
    h = h_FO + theta c_t v_t,   v_t = grad E(w_t) . b(x*_t, grad L(w*_t; D*_t))

For the learning rate ``b`` reads the training gradient, so each readout (one per window, see
below) costs one extra gradient, ``grad L(w*; D*)``: the step's closure called at swapped weights
(:func:`hyperopt_wrap.curvature.step_gradient_at`; weights, ``p.grad``, torch's RNG stream as
the closure started it, and with ``FiniteDifferences(model=...)`` the module's buffers are all
restored bit-exactly).  ``D*`` is the current batch (``batch="current"``, the default), or the
paper's distilled batch (Eq. 14, ``batch="distilled"``): ``D*_t = D*_{t-1}`` with probability
``p_t``, else ``D_t``, drawn from a private seeded stream (torch's RNG is not touched), the
kept batch being an earlier step's closure, replayed with that step's RNG (drawn on every step,
whether or not it is read, so that the batch's memory follows ``p_t`` as ``x*``'s does); closures must then
bind their batch (``def closure(x=x, y=y)``), which is checked once as for every replay.  A kept
closure cannot be saved: after a resume (or a deepcopy) the current batch is used until the
draw keeps a new one.  With ``gamma -> 0``: ``p_t -> 0``, ``x* = x_{t-1}``, ``c_t -> 1`` and
``h = theta * greedy``, exactly greedy at ``theta = 1`` (with ``val_loss``, or
``read_every_step=True``; by default without ``val_loss`` greedy's value of the window's last
step alone).

**Derived here for the optimizer's state (the paper covers plain SGD on network blocks).**

1. *The distilled point is the whole pre-step state.*  ``b`` reads the state as well as ``w``
   (SGD: ``b_lr = -(mu buf + tau d)``; Adam: ``-m_hat/(sqrt(v_hat) + eps)``), and the same
   first-order argument gives the same weighted mean for every floating-point state entry:
   momentum buffers, Adam's moments (and amsgrad's max), RMSprop's averages, Adagrad's sum, and
   the step counters (so bias corrections are evaluated at the averaged count: for a constant
   gradient that is closer to the mean of the ``b_s`` than the current count, by Jensen's
   inequality on ``beta^n``).  An entry that a rule creates on its first step (SGD's buffer)
   counts as 0 for the steps before it existed: SGD's first direction ``d_0`` is
   ``mu * 0 + d_0``, so without dampening the zero-filled mean is exact.  For SGD (momentum,
   dampening, Nesterov, weight decay) ``b`` is linear in ``(w, s, g)`` for every kind, so the
   distilled ``b`` is the weighted mean of the ``b_s`` up to ``grad L(w*)`` against the mean of
   the ``g_s`` (curvature, and the batch); it is exact for a quadratic loss on one batch.  For
   Adam, RMSprop and Adagrad ``b`` is nonlinear in the second moments and the counter: the
   error is second order in the spread of the averaged states.
2. *The state's share of B.*  ``A ~ gamma I`` read with ``alpha = (grad E, 0)`` drops ``B^s``,
   the step's effect on the state, which reaches the weights only through later steps.  No
   rule feeds the lr into its state (``B^s_lr = 0``), so nothing is lost for lr.  For momentum
   (SGD's mu, Adam's beta1, RMSprop's momentum) and for weight decay under momentum it is not
   zero; for SGD without Nesterov ``B^w = -lr B^buf`` exactly and the later steps add
   ``-lr sum_j (gamma mu)^j B^buf`` (curvature dropped), a fixed factor ``~ 1/(1 - gamma mu)``
   on the weights' route; Adam's beta1 likewise ``~ 1/(1 - gamma beta1)``.  The state's route
   is thus about a constant multiple of the weights' route *per kind*, which is why ``theta``
   is fitted per tuned kind (``shared_theta=True``: the paper's single theta).
3. *Fitting theta against an exact short reverse mode.*  The paper regresses DrMAD-approximated
   full hypergradients on ``c_t v_t`` along a whole inner episode.  Online there is no episode,
   only exact *truncated* values, and regressing a K-step value on the t-step estimate would
   shrink theta by the truncation.  So every ``refit_every`` windows the window's last
   ``K = horizon`` steps are recorded (``records_step``) and one reverse pass through them
   (:class:`~hyperopt_wrap.tape.StepGraph` and :class:`~hyperopt_wrap.tape.Replay`, exactly as
   :class:`~hyperopt_wrap.methods.unroll.Unroll` does, which equals the float64 reference to
   1e-10) gives both the exact K-step hypergradient (weights *and* state, Hessian products from
   the closure) and the model's value over the same steps, with no Hessian products::

       y = alpha_T . sum_{k<K} A_T ... A_{T-k+1} B_{T-k}        (exact, truncated)
       x = sum_{k<K} gamma^k alpha_T . B^w_{T-k}                 (A ~ gamma I)
       theta = sum_r m^(R-r) <x_r, y_r> / sum_r m^(R-r) <x_r, x_r>

   over the kind's slots, in raw units (what the hyper-optimizer consumes), and over the fits
   ``r = 1..R`` so far, older ones weighed down by ``m = theta_memory`` (the paper regresses
   over a whole trajectory; one fit of a global value alone is a single, noisy ratio); a
   non-finite or empty fit is left out.  Negative values are kept: the long-horizon
   hypergradient can have the other sign than the model's (short-horizon bias).

   so theta corrects the Jacobian model (and the state's route, 2.) and the distillation is
   left to the weighted mean.  On a quadratic whose step is ``A = rho I`` and ``gamma = rho``,
   ``x = y`` and theta = 1, and with one batch ``h`` is the exact full-history hypergradient.
   The refit's window uses the new theta.  Between refits theta is held (the paper's choice).

**In the engine.**  Each base step, before its write (:meth:`carry`): ``t += 1`` (a device
counter: a skipped, non-finite step is the identity and leaves ``x*``, ``t`` as they were),
``x*`` moves by Eq. 13, and on the step whose hypergradient is read (the window's last, with
or without ``val_loss``; every step with ``read_every_step=True`` and no ``val_loss``)
``c_t b(x*, grad L(w*; D*))`` is computed by the
rule itself (its in-place step with closed-form tangents, :meth:`UpdateRule.step_`, run on
copies of ``x*``; :meth:`UpdateRule.jvp` for a rule without one) and kept until the
meta-gradient arrives (:meth:`hypergradient`: ``accum += theta <grad E, c_t b>`` per
slot).  *Our choice:* one readout per window, also without ``val_loss`` (``E`` is then the next
step's training loss): ``c_t b(x*_t)`` already stands for the sum over every past step, so the
window's earlier steps would add ``update_every`` strongly correlated estimates of the same sum
at one extra gradient each.  ``read_every_step=True`` averages them anyway, as greedy averages
its per-step values (the variance of one next-batch sample against ``update_every`` extra
gradients per window).  The closure is asked for through
``carry_curvature`` (which also gives ``view.hvp``, unused) and read from ``view.source``; a
gradient graph cannot be re-evaluated at ``w*``, so it raises, naming the fix.

Cost per window: one closure call (forward and backward at ``w*``) and the rule's tangent
products (per step with ``read_every_step=True``), and a lerp of the weights and state into
``x*`` per base step; per refit window ``K - 1`` Hessian-vector products (``K - 1`` closure calls by
finite differences) and ``2K - 1`` reverse products through the rule.  Memory: one copy of the
weights and of the floating-point optimizer state (at least float32), one pending tangent per
tuned kind, and ``K`` recorded steps during a refit window.  Save/resume keeps ``x*``, ``t``,
theta and the pending tangent; as for every recording method the interrupted window restarts.

Usage (the closure must bind its batch; ``curvature="closure"`` keeps ``opt.needs_graph``
False, so a closure written for the graph source builds no graph)::

    opt = HyperOptimizer(torch.optim.SGD, model.parameters(), lr=0.1, momentum=0.9,
                         tune=("lr", "momentum"), method=Distill(gamma=0.99),
                         curvature="closure")
    for x, y in loader:
        def closure(x=x, y=y):
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss
        opt.step(closure)

Remark: the rules here are elementwise, so ``b_s`` is one vector per kind and
``sum_s gamma^(t-s) b_s`` could be kept exactly as a running vector (no extra gradient); the
paper distils because its ``B_s`` is a ``dim(w) x dim(lam)`` matrix (network blocks).
"""
from __future__ import annotations

import math
import random

import torch
from torch import Tensor

from ..curvature import BufferGuard, ClosureSource, CurvatureError, step_gradient_at
from ..rules.base import Tangent, UpdateRule
from ..tape import meta_cotangents, reverse_pass
from .base import MetaGradients, RecordingMethod, _clone

BATCHES = ("current", "distilled")


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least float32: a bf16 model's distilled weights still average in full precision."""
    return torch.promote_types(dtype, torch.float32)


def _one_step_tangents(rule, items, ws: list[Tensor], gs: list[Tensor], ss: list[dict],
                       kinds: list[str]) -> list[list[Tensor]]:
    """``d w'/d hyper[kind]`` of one step at ``(w, s, g)`` for a bucket's items (one param
    group, device and dtype), per kind a list of fresh tensors: the rule's in-place step with
    closed-form tangents run on copies (:meth:`UpdateRule.step_foreach`, one pass for every
    kind and tensor, else :meth:`UpdateRule.step_` per tensor), else its tangent products
    (:meth:`UpdateRule.jvp`).  ``gs`` may be overwritten; nothing else passed in is modified
    (a rule declines, returning False / None, before it writes anything)."""
    w0 = ws[0]
    ok = torch.ones((), dtype=w0.dtype, device=w0.device)

    def copies(s):
        return {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in s.items()}
    if type(rule).step_foreach is not UpdateRule.step_foreach:
        hyper = {}
        for name, v0 in items[0].hyper.items():
            vals = [it.hyper[name] for it in items]
            # a float (a group setting), one tensor shared by the bucket, or one per param
            hyper[name] = v0 if not isinstance(v0, Tensor) or all(v is v0 for v in vals) \
                else vals
        tangents = {k: [torch.empty_like(w) for w in ws] for k in kinds}
        if rule.step_foreach([w.clone() for w in ws], list(gs), [copies(s) for s in ss], hyper,
                             items[0].options, tuple(kinds), ok, tangents):
            return [tangents[k] for k in kinds]
    out: list[list[Tensor]] = [[] for _ in kinds]
    for it, w, g, s in zip(items, ws, gs, ss):
        res = None
        if type(rule).step_ is not UpdateRule.step_:
            res = rule.step_(w.clone(), g, copies(s), it.hyper, it.options, tuple(kinds), ok, {})
        if res is None:      # L_k = 1: d w'/d hyper[kind] itself
            res = dict(zip(kinds, (zw for zw, _ in rule.jvp(
                w, g, s, it.hyper, it.options, [Tangent(hyper={k: ok}) for k in kinds]))))
        for j, k in enumerate(kinds):
            out[j].append(res[k])
    return out


class _Kept:
    """An earlier step's closure source kept as the distilled batch ``D*`` (Eq. 14).  A closure
    cannot be saved or copied, so pickling and deepcopy drop it (the current batch is used
    until the draw keeps a new one).  ``weights``: that step's weights, until the first replay
    of an old closure has checked that it binds its batch."""
    __slots__ = ("source", "params", "weights")

    def __init__(self, source=None, params=None, weights=None):
        self.source, self.params, self.weights = source, params, weights

    def __reduce__(self):
        return (_Kept, ())

    def __deepcopy__(self, memo):
        return _Kept()


class Distill(RecordingMethod):
    """HyperDistill (see the module docstring for the mathematics).

    Args:
        gamma: the decay of the model ``A ~ gamma I``, in (0, 1); the distilled point weighs
            the step ``k`` steps back by ``gamma^k`` (0.99: about the last 100 steps).
        refit_every: windows (hyper-steps) between fits of theta; the first window fits too.
            None: never fit, theta stays ``theta``.
        horizon: the steps ``K`` of the exact truncated reverse mode a fit uses (at most
            ``update_every``).
        theta: theta before the first fit.
        theta_memory: the weight, per fit, of the earlier fits in theta's least squares (0: each
            fit alone; 0.9: about the last ten fits).  One fit of a global value is a single
            ratio ``y / x``, noisy where ``x`` is small; pooling fits steadies it.
        shared_theta: one theta for every tuned kind (the paper's) instead of one per kind.
        batch: ``"current"`` (the gradient at ``w*`` on this step's batch) or ``"distilled"``
            (the paper's Eq. 14: an earlier step's batch, kept with probability ``p_t``).
        seed: seed of the private stream of Eq. 14's draws.
        read_every_step: without ``val_loss``, read a hypergradient on every step of a window
            (each against the next step's training gradient) and average them, at one closure
            call a step, instead of once per window (the default; with ``val_loss`` always
            once per window).
    """
    name = "distill"
    needs_closure = True
    default_hyper_lr = {"lr": 0.05, "weight_decay": 0.05, "momentum": 0.05}

    def __init__(self, gamma: float = 0.99, refit_every: int | None = 50, horizon: int = 10,
                 theta: float = 1.0, theta_memory: float = 0.9, shared_theta: bool = False,
                 batch: str = "current", seed: int = 0, read_every_step: bool = False):
        if not (_is_number(gamma) and 0 < gamma < 1):
            raise ValueError(f"gamma must be a number in (0, 1) (the decay of the model "
                             f"A ~ gamma I; 0.99 weighs about the last 100 steps), got "
                             f"{gamma!r}; e.g. Distill(gamma=0.99)")
        if refit_every is not None and not (isinstance(refit_every, int)
                                            and not isinstance(refit_every, bool)
                                            and refit_every >= 1):
            raise ValueError(f"refit_every must be an int >= 1 (hyper-steps between fits of "
                             f"theta) or None (never fit), got {refit_every!r}; e.g. "
                             f"Distill(refit_every=50)")
        if not (isinstance(horizon, int) and not isinstance(horizon, bool) and horizon >= 1):
            raise ValueError(f"horizon must be an int >= 1 (the steps of the exact reverse mode "
                             f"theta is fitted against), got {horizon!r}; e.g. "
                             f"Distill(horizon=10)")
        if not (_is_number(theta) and math.isfinite(theta)):
            raise ValueError(f"theta must be a finite number (its value before the first fit), "
                             f"got {theta!r}; e.g. Distill(theta=1.0)")
        if not (_is_number(theta_memory) and 0 <= theta_memory < 1):
            raise ValueError(f"theta_memory must be a number in [0, 1) (the weight of the earlier "
                             f"fits in theta's least squares; 0: each fit alone), got "
                             f"{theta_memory!r}; e.g. Distill(theta_memory=0.9)")
        if not isinstance(shared_theta, bool):
            raise ValueError(f"shared_theta must be True or False, got {shared_theta!r}")
        if batch not in BATCHES:
            raise ValueError(f"batch must be one of {BATCHES} (the batch of the gradient at the "
                             f"distilled weights), got {batch!r}")
        if not (isinstance(seed, int) and not isinstance(seed, bool)):
            raise ValueError(f"seed must be an int, got {seed!r}")
        if not isinstance(read_every_step, bool):
            raise ValueError(f"read_every_step must be True or False, got {read_every_step!r}")
        self.gamma = float(gamma)
        self.refit_every = refit_every
        self.horizon = horizon
        self.theta = float(theta)
        self.theta_memory = float(theta_memory)
        self.shared_theta = shared_theta
        self.batch = batch
        self.seed = seed
        self.read_every_step = read_every_step

    @property
    def default_update_every(self) -> int:
        return 10 if self.refit_every is None else max(10, self.horizon)

    def bind(self, ctx) -> None:
        if self.refit_every is not None and self.horizon > ctx.update_every:
            raise ValueError(f"Distill(horizon={self.horizon}) fits theta against the exact "
                             f"hypergradient through the last {self.horizon} steps of a window, "
                             f"but update_every={ctx.update_every} makes windows shorter; use "
                             f"update_every >= {self.horizon}, a smaller horizon, or "
                             f"refit_every=None (theta fixed)")

    def init_state(self, ctx):
        device = ctx.all_params()[0].device
        dtype = torch.float32 if device.type == "mps" else torch.float64
        theta = {k: torch.full((), self.theta, dtype=tk.values[0].dtype,
                               device=tk.values[0].device) for k, tk in ctx.tuned.items()}
        # t: finite steps distilled so far; w, s: the distilled weights and state per
        # (group index, param index); pending: c_t b(x*) per kind and parameter, awaiting its
        # meta-gradient; windows: windows completed (decides the refit windows); fit_sums:
        # per kind the discounted sums <x, y>, <x, x> of the fits; draws: Eq. 14's draws
        return {"t": torch.zeros((), dtype=dtype, device=device), "w": {}, "s": {},
                "pending": None, "theta": theta, "windows": 0, "fits": 0, "fit_sums": {},
                "last_fit": None, "draws": 0, "kept": _Kept()}

    def restart(self, ctx, state) -> None:
        """The distilled trajectory (``t``, ``w``, ``s``, the pending product, the kept batch)
        starts afresh; the fitted ``theta``, its sums and the window count stay (they describe
        the hyperparameters, not the abandoned stretch of weights)."""
        fresh = self.init_state(ctx)
        state.update({k: fresh[k] for k in ("t", "w", "s", "pending", "kept")})

    # ------------------------------------------------------------------ the schedule
    def _reads(self, ctx) -> bool:
        """Whether the coming step's hypergradient is read (so its tangent is needed)."""
        if self.read_every_step and not ctx.has_val_loss:
            return True
        return ctx.position % ctx.update_every + 1 >= ctx.update_every

    def records_step(self, ctx, state, position: int) -> bool:
        if self.refit_every is None:
            return False
        # without val_loss the previous window's readout comes in this very step() call
        window = state["windows"] + (1 if ctx.position >= ctx.update_every else 0)
        return window % self.refit_every == 0 and position >= ctx.update_every - self.horizon

    def carries(self, ctx, state) -> bool:
        return True

    def carry_curvature(self, ctx, state) -> bool:
        # the closure source: the gradient at w* (and Eq. 14 keeps closures every step)
        return self._reads(ctx) or self.batch == "distilled"

    def carry_reads_gradients(self, ctx, state) -> bool:
        """Between readouts the carry moves ``x*`` (weights and state before the write) and
        reads no gradient: those steps may take the rule's fused kernel."""
        return self.carry_curvature(ctx, state)

    def takes_fused_step(self, ctx, state, buckets) -> bool:
        """As a recording method's, and not where a pending readout awaits this step's
        gradient as its meta-gradient (no ``val_loss``): that needs the checked, flat one."""
        return super().takes_fused_step(ctx, state, buckets) and (
            ctx.has_val_loss or state["pending"] is None)

    # ------------------------------------------------------------------ before the write
    def carry(self, ctx, state, view) -> None:
        items = view.items
        if not items:
            return
        g = self.gamma
        t = state["t"]
        t.add_(view.finite.to(t.device, t.dtype))
        gt = torch.pow(g, t.clamp(min=1.0))
        keep = (g - gt) / (1 - gt)                                 # p_t (0 at t = 1)
        move = (1 - keep) * view.finite.to(t.device, t.dtype)      # 0: a skipped step
        c = (1 - gt) / (1 - g)                                     # c_t
        cache: dict = {}

        def on(x: Tensor, like: Tensor) -> Tensor:
            k = (id(x), like.device, like.dtype)
            if k not in cache:
                cache[k] = x.to(like.device, like.dtype)
            return cache[k]

        wstar, sstar = state["w"], state["s"]
        for it in items:
            key = (it.group_index, it.param_index)
            w = it.param.detach()
            ws = wstar.get(key)
            if ws is None:          # first seen: x*_1 = x_0 (also for a group added later)
                ws = wstar[key] = w.to(_acc_dtype(w.dtype), copy=True)
            else:
                ws.lerp_(w.to(ws.dtype), on(move, ws))
            ss = sstar.setdefault(key, {})
            for name, v in it.state.items():
                if not (isinstance(v, Tensor) and v.is_floating_point()):
                    continue
                cur = ss.get(name)
                if cur is None:     # an entry the rule creates now counts as 0 before
                    cur = ss[name] = torch.zeros_like(v, dtype=_acc_dtype(v.dtype))
                cur.lerp_(v.to(cur.dtype), on(move, cur))
        # Eq. 14's draw on every step (it follows p_t, as x* does); the gradient only when read
        source = self._batch_source(ctx, state, view) if self.batch == "distilled" else None
        if self._reads(ctx):
            self._tangent(ctx, state, view, c,
                          self._batch_source(ctx, state, view) if source is None else source)

    def _tangent(self, ctx, state, view, c: Tensor, source) -> None:
        """``c_t b(x*, grad L(w*; D*))`` per tuned kind and parameter, kept as pending."""
        items = view.items
        params = [it.param for it in items]
        keys = [(it.group_index, it.param_index) for it in items]
        weights = [state["w"][k].to(p.dtype) for k, p in zip(keys, params)]
        grads = self._gradient_at(ctx, source, params, weights)
        dev = view.finite.device
        norms = [n.to(dev) for n in torch._foreach_norm(grads)]
        finite = torch.stack(norms).isfinite().all()
        for gr in grads:     # finite tangents (the pending step is marked, so it is skipped)
            gr.nan_to_num_(0.0, 0.0, 0.0).mul_(finite.to(gr.device, gr.dtype))
        pending: dict[str, dict] = {kind: {} for kind in ctx.tuned}
        buckets: dict[tuple, list[int]] = {}        # as the stepper's: group, device, dtype
        for i, it in enumerate(items):
            buckets.setdefault((it.group_index, it.param.device, it.param.dtype), []).append(i)
        for (gi, _, _), idx in buckets.items():
            kinds = [k for k, tk in ctx.tuned.items()
                     if tk.is_tuned(gi) and isinstance(items[idx[0]].hyper.get(k), Tensor)]
            if not kinds:
                continue
            states = []
            for i in idx:
                ss = state["s"][keys[i]]
                states.append({name: (ss[name].to(v.dtype) if name in ss else v)
                               for name, v in items[i].state.items()})
            out = _one_step_tangents(ctx.rule, [items[i] for i in idx],
                                     [weights[i] for i in idx], [grads[i] for i in idx],
                                     states, kinds)
            for k, ts in zip(kinds, out):
                torch._foreach_mul_(ts, (c * ctx.hyper_scale(k, gi)).to(ts[0].device,
                                                                         ts[0].dtype))
                for i, b in zip(idx, ts):
                    pending[k][keys[i]] = b
        state["pending"] = {"B": pending, "finite": finite}

    def _gradient_at(self, ctx, source, params, weights) -> list[Tensor]:
        """``grad L(weights)`` through ``source``; every parameter's ``p.grad`` restored."""
        saved = [(p, p.grad) for p in ctx.all_params()]
        flags = ctx.flags
        replaying, flags.replaying = flags.replaying, True
        try:
            return step_gradient_at(source, params, weights)
        finally:
            flags.replaying = replaying
            for p, gr in saved:
                p.grad = gr

    def _batch_source(self, ctx, state, view):
        source = view.source
        if not isinstance(source, ClosureSource):
            got = "a gradient graph" if source is not None else "no closure"
            raise CurvatureError(
                "Distill evaluates the training gradient at the distilled weights w*, which "
                f"needs the step's closure, and this step got {got} (a gradient graph is the "
                "gradient at the step's own weights and cannot be re-evaluated at w*). Pass a "
                "closure that binds its batch and calls loss.backward() without "
                "create_graph:\n\n"
                "    def closure(x=x, y=y):\n"
                "        opt.zero_grad()\n"
                "        loss = loss_fn(model(x), y)\n"
                "        loss.backward()\n"
                "        return loss\n"
                "    opt.step(closure)\n\n"
                "or construct the optimizer with curvature='closure' (then opt.needs_graph is "
                "False, so a closure written with create_graph=opt.needs_graph builds no graph)")
        if self.batch == "current":
            return source
        # Eq. 14: D*_t = D*_{t-1} with probability p_t, else D_t (counted on the host; a
        # skipped step counts here)
        n = state["draws"] = state["draws"] + 1
        g = self.gamma
        p = (g - g ** n) / (1 - g ** n)
        kept = state.get("kept")
        if kept is None:
            kept = state["kept"] = _Kept()
        u = random.Random(self.seed * 1_000_003 + n).random()
        if kept.source is None or u >= p:
            params = [it.param for it in view.items]
            kept.source, kept.params = source, params
            kept.weights = None if ctx.flags.replay_checked else \
                [p_.detach().clone() for p_ in params]
            return source
        if kept.weights is not None:
            if not ctx.flags.replay_checked:
                self._check_binding(ctx, kept)
            kept.weights = None
        return kept.source

    @staticmethod
    def _check_binding(ctx, kept: _Kept) -> None:
        """The first replay of an earlier step's closure: it must give that step's loss."""
        params = kept.params
        current = [p.detach().clone() for p in params]
        saved = [(p, p.grad) for p in ctx.all_params()]
        flags = ctx.flags
        replaying, flags.replaying = flags.replaying, True
        try:
            with BufferGuard(kept.source.config.model), torch.no_grad():
                kept.source.check_binding(params, kept.weights)
        finally:
            flags.replaying = replaying
            with torch.no_grad():
                for p, w in zip(params, current):
                    p.data.copy_(w)
            for p, gr in saved:
                p.grad = gr
        flags.replay_checked = True

    # ------------------------------------------------------------------ the readout
    def hypergradient(self, ctx, state, meta: MetaGradients) -> int:
        if ctx.window_complete:
            if ctx.tape:
                self._refit(ctx, state, meta)
                ctx.release_tape()
            state["windows"] += 1
        elif ctx.has_val_loss:
            return 0
        pending = state["pending"]
        if pending is None:
            return 0
        if meta.grads is not None:     # (takes_fused_step keeps a pending readout off it)
            raise RuntimeError("internal error: Distill's pending readout met a fused step's "
                               "meta-gradient, which has no checked flat gradient; please "
                               "report this")
        state["pending"] = None
        metas = meta.by_index()
        used = False
        for kind, per_key in pending["B"].items():
            theta = state["theta"][kind]
            terms = [(gi, pi, metas[gi, pi], b * theta.to(b.device, b.dtype), 1.0)
                     for (gi, pi), b in per_key.items() if (gi, pi) in metas]
            if terms:
                ctx.accumulate(kind, terms)
                used = True
        if used:
            ctx.mark_window(pending["finite"])
        return int(used)

    def _refit(self, ctx, state, meta: MetaGradients) -> None:
        """theta from one reverse pass through the recorded steps (see the module docstring)."""
        alpha = meta_cotangents(meta)
        exact = {k: [torch.zeros_like(v) for v in tk.values] for k, tk in ctx.tuned.items()}
        model = {k: [torch.zeros_like(v) for v in tk.values] for k, tk in ctx.tuned.items()}
        finite = None
        for k, step, graph, res in reverse_pass(ctx, list(ctx.tape), alpha):
            # the model's term gamma^k alpha . B^w (the newest step's is the exact one's)
            ids = [id(item.param) for item in step.params]
            mod = res if k == 0 else graph.vjp([alpha.get(i) for i in ids], None,
                                               inputs=False, hyper=True)
            self._to_slots(ctx, step, [r[3] for r in res], exact, 1.0)
            self._to_slots(ctx, step, [r[3] for r in mod], model, self.gamma ** k)
            finite = step.finite if finite is None else finite & step.finite
        sums = {}
        for kind, tk in ctx.tuned.items():
            d = tk.parametrisation.dvalue_draw
            xy = xx = yy = torch.zeros((), dtype=tk.values[0].dtype, device=tk.values[0].device)
            for x, y, v in zip(model[kind], exact[kind], tk.values):
                s = d(v)
                x, y = (x * s).reshape(-1), (y * s).reshape(-1)
                xy, xx, yy = xy + x @ y, xx + x @ x, yy + y @ y
            sums[kind] = (xy, xx, yy)
        if self.shared_theta:       # the paper's single theta: one fit over every kind
            dev = next(iter(sums.values()))[0].device
            total = tuple(sum(s[j].to(dev) for s in sums.values()) for j in range(3))
            fits = {kind: total for kind in sums}
        else:
            fits = sums
        m = self.theta_memory
        for kind, (xy, xx, _) in fits.items():
            theta = state["theta"][kind]
            xy, xx = xy.to(theta.device, theta.dtype), xx.to(theta.device, theta.dtype)
            ok = finite.to(theta.device) & (xx > 0) & xy.isfinite() & xx.isfinite()
            # least squares over the fits so far, older ones weighed down by theta_memory
            sxy, sxx = state["fit_sums"].setdefault(
                kind, [torch.zeros_like(theta), torch.zeros_like(theta)])
            sxy.copy_(torch.where(ok, m * sxy + xy, sxy))
            sxx.copy_(torch.where(ok, m * sxx + xx, sxx))
            theta.copy_(torch.where(sxx > 0, sxy / torch.where(sxx > 0, sxx, 1.0), theta))
        state["fits"] += 1
        state["last_fit"] = {kind: {"xy": xy, "xx": xx, "yy": yy}
                             for kind, (xy, xx, yy) in sums.items()}

    @staticmethod
    def _to_slots(ctx, step, dlam: list[dict], blocks: dict[str, list[Tensor]],
                  scale: float) -> None:
        """``blocks += sign * scale * dlam`` laid out like the tuned kinds' slots."""
        for item, per_kind in zip(step.params, dlam):
            sign = ctx.sign(item.group_index)
            for kind, value in per_kind.items():
                slots = ctx.tuned[kind].group_slots[item.group_index]
                if slots is None:
                    continue
                block, index = slots[item.param_index]
                target = blocks[kind][block] if index is None else blocks[kind][block][index]
                target.add_(value.to(target.device, target.dtype), alpha=scale * sign)

    # ------------------------------------------------------------------ save / resume
    def state_dict(self, state: dict) -> dict:
        return _clone({k: v for k, v in state.items() if k != "kept"})

    def load_state_dict(self, state: dict, saved: dict) -> None:
        state.clear()
        state.update(_clone(saved))
        state["kept"] = _Kept()
