"""HyperOptimizer: a torch.optim.Optimizer whose lr / momentum / weight decay tune themselves."""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor

from .curvature import (ClosureSource, CurvatureError, FiniteDifferences, GraphSource,
                        capture_rng, missing_source_message, resolve_curvature)
from .hyperparams import TunedKind, resolve_bounds, resolve_granularity
from .methods import (HypergradientMethod, MetaGradient, ObservedParam, StepRecord,
                      resolve_method)
from .rules import KINDS, get_rule
from .rules.base import scratch
from .tape import TapedParam, TapedStep

_BUFFERS = "hyper"   # key of a method's per-parameter buffers inside opt.state[p]
_FUSED_DEVICES = ("cpu", "cuda", "xpu", "mps")   # where torch's fused Adam kernel runs


def _check_value(kind: str, value: Any, where: str, tuned: bool = True) -> None:
    if isinstance(value, Tensor):
        value = float(value)
    if kind == "lr" and not (isinstance(value, (int, float)) and math.isfinite(value)
                             and (value > 0 or (value == 0 and not tuned))):
        raise ValueError(f"Invalid learning rate {value!r}{where}: lr must be a positive finite "
                         "number, e.g. lr=0.1")
    if kind == "momentum" and not (isinstance(value, (int, float)) and 0 <= value < 1):
        raise ValueError(f"Invalid momentum {value!r}{where}: momentum must lie in [0, 1), "
                         "e.g. momentum=0.9")
    if kind == "weight_decay" and not (isinstance(value, (int, float)) and value >= 0
                                       and math.isfinite(value)):
        raise ValueError(f"Invalid weight_decay {value!r}{where}: weight decay must be a finite "
                         "number >= 0, e.g. weight_decay=5e-4")


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
        hyper_optimizer: torch optimizer class for the raw values (default Adam).
        hyper_optimizer_kwargs: extra keyword arguments for it.
        update_every: base steps per hyper-step (default: the method's; greedy: 1).
        val_loss: optional zero-argument callable returning a validation loss at the current
            weights. Without it the meta-objective is the next minibatch's training loss.
            With ``maximize=True`` the meta-objective is maximised too (``val_loss`` then
            returns the quantity you maximise).
        bounds: ``{kind: (low, high)}`` in natural units; defaults lr and weight decay in
            ``[1e-10, 1]``, momentum in ``[0, 0.9999]``.
        curvature: where second-order methods (implicit, unroll) get Hessian-vector products:
            ``"auto"`` (default: the gradient graph when ``p.grad`` carries one, i.e. after
            ``loss.backward(create_graph=opt.needs_graph)``, else the closure given to
            ``step``), ``"graph"``, ``"closure"``, or
            :class:`~hyperopt_wrap.FiniteDifferences` (central differences, eps, ``model=`` to
            protect BatchNorm buffers).  See :mod:`hyperopt_wrap.curvature`.
        **optimizer_kwargs: passed to ``optimizer_cls`` (validated by it).

    Param-group entries stay readable and writable. For a tuned ``lr``, ``group["lr"]`` is a
    *scale*: the effective learning rate is the tuned value times ``group["lr"]`` divided by its
    value when tuning started, so LR schedulers keep working multiplicatively on top of the
    tuning. Writing a tuned ``momentum``/``weight_decay`` entry resets the tuned value to it.
    The tuned values themselves are read with :meth:`hyperparameters`.
    """

    def __init__(self, optimizer_cls: type, params, *, method="greedy", tune=("lr",),
                 granularity="global", hyper_lr=None, hyper_optimizer=torch.optim.Adam,
                 hyper_optimizer_kwargs: dict | None = None, update_every: int | None = None,
                 val_loss: Callable[[], Tensor] | None = None, bounds=None, curvature="auto",
                 **optimizer_kwargs):
        self.rule = get_rule(optimizer_cls)
        self.optimizer_cls = optimizer_cls
        if isinstance(tune, str):
            tune = (tune,)
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
        if val_loss is not None and not callable(val_loss):
            raise TypeError(f"val_loss must be a zero-argument callable returning a loss, "
                            f"got {val_loss!r}; e.g. val_loss=lambda: loss_fn(model(xv), yv)")
        self.val_loss = val_loss
        if update_every is None:
            update_every = self.method.default_update_every
        if not (isinstance(update_every, int) and update_every >= 1):
            raise ValueError(f"update_every must be an int >= 1, got {update_every!r}")
        self.update_every = update_every
        for kind in KINDS:
            if kind in optimizer_kwargs and kind in self.rule.kinds:
                _check_value(kind, optimizer_kwargs[kind], "", tuned=kind in tune)
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
        self._hyper_ready = False
        super().__init__(inner.param_groups, inner.defaults)
        del inner
        for gi, group in enumerate(self.param_groups):
            if not group["params"]:
                raise ValueError(f"param group {gi} has no parameters; give every group at least "
                                 "one, or leave it out")

        self.tuned: dict[str, TunedKind] = {
            k: TunedKind(k, self._granularity[k], self._bounds[k]) for k in tune}
        hyper_kwargs = dict(hyper_optimizer_kwargs or {})
        first = self.param_groups[0]["params"][0]
        if hyper_optimizer in (torch.optim.Adam, torch.optim.AdamW) and not (
                {"fused", "foreach", "capturable", "differentiable"} & set(hyper_kwargs)) and \
                first.device.type in _FUSED_DEVICES:
            # One kernel per hyper-step, its step counter on the device, and a found_inf input
            # that skips a non-finite hyper-step without a host sync.
            hyper_kwargs["fused"] = True
        if hyper_lr is None:
            hyper_lr = self.method.default_hyper_lr
            if isinstance(hyper_lr, dict):
                hyper_lr = {k: hyper_lr[k] for k in tune}
        self._hyper_lr = hyper_lr
        raw_groups = [{"params": [], "lr": self._kind_hyper_lr(k), "kind": k} for k in tune]
        for gi, group in enumerate(self.param_groups):
            self._init_group_hyper(gi, group, raw_groups)
        for kind, tk in self.tuned.items():
            if not tk.values:    # every group starts at 0 (only possible for weight decay)
                raise ValueError(f"cannot tune {kind}: every param group has {kind}=0, which "
                                 f"cannot be tuned in log space; start from a positive value, "
                                 f"e.g. {kind}=5e-4")
        try:
            self.hyper_optimizer = hyper_optimizer(raw_groups, **hyper_kwargs)
        except (TypeError, ValueError) as e:
            raise type(e)(f"could not build hyper_optimizer {hyper_optimizer!r}: {e}") from e
        self._skipped_hypersteps = torch.zeros((), dtype=torch.int64, device=first.device)
        self._skipped_steps = torch.zeros((), dtype=torch.int64, device=first.device)
        self._window_finite = torch.ones((), dtype=torch.bool, device=first.device)
        self._workspace: dict[Tensor, dict[str, Tensor]] = {}   # per-parameter scratch buffers
        self._window = 0          # base steps since the last hyper-step
        self._tape: list[TapedStep] = []   # steps recorded for a second-order method
        self._tape_buffers: list[dict] = []  # per tape position and parameter: snapshot buffers
        self._step_calls = 0
        self._replay_checked = False   # an old step's closure was checked to bind its batch
        self._unversioned = False      # params written through .data while a graph is kept
        self._replaying = False
        self._contributions = 0   # hypergradient contributions in the accumulators
        self._steps = 0
        self._hypersteps = 0
        self.method.bind(self)
        self._hyper_ready = True

    # ------------------------------------------------------------------ set-up
    def _kind_hyper_lr(self, kind: str) -> float:
        lr = self._hyper_lr[kind] if isinstance(self._hyper_lr, dict) else self._hyper_lr
        if not (isinstance(lr, (int, float)) and lr >= 0 and math.isfinite(lr)):
            raise ValueError(f"hyper_lr must be a finite number >= 0 (or a dict per kind), got {lr!r}")
        return float(lr)

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
        if isinstance(group.get("lr"), Tensor):    # torch accepts a tensor lr; we keep a float
            group["lr"] = float(group["lr"])
        where = f" in param group {gi}"
        plan = {}
        for kind, tk in self.tuned.items():
            value = self.rule.read(group, kind)
            _check_value(kind, value, where)
            if kind == "weight_decay" and value == 0:
                plan[kind] = None       # a no-decay group: stays untuned at 0
                continue
            reason = self.rule.check_tunable(group, kind)
            if reason is None and kind == "lr" and value <= 0:
                reason = f"lr={value} cannot be tuned in log space; start from e.g. lr=0.1"
            if reason:
                raise ValueError(f"cannot tune {kind}{where}: {reason}")
            tk.check_initial(value)
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

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        if not getattr(self, "_hyper_ready", False):
            return
        gi = len(self.param_groups) - 1
        raw_groups = [{"params": [], "lr": self._kind_hyper_lr(k), "kind": k}
                      for k in self.tuned_kinds]
        try:
            self._init_group_hyper(gi, self.param_groups[gi], raw_groups)
        except Exception:
            self.param_groups.pop()
            raise
        for rg in raw_groups:
            if rg["params"]:
                self.hyper_optimizer.add_param_group(rg)

    # ------------------------------------------------------------------ public reads
    def hyperparameters(self) -> dict[str, list]:
        """Current values in natural units: kind -> one entry per param group.

        An entry is a 0-dim tensor (global/group), a 1-D tensor with one value per parameter
        (tensor) or a list of tensors shaped like the parameters (element).  Tuned learning rates
        include the scheduler scale ``group["lr"] / nominal``.  Untuned kinds appear as floats.
        """
        self._sync_group_writes()
        out: dict[str, list] = {}
        for kind in self.rule.kinds:
            if kind in self.tuned:
                entries = self.tuned[kind].per_group(self.tuned[kind].values)
                if kind == "lr":
                    entries = [_scale(e, self._lr_scale(g)) for e, g in zip(entries, self.param_groups)]
                out[kind] = entries
            else:
                out[kind] = [self.rule.read(g, kind) for g in self.param_groups]
        return out

    def last_hypergradient(self) -> dict[str, list]:
        """dE/d(tuned value), natural units, of the latest hyper-step (same layout as
        :meth:`hyperparameters`; zeros before the first)."""
        return {k: tk.per_group(tk.last) for k, tk in self.tuned.items()}

    def mark_window(self, finite: Tensor) -> None:
        """For methods: the current hypergradient used a step whose gradient was ``finite``
        (a device bool); a non-finite one makes the coming hyper-step skip."""
        self._window_finite &= finite.to(self._window_finite.device)

    @property
    def skipped_hypersteps(self) -> int:
        """Hyper-steps skipped because the hypergradient was NaN or infinite."""
        return int(self._skipped_hypersteps)

    @property
    def skipped_steps(self) -> int:
        """Base steps skipped because a gradient was NaN or infinite."""
        return int(self._skipped_steps)

    @property
    def hypersteps(self) -> int:
        return self._hypersteps

    @property
    def needs_graph(self) -> bool:
        """True when the coming ``step()`` will be recorded by a second-order method that takes
        its Hessian-vector products from the gradient graph.  Use it as
        ``loss.backward(create_graph=opt.needs_graph)``: the (costlier) graph is built only on
        the steps that need it."""
        return (self.method.needs_curvature and not self._replaying
                and not isinstance(self.curvature, FiniteDifferences)
                and self.method.records_step(self, self._window % self.update_every))

    @property
    def window_complete(self) -> bool:
        """For methods: the current window's ``update_every`` base steps have all been taken."""
        return self._window >= self.update_every

    @property
    def tape(self) -> list[TapedStep]:
        """For methods: the steps recorded in the current window, oldest first."""
        return self._tape

    def release_tape(self) -> None:
        """For methods: drop the recorded steps (and the graphs they keep)."""
        self._tape = []

    # ------------------------------------------------------------------ the step
    def _lr_scale(self, group: dict) -> float:
        if "lr" not in self.tuned:
            return 1.0
        return float(group["lr"]) / group["hyper_nominal"]["lr"]

    def _sync_group_writes(self) -> list[float]:
        """Honour writes to param-group entries since the last step (Python floats only)."""
        scales = []
        for gi, group in enumerate(self.param_groups):
            nominal = group["hyper_nominal"]
            for kind in self.tuned_kinds:
                if kind == "lr" or kind not in nominal:    # lr: a scale; not in: untuned group
                    continue
                value = self.rule.read(group, kind)
                if value != nominal[kind]:
                    _check_value(kind, value, f" written to param group {gi}")
                    if value <= 0:
                        raise ValueError(f"{kind}={value} written to param group {gi} while "
                                         f"{kind} is tuned (in log/logit space, where 0 is out "
                                         f"of reach); write a value in "
                                         f"{'(0, 1)' if kind == 'momentum' else '(0, inf)'}")
                    self.tuned[kind].fill_group(gi, value)
                    nominal[kind] = value
            lr = group["lr"]
            if isinstance(lr, Tensor):
                raise TypeError("group['lr'] became a Tensor; HyperOptimizer keeps lr tuned itself "
                                "and takes a float scale in group['lr']")
            scales.append(self._lr_scale(group))
        return scales

    def _hyper_values(self, gi: int, pi: int, group: dict, scale: float,
                      cache: dict) -> dict[str, Any]:
        """The rule's hyperparameters for one parameter. ``cache`` (one per step) hands every
        parameter of a slot the same tensor object, so rules can memoise per step."""
        hyper = {}
        for kind in self.rule.kinds:
            tk = self.tuned.get(kind)
            if tk is None or not tk.is_tuned(gi):
                hyper[kind] = self.rule.read(group, kind)
            else:
                block, index = tk.group_slots[gi][pi]
                p = group["params"][pi]
                key = (kind, block, index, scale if kind == "lr" else 1.0, p.device, p.dtype)
                v = cache.get(key)
                if v is None:
                    v = tk.value(gi, pi)
                    if v.device != p.device or v.dtype != p.dtype:   # multi-device; bf16 models
                        v = v.to(p.device, p.dtype, non_blocking=True)
                    v = cache[key] = v * scale if (kind == "lr" and scale != 1.0) else v
                hyper[kind] = v
        return hyper

    def _trainable(self) -> list[tuple[int, int, Tensor]]:
        out = []
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                if p.grad is not None:
                    if p.grad.is_sparse:
                        raise RuntimeError("HyperOptimizer does not support sparse gradients; use "
                                           "dense gradients (e.g. nn.Embedding(sparse=False))")
                    out.append((gi, pi, p))
        return out

    def _meta_from_val(self, trainable) -> list[MetaGradient]:
        params = [p for _, _, p in trainable]
        with torch.enable_grad():
            loss = self.val_loss()
            if not isinstance(loss, Tensor) or loss.dim() != 0:
                raise TypeError(f"val_loss() must return a scalar tensor, got {loss!r}")
            if not loss.requires_grad:
                raise RuntimeError("val_loss() returned a loss that does not depend on the "
                                   "parameters (no autograd graph); compute it from the model "
                                   "inside the callable, without torch.no_grad() or .detach()")
            try:
                grads = torch.autograd.grad(loss, params, allow_unused=True)
            except RuntimeError as e:
                raise RuntimeError(f"could not differentiate val_loss(): {e}. val_loss must build "
                                   "a fresh graph on each call and must not call backward() "
                                   "itself") from e
        return [MetaGradient(gi, pi, p, g) for (gi, pi, p), g in zip(trainable, grads)]

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None):
        """One base step (and a hyper-step when a window completes). Returns the closure's loss."""
        self._step_calls += 1
        method = self.method
        records = method.records_step(self, self._window % self.update_every)
        curvature = records and method.needs_curvature
        loss = rng = None
        if closure is not None:
            if curvature:
                rng = capture_rng(sorted({p.device for g in self.param_groups
                                          for p in g["params"]}, key=str))
            with torch.enable_grad():
                loss = closure()
        scales = self._sync_group_writes()
        trainable = self._trainable()
        if not trainable:
            return loss
        # decided before anything changes: a missing curvature source raises with nothing done
        source = self._curvature_source(trainable, closure, rng, loss) if curvature else None
        try:
            if self.val_loss is None:
                # E is the training loss at the weights of the last step: its gradient is this
                # step's p.grad, which completes whatever the method has pending.
                added = method.hypergradient(
                    self, [MetaGradient(gi, pi, p, p.grad) for gi, pi, p in trainable])
                self._contributions += added
                if added and self._window >= self.update_every:
                    self._hyper_step()
        except BaseException:
            self._abandon_window()
            raise
        ends_window = self._window + 1 >= self.update_every
        record = self._base_step(trainable, scales, method.tangent_kinds(self, ends_window),
                                 source)
        method.observe(self, record)
        self._steps += 1
        self._window += 1
        if self.val_loss is not None and ends_window:
            try:
                meta = self._meta_from_val(trainable)
                self._contributions += method.hypergradient(self, meta)
            except BaseException:
                # the base step stands (as after a raising closure in torch); this window's
                # hypergradient is dropped and the next window starts clean
                self._abandon_window()
                raise
            self._hyper_step()
        self._settle_versions()
        return loss

    def _abandon_window(self) -> None:
        self._window = self._contributions = 0
        self._tape = []
        for tk in self.tuned.values():
            for acc in tk.accums:
                acc.zero_()
        self._settle_versions()

    def _settle_versions(self) -> None:
        """Once no recorded graph is kept, bump the version counters of the parameters written
        through ``.data`` meanwhile, so stale graphs raise as after a torch.optim step."""
        if self._unversioned and not any(isinstance(st.source, GraphSource) for st in self._tape):
            for group in self.param_groups:
                for p in group["params"]:
                    torch.autograd.graph.increment_version(p)
            self._unversioned = False

    def _curvature_source(self, trainable, closure, rng, loss):
        cfg = self.curvature
        grads = [p.grad for _, _, p in trainable]
        if not isinstance(cfg, FiniteDifferences) and any(g.grad_fn is not None for g in grads):
            for _, _, p in trainable:       # we keep the graph; p.grad keeps the values
                p.grad = p.grad.detach()
            self._unversioned = True
            return GraphSource(grads)
        if cfg == "graph":
            raise CurvatureError(
                "curvature='graph' but p.grad carries no graph on a step the method records; "
                "call loss.backward(create_graph=opt.needs_graph) before opt.step() (or use "
                "curvature='auto' with a closure)")
        if closure is None:
            raise CurvatureError(missing_source_message(self.method.name))
        config = cfg if isinstance(cfg, FiniteDifferences) else FiniteDifferences()
        return ClosureSource(closure, rng, loss, self._step_calls, config)

    def _base_step(self, trainable, scales: list[float], kinds: tuple[str, ...],
                   source=None) -> StepRecord:
        """Run the rule on every parameter with a gradient; write results back in place.

        A NaN or inf anywhere in the gradients skips the whole step without a host sync:
        ``ok`` is a device scalar (1 or 0), the rule sees ``g`` where ok is 1 and zeros where
        it is 0 (one ``torch.where``, never a NaN) and leaves everything as it was for ok=0.
        With a curvature ``source`` the step is recorded on the tape first.  While a recorded
        gradient graph is kept, parameters are written through ``p.data`` (see
        :mod:`hyperopt_wrap.curvature`).
        """
        rule = self.rule
        grads = [p.grad for _, _, p in trainable]
        first = grads[0].device
        norms = torch._foreach_norm(grads)
        finite = torch.stack([n.to(first, non_blocking=True) for n in norms]).isfinite().all()
        self._skipped_steps.add_((~finite).to(self._skipped_steps.device))
        # (device, dtype) -> 0/1 in that dtype, and a 0 of it; device -> the bool
        ok_as: dict = {}
        values: dict[tuple, Tensor] = {}
        options = [rule.options(g) for g in self.param_groups]
        observed = []
        taped = [] if source is not None else None
        for gi, pi, p in trainable:
            key = (p.device, p.dtype)
            ok = ok_as.get(key)
            if ok is None:
                ok = ok_as[key] = finite.to(device=p.device, dtype=p.dtype, non_blocking=True)
                ok_as[key, "zero"] = torch.zeros((), dtype=p.dtype, device=p.device)
            where = ok_as.get(p.device)
            if where is None:
                where = ok_as[p.device] = finite.to(p.device, non_blocking=True)
            work = self._workspace.setdefault(p, {})
            # one pass: g where the step is taken, zeros (never NaN) where it is skipped
            grad = torch.where(where, p.grad, ok_as[key, "zero"], out=scratch(work, "grad", p))
            state = self.state[p]
            if not any(k != _BUFFERS for k in state):
                state.update(rule.init_state(p, options[gi]))
            hyper = self._hyper_values(gi, pi, self.param_groups[gi], scales[gi], values)
            if taped is not None:
                taped.append(self._snapshot(gi, pi, p, grad, state, hyper, options[gi],
                                            scales[gi]))
            target = p.data if self._unversioned else p
            tangents = rule.step_(target, grad, state, hyper, options[gi], kinds, ok, work)
            if tangents is None:
                tangents = self._step_out_of_place(target, grad, state, hyper, options[gi],
                                                   kinds, ok)
            observed.append(ObservedParam(gi, pi, p, tangents))
        if taped is not None:
            self._tape.append(TapedStep(taped, source, finite))
        return StepRecord(observed, scales, finite)

    def _snapshot(self, gi, pi, p, grad, state, hyper, options, scale) -> TapedParam:
        """Copies of what step ``len(tape)`` of the window reads, in buffers reused from window
        to window (a released tape's buffers are free again): no allocation per step."""
        pos = len(self._tape)
        while len(self._tape_buffers) <= pos:
            self._tape_buffers.append({})
        bufs = self._tape_buffers[pos].setdefault(p, {})
        copies = {k: (scratch(bufs, "state." + k, v).copy_(v) if isinstance(v, Tensor) else v)
                  for k, v in state.items() if k != _BUFFERS}
        return TapedParam(gi, pi, p, scratch(bufs, "weights", p).copy_(p), copies,
                          scratch(bufs, "grad", p).copy_(grad), hyper, options, scale)

    def _step_out_of_place(self, p, grad, state, hyper, options, kinds, ok) -> dict[str, Tensor]:
        """For rules without ``step_``: run ``update_with_tangents`` and write the results back
        with ``old.lerp_(new, ok)``, bit-exactly ``new`` for ok=1 and ``old`` for ok=0 (the
        rule saw a zero gradient, so its outputs are finite)."""
        base_state = {k: v for k, v in state.items() if k != _BUFFERS}
        new_p, new_state, tangents = self.rule.update_with_tangents(p, grad, base_state, hyper,
                                                                    options, kinds)
        p.lerp_(new_p, ok)
        for name, value in new_state.items():
            old = state.get(name)
            if old is None:
                state[name] = value * ok
            else:
                old.lerp_(value, ok if old.dtype == ok.dtype else ok.to(old.dtype))
        return tangents

    def _hyper_step(self) -> None:
        """Average the window's hypergradient, hand it to the hyper-optimizer, clamp, write back.

        A non-finite hypergradient (or a window that used a skipped step) leaves the raw values,
        the natural values and the hyper-optimizer's state untouched, decided on the device.
        With every hyper learning rate at 0 nothing moves (the hypergradient is still kept).
        """
        n = max(self._contributions, 1)
        self._window = self._contributions = 0
        self._hypersteps += 1
        lasts = []
        for tk in self.tuned.values():
            for i, acc in enumerate(tk.accums):
                if n != 1:
                    acc.div_(n)
                tk.accums[i], tk.last[i] = tk.last[i].zero_(), acc   # swap: no copy
                lasts.append(acc)
        norms = torch._foreach_norm(lasts)
        device = self._window_finite.device
        finite = torch.stack([x.to(device, non_blocking=True) for x in norms]).isfinite().all()
        finite &= self._window_finite
        self._window_finite.fill_(True)
        self._skipped_hypersteps.add_(~finite)
        hyper_opt = self.hyper_optimizer
        if all(isinstance(g["lr"], (int, float)) and g["lr"] == 0 for g in hyper_opt.param_groups):
            return
        raws = [raw for tk in self.tuned.values() for raw in tk.raws]
        for tk in self.tuned.values():
            d = tk.parametrisation.dvalue_draw
            for raw, value, last in zip(tk.raws, tk.values, tk.last):
                raw.grad = last * d(value)
        if getattr(hyper_opt, "defaults", {}).get("fused"):
            # torch's fused kernels skip the whole update on the device when found_inf is set
            found_inf = (~finite).to(torch.float32)
            if not _fused_adam_step(hyper_opt, found_inf):
                hyper_opt.found_inf = found_inf
                hyper_opt.step()
                del hyper_opt.found_inf
        else:   # any other torch optimizer: snapshot and select on the device
            raws_before = [raw.clone() for raw in raws]
            for raw in raws:
                raw.grad = torch.where(finite.to(raw.device), raw.grad, 0.0)
            saved = [(t, t.clone()) for st in hyper_opt.state.values() for t in st.values()
                     if isinstance(t, Tensor) and t.device == device]
            hyper_opt.step()
            for t, old in saved:
                torch.where(finite, t, old, out=t)
            for raw, old in zip(raws, raws_before):
                torch.where(finite.to(raw.device), raw, old, out=raw)
        ok_as: dict[tuple, Tensor] = {}
        for tk in self.tuned.values():
            lo, hi = tk.raw_bounds
            for raw, value in zip(tk.raws, tk.values):
                raw.clamp_(lo, hi)
                raw.grad = None
                key = (value.device, value.dtype)
                if key not in ok_as:
                    ok_as[key] = finite.to(device=value.device, dtype=value.dtype)
                # lerp with a 0/1 weight is an exact select: a skipped hyper-step leaves the
                # natural values bit-exact
                value.lerp_(tk.parametrisation.to_value(raw), ok_as[key])

    # ------------------------------------------------------------------ save / resume
    def _fingerprint(self) -> dict[str, Any]:
        return {"optimizer": f"{self.optimizer_cls.__module__}.{self.optimizer_cls.__qualname__}",
                "method": type(self.method).__name__,
                "tune": list(self.tuned_kinds),
                "granularity": dict(self._granularity),
                "params_per_group": [len(g["params"]) for g in self.param_groups]}

    def state_dict(self) -> dict[str, Any]:
        self._sync_group_writes()
        sd = super().state_dict()
        sd["hyper"] = {
            "config": self._fingerprint(),
            "values": {k: [v.clone() for v in tk.values] for k, tk in self.tuned.items()},
            "raws": {k: [r.clone() for r in tk.raws] for k, tk in self.tuned.items()},
            "accums": {k: [a.clone() for a in tk.accums] for k, tk in self.tuned.items()},
            "last": {k: [a.clone() for a in tk.last] for k, tk in self.tuned.items()},
            "hyper_optimizer": self.hyper_optimizer.state_dict(),
            "method": self.method.state_dict(),
            "counters": {"window": self._window, "contributions": self._contributions,
                         "steps": self._steps,
                         "hypersteps": self._hypersteps},
            "skipped": [self._skipped_hypersteps.clone(), self._skipped_steps.clone(),
                        self._window_finite.clone()],
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "hyper" not in state_dict:
            raise ValueError("this state_dict was not saved by HyperOptimizer (no 'hyper' entry); "
                             "load a state_dict from HyperOptimizer.state_dict(), or load a "
                             "torch.optim state_dict into the torch optimizer it came from")
        hyper = state_dict["hyper"]
        mine, theirs = self._fingerprint(), hyper["config"]
        if mine != theirs:
            diff = {k: (theirs.get(k), mine[k]) for k in mine if theirs.get(k) != mine[k]}
            raise ValueError(
                "state_dict comes from a different HyperOptimizer configuration "
                + "; ".join(f"{k}: saved {a!r}, this one {b!r}" for k, (a, b) in diff.items())
                + ". Construct the HyperOptimizer with the saved configuration before loading")
        for k, tk in self.tuned.items():
            shapes = [tuple(v.shape) for v in tk.values]
            if [tuple(v.shape) for v in hyper["values"][k]] != shapes:
                raise ValueError(f"state_dict's {k} values have shapes that do not match this "
                                 "model's parameters; load it into the same model architecture")
        rest = {k: v for k, v in state_dict.items() if k != "hyper"}
        super().load_state_dict(rest)
        for group in self.param_groups:     # our step counters live on the param's device
            for p in group["params"]:
                st = self.state.get(p)
                if st and isinstance(st.get("step"), Tensor) and st["step"].device != p.device:
                    st["step"] = st["step"].to(p.device)
        with torch.no_grad():
            for k, tk in self.tuned.items():
                for name in ("values", "raws", "accums"):
                    for dst, src in zip(getattr(tk, name), hyper[name][k]):
                        dst.copy_(src)
                for dst, src in zip(tk.last, hyper["last"][k]):
                    dst.copy_(src)
        self.hyper_optimizer.load_state_dict(hyper["hyper_optimizer"])
        self.method.load_state_dict(hyper["method"])
        c = hyper["counters"]
        self._window, self._contributions = c["window"], c["contributions"]
        self._steps, self._hypersteps = c["steps"], c["hypersteps"]
        if self._records_steps():
            # recorded steps (graphs, closures) are not saved: the interrupted window restarts
            self._abandon_window()
        self._skipped_hypersteps.copy_(hyper["skipped"][0])
        self._skipped_steps.copy_(hyper["skipped"][1])
        self._window_finite.copy_(hyper["skipped"][2])

    def __getstate__(self) -> dict[str, Any]:
        # torch.optim.Optimizer pickles only defaults/state/param_groups; we need everything but
        # its hook dictionaries, which torch drops too (its __setstate__ recreates them)
        state = {k: v for k, v in self.__dict__.items() if not k.startswith("_optimizer_")}
        if state.get("_tape"):
            # recorded steps hold graphs and closures, which cannot be copied: the copy
            # restarts the current window
            # (a second-order method's accumulators are empty between steps)
            state.update(_tape=[], _window=0, _contributions=0)
        state["_tape_buffers"] = []     # scratch, recreated on demand
        return state

    def _records_steps(self) -> bool:
        return type(self.method).records_step is not HypergradientMethod.records_step

    def __repr__(self) -> str:
        return (f"HyperOptimizer({self.optimizer_cls.__name__}, method={self.method!r}, "
                f"tune={self.tuned_kinds}, granularity={self._granularity}, "
                f"update_every={self.update_every})")


def _fused_adam_step(opt: torch.optim.Optimizer, found_inf: Tensor) -> bool:
    """``opt.step()`` for a fused torch Adam/AdamW over a few tiny tensors, without the ~0.1 ms
    of Python bookkeeping ``step()`` spends per call; the same kernels, state and found_inf
    semantics.  Returns False (and does nothing) when it cannot: an uninitialised state, a
    tensor lr, or a torch without the kernels; the caller then uses ``opt.step()``."""
    if type(opt) not in (torch.optim.Adam, torch.optim.AdamW) or not hasattr(torch, "_fused_adam_"):
        return False
    calls = []
    for group in opt.param_groups:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            continue
        states = [opt.state.get(p) for p in params]
        if (any(not s for s in states) or isinstance(group["lr"], Tensor)
                or any(p.device != found_inf.device for p in params)):
            return False
        calls.append((group, params, states))
    for group, params, states in calls:
        steps = [s["step"] for s in states]
        decoupled = group.get("decoupled_weight_decay", isinstance(opt, torch.optim.AdamW))
        kernel = torch._fused_adamw_ if decoupled else torch._fused_adam_
        torch._foreach_add_(steps, 1)
        kernel(params, [p.grad for p in params], [s["exp_avg"] for s in states],
               [s["exp_avg_sq"] for s in states],
               [s["max_exp_avg_sq"] for s in states] if group["amsgrad"] else [], steps,
               amsgrad=group["amsgrad"], lr=group["lr"], beta1=group["betas"][0],
               beta2=group["betas"][1], weight_decay=group["weight_decay"], eps=group["eps"],
               maximize=group["maximize"], grad_scale=None, found_inf=found_inf)
        torch._foreach_sub_(steps, [found_inf] * len(steps))
    return True


def _scale(entry, scale: float):
    if scale == 1.0:
        return entry
    if isinstance(entry, list):
        return [e * scale for e in entry]
    return entry * scale

