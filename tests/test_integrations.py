"""The Lightning and transformers callbacks log the hyperparameters in use, not the schedule.

Each runs a real trainer (CPU, a few steps, a tiny model) on a HyperOptimizer with an LR
scheduler; the truth is read independently with ``opt.hyperparameters()`` at the same moment
(after each optimizer step, in the module's own ``optimizer_step``; a TrainerCallback's
``on_optimizer_step``), and the logged
lr must equal it and differ from ``group["lr"]`` (the schedule, which the trainers' own
readouts show)."""
from __future__ import annotations

import importlib
import sys
import warnings

import pytest
import torch
from torch import nn

from hyperopt_wrap import HyperOptimizer
from hyperopt_wrap.integrations import hyperparameters_in_use
from hyperopt_wrap.monitor import find_hyper_optimizer


def _data(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return x, x @ torch.randn(4, 1, generator=g) + 0.1 * torch.randn(n, 1, generator=g)


def test_helper_unwraps_and_ignores_other_optimizers():
    model = nn.Linear(4, 1)
    opt = HyperOptimizer(torch.optim.SGD, model.parameters(), lr=0.1, momentum=0.9,
                         tune=("lr", "momentum"), granularity={"lr": "tensor"})
    hp = opt.hyperparameters()

    class Wrapped:
        optimizer = opt
    values = hyperparameters_in_use(Wrapped())
    assert values == {"hyper/lr/0/mean": pytest.approx(float(hp["lr"][0].mean())),
                      "hyper/lr/0/min": float(hp["lr"][0].min()),
                      "hyper/lr/0/max": float(hp["lr"][0].max()),
                      "hyper/momentum/0": float(hp["momentum"][0])}
    assert hyperparameters_in_use(torch.optim.SGD(model.parameters(), lr=0.1)) == {}


def test_missing_frameworks_name_their_install(monkeypatch):
    import hyperopt_wrap.integrations as integrations
    monkeypatch.setitem(sys.modules, "lightning", None)
    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)
    monkeypatch.setitem(sys.modules, "transformers", None)
    integrations._get.cache_clear()
    try:
        with pytest.raises(ImportError, match="pip install lightning"):
            integrations.HyperparameterCallback
        with pytest.raises(ImportError, match="pip install transformers"):
            from hyperopt_wrap.integrations import HyperparameterTrainerCallback  # noqa: F401
        with pytest.raises(AttributeError):
            integrations.NoSuchCallback
    finally:
        integrations._get.cache_clear()
    importlib.reload(integrations)          # importable without either


# ---------------------------------------------------------------------------- Lightning
def test_lightning_callback_logs_the_lr_in_use():
    pytest.importorskip("lightning")
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import LearningRateMonitor
    from lightning.pytorch.loggers import Logger
    from hyperopt_wrap.integrations import HyperparameterCallback

    class MemoryLogger(Logger):
        def __init__(self):
            super().__init__()
            self.rows = []

        name, version = "memory", 0

        def log_hyperparams(self, params, *args, **kwargs):
            pass

        def log_metrics(self, metrics, step=None):
            self.rows.append((step, dict(metrics)))

    class Regression(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
            self.truth, self.schedule = [], []

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            opt = HyperOptimizer(torch.optim.SGD, self.parameters(), lr=0.05, momentum=0.9)
            scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

        def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
            optimizer.step(closure=optimizer_closure)       # a LightningOptimizer
            opt = self.trainer.optimizers[0]                # before the scheduler's step
            self.truth.append(float(opt.hyperparameters()["lr"][0]))
            self.schedule.append(opt.param_groups[0]["lr"])

    x, y = _data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    module, logger = Regression(), MemoryLogger()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")      # Lightning's advice on workers and small data
        trainer = pl.Trainer(max_steps=6, accelerator="cpu", logger=logger,
                             enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, log_every_n_steps=1,
                             callbacks=[HyperparameterCallback(hypergradients=True),
                                        LearningRateMonitor(logging_interval="step")])
        trainer.fit(module, loader)
    assert isinstance(trainer.optimizers[0], HyperOptimizer)
    ours = [(step, m) for step, m in logger.rows if "hyper/lr/0" in m]
    assert [step for step, _ in ours] == list(range(6))
    logged = [m["hyper/lr/0"] for _, m in ours]
    assert logged == pytest.approx(module.truth, rel=1e-6) and len(module.truth) == 6
    assert all("hyper/hypergrad_norm/lr" in m for _, m in ours)
    # the lr in use is not the schedule that group["lr"] (and LearningRateMonitor) shows
    assert all(abs(a - b) > 1e-3 * b for a, b in zip(logged[1:], module.schedule[1:]))
    monitored = [m["lr-HyperOptimizer"] for _, m in logger.rows if "lr-HyperOptimizer" in m]
    assert monitored == pytest.approx([0.05, 0.05, 0.025, 0.025, 0.0125, 0.0125])


# ---------------------------------------------------------------------------- transformers
def _hf_parts():
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                        bos_token_id=0, eos_token_id=0, attn_implementation="eager")
    model = GPT2LMHeadModel(config)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 32, (24, 8), generator=g)
    data = [{"input_ids": row, "labels": row} for row in ids]
    return model, data


def _hf_trainer(tmp_path, callbacks, report_to=()):
    from transformers import Trainer, TrainerCallback, TrainingArguments

    model, data = _hf_parts()
    opt = HyperOptimizer(torch.optim.AdamW, model.parameters(), lr=1e-2, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))

    class Truth(TrainerCallback):
        """The lr in use and the schedule's, read right after each optimizer step (before the
        scheduler's), which is when the Trainer reads the learning_rate it logs."""
        rows = {}

        def on_optimizer_step(self, args, state, control, **kwargs):
            self.rows[state.global_step + 1] = (float(opt.hyperparameters()["lr"][0]),
                                                opt.param_groups[0]["lr"])

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=6, logging_steps=1,
                             per_device_train_batch_size=4, report_to=list(report_to),
                             use_cpu=True, save_strategy="no", disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, scheduler),
                      callbacks=[Truth(), *callbacks])
    return trainer, opt, Truth.rows


def test_trainer_callback_makes_the_logged_learning_rate_the_one_in_use(tmp_path):
    from hyperopt_wrap.integrations import HyperparameterTrainerCallback

    trainer, opt, truth = _hf_trainer(tmp_path, [HyperparameterTrainerCallback()])
    trainer.train()
    assert trainer.optimizer is not opt and find_hyper_optimizer(trainer.optimizer) is opt
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert [e["step"] for e in logs] == list(range(1, 7)) == sorted(truth)
    for e in logs:
        in_use, schedule = truth[e["step"]]
        assert e["learning_rate"] == in_use == e["hyper/lr/0"]
        if e["step"] > 1:       # greedy's first hyper-step comes with the second step
            assert abs(in_use - schedule) > 1e-3 * schedule, e


def test_without_the_callback_trainer_logs_the_schedule(tmp_path):
    trainer, opt, truth = _hf_trainer(tmp_path, [])
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert [e["learning_rate"] for e in logs] == [truth[e["step"]][1] for e in logs]
    assert all(e["learning_rate"] != truth[e["step"]][0] for e in logs[1:])


def test_installed_first_the_reporters_see_the_lr_in_use(tmp_path):
    """report_to=["tensorboard"]: TensorBoard's callback comes before the user's; install()
    puts ours before it, so the event file holds the lr in use."""
    event_accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator")
    from hyperopt_wrap.integrations import HyperparameterTrainerCallback

    trainer, opt, truth = _hf_trainer(tmp_path, [], report_to=["tensorboard"])
    HyperparameterTrainerCallback.install(trainer)
    trainer.train()
    runs = [p.parent for p in tmp_path.rglob("events.out.tfevents.*")]
    assert len(runs) == 1
    acc = event_accumulator.EventAccumulator(str(runs[0]))
    acc.Reload()
    events = acc.Scalars("train/learning_rate")
    assert [e.step for e in events] == sorted(truth)
    assert [e.value for e in events] == pytest.approx([truth[e.step][0] for e in events],
                                                      rel=1e-6)
    assert "train/hyper/lr/0" in acc.Tags()["scalars"]
