"""Greedy from a poor initial learning rate (too small: 1e-4; too large: 1.0) reaches a lower
loss than the same optimizer left at that learning rate, with default hyper-settings.

Base optimizers are chosen so that the fixed poor lr is finite but bad: SGD on an
ill-conditioned parabola (lr=1.0 diverges), RMSprop on Rosenbrock (lr=1.0 rattles around the
valley; Adam at lr=1.0 happens to be good there, so it would not be a poor start), SGD with
momentum on sklearn digits."""
import math

import pytest
import torch

from hyperopt_wrap import HyperOptimizer


def _parabola(make, steps=300):
    h = torch.logspace(-1, math.log10(2.5), 20, dtype=torch.float64)
    x = torch.nn.Parameter(torch.ones(20, dtype=torch.float64))
    opt = make([x])
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * (h * x * x).sum()).backward()
        opt.step()
    return float(0.5 * (h * x.detach() ** 2).sum())


def _rosenbrock(make, steps=1000):
    x = torch.nn.Parameter(torch.tensor([-1.5, 2.0], dtype=torch.float64))
    opt = make([x])

    def f():
        return (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2

    for _ in range(steps):
        opt.zero_grad()
        f().backward()
        opt.step()
    return float(f().detach())


def _digits(make, steps=600):
    datasets = pytest.importorskip("sklearn.datasets", reason="pip install scikit-learn "
                                   "(the 'test' extra) for the digits check")
    d = datasets.load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16
    y = torch.tensor(d.target)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10))
    opt = make(model.parameters())
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (50,), generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(model(x), y))


PROBLEMS = {
    "parabola-sgd": (_parabola, torch.optim.SGD, {}),
    "rosenbrock-rmsprop": (_rosenbrock, torch.optim.RMSprop, {}),
    "digits-sgd-momentum": (_digits, torch.optim.SGD, {"momentum": 0.9}),
}


@pytest.mark.parametrize("lr", [1e-4, 1.0], ids=["lr1e-4", "lr1.0"])
@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_greedy_beats_the_fixed_poor_learning_rate(problem, lr):
    run, cls, kwargs = PROBLEMS[problem]
    fixed = run(lambda p: cls(p, lr=lr, **kwargs))
    tuned = run(lambda p: HyperOptimizer(cls, p, lr=lr, **kwargs))
    assert math.isfinite(tuned)
    assert not (tuned >= fixed), f"{problem} from lr={lr}: greedy {tuned:.4g} vs fixed {fixed:.4g}"
    if math.isfinite(fixed):    # by a clear margin, not by noise
        assert tuned < 0.7 * fixed, f"{problem} from lr={lr}: greedy {tuned:.4g} vs fixed {fixed:.4g}"
