"""hyperopt_wrap: tune lr, momentum and weight decay during the one training run you do anyway."""
from .curvature import CurvatureError, FiniteDifferences
from .normalized_momentum import NormalizedMomentum
from .hierarchical import Hierarchical
from .methods import RTRL, SGLD, Distill, ForwardGradient, Greedy, Implicit, Unroll
from .optimizer import HyperOptimizer
from .monitor import HyperMonitor
from .rules import UpdateRule, register_rule

__version__ = "0.6.5"
__all__ = ["HyperOptimizer", "HyperMonitor", "NormalizedMomentum", "Hierarchical",
           "register_rule", "UpdateRule",
           "Greedy", "Implicit", "Unroll", "RTRL",
           "ForwardGradient", "SGLD", "Distill", "FiniteDifferences", "CurvatureError",
           "__version__"]
