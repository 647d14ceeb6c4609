"""Stochastic bi-level optimisation by Langevin dynamics, after Kim & Hospedales 2024 ("A
stochastic approach to bi-level optimization for hyperparameter optimization and meta learning").

The inner problem becomes a distribution and the outer objective its expectation::

    p_lam(w)  ~  exp(-L_train(w) / tau),         F(lam) = E_{w ~ p_lam}[ E(w) ]

(coupled weight decay is part of ``L_train``: a Gaussian prior).  The base optimizer samples
``p_lam`` by stochastic-gradient Langevin dynamics: its own step, then Gaussian noise on the
weights (added in :meth:`SGLD.observe`, after the step wrote them)::

    x_{t+1} = Phi(x_t, g_t, lam),     w_{t+1} += n_t,     n_t = sqrt(2 tau c_t) * xi_t,
    xi_t ~ N(0, I) from the optimizer's own generator (saved in the method state)

with ``c_t`` the step's effective (preconditioned) step size, elementwise:

* SGD: ``c = lr`` without momentum (Welling & Teh's SGLD, ``sqrt(2 lr tau)``).  With momentum
  ``mu`` and dampening ``delta``, ``c = lr (1 - delta) / (1 - mu)`` (Nesterov, where torch has
  ``delta = 0``: ``lr / (1 - mu)``).  Derivation: while the gradient changes slowly the buffer
  settles at ``(1 - delta) d / (1 - mu)`` (Nesterov: the direction at ``d / (1 - mu)``), so the
  step is an SGD step of size ``c``; overdamped Langevin discretised with time step ``c`` needs
  variance ``2 c tau`` per step on the weights, and noise added to the weights (not the buffer)
  is not amplified by the momentum.  The stationary variance on ``0.5 a w^2`` (the Lyapunov
  equation of the linear chain) tends to ``tau / a`` as ``lr -> 0``; at finite ``lr a / (1 -
  mu)`` it is larger, the discretisation effect, which the tests include in their analytic
  values.
* Adam / AdamW: preconditioned SGLD (pSGLD, Li et al. 2016).  The step is ``lr P m_hat`` with
  ``P = 1 / (sqrt(v_hat) + eps)`` and ``m_hat`` a *normalised* average of ``g`` (no
  ``1 / (1 - beta1)`` gain), so ``c = lr P``, from the second moment the step just wrote
  (amsgrad: its running maximum; bias-corrected).  pSGLD's correction term (the divergence of
  ``P``) is dropped, as pSGLD does in practice.
* RMSprop: ``c = lr P / (1 - mu)``, ``P = 1 / (sqrt(v [- gbar^2]) + eps)`` (its buffer sums
  ``g P`` without normalisation).  Adagrad: ``c = lr_t P``, ``lr_t = lr / (1 + (t-1) lr_decay)``,
  ``P = 1 / (sqrt(s) + eps)``.  A rule registered by the user: ``c = lr`` (``w - lr d``).
  For the adaptive rules a coordinate whose second moment is exactly 0 (it never had a
  gradient, so the step did not move it either) gets no noise: its preconditioner would be
  ``1 / eps``, a kick of ``sqrt(2 lr tau / eps)`` that Adam's bounded steps take ``1 / lr``
  steps to undo (choice).  The dropped correction matters where ``v`` adapts about as fast as
  the chain mixes (RMSprop's default ``alpha = 0.99`` more than Adam's ``beta2 = 0.999``), and
  in the first steps, where ``v`` rests on a few gradients: a coordinate whose first gradients
  are tiny gets a large kick.

The hypergradient is the reparametrisation (pathwise) gradient along the chain: with the noise
path ``xi`` held fixed, ``d/dlam E_xi[E(w_t)] = E_xi[grad E(w_t) . Z_t]`` with ``Z_t = dx_t/dlam``
carried forward (RTRL's recurrence on the tangent engine, :mod:`hyperopt_wrap.methods.rtrl`,
plus the noise's tangent; the noise is added after ``Phi``, so ``A_t``, ``B_t`` are the
deterministic step's own)::

    Z_{t+1} = mu_d A_t Z_t + B_t + N_t,         A_t = dPhi/dx (rule jvp + dPhi/dg H_t Z_w)
    N_t = dn_t/dlam = n_t * (1/2) d log c_t / dlam:
          lr: n / (2 lr)   (times the scheduler scale d lr_rule / d lr_tuned)
          momentum (SGD, RMSprop): n / (2 (1 - mu));     beta1, weight decay: 0

and ``F`` is read out as a Monte-Carlo average over the chain, ``(1/T) sum_t grad E(w_t) . Z_t``
(the samples of one window are averaged by the hyper-step):

* without ``val_loss`` ``E`` is the next minibatch's training loss, whose gradient comes with
  every step: every step of the window is a sample (``update_every`` samples per hyper-step);
* with ``val_loss`` the optimizer evaluates ``E`` only at the end of a window: one sample per
  hyper-step (``update_every=1`` makes every step one; the hyper-optimizer averages them).

Choices (not from the paper, whose exact recurrence could not be read here):

1. The first-order approximation (default ``hessian_free=True``): ``H_t`` is dropped from
   ``A_t`` (no Hessian-vector products, the plain ``loss.backward(); opt.step()`` loop works),
   with the history decayed, ``mu_d = discount = 0.9``.  The decay is needed: with ``H``
   dropped, ``A = I`` for plain SGD, so the noise tangents ``n / (2 lr)`` add up as a random
   walk (``Var Z`` grows like ``t tau / (2 lr)``); the discount bounds it by
   ``tau / (2 lr (1 - mu_d^2))``.  The price is a bias, which on the quadratic toy
   ``0.5 a |w - c|^2`` with SGD is analytic: per coordinate the estimate of ``dF/dlr`` has mean
   ``tau k lr / ((2 - k lr)(1 - mu_d r rho))`` against the exact ``tau / (2 - k lr)^2``
   (``k = a + wd``, ``rho = 1 - lr k``, ``r = 1 - lr wd``); the tests check both.
2. ``hessian_free=False`` keeps ``H_t`` (one HVP per tangent and step, from the gradient graph
   or the closure): with ``discount=1`` each sample is then the exact derivative of ``E(w_t)``
   along its noise path (for SGD; see 3 for the adaptive rules), an unbiased estimate of
   ``d E[E(w_t)] / dlam`` at every ``t`` (the tests check it against central differences of the
   seeded chain, and against the analytic stationary derivative of the toy, discretisation
   included).  At tensor/element granularity it carries OHO's
   per-kind tangent (exact where ``H`` has no cross-terms; element granularity needs
   ``per_kind_elements=True``, as for RTRL); with ``hessian_free=True`` the per-kind tangent
   is exact for its approximation, at every granularity.
3. ``c_t``'s dependence on the optimizer state (Adam's ``v``) is not carried into ``N_t``: the
   preconditioner is held fixed in the reparametrisation (exact under ``hessian_free``, where
   the state's tangent from the gradient is zero).
4. Temperature 0 draws no noise at all: the recurrence is then exactly
   ``RTRL(hessian_free=..., discount=...)`` (read out at every step without ``val_loss``).

Memory: one tangent per tuned scalar (global/group) or per kind (tensor/element), each the size
of the weights plus the differentiable optimizer state: ``O(dim w + dim lam)``, no Jacobian.
Cost per step: the rule's tangent products, one ``randn`` per bucket and a few elementwise ops
per parameter (plus one HVP per tangent with ``hessian_free=False``).

The noise comes from a generator per device (CPU: a ``torch.Generator`` seeded with ``seed``;
other devices: one on that device, seeded from ``seed``), whose state is kept in the method
state as a ByteTensor, so ``state_dict()``/``load_state_dict()`` resume bit-exactly (on the CPU;
on CUDA as far as its kernels are deterministic).  A skipped step (non-finite gradient) still
draws, multiplies its noise by 0 and leaves the weights and tangents as they were.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..rules import AdagradRule, AdamRule, RMSpropRule, SGDRule
from ..rules.base import is_zero, step_count_as_float64
from .base import HypergradientMethod, MetaGradients
from .rtrl import RTRL, read_out

# the coming step's items (parameters with their hyperparameters and state dicts), handed from
# carry() to observe() within one base step; never saved
_STEP = "_step_items"


class SGLD(HypergradientMethod):
    name = "sgld"
    default_update_every = 10
    default_hyper_lr = {"lr": 0.05, "weight_decay": 0.05, "momentum": 0.05}

    def __init__(self, temperature: float = 1e-4, *, hessian_free: bool = True,
                 discount: float = 0.9, seed: int | None = None,
                 per_kind_elements: bool = False):
        """
        Args:
            temperature: ``tau`` of ``p(w) ~ exp(-L_train(w) / tau)``, >= 0 (0: no noise, the
                deterministic recurrence).  For a mean loss over N examples, ``tau = 1/N`` is
                the Bayesian posterior.  Default 1e-4.
            hessian_free: drop the Hessian term of the recurrence (the first-order
                approximation; no Hessian-vector products).  Default True.
            discount: ``mu_d`` in (0, 1], the decay of the sensitivities' history.  Default 0.9.
            seed: seed of the noise generator; None draws one from torch's global generator
                when the optimizer is built (so ``torch.manual_seed`` makes runs repeatable;
                one ``SGLD(seed=s)`` shared by two optimizers gives both the same noise).
            per_kind_elements: with ``hessian_free=False`` at element granularity, accept the
                per-kind tangent (exact only where the Hessian is diagonal).
        """
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
                or not math.isfinite(temperature) or temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0: no noise), got "
                             f"{temperature!r}; e.g. SGLD(temperature=1e-4)")
        if not isinstance(hessian_free, bool):
            raise ValueError(f"hessian_free must be True or False, got {hessian_free!r}")
        if isinstance(discount, bool) or not isinstance(discount, (int, float)) \
                or not 0 < discount <= 1:
            raise ValueError(f"discount must be a number in (0, 1] (1: no decay of the "
                             f"history), got {discount!r}; e.g. SGLD(discount=0.9)")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)
                                 or not 0 <= seed < 2 ** 63):
            raise ValueError(f"seed must be None or an int in [0, 2**63), got {seed!r}")
        if not isinstance(per_kind_elements, bool):
            raise ValueError(f"per_kind_elements must be True or False, got "
                             f"{per_kind_elements!r}")
        self.temperature = float(temperature)
        self.hessian_free = hessian_free
        self.discount = float(discount)
        self.seed = seed
        self.per_kind_elements = per_kind_elements
        # the deterministic part of the recurrence (options only, like every method object)
        self._recurrence = RTRL(discount=discount, hessian_free=hessian_free,
                                per_kind_elements=True)

    def bind(self, ctx) -> None:
        element = [k for k, tk in ctx.tuned.items() if tk.granularity == "element"]
        if element and not self.hessian_free and not self.per_kind_elements:
            raise ValueError(
                f"SGLD(hessian_free=False) at element granularity ({', '.join(element)}) would "
                "carry one tangent per element; it carries one per kind instead only when "
                "asked: SGLD(hessian_free=False, per_kind_elements=True) (exact only where the "
                "Hessian is diagonal). The default SGLD(hessian_free=True) is exact for its "
                "approximation at every granularity")

    def init_state(self, ctx):
        state = self._recurrence.init_state(ctx)     # "tangents", "Z"
        state.pop("windows", None)
        seed = self.seed
        if seed is None:
            seed = int(torch.randint(0, 2 ** 62, (), dtype=torch.int64))
        state["seed"] = seed
        state["rng"] = {"cpu": torch.Generator().manual_seed(seed).get_state()}
        return state

    def state_dict(self, state):
        return super().state_dict({k: v for k, v in state.items() if k != _STEP})

    def abandon(self, ctx, state) -> None:
        state.pop(_STEP, None)

    def restart(self, ctx, state) -> None:
        """The tangents start at 0; the noise's seed and generator go on (a fresh
        :meth:`init_state` would draw a new seed from torch's global RNG inside ``step()``)."""
        state.pop(_STEP, None)
        fresh = self._recurrence.init_state(ctx)
        fresh.pop("windows", None)
        state.update(fresh)

    # ------------------------------------------------------------------ carrying
    def carries(self, ctx, state) -> bool:
        return True

    def carry_curvature(self, ctx, state) -> bool:
        return not self.hessian_free

    def carry(self, ctx, state, view) -> None:
        """``Z <- mu_d A Z + B`` through the coming step (the noise's tangent follows in
        :meth:`observe`, once the step has written the weights and its state)."""
        state.pop(_STEP, None)
        self._recurrence.carry(ctx, state, view)
        if self.temperature > 0:
            state[_STEP] = {(it.group_index, it.param_index): it for it in view.items}

    def observe(self, ctx, state, record) -> None:
        """The Langevin noise: ``w += n`` in place where the step was taken, and
        ``Z_w += dn/dlam`` for every tangent."""
        items = state.pop(_STEP, None)
        if items is None or not record.buckets:
            return
        tau2 = 2.0 * self.temperature
        rule = ctx.rule
        generators: dict[str, torch.Generator] = {}
        with torch.no_grad():
            for bucket in record.buckets:
                gen = generators.get(str(bucket.device))
                if gen is None:
                    gen = generators[str(bucket.device)] = _generator(state, bucket.device)
                xi = torch.randn(bucket.numel, generator=gen, dtype=bucket.dtype,
                                 device=bucket.device)
                ok = record.finite.to(bucket.device, bucket.dtype)
                for pi, p, noise in zip(bucket.param_indices, bucket.params, bucket.views(xi)):
                    key = (bucket.group_index, pi)
                    item = items[key]
                    gain, precond, dlog_c = _step_scale(rule, item)
                    # n = sqrt(2 tau c) xi, c = gain * P; times 0 where the step was skipped
                    if precond is not None:
                        noise.mul_(precond.sqrt_())
                    noise.mul_(_sqrt(gain * tau2) * ok)
                    p.add_(noise)
                    for tangent, z in zip(state["tangents"], state["Z"]):
                        kind = tangent[0]
                        if kind not in dlog_c or not _in_slot(ctx, tangent, item):
                            continue
                        # N = n * (1/2) dlog c / dvalue * dvalue / dtuned
                        coef = dlog_c[kind] * (0.5 * ctx.hyper_scale(kind, key[0]))
                        old = z["w"].get(key)
                        if old is None:
                            z["w"][key] = noise * coef
                        else:
                            old.addcmul_(noise, coef)
        for name, gen in generators.items():
            state["rng"][name] = gen.get_state()

    # ------------------------------------------------------------------ the readout
    def hypergradient(self, ctx, state, meta: MetaGradients) -> int:
        """One sample of the chain average: ``grad E(w_t) . Z_t`` (the hyper-step averages the
        window's samples)."""
        return int(read_out(ctx, state["tangents"], state["Z"], meta))


# ---------------------------------------------------------------------------- helpers
def _generator(state: dict, device: torch.device) -> torch.Generator:
    """The noise generator of ``device``, restored from the method state (created from the seed
    on first use of a device other than the CPU)."""
    name = str(device)
    gen = torch.Generator(device=device)
    saved = state["rng"].get(name)
    if saved is None:
        index = device.index if device.index is not None else 0
        gen.manual_seed((state["seed"] + 1 + index) % 2 ** 63)
    else:
        gen.set_state(saved)
    return gen


def _in_slot(ctx, tangent, item) -> bool:
    """Whether ``item``'s value of ``tangent``'s kind is tangent's tuned slot (a per-kind
    tangent: any tuned slot), as for RTRL's hyperparameter tangent ``L``."""
    kind, block, index = tangent
    slots = ctx.tuned[kind].group_slots[item.group_index]
    if slots is None:
        return False
    return block is None or slots[item.param_index] == (block, index)


def _sqrt(x):
    return x.sqrt() if isinstance(x, Tensor) else math.sqrt(x)


def _reciprocal(x):
    return x.reciprocal() if isinstance(x, Tensor) else 1.0 / x


def _step_scale(rule, item):
    """The effective step size of the step just taken, ``c = gain * P``: ``gain`` (a float or a
    tuned value: 0-dim, or shaped like the parameter) and ``P``, the preconditioner from the
    state the step wrote (a fresh tensor shaped like the parameter; None for 1), with
    ``d log c / d value`` for the tuned kinds ``c`` depends on (see the module docstring).
    Every value is finite, also after a skipped first step."""
    h, opts, st = item.hyper, item.options, item.state
    lr = h["lr"]
    # only tuned values (tensors) have tangents; a tuned lr is > 0, a tuned momentum < 1
    dlog: dict[str, float | Tensor] = {"lr": lr.reciprocal()} if isinstance(lr, Tensor) else {}
    gain = lr
    mu = h.get("momentum", 0.0)
    if isinstance(rule, SGDRule) or (isinstance(rule, RMSpropRule) and opts["has_momentum"]):
        if not is_zero(mu):     # the buffer's gain 1 / (1 - mu)
            inv = _reciprocal(1 - mu)
            if isinstance(mu, Tensor):
                dlog["momentum"] = inv
            damped = isinstance(rule, SGDRule) and not opts["nesterov"]
            gain = gain * ((1.0 - opts["dampening"]) if damped else 1.0) * inv
    if isinstance(rule, AdamRule):
        second = st["max_exp_avg_sq"] if opts["amsgrad"] else st["exp_avg_sq"]
        t = step_count_as_float64(st["step"]).clamp(min=1)
        bias_correction2_sqrt = (1 - opts["beta2"] ** t).sqrt()
        denom = second.sqrt().div_(bias_correction2_sqrt).add_(opts["eps"])
        return gain, _seen(denom.reciprocal_(), second), dlog
    if isinstance(rule, RMSpropRule):
        v = st["square_avg"]
        if opts["centered"]:
            v = torch.addcmul(v, st["grad_avg"], st["grad_avg"], value=-1).clamp_(min=0)
        return gain, _seen(v.sqrt().add_(opts["eps"]).reciprocal_(), st["square_avg"]), dlog
    if isinstance(rule, AdagradRule):
        gain = gain / (1 + (step_count_as_float64(st["step"]).clamp(min=1) - 1)
                       * opts["lr_decay"])
        return gain, _seen(st["sum"].sqrt().add_(opts["eps"]).reciprocal_(), st["sum"]), dlog
    return gain, None, dlog


def _seen(precond: Tensor, second: Tensor) -> Tensor:
    """``precond`` where the rule's second moment is positive, 0 where it is exactly 0 (in
    place): a coordinate that never had a gradient gets no noise (its preconditioner would be
    ``1 / eps``)."""
    return precond.masked_fill_(second == 0, 0.0)
