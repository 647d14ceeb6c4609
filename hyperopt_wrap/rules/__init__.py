"""Differentiable update rules, one per base optimizer, and their registry.

To support your own optimizer, subclass :class:`UpdateRule` and register it::

    from hyperopt_wrap import register_rule
    from hyperopt_wrap.rules import UpdateRule

    class MyRule(UpdateRule):
        kinds = ("lr",)
        def options(self, group): return {}
        def init_state(self, param, options): return {}
        def update(self, param, grad, state, hyper, options):
            return param - hyper["lr"] * grad.sign(), {}

    register_rule(MySignSGD, MyRule())
"""
from __future__ import annotations

import torch

from .adagrad import AdagradRule
from .adam import AdamRule
from .base import KINDS, Tangent, UpdateRule
from .rmsprop import RMSpropRule
from .sgd import SGDRule

_REGISTRY: dict[type, UpdateRule] = {
    torch.optim.SGD: SGDRule(),
    torch.optim.Adam: AdamRule(decoupled_weight_decay=False),
    torch.optim.AdamW: AdamRule(decoupled_weight_decay=True),
    torch.optim.RMSprop: RMSpropRule(),
    torch.optim.Adagrad: AdagradRule(),
}


def register_rule(optimizer_cls: type, rule: UpdateRule) -> None:
    """Make ``HyperOptimizer(optimizer_cls, ...)`` use ``rule`` for its steps."""
    if not isinstance(optimizer_cls, type):
        raise TypeError(f"register_rule expects an optimizer class, got {optimizer_cls!r}")
    if not isinstance(rule, UpdateRule):
        raise TypeError(f"register_rule expects an UpdateRule instance, got {rule!r}; "
                        "subclass hyperopt_wrap.rules.UpdateRule")
    unknown = set(rule.kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"rule.kinds has unknown kinds {sorted(unknown)}; choose from {KINDS}")
    _REGISTRY[optimizer_cls] = rule


def get_rule(optimizer_cls: type) -> UpdateRule:
    if isinstance(optimizer_cls, torch.optim.Optimizer):
        raise TypeError(f"HyperOptimizer takes the optimizer class, not an instance: write "
                        f"HyperOptimizer(torch.optim.{type(optimizer_cls).__name__}, "
                        f"model.parameters(), lr=...) instead of passing {type(optimizer_cls).__name__}(...)")
    try:
        return _REGISTRY[optimizer_cls]
    except (KeyError, TypeError):
        names = ", ".join(f"torch.optim.{c.__name__}" if c.__module__.startswith("torch.optim")
                          else f"{c.__module__}.{c.__qualname__}" for c in _REGISTRY)
        raise TypeError(
            f"HyperOptimizer has no update rule for {optimizer_cls!r}. Supported: {names}. "
            "To add one, subclass hyperopt_wrap.rules.UpdateRule and call "
            "hyperopt_wrap.register_rule(YourOptimizer, YourRule())") from None


__all__ = ["UpdateRule", "register_rule", "get_rule", "SGDRule", "AdamRule", "RMSpropRule",
           "AdagradRule", "KINDS", "Tangent"]
