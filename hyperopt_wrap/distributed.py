"""torch.distributed: one set of hyperparameters for every rank.

The tuned values stay identical on every rank when every rank's hyper-step sees the same
hypergradient.  Two layouts need a collective for that, once per hyper-step, on the window's
accumulated hypergradient (a few numbers per tuned slot, on the device, no host read):

* *shards* (FSDP2, ``torch.distributed.fsdp.fully_shard``: parameters are DTensors and each rank
  steps its local shard): a rank's dot products ``grad E . B`` cover its shard only, so the
  window's hypergradient is their SUM over the ranks.  Each rank also decides a step's skip on its
  own shard's gradient, so the finite flag is agreed (one tiny MAX) every step: a non-finite
  gradient anywhere skips the step on every rank.
* *replicas* (DDP): every rank holds the whole model.  Without ``val_loss`` their hypergradients
  agree already (DDP averages the gradients the hypergradient is made of); with a ``val_loss``
  each rank's validation batch gives its own, and the AVERAGE is the hypergradient of the mean
  validation loss.  The average is taken either way (world size 2: exactly the shared value).

The base step under FSDP2 runs on the local tensors (``p.to_local()``, ``p.grad.to_local()``),
never through DTensor dispatch; the optimizer state holds each rank's local shards as plain
tensors, so ``state_dict()`` is a per-rank (sharded) checkpoint.  A ``val_loss`` is
differentiated by ``backward()`` there (FSDP2 gathers the weights and reduces the gradients in
its hooks, which ``torch.autograd.grad`` would not run).
"""
from __future__ import annotations

import sys
from typing import Any

import torch
from torch import Tensor

# ``process_group="auto"``: DTensor parameters reduce over their mesh; plain ones over the
# default group when torch.distributed is initialised with more than one rank
AUTO = "auto"

_WORKS = ("FSDP2 (torch.distributed.fsdp.fully_shard) with method='greedy' at global, group or "
          "tensor granularity (with or without val_loss), or DDP")


def _dist():
    return torch.distributed if torch.distributed.is_available() else None


def _dtensor_type():
    """DTensor, if anything imported it (no DTensor parameter can exist otherwise: a plain
    single-process run does not pay for the import)."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def constructed_by_zero() -> bool:
    """Whether the HyperOptimizer being constructed is ZeroRedundancyOptimizer's local
    optimizer (its ``_init_local_optimizer`` is on the stack): ZeRO calls
    ``optimizer_class(partition, **defaults)`` and leaves no other mark on what it passes."""
    zero = sys.modules.get("torch.distributed.optim.zero_redundancy_optimizer")
    if zero is None:
        return False
    code = getattr(getattr(zero.ZeroRedundancyOptimizer, "_init_local_optimizer", None),
                   "__code__", None)
    frame = sys._getframe(1)
    for _ in range(32):
        if frame is None:
            return False
        if frame.f_code is code:
            return True
        frame = frame.f_back
    return False


ZERO_MESSAGE = (
    "HyperOptimizer cannot run under torch.distributed.optim.ZeroRedundancyOptimizer: ZeRO "
    "hands each rank's HyperOptimizer only its partition of the parameters (each rank would "
    "tune its hyperparameters from its own partition), and its consolidate_state_dict() / "
    "load_state_dict() keep only torch's entries and bypass HyperOptimizer.load_state_dict(), "
    "so the tuned hyperparameters could not be checkpointed. What works: FSDP2 "
    "(torch.distributed.fsdp.fully_shard(model), then HyperOptimizer(torch.optim.SGD, "
    "model.parameters(), ...) on every rank: parameters, gradients and optimizer state are "
    "sharded, the hypergradient is summed over the shards), or DDP with HyperOptimizer on every "
    "rank (the hypergradient is averaged). See the README section 'DDP and FSDP2'")


class Reduction:
    """The collectives that keep the hyperparameters of one HyperOptimizer identical across the
    ranks of ``group``: ``sharded`` sums the window's hypergradient (each rank holds a shard),
    otherwise it is averaged (each rank holds a replica)."""

    def __init__(self, group, sharded: bool):
        self.group = group
        self.sharded = sharded
        self.world_size = _dist().get_world_size(group)

    def __deepcopy__(self, memo):
        return self         # a copy in this process reduces over the same group

    def __getstate__(self):
        raise TypeError("a HyperOptimizer that reduces over a torch.distributed process group "
                        "cannot be pickled (the group belongs to this process); save "
                        "opt.state_dict() instead")

    def __repr__(self) -> str:
        return f"Reduction({'sum over shards' if self.sharded else 'average over replicas'}, " \
               f"world_size={self.world_size})"

    def agree_finite(self, finite: Tensor) -> Tensor:
        """A step is taken only where every rank's gradient shard is finite (shards only)."""
        bad = (~finite).to(torch.float32)
        _dist().all_reduce(bad, op=_dist().ReduceOp.MAX, group=self.group)
        return bad == 0

    def sum_(self, t: Tensor) -> Tensor:
        """``t`` summed over the ranks, in place (``max_grad_norm``'s squared norm over the
        shards)."""
        _dist().all_reduce(t, group=self.group)
        return t

    def reduce_window(self, controller) -> None:
        """All-reduce every accumulated hypergradient block and the window's finite flag in one
        collective per dtype (usually one): SUM over shards, AVERAGE over replicas.  A window
        that is not finite on some rank (a non-finite val_loss there) is not finite anywhere."""
        blocks = [acc for tk in controller.tuned.values() for acc in tk.accums]
        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        for acc in blocks:
            by_dtype.setdefault(acc.dtype, []).append(acc)
        flag_done = False
        for dtype, accs in by_dtype.items():
            parts = [a.reshape(-1) for a in accs]
            if not flag_done:
                parts.append((~controller.window_finite).to(dtype).reshape(1))
            flat = torch.cat(parts)
            _dist().all_reduce(flat, group=self.group)
            if not flag_done:
                controller.window_finite.copy_(flat[-1] == 0)
                flat = flat[:-1]
                flag_done = True
            if not self.sharded:
                flat.div_(self.world_size)
            for acc, part in zip(accs, flat.split([a.numel() for a in accs])):
                acc.copy_(part.view_as(acc))

    def check_layout(self, tuned: dict) -> None:
        """Every rank tunes the same slots from the same starting values (one collective at
        construction); otherwise the per-hyper-step reduction would mix unrelated numbers."""
        mine = [(k, tk.granularity, [tuple(v.shape) for v in tk.values],
                 [float(v.reshape(-1)[0]) for v in tk.values if v.numel()])
                for k, tk in tuned.items()]
        everyone: list[Any] = [None] * self.world_size
        _dist().all_gather_object(everyone, mine, group=self.group)
        if any(other != mine for other in everyone):
            raise ValueError(
                "HyperOptimizer's tuned hyperparameters differ across the ranks of its process "
                "group (other parameter shapes, param groups or starting values), so their "
                "hypergradients cannot be reduced; construct it with the same model and "
                "arguments on every rank, or pass process_group=None where each rank tunes its "
                "own hyperparameters (e.g. pipeline stages)")


def resolve(process_group, params: list[Tensor]) -> tuple[Reduction | None, bool]:
    """``(reduction, sharded)`` for ``HyperOptimizer(process_group=...)`` and its parameters."""
    if isinstance(process_group, str) and process_group != AUTO:
        raise ValueError(f"process_group must be 'auto', None or a torch.distributed process "
                         f"group, got {process_group!r}")
    auto = isinstance(process_group, str)
    dtensor = _dtensor_type()
    is_d = [dtensor is not None and isinstance(p, dtensor) for p in params]
    if any(is_d):
        if not all(is_d):
            raise ValueError("HyperOptimizer got DTensor (FSDP2) parameters mixed with plain "
                             "ones; apply fully_shard to the root module too, so that every "
                             "parameter is sharded (or give it only plain parameters)")
        meshes = []         # distinct meshes (fully_shard per layer makes equal ones)
        for p in params:
            if not any(p.device_mesh is m or p.device_mesh == m for m in meshes):
                meshes.append(p.device_mesh)
        mesh = meshes[0]
        if len(meshes) != 1 or mesh.ndim != 1 or any(
                len(p.placements) != 1 or not p.placements[0].is_shard() for p in params):
            raise ValueError("HyperOptimizer supports DTensor parameters sharded over one "
                             "1-D device mesh (FSDP2's fully_shard(model) on one mesh); got "
                             f"placements {sorted({str(p.placements) for p in params})} on "
                             f"{len(meshes)} mesh(es). HSDP, tensor parallelism and replicated "
                             "DTensors are not supported")
        group = mesh.get_group()
        if process_group is None:
            raise ValueError("process_group=None with sharded (FSDP2) parameters would tune each "
                             "rank's hyperparameters from its own shard; leave "
                             "process_group='auto' (the parameters' device mesh)")
        if not auto and process_group is not group:
            raise ValueError("process_group must be 'auto' for sharded (FSDP2) parameters: the "
                             "hypergradient is summed over the ranks of their device mesh")
        return Reduction(group, sharded=True), True
    if process_group is None:
        return None, False
    d = _dist()
    if auto:
        if d is None or not d.is_initialized() or d.get_world_size() == 1:
            return None, False
        return Reduction(d.group.WORLD, sharded=False), False
    if d is None or not d.is_initialized():
        raise ValueError("process_group= given but torch.distributed is not initialised; call "
                         "torch.distributed.init_process_group first, or leave process_group "
                         "at 'auto'")
    return Reduction(process_group, sharded=False), False


def check_sharded_options(method, granularity: dict[str, str], recovery) -> None:
    """What the sharded (FSDP2) step supports; anything else is refused with what works."""
    if type(method).__name__ != "Greedy":
        raise ValueError(f"method={method.name!r} is not supported with sharded (FSDP2) "
                         f"parameters (its Hessian-vector products and recorded steps would "
                         f"need the whole model on each rank); what works: {_WORKS}")
    element = [k for k, g in granularity.items() if g == "element"]
    if element:
        raise ValueError(f"granularity 'element' (for {element}) is not supported with sharded "
                         f"(FSDP2) parameters; what works: {_WORKS}")
    if recovery == "rollback":
        raise ValueError("recovery='rollback' is not supported with sharded (FSDP2) parameters "
                         "(its gradient-norm test would see one shard); use recovery='restore' "
                         "(the default), 'backoff' or None")


def check_added_group(params: list[Tensor], sharded: bool) -> None:
    """A param group added later under FSDP2 holds DTensor parameters too."""
    dtensor = _dtensor_type()
    if sharded and not all(isinstance(p, dtensor) for p in params):
        raise ValueError("add_param_group: this HyperOptimizer steps sharded (FSDP2) "
                         "parameters, so every parameter of a new group must be a DTensor "
                         "sharded by fully_shard too")


class ShardedParams:
    """The local tensors of DTensor parameters, as the base step sees them: per step their
    ``.grad`` is the local shard of ``p.grad`` (cleared again after the step), and the optimizer
    state is keyed by the DTensor parameter but holds local tensors."""

    def __init__(self):
        self._locals: dict[int, Tensor] = {}     # id(param) -> its local tensor (a stable view)
        self.owners: dict[int, Tensor] = {}      # id(local) -> param

    def local(self, p: Tensor) -> Tensor:
        with torch.no_grad():
            now = p.to_local()
        cached = self._locals.get(id(p))
        if cached is None or cached.data_ptr() != now.data_ptr() or cached.shape != now.shape \
                or cached.stride() != now.stride():
            if cached is not None:
                self.owners.pop(id(cached), None)
            cached = self._locals[id(p)] = now
            self.owners[id(now)] = p
        return cached

    def groups(self, param_groups: list[dict]) -> list[dict]:
        """The param groups with each parameter replaced by its local tensor."""
        return [dict(g, params=[self.local(p) for p in g["params"]]) for g in param_groups]

    def load_grads(self, param_groups: list[dict], local_groups: list[dict]) -> None:
        for g, lg in zip(param_groups, local_groups):
            for p, lp in zip(g["params"], lg["params"]):
                lp.grad = None if p.grad is None else p.grad.to_local()

    def backward_grads(self, loss: Tensor, local_params: list[Tensor]) -> list[Tensor | None]:
        """The local shards of ``d loss / d p`` by ``loss.backward()`` (FSDP2's hooks all-gather
        and reduce-scatter, averaging over the ranks: the gradient of the mean of the ranks'
        losses), the parameters' own gradients kept aside meanwhile."""
        params = [self.owners[id(lp)] for lp in local_params]
        saved = [p.grad for p in params]
        try:
            for p in params:
                p.grad = None
            loss.backward()
            return [None if p.grad is None else p.grad.to_local() for p in params]
        finally:
            for p, g in zip(params, saved):
                p.grad = g

    @staticmethod
    def release_grads(local_groups: list[dict]) -> None:
        for lg in local_groups:
            for lp in lg["params"]:
                lp.grad = None

    def state(self, state: dict) -> "LocalKeyedState":
        return LocalKeyedState(state, self.owners)

    @staticmethod
    def localise_state(state: dict) -> dict:
        """State a base optimizer created eagerly (Adagrad) as local tensors."""
        dtensor = _dtensor_type()
        return {k: (v.to_local() if dtensor is not None and isinstance(v, dtensor) else v)
                for k, v in state.items()}


class LocalKeyedState:
    """The optimizer's ``state`` as the stepper reads it under FSDP2: keyed by local tensors,
    stored under their DTensor parameters (so torch's ``state_dict`` finds it)."""

    def __init__(self, state: dict, owners: dict[int, Tensor]):
        self._state, self._owners = state, owners

    def get(self, local: Tensor, default=None):
        return self._state.get(self._owners[id(local)], default)

    def __getitem__(self, local: Tensor):
        return self._state[self._owners[id(local)]]

    def __setitem__(self, local: Tensor, value) -> None:
        self._state[self._owners[id(local)]] = value

    def __contains__(self, local: Tensor) -> bool:
        return self._owners[id(local)] in self._state
