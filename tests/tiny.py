"""A tiny float64 regression loop shared by the protocol tests of the forward-mode methods
(RTRL, ForwardGradient, SGLD, Distill): the model, the data, a step loop in either curvature
style, and a save/load round trip through ``torch.save``/``torch.load(weights_only=True)``."""
from __future__ import annotations

import io

import torch

X = torch.randn(64, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
Y = torch.randn(64, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)


def tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(),
                               torch.nn.Linear(8, 2)).double()


def tiny_batch(i: int):
    j = (i * 8) % 64
    return X[j:j + 8], Y[j:j + 8]


def train(opt, model, steps: int, start: int = 0, closure: bool = False,
          graphs: list | None = None) -> None:
    """``steps`` steps from batch ``start``: ``opt.step(closure)``, or the plain loop with
    ``backward(create_graph=opt.needs_graph)``; ``graphs`` collects ``opt.needs_graph``."""
    for i in range(start, start + steps):
        x, y = tiny_batch(i)

        def loss_closure(x=x, y=y):
            opt.zero_grad()
            loss = ((model(x) - y) ** 2).mean()
            loss.backward(create_graph=not closure and opt.needs_graph)
            return loss
        if graphs is not None:
            graphs.append(opt.needs_graph)
        if closure:
            opt.step(loss_closure)
        else:
            loss_closure()
            opt.step()


def reloaded(model, opt, make, seed: int = 9):
    """A fresh model (other initial weights) and optimizer ``make(model)`` loaded from a
    ``torch.save`` of ``model`` and ``opt``; also the loaded checkpoint."""
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    model2 = tiny_model(seed=seed)
    model2.load_state_dict(saved["model"])
    opt2 = make(model2)
    opt2.load_state_dict(saved["opt"])
    return model2, opt2, saved
