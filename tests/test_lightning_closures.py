"""Lightning's closure around HyperOptimizer: gradient accumulation is detected, and a
``training_step`` that logs under ``if not opt.replaying`` logs each step's own loss."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

L = pytest.importorskip("lightning")

from lightning.pytorch.loggers.logger import Logger  # noqa: E402

from hyperopt_wrap import CurvatureError, HyperOptimizer  # noqa: E402


class _Memory(Logger):
    def __init__(self):
        super().__init__()
        self.rows = []

    @property
    def name(self):
        return "memory"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, dict(metrics)))


class _Module(L.LightningModule):
    def __init__(self, method, guard, **options):
        super().__init__()
        self.options = options
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1)).double()
        self.method, self.guard = method, guard
        self.own = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = ((self.net(x) - y) ** 2).mean()
        opt = self.optimizers()
        if not (self.guard and opt.replaying):
            self.log("train_loss", loss, on_step=True, on_epoch=False)
        return loss

    def on_train_batch_start(self, batch, batch_idx):
        with torch.no_grad():
            x, y = batch
            self.own.append(float(((self.net(x) - y) ** 2).mean()))

    def configure_optimizers(self):
        return HyperOptimizer(torch.optim.SGD, self.parameters(), lr=0.05, method=self.method,
                              curvature="closure", update_every=5, **self.options)


def _loader(n=64):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, 5, generator=gen, dtype=torch.double)
    y = torch.randn(n, 1, generator=gen, dtype=torch.double)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)


def _fit(module, steps, **kw):
    logger = _Memory()
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=logger, log_every_n_steps=1,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, **kw)
    trainer.fit(module, _loader())
    return logger


@pytest.mark.parametrize("method", ["implicit", "unroll"])
def test_accumulate_grad_batches_with_a_closure_method_is_refused(method):
    with pytest.raises(CurvatureError, match="accumulate_grad_batches"):
        _fit(_Module(method, guard=True), steps=8, accumulate_grad_batches=4)


@pytest.mark.parametrize("guard", [True, False])
def test_logged_train_loss_is_the_steps_own_under_the_replaying_guard(guard):
    module = _Module("unroll", guard)
    logger = _fit(module, steps=12)
    logged = [m["train_loss"] for _, m in logger.rows if "train_loss" in m]
    assert len(logged) == 12
    same = [a == pytest.approx(b, rel=1e-9) for a, b in zip(logged, module.own)]
    if guard:
        assert all(same)
    else:            # unguarded, the window ends (steps 6 and 11) log a replay's loss
        assert same.count(False) >= 2


def _hand_loop(method, clip_in_closure=None, steps=12, **options):
    reference = _Module(method, guard=True, **options)
    opt = reference.configure_optimizers()
    for i, (x, y) in enumerate(_loader()):
        if i == steps:
            break

        def closure(x=x, y=y):
            opt.zero_grad()
            loss = ((reference.net(x) - y) ** 2).mean()
            loss.backward()
            if clip_in_closure:
                torch.nn.utils.clip_grad_norm_(reference.parameters(), clip_in_closure)
            return loss
        opt.step(closure)
    return reference, opt


def _same(module, reference, opt):
    got = module.optimizers()
    got = getattr(got, "optimizer", got)
    assert got.hypersteps == opt.hypersteps == 2
    assert float(opt.last_hypergradient()["lr"][0]) != 0
    torch.testing.assert_close(got.last_hypergradient()["lr"][0],
                               opt.last_hypergradient()["lr"][0], rtol=1e-9, atol=0)
    for p, q in zip(module.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=0)


def test_gradient_clip_val_with_a_reverse_closure_method_is_refused_naming_max_grad_norm():
    """Lightning clips inside the closure it hands step() (after backward): finite differences
    then give the clip's Jacobian after the Hessian, which a reverse pass cannot use."""
    with pytest.raises(CurvatureError, match="drop gradient_clip_val"):
        _fit(_Module("implicit", guard=True), steps=12, gradient_clip_val=0.05)


def test_gradient_clip_val_with_rtrl_equals_the_hand_loop():
    """RTRL carries tangents forward, which needs exactly the clip's Jacobian after the Hessian
    (exact against the clipping reference: tests/test_amp_clip.py)."""
    module = _Module("rtrl", guard=True)
    _fit(module, steps=12, gradient_clip_val=0.05, gradient_clip_algorithm="norm")
    _same(module, *_hand_loop("rtrl", clip_in_closure=0.05))


def test_max_grad_norm_under_lightning_equals_the_hand_loop():
    module = _Module("implicit", guard=True, max_grad_norm=0.05)
    _fit(module, steps=12)
    _same(module, *_hand_loop("implicit", max_grad_norm=0.05))
