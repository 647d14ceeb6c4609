"""torch.compile of greedy's step, as torch documents it for compiled optimizers
(``@torch.compile def fn(): opt.step()``): one graph (``fullgraph=True``), the same numbers as
the eager step, no recompilation once the first hyper-step has run.

Compiling costs tens of seconds on a small CPU machine: a few runs (see ``CASES``), float64 so
that the comparison can be tight.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from hyperopt_wrap import CurvatureError, HyperOptimizer, Implicit

BASES = {
    "SGD": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3}),
    "Adam": (torch.optim.Adam, {"lr": 1e-2, "weight_decay": 1e-3}),
}
ALL_KINDS = ("lr", "momentum", "weight_decay")
# traced steps: the first (nothing pending), the first hyper-step (the hyper-optimizer's state
# is created), then the steady one
WARMUP = 3


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _model(dtype):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2)).to(dtype)


def _batches(dtype, n=3):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(32, 8, generator=g, dtype=dtype),
             torch.randn(32, 2, generator=g, dtype=dtype)) for _ in range(n)]


def _train(model, opt, batches, steps, step=None):
    """``steps`` training steps with ``step`` (default ``opt.step``); the tuned values after
    each."""
    step = step or opt.step
    values = []
    for i in range(steps):
        x, y = batches[i % len(batches)]
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        if i == WARMUP:
            # from here on the compiled graph must serve every step: a recompilation raises
            torch._dynamo.config.error_on_recompile = True
        step()
        values.append({k: torch.stack([v.detach().clone() for v in vs])
                       for k, vs in opt.hyperparameters().items() if k in opt.tuned})
    torch._dynamo.config.error_on_recompile = False
    return values


def _pair(base, dtype, tune, steps, backend="inductor", **extra):
    cls, kwargs = BASES[base]
    batches = _batches(dtype)
    models = [_model(dtype), None]
    models[1] = copy.deepcopy(models[0])
    opts = [HyperOptimizer(cls, m.parameters(), tune=tune, **kwargs, **extra) for m in models]
    eager = _train(models[0], opts[0], batches, steps)

    @torch.compile(fullgraph=True, backend=backend)
    def compiled_step():
        opts[1].step()

    try:
        compiled = _train(models[1], opts[1], batches, steps, compiled_step)
    finally:
        torch._dynamo.config.error_on_recompile = False
    return models, opts, eager, compiled


# Inductor compiles Adam's step with all three kinds tuned in about 90 s here: that case is
# traced by dynamo's eager backend (one graph, no recompilation) and Adam's lr-only step,
# and SGD's with all three kinds, are compiled by inductor.
CASES = [("SGD", ALL_KINDS, "inductor"), ("Adam", ("lr",), "inductor"),
         ("Adam", ALL_KINDS, "eager")]


@pytest.mark.parametrize("base, tune, backend", CASES,
                         ids=[f"{b}-{'+'.join(t)}-{be}" for b, t, be in CASES])
def test_compiled_greedy_step_is_one_graph_with_the_eager_numbers(base, tune, backend):
    steps = 8
    models, opts, eager, compiled = _pair(base, torch.float64, tune, steps, backend)
    for pe, pc in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(pc, pe, rtol=1e-11, atol=1e-13)
    for ve, vc in zip(eager, compiled):
        for kind in tune:
            torch.testing.assert_close(vc[kind], ve[kind], rtol=1e-11, atol=0)
    assert not torch.equal(eager[-1]["lr"], eager[0]["lr"])        # the lr was tuned
    for kind in tune:
        torch.testing.assert_close(opts[1].last_hypergradient()[kind][0],
                                   opts[0].last_hypergradient()[kind][0], rtol=1e-9, atol=1e-14)
    # the counters the compiled graph advanced read as the eager ones
    assert opts[1].hypersteps == opts[0].hypersteps == steps - 1
    assert opts[1].state_dict()["hyper"]["counters"] == opts[0].state_dict()["hyper"]["counters"]
    hyper_state = [opt.hyper_optimizer.state_dict()["state"] for opt in opts]
    for se, sc in zip(hyper_state[0].values(), hyper_state[1].values()):
        for name in se:
            torch.testing.assert_close(sc[name], se[name], rtol=1e-9, atol=1e-14)


def test_per_tensor_step_traces_as_one_graph():
    """``foreach=False`` (the rules' per-tensor step, whose scalar products were memoised in
    the skip factor's ``__dict__``, which dynamo cannot trace); the trace only (dynamo's
    eager backend), float32."""
    models, _, eager, compiled = _pair("SGD", torch.float32, ("lr",), 6, backend="eager",
                                       foreach=False)
    for pe, pc in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(pc, pe)
    torch.testing.assert_close(compiled[-1]["lr"], eager[-1]["lr"])


def test_graph_curvature_through_a_compiled_model_points_to_the_closure():
    """aot_autograd has no double backward: with donated buffers (torch's default)
    ``backward(create_graph=True)`` raises by itself; without, the Hessian-vector products
    raise a CurvatureError that names the closure source."""
    import torch._functorch.config as functorch_config

    model = _model(torch.float32)
    compiled_model = torch.compile(model, backend="aot_eager")
    x, y = _batches(torch.float32, 1)[0]
    opt = HyperOptimizer(torch.optim.SGD, model.parameters(), lr=0.1,
                         method=Implicit(neumann_terms=2), update_every=2)
    with functorch_config.patch(donated_buffer=False), \
            pytest.raises(CurvatureError, match="closure"):
        for _ in range(4):
            opt.zero_grad()
            ((compiled_model(x) - y) ** 2).mean().backward(create_graph=opt.needs_graph)
            opt.step()


def test_one_compiled_function_steps_two_optimizers():
    """A compiled function that takes the optimizer as an argument is recompiled for the
    second one with its param-group floats traced as symbols (automatic dynamic), which the
    step's validation of the entries takes; the trace only (dynamo's eager backend)."""
    @torch.compile(fullgraph=True, backend="eager")
    def step(opt):
        opt.step()

    batches = _batches(torch.float32)
    for lr in (0.1, 0.05):
        model = _model(torch.float32)
        reference = copy.deepcopy(model)
        opts = [HyperOptimizer(torch.optim.SGD, m.parameters(), lr=lr, momentum=0.9)
                for m in (model, reference)]
        for i in range(4):
            for m, opt, run in ((model, opts[0], step), (reference, opts[1], None)):
                x, y = batches[i % len(batches)]
                opt.zero_grad()
                ((m(x) - y) ** 2).mean().backward()
                run(opt) if run else opt.step()
        for p, q in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(p, q)
