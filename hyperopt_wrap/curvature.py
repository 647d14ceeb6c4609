"""Hessian-vector products of the training loss at a recorded step, from one of two sources.

Second-order methods need ``u -> H_t u``: the Hessian of the minibatch loss at the weights
``w_t`` and on the minibatch ``B_t`` of a step ``t`` that already happened (the parameters have
moved on since).  The optimizer never sees the model, only what the user hands ``step()``, so
there are two sources:

**graph** -- the user ran ``loss.backward(create_graph=opt.needs_graph)`` (or a closure that does
so).  ``p.grad`` then carries the graph of ``g_t(w)``, and ``H_t u`` is one double backward,
exact.  While such a graph is kept, ``step()`` writes the parameters through ``p.data`` (which
does not bump autograd's version counter); a product first puts ``w_t`` back into the
parameters bit-exactly, so every tensor the graph saved holds its step-``t`` value again, and
afterwards restores the current weights.  When the method releases the graphs the version
counters are bumped, so any later use of the old graphs raises as it would after a
``torch.optim`` step.  ``p.grad`` is replaced by a detached tensor with the same values (the
method holds the graph), which also breaks the ``p -> p.grad -> graph -> p`` reference cycle
torch warns about.

**closure** -- the standard closure protocol (``closure()`` zeroes the gradients, runs forward
and backward and returns the loss, as for ``torch.optim.LBFGS``).  ``H_t u`` is a finite
difference of gradients, re-calling the step's closure at perturbed weights::

    forward:  (g(w_t + eps u) - g_t) / eps                      1 gradient per product
    central:  (g(w_t + eps u) - g(w_t - eps u)) / (2 eps)       2 gradients per product

    eps = rel_eps * (1 + ||w_t||) / ||u||     (norms over all parameters of the step)

with ``rel_eps`` = sqrt(machine epsilon) for forward and its cube root for central differences
(the usual balance of truncation against round-off: float32 3.5e-4 / 4.9e-3, float64 1.5e-8 /
6.1e-6).  The replay forks torch's RNG and restores the state the step's closure started from,
so dropout draws the same masks; the weights and ``p.grad`` are restored bit-exactly
afterwards, and with ``model=`` the module's buffers (BatchNorm running statistics) too.
A closure recorded in an earlier ``step()`` call must bind its own batch (a plain closure
captures loop variables by reference and would replay the *current* batch): the first such
replay checks that the closure reproduces the recorded loss at the recorded weights and
raises if not.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

__all__ = ["FiniteDifferences", "resolve_curvature", "GraphSource", "ClosureSource",
           "CurvatureError", "step_hvp", "step_gradient_at"]


class CurvatureError(RuntimeError):
    """A second-order method found no way to compute Hessian-vector products."""


@dataclass(frozen=True)
class FiniteDifferences:
    """Hessian-vector products by finite differences through the step's closure.

    Args:
        central: central differences (2 gradients per product, error O(eps^2)) instead of
            forward differences (1 gradient, error O(eps)).
        rel_eps: the relative step; default sqrt(machine eps) (forward) or its cube root
            (central) of the parameters' dtype.
        model: optional ``nn.Module`` whose buffers (e.g. BatchNorm running statistics) are
            saved before replaying closures and restored afterwards.
    """
    central: bool = False
    rel_eps: float | None = None
    model: Any = None

    def __post_init__(self):
        if self.rel_eps is not None and not (isinstance(self.rel_eps, (int, float))
                                             and 0 < self.rel_eps < 1):
            raise ValueError(f"rel_eps must be a number in (0, 1), got {self.rel_eps!r}; "
                             "e.g. FiniteDifferences(rel_eps=1e-3), or leave it None")
        if self.model is not None and not isinstance(self.model, torch.nn.Module):
            raise TypeError(f"model= must be the torch.nn.Module whose buffers to protect, got "
                            f"{type(self.model).__name__}")

    def eps_for(self, dtype: torch.dtype) -> float:
        if self.rel_eps is not None:
            return float(self.rel_eps)
        e = torch.finfo(dtype).eps
        return e ** (1 / 3) if self.central else e ** 0.5


def resolve_curvature(curvature) -> str | FiniteDifferences:
    """``"auto"`` (the graph when ``p.grad`` has one, else the closure with forward
    differences), ``"graph"``, ``"closure"`` or a :class:`FiniteDifferences`."""
    if isinstance(curvature, FiniteDifferences) or curvature in ("auto", "graph"):
        return curvature
    if curvature == "closure":
        return FiniteDifferences()
    raise ValueError(f"unknown curvature={curvature!r}; use 'auto', 'graph', 'closure' or "
                     "hyperopt_wrap.FiniteDifferences(central=True, model=model)")


def missing_source_message(method_name: str, closure_only: bool = False) -> str:
    if closure_only:
        return (f"method {method_name!r} evaluates the training gradient at other weights than "
                "the step's, which needs the step's closure, and step() got none (a gradient "
                "graph cannot be re-evaluated elsewhere). Pass a closure that binds its batch:"
                "\n\n"
                "    def closure(x=x, y=y):\n"
                "        opt.zero_grad()\n"
                "        loss = loss_fn(model(x), y)\n"
                "        loss.backward()\n"
                "        return loss\n"
                "    opt.step(closure)")
    return (f"method {method_name!r} needs Hessian-vector products of the training loss at this "
            "step, and step() got neither a gradient graph nor a closure. Either keep the graph "
            "on the steps that need it:\n\n"
            "    loss = loss_fn(model(x), y)\n"
            "    loss.backward(create_graph=opt.needs_graph)\n"
            "    opt.step()\n\n"
            "or pass a closure that binds its batch (it may be re-run on this batch later):\n\n"
            "    def closure(x=x, y=y):\n"
            "        opt.zero_grad()\n"
            "        loss = loss_fn(model(x), y)\n"
            "        loss.backward()\n"
            "        return loss\n"
            "    opt.step(closure)")


def capture_rng(devices: Sequence[torch.device]) -> dict:
    """torch's RNG state as it is now (CPU and the given CUDA devices)."""
    state = {"cpu": torch.get_rng_state()}
    for dev in devices:
        if dev.type == "cuda":
            state[dev] = torch.cuda.get_rng_state(dev)
    return state


@contextlib.contextmanager
def replaying_rng(state: dict):
    """Run with torch's RNG set to ``state``; the outer RNG stream is left as it was."""
    cuda = [d for d in state if d != "cpu"]
    with torch.random.fork_rng(devices=cuda, device_type="cuda"):
        torch.set_rng_state(state["cpu"])
        for dev in cuda:
            torch.cuda.set_rng_state(state[dev], dev)
        yield


class GradClip:
    """``max_grad_norm``: the step used ``c g`` with ``c = min(1, M / (||g|| + 1e-6))`` over all
    its parameters (``torch.nn.utils.clip_grad_norm_``'s coefficient), so every product with
    the step's Hessian goes through the clip's Jacobian ``J = d(c g)/dg``, symmetric:

        J u = c u                                         (not clipped: c = 1)
        J u = c u - c^2 / (M ||g||) g (g . u)             (clipped; g the unclipped gradient)
            = c u - (g_c . u) / (M ||g||) g_c            (g_c = c g, the gradient the step used)

    Tangents carried forward see ``J (H u)``; cotangents carried back ``H (J u)``.  ``coef``,
    ``norm`` and ``active`` are 0-dim tensors on the device (no host read)."""

    def __init__(self, coef: Tensor, norm: Tensor, max_norm: float):
        self.coef, self.norm, self.max_norm = coef, norm, max_norm
        self.active = (coef < 1).to(coef.dtype)

    def apply(self, us: list[Tensor], clipped: list[Tensor]) -> list[Tensor]:
        """``J u`` per parameter (``clipped``: the step's gradient as used)."""
        dev = self.coef.device
        dot = torch.stack([(g * u).sum().to(dev, self.coef.dtype)
                           for g, u in zip(clipped, us)]).sum()
        k = self.active * dot / (self.max_norm * self.norm.clamp_min(1e-30))
        return [u * self.coef.to(u.device, u.dtype) - g * k.to(g.device, g.dtype)
                for u, g in zip(us, clipped)]

    def unclipped(self, clipped: list[Tensor]) -> list[Tensor]:
        return [g / self.coef.to(g.device, g.dtype) for g in clipped]


class GraphSource:
    """Exact products from the double-backward graph of the step's gradients."""
    kind = "graph"
    clip: GradClip | None = None     # max_grad_norm's clip of this step (set by the step)

    def __init__(self, grads: list[Tensor], grad_scale: Tensor | None = None):
        self.grads = grads      # p.grad of the step, with its graph (None where p had none)
        # GradScaler's scale when the graph is of the scaled loss (the products are unscaled)
        # (float32: exact for GradScaler's powers of two, and MPS has no float64)
        self.inv_scale = None if grad_scale is None else \
            grad_scale.to(torch.float32).reciprocal()

    def hvp(self, params: list[Tensor], us: list[Tensor], **_) -> list[Tensor]:
        outs, vecs = [], []
        for g, u in zip(self.grads, us):
            if g is not None and g.requires_grad:
                outs.append(g)
                vecs.append(u)
        if not outs:
            return [torch.zeros_like(p) for p in params]
        with torch.enable_grad():
            try:
                hv = torch.autograd.grad(outs, params, vecs, retain_graph=True,
                                         allow_unused=True)
            except RuntimeError as e:
                _raise_if_no_second_derivative(e)
                raise
        hv = [torch.zeros_like(p) if h is None else h for p, h in zip(params, hv)]
        if self.inv_scale is not None:
            for h in hv:
                h.mul_(self.inv_scale.to(h.device, h.dtype))
        return hv


def _raise_if_no_second_derivative(error: RuntimeError) -> None:
    """A gradient graph without a double backward (a torch.compile'd model: aot_autograd's;
    fused attention kernels): say where the products can come from instead."""
    text = str(error)
    if "double backward" in text:
        what = ("the gradient graph comes from a torch.compile'd model, which has no double "
                "backward (aot_autograd)")
    elif "derivative for" in text or "not implemented" in text:
        what = (f"the gradient graph has no second derivative: {text}. Some kernels have none "
                "(fused attention: scaled_dot_product_attention's flash kernel on CPU, flash "
                "and memory-efficient attention)")
    else:
        return
    raise CurvatureError(
        f"{what}, so Hessian-vector products cannot be taken from it. Use the closure source "
        "instead: construct with curvature='closure' and pass opt.step(closure) (finite "
        "differences of gradients, the closure calling a plain loss.backward()); or a model "
        "without the fused kernel (transformers: attn_implementation='eager')") from error


class ClosureSource:
    """Finite-difference products through the step's closure."""
    kind = "closure"
    clip: GradClip | None = None

    def __init__(self, closure: Callable[[], Any], rng: dict, loss: Any, call: int,
                 config: FiniteDifferences):
        self.closure = closure
        self.rng = rng
        self.loss = loss.detach().clone() if isinstance(loss, Tensor) else loss
        self.call = call          # the step() call that recorded it
        self.config = config

    def gradient(self, params: list[Tensor]) -> tuple[list[Tensor], Any]:
        """Call the closure (RNG as recorded) at the parameters' current values; its gradient."""
        for p in params:
            p.grad = None
        with replaying_rng(self.rng), torch.enable_grad():
            loss = self.closure()
        grads = [torch.zeros_like(p) if p.grad is None else p.grad.detach() for p in params]
        for p in params:
            p.grad = None
        return grads, loss

    def check_binding(self, params: list[Tensor], weights: list[Tensor],
                      grads: list[Tensor] | None = None, finite: Tensor | None = None,
                      loss: bool = True) -> bool:
        """The closure, re-run at the recorded weights, must give the recorded loss (``loss``)
        and, with ``grads`` (the unclipped gradient the step used; skipped where ``finite`` is
        False, and then it returns False), that gradient: a closure that accumulates into gradients left by earlier
        micro-batches (a trainer's gradient accumulation) gives only its own micro-batch's."""
        for p, w in zip(params, weights):
            p.data.copy_(w)
        got, replayed = self.gradient(params)
        if loss and (not isinstance(self.loss, Tensor) or not isinstance(replayed, Tensor)):
            raise CurvatureError("the closure must return the loss (a tensor) so that its replay "
                                 "can be checked; end it with `return loss`")
        if loss and not torch.allclose(replayed.detach().to(self.loss.dtype), self.loss,
                                       rtol=1e-5, atol=0):
            raise CurvatureError(
                f"replaying an earlier step's closure at that step's weights gave loss "
                f"{float(replayed):.8g}, but the step recorded {float(self.loss):.8g}: the closure "
                "does not reproduce its own minibatch. A closure defined in the loop captures "
                "`x, y` by reference and sees the newest batch; bind the batch instead:\n\n"
                "    def closure(x=x, y=y): ...        # or functools.partial(closure, x, y)\n\n"
                "and draw any randomness (augmentation, dropout) from torch's RNG, which the "
                "replay restores. Or keep the graph instead: "
                "loss.backward(create_graph=opt.needs_graph).")
        if grads is None or (finite is not None and not bool(finite)):
            return False        # (the gradient was not compared: check a later step)
        diff = weights_norm([a.double() - b.double() for a, b in zip(got, grads)])
        size = weights_norm([b.double() for b in grads])
        if float(diff) > 1e-4 * float(size) + 1e-30:
            raise CurvatureError(
                f"the closure, re-run at the step's weights, gives another gradient than the one "
                f"the step used (relative difference {float(diff) / max(float(size), 1e-300):.3g}):"
                " its finite-difference curvature would be wrong. This happens when gradients "
                "are accumulated over micro-batches before step(closure) (e.g. Lightning's "
                "accumulate_grad_batches, or a loop that calls backward() several times and "
                "then passes a closure of the last micro-batch): the closure must compute the "
                "whole step's gradient from zero (zero_grad() first). Use accumulation "
                "without a second-order method, or a closure over all micro-batches, or the "
                "gradient graph: loss.backward(create_graph=opt.needs_graph) on every "
                "micro-batch, then opt.step(). It also happens when the closure draws "
                "randomness outside torch's RNG (numpy or Python random augmentation), which "
                "the re-run cannot replay: draw it outside the closure")
        return True

    def hvp(self, params: list[Tensor], us: list[Tensor], *, weights: list[Tensor],
            grads: list[Tensor], wnorm: Tensor | None = None) -> list[Tensor]:
        """``H u`` at ``weights`` (the step's), ``grads`` its recorded gradient.  Leaves the
        parameters perturbed; the caller restores them."""
        cfg = self.config
        rel = cfg.eps_for(params[0].dtype)
        unorm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(us)))
        if wnorm is None:
            wnorm = weights_norm(weights)
        # eps = rel (1 + |w|) / |u|; u = 0 gives H u = 0 without dividing by zero
        eps = torch.where(unorm > 0, rel * (1 + wnorm) / unorm.clamp_min(1e-30),
                          torch.zeros_like(unorm))
        inv = torch.where(unorm > 0, 1 / eps.clamp_min(1e-30), torch.zeros_like(unorm))
        eps_as = eps.to(us[0].dtype)
        for p, w, u in zip(params, weights, us):
            torch.addcmul(w, u, eps_as, out=p.data)          # one pass
        plus, _ = self.gradient(params)     # fresh tensors: updated in place below
        if cfg.central:
            for p, w, u in zip(params, weights, us):
                torch.addcmul(w, u, eps_as, value=-1, out=p.data)
            minus, _ = self.gradient(params)
            return [a.sub_(b).mul_(inv.to(a.dtype) / 2) for a, b in zip(plus, minus)]
        return [a.sub_(g).mul_(inv.to(a.dtype)) for a, g in zip(plus, grads)]


def weights_norm(weights: list[Tensor]) -> Tensor:
    """``||w||`` over all the tensors (the finite-difference step's scale)."""
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(weights)))


class BufferGuard:
    """Saves a module's buffers and puts them back (closure replays run the model forward)."""

    def __init__(self, model):
        self.model = model
        self.saved = None

    def __enter__(self):
        if self.model is not None:
            self.saved = [(b, b.detach().clone()) for b in self.model.buffers()]
        return self

    def __exit__(self, *exc):
        if self.saved:
            with torch.no_grad():
                for b, old in self.saved:
                    b.copy_(old)
        return False


def step_hvp(source, params: list[Tensor], grads: list[Tensor], check=None):
    """``u -> H_t u`` at the *current* step, before its write: the weights are the parameters'
    values now and the minibatch the step's own.  With the graph source one double backward
    (the graph is kept until the step has used it); with the closure source one closure call at
    ``w_t + eps u`` per product (forward differences against ``grads``, the step's gradient;
    central differences make two), after which the weights, ``p.grad`` and the model's buffers
    (``FiniteDifferences(model=...)``) are restored bit-exactly."""
    clip = source.clip
    if clip is not None:
        raw = _step_hvp(source, params, clip.unclipped(grads), check)
        return lambda us: clip.apply(raw(us), grads)
    return _step_hvp(source, params, grads, check)


def _step_hvp(source, params: list[Tensor], grads: list[Tensor], check):
    if isinstance(source, GraphSource):
        return lambda us: source.hvp(params, us)
    at: list = []        # the step's weights and their norm, copied on the first product

    def hvp(us: list[Tensor]) -> list[Tensor]:
        if not at:
            at.append([p.detach().clone() for p in params])
            at.append(weights_norm(at[0]))
        weights, wnorm = at[0], at[1]
        saved = [p.grad for p in params]
        with BufferGuard(source.config.model):
            try:
                if check is not None and at[2:] == []:
                    at.append(True)
                    check(weights, grads)
                return source.hvp(params, us, weights=weights, grads=grads, wnorm=wnorm)
            finally:
                for p, w, g in zip(params, weights, saved):
                    p.data.copy_(w)
                    p.grad = g
    return hvp


def step_gradient_at(source, params: list[Tensor], weights: list[Tensor]) -> list[Tensor]:
    """The training gradient of the current step's minibatch at other weights: one call of the
    step's closure with ``weights`` in the parameters (torch's RNG replayed as the step's closure
    started it, so dropout draws the same masks), returning ``grad L(weights; B_t)`` per
    parameter.  Afterwards the parameters' values and ``p.grad`` (the same tensor objects) are
    restored bit-exactly, the model's buffers too with ``FiniteDifferences(model=...)``, and
    torch's RNG stream is left as it was.  Only a closure source can do this: a gradient graph
    holds the gradient at the step's own weights and cannot be re-evaluated elsewhere.

    ``weights`` (shaped, typed and placed like the parameters) are swapped in as the
    parameters' data and the parameters' own tensors swapped back afterwards: nothing is
    copied, and the restore is exact by construction."""
    if not isinstance(source, ClosureSource):
        got = "a gradient graph" if isinstance(source, GraphSource) else "no closure"
        raise CurvatureError(
            f"the training gradient at other weights than the step's needs the step's closure, "
            f"and this step got {got}. Pass a closure that binds its batch and calls "
            "loss.backward() without create_graph:\n\n"
            "    def closure(x=x, y=y):\n"
            "        opt.zero_grad()\n"
            "        loss = loss_fn(model(x), y)\n"
            "        loss.backward()\n"
            "        return loss\n"
            "    opt.step(closure)\n\n"
            "or construct the optimizer with curvature='closure' (then opt.needs_graph is False "
            "and a closure written with create_graph=opt.needs_graph builds no graph)")
    for p, w in zip(params, weights):
        if w.shape != p.shape or w.dtype != p.dtype or w.device != p.device:
            raise ValueError(f"step_gradient_at: weights must match the parameters, got "
                             f"{tuple(w.shape)} {w.dtype} {w.device} for {tuple(p.shape)} "
                             f"{p.dtype} {p.device}")
    current = [p.data for p in params]
    saved = [p.grad for p in params]
    with BufferGuard(source.config.model):
        try:
            for p, w in zip(params, weights):
                p.data = w.detach()
            grads, _ = source.gradient(params)
        finally:
            for p, w, g in zip(params, current, saved):
                p.data = w
                p.grad = g
    return grads
