"""Trainer callbacks that log the hyperparameters in use.

A tuned learning rate's ``group["lr"]`` is a scheduler *scale*, so the readouts of the
trainers show the schedule, not the learning rate the step uses: Lightning's
``LearningRateMonitor`` logs ``group["lr"]``, the transformers ``Trainer`` logs
``lr_scheduler.get_last_lr()[0]`` as ``learning_rate``.  These callbacks log what
:meth:`HyperOptimizer.hyperparameters` returns (names as in :mod:`hyperopt_wrap.monitor`,
prefixed ``hyper/``: ``hyper/lr/0``, ``hyper/momentum/0``, ``hyper/lr/0/mean`` ...).

* :class:`HyperparameterCallback` (``lightning.pytorch.Callback``);
* :class:`HyperparameterTrainerCallback` (``transformers.TrainerCallback``).

Each is created on first use, so this module imports without Lightning or transformers.
The HyperOptimizer is found behind wrappers (``LightningOptimizer``, accelerate's
``AcceleratedOptimizer``) through their ``.optimizer`` attributes.
"""
from __future__ import annotations

import functools

from .monitor import as_floats, find_hyper_optimizer, readout

__all__ = ["HyperparameterCallback", "HyperparameterTrainerCallback", "hyperparameters_in_use"]


def hyperparameters_in_use(optimizer, prefix: str = "hyper/", *, hypergradients: bool = False,
                           floats: bool = True) -> dict:
    """``{prefix + name: value}`` for the tuned kinds of the HyperOptimizer ``optimizer`` is
    or wraps (empty when it is none): floats, or with ``floats=False`` 0-dim device tensors
    (nothing read on the host)."""
    opt = find_hyper_optimizer(optimizer)
    if opt is None:
        return {}
    values = readout(opt, tuned_only=True, hypergradients=hypergradients, counters=False)
    if floats:
        values = as_floats(values)
    return {prefix + k: v for k, v in values.items()}


def _lightning_callback():
    try:
        from lightning.pytorch import Callback
    except ImportError as e:
        raise ImportError("HyperparameterCallback needs Lightning: pip install lightning") from e

    class HyperparameterCallback(Callback):
        """Logs the hyperparameters in use of every HyperOptimizer among
        ``trainer.optimizers`` through ``pl_module.log_dict`` at ``on_train_batch_end`` of
        each batch that stepped (the loggers receive them at ``log_every_n_steps``).

        The values are those of the step just taken: read by a step post-hook right after
        ``opt.step()``, before Lightning steps a step-interval scheduler (which it does
        before ``on_train_batch_end``, so ``opt.hyperparameters()`` read there carries the
        next step's schedule).  They are passed as device tensors: the host reads them only
        when Lightning logs.

        Args:
            prefix: name prefix (``hyper/lr/0``); the names of a HyperOptimizer at index
                ``i > 0`` of ``trainer.optimizers`` carry it: ``hyper/optimizer1/lr/0``.
            hypergradients: also log ``hypergrad_norm/<kind>``.
            prog_bar: show them in the progress bar too.
        """

        def __init__(self, prefix: str = "hyper/", hypergradients: bool = False,
                     prog_bar: bool = False):
            super().__init__()
            self.prefix, self.hypergradients, self.prog_bar = prefix, hypergradients, prog_bar
            self._handles, self._latest = [], {}

        def on_train_start(self, trainer, pl_module):
            self._detach()
            for i, optimizer in enumerate(trainer.optimizers):
                opt = find_hyper_optimizer(optimizer)
                if opt is not None:
                    prefix = self.prefix if i == 0 else f"{self.prefix}optimizer{i}/"
                    self._handles.append(opt.register_step_post_hook(
                        functools.partial(self._after_step, prefix)))

        def _after_step(self, prefix, opt, args, kwargs):
            self._latest[prefix] = hyperparameters_in_use(
                opt, prefix, hypergradients=self.hypergradients, floats=False)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            metrics = {k: v for values in self._latest.values() for k, v in values.items()}
            self._latest = {}
            if metrics:
                pl_module.log_dict(metrics, on_step=True, on_epoch=False, logger=True,
                                   prog_bar=self.prog_bar, batch_size=1)

        def _detach(self):
            for handle in self._handles:
                handle.remove()
            self._handles, self._latest = [], {}

        def on_train_end(self, trainer, pl_module):
            self._detach()

        def on_exception(self, trainer, pl_module, exception):
            self._detach()

    return HyperparameterCallback


def _transformers_callback():
    try:
        from transformers import TrainerCallback
    except ImportError as e:
        raise ImportError("HyperparameterTrainerCallback needs transformers: pip install "
                          "transformers") from e

    class HyperparameterTrainerCallback(TrainerCallback):
        """Puts the hyperparameters in use into the Trainer's training logs.

        The Trainer logs as ``learning_rate`` the schedule's lr of the step just taken (read
        after ``optimizer.step()``, before ``lr_scheduler.step()``).  This callback reads the
        hyperparameters in use at that same moment (``on_optimizer_step``, as device tensors)
        and in ``on_log`` (training logs, those with a ``learning_rate``) sets
        ``learning_rate`` to the first param group's lr in use (when that is one value:
        global or group granularity) and adds ``hyper/lr/0`` etc.; in ``logs`` (seen by the
        callbacks after it) and in ``state.log_history`` (which the Trainer appended before
        calling the callbacks).  The reporting callbacks of ``report_to`` (TensorBoard,
        wandb, ...) come before the user's callbacks: :meth:`install` puts this one first, so
        that they report the lr in use too.

        Args:
            optimizer: the HyperOptimizer (default: the Trainer's optimizer, unwrapped).
            prefix: name prefix of the added entries.
            hypergradients: also add ``hypergrad_norm/<kind>``.
        """

        def __init__(self, optimizer=None, prefix: str = "hyper/", hypergradients: bool = False):
            self.optimizer, self.prefix, self.hypergradients = optimizer, prefix, hypergradients
            self._latest = {}

        @classmethod
        def install(cls, trainer, **kwargs):
            """Create one and put it first among ``trainer``'s callbacks; returns it."""
            callback = cls(**kwargs)
            trainer.callback_handler.callbacks.insert(0, callback)
            return callback

        def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
            self._latest = hyperparameters_in_use(self.optimizer or optimizer, self.prefix,
                                                  hypergradients=self.hypergradients,
                                                  floats=False)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs is None or "learning_rate" not in logs or not self._latest:
                return
            update = as_floats(self._latest)
            if f"{self.prefix}lr/0" in update:
                update["learning_rate"] = update[f"{self.prefix}lr/0"]
            history = state.log_history
            # the Trainer appended a copy of these logs (and the step) just before on_log
            mirror = history[-1] if history and history[-1].get("step") == state.global_step \
                and all(history[-1].get(k, logs) is v for k, v in logs.items()) else None
            logs.update(update)
            if mirror is not None:
                mirror.update(update)

    return HyperparameterTrainerCallback


_FACTORIES = {"HyperparameterCallback": _lightning_callback,
              "HyperparameterTrainerCallback": _transformers_callback}


@functools.cache
def _get(name: str):
    return _FACTORIES[name]()


def __getattr__(name: str):
    if name in _FACTORIES:
        return _get(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
