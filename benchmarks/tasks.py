"""The tuning-quality study's training problems on real data, each with its model, minibatches,
losses and evaluation: sklearn's digits (MLP 64-50-10, tanh, minibatch 50), sklearn's diabetes
(MLP 10-50-1, ReLU, full batch) and a character LSTM on Python's bundled documentation.

The digits split, model and minibatch order are the demo's (``python -m hyperopt_wrap.demo``),
written here again so that the benchmarks use only the library's public API.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from .models import CharLSTM, mlp

SEED = 0                 # the data splits


@dataclass
class Split:
    """Train / validation / test tensors of a supervised dataset."""
    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor


def _standardise(v: Tensor, train: Tensor) -> Tensor:
    mean, std = v[train].mean(0), v[train].std(0)
    std = torch.where(std > 0, std, torch.ones_like(std))   # constant features (border pixels)
    return (v - mean) / std


def seeded_split(x: Tensor, y: Tensor, seed: int, standardise_target: bool = False) -> Split:
    """60/20/20 by a seeded permutation, inputs (and with ``standardise_target`` the target)
    standardised with the training statistics."""
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_train, n_val = int(0.6 * len(x)), int(0.2 * len(x))
    tr, va, te = order[:n_train], order[n_train:n_train + n_val], order[n_train + n_val:]
    x = _standardise(x, tr)
    if standardise_target:
        y = _standardise(y, tr)
    return Split(x[tr], y[tr], x[va], y[va], x[te], y[te])


def shuffled_minibatches(n: int, steps: int, batch_size: int, seed: int) -> Tensor:
    """Indices of ``steps`` minibatches: seeded reshuffles each epoch, last partial batch dropped."""
    gen = torch.Generator().manual_seed(seed + 1)
    per_epoch = n // batch_size
    epochs = -(-steps // per_epoch)
    rows = [torch.randperm(n, generator=gen)[:per_epoch * batch_size].view(per_epoch, batch_size)
            for _ in range(epochs)]
    return torch.cat(rows)[:steps]


@dataclass
class Task:
    """A training problem: data, model, minibatches, losses.  ``build(settings)`` returns the
    data object every other hook receives."""
    name: str
    title: str
    steps: int                       # default step budget
    quick_steps: int
    describe: Callable[[dict], str]
    build: Callable[[dict], object]
    model: Callable[[object, int], nn.Module]
    batches: Callable[[object, int, int], list]          # (data, steps, seed) -> batches
    train_loss: Callable[[nn.Module, object, object], Tensor]
    val_loss: Callable[[nn.Module, object, int], Callable[[], Tensor]]   # meta-objective
    evaluate: Callable[[nn.Module, object, str], float]  # full split loss, no grad
    metric: str | None = None                            # "perplexity" for language models
    # where implicit, unroll and rtrl take Hessian-vector products: "graph" (double backward,
    # exact) or "closure" (finite differences, one gradient each; far cheaper for an LSTM)
    curvature: str = "graph"


_CACHE: dict = {}


def built(task: Task, settings: dict):
    """``task.build(settings)``, once per process and size."""
    key = (task.name, settings["quick"])
    if key not in _CACHE:
        _CACHE[key] = task.build(settings)
    return _CACHE[key]


_ce = nn.CrossEntropyLoss()
_mse = nn.MSELoss()


def _split_loss(loss):
    """The loss over the whole validation or test split."""
    def evaluate(model, data, split):
        x, y = {"val": (data.x_val, data.y_val), "test": (data.x_test, data.y_test)}[split]
        return float(loss(model(x), y))
    return evaluate


def _val_set_loss(loss):
    """The meta-objective: the loss over the whole validation set."""
    def val_loss(model, data, seed):
        return lambda: loss(model(data.x_val), data.y_val)
    return val_loss


# ---------------------------------------------------------------------------- digits
def _digits_build(settings):
    """sklearn's digits, the demo's seeded 60/20/20 split, standardised on train."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return seeded_split(torch.as_tensor(x, dtype=torch.float32),
                        torch.as_tensor(y, dtype=torch.int64), SEED)


def _digits_model(data, seed):
    torch.manual_seed(seed)
    return mlp((64, 50, 10), nn.Tanh)            # the demo's MLP 64-50-10


def _digits_batches(data, steps, seed):
    return list(shuffled_minibatches(len(data.x_train), steps, 50, seed))


def _digits_train_loss(model, data, idx):
    return _ce(model(data.x_train[idx]), data.y_train[idx])


# ---------------------------------------------------------------------------- diabetes
def _diabetes_build(settings):
    """sklearn's diabetes, split 60/20/20 by a seeded permutation, inputs and target
    standardised with the training statistics."""
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True)
    return seeded_split(torch.as_tensor(x, dtype=torch.float32),
                        torch.as_tensor(y, dtype=torch.float32).unsqueeze(1), SEED,
                        standardise_target=True)


def _diabetes_model(data, seed):
    torch.manual_seed(seed)
    return mlp((data.x_train.shape[1], 50, 1), nn.ReLU)


def _diabetes_batches(data, steps, seed):
    return [None] * steps                    # full batch


def _diabetes_train_loss(model, data, _):
    return _mse(model(data.x_train), data.y_train)


# ---------------------------------------------------------------------------- char LSTM
LSTM = {"embed": 16, "hidden": 64, "seq": 32, "batch": 32, "eval_chars": None}
LSTM_QUICK = {"embed": 8, "hidden": 16, "seq": 16, "batch": 8, "eval_chars": 2048}


@dataclass
class Corpus:
    train: Tensor
    val: Tensor
    test: Tensor
    vocab: int
    cfg: dict
    val_starts: Tensor = field(default=None)


def _lstm_build(settings):
    """Python's own documentation (``pydoc_data.topics``, shipped with Python): the topics in
    sorted order, concatenated and split by contiguous spans 80/10/10."""
    from pydoc_data.topics import topics

    text = "".join(topics[k] for k in sorted(topics))
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    ids = torch.tensor([index[c] for c in text], dtype=torch.int64)
    n = len(ids)
    a, b = int(0.8 * n), int(0.9 * n)
    cfg = dict(LSTM_QUICK if settings["quick"] else LSTM)
    train, val, test = ids[:a], ids[a:b], ids[b:]
    if cfg["eval_chars"]:
        val, test = val[:cfg["eval_chars"]], test[:cfg["eval_chars"]]
    return Corpus(train, val, test, len(chars), cfg)


def _lstm_model(data, seed):
    torch.manual_seed(seed)
    c = data.cfg
    return CharLSTM(data.vocab, c["embed"], c["hidden"])


def _windows(ids: Tensor, starts: Tensor, seq: int) -> tuple[Tensor, Tensor]:
    rows = starts.unsqueeze(1) + torch.arange(seq + 1)
    w = ids[rows]
    return w[:, :-1], w[:, 1:]


def _lstm_batches(data, steps, seed):
    """Seeded random windows of seq+1 characters from the training text, batch at a time."""
    c = data.cfg
    gen = torch.Generator().manual_seed(seed + 1)
    starts = torch.randint(0, len(data.train) - c["seq"] - 1, (steps, c["batch"]), generator=gen)
    return list(starts)


def _lstm_train_loss(model, data, starts):
    x, y = _windows(data.train, starts, data.cfg["seq"])
    return _ce(model(x).flatten(0, 1), y.flatten())


def _lstm_val_loss(model, data, seed):
    """The meta-objective: a fresh seeded validation minibatch (same size as a training
    batch) at every call."""
    c = data.cfg
    gen = torch.Generator().manual_seed(seed + 2)
    high = len(data.val) - c["seq"] - 1

    def val_loss():
        starts = torch.randint(0, high, (c["batch"],), generator=gen)
        x, y = _windows(data.val, starts, c["seq"])
        return _ce(model(x).flatten(0, 1), y.flatten())
    return val_loss


def _lstm_evaluate(model, data, split):
    """Mean per-character cross-entropy over the whole split, cut into non-overlapping
    sequences of the training length (state reset at each)."""
    ids = {"val": data.val, "test": data.test}[split]
    seq = data.cfg["seq"]
    n = (len(ids) - 1) // seq
    x = ids[:n * seq].view(n, seq)
    y = ids[1:n * seq + 1].view(n, seq)
    total = 0.0
    for i in range(0, n, 256):
        total += float(nn.functional.cross_entropy(model(x[i:i + 256]).flatten(0, 1),
                                                   y[i:i + 256].flatten(), reduction="sum"))
    return total / (n * seq)


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("digits", "sklearn digits, MLP 64-50-10 (tanh), minibatch 50, cross-entropy",
         steps=1500, quick_steps=12,
         describe=lambda s: ("1797 8x8 digits, the demo's seeded 60/20/20 split (1078 / 359 / "
                             "360), standardised on train; meta-objective: the whole validation "
                             "set"),
         build=_digits_build, model=_digits_model, batches=_digits_batches,
         train_loss=_digits_train_loss, val_loss=_val_set_loss(_ce),
         evaluate=_split_loss(_ce)),
    Task("diabetes", "sklearn diabetes, MLP 10-50-1 (ReLU), full batch, MSE",
         steps=4000, quick_steps=12,
         describe=lambda s: ("442 patients, seeded 60/20/20 split (265 / 88 / 89), inputs and "
                             "target standardised on train (losses in units of the target's "
                             "variance); meta-objective: the whole validation set"),
         build=_diabetes_build, model=_diabetes_model, batches=_diabetes_batches,
         train_loss=_diabetes_train_loss, val_loss=_val_set_loss(_mse),
         evaluate=_split_loss(_mse)),
    Task("lstm", "character LSTM language model on pydoc_data.topics",
         steps=800, quick_steps=12, metric="perplexity", curvature="closure",
         describe=lambda s: (
             "Python's bundled documentation topics (79 strings, 464,970 characters, 103 "
             "symbols), concatenated in sorted order and split 80/10/10 by contiguous spans; "
             "embedding {embed}, LSTM {hidden}, linear to the vocabulary; batches of {batch} "
             "random windows of {seq} characters; evaluation on the whole validation / test "
             "span in non-overlapping {seq}-character sequences; meta-objective: a fresh "
             "validation batch of the training batch's size at every call".format(
                 **(LSTM_QUICK if s["quick"] else LSTM))),
         build=_lstm_build, model=_lstm_model, batches=_lstm_batches,
         train_loss=_lstm_train_loss, val_loss=_lstm_val_loss, evaluate=_lstm_evaluate),
)}
