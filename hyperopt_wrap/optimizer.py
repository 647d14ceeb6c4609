"""HyperOptimizer: a torch.optim.Optimizer whose lr / momentum / weight decay tune themselves."""
from __future__ import annotations

import collections
import contextlib
import copy
import math
import warnings
from typing import Any, Callable

import torch
from torch import Tensor

from .checkpoint import CheckpointError, check_base_state, check_shapes, require
from .controller import Controller
from .counter import Count
from .hierarchical import SHARED_LEVEL, Hierarchical
from .normalized_momentum import NormalizedMomentum
from . import distributed
from .curvature import (ClosureSource, CurvatureError, FiniteDifferences, GradClip, GraphSource,
                        capture_rng, missing_source_message, resolve_curvature, step_hvp)
from .hyperparams import TunedKind, resolve_bounds, resolve_granularity
from .methods import HypergradientMethod, resolve_method
from .methods.base import MetaGradients, MethodContext, ReplayFlags
from .rules import KINDS, get_rule
from .rules._foreach import is_compiling
from .stepper import Bucket, Stepper



def _number(kind: str, value: Any, where: str) -> float:
    """A hyperparameter entry as a Python float (a 1-element tensor is read on its device,
    which for torch's CPU tensor lr makes no synchronisation)."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"Tensor {kind} must be 1-element{where}, got shape "
                             f"{tuple(value.shape)}; pass a float or a 0-dim tensor, e.g. "
                             f"{kind}=torch.tensor(0.01)")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{kind} must be a number{where}, got {value!r}; e.g. "
                        f"{kind}={_EXAMPLE[kind]}")
    return float(value)


# recovery="rollback": a gradient norm this many times the one where the last taken step
# started means the run is diverging (far beyond minibatch noise; a blow-up grows it by orders
# of magnitude a step)
_ROLLBACK_GROWTH = 10.0

# recovery="restore": the weights and optimizer state are copied every this many steps (when
# none of them, nor of the as many before, was skipped), and the run returns to that copy when
# at least _RESTORE_AFTER of them were skipped for a non-finite gradient (a diverged run; one
# bad batch is only skipped); the lr then keeps its back-off (at most _RESTORE_AFTER halvings
# a stretch) and may rise to at most _CEILING_HEADROOM times it from then on
_RESTORE_EVERY = 50
_RESTORE_AFTER = 3
_CEILING_HEADROOM = 4.0


def _reads_at_once(device: torch.device) -> bool:
    """Whether a count on ``device`` is read on the host at once (the CPU: no synchronisation)
    rather than copied without waiting and read a look later."""
    return device.type == "cpu"


def _event(device: torch.device):
    """A recorded event on ``device``'s current stream (None on the CPU, which has none)."""
    if device.type == "cpu":
        return None
    event = torch.Event(device)
    event.record()
    return event

_EXAMPLE = {"lr": "0.1", "momentum": "0.9", "weight_decay": "5e-4"}


def _check_value(kind: str, value: Any, where: str) -> float:
    """Validate an lr / momentum / weight decay entry; returns it as a float.  A tuned lr or
    weight decay of 0 is allowed: that group stays untuned at 0."""
    value = _number(kind, value, where)
    # (comparisons rather than math.isfinite: torch.compile may trace a param-group entry
    # as a symbolic float, which math.isfinite does not take)
    if kind == "lr" and not 0 <= value < math.inf:
        raise ValueError(f"Invalid learning rate {value!r}{where}: lr must be a finite number "
                         ">= 0, e.g. lr=0.1")
    if kind == "momentum" and not 0 <= value < 1:
        raise ValueError(f"Invalid momentum {value!r}{where}: momentum must lie in [0, 1), "
                         "e.g. momentum=0.9")
    if kind == "weight_decay" and not 0 <= value < math.inf:
        raise ValueError(f"Invalid weight_decay {value!r}{where}: weight decay must be a finite "
                         "number >= 0, e.g. weight_decay=5e-4")
    return value


class HyperOptimizer(torch.optim.Optimizer):
    r"""Wraps a torch.optim optimizer and tunes its hyperparameters online by hypergradients.

    ``HyperOptimizer(torch.optim.SGD, model.parameters(), lr=0.1, momentum=0.9)`` steps exactly
    like ``torch.optim.SGD`` while it moves ``lr`` (and whatever else ``tune`` names) by
    gradient descent on the meta-objective ``E``:

    .. math::
        x_{t+1} = \Phi(x_t, g_t, \lambda), \qquad
        r \leftarrow \mathrm{HyperOpt}\big(r, \tfrac{dE}{dr}\big), \qquad \lambda = \sigma(r)

    with ``r`` unconstrained (``lr = exp(r)``, ``weight_decay = exp(r)``, ``momentum =
    sigmoid(r)``) and clamped to ``bounds``.

    Args:
        optimizer_cls: the base optimizer class (SGD, Adam, AdamW, RMSprop, Adagrad, or one
            registered with :func:`hyperopt_wrap.register_rule`).
        params: parameters or param-group dicts, as for any torch optimizer.
        method: ``"greedy"`` or a method object from :mod:`hyperopt_wrap.methods`.
        tune: kinds to tune, any of ``"lr"``, ``"momentum"`` (beta1 for Adam-type rules),
            ``"weight_decay"``. Default ``("lr",)``.
        granularity: ``"global"``, ``"group"``, ``"tensor"`` or ``"element"``, or a dict per kind.
        hyper_lr: learning rate of the hyper-optimizer on the raw values (a float, or a dict
            per kind). Default: the method's (greedy: 0.05). 0 freezes the hyperparameters.
        hyper_optimizer: torch optimizer class for the raw values.  Default: the method's
            (greedy with ``val_loss``: :class:`~hyperopt_wrap.NormalizedMomentum`, momentum on
            hypergradients normalised per block, scale-free; otherwise ``torch.optim.Adam``, as
            before 0.3), decided at construction.  Where a kind is tuned per tensor or per
            element, :class:`~hyperopt_wrap.Hierarchical` with that rule as its level: a
            shared level moved as the global value would be, each entry within a factor
            ``exp(spread)`` of it (2 per tensor, 1.1 per element; before re-centring), unless
            ``hyper_optimizer_kwargs`` holds options that only the method's class takes.
        hyper_optimizer_kwargs: extra keyword arguments for it.
        update_every: base steps per hyper-step (default: the method's; greedy: 1).
        val_loss: optional zero-argument callable returning a validation loss at the current
            weights. Without it the meta-objective is the next minibatch's training loss.
            With ``maximize=True`` the meta-objective is maximised too (``val_loss`` then
            returns the quantity you maximise).
        bounds: ``{kind: (low, high)}`` in natural units; defaults lr and weight decay in
            ``[1e-10, 1]``, momentum in ``[0, 0.99]``.
        curvature: where second-order methods (implicit, unroll) get Hessian-vector products:
            ``"auto"`` (default: the gradient graph when ``p.grad`` carries one, i.e. after
            ``loss.backward(create_graph=opt.needs_graph)``, else the closure given to
            ``step``), ``"graph"``, ``"closure"``, or
            :class:`~hyperopt_wrap.FiniteDifferences` (central differences, eps, ``model=`` to
            protect BatchNorm buffers).  See :mod:`hyperopt_wrap.curvature`.
        recovery: what a step skipped for a non-finite gradient does besides skipping:
            ``"restore"`` (default: the tuned lr halves for each such step, at the coming
            hyper-step, as GradScaler backs off its scale -- not for skips an AMP caller flags
            through ``found_inf`` -- and the run returns from a divergence: the weights and
            optimizer state are copied before the first step and then every 50 steps after
            100 steps none of which was skipped; when at least 3 of 50 steps were skipped they
            return to that copy, the method's carried state starts afresh, the lr keeps its
            back-off (at most 3 halvings per 50 steps) and may from then on rise to at most 4x
            that (on the CPU, after 3 halvings: half the lr that diverged; off the CPU the
            return comes a look later, often after 6); counted in :attr:`restores`, warned
            once.  One copy of the weights and state on their device, a copy pass every 50
            steps, decided without host synchronisation: on the CPU the count is read at once,
            elsewhere a look (50 steps) later.  Where the lr is not tuned (or ``hyper_lr`` is
            0) nothing backs off, and a run may return again and again.  Under GradScaler and
            in a compiled step no copy is kept: there it acts as ``"backoff"``), ``"backoff"``
            (the halving alone: no copy; a run whose weights grew until every gradient
            overflows stays frozen there), ``"rollback"`` (the halving, a step whose gradient norm
            outgrows a running reference by 10x is skipped too, and the weights and optimizer
            state return to where the last taken step started: a blow-up in finite arithmetic
            is caught a step at a time; one copy of the weights and state, three more passes a
            step: the gradients' norm, a select and a copy of the weights and state) or
            ``None`` (skip only).  Skipped steps are counted in :attr:`skipped_steps`.
        max_grad_norm: clip the gradient's norm (over all parameters) to this, as
            ``torch.nn.utils.clip_grad_norm_`` does, inside the step after unscaling, and
            differentiate the clip: second-order methods' Hessian-vector products go through its
            Jacobian.  Use it instead of ``clip_grad_norm_`` with a gradient graph (which cannot
            see an in-place clip) and with GradScaler.  Default None (no clipping).
        process_group: how the hyperparameters stay identical across the ranks of
            ``torch.distributed``.  ``"auto"`` (default): with DTensor parameters (FSDP2,
            ``fully_shard``) the window's hypergradient is summed over their device mesh at each
            hyper-step (each rank holds a shard; the step runs on the local shards); with plain
            parameters, when torch.distributed is initialised with more than one rank, it is
            averaged over the default group (DDP: each rank holds a replica and, with a
            ``val_loss``, its own validation batch).  A process group: average over it.
            ``None``: no collective (each rank tunes its own).  Every rank must construct the
            optimizer (one collective checks that they tune the same slots).  Under FSDP2
            ``method="greedy"`` at global, group or tensor granularity is supported (a
            ``val_loss`` is differentiated by ``backward()``, through FSDP2's hooks).
            ``torch.distributed.optim.ZeroRedundancyOptimizer`` is refused (use FSDP2).  See
            the README, "DDP and FSDP2".
        **optimizer_kwargs: passed to ``optimizer_cls`` (validated by it).

    Param-group entries stay readable and writable. For a tuned ``lr``, ``group["lr"]`` is a
    *scale*: the effective learning rate is the tuned value times ``group["lr"]`` divided by its
    value when tuning started, so LR schedulers keep working multiplicatively on top of the
    tuning. Writing a tuned ``momentum``/``weight_decay`` entry resets the tuned value to it.
    The tuned values themselves are read with :meth:`hyperparameters`.
    """

    _shards = None      # FSDP2: the parameters' local shards (distributed.ShardedParams)

    def __init__(self, optimizer_cls: type, params, *, method="greedy", tune=("lr",),
                 granularity="global", hyper_lr=None, hyper_optimizer=None,
                 hyper_optimizer_kwargs: dict | None = None, update_every: int | None = None,
                 val_loss: Callable[[], Tensor] | None = None, bounds=None, curvature="auto",
                 recovery="restore", max_grad_norm: float | None = None,
                 process_group="auto", **optimizer_kwargs):
        if distributed.constructed_by_zero():
            raise ValueError(distributed.ZERO_MESSAGE)
        self.rule = get_rule(optimizer_cls)
        self.optimizer_cls = optimizer_cls
        if isinstance(tune, str):
            tune = (tune,)
        if not isinstance(tune, (tuple, list)) or not all(isinstance(k, str) for k in tune):
            raise TypeError(f"tune must be a kind or a tuple of kinds, e.g. tune=('lr',) or "
                            f"tune=('lr', 'momentum'), got {tune!r}")
        tune = tuple(dict.fromkeys(tune))
        for kind in tune:
            if kind not in KINDS:
                raise ValueError(f"unknown hyperparameter kind {kind!r} in tune=; choose from {KINDS}")
            if kind not in self.rule.kinds:
                raise ValueError(f"{optimizer_cls.__name__} has no {kind!r} to tune; its rule "
                                 f"tunes {self.rule.kinds}")
        if not tune:
            raise ValueError("tune= is empty; name at least one kind, e.g. tune=('lr',)")
        self.tuned_kinds: tuple[str, ...] = tune
        self._granularity = resolve_granularity(granularity, tune)
        self._bounds = resolve_bounds(bounds, tune)
        self.method = resolve_method(method)
        self.curvature = resolve_curvature(curvature)
        self.val_loss = val_loss
        if update_every is None:
            update_every = self.method.default_update_every
        if not (isinstance(update_every, int) and not isinstance(update_every, bool)
                and update_every >= 1):
            raise ValueError(f"update_every must be an int >= 1, got {update_every!r}")
        self.update_every = update_every
        if recovery not in ("restore", "backoff", "rollback", None):
            raise ValueError(f"recovery must be 'restore', 'backoff', 'rollback' or None, got "
                             f"{recovery!r}")
        self.recovery = recovery
        self.restores = 0            # recovery="restore": returns to the copy so far
        if max_grad_norm is not None:
            if isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, (int, float)) \
                    or not (math.isfinite(max_grad_norm) and max_grad_norm > 0):
                raise ValueError(f"max_grad_norm must be a finite number > 0 (or None), got "
                                 f"{max_grad_norm!r}; e.g. max_grad_norm=1.0")
            if self.method.needs_closure:
                raise ValueError(f"max_grad_norm is not supported with method "
                                 f"{self.method.name!r} (its gradient at the distilled weights "
                                 "would be unclipped); clip in the closure instead")
            max_grad_norm = float(max_grad_norm)
        self.max_grad_norm = max_grad_norm
        for kind in KINDS:
            if kind in optimizer_kwargs and kind in self.rule.kinds:
                _check_value(kind, optimizer_kwargs[kind], "")
        if hyper_optimizer is None:    # (decided here: a val_loss set later keeps it)
            hyper_optimizer = self.method.hyper_optimizer_for(val_loss is not None)
            if any(self._granularity[k] in SHARED_LEVEL for k in tune):
                # per-tensor / per-element values: a level moved as the global value would
                # be, plus bounded deviations (RESULTS.md, "Per-tensor and per-element values")
                level = "normalized" if issubclass(hyper_optimizer, NormalizedMomentum) \
                    else "adam" if hyper_optimizer is torch.optim.Adam else None
                options = dict(hyper_optimizer_kwargs or {})
                # (options that Hierarchical does not take, e.g. Adam's amsgrad or
                # NormalizedMomentum's normalize, keep the method's class)
                if level is not None and set(options) <= _HIERARCHICAL_OPTIONS[level]:
                    if level == "adam" and "eps" in options:
                        options["adam_eps"] = options.pop("eps")
                    hyper_optimizer = Hierarchical
                    hyper_optimizer_kwargs = {"level": level, **options}
        _check_hyper_optimizer(hyper_optimizer, hyper_optimizer_kwargs)
        if isinstance(hyper_lr, dict):
            wrong = set(hyper_lr) ^ set(tune)
            if wrong:
                raise ValueError(f"hyper_lr as a dict needs exactly one entry per tuned kind "
                                 f"{tune}, got keys {sorted(hyper_lr)}; e.g. hyper_lr="
                                 f"{{{', '.join(f'{k!r}: 0.05' for k in tune)}}}")

        # Let the base class validate its own arguments and fill in its defaults.
        if isinstance(params, (set, frozenset)):
            raise TypeError("params must be an ordered iterable (a list or model.parameters()), "
                            "not a set: a set's order changes between runs")
        try:
            inner = optimizer_cls(params, **optimizer_kwargs)
        except TypeError as e:
            raise TypeError(f"{optimizer_cls.__name__} rejected its arguments: {e}") from e
        _check_flags(optimizer_cls, inner.defaults)
        self._hyper_ready = False
        super().__init__(inner.param_groups, inner.defaults)
        # e.g. Adagrad creates its state in __init__ (from the constructor's arguments, not the
        # groups'): we take torch's, with the step counters on the parameters' devices
        eager_state = {p: {k: (v.to(p.device) if isinstance(v, Tensor) and k == "step" else v)
                           for k, v in st.items()} for p, st in inner.state.items()}
        del inner
        reduction, sharded = distributed.resolve(
            process_group, [p for g in self.param_groups for p in g["params"]])
        if sharded:     # FSDP2: the step runs on the local shards
            distributed.check_sharded_options(self.method, self._granularity, recovery)
            self._shards = distributed.ShardedParams()
            eager_state = {p: self._shards.localise_state(st) for p, st in eager_state.items()}
        for gi, group in enumerate(self.param_groups):
            if not group["params"]:
                raise ValueError(f"param group {gi} has no parameters; give every group at least "
                                 "one, or leave it out")

        first = self.param_groups[0]["params"][0]
        self._device = first.device
        tuned = {k: TunedKind(k, self._granularity[k], *self._bounds[k]) for k in tune}
        if hyper_lr is None:
            hyper_lr = self.method.default_hyper_lr
            if isinstance(hyper_lr, dict):
                hyper_lr = {k: hyper_lr[k] for k in tune}
        self._controller = Controller(tuned, hyper_lr, hyper_optimizer, hyper_optimizer_kwargs,
                                      first.device)
        if recovery is None:
            self._controller.backoff = None
        elif recovery == "restore":     # a frozen stretch backs the lr off a few times, no more
            self._controller.backoff_cap = _RESTORE_AFTER
        self._controller.reduction = reduction
        raw_groups = self._controller.raw_groups()
        for gi, group in enumerate(self.param_groups):
            self._init_group_hyper(gi, group, raw_groups)
        for kind, tk in tuned.items():
            if not tk.values:    # every group starts at 0 (lr or weight decay)
                raise ValueError(f"cannot tune {kind}: every param group has {kind}=0, which "
                                 f"cannot be tuned in log space; start from a positive value, "
                                 f"e.g. {kind}={_EXAMPLE[kind]}, or leave {kind!r} out of "
                                 "tune= (a group at 0 among others stays untuned at 0)")
        self._controller.build(raw_groups)
        if reduction is not None and not sharded:
            reduction.check_layout(tuned)
        self._stepper = Stepper(self.rule, self._stepper_state())
        self._flags = ReplayFlags()
        self._flags.step_calls = Count()     # (on the CPU: a closure step reads it)
        self._ctx = MethodContext(rule=self.rule, tuned=tuned, controller=self._controller,
                                  param_groups=self._step_groups(), update_every=update_every,
                                  val_loss=val_loss is not None, flags=self._flags,
                                  tuned_kinds=self.tuned_kinds)
        self._unversioned = False      # params written through .data while a graph is kept
        self._seen_entries: list[tuple] = []   # param-group entries as of the last step
        self._steps = Count(device=first.device)
        self._pending_restore = None   # recovery="restore" off the CPU: last look's flag, read later
        self._since_look = 0           # eager steps since the last look (a host count)
        self.method.bind(self._ctx)
        self._method_state = self.method.init_state(self._ctx)
        for p, state in eager_state.items():
            self.state[p] = state
        self._watch_grads()
        self._hyper_ready = True

    @property
    def _step_supports_amp_scaling(self) -> bool:
        """For a method that may take curvature from a gradient graph, GradScaler hands us its
        scale and found_inf instead of unscaling ``p.grad`` itself (as for torch's fused
        optimizers): the graph then still matches ``p.grad``, and its Hessian-vector products
        are unscaled with the gradients.  Other methods leave GradScaler its usual way (so that
        a trainer may unscale and clip before the step: Lightning refuses clipping for
        optimizers that unscale themselves)."""
        return self._may_use_graph()

    def _takes_curvature(self) -> bool:
        """The method asks for Hessian-vector products (recorded steps, per-step carries, or
        the closure at other weights)."""
        method = self.method
        return (method.needs_curvature or method.needs_closure
                or type(method).carry_curvature is not HypergradientMethod.carry_curvature)

    def _may_use_graph(self) -> bool:
        return self._takes_curvature() and not (isinstance(self.curvature, FiniteDifferences)
                                                or self.method.needs_closure)

    # ------------------------------------------------------------------ set-up
    def _init_group_hyper(self, gi: int, group: dict, raw_groups: list[dict]) -> None:
        """Validate a param group, then create its tuned slots (nothing is created when any
        check fails, so a rejected ``add_param_group`` leaves no trace)."""
        if not group["params"]:
            raise ValueError(f"param group {gi} has no parameters; give it at least one")
        for p in group["params"]:
            if p.is_sparse or p.is_complex() or not p.is_floating_point():
                raise ValueError(f"HyperOptimizer needs dense real floating-point parameters, got "
                                 f"{p.dtype}{' sparse' if p.is_sparse else ''}; for complex "
                                 "ones optimise torch.view_as_real(p) instead")
        seen = set()
        for p in group["params"]:
            if id(p) in seen:
                raise ValueError(f"param group {gi} lists the same parameter twice; list each "
                                 "parameter once (torch.optim would step it twice per step)")
            seen.add(id(p))
        where = f" in param group {gi}"
        for kind in self.rule.kinds:
            if kind not in self.tuned:
                _check_value(kind, self._entry(group, kind), where)
        plan = {}
        for kind, tk in self.tuned.items():
            value = _check_value(kind, self._entry(group, kind), where)
            if kind in ("lr", "weight_decay") and value == 0:
                plan[kind] = None       # a frozen / no-decay group: stays untuned at 0
                continue
            reason = self.rule.check_tunable(group, kind)
            if reason:
                raise ValueError(f"cannot tune {kind}{where}: {reason}")
            if tk.granularity == "global" and tk.values:
                # One value shared by every group: for lr it is a common factor (each group
                # keeps its ratio to the first group's lr, like a scheduler scale); momentum and
                # weight decay must agree.
                shared = float(tk.initial)
                if kind != "lr" and value != shared:
                    raise ValueError(
                        f"cannot tune {kind} globally: param group {gi} has {kind}={value} but "
                        f"the first group has {shared}; give every group the same {kind} or "
                        f"use granularity={{{kind!r}: 'group'}}")
                plan[kind] = (value, shared)
            else:
                tk.check_initial(value)
                plan[kind] = (value, value)
        nominal = {}
        for kind, tk in self.tuned.items():
            if plan[kind] is None:
                tk.add_untuned_group()
                continue
            value, nominal[kind] = plan[kind]
            new = tk.add_group(group["params"], value)
            next(rg for rg in raw_groups if rg["kind"] == kind)["params"].extend(new)
        group["hyper_nominal"] = nominal

    def _entry(self, group: dict, kind: str):
        """A param group's entry for ``kind`` as written (a tensor lr stays a tensor)."""
        return group[kind] if kind in group else self.rule.read(group, kind)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        if not getattr(self, "_hyper_ready", False):
            return
        gi = len(self.param_groups) - 1
        raw_groups = self._controller.raw_groups()
        try:
            distributed.check_added_group(self.param_groups[gi]["params"],
                                          self._shards is not None)
            self._init_group_hyper(gi, self.param_groups[gi], raw_groups)
        except Exception:
            self.param_groups.pop()
            raise
        self._controller.add_raw_groups(raw_groups)
        self._ctx.lr_scales = self._ctx.lr_scales + [1.0]
        self._stepper.invalidate()
        self._watch_grads()

    def _watch_grads(self) -> None:
        """When the method takes curvature (from a gradient graph or a closure): note
        ``p.grad``'s version counter as backward leaves it (a post-accumulate-grad hook; a dict
        write per parameter and backward), so that a gradient rescaled or clipped in place
        afterwards (``clip_grad_norm_``, a trainer's clipping) is seen: a graph does not
        differentiate it, and a recorded step's closure clipped after its backward gives the
        clip's Jacobian on the wrong side of the Hessian.  The hooks hold the dict only, not
        the optimizer."""
        if not self._takes_curvature():
            return
        if not hasattr(self, "_grad_versions"):
            self._grad_versions: dict[int, int] = {}
            self._grad_hooks: dict[int, Any] = {}
        versions = self._grad_versions

        def note(p: Tensor) -> None:
            versions[id(p)] = p.grad._version

        for group in self.param_groups:
            for p in group["params"]:
                if id(p) not in self._grad_hooks:
                    self._grad_hooks[id(p)] = p.register_post_accumulate_grad_hook(note)

    # ------------------------------------------------------------------ public reads
    @property
    def val_loss(self) -> Callable[[], Tensor] | None:
        """The validation objective (None: the next minibatch's training loss)."""
        return self._val_loss

    @val_loss.setter
    def val_loss(self, value: Callable[[], Tensor] | None) -> None:
        if value is not None and not callable(value):
            raise TypeError(f"val_loss must be a zero-argument callable returning a loss, "
                            f"got {value!r}; e.g. val_loss=lambda: loss_fn(model(xv), yv)")
        self._val_loss = value
        if hasattr(self, "_ctx"):
            self._ctx.has_val_loss = value is not None

    @property
    def tuned(self) -> dict[str, TunedKind]:
        """The tuned kinds (values, raw values, accumulators), by kind."""
        return self._controller.tuned

    @property
    def hyper_optimizer(self) -> torch.optim.Optimizer:
        """The torch optimizer that moves the raw hyperparameter values."""
        return self._controller.hyper_optimizer

    def hyperparameters(self) -> dict[str, list]:
        """The values in use, natural units: kind -> one entry per param group.  They are what
        the latest ``step()`` used, or the coming one would use had it no hyper-step to
        complete first: greedy completes one at the start of each ``step()`` (it needs that
        step's gradient), so the value that step uses may differ by one hyper-step.

        An entry is a 0-dim tensor (global/group), a 1-D tensor with one value per parameter
        (tensor) or a list of tensors shaped like the parameters (element).  Tuned learning rates
        include the scheduler scale ``group["lr"] / nominal``.  Untuned kinds appear as floats.
        """
        self._sync_group_writes()
        out: dict[str, list] = {}
        for kind in self.rule.kinds:
            if kind in self.tuned:
                tk = self.tuned[kind]
                entries = tk.per_group(tk.values)
                if kind == "lr":
                    entries = [_scale(e, self._lr_scale(g)) for e, g in zip(entries, self.param_groups)]
                # a frozen / no-decay group keeps its own (untuned) entry
                out[kind] = [e if tk.is_tuned(gi) else self.rule.read(g, kind)
                             for gi, (e, g) in enumerate(zip(entries, self.param_groups))]
            else:
                out[kind] = [self.rule.read(g, kind) for g in self.param_groups]
        return out

    def last_hypergradient(self) -> dict[str, list]:
        """dE/d(tuned value), natural units, of the latest hyper-step (same layout as
        :meth:`hyperparameters`; zeros before the first)."""
        return {k: tk.per_group(tk.last) for k, tk in self.tuned.items()}

    @property
    def skipped_hypersteps(self) -> int:
        """Hyper-steps skipped because the hypergradient was NaN or infinite."""
        return int(self._controller.skipped_hypersteps)

    @property
    def skipped_steps(self) -> int:
        """Base steps skipped because a gradient was NaN or infinite."""
        return int(self._controller.skipped_steps)

    @property
    def hypersteps(self) -> int:
        """Hyper-steps taken (a Python int: reading it makes no host synchronisation, unless a
        compiled step advanced the count: then its device part is read)."""
        return int(self._controller.hypersteps)

    @property
    def steps(self) -> int:
        """``step()`` calls that stepped, skipped steps included (a Python int, read as
        :attr:`hypersteps` is)."""
        return int(self._steps)

    def skip_counters(self) -> dict[str, Tensor]:
        """``{"skipped_steps": ..., "skipped_hypersteps": ...}`` as the live 0-dim tensors on
        the device (:attr:`skipped_steps` reads them on the host; these do not)."""
        c = self._controller
        return {"skipped_steps": c.skipped_steps, "skipped_hypersteps": c.skipped_hypersteps}

    @property
    def needs_graph(self) -> bool:
        """True when the coming ``step()`` takes Hessian-vector products from the gradient graph
        (a second-order method records it, or a forward-mode method carries its tangents
        through it).  Use it as ``loss.backward(create_graph=opt.needs_graph)``: the (costlier)
        graph is built only on the steps that need it.  Not with a ``torch.compile``'d model,
        whose backward has no double backward: ``backward(create_graph=True)`` itself raises
        ("compiled with non-empty donated buffers"), or with donated buffers off the products
        do (a :class:`~hyperopt_wrap.CurvatureError`); step with ``opt.step(closure)`` and
        ``curvature="closure"`` instead."""
        if self._flags.replaying or isinstance(self.curvature, FiniteDifferences) \
                or self.method.needs_closure:
            return False
        return self._needs_source(self._position())

    @property
    def replaying(self) -> bool:
        """True while ``step()`` re-runs a closure to take curvature (a recorded step's, at its
        weights, or this step's at perturbed weights).  A closure that logs (Lightning's
        ``self.log`` in ``training_step``, a metrics counter) would log those evaluations too:
        guard the logging with ``if not opt.replaying``.  ``step()`` itself returns the step's
        own loss."""
        return self._flags.replaying

    @property
    def window_complete(self) -> bool:
        """The current window's ``update_every`` base steps have all been taken."""
        return self._ctx.window_complete

    @property
    def tape(self) -> list:
        """The steps recorded in the current window, oldest first (second-order methods)."""
        return self._ctx.tape

    def scratch_tensors(self) -> list[Tensor]:
        """Every tensor the optimizer keeps besides the parameters, their gradients and the
        base optimizer's state: tuned values and their bookkeeping, the hyper-optimizer's
        state, the method's state and the step's persistent scratch (for memory accounting)."""
        out = [t for tk in self.tuned.values()
               for t in (*tk.values, *tk.raws, *tk.accums, *tk.last)]
        out += [t for st in self.hyper_optimizer.state.values() for t in st.values()
                if isinstance(t, Tensor)]
        out += list(_tensors(self._method_state))
        out += self._stepper.scratch_tensors()
        seen, unique = set(), []
        for t in out:
            if id(t) not in seen:
                seen.add(id(t))
                unique.append(t)
        return unique

    # ------------------------------------------------------------------ the step
    def _position(self) -> int:
        return self._ctx.position % self.update_every

    def _needs_source(self, position: int) -> bool:
        method, state = self.method, self._method_state
        if method.needs_curvature and method.records_step(self._ctx, state, position):
            return True
        return method.carries(self._ctx, state) and method.carry_curvature(self._ctx, state)

    def _lr_scale(self, group: dict) -> float:
        nominal = group["hyper_nominal"].get("lr")
        return 1.0 if nominal is None else float(group["lr"]) / nominal

    def _sync_group_writes(self) -> list[float]:
        """Honour writes to param-group entries since the last step: validated first (a NaN,
        inf or negative entry raises with nothing changed), then applied; returns the groups'
        lr scales.  An entry is compared with the last call's without reading it (a float by
        value, a tensor by identity and version), so an unchanged group costs no read and a
        tensor lr on an accelerator is read on the host only when it was written."""
        kinds, groups = self.rule.kinds, self.param_groups
        seen = self._seen_entries
        changed = []
        for gi, group in enumerate(groups):
            key = tuple(_entry_key(self._entry(group, k)) for k in kinds)
            if gi >= len(seen) or key != seen[gi][0]:
                changed.append((gi, key))
        floats = {}
        for gi, _ in changed:
            group, where = groups[gi], f" written to param group {gi}"
            nominal = group["hyper_nominal"]
            floats[gi] = values = {}
            for kind in kinds:
                value = values[kind] = _check_value(kind, self._entry(group, kind), where)
                if kind != "lr" and kind in nominal and value != nominal[kind] and value <= 0:
                    raise ValueError(f"{kind}={value} written to param group {gi} while "
                                     f"{kind} is tuned (in log/logit space, where 0 is out "
                                     f"of reach); write a value in "
                                     f"{'(0, 1)' if kind == 'momentum' else '(0, inf)'}")
        for gi, key in changed:
            nominal = groups[gi]["hyper_nominal"]
            for kind in self.tuned_kinds:
                if kind == "lr" or kind not in nominal:    # lr: a scale; not in: untuned group
                    continue
                value = floats[gi][kind]
                if value != nominal[kind]:
                    self._controller.fill_group(kind, gi, value)
                    nominal[kind] = value
                    self._note_write(gi, kind)
            lr_nominal = nominal.get("lr")
            scale = 1.0 if lr_nominal is None else floats[gi]["lr"] / lr_nominal
            seen[gi:gi + 1] = [(key, floats[gi], scale)]
        return [entry[2] for entry in seen[:len(groups)]]

    def _note_write(self, gi: int, kind: str) -> None:
        """A tuned momentum / weight decay written on consecutive steps is a scheduler driving
        it (OneCycleLR and CyclicLR cycle momentum by default): each write resets the tuned
        value, so the kind is not tuned at all.  Warned once per kind."""
        streaks = self.__dict__.setdefault("_write_streaks", {})
        last, count, warned = streaks.get(kind, (-2, 0, False))
        now = int(self._steps)
        count = count + 1 if now == last + 1 else 1
        if count >= 3 and not warned:
            warned = True
            entry = "betas[0]" if kind == "momentum" and "betas" in self.param_groups[gi] \
                else kind
            warnings.warn(
                f"param group {gi}'s {entry} is written on every step (a scheduler such as "
                f"OneCycleLR or CyclicLR with cycle_momentum=True?); each write resets the "
                f"tuned {kind} to the written value, so {kind} is not tuned. Pass "
                f"cycle_momentum=False to the scheduler, or leave {kind!r} out of tune= and "
                f"let the scheduler drive it", UserWarning, stacklevel=6)
        streaks[kind] = (now, count, warned)

    def _bucket_hyper(self, bucket: Bucket, scales: list[float]) -> dict[str, Any]:
        """The rule's hyperparameters for a bucket: a float (untuned), one 0-dim tensor shared
        by the bucket (global/group) or one tensor per parameter (tensor/element), in the
        parameters' dtype and device, lr times the group's scheduler scale."""
        gi = bucket.group_index
        hyper: dict[str, Any] = {}
        for kind in self.rule.kinds:
            tk = self.tuned.get(kind)
            slots = bucket.slots_of(kind, tk) if tk is not None else None
            if slots is None:       # untuned: the entry as read by the last group sync
                hyper[kind] = self._seen_entries[gi][1][kind]
                continue
            scale = scales[gi] if kind == "lr" else 1.0
            hyper[kind] = _as_rule_reads(bucket.tuned_values(kind, tk), bucket, scale)
        return hyper

    def _meta_from_val(self, buckets: list[Bucket]) -> MetaGradients:
        params = [p for b in buckets for p in b.params]
        with torch.enable_grad():
            loss = self.val_loss()
            if not isinstance(loss, Tensor) or loss.dim() != 0:
                raise TypeError(f"val_loss() must return a scalar tensor, got {loss!r}")
            if not loss.requires_grad:
                raise RuntimeError("val_loss() returned a loss that does not depend on the "
                                   "parameters (no autograd graph); compute it from the model "
                                   "inside the callable, without torch.no_grad() or .detach()")
            try:
                if self._shards is None:
                    grads = torch.autograd.grad(loss, params, allow_unused=True)
                else:   # FSDP2 reduces gradients in backward hooks: a backward() it is
                    grads = self._shards.backward_grads(loss, params)
            except RuntimeError as e:
                raise RuntimeError(f"could not differentiate val_loss(): {e}. val_loss must build "
                                   "a fresh graph on each call and must not call backward() "
                                   "itself") from e
        if all(g is None for g in grads):
            raise RuntimeError(
                "val_loss() does not depend on this optimizer's parameters (its graph reaches "
                "none of them), so every hypergradient would be 0 and tuning would stop. "
                "Compute it from the model this optimizer steps; after copy.deepcopy(opt) (or "
                "of the model), set copy.val_loss = lambda: ... on the copy, since the copied "
                "lambda still reads the original model")
        # a non-finite validation loss (with a finite gradient) skips the hyper-step
        self._controller.mark_window(torch.isfinite(loss.detach()))
        flats, i = [], 0
        for b in buckets:
            gs = grads[i:i + len(b.params)]
            i += len(b.params)
            if all(g is None for g in gs):
                flats.append(None)
                continue
            flat, _ = b.flat("meta")
            torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                       for g, p in zip(gs, b.params)], out=flat)
            flats.append(flat)
        return MetaGradients(buckets, flats)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None):
        """One base step (and a hyper-step when a window completes). Returns the closure's loss."""
        self._flags.step_calls += 1
        method, state, ctx = self.method, self._method_state, self._ctx
        position = self._position()
        records = method.records_step(ctx, state, position)
        carries = method.carries(ctx, state)
        needs_source = self._needs_source(position)
        if closure is None and method.needs_closure:    # on every step, not only where read
            raise CurvatureError(missing_source_message(method.name, closure_only=True))
        loss = rng = None
        if closure is not None:
            if needs_source:
                # (only the gradients this closure's backward produces are checked after it)
                self.__dict__.get("_grad_versions", {}).clear()
                rng = capture_rng(sorted({p.device for g in self.param_groups
                                          for p in g["params"]}, key=str))
            with torch.enable_grad():
                loss = closure()
        scales = ctx.lr_scales = self._sync_group_writes()
        groups = self._step_groups()
        if self._shards is not None:
            self._shards.load_grads(self.param_groups, groups)
            ctx._groups = groups
        buckets = self._stepper.buckets(groups)
        if not buckets:
            return loss
        # decided before anything changes: a missing curvature source raises with nothing done
        source = self._curvature_source(buckets, closure, rng, loss, records) \
            if needs_source else None
        options = [self.rule.options(g) for g in self.param_groups]
        self._stepper.init_states(buckets, options)
        found_inf = getattr(self, "found_inf", None)
        # recovery="restore" keeps its copy where it can act on it: not under GradScaler (its
        # skips are loss-scale overflows) nor in a compiled step
        restoring = self.recovery == "restore" and found_inf is None and not is_compiling()
        if restoring and not self._stepper.has_restore_point():
            self._stepper.keep_restore_point(self._restorable(groups), True)  # before the update
            self._controller.period_skips.zero_()
            self._controller.period_clean.fill_(True)
            self._pending_restore, self._since_look = None, 0
        foreach = [g.get("foreach") is not False for g in self.param_groups]
        # torch's fused kernel, on the gradients themselves, where nothing else needs them
        plan = self._fused_plan(buckets, scales, options, foreach) \
            if source is None and not records \
            and not (carries and method.carry_reads_gradients(ctx, state)) else None
        if plan is not None:
            finite, dots = self._stepper.check_grads(
                buckets, self._device, plan, found_inf,
                with_dots=self.val_loss is None and method.reads_state_dots(ctx, state))
            grads_finite = finite
        else:
            finite, grads_finite = self._load_grads(buckets, source, found_inf)
        self._controller.count_step(finite, backoff=found_inf is None, finite=grads_finite)
        try:
            if self.val_loss is None:
                # E is the training loss at the weights of the last step: its gradient is this
                # step's gradient, which completes whatever the method has pending.
                meta = MetaGradients(buckets, [b.grad for b in buckets]) if plan is None else \
                    MetaGradients(buckets, [None] * len(buckets),
                                  [[p.grad for p in b.params] for b in buckets], finite,
                                  dots and [(t["lr"].key, d) for t, d in zip(plan, dots)])
                added = method.hypergradient(ctx, state, meta)
                if added:
                    self._controller.mark_window(finite)
                    self._controller.contributions += added
                    if ctx.position >= self.update_every:
                        self._hyper_step()
            ends_window = ctx.position + 1 >= self.update_every
            hyper = [self._bucket_hyper(b, scales) for b in buckets]
            if records:
                ctx.tape.append(self._stepper.snapshot(len(ctx.tape), buckets, hyper, options,
                                                       scales, source, finite))
            if carries:
                view = self._stepper.view(buckets, hyper, options, finite, grads=plan is None)
                view.source = source
                if source is not None and not records:
                    params = [it.param for it in view.items]
                    view.hvp = _flagged(self._flags, step_hvp(
                        source, params, [it.grad for it in view.items],
                        self._closure_check(source, params, finite)))
                method.carry(ctx, state, view)
        except BaseException:
            self._abandon_window()
            raise
        kinds = method.tangent_kinds(ctx, state, ends_window)
        if plan is None:
            record = self._stepper.step(buckets, hyper, options, kinds, finite, scales, foreach,
                                        unversioned=self._unversioned)
        else:
            record = self._stepper.step_fused(buckets, hyper, options,
                                              [{k: t[k] for k in kinds} for t in plan],
                                              finite, scales, release=not method.needs_curvature)
        method.observe(ctx, state, record)
        self._steps += 1
        ctx.position += 1
        if self.val_loss is not None and ends_window:
            try:
                meta = self._meta_from_val(buckets)
                self._controller.contributions += method.hypergradient(ctx, state, meta)
            except BaseException:
                # the base step stands (as after a raising closure in torch); this window's
                # hypergradient is dropped and the next window starts clean
                self._abandon_window()
                raise
            self._hyper_step()
        if restoring:
            self._look_back(groups)
        if self._shards is not None:
            self._shards.release_grads(groups)
        self._settle_versions()
        return loss

    def _restorable(self, groups: list[dict]) -> list[tuple[Tensor, dict]]:
        """Every trainable parameter of the step's groups with its optimizer state."""
        state = self._stepper.state
        owners = self._shards.owners if self._shards is not None else {}
        return [(p, state.get(p) or {}) for g in groups for p in g["params"]
                if owners.get(id(p), p).requires_grad]    # (a local shard asks its DTensor)

    def _look_back(self, groups: list[dict]) -> None:
        """``recovery="restore"``, after every ``_RESTORE_EVERY``-th step: return to the restore
        point when at least ``_RESTORE_AFTER`` of these steps were skipped for a non-finite
        gradient, else (after 100 steps without a skip) copy the weights and state into it.
        The count is a device tensor: on the CPU it is read at once; elsewhere it is copied to
        the host without waiting and read at the next look, ``_RESTORE_EVERY`` steps later (no
        host synchronisation in ``step()``; the ranks of a sharded run decide alike, their
        skips being agreed)."""
        self._since_look += 1
        if self._since_look < _RESTORE_EVERY:
            return
        self._since_look = 0
        period = self._controller.period_skips
        clean = self._controller.period_clean    # (the stretch before this one had no skip)
        if _reads_at_once(period.device):
            back = bool(period >= _RESTORE_AFTER)
            fresh = bool(period == 0) and bool(clean)   # (no skip: this step was taken too)
        else:
            pending = self._pending_restore
            self._pending_restore = ((period >= _RESTORE_AFTER).to("cpu", non_blocking=True),
                                     _event(period.device))
            if pending is not None and pending[1] is not None:
                pending[1].synchronize()     # (recorded a look ago: long done)
            back = pending is not None and bool(pending[0])
            fresh = (period == 0) & clean
        if back:
            self._return_to_restore_point()
        else:
            self._stepper.keep_restore_point(self._restorable(groups), fresh)
        torch.eq(period, 0, out=clean)
        period.zero_()

    def _return_to_restore_point(self) -> None:
        """The weights and optimizer state go back to the restore point; the method's carried
        state (tangents, the window) starts afresh; the tuned lr keeps its back-off."""
        for p in self._stepper.restore():
            torch.autograd.graph.increment_version(p)
        self._pending_restore = None
        self._abandon_window()
        self.method.restart(self._ctx, self._method_state)
        self._controller.window_finite.fill_(True)
        # what diverged will diverge again: from now on the lr stays below what the back-off
        # left times _CEILING_HEADROOM (on the CPU, after 3 halvings: half the lr that diverged)
        self._controller.lower_lr_ceiling(math.log(_CEILING_HEADROOM))
        self.restores += 1
        if self.restores == 1:
            warnings.warn(
                f"HyperOptimizer: at least {_RESTORE_AFTER} of {_RESTORE_EVERY} steps were "
                f"skipped for non-finite gradients (the run diverged): the weights and optimizer "
                f"state returned to their last copy (taken every {_RESTORE_EVERY} steps after "
                f"{2 * _RESTORE_EVERY} without a skip), the tuned lr keeps its back-off and may "
                f"rise to at most {_CEILING_HEADROOM:g}x it from now on. opt.restores counts "
                f"these returns; recovery='backoff' keeps no copy", RuntimeWarning, stacklevel=6)

    def _load_grads(self, buckets: list[Bucket], source, found_inf: Tensor | None
                    ) -> tuple[Tensor, Tensor]:
        """The gradients into the buckets' flat buffers, checked, agreed across ranks, put to
        the blow-up test, rolled back from and clipped as configured; returns whether the step
        is taken and whether its gradients were finite (0-dim bools on the device)."""
        taken, finite = self._stepper.load_grads(
            buckets, self._device, found_inf, getattr(self, "grad_scale", None),
            check_in_place=not isinstance(source, GraphSource),
            growth=_ROLLBACK_GROWTH if self.recovery == "rollback" else None)
        if self._shards is not None:     # skipped on every rank when not finite on one
            taken = finite = self._stepper.restrict(
                buckets, self._controller.reduction.agree_finite(taken))
        if self.recovery == "rollback":   # (an AMP caller's overflow is no reason to go back)
            self._stepper.rollback(buckets, taken if found_inf is None else
                                   taken | (found_inf.to(taken.device) != 0))
        if self.max_grad_norm is not None:
            coef, norm = self._stepper.clip(   # (FSDP2: the norm over every rank's shard)
                buckets, self.max_grad_norm, self._device,
                self._controller.reduction.sum_ if self._shards is not None else None)
            if source is not None:
                source.clip = GradClip(coef, norm, self.max_grad_norm)
        return taken, finite

    def _fused_plan(self, buckets: list[Bucket], scales: list[float], options: list[dict],
                    foreach: list[bool]) -> list[dict] | None:
        """The tangents the rule's fused kernel leaves behind per bucket (a step it can take
        alone: no graph kept, no per-shard agreement, rollback, clipping or loss scale, a
        method that takes it, and not while torch.compile traces: the kernel with a tensor lr
        has no fake implementation), else None."""
        if is_compiling() or self._shards is not None or self.recovery == "rollback" \
                or self.max_grad_norm is not None or self._unversioned \
                or getattr(self, "grad_scale", None) is not None \
                or not self.method.takes_fused_step(self._ctx, self._method_state, buckets):
            return None
        hyper = [self._bucket_hyper(b, scales) for b in buckets]
        return self._stepper.fused_plan(buckets, hyper, options, self._ctx.tuned_kinds, foreach)

    def _hyper_step(self) -> None:
        self._ctx.position = 0
        self._controller.hyper_step()

    def _abandon_window(self) -> None:
        self._ctx.position = 0
        self._ctx.release_tape()
        self._controller.abandon_window()
        self.method.abandon(self._ctx, self._method_state)
        self._settle_versions()

    def _settle_versions(self) -> None:
        """Once no recorded graph is kept, bump the version counters of the parameters written
        through ``.data`` meanwhile, so stale graphs raise as after a torch.optim step."""
        if self._unversioned and not any(isinstance(st.source, GraphSource)
                                         for st in self._ctx.tape):
            for group in self.param_groups:
                for p in group["params"]:
                    torch.autograd.graph.increment_version(p)
            self._unversioned = False

    def _curvature_source(self, buckets, closure, rng, loss, records: bool):
        cfg = self.curvature
        params = [p for b in buckets for p in b.params]
        grads = [p.grad for p in params]
        closure_only = self.method.needs_closure
        if closure_only and closure is None:
            raise CurvatureError(missing_source_message(self.method.name, closure_only=True))
        if not closure_only and not isinstance(cfg, FiniteDifferences) \
                and any(g.grad_fn is not None for g in grads):
            grad_scale = getattr(self, "grad_scale", None)
            self._check_graph_grads(params, grad_scale, getattr(self, "found_inf", None))
            for p in params:       # we keep the graph; p.grad keeps the values
                p.grad = p.grad.detach()
            if records:
                self._unversioned = True
            return GraphSource(grads, grad_scale)
        if cfg == "graph" and not closure_only:
            raise CurvatureError(
                "curvature='graph' but p.grad carries no graph on a step the method needs it; "
                "call loss.backward(create_graph=opt.needs_graph) before opt.step() (or use "
                "curvature='auto' with a closure)")
        if closure is None:
            raise CurvatureError(missing_source_message(self.method.name))
        if records:
            self._check_closure_grads(params)
        config = cfg if isinstance(cfg, FiniteDifferences) else FiniteDifferences()
        return ClosureSource(closure, rng, loss, int(self._flags.step_calls), config)

    def _closure_check(self, source, params: list[Tensor], finite: Tensor):
        """Once per run, before a closure source's first product within its own step: the
        closure must reproduce the gradient the step uses (see ``ClosureSource.check_binding``;
        the tape's replays check their first closure likewise)."""
        flags = self._flags
        if not isinstance(source, ClosureSource) or flags.grad_checked:
            return None

        def check(weights: list[Tensor], grads: list[Tensor]) -> None:
            flags.grad_checked = source.check_binding(params, weights, grads, finite, loss=False)
        return check

    def _check_closure_grads(self, params: list[Tensor]) -> None:
        """A recorded step's closure must leave ``p.grad`` as its backward produced it: one
        clipped after backward (``clip_grad_norm_`` in the closure, Lightning's
        ``gradient_clip_val``) makes its finite differences ``J H u``, the clip's Jacobian
        after the Hessian, and the reverse pass of a recorded step needs the transpose
        ``H J u`` (tests/test_amp_clip.py: 0.12 relative off).  Forward-mode carries (RTRL,
        forward gradients) need ``J H u`` itself and are not checked.  Under DDP, whose reducer
        writes the averaged gradients into ``p.grad`` after backward, nothing is checked."""
        reduction = self._controller.reduction
        if reduction is not None and not reduction.sharded:
            return
        versions = getattr(self, "_grad_versions", {})     # (noted during this closure)
        for p in params:
            noted = versions.get(id(p))
            if noted is not None and p.grad is not None and p.grad._version > noted:
                raise CurvatureError(
                    f"the closure changed p.grad in place after its backward (gradient clipping "
                    f"such as clip_grad_norm_ in the closure, or Lightning's gradient_clip_val?). "
                    f"Method {self.method.name!r} differentiates this step in reverse, which needs "
                    "the clip's Jacobian before the Hessian, and finite differences of a clipped "
                    "gradient give it after: the hypergradient would be wrong. Clip with "
                    "HyperOptimizer(..., max_grad_norm=...) instead (Lightning: drop "
                    "gradient_clip_val), which differentiates the clip exactly")

    def _check_graph_grads(self, params: list[Tensor], grad_scale, found_inf) -> None:
        """A gradient graph differentiates ``p.grad`` as backward produced it: one rescaled or
        written in place since would give a wrong hypergradient, so it is refused.  GradScaler
        hands an AMP-aware optimizer ``found_inf`` with its scale, or without one once
        ``scaler.unscale_(opt)`` has divided the gradients (its kernel leaves no trace in the
        version counters); anything else writing ``p.grad`` in place bumps them (GradScaler's
        own inf check multiplies by 1 and does not)."""
        if found_inf is not None and grad_scale is None:
            raise CurvatureError(self._in_place_message("scaler.unscale_(opt)"))
        versions = getattr(self, "_grad_versions", {})
        for p in params:
            noted = versions.get(id(p))
            if noted is None or p.grad is None or p.grad.grad_fn is None:
                continue     # (a gradient set by hand, not by backward: nothing to compare)
            if p.grad._version > noted:
                raise CurvatureError(self._in_place_message("clip_grad_norm_ or another in-place "
                                                            "write"))

    @staticmethod
    def _in_place_message(what: str) -> str:
        return (f"p.grad was changed in place after loss.backward(create_graph=True) (by {what}), "
                "but the gradient graph differentiates the gradient as backward left it, so the "
                "hypergradient would be "
                "wrong. With torch.amp.GradScaler, let scaler.step(opt) hand HyperOptimizer the "
                "scale (do not call scaler.unscale_(opt) on steps where opt.needs_graph is "
                "True): it unscales the gradients and the curvature itself. To clip, pass "
                "max_grad_norm=... to HyperOptimizer instead of calling clip_grad_norm_ (it "
                "differentiates the clipping too), with the graph or (without GradScaler) with "
                "the closure source")

    # ------------------------------------------------------------------ save / resume
    def _fingerprint(self) -> dict[str, Any]:
        return {"optimizer": f"{self.optimizer_cls.__module__}.{self.optimizer_cls.__qualname__}",
                "method": type(self.method).__name__,
                "tune": list(self.tuned_kinds),
                "granularity": dict(self._granularity),
                "params_per_group": [len(g["params"]) for g in self.param_groups]}

    def state_dict(self) -> dict[str, Any]:
        """torch's state_dict plus a ``"hyper"`` entry (tuned values, hyper-optimizer, method
        state, counters).  State-dict hooks see the whole of it."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        sd = self._state_dict()
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            out = post_hook(self, sd)
            if out is not None:
                sd = out
        return sd

    def _state_dict(self) -> dict[str, Any]:
        """:meth:`state_dict` without the user's hooks."""
        self._sync_group_writes()
        with _hooks_off(self, "_optimizer_state_dict_pre_hooks",
                        "_optimizer_state_dict_post_hooks"):
            sd = super().state_dict()
        groups = self._groups_in_use(sd["param_groups"])
        sd["hyper"] = {
            "config": self._fingerprint(),
            "controller": self._controller.state_dict(),
            "method": self.method.state_dict(self._method_state),
            # recorded steps (graphs, closures) cannot be saved: a resume restarts the window
            # when this window has any, as a deepcopy does
            "counters": {"window": self._ctx.position, "steps": int(self._steps),
                         "recorded": len(self._ctx.tape), "restores": self.restores},
            "shapes": [[list(p.shape) for p in g["params"]] for g in self.param_groups],
            "groups": groups,
        }
        ref = self._stepper.guard_ref
        if ref is not None:   # rollback's blow-up test reference (since 0.6.1; absent: afresh)
            sd["hyper"]["guard"] = ref.clone()
        return sd

    def _groups_in_use(self, saved_groups: list[dict]) -> list[dict]:
        """The saved param groups hold the values in use (a global or per-group tuned lr times
        its scheduler scale, tuned momentum and weight decay), so that the torch optimizer this
        one wraps, loading the checkpoint, continues where the tuning got to; the entries as
        this optimizer keeps them (the schedule's lr, ``hyper_nominal``) move to
        ``hyper["groups"]``, returned.  Per-tensor and per-element values have no place in a
        torch param group: those groups keep their entries (see the README)."""
        in_use = self.hyperparameters()
        kept = []
        for gi, saved in enumerate(saved_groups):
            before = dict(saved)
            for kind, tk in self.tuned.items():
                entry = in_use[kind][gi]
                if tk.is_tuned(gi) and tk.granularity in ("global", "group"):
                    self.rule.write(saved, kind, float(entry))
            del saved["hyper_nominal"]
            kept.append({k: v for k, v in before.items()
                         if k not in saved or saved[k] is not v})
        return kept

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict`.  Every part is checked before anything is written: a
        checkpoint that does not fit (truncated, edited, another configuration or model, NaN
        tuned values, tensors of the wrong shape) raises with the optimizer unchanged.  Load
        pre-hooks see (and may replace) the whole checkpoint, ``"hyper"`` included; post-hooks
        run once the tuned values are restored."""
        state_dict = dict(state_dict)
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            out = pre_hook(self, state_dict)
            if out is not None:
                state_dict = out
        hyper, rest = self._check_loadable(state_dict)
        before = self._state_dict()     # torch's part by reference: cheap
        try:
            self._load(hyper, rest)
        except BaseException:
            self._load(*self._check_loadable(before))
            raise
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _check_loadable(self, state_dict: dict[str, Any]) -> tuple[dict, dict]:
        if not isinstance(state_dict, dict) or "hyper" not in state_dict:
            raise ValueError("this state_dict was not saved by HyperOptimizer (no 'hyper' entry); "
                             "load a state_dict from HyperOptimizer.state_dict(), or load a "
                             "torch.optim state_dict into the torch optimizer it came from"
                             + ("" if self._shards is None else
                                " (torch.distributed.checkpoint's get_optimizer_state_dict keeps "
                                "only torch's entries: under FSDP2 save opt.state_dict() on "
                                "each rank)"))
        hyper = state_dict["hyper"]
        require(hyper, ("config", "counters"), "state_dict['hyper']")
        mine, theirs = self._fingerprint(), hyper["config"]
        if mine != theirs:
            theirs = theirs if isinstance(theirs, dict) else {}
            diff = {k: (theirs.get(k), mine[k]) for k in mine if theirs.get(k) != mine[k]}
            raise ValueError(
                "state_dict comes from a different HyperOptimizer configuration "
                + "; ".join(f"{k}: saved {a!r}, this one {b!r}" for k, (a, b) in diff.items())
                + ". Construct the HyperOptimizer with the saved configuration before loading")
        rest = {k: v for k, v in state_dict.items() if k != "hyper"}
        if "controller" not in hyper:
            hyper, rest = self._upgrade_v0_1(hyper, rest)
        require(hyper, ("controller", "method"), "state_dict['hyper']")
        c = hyper["counters"]
        require(c, ("window", "steps"), "state_dict['hyper']['counters']")
        if not all(isinstance(c[k], int) and not isinstance(c[k], bool) and c[k] >= 0
                   for k in ("window", "steps")):
            raise CheckpointError(f"state_dict['hyper']['counters'] must hold counts >= 0, "
                                  f"got {c}")
        check_shapes(hyper.get("shapes"), self.param_groups)
        _check_saved_groups(hyper, rest)
        self._ctx._groups = self._step_groups()
        check_base_state(self.rule, self._ctx._groups, rest)
        self._controller.check_loadable(hyper["controller"])
        self.method.check_loadable(self._ctx, hyper["method"])
        ref = hyper.get("guard")
        if ref is not None and not (isinstance(ref, Tensor) and ref.dim() == 0
                                    and ref.is_floating_point() and not bool(ref <= 0)):
            raise CheckpointError(f"state_dict['hyper']['guard'] must be a 0-dim float tensor, "
                                  f"> 0 or NaN (rollback's reference gradient norm; 0 would "
                                  f"reject every step), got {ref!r}")
        return hyper, rest

    def _load(self, hyper: dict, rest: dict) -> None:
        """Write a checked checkpoint (torch's part, its defaults for entries older torch did
        not save, then ours)."""
        with _hooks_off(self, "_optimizer_load_state_dict_pre_hooks",
                        "_optimizer_load_state_dict_post_hooks"):
            super().load_state_dict(rest)
        for group, saved in zip(self.param_groups, hyper.get("groups") or []):
            group.update(saved)      # (0.4 checkpoints: the entries as kept, values in use aside)
        self._rebind()
        _base_defaults(self.optimizer_cls, self)
        for group in self.param_groups:     # our step counters live on the param's device
            for p in group["params"]:
                st = self.state.get(p)
                if st and isinstance(st.get("step"), Tensor) and st["step"].device != p.device:
                    st["step"] = st["step"].to(p.device)
        self._controller.load_state_dict(hyper["controller"])
        ref = hyper.get("guard")
        self._stepper.guard_ref = None if ref is None else \
            ref.to(self._device, torch.float32, copy=True)
        self._stepper.drop_snapshots()   # (rollback returns to a step of the loaded run only)
        method_state = self.method.init_state(self._ctx)
        self.method.load_state_dict(method_state, hyper["method"])
        self._method_state = method_state
        c = hyper["counters"]
        self._ctx.position, self._steps = c["window"], Count(c["steps"], self._device)
        self.restores = int(c.get("restores", 0))
        self._pending_restore, self._since_look = None, 0
        self._ctx.release_tape()
        if c.get("recorded", self._records_steps()):    # (0.1 checkpoints: whether it could)
            # recorded steps (graphs, closures) are not saved: the interrupted window restarts
            self._abandon_window()

    def _upgrade_v0_1(self, hyper: dict, rest: dict) -> tuple[dict, dict]:
        """A checkpoint of hyperopt_wrap 0.1 (before the controller/stepper split): the tuned
        values, raw values, accumulators, hyper-optimizer state and counters carry over as they
        are; greedy's pending one-step tangents (kept then in ``state[p]["hyper"]``) are dropped,
        so the first step after loading adds no hypergradient (the hyper-step it completes
        averages the rest of its window), and a recording method restarts its window as it
        always does on resume."""
        c = hyper["counters"]
        controller = {k: hyper[k] for k in ("values", "raws", "accums", "last", "hyper_optimizer",
                                            "skipped")}
        controller["counters"] = {"contributions": c["contributions"],
                                  "hypersteps": c["hypersteps"]}
        if type(self.method).__name__ == "Greedy":
            controller["counters"]["contributions"] = 0
        upgraded = {"config": hyper["config"], "controller": controller,
                    "method": self.method.init_state(self._ctx),
                    "counters": {"window": c["window"], "steps": c["steps"]}}
        state = {k: {n: v for n, v in st.items() if n != "hyper"}
                 for k, st in rest.get("state", {}).items()}
        return upgraded, dict(rest, state=state)

    def _rebind(self) -> None:
        """torch's load_state_dict and __setstate__ rebind ``state`` and ``param_groups``."""
        self._stepper.state = self._stepper_state()
        self._stepper.invalidate()
        self._seen_entries = []
        self._ctx._groups = self._step_groups()

    def _step_groups(self) -> list[dict]:
        """The param groups as the step and the method see them: under FSDP2 with each
        parameter's local shard in its place (the optimizer state is keyed by the parameter)."""
        return self.param_groups if self._shards is None else self._shards.groups(self.param_groups)

    def _stepper_state(self):
        return self.state if self._shards is None else self._shards.state(self.state)

    def __getstate__(self) -> dict[str, Any]:
        # torch.optim.Optimizer pickles only defaults/state/param_groups; we need everything but
        # its hook dictionaries, which torch drops too (its __setstate__ recreates them)
        state = {k: v for k, v in self.__dict__.items() if not k.startswith("_optimizer_")
                 and k not in ("_grad_versions", "_grad_hooks",     # (re-registered on copies)
                               "step")}     # an LR scheduler's wrapper of the original's step
        # (a copy keeps no restore point, so no pending look either: an Event cannot be copied)
        state["_pending_restore"] = None
        state["_since_look"] = 0
        if self._ctx.tape:
            # recorded steps hold graphs and closures, which cannot be copied: the copy
            # restarts the current window, exactly as a resume from state_dict() does
            ctx = copy.copy(self._ctx)
            ctx.tape = []
            state["_ctx"] = ctx
            state["_restart_window"] = True
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        restart = state.pop("_restart_window", False)
        super().__setstate__(state)
        if "_stepper" in state:
            self._ctx._controller = self._controller
            self._rebind()
            self._watch_grads()
            if restart:
                self._abandon_window()

    def _records_steps(self) -> bool:
        return type(self.method).records_step is not HypergradientMethod.records_step

    def __repr__(self) -> str:
        head = (f"HyperOptimizer({self.optimizer_cls.__name__}, method={self.method!r}, "
                f"tune={self.tuned_kinds}, granularity={self._granularity}, "
                f"update_every={self.update_every})")
        lines = [head + " ("]        # then the param groups, as torch.optim prints them
        for i, group in enumerate(self.param_groups):
            lines.append(f"Parameter Group {i}")
            lines += [f"    {k}: {group[k]}" for k in sorted(group)
                      if k not in ("params", "hyper_nominal")]
        return "\n".join(lines) + "\n)"


def _flagged(flags: ReplayFlags, hvp):
    """``hvp`` with ``flags.replaying`` set while it runs (closure products re-run the closure)."""
    def flagged(us):
        before, flags.replaying = flags.replaying, True
        try:
            return hvp(us)
        finally:
            flags.replaying = before
    return flagged


def _check_saved_groups(hyper: dict, rest: dict) -> None:
    """The param-group entries as this optimizer keeps them: in ``hyper["groups"]`` (0.4 on),
    or in the groups themselves (older checkpoints)."""
    groups = rest.get("param_groups")
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise CheckpointError("state_dict['param_groups'] must be a list of dicts")
    kept = hyper.get("groups")
    if kept is None:
        entries = groups
    elif not (isinstance(kept, list) and len(kept) == len(groups)
              and all(isinstance(g, dict) for g in kept)):
        raise CheckpointError(f"state_dict['hyper']['groups'] must hold one dict per param group "
                              f"({len(groups)}), got {type(kept).__name__}")
    else:
        entries = [dict(g, **k) for g, k in zip(groups, kept)]
    for gi, g in enumerate(entries):
        if not isinstance(g.get("hyper_nominal"), dict):
            raise CheckpointError(f"param group {gi} of the checkpoint has no 'hyper_nominal' "
                                  "entry: it was not saved by HyperOptimizer.state_dict()")


# the options of the method's default class that Hierarchical takes in its place, by level
_HIERARCHICAL_OPTIONS = {
    "normalized": {"lr", "spread", "deviation_lr", "momentum", "eps"},
    "adam": {"lr", "spread", "deviation_lr", "betas", "eps", "adam_eps"}}


def _check_hyper_optimizer(cls, kwargs) -> None:
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise TypeError(f"hyper_optimizer must be a torch.optim.Optimizer class, e.g. "
                        f"hyper_optimizer=torch.optim.Adam or hyperopt_wrap.NormalizedMomentum, "
                        f"got {cls!r}")
    if issubclass(cls, torch.optim.LBFGS):
        raise ValueError("hyper_optimizer=LBFGS needs a closure that re-evaluates the "
                         "meta-objective, which a hyper-step does not have; use a first-order "
                         "optimizer such as torch.optim.Adam, hyperopt_wrap.NormalizedMomentum "
                         "or torch.optim.SGD")
    if kwargs is None:
        return
    if not isinstance(kwargs, dict):
        raise TypeError(f"hyper_optimizer_kwargs must be a dict, got {kwargs!r}; e.g. "
                        "hyper_optimizer_kwargs={'betas': (0.9, 0.999)}")
    if "lr" in kwargs:
        raise ValueError("hyper_optimizer_kwargs={'lr': ...} is not used: the hyper-optimizer's "
                         "learning rate is hyper_lr=... (a float, or a dict per kind); pass "
                         f"hyper_lr={kwargs['lr']!r} instead")
    if "params" in kwargs:
        raise ValueError("hyper_optimizer_kwargs must not contain 'params': HyperOptimizer "
                         "hands the hyper-optimizer the raw hyperparameter values itself")


def _check_flags(optimizer_cls: type, defaults: dict[str, Any]) -> None:
    """torch.optim's implementation flags: ``foreach`` is honoured (our bucketed step;
    ``foreach=False`` loops over tensors), the others are refused with the reason."""
    name = optimizer_cls.__name__
    if defaults.get("differentiable"):
        raise ValueError(f"differentiable=True is not supported: HyperOptimizer computes the "
                         f"derivatives of the step with respect to its hyperparameters itself and "
                         f"runs the step under no_grad; for a differentiable {name} step use "
                         f"torch.optim.{name}(..., differentiable=True) or hyperopt_wrap.reference")
    if defaults.get("capturable"):
        raise ValueError("capturable=True (CUDA-graph capture of step()) is not supported: "
                         "HyperOptimizer's step makes no host synchronisation (step counters "
                         "live on the parameters' device), but capture is not tested; drop "
                         "capturable=True")
    if defaults.get("fused"):
        raise ValueError(f"fused=True is not supported: torch's fused {name} kernel cannot "
                         "return the derivatives of the step with respect to the tuned "
                         "hyperparameters; HyperOptimizer runs its own bucketed foreach step "
                         "(foreach=None or True, the default). Drop fused=True")


@contextlib.contextmanager
def _hooks_off(opt, *names):
    """Run torch's state_dict / load_state_dict without the hooks we run ourselves."""
    saved = {n: getattr(opt, n) for n in names}
    try:
        for n in names:
            setattr(opt, n, collections.OrderedDict())
        yield
    finally:
        for n, hooks in saved.items():
            setattr(opt, n, hooks)


def _base_defaults(optimizer_cls: type, opt) -> None:
    """What the base optimizer's ``__setstate__`` fills in for checkpoints of older torch
    (missing group entries such as ``maximize``, a float ``step``), applied to our param
    groups and state by running it on a bare instance that shares them."""
    setstate = getattr(optimizer_cls, "__setstate__", None)
    if setstate is None or setstate is torch.optim.Optimizer.__setstate__:
        return
    bare = optimizer_cls.__new__(optimizer_cls)
    setstate(bare, {"defaults": opt.defaults, "state": opt.state,
                    "param_groups": opt.param_groups})
    for name in ("state", "param_groups"):
        if getattr(bare, name) is not getattr(opt, name):   # (a __setstate__ that rebuilt them)
            setattr(opt, name, getattr(bare, name))
    opt._rebind()


class _TensorEntry:
    """A tensor param-group entry as compared between steps: the same tensor, unwritten since
    (its version counter: ``fill_`` by a scheduler counts), without reading its value."""
    __slots__ = ("tensor", "version")

    def __init__(self, tensor: Tensor):
        self.tensor, self.version = tensor, tensor._version

    def __eq__(self, other) -> bool:
        return (isinstance(other, _TensorEntry) and other.tensor is self.tensor
                and other.version == self.version)


def _entry_key(value):
    """A param-group entry as compared between steps (never equal for a malformed tensor, so
    that it is validated)."""
    if isinstance(value, Tensor):
        return _TensorEntry(value) if value.numel() == 1 else object()
    return value


def _as_rule_reads(value, bucket: Bucket, scale: float):
    """A tuned value (a tensor or a list of them) in the bucket's dtype and device, lr times
    its scheduler scale."""
    def convert(v: Tensor) -> Tensor:
        if v.device != bucket.device or v.dtype != bucket.dtype:   # multi-device; bf16 models
            v = v.to(bucket.device, bucket.dtype, non_blocking=True)
        return v * scale if scale != 1.0 else v
    if isinstance(value, list):
        if scale == 1.0 and value and value[0].device == bucket.device \
                and value[0].dtype == bucket.dtype:
            return value
        return [convert(v) for v in value]
    return convert(value)


def _tensors(obj):
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def _scale(entry, scale: float):
    if scale == 1.0:
        return entry
    if isinstance(entry, list):
        return [e * scale for e in entry]
    return entry * scale
