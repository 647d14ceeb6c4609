"""Checks a checkpoint passes before ``HyperOptimizer.load_state_dict`` changes anything.

Loading validates every part first (the hyperopt_wrap entry, the base optimizer's state, the
hyper-optimizer's state, the method's state) and only then writes; a checkpoint that fails a
check raises with the optimizer exactly as it was.  The checks are about what a later step
would trip on: missing entries, tensors of the wrong shape (a model of another width), types,
non-finite tuned values, and tensors a kernel could not read (the meta device).
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into this optimizer (nothing was changed)."""


def require(entry: Any, keys: Iterable[str], where: str) -> None:
    """``entry`` is a dict holding every key in ``keys``."""
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where} must be a dict, got {type(entry).__name__}; load a "
                              "state_dict saved by HyperOptimizer.state_dict()")
    missing = [k for k in keys if k not in entry]
    if missing:
        raise CheckpointError(f"{where} is missing {missing}: the checkpoint is truncated or was "
                              "edited; load an unmodified HyperOptimizer.state_dict()")


def check_tensor(value: Any, where: str, shape: tuple | None = None,
                 floating: bool = True) -> Tensor:
    if not isinstance(value, Tensor):
        raise CheckpointError(f"{where} must be a tensor, got {type(value).__name__}")
    if value.device.type == "meta":
        raise CheckpointError(f"{where} is on the meta device (it holds no values); load a "
                              "checkpoint with real tensors")
    if floating and not value.is_floating_point():
        raise CheckpointError(f"{where} must be a floating-point tensor, got {value.dtype}")
    if shape is not None and tuple(value.shape) != tuple(shape):
        raise CheckpointError(f"{where} has shape {tuple(value.shape)} but this optimizer's is "
                              f"{tuple(shape)}: the checkpoint comes from a model of another "
                              "shape; load it into the same model architecture")
    return value


def check_base_state(rule, param_groups: list[dict], saved: dict[str, Any]) -> None:
    """torch's part of the checkpoint: as many groups and parameters as ours (torch checks
    that too, but after its pre-hooks), and every state tensor the rule creates shaped like
    the parameter it belongs to (a model of another width is caught here)."""
    require(saved, ("state", "param_groups"), "state_dict")
    groups = saved["param_groups"]
    if not isinstance(groups, (list, tuple)) or len(groups) != len(param_groups):
        raise CheckpointError(f"loaded state dict has {len(groups) if isinstance(groups, list) else '?'} "
                              f"parameter groups, this optimizer {len(param_groups)}")
    ids: dict[Any, Tensor] = {}
    options = {}
    for gi, (theirs, mine) in enumerate(zip(groups, param_groups)):
        require(theirs, ("params",), f"state_dict['param_groups'][{gi}]")
        if len(theirs["params"]) != len(mine["params"]):
            raise CheckpointError(f"loaded state dict's param group {gi} has "
                                  f"{len(theirs['params'])} parameters, this optimizer's "
                                  f"{len(mine['params'])}")
        for pid, p in zip(theirs["params"], mine["params"]):
            ids[pid] = p
            options[pid] = mine
    state = saved["state"]
    if not isinstance(state, dict):
        raise CheckpointError("state_dict['state'] must be a dict of per-parameter states")
    for pid, st in state.items():
        if pid not in ids:
            raise CheckpointError(f"state_dict['state'] has an entry for parameter {pid!r}, "
                                  "which no param group lists")
        if not isinstance(st, dict):
            raise CheckpointError(f"state_dict['state'][{pid!r}] must be a dict")
        p = ids[pid]
        try:
            template = rule.init_state(torch.empty_like(p, device="meta"),
                                       rule.options(options[pid]))
        except Exception:       # a registered rule that cannot build state on meta
            template = {}
        for name, value in st.items():
            where = f"state_dict['state'][{pid!r}][{name!r}]"
            like = template.get(name)
            if name == "step":
                if not isinstance(value, (int, float)) and check_tensor(
                        value, where, floating=False).numel() != 1:
                    raise CheckpointError(f"{where} must be a number or a 1-element tensor")
            elif isinstance(like, Tensor):
                check_tensor(value, where, like.shape, floating=like.is_floating_point())
            elif rule.param_shaped_state and isinstance(value, Tensor):
                check_tensor(value, where, p.shape)     # e.g. SGD's lazily made momentum buffer


def check_shapes(saved: Any, param_groups: list[dict]) -> None:
    """The parameter shapes a checkpoint was saved with (newer checkpoints keep them) against
    ours: a model of another width is refused even where no state tensor would show it."""
    if saved is None:
        return
    mine = [[list(p.shape) for p in g["params"]] for g in param_groups]
    theirs = [[list(s) for s in g] for g in saved] if isinstance(saved, (list, tuple)) else saved
    if theirs != mine:
        bad = next(((gi, pi, t, m) for gi, (tg, mg) in enumerate(zip(theirs, mine))
                    for pi, (t, m) in enumerate(zip(tg, mg)) if t != m), None)
        where = (f": parameter {bad[1]} of group {bad[0]} was {tuple(bad[2])}, here "
                 f"{tuple(bad[3])}") if bad else ""
        raise CheckpointError(f"the checkpoint comes from a model with other parameter shapes"
                              f"{where}; load it into the same model architecture")


def check_method_state(params: list[list[Tensor]], saved: Any, where: str = "hyper['method']"
                       ) -> None:
    """Tensors a method keeps per parameter (under ``(group, index)`` keys) are shaped like that
    parameter, and the keys name parameters that exist."""
    if isinstance(saved, dict):
        for key, value in saved.items():
            here = f"{where}[{key!r}]"
            if isinstance(key, tuple) and len(key) == 2 and all(isinstance(i, int) for i in key):
                gi, pi = key
                if not (0 <= gi < len(params) and 0 <= pi < len(params[gi])):
                    raise CheckpointError(f"{here} names parameter {key}, which this optimizer "
                                          "does not have; load it into the same model architecture")
                _check_like(value, params[gi][pi], here)
            else:
                check_method_state(params, value, here)
    elif isinstance(saved, (list, tuple)):
        for i, value in enumerate(saved):
            check_method_state(params, value, f"{where}[{i}]")
    elif isinstance(saved, Tensor) and saved.device.type == "meta":
        check_tensor(saved, where, floating=False)


def _check_like(value: Any, param: Tensor, where: str) -> None:
    if isinstance(value, Tensor):
        check_tensor(value, where, param.shape)
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_like(v, param, f"{where}[{k!r}]")
