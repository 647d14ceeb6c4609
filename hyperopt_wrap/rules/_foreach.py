"""Helpers of the bucketed (multi-tensor) steps, :meth:`UpdateRule.step_foreach`.

A bucket is a list of parameters sharing device, dtype and param group.  A *coefficient* of
a bucket is one of

* a Python float: a constant of the whole bucket;
* a 0-dim tensor: one value shared by the bucket (a global or group hyperparameter);
* a 1-D tensor with one entry per parameter, a *vec*: what is computed from the stacked
  step counters (bias corrections), or from per-tensor hyperparameters combined with those;
* a list with one tensor per parameter, 0-dim or shaped like the parameter.

:class:`Coef` does arithmetic on coefficients without host synchronisation (lists through
``torch._foreach_*``, the rest as plain tensor arithmetic), and :func:`mul_`, :func:`axpy_`,
:func:`addcdiv_` and :func:`into_` apply one to a list of parameter-sized tensors in place, in
as few foreach calls as its form allows.  What decides the choices (measured on the CPU, 200
tensors of 16x16 float32; cf. torch's own ``_multi_tensor_*``):

* a Python float through a ``Scalar`` overload of ``_foreach_mul_``/``_foreach_add_`` is
  wrapped into a tensor once per tensor there (about 3x slower than the ``Tensor`` overload with
  a 0-dim tensor), so floats become 0-dim tensors first (``_foreach_add_``'s ``alpha`` and
  ``addcmul``'s ``value`` are fine: the kernels take those as scalars);
* a 0-dim tensor where only a ``Scalar`` fits is read with ``.item()`` (a host sync on CUDA):
  ``_foreach_add_(xs, t)`` without ``alpha=``, ``_foreach_lerp_(xs, ys, t)``,
  ``_foreach_addcmul_(..., value=t)``; those get a list of the 0-dim tensor instead;
* per-parameter scalars (a vec) go to the packed-scalars overloads of ``_foreach_addcmul_`` and
  ``_foreach_addcdiv_`` on the CPU, which read them in place (no ``unbind`` into 200 views);
  on other devices those overloads copy the scalars to the host, so a vec is unbound there.
"""
from __future__ import annotations

import operator

import torch
from torch import Tensor

_PLAIN = {"add": operator.add, "sub": operator.sub, "mul": operator.mul,
          "div": operator.truediv, "pow": operator.pow}
_FOREACH = {"add": torch._foreach_add, "sub": torch._foreach_sub, "mul": torch._foreach_mul,
            "div": torch._foreach_div, "pow": torch._foreach_pow}


def _unwrap(c):
    return c.v if isinstance(c, Coef) else c


def _is_vec(c) -> bool:
    return isinstance(c, Tensor) and c.dim() == 1


def _scalar(xs: list[Tensor], c: float) -> Tensor:
    """A Python float as a 0-dim tensor in the dtype and on the device of ``xs`` (a fill, not
    a host-to-device copy)."""
    return torch.full((), c, dtype=xs[0].dtype, device=xs[0].device)


def as_list(c, xs: list[Tensor], cast: bool = False) -> list[Tensor]:
    """Coefficient ``c`` as one tensor per entry of ``xs`` (a vec unbound into 0-dim views, in
    ``xs``'s dtype when ``cast``: what an in-place op on ``xs`` computes in anyway)."""
    c = _unwrap(c)
    if isinstance(c, list):
        return c
    if not isinstance(c, Tensor):
        return [_scalar(xs, c)] * len(xs)
    if cast and c.dtype != xs[0].dtype:
        c = c.to(xs[0].dtype)
    return list(c.unbind()) if c.dim() == 1 else [c] * len(xs)


def _binop(name: str, a, b):
    la, lb = isinstance(a, list), isinstance(b, list)
    if not (la or lb):
        return _PLAIN[name](a, b)
    if la and lb:
        return list(_FOREACH[name](a, b))
    lst, other = (a, b) if la else (b, a)
    if _is_vec(other) and all(x.dim() == 0 for x in lst):   # per-tensor values: a vec too
        stacked = torch.stack(lst)
        return _PLAIN[name](stacked, other) if la else _PLAIN[name](other, stacked)
    if name == "pow" and not isinstance(other, Tensor):     # Scalar exponent, or Scalar base
        return list(torch._foreach_pow(a, b))
    other = as_list(other, lst)
    return list(_FOREACH[name](*((lst, other) if la else (other, lst))))


class Coef:
    """A coefficient of a bucket (see the module docstring) with arithmetic: a list operand
    makes a foreach call, everything else is plain float/tensor arithmetic."""

    __slots__ = ("v",)

    def __init__(self, v):
        self.v = _unwrap(v)

    def _op(self, name, other, reflected=False):
        a, b = self.v, _unwrap(other)
        return Coef(_binop(name, b, a) if reflected else _binop(name, a, b))

    def __add__(self, o): return self._op("add", o)
    def __radd__(self, o): return self._op("add", o, True)
    def __sub__(self, o): return self._op("sub", o)
    def __rsub__(self, o): return self._op("sub", o, True)
    def __mul__(self, o): return self._op("mul", o)
    def __rmul__(self, o): return self._op("mul", o, True)
    def __truediv__(self, o): return self._op("div", o)
    def __rtruediv__(self, o): return self._op("div", o, True)
    def __pow__(self, o): return self._op("pow", o)
    def __rpow__(self, o): return self._op("pow", o, True)

    def __neg__(self):
        v = self.v
        return Coef(list(torch._foreach_neg(v)) if isinstance(v, list) else -v)

    def __repr__(self):
        return f"Coef({self.v!r})"


def gate(ok: Tensor, value) -> Coef:
    """``value * ok``: a step's coefficient, 0 when the step is skipped (as ``base.gated``)."""
    return Coef(value) * ok


def keep(ok: Tensor, value, frozen: float) -> Coef:
    """``value`` for ok=1, ``frozen`` for ok=0, exactly (the formula of ``base.kept``)."""
    return ok * Coef(value) + (1 - ok) * frozen


def _cpu(xs: list[Tensor]) -> bool:
    return xs[0].device.type == "cpu"


def _packed(c: Tensor, xs: list[Tensor], alpha: float) -> Tensor:
    """One scalar per tensor of ``xs`` as a contiguous 1-D tensor (the packed overloads)."""
    c = c.expand(len(xs)).contiguous() if c.dim() == 0 else c
    return c * alpha if alpha != 1 else c


def ones(xs: list[Tensor]) -> list[Tensor]:
    return [torch.ones((), dtype=xs[0].dtype, device=xs[0].device)] * len(xs)


def mul_(xs: list[Tensor], c) -> None:
    """``xs *= c``."""
    c = _unwrap(c)
    if isinstance(c, list):
        torch._foreach_mul_(xs, c)
    elif isinstance(c, Tensor):
        if c.dim() == 0:
            torch._foreach_mul_(xs, c if c.dtype == xs[0].dtype else c.to(xs[0].dtype))
        else:
            torch._foreach_mul_(xs, as_list(c, xs, cast=True))
    elif c != 1:
        torch._foreach_mul_(xs, _scalar(xs, c))


def axpy_(xs: list[Tensor], ys: list[Tensor], c, alpha: float = 1.0,
          zs: list[Tensor] | None = None) -> None:
    """``xs += alpha * c * ys`` (``* zs`` when given); ``alpha`` is a Python float."""
    c = _unwrap(c)
    if not isinstance(c, (Tensor, list)):
        if zs is None:
            torch._foreach_add_(xs, ys, alpha=alpha * c)
        else:
            torch._foreach_addcmul_(xs, ys, zs, value=alpha * c)
        return
    if isinstance(c, Tensor):
        if c.dim() == 0 and zs is None:     # as x.addcmul_(y, c) per tensor
            torch._foreach_addcmul_(xs, ys, [c] * len(xs), value=alpha)
            return
        if _cpu(xs):
            torch._foreach_addcmul_(xs, ys, ones(xs) if zs is None else zs, _packed(c, xs, alpha))
            return
        c = as_list(c, xs, cast=True)
    if zs is None:
        torch._foreach_addcmul_(xs, ys, c, value=alpha)
    else:
        torch._foreach_addcmul_(xs, torch._foreach_mul(ys, c), zs, value=alpha)


def addcdiv_(xs: list[Tensor], ys: list[Tensor], zs: list[Tensor], c,
             alpha: float = 1.0) -> None:
    """``xs += alpha * c * ys / zs``."""
    c = _unwrap(c)
    if not isinstance(c, (Tensor, list)):
        torch._foreach_addcdiv_(xs, ys, zs, value=alpha * c)
    elif isinstance(c, Tensor) and _cpu(xs):
        torch._foreach_addcdiv_(xs, ys, zs, _packed(c, xs, alpha))
    else:
        axpy_(xs, torch._foreach_div(ys, zs), c, alpha)


def lerp_(xs: list[Tensor], ys: list[Tensor], w) -> None:
    """``xs.lerp_(ys, w)`` per tensor."""
    w = _unwrap(w)
    if isinstance(w, (Tensor, list)):
        torch._foreach_lerp_(xs, ys, as_list(w, xs, cast=True))
    else:
        torch._foreach_lerp_(xs, ys, w)


def into_(out: list[Tensor], ys: list[Tensor], c) -> None:
    """``out = c * ys``, written into ``out``'s tensors."""
    c = _unwrap(c)
    if _is_vec(c) and _cpu(out):
        torch._foreach_zero_(out)
        axpy_(out, ys, c)
    else:
        torch._foreach_copy_(out, ys)
        mul_(out, c)


def neg_into(out: list[Tensor], ys: list[Tensor]) -> None:
    """``out = -ys`` (as ``0 - ys``: one pass fewer than copy and negate)."""
    torch._foreach_zero_(out)
    torch._foreach_sub_(out, ys)


def add_count_(steps: list[Tensor], ok: Tensor) -> None:
    """The step counters += ok (0-dim tensors, maybe another dtype than ``ok``)."""
    torch._foreach_add_(steps, ok if ok.dtype == steps[0].dtype else ok.to(steps[0].dtype),
                        alpha=1)


def nonzero_floor(xs: list[Tensor]) -> list[Tensor]:
    """``xs`` (non-negative) with zeros raised to the smallest normal number: a divisor for
    ``n / sqrt(v)`` where ``n`` is 0 wherever ``v`` is, giving the limit 0 instead of 0/0.
    Every positive square root of a float is at least that number, so nothing else moves."""
    return list(torch._foreach_clamp_min(xs, torch.finfo(xs[0].dtype).tiny))


def subset(idx: list[int], params, grads, states, hyper, tangents):
    """The bucket restricted to the positions ``idx`` (for a bucket a rule splits)."""
    pick = lambda xs: [xs[i] for i in idx]
    return (pick(params), pick(grads), pick(states),
            {k: (pick(v) if isinstance(v, list) else v) for k, v in hyper.items()},
            {k: pick(v) for k, v in tangents.items()})
