"""The benchmarks' networks, each written once, and ``Net``: a network of the overhead benchmarks
(``summary``, ``peers``, the pytest-benchmark suite) with its synthetic minibatches.

* ``mlp``: linear layers with an activation between them (the study's digits MLP 64-50-10 with
  tanh and diabetes MLP 10-50-1 with ReLU, the overhead MLP 784-H-10 with ReLU);
* ``cnn``: two 3x3 convolutions without padding, ReLU, linear to the classes;
* ``CharLSTM``: embedding, one LSTM layer, linear to the vocabulary;
* ``Chain``: N bias-free 16x16 linear layers with tanh (many small tensors);
* ``GPT``: a small pre-LN transformer language model whose attention has a double backward.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

IN_FEATURES, CLASSES = 784, 10
IMAGE = (1, 28, 28)
VOCAB, EMBED, SEQ = 64, 16, 32           # the LSTM: characters in, next character out
MANY_SIZE = 16              # "many": a chain of W bias-free Linear(16, 16), tanh, 16 classes
# "gpt": a pre-LN transformer language model of width W on random tokens.  Batch 8 made one
# plain step about 100 ms on one thread of a 2-core machine, too slow for a full run to stay
# near 10 minutes; batch 2 (128 tokens a step) costs about 30 ms.
GPT_VOCAB, GPT_LAYERS, GPT_HEADS, GPT_SEQ = 256, 4, 4, 64
BATCHES = {"mlp": 128, "cnn": 64, "lstm": 32, "many": 16, "gpt": 2}


def mlp(sizes: Sequence[int], activation: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """``Linear(sizes[0], sizes[1])``, activation, ..., ``Linear(sizes[-2], sizes[-1])``."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        if i:
            layers.append(activation())
        layers.append(nn.Linear(a, b))
    return nn.Sequential(*layers)


def cnn(channels: int, image: tuple[int, int, int] = IMAGE,
        classes: int = CLASSES) -> nn.Sequential:
    """Convolutions 3x3 ``image[0]`` -> ``channels // 2`` -> ``channels`` without padding, ReLU
    after each, flattened, linear to ``classes``."""
    c, (depth, h, w) = channels, image
    return nn.Sequential(nn.Conv2d(depth, c // 2, 3), nn.ReLU(), nn.Conv2d(c // 2, c, 3),
                         nn.ReLU(), nn.Flatten(), nn.Linear(c * (h - 4) * (w - 4), classes))


class CharLSTM(nn.Module):
    """Embedding -> one LSTM layer -> linear: next-token logits (batch, seq, vocab), or flattened
    over the sequence (batch * seq, vocab) with ``flat``."""

    def __init__(self, vocab: int, embed: int, hidden: int, flat: bool = False):
        super().__init__()
        self.flat = flat
        self.embed = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden, batch_first=True)
        self.out = nn.Linear(hidden, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        hidden, _ = self.lstm(self.embed(tokens))
        logits = self.out(hidden)
        return logits.reshape(-1, logits.shape[-1]) if self.flat else logits


class Chain(nn.Module):
    """``n`` bias-free ``Linear(16, 16)``, each followed by tanh: many small parameter tensors
    and almost no arithmetic (the optimizer's per-tensor fixed cost).  Orthogonal weights keep
    the signal alive through the whole depth, and tanh keeps it bounded as training moves
    them."""

    def __init__(self, n: int, size: int = MANY_SIZE):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(size, size, bias=False) for _ in range(n))
        for layer in self.layers:
            nn.init.orthogonal_(layer.weight)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


class Block(nn.Module):
    """Pre-LN transformer block: causal multi-head self-attention written out with matmuls, a
    mask and softmax (``F.scaled_dot_product_attention`` has no double backward, which the
    graph curvature source needs), then an MLP of 4x width with GELU."""

    def __init__(self, width: int, heads: int, seq: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.fc, self.fc2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)
        self.register_buffer("mask", torch.full((seq, seq), float("-inf")).triu(1),
                             persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads) \
            .permute(2, 0, 3, 1, 4)                     # each (batch, heads, seq, head width)
        att = torch.softmax(q @ k.transpose(-2, -1) * (d // self.heads) ** -0.5
                            + self.mask[:t, :t], dim=-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(nn.functional.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """Token embedding + learned positions, pre-LN blocks, final LayerNorm, untied linear head:
    next-token logits, flattened over the sequence."""

    def __init__(self, width: int, vocab: int = GPT_VOCAB, layers: int = GPT_LAYERS,
                 heads: int = GPT_HEADS, seq: int = GPT_SEQ):
        super().__init__()
        self.vocab = vocab
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Parameter(0.02 * torch.randn(seq, width))
        self.blocks = nn.ModuleList(Block(width, heads, seq) for _ in range(layers))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.tokens(tokens) + self.positions[:tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x)).reshape(-1, self.vocab)


@dataclass(frozen=True)
class Net:
    """A network of the overhead benchmarks and its minibatches."""
    kind: str       # "mlp", "cnn", "lstm", "many" or "gpt"
    width: int      # MLP: hidden units; CNN: channels of the second convolution (first: half);
    #                 LSTM: hidden units; many: number of 16x16 tensors; GPT: model width

    def __post_init__(self):
        least = {"cnn": 2, "gpt": GPT_HEADS}.get(self.kind, 1)
        if (self.kind not in BATCHES or self.width < least
                or (self.kind == "gpt" and self.width % GPT_HEADS)):
            raise ValueError(f"no network {self.kind!r} of width {self.width}"
                             + (f" (gpt: a multiple of {GPT_HEADS} heads)"
                                if self.kind == "gpt" else ""))

    @property
    def batch(self) -> int:
        return BATCHES[self.kind]

    @property
    def label(self) -> str:
        if self.kind == "mlp":
            return f"MLP {IN_FEATURES}-{self.width}-{CLASSES}"
        if self.kind == "lstm":
            return f"LSTM {VOCAB}-{EMBED}-{self.width}-{VOCAB}"
        if self.kind == "many":
            return f"{self.width}x Linear {MANY_SIZE}x{MANY_SIZE}"
        if self.kind == "gpt":
            return f"GPT {GPT_LAYERS}x{self.width} seq {GPT_SEQ}"
        return f"CNN {IMAGE[0]}-{self.width // 2}-{self.width}"

    @property
    def id(self) -> str:
        return f"h{self.width}" if self.kind == "mlp" else f"{self.kind}{self.width}"

    @classmethod
    def parse(cls, text: str) -> "Net":
        """``"256"``, ``"h256"`` or ``"mlp256"``: the MLP of that width; ``"cnn16"``: the CNN;
        ``"lstm64"``: the LSTM; ``"many200"``: the chain of 200 16x16 tensors; ``"gpt256"``:
        the transformer of width 256."""
        for prefix, kind in (("cnn", "cnn"), ("lstm", "lstm"), ("many", "many"), ("gpt", "gpt"),
                             ("mlp", "mlp"), ("h", "mlp"), ("", "mlp")):
            if text.startswith(prefix) and text[len(prefix):].isdigit():
                return cls(kind, int(text[len(prefix):]))
        raise ValueError(f"unknown network {text!r}: e.g. 256 (MLP 784-256-10), cnn16, lstm64, "
                         "many200 or gpt256")

    def model(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        if self.kind == "mlp":
            return mlp((IN_FEATURES, self.width, CLASSES))
        if self.kind == "lstm":
            return CharLSTM(VOCAB, EMBED, self.width, flat=True)
        if self.kind == "many":
            return Chain(self.width)
        if self.kind == "gpt":
            return GPT(self.width)
        return cnn(self.width)

    def batches(self, n: int = 4, seed: int = 0) -> list[tuple[Tensor, Tensor]]:
        """``n`` minibatches (inputs, targets); the language models' are random token
        sequences and the same sequences shifted by one (flattened, as the models' logits
        are)."""
        gen = torch.Generator().manual_seed(seed)
        if self.kind in ("lstm", "gpt"):
            vocab, seq = (VOCAB, SEQ) if self.kind == "lstm" else (GPT_VOCAB, GPT_SEQ)
            tokens = [torch.randint(0, vocab, (self.batch, seq + 1), generator=gen)
                      for _ in range(n)]
            return [(t[:, :-1], t[:, 1:].reshape(-1)) for t in tokens]
        shape, classes = {"mlp": ((IN_FEATURES,), CLASSES), "cnn": (IMAGE, CLASSES),
                          "many": ((MANY_SIZE,), MANY_SIZE)}[self.kind]
        return [(torch.randn(self.batch, *shape, generator=gen),
                 torch.randint(0, classes, (self.batch,), generator=gen)) for _ in range(n)]


def make_nets(widths: Sequence[int] = (), cnn_widths: Sequence[int] = (),
              lstm_widths: Sequence[int] = (), many_tensors: Sequence[int] = (),
              gpt_widths: Sequence[int] = ()) -> list[Net]:
    return ([Net("mlp", w) for w in widths] + [Net("cnn", c) for c in cnn_widths]
            + [Net("lstm", h) for h in lstm_widths] + [Net("many", n) for n in many_tensors]
            + [Net("gpt", w) for w in gpt_widths])
