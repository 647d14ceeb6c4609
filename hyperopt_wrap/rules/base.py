"""The update-rule protocol.

A rule is one step of a base optimizer written as a pure function of tensors,

    new_param, new_state = rule.update(param, grad, state, hyper, options)

elementwise in ``(param, grad, state)``.  The same code runs in two ways:

* under ``torch.no_grad()`` for the real step, when the rule has no in-place
  :meth:`UpdateRule.step_` (the optimizer copies the result into the parameter
  and its state);
* with forward- or reverse-mode autograd, which gives the derivatives the
  hypergradient methods need: ``B = dPhi/dlam`` (tangents with respect to the
  hyperparameters) and ``A = dPhi/dx``; ``reference.py`` unrolls it.

Built-in rules also implement ``step_``: the real step in place (no allocation
per step, like torch.optim), with closed-form tangents; the tests check it
against ``update`` and against forward mode through ``update`` in float64.

``hyper`` maps a kind ("lr", "momentum", "weight_decay") to a Python float
(constant) or a tensor (tuned; 0-dim or shaped like ``param``).  A rule must
not branch on the *value* of a tensor (that would synchronise CUDA); branching
on ``isinstance(value, Tensor)`` is fine.  ``state`` uses torch.optim's own
names (``momentum_buffer``, ``exp_avg``, ``step`` ...), so ``state_dict()``
looks like the wrapped optimizer's.
"""
from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from ._foreach import is_compiling

try:
    from torch.optim.optimizer import _get_scalar_dtype
except ImportError:     # private in torch; the same rule as torch's for non-fused optimizers
    def _get_scalar_dtype() -> torch.dtype:
        return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32

Hyper = dict[str, "float | Tensor"]
State = dict[str, Tensor]

KINDS = ("lr", "momentum", "weight_decay")


def is_zero(value: float | Tensor) -> bool:
    """True for a constant 0; a tensor (tuned value) is never treated as zero."""
    return not isinstance(value, Tensor) and value == 0


_NO_TANGENTS: Mapping[str, Tensor] = MappingProxyType({})


class Tangent(NamedTuple):
    """One incoming tangent of a step, all optional (None / missing key = zero).

    ``param`` is ``Z_w`` and ``grad`` is ``G = H Z_w`` (the Hessian-vector product), both
    shaped like the parameter; ``state`` maps a state entry's name to ``Z_s`` (param-shaped
    floating-point entries only, never ``step``); ``hyper`` maps a kind to ``L_k``, 0-dim or
    shaped like the parameter, for kinds whose hyper value is a tensor (entries for constant,
    float-valued kinds are ignored).  A 0-dim ``L_k`` broadcasts over the parameter.
    """
    param: Tensor | None = None
    grad: Tensor | None = None
    state: Mapping[str, Tensor] = _NO_TANGENTS
    hyper: Mapping[str, Tensor] = _NO_TANGENTS


class StateAlias:
    """A tangent a fused step left in the optimizer's state instead of a buffer of its own:
    ``sign`` times ``tensors`` (one per parameter of the bucket, shaped like it) as they stand
    after the step.  Valid until the next step changes that state.  Subclasses compute the
    tangent from the state (:class:`~hyperopt_wrap.rules.adam.AdamDirection`)."""
    __slots__ = ("tensors", "sign")

    def __init__(self, tensors: list[Tensor], sign: float):
        self.tensors, self.sign = tensors, sign

    #: the settings the tangent is formed with (none for SGD's buffer)
    settings: tuple = ()

    @property
    def key(self) -> tuple:
        """Which state it reads and with which settings: two aliases with the same key are the
        same tangent (a changed Adam beta or eps makes another one)."""
        return tuple(id(t) for t in self.tensors), self.settings

    def parts(self) -> tuple[list[Tensor], float]:
        """Per-parameter tensors and a factor: the tangent is ``factor * tensors[i]``."""
        return self.tensors, self.sign

    def dots(self, metas: list[Tensor]) -> Tensor:
        """``<metas[i], tangent_i>`` per parameter (1-D, not checked for finiteness)."""
        d = torch.stack([torch.vdot(m.reshape(-1), t.reshape(-1))
                         for m, t in zip(metas, self.tensors)])
        return d if self.sign == 1.0 else d.mul_(self.sign)

    def materialize(self) -> Tensor:
        """The tangent as a flat tensor of its own (bucket layout)."""
        tensors, factor = self.parts()
        flat = torch.cat([t.reshape(-1) for t in tensors])
        return flat if isinstance(factor, float) and factor == 1.0 else flat.mul_(factor)


def _fused_devices() -> tuple[str, ...]:
    try:        # torch's own list (private; its name has moved between releases)
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
        return tuple(_get_fused_kernels_supported_devices())
    except ImportError:
        return ("cpu", "cuda", "xpu", "mps")


#: device types where torch has fused optimizer kernels (fused Adam, fused SGD)
FUSED_DEVICES = _fused_devices()


def fused_scalar_lr(lr) -> bool:
    """Whether a fused kernel can take this lr: a float, one 0-dim tensor for the bucket, or
    one 0-dim tensor per parameter (a call per tensor); not per-element values."""
    if isinstance(lr, list):
        return all(isinstance(v, Tensor) and v.dim() == 0 for v in lr)
    return isinstance(lr, float) or isinstance(lr, Tensor) and lr.dim() == 0


def fused_lr_runs(lr, n: int) -> list[list[int]]:
    """The parameter indices of each fused call: all at once, or one by one for a list."""
    return [[i] for i in range(n)] if isinstance(lr, list) else [list(range(n))]


class UpdateRule:
    """Base class of a differentiable update rule.

    Subclasses set ``kinds`` (the hyperparameters that can be tuned) and
    implement ``options``, ``init_state`` and ``update``.  ``read``/``write``
    map a kind to the param-group entry (override where the group stores it
    elsewhere, e.g. Adam keeps "momentum" as ``betas[0]``).
    """

    kinds: tuple[str, ...] = ("lr", "weight_decay")
    #: every state tensor but ``step`` is shaped like its parameter (checked when a checkpoint
    #: is loaded; a registered rule with other state shapes leaves this False)
    param_shaped_state: bool = False

    def read(self, group: dict[str, Any], kind: str) -> float:
        return float(group[kind])

    def write(self, group: dict[str, Any], kind: str, value: float) -> None:
        group[kind] = value

    def check_tunable(self, group: dict[str, Any], kind: str) -> str | None:
        """Why ``kind`` cannot be tuned from this group's settings, or None."""
        if kind == "momentum" and self.read(group, "momentum") == 0:
            return ("momentum 0 means no momentum buffer and cannot be tuned in logit space; "
                    "start from a value in (0, 1), e.g. momentum=0.9 (betas=(0.9, 0.999) for "
                    "Adam-type optimizers)")
        return None

    def options(self, group: dict[str, Any]) -> dict[str, Any]:
        """The non-tuned settings of a param group that ``update`` needs."""
        raise NotImplementedError

    def init_state(self, param: Tensor, options: dict[str, Any]) -> State:
        """Fresh per-parameter state, as torch.optim creates it lazily."""
        raise NotImplementedError

    def update(self, param: Tensor, grad: Tensor, state: State, hyper: Hyper,
               options: dict[str, Any]) -> tuple[Tensor, State]:
        """One step, out of place: returns the new parameter and new state."""
        raise NotImplementedError

    def update_with_tangents(self, param: Tensor, grad: Tensor, state: State, hyper: Hyper,
                             options: dict[str, Any], kinds: tuple[str, ...]
                             ) -> tuple[Tensor, State, dict[str, Tensor]]:
        """The out-of-place real step (under ``torch.no_grad()``), used when :meth:`step_`
        declines: ``update``'s result plus ``d new_param / d hyper[kind]`` for each kind in
        ``kinds`` (elementwise).

        This default runs forward-mode AD through :meth:`update`, one tangent per kind, so a
        user's rule needs nothing more; override it (or :meth:`step_`) for speed.  Tangents must
        not alias ``param``, ``grad`` or ``state`` (methods keep them past the step); the new
        param and state may (the optimizer copies them into its own storage).
        """
        if not kinds:
            new_param, new_state = self.update(param, grad, state, hyper, options)
            return new_param, new_state, {}
        tangents: dict[str, Tensor] = {}
        primal = None
        for kind in kinds:
            with fwAD.dual_level():
                dual = dict(hyper)
                dual[kind] = fwAD.make_dual(hyper[kind], torch.ones_like(hyper[kind]))
                new_param, new_state = self.update(param, grad, state, dual, options)
                p_primal, p_tangent = fwAD.unpack_dual(new_param)
                if primal is None:
                    primal = (p_primal, {k: fwAD.unpack_dual(v).primal for k, v in new_state.items()})
                tangents[kind] = p_tangent if p_tangent is not None else torch.zeros_like(p_primal)
        return primal[0], primal[1], tangents

    def step_(self, param: Tensor, grad: Tensor, state: State, hyper: Hyper,
              options: dict[str, Any], kinds: tuple[str, ...], ok: Tensor,
              work: dict[str, Tensor]) -> dict[str, Tensor] | None:
        """Optional in-place fast step, called under ``torch.no_grad()``.

        Updates ``param`` and ``state`` in place (no allocation per step, like torch.optim) and
        returns the tangents ``d param_new / d hyper[kind]``, written into persistent buffers
        from ``work`` (see :func:`scratch`; valid until the next step).  ``grad`` is the
        optimizer's own scratch copy of the gradient, finite, which the rule may overwrite.
        ``ok`` is a 0-dim tensor of the param's dtype, 1 or 0: with ``ok = 0`` the rule must
        leave ``param`` and ``state`` bit-exactly as they were (the step is skipped because a
        gradient was not finite; ``grad`` is then all zeros).  Return None where a
        configuration is not handled in place; the optimizer then runs
        :meth:`update_with_tangents` and writes its results back.  The default returns None.
        """
        return None

    def step_foreach(self, params: list[Tensor], grads: list[Tensor], states: list[State],
                     hyper: dict[str, "float | Tensor | list[Tensor]"], options: dict[str, Any],
                     kinds: tuple[str, ...], ok: Tensor, tangents: dict[str, list[Tensor]]
                     ) -> bool:
        """Optional bucketed :meth:`step_`: one in-place step of a whole bucket with
        ``torch._foreach_*`` ops (like torch.optim's ``foreach=True``), called under
        ``torch.no_grad()``.

        The bucket's params share device, dtype and param group (``options``).  ``grads`` are
        the optimizer's finite scratch copies of the gradients (zeros for a skipped step), which
        the rule may overwrite; ``states`` the per-parameter state dicts, initialised by
        :meth:`init_state`.  ``hyper[kind]`` is a Python float (a constant), one 0-dim tensor
        shared by the bucket, or a list with one tensor per param (0-dim, or shaped like the
        param), tensors in the params' dtype and device.  ``ok`` is as in :meth:`step_`: with
        ``ok = 0`` params and states stay bit-exactly as they were.  For each kind in ``kinds``
        write ``d new_param / d hyper[kind]`` (elementwise, as :meth:`step_` returns it) into the
        preallocated tensors ``tangents[kind]`` (which may be views into one flat buffer; write
        into them, never rebind the entries).  No host synchronisation.

        Return True when handled; return False, having changed nothing, where a configuration
        is not handled: the optimizer then loops :meth:`step_` over the bucket.  The default
        returns False.  Helpers for implementing it: :mod:`hyperopt_wrap.rules._foreach`.
        """
        return False

    def fused_tangents(self, states: list[State], hyper: dict[str, Any],
                       options: dict[str, Any], kinds: tuple[str, ...], work: dict
                       ) -> "dict[str, StateAlias] | None":
        """Optional: whether :meth:`step_fused` can take a bucket's coming step, and then the
        tangents of ``kinds`` it leaves behind without writing them, as :class:`StateAlias`es of
        the state after the step (for SGD with momentum, ``d w_new / d lr = -buf_new``); the
        aliases may keep scratch in ``work`` (the bucket's, persistent).  Before the step they
        read the state as the previous step left it: the optimizer's finite check dots them
        with the gradients.  None (the default) where it cannot; the optimizer then copies and
        checks the gradients and runs :meth:`step_foreach`."""
        return None

    def step_fused(self, params: list[Tensor], grads: list[Tensor], states: list[State],
                   hyper: dict[str, Any], options: dict[str, Any], found_inf: Tensor) -> None:
        """The step of a bucket that :meth:`fused_tangents` accepted, in one pass of torch's
        fused kernel, on the user's gradients themselves (not copied, not checked: the kernel
        leaves everything as it was where ``found_inf``, a float 0-dim tensor on the bucket's
        device, is nonzero), under ``torch.no_grad()``."""
        raise NotImplementedError

    def vjp(self, param: Tensor, grad: Tensor, state: State, hyper: Hyper,
            options: dict[str, Any], cot_param: Tensor | None, cot_state: State,
            inputs: bool, kinds: tuple[str, ...]):
        """Optional closed-form reverse products of :meth:`update` (second-order methods).

        For output cotangents ``cot_param`` (of the new parameter; None for zero) and
        ``cot_state`` (of new state entries; missing ones are zero), return
        ``(d_param, d_grad, d_state, d_hyper)``: the cotangents of the inputs
        (``d_param``/``d_grad`` None and ``d_state`` empty when ``inputs`` is False;
        ``d_state`` has an entry for each floating-point state tensor shaped like ``param``
        that the step reads, ``step`` counters excepted) and ``d_hyper[kind]`` for each kind in
        ``kinds``, shaped like ``hyper[kind]`` (summed over the parameter for a 0-dim value).
        Called with gradients disabled; all inputs are constants.

        Return None where a configuration is not handled: the methods then run reverse-mode
        autograd through :meth:`update`, which is always correct.  The default returns None;
        the tests check every closed form against autograd in float64.
        """
        return None

    def carry_foreach(self, params: list[Tensor], grads: list[Tensor], states: list[State],
                      hyper: dict[str, "float | Tensor | list[Tensor]"],
                      options: dict[str, Any], tangents: list[dict], ok: Tensor,
                      discount: float = 1.0) -> "list[dict[str, list[Tensor]]] | None":
        """Optional bucketed, in-place forward recurrence of a step (forward-mode methods):
        for each tangent ``Z <- discount * (dPhi/dx) Z + dPhi/dlam L``, what :meth:`jvp` gives
        per tensor, on a whole bucket (as :meth:`step_foreach`) with ``torch._foreach_*`` ops,
        written into the incoming tangents' storage, and the identity where ``ok = 0`` (a
        skipped step keeps every tangent bit for bit, without a select pass).

        Called under ``torch.no_grad()`` before the step writes anything; ``params``, ``grads``
        (the finite scratch gradients) and ``states`` must not be modified.  Each tangent is a
        dict: ``"w"``, the list of ``Z_w`` (present for every param, updated in place);
        ``"g"``, the list of ``H Z_w`` (finite, owned: may be overwritten) or None (the
        Hessian-free recurrence); ``"s"``, per state name a list of ``Z_s`` (entries None:
        zero); ``"hyper"``, per kind a list of ``L_k`` (0-dim or param-shaped; None where the
        kind does not enter this param's step; a kind is absent where it enters none).  ``hyper`` and ``options`` as in
        :meth:`step_foreach`.  Returns per tangent the new state tangents (per name a list,
        the incoming storage reused where it was given), or None, having changed nothing, to
        decline (the per-tensor :meth:`jvp` is then used).  The default declines.
        """
        return None

    def jvp(self, param: Tensor, grad: Tensor, state: State, hyper: Hyper,
            options: dict[str, Any], tangents: list[Tangent]
            ) -> list[tuple[Tensor, dict[str, Tensor]]]:
        """Forward (tangent) products of the whole step :meth:`update` (forward-mode methods).

        For each :class:`Tangent` ``(Z_w, G, Z_s, L)``, in order, returns ``(Z'_w, Z'_s)``::

            Z'_w = dw'/dw Z_w + dw'/dg G + sum_s dw'/ds Z_s + sum_k dw'/dlam_k L_k

        and ``Z'_s`` the same for every differentiable entry of the *new* state (floating
        point, shaped like ``param``, ``step`` excepted), entries the step creates included,
        with zeros where nothing flows.  Evaluated at the pre-step values, under
        ``torch.no_grad()`` with constant inputs, before the step writes anything; nothing is
        modified, and the outputs are fresh tensors (the caller keeps them across steps).

        This default runs forward-mode AD through :meth:`update`, one dual pass per tangent
        (duals for the present tangents only), so a user's rule needs nothing more.  Built-in
        rules override it with closed forms; the tests check them against this default.
        """
        results: list[tuple[Tensor, dict[str, Tensor]]] = []
        for tan in tangents:
            t_state = tan.state or {}
            t_hyper = tan.hyper or {}
            # storages an output tangent must not share (it is cloned where it would)
            taken = {x.untyped_storage().data_ptr() for x in
                     (param, grad, tan.param, tan.grad, *state.values(), *t_state.values(),
                      *hyper.values(), *t_hyper.values()) if isinstance(x, Tensor)}
            with fwAD.dual_level():
                p = _dual(param, tan.param)
                g = _dual(grad, tan.grad)
                s = {k: _dual(v, t_state.get(k)) if _differentiable(k, v, param) else v
                     for k, v in state.items()}
                h = dict(hyper)
                for kind, z in t_hyper.items():
                    value = hyper.get(kind)
                    if z is None or not isinstance(value, Tensor):
                        continue              # a constant: no tangent
                    # a 0-dim tangent of a per-element value broadcasts (and vice versa)
                    shape = torch.broadcast_shapes(value.shape, z.shape)
                    h[kind] = _dual(value if value.shape == shape else value.expand(shape).clone(),
                                    z if z.shape == shape else z.expand(shape).clone())
                new_param, new_state = self.update(p, g, s, h, options)
                z_param = _tangent_out(new_param, param, taken)
                z_state = {k: _tangent_out(v, v, taken) for k, v in new_state.items()
                           if _differentiable(k, v, param)}
            results.append((z_param, z_state))
        return results

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _differentiable(name: str, value: Any, param: Tensor) -> bool:
    """A state entry that carries a tangent: floating point, shaped like the parameter, not
    the ``step`` counter."""
    return (name != "step" and isinstance(value, Tensor) and value.is_floating_point()
            and value.shape == param.shape)


def _dual(primal: Tensor, tangent: Tensor | None) -> Tensor:
    """``primal`` as a dual tensor at the current level, or itself when there is no tangent."""
    if tangent is None:
        return primal
    if tangent.dtype != primal.dtype:
        tangent = tangent.to(primal.dtype)
    return fwAD.make_dual(primal, tangent)


def _tangent_out(value: Tensor, like: Tensor, taken: set[int]) -> Tensor:
    """The tangent of an output dual, as a fresh tensor shaped like ``like`` (zeros where none
    flows; cloned where it shares storage with an input or an earlier output)."""
    tangent = fwAD.unpack_dual(value).tangent
    if tangent is None or tangent._is_zerotensor():
        return torch.zeros_like(fwAD.unpack_dual(like).primal)
    if tangent.shape != like.shape:
        tangent = tangent.expand(like.shape).clone()
    ptr = tangent.untyped_storage().data_ptr()
    if ptr in taken:
        tangent = tangent.clone()
        ptr = tangent.untyped_storage().data_ptr()
    taken.add(ptr)
    return tangent


def lincomb(like: Tensor, *terms: tuple[Tensor | None, float | Tensor]) -> Tensor | None:
    """``sum x * c`` over the terms ``(x, c)`` whose ``x`` is not None (a missing tangent) and
    whose ``c`` is not a constant 0: a fresh tensor shaped like ``like`` (broadcast), or None
    when no term is left (a zero tangent).  The closed-form :meth:`UpdateRule.jvp` build
    every output with it, so none aliases an input."""
    acc = None
    for x, c in terms:
        if x is None or is_zero(c):
            continue
        if acc is None:
            out = _pooled(like) if x.shape == like.shape and \
                torch.result_type(x, c) == like.dtype else None
            acc = torch.mul(x, c) if out is None else torch.mul(x, c, out=out)
            if acc.shape != like.shape:
                acc = acc.expand(like.shape).clone()
        else:
            add_scaled_(acc, x, c)
    return acc


def or_zeros(x: Tensor | None, like: Tensor) -> Tensor:
    """``x``, or zeros shaped like ``like`` for a missing (zero) tangent."""
    if x is not None:
        return x
    out = _pooled(like)
    return torch.zeros_like(like) if out is None else out.zero_()


class TensorPool:
    """Retired tensor-sized buffers for the tangent products to write into (forward-mode
    methods retire last step's tangents, the next step's products reuse them): on the CPU a
    fresh parameter-sized allocation costs several times the arithmetic that fills it."""

    def __init__(self, per_shape: int = 16):
        self.per_shape = per_shape
        self._free: dict[tuple, list[Tensor]] = {}

    def give(self, t: Tensor) -> None:
        if t.is_contiguous():
            bucket = self._free.setdefault((t.shape, t.dtype, t.device), [])
            if len(bucket) < self.per_shape:
                bucket.append(t)

    def take(self, like: Tensor) -> Tensor | None:
        bucket = self._free.get((like.shape, like.dtype, like.device))
        return bucket.pop() if bucket else None

    def __getstate__(self):       # scratch: not copied or pickled
        return {"per_shape": self.per_shape, "_free": {}}


_POOL: contextvars.ContextVar = contextvars.ContextVar("hyperopt_wrap_tensor_pool", default=None)


@contextlib.contextmanager
def pooled(pool: "TensorPool | None"):
    """Within the block, :func:`lincomb` and :func:`or_zeros` take their output buffers from
    ``pool`` where it has one of the right shape (the results are the same numbers)."""
    token = _POOL.set(pool)
    try:
        yield
    finally:
        _POOL.reset(token)


def _pooled(like: Tensor) -> Tensor | None:
    pool = _POOL.get()
    return None if pool is None else pool.take(like)


def hyper_tangents(tangent: Tangent, hyper: Hyper) -> dict[str, Tensor]:
    """The hyperparameter tangents ``L_k`` that count: present, for kinds whose value is a
    tensor (a float is a constant)."""
    return {k: z for k, z in (tangent.hyper or {}).items()
            if z is not None and isinstance(hyper.get(k), Tensor)}


def scratch(work: dict[str, Tensor], name: str, like: Tensor) -> Tensor:
    """A persistent buffer shaped like ``like``, created on first use."""
    buf = work.get(name)
    if buf is None or buf.shape != like.shape or buf.dtype != like.dtype:
        buf = work[name] = torch.empty_like(like, memory_format=torch.preserve_format)
    return buf


def _memo(ok: Tensor, key, value, compute):
    """Memoise ``compute()`` on the per-step tensor ``ok``; a tensor ``value`` is keyed by
    identity and kept alive by the memo, so its id cannot be reused within the step.  Not under
    torch.compile, which cannot trace a tensor's ``__dict__`` (and shares the product itself)."""
    if is_compiling():
        return compute()
    memo = ok.__dict__.setdefault("_memo", {})
    hit = memo.get(key)
    if hit is None or hit[0] is not value:
        hit = memo[key] = (value, compute())
    return hit[1]


def gated(ok: Tensor, value: float | Tensor) -> Tensor:
    """``value * ok``: the coefficient of a step's increment, 0 when the step is skipped
    (computed once per step per value, not once per parameter)."""
    key = ("gated", id(value) if isinstance(value, Tensor) else value)
    return _memo(ok, key, value, lambda: value * ok)


def kept(ok: Tensor, value: float | Tensor, frozen: float) -> Tensor:
    """``value`` where the step is taken (ok=1), ``frozen`` (the no-op value) where it is
    skipped (ok=0); exact in both cases, in ``ok``'s dtype (memoised like :func:`gated`)."""
    key = ("kept", id(value) if isinstance(value, Tensor) else value, frozen)
    return _memo(ok, key, value, lambda: ok * value + (1 - ok) * frozen)


def reduce_like(x: Tensor, y: Tensor | float, like: float | Tensor) -> Tensor:
    """``x * y`` (broadcast) reduced to the shape of the hyperparameter ``like``: summed to a
    0-dim tensor for a scalar, elementwise for a value shaped like the parameter."""
    if isinstance(like, Tensor) and like.dim() > 0:
        return x * y
    if not isinstance(y, Tensor) or y.dim() == 0:
        return x.sum() * y
    if x.shape != y.shape:
        return (x * y).sum()
    return torch.vdot(x.reshape(-1), y.reshape(-1))


def axpy(x: Tensor, y: Tensor, alpha: float | Tensor) -> Tensor:
    """``x + alpha * y`` as a new tensor, in one op."""
    if isinstance(alpha, Tensor):
        return torch.addcmul(x, y, alpha)
    return torch.add(x, y, alpha=alpha)


def add_scaled_(x: Tensor, y: Tensor, scale: float | Tensor) -> Tensor:
    """``x += scale * y`` in place."""
    if isinstance(scale, Tensor):
        return x.addcmul_(y, scale)
    return x.add_(y, alpha=scale)


def new_step_count(param: Tensor) -> Tensor:
    """torch.optim's ``state["step"]``: a 0-dim tensor of torch's own dtype
    (``torch.optim.optimizer._get_scalar_dtype()``: float32, float64 when the default dtype
    is float64; float32 always on MPS, which has no float64).

    torch keeps it on the CPU; we keep it on the parameter's device instead, so that bias
    corrections are tensor arithmetic and never need a host synchronisation.  Read it through
    :func:`step_count_as_float64` for arithmetic.
    """
    dtype = torch.float32 if param.device.type == "mps" else _get_scalar_dtype()
    return torch.zeros((), dtype=dtype, device=param.device)


def step_count_as_float64(step: Tensor) -> Tensor:
    """A step counter (or a vector of them, e.g. ``torch.stack(steps)``) for arithmetic: in
    float64 where the device has it (not MPS), so that ``1 - beta2 ** step`` and the like are
    the numbers torch computes in Python floats from ``step.item()``, whatever dtype the
    counter itself has (float32 by torch's default, float64 under a float64 default or from
    an old checkpoint).  Integer counts are exact in float32 up to 2**24, so the cast changes
    no value.  A float64 counter (or any counter on MPS) comes back as itself, not a copy:
    do not modify the result in place."""
    if step.dtype == torch.float64 or step.device.type == "mps":
        return step
    return step.to(torch.float64)
