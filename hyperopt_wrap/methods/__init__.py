"""Hypergradient methods, one file each.  Pass a name or an instance as ``method=``."""
from __future__ import annotations

from .base import HypergradientMethod, MetaGradients, MethodContext, RecordingMethod
from .distill import Distill
from .forward_gradient import ForwardGradient
from .greedy import Greedy
from .implicit import Implicit
from .rtrl import RTRL
from .sgld import SGLD
from .unroll import Unroll

METHODS: dict[str, type[HypergradientMethod]] = {"greedy": Greedy, "implicit": Implicit,
                                                   "unroll": Unroll, "rtrl": RTRL,
                                                   "forward_gradient": ForwardGradient,
                                                   "sgld": SGLD, "distill": Distill}


def resolve_method(method) -> HypergradientMethod:
    if isinstance(method, HypergradientMethod):
        return method
    if isinstance(method, type) and issubclass(method, HypergradientMethod):
        return method()
    if isinstance(method, str) and method in METHODS:
        return METHODS[method]()
    raise ValueError(f"unknown hypergradient method {method!r}; choose one of {sorted(METHODS)} "
                     "or pass an instance such as hyperopt_wrap.methods.Greedy()")


__all__ = ["HypergradientMethod", "Greedy", "Implicit", "Unroll", "RTRL", "ForwardGradient",
           "SGLD", "Distill", "METHODS", "resolve_method", "MetaGradients", "MethodContext",
           "RecordingMethod"]
