"""Hyperparameter control: tuned values, raw values, accumulators, the hyper-optimizer, skips.

The controller owns everything that moves the hyperparameters and nothing that steps the
weights.  Methods add natural-unit hypergradients into its accumulators (through the method
context); every ``update_every`` contributions the face calls :meth:`Controller.hyper_step`,
which averages them, converts them to raw units (``dE/dr = dE/dlam * dlam/dr``), hands them to
the hyper-optimizer and writes the clamped values back, skipping the whole hyper-step on the
device (no host synchronisation) when the hypergradient is not finite.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .checkpoint import CheckpointError, check_tensor, require
from .counter import Count
from .rules._foreach import is_compiling
from .rules.base import FUSED_DEVICES
from .hierarchical import SHARED_LEVEL, Hierarchical
from .normalized_momentum import NormalizedMomentum
from .hyperparams import TunedKind



class Controller:
    """Tuned kinds, the hyper-optimizer and the skip counters of one HyperOptimizer."""

    def __init__(self, tuned: dict[str, TunedKind], hyper_lr, hyper_optimizer: type,
                 hyper_optimizer_kwargs: dict | None, device: torch.device):
        self.tuned = tuned
        self.hyper_lr = hyper_lr
        for kind in tuned:
            self.kind_hyper_lr(kind)        # validated before anything is built
        self.hyper_optimizer_cls = hyper_optimizer
        self.hyper_kwargs = dict(hyper_optimizer_kwargs or {})
        if hyper_optimizer in (torch.optim.Adam, torch.optim.AdamW) and not (
                {"fused", "foreach", "capturable", "differentiable"} & set(self.hyper_kwargs)) \
                and device.type in FUSED_DEVICES:
            # One kernel per hyper-step, its step counter on the device, and a found_inf input
            # that skips a non-finite hyper-step without a host sync.
            self.hyper_kwargs["fused"] = True
        self.hyper_optimizer: torch.optim.Optimizer | None = None
        self.skipped_hypersteps = torch.zeros((), dtype=torch.int64, device=device)
        self.skipped_steps = torch.zeros((), dtype=torch.int64, device=device)
        # skipped steps since the last hyper-step, each of which multiplies the tuned lr by
        # ``backoff`` there (as GradScaler backs off its scale): a run recovers from a blow-up
        self.backoff: float | None = 0.5
        self.window_skips = torch.zeros((), dtype=torch.float32, device=device)   # (a count)
        self.window_finite = torch.ones((), dtype=torch.bool, device=device)
        # recovery="restore": steps skipped for a non-finite gradient since the last look
        self.period_skips = torch.zeros((), dtype=torch.int64, device=device)
        self.period_clean = torch.ones((), dtype=torch.bool, device=device)   # (the one before)
        # recovery="restore": the lr backs off for at most this many of them (the weights stand
        # still while every step is skipped; the return to the copy, not the lr, ends it)
        self.backoff_cap: int | None = None
        # recovery="restore": per lr block, the raw lr's ceiling since the last return to the
        # copy (None: no return yet); lowered at each return, saved with the run
        self.lr_ceilings: list[Tensor] | None = None
        self.contributions = 0      # hypergradient contributions in the accumulators
        self.hypersteps = Count(device=device)
        # torch.distributed: reduces the window's hypergradient across ranks at each hyper-step
        # (a :class:`~hyperopt_wrap.distributed.Reduction`; None in one process)
        self.reduction = None
        self._ones: dict = {}
        self._plan = None            # memoised direct call of the fused hyper-optimizer
        self._plan_groups = 0

    # ------------------------------------------------------------------ set-up
    def kind_hyper_lr(self, kind: str) -> float:
        lr = self.hyper_lr[kind] if isinstance(self.hyper_lr, dict) else self.hyper_lr
        if not (isinstance(lr, (int, float)) and not isinstance(lr, bool) and lr >= 0
                and math.isfinite(lr)):
            raise ValueError(f"hyper_lr must be a finite number >= 0 (or a dict per kind), "
                             f"got {lr!r}")
        return float(lr)

    def raw_groups(self) -> list[dict]:
        groups = [{"params": [], "lr": self.kind_hyper_lr(k), "kind": k} for k in self.tuned]
        if issubclass(self.hyper_optimizer_cls, Hierarchical):
            for g in groups:     # a kind tuned globally or per group: every entry its own level
                granularity = self.tuned[g["kind"]].granularity
                if granularity not in SHARED_LEVEL:
                    g["spread"] = None
                elif "spread" not in self.hyper_kwargs:
                    g["spread"] = SHARED_LEVEL[granularity]
        return groups

    def build(self, raw_groups: list[dict]) -> None:
        try:
            self.hyper_optimizer = self.hyper_optimizer_cls(raw_groups, **self.hyper_kwargs)
        except (TypeError, ValueError) as e:
            raise type(e)(f"could not build hyper_optimizer {self.hyper_optimizer_cls!r}: "
                          f"{e}") from e

    def add_raw_groups(self, raw_groups: list[dict]) -> None:
        hyper = self.hyper_optimizer
        for rg in raw_groups:
            if not rg["params"]:
                continue
            if isinstance(hyper, Hierarchical):    # a kind has one level: its group grows
                index = next((i for i, g in enumerate(hyper.param_groups)
                              if g.get("kind") == rg["kind"]), None)
                if index is not None:
                    hyper.extend_group(index, rg["params"])
                    continue
            hyper.add_param_group(rg)
        self._plan = None

    def fill_group(self, kind: str, group_index: int, value: float) -> None:
        """A user wrote ``kind`` of a param group: every slot of it takes ``value``; under
        Hierarchical the written entries are rebased onto the level (kept, not clamped back)."""
        tk, hyper = self.tuned[kind], self.hyper_optimizer
        slots = set(tk.group_slots[group_index] or ())
        levels = {b: hyper.level_of(tk.raws[b]) for b, _ in slots} \
            if isinstance(hyper, Hierarchical) else {}
        tk.fill_group(group_index, value)
        for block, index in slots:
            if block in levels:
                hyper.rebase(tk.raws[block], index, levels[block])

    # ------------------------------------------------------------------ the window
    def mark_window(self, finite: Tensor) -> None:
        """The window's hypergradient used a step whose gradient was ``finite`` (a device bool);
        a non-finite one makes the coming hyper-step skip."""
        if finite.device != self.window_finite.device:
            finite = finite.to(self.window_finite.device)
        self.window_finite &= finite

    def count_step(self, taken: Tensor, backoff: bool = True,
                   finite: Tensor | None = None) -> None:
        """Count a skipped base step; with ``backoff`` (the gradient itself was not finite, not
        an AMP loss-scale overflow) the tuned lr backs off at the coming hyper-step.  A step
        with a finite gradient that was not ``taken`` (``finite`` given: rollback's blow-up
        test rejected it) backs off in either case."""
        dev = self.skipped_steps.device
        skipped = ~taken.to(dev)
        looks = not is_compiling()            # (a compiled step never looks back)
        self.skipped_steps.add_(skipped)
        if backoff and looks:
            self.period_skips.add_(skipped)
        if self.backoff is not None:
            if backoff:
                if self.backoff_cap is not None and looks:
                    skipped = skipped & (self.period_skips <= self.backoff_cap)
                self.window_skips.add_(skipped)
            elif finite is not None:
                self.window_skips.add_(finite.to(dev) & skipped)

    def lower_lr_ceiling(self, headroom: float) -> None:
        """After a return to the copy: the tuned lr may from now on rise to at most
        ``exp(headroom)`` times its value now (raw units: ``log lr + headroom``), per entry;
        an earlier, lower ceiling stays."""
        tk = self.tuned.get("lr")
        if tk is None:
            return
        old = self.lr_ceilings or []
        self.lr_ceilings = [raw.detach() + headroom if i >= len(old) or old[i] is None
                            else torch.minimum(old[i], raw.detach() + headroom)
                            for i, raw in enumerate(tk.raws)]

    def abandon_window(self) -> None:
        self.contributions = 0
        for tk in self.tuned.values():
            for acc in tk.accums:
                acc.zero_()

    def hyper_step(self) -> None:
        """Average the window's hypergradient, hand it to the hyper-optimizer, clamp, write back.

        A non-finite hypergradient (or a window that used a skipped step) leaves the raw values,
        the natural values and the hyper-optimizer's state untouched, decided on the device.
        With every hyper learning rate at 0 nothing moves (the hypergradient is still kept).
        About a dozen small tensor operations, however many slots there are.
        """
        n = max(self.contributions, 1)
        self.contributions = 0
        self.hypersteps += 1
        if self.reduction is not None:      # one collective: every rank gets the same blocks
            self.reduction.reduce_window(self)
        lasts = []
        for tk in self.tuned.values():
            for i, acc in enumerate(tk.accums):
                if n != 1:
                    acc.div_(n)
                tk.accums[i], tk.last[i] = tk.last[i].zero_(), acc   # swap: no copy
                lasts.append(acc)
        # found_inf (torch's convention, 1.0 = skip): the window's flag, then GradScaler's
        # one-pass check over every hypergradient block (it multiplies them by 1)
        found_inf = (~self.window_finite).to(torch.float32)
        for dtype in {t.dtype for t in lasts}:
            torch._amp_foreach_non_finite_check_and_unscale_(
                [t for t in lasts if t.dtype == dtype], found_inf, self._one(found_inf.device))
        self.window_finite.fill_(True)
        self.skipped_hypersteps.add_(found_inf > 0)
        hyper_opt = self.hyper_optimizer
        if all(isinstance(g["lr"], (int, float)) and g["lr"] == 0 for g in hyper_opt.param_groups):
            self.window_skips.zero_()
            return
        ok = 1 - found_inf
        plan = self._fused_plan()
        if plan is not None:
            # torch's fused kernel, called directly with the raw-unit gradients (no .grad
            # round trip); it skips the whole update on the device when found_inf is set
            _fused_adam_step(plan, found_inf, ok)
        elif isinstance(hyper_opt, NormalizedMomentum):     # skips on the device itself
            self._set_raw_grads()
            hyper_opt.step(found_inf=found_inf, eps_scale={
                raw: tk.parametrisation.dvalue_draw(value)
                for tk in self.tuned.values() for raw, value in zip(tk.raws, tk.values)})
        elif getattr(hyper_opt, "defaults", {}).get("fused"):
            self._set_raw_grads()
            hyper_opt.found_inf = found_inf
            hyper_opt.step()
            del hyper_opt.found_inf
        else:   # any other torch optimizer: snapshot and select on the device
            raws = self._set_raw_grads()
            finite = found_inf == 0
            raws_before = [raw.clone() for raw in raws]
            for raw in raws:
                raw.grad = torch.where(finite.to(raw.device), raw.grad, 0.0)
            saved = [(t, t.clone()) for st in hyper_opt.state.values() for t in st.values()
                     if isinstance(t, Tensor) and t.device == finite.device]
            hyper_opt.step()
            for t, old in saved:
                torch.where(finite, t, old, out=t)
            for raw, old in zip(raws, raws_before):
                torch.where(finite.to(raw.device), raw, old, out=raw)
        backoff = self.backoff is not None and "lr" in self.tuned \
            and self.kind_hyper_lr("lr") > 0
        if backoff:
            # lr *= backoff ** skips (raw units: a shift), written back also when the
            # hyper-step itself was skipped
            skips = self.window_skips
            shift = math.log(self.backoff)
            taken = torch.maximum(ok, skips.clamp(max=1.0))
        for tk in self.tuned.values():
            lo, hi = tk.raw_bounds
            lr_backoff = backoff and tk.kind == "lr"
            w = taken if lr_backoff else ok
            ok_as: dict[tuple, Tensor] = {(w.device, w.dtype): w}
            ceilings = self.lr_ceilings if tk.kind == "lr" else None
            for i, (raw, value) in enumerate(zip(tk.raws, tk.values)):
                if lr_backoff:
                    raw.add_(skips if skips.device == raw.device else skips.to(raw.device),
                             alpha=shift)
                raw.clamp_(lo, hi)
                if ceilings is not None and i < len(ceilings):   # (a block added since: none)
                    torch.minimum(raw, ceilings[i], out=raw)
                raw.grad = None
                key = (value.device, value.dtype)
                if key not in ok_as:
                    ok_as[key] = w.to(device=value.device, dtype=value.dtype)
                # lerp with a 0/1 weight is an exact select: a skipped hyper-step leaves the
                # natural values bit-exact
                value.lerp_(tk.parametrisation.to_value(raw), ok_as[key])
        self.window_skips.zero_()

    def _set_raw_grads(self) -> list[Tensor]:
        """``raw.grad = dE/draw = dE/dvalue * dvalue/draw`` for every raw block."""
        raws = []
        for tk in self.tuned.values():
            d = tk.parametrisation.dvalue_draw
            for raw, value, last in zip(tk.raws, tk.values, tk.last):
                raw.grad = last * d(value)
                raws.append(raw)
        return raws

    def _fused_plan(self):
        """What a direct call of torch's fused Adam kernel needs, per hyper-optimizer group:
        the raw blocks, their state tensors and where their hypergradients live (memoised;
        None until the hyper-optimizer has state, or where the kernel does not apply)."""
        opt = self.hyper_optimizer
        if self._plan is not None and self._plan_groups == len(opt.param_groups) and all(
                opt.state.get(p) is st for _, params, _, states, _ in self._plan
                for p, st in zip(params, states)):     # (a load replaces the state dicts)
            return self._plan
        if not (type(opt) in (torch.optim.Adam, torch.optim.AdamW) and opt.defaults.get("fused")
                and hasattr(torch, "_fused_adam_")):
            return None
        where = {id(raw): (tk, i) for tk in self.tuned.values() for i, raw in enumerate(tk.raws)}
        plan = []
        for group in opt.param_groups:
            params = group["params"]
            if not params:
                continue
            states = [opt.state.get(p) for p in params]
            if any(not st for st in states) and is_compiling():
                states = _fused_adam_state(opt, group)   # (its first step() cannot be traced)
            if any(not st for st in states) or any(p.device != params[0].device for p in params):
                return None
            decoupled = group.get("decoupled_weight_decay", type(opt) is torch.optim.AdamW)
            plan.append((group, params, [where[id(p)] for p in params], states,
                         torch._fused_adamw_ if decoupled else torch._fused_adam_))
        self._plan, self._plan_groups = plan, len(opt.param_groups)
        return plan

    def _one(self, device) -> Tensor:
        one = self._ones.get(device)
        if one is None:
            one = self._ones[device] = torch.ones((), dtype=torch.float32, device=device)
        return one

    # ------------------------------------------------------------------ save / resume
    def state_dict(self) -> dict[str, Any]:
        return {
            "values": {k: [v.clone() for v in tk.values] for k, tk in self.tuned.items()},
            "raws": {k: [r.clone() for r in tk.raws] for k, tk in self.tuned.items()},
            "accums": {k: [a.clone() for a in tk.accums] for k, tk in self.tuned.items()},
            "last": {k: [a.clone() for a in tk.last] for k, tk in self.tuned.items()},
            "hyper_optimizer": self.hyper_optimizer.state_dict(),
            "counters": {"contributions": self.contributions, "hypersteps": int(self.hypersteps)},
            "skipped": [self.skipped_hypersteps.clone(), self.skipped_steps.clone(),
                        self.window_finite.clone(), self.window_skips.clone()],
            "lr_ceilings": None if self.lr_ceilings is None else
            [c.clone() for c in self.lr_ceilings],    # (blocks added since a return: none)
        }

    def check_loadable(self, saved: dict[str, Any]) -> None:
        """Raise (changing nothing) unless ``saved`` fits this controller: every entry, the
        tuned blocks' shapes, finite tuned values, and a hyper-optimizer state whose tensors
        are shaped like the raw blocks they belong to (torch's fused kernel trusts them)."""
        require(saved, ("values", "raws", "accums", "last", "hyper_optimizer", "counters",
                        "skipped"), "hyper['controller']")
        for name in ("values", "raws", "accums", "last"):
            require(saved[name], self.tuned, f"hyper['controller'][{name!r}]")
            for k, tk in self.tuned.items():
                blocks, mine = saved[name][k], getattr(tk, name)
                where = f"hyper['controller'][{name!r}][{k!r}]"
                if not isinstance(blocks, (list, tuple)) or len(blocks) != len(mine):
                    raise CheckpointError(
                        f"{where} must be a list of {len(mine)} tensors (one per tuned block), "
                        f"got {type(blocks).__name__}"
                        f"{f' of {len(blocks)}' if isinstance(blocks, (list, tuple)) else ''}; "
                        "the checkpoint comes from another configuration or model")
                for i, (src, dst) in enumerate(zip(blocks, mine)):
                    check_tensor(src, f"{where}[{i}]", dst.shape)
                    if name in ("values", "raws") and not bool(torch.isfinite(src).all()):
                        raise CheckpointError(f"{where}[{i}] holds NaN or inf; the checkpoint's "
                                              f"{k} is corrupt (load an earlier one)")
                    if name == "values" and not bool(
                            ((src > 0) & (src < 1) if k == "momentum" else src > 0).all()):
                        raise CheckpointError(f"{where}[{i}] holds a {k} outside "
                                              f"{'(0, 1)' if k == 'momentum' else '(0, inf)'}, "
                                              "where it cannot be tuned; the checkpoint is corrupt")
        self._check_hyper_optimizer_state(saved["hyper_optimizer"])
        c = saved["counters"]
        require(c, ("contributions", "hypersteps"), "hyper['controller']['counters']")
        if not all(isinstance(c[k], int) and c[k] >= 0 for k in ("contributions", "hypersteps")):
            raise CheckpointError(f"hyper['controller']['counters'] must hold counts >= 0, got {c}")
        skipped = saved["skipped"]
        if not (isinstance(skipped, (list, tuple)) and len(skipped) in (3, 4)
                and all(isinstance(t, Tensor) and t.numel() == 1 and t.device.type != "meta"
                        for t in skipped)):
            raise CheckpointError("hyper['controller']['skipped'] must be 1-element tensors "
                                  "(skipped hyper-steps, skipped steps, window flag, skips in "
                                  "the window)")
        ceilings = saved.get("lr_ceilings")
        if ceilings is not None:
            raws = self.tuned["lr"].raws if "lr" in self.tuned else []
            if not (isinstance(ceilings, (list, tuple)) and len(ceilings) <= len(raws) and all(
                    isinstance(c, Tensor) and c.shape == r.shape and c.device.type != "meta"
                    and bool(torch.isfinite(c).all()) for c, r in zip(ceilings, raws))):
                raise CheckpointError("hyper['controller']['lr_ceilings'] must be None or at "
                                      "most one finite tensor per tuned lr block, shaped like "
                                      "it; load the checkpoint into the same model and tune=")

    def _check_hyper_optimizer_state(self, saved: Any) -> None:
        where = "hyper['controller']['hyper_optimizer']"
        require(saved, ("state", "param_groups"), where)
        groups = self.hyper_optimizer.param_groups
        theirs = saved["param_groups"]
        if not isinstance(theirs, (list, tuple)) or len(theirs) != len(groups) or any(
                not isinstance(t, dict) or len(t.get("params", ())) != len(g["params"])
                for t, g in zip(theirs, groups)):
            raise CheckpointError(f"{where} has other parameter groups than this optimizer's "
                                  "hyper-optimizer; the checkpoint comes from another "
                                  "configuration")
        signature = ("betas", "normalize", "momentum", "dampening", "spread")
        if any((k in t) != (k in g) for t, g in zip(theirs, groups) for k in signature):
            raise CheckpointError(
                f"{where} was saved by another hyper-optimizer class than this optimizer's "
                f"{type(self.hyper_optimizer).__name__} (checkpoints of hyperopt_wrap 0.1 and "
                "0.2 used torch.optim.Adam, the default then); construct the HyperOptimizer "
                "with hyper_optimizer=torch.optim.Adam (or the class it was saved with) to "
                "resume it")
        ids = {pid: raw for t, g in zip(theirs, groups) for pid, raw in zip(t["params"],
                                                                             g["params"])}
        if not isinstance(saved["state"], dict):
            raise CheckpointError(f"{where}['state'] must be a dict")
        for pid, st in saved["state"].items():
            if pid not in ids or not isinstance(st, dict):
                raise CheckpointError(f"{where}['state'] has an entry {pid!r} for no raw block")
            raw = ids[pid]
            for name, value in st.items():
                here = f"{where}['state'][{pid!r}][{name!r}]"
                if not isinstance(value, Tensor):
                    continue
                if value.dim() == 0 or name == "step":
                    check_tensor(value, here, floating=False)
                    if value.numel() != 1:
                        raise CheckpointError(f"{here} must hold one number")
                else:
                    check_tensor(value, here, raw.shape)

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        with torch.no_grad():
            for k, tk in self.tuned.items():
                for name in ("values", "raws", "accums", "last"):
                    for dst, src in zip(getattr(tk, name), saved[name][k]):
                        dst.copy_(src)
        self.hyper_optimizer.load_state_dict(saved["hyper_optimizer"])
        self._plan = None       # the loaded state tensors are new
        for tk in self.tuned.values():
            # default bounds widen to contain a loaded value, as they do an initial one (a
            # momentum of 0.995 saved under 0.5's bound 0.9999 is not clamped to 0.99)
            if not tk.given and tk.values:
                loaded = torch.cat([v.detach().reshape(-1).double().cpu() for v in tk.values])
                lo, hi = tk.bounds
                wider = (min(lo, float(loaded.min())), max(hi, float(loaded.max())))
                if wider != (lo, hi):
                    tk._set_bounds(wider)
        c = saved["counters"]
        self.contributions = c["contributions"]
        self.hypersteps = Count(c["hypersteps"], self.skipped_steps.device)
        self.skipped_hypersteps.copy_(saved["skipped"][0])
        self.skipped_steps.copy_(saved["skipped"][1])
        self.window_finite.copy_(saved["skipped"][2])
        if len(saved["skipped"]) > 3:
            self.window_skips.copy_(saved["skipped"][3])
        else:
            self.window_skips.zero_()
        ceilings = saved.get("lr_ceilings")     # (since 0.6.3)
        self.lr_ceilings = None if not ceilings else [
            c.to(raw.device, raw.dtype, copy=True) for c, raw in zip(ceilings, self.tuned["lr"].raws)]


def _fused_adam_step(plan, found_inf: Tensor, ok: Tensor) -> None:
    """``opt.step()`` of a fused torch Adam/AdamW over a few tiny tensors, without the Python
    bookkeeping of ``step()``: the same kernel and state, the gradients passed in directly, and
    found_inf's semantics (a skipped step leaves everything, its step counter included, as it
    was: the counters advance by ``1 - found_inf`` before the kernel reads them)."""
    for group, params, slots, states, kernel in plan:
        grads = []
        for tk, i in slots:
            grads.append(tk.last[i] * tk.parametrisation.dvalue_draw(tk.values[i]))
        steps = [s["step"] for s in states]
        torch._foreach_add_(steps, [ok if ok.device == t.device else ok.to(t.device)
                                    for t in steps])
        if is_compiling():      # (torch.compile cannot trace the fused kernel)
            kernel = _traceable_adam if kernel is torch._fused_adam_ else _traceable_adamw
        kernel(params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
               [s["max_exp_avg_sq"] for s in states] if group["amsgrad"] else [], steps,
               amsgrad=group["amsgrad"], lr=group["lr"], beta1=group["betas"][0],
               beta2=group["betas"][1], weight_decay=group["weight_decay"], eps=group["eps"],
               maximize=group["maximize"], grad_scale=None, found_inf=found_inf)


def _fused_adam_state(opt: torch.optim.Optimizer, group: dict) -> list[dict]:
    """The state a fused torch Adam/AdamW creates on its first step, for the group's
    parameters that have none yet (as ``Adam._init_group``: a float32 step counter on the
    parameter's device, zero moments); returns the group's state dicts."""
    for p in group["params"]:
        if not opt.state.get(p):
            zeros = lambda: torch.zeros_like(p, memory_format=torch.preserve_format)
            st = {"step": torch.zeros((), dtype=torch.float32, device=p.device),
                  "exp_avg": zeros(), "exp_avg_sq": zeros()}
            if group["amsgrad"]:
                st["max_exp_avg_sq"] = zeros()
            opt.state[p] = st
    return [opt.state[p] for p in group["params"]]


def _traceable_adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, *,
                    amsgrad: bool, lr: float, beta1: float, beta2: float, weight_decay: float,
                    eps: float, maximize: bool, grad_scale, found_inf: Tensor,
                    decoupled: bool = False) -> None:
    """``torch._fused_adam_`` (``decoupled``: ``_fused_adamw_``) in ordinary tensor ops, for
    torch.compile, which cannot trace the fused kernel: the same update on the counters the
    caller advanced, and where ``found_inf`` is set nothing changes (a select, exact even for
    a non-finite gradient).  The hyper-optimizer's blocks are few and small: one pass each."""
    skip = found_inf > 0
    for i, (p, g, m, v, t) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, steps)):
        g = -g if maximize else g
        w = p
        if weight_decay != 0:
            if decoupled:
                w = p * (1 - lr * weight_decay)
            else:
                g = g + weight_decay * p
        t = t.to(torch.float64)
        bias_correction1 = 1 - beta1 ** t
        bias_correction2_sqrt = (1 - beta2 ** t).sqrt()
        new_m = torch.lerp(m, g, 1 - beta1)
        new_v = v * beta2 + (1 - beta2) * g * g
        second = new_v
        if amsgrad:
            second = torch.maximum(max_exp_avg_sqs[i], new_v)
            max_exp_avg_sqs[i].copy_(torch.where(skip, max_exp_avg_sqs[i], second))
        denom = (second.sqrt() / bias_correction2_sqrt.to(p.dtype)) + eps
        new_p = w - (lr / bias_correction1).to(p.dtype) * new_m / denom
        p.copy_(torch.where(skip, p, new_p))
        m.copy_(torch.where(skip, m, new_m))
        v.copy_(torch.where(skip, v, new_v))


def _traceable_adamw(*args, **kwargs) -> None:
    _traceable_adam(*args, **kwargs, decoupled=True)
