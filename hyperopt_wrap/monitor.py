"""HyperMonitor: the hyperparameters in use and their hypergradients, recorded per hyper-step.

``HyperMonitor(opt)`` attaches a step post-hook to a :class:`~hyperopt_wrap.HyperOptimizer`.
After each ``opt.step()`` that made a hyper-step (seen from the Python counter
``opt.hypersteps``, so deciding costs no device read) it records, as tensors on the device:

* the hyperparameters in use, as :meth:`HyperOptimizer.hyperparameters` returns them then
  (natural units; a tuned lr times its scheduler scale ``group["lr"] / nominal``): one value
  per param group (``lr/0``), or for ``tensor`` / ``element`` granularity its summary
  ``lr/0/mean``, ``lr/0/min``, ``lr/0/max`` (over the group's values: one per parameter tensor,
  or every element);
* the norm of the latest hypergradient per tuned kind (``hypergrad_norm/lr``, natural units,
  from :meth:`HyperOptimizer.last_hypergradient`, each tuned value once);
* the counters ``skipped_steps`` and ``skipped_hypersteps``.

A record is read right after the step, before a scheduler's ``step()`` moves ``group["lr"]``
(as the trainers read the ``learning_rate`` they log): for greedy without ``val_loss``, whose
hyper-step comes at the start of a step, exactly the values that step used.

Nothing is read on the host inside ``step()``: records stay on the device (every 256 of them
stacked into one tensor) until :meth:`~HyperMonitor.history`, :meth:`~HyperMonitor.flush`,
:meth:`~HyperMonitor.latest` or a writer reads them, one transfer per 256 records.  One
record is a few small tensor operations per kind and group; ``every=n`` records every n-th
hyper-step only.
"""
from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import Tensor

from .optimizer import HyperOptimizer

_CHUNK = 256            # device records stacked into one tensor
_COUNTERS = ("skipped_steps", "skipped_hypersteps")
_LOG_SCALE = ("lr", "weight_decay", "hypergrad_norm")


def find_hyper_optimizer(obj: Any) -> HyperOptimizer | None:
    """``obj`` if it is a HyperOptimizer, else the one it wraps through ``.optimizer`` /
    ``._optimizer`` attributes (Lightning's ``LightningOptimizer``, accelerate's
    ``AcceleratedOptimizer``), else None."""
    for _ in range(8):
        if isinstance(obj, HyperOptimizer):
            return obj
        inner = getattr(obj, "optimizer", None)
        if inner is None:
            inner = getattr(obj, "_optimizer", None)
        if inner is None or inner is obj:
            return None
        obj = inner
    return None


def _acc_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def _lr_scale(group: dict):
    """``group["lr"] / nominal`` as the step computes it (a float; a tensor lr stays a tensor,
    unread)."""
    lr, nominal = group["lr"], group["hyper_nominal"]["lr"]
    if isinstance(lr, Tensor):
        return lr.detach().reshape(()).to(_acc_dtype(lr.device)) / nominal
    return float(lr) / nominal


def _times(value: Tensor, scale) -> Tensor:
    """``value * scale`` as a new tensor (in the value's dtype, as ``hyperparameters()``).  A
    CPU tensor scale stays on the CPU (a 0-dim CPU operand is read as a scalar: copying it to
    an accelerator would synchronise)."""
    if isinstance(scale, Tensor):
        scale = scale.to(dtype=value.dtype) if scale.device.type == "cpu" \
            else scale.to(value.device, value.dtype)
    return value * scale


def _on(t: Tensor, device: torch.device) -> Tensor:
    return t if t.device == device else t.to(device, non_blocking=True)


def _summary(blocks: list[Tensor], scale) -> dict[str, Tensor]:
    """mean / min / max over every element of ``blocks`` (scaled), on the first's device."""
    device = blocks[0].device
    acc = _acc_dtype(device)
    if len(blocks) == 1:
        b = blocks[0]
        lo, hi = torch.aminmax(b)
        mean = b.sum(dtype=acc) / b.numel()
    else:
        pairs = [torch.aminmax(b) for b in blocks]
        lo = torch.stack([_on(p[0], device) for p in pairs]).amin()
        hi = torch.stack([_on(p[1], device) for p in pairs]).amax()
        total = sum(b.numel() for b in blocks)
        mean = torch.stack([_on(b.sum(dtype=acc), device) for b in blocks]).sum() / total
    return {"mean": _times(mean, scale), "min": _times(lo, scale), "max": _times(hi, scale)}


def _untuned(opt: HyperOptimizer, group: dict, kind: str):
    """An untuned entry as written: a float, or a 0-dim tensor copy (left unread)."""
    entry = group[kind] if kind in group else opt.rule.read(group, kind)
    if isinstance(entry, Tensor):
        return entry.detach().reshape(()).clone()
    return float(entry)


def readout(opt: HyperOptimizer, *, tuned_only: bool = False, hypergradients: bool = True,
            counters: bool = True) -> dict[str, Tensor | float]:
    """The hyperparameters in use now, by name (see the module docstring), without reading
    the device: tuned values as new 0-dim tensors on their device, untuned entries as floats.

    Args:
        tuned_only: only the kinds that are tuned (an untuned group of a tuned kind, e.g. one
            frozen at lr 0, still appears).
        hypergradients: add ``hypergrad_norm/<kind>`` per tuned kind.
        counters: add ``skipped_steps`` and ``skipped_hypersteps`` (0-dim device tensors).
    """
    out: dict[str, Tensor | float] = {}
    tuned = opt.tuned
    for kind in opt.rule.kinds:
        tk = tuned.get(kind)
        if tk is None and tuned_only:
            continue
        for gi, group in enumerate(opt.param_groups):
            name = f"{kind}/{gi}"
            if tk is None or not tk.is_tuned(gi):
                out[name] = _untuned(opt, group, kind)
                continue
            scale = _lr_scale(group) if kind == "lr" else 1.0
            slots = tk.group_slots[gi]
            if tk.granularity in ("global", "group"):
                block, index = slots[0]
                out[name] = _times(tk.values[block][index], scale)
                continue
            blocks = ([tk.values[slots[0][0]]] if tk.granularity == "tensor"
                      else [tk.values[b] for b, _ in slots])
            for stat, value in _summary(blocks, scale).items():
                out[f"{name}/{stat}"] = value
    if hypergradients:
        for kind, tk in tuned.items():
            norms = [torch.linalg.vector_norm(b) for b in tk.last]
            out[f"hypergrad_norm/{kind}"] = norms[0] if len(norms) == 1 else \
                torch.linalg.vector_norm(torch.stack([_on(n, norms[0].device) for n in norms]))
    if counters:
        out.update({name: t.clone() for name, t in zip(_COUNTERS, _counters(opt))})
    return out


def _counters(opt: HyperOptimizer) -> list[Tensor]:
    """The device counters behind ``opt.skipped_steps`` / ``opt.skipped_hypersteps`` (which
    read them as ints), live."""
    live = opt.skip_counters()
    return [live[name] for name in _COUNTERS]


def as_floats(values: dict[str, Tensor | float]) -> dict[str, float]:
    """A :func:`readout` as Python floats (reads the device: one transfer per device)."""
    tensors = {k: v for k, v in values.items() if isinstance(v, Tensor)}
    by_device: dict[torch.device, list[str]] = {}
    for k, v in tensors.items():
        by_device.setdefault(v.device, []).append(k)
    read = {}
    for device, names in by_device.items():
        stacked = torch.stack([tensors[k].to(_acc_dtype(device)) for k in names]).tolist()
        read.update(zip(names, stacked))
    return {k: read[k] if k in read else float(v) for k, v in values.items()}


class HyperMonitor:
    """Records a HyperOptimizer's hyperparameters in use, hypergradient norms and skip counters
    once per hyper-step (every ``every``-th), with no host synchronisation inside ``step()``.

    Args:
        opt: the :class:`~hyperopt_wrap.HyperOptimizer` (or a wrapper of one: Lightning's
            ``LightningOptimizer``, accelerate's ``AcceleratedOptimizer``).
        every: record every ``every``-th hyper-step (``opt.hypersteps % every == 0``).

    A first record is taken at construction (the starting values).  Each record carries
    ``step`` (base steps taken, as counted by the optimizer) and ``hyperstep``.  ``close()``
    detaches the hook; the monitor is also a context manager.

    Example::

        monitor = HyperMonitor(opt)
        ...                                      # train
        monitor.history()["lr/0"]                # one float per record
        monitor.write_tensorboard("runs/hyper")  # or a SummaryWriter
        monitor.plot("hyper.png")
    """

    def __init__(self, opt, every: int = 1):
        hyper = find_hyper_optimizer(opt)
        if hyper is None:
            raise TypeError(f"HyperMonitor needs a hyperopt_wrap.HyperOptimizer (or a wrapper "
                            f"of one with an .optimizer attribute), got "
                            f"{type(opt).__name__}; e.g. HyperMonitor(HyperOptimizer("
                            f"torch.optim.SGD, model.parameters(), lr=0.1))")
        if not (isinstance(every, int) and not isinstance(every, bool) and every >= 1):
            raise ValueError(f"every must be an int >= 1 (record every n-th hyper-step), "
                             f"got {every!r}")
        self.opt, self.every = hyper, every
        self._open: list[tuple[int, int, tuple, Tensor]] = []   # device records, one layout
        self._open_layout: tuple | None = None
        self._stacked: list[tuple[tuple, list[tuple[int, int, tuple]], Tensor]] = []
        self._rows: list[tuple[int, int, tuple, tuple]] = []    # host: step, hyperstep, names, values
        self._written = 0                                       # rows given to write_tensorboard
        self._seen = hyper.hypersteps
        self._record()
        self._handle = hyper.register_step_post_hook(self._after_step)

    # ------------------------------------------------------------------ recording
    def _after_step(self, opt, args, kwargs) -> None:
        hypersteps = opt.hypersteps            # a Python int: no device read
        if hypersteps == self._seen:
            return
        self._seen = hypersteps
        if hypersteps % self.every == 0:
            self._record()

    def _record(self) -> None:
        values = readout(self.opt, counters=False)
        counters = _counters(self.opt)
        names = tuple(values) + _COUNTERS
        floats = tuple(v for v in values.values() if not isinstance(v, Tensor))
        layout = (names, tuple(isinstance(v, Tensor) for v in values.values())
                  + (True,) * len(_COUNTERS))
        tensors = [v for v in values.values() if isinstance(v, Tensor)] + counters
        device = counters[0].device
        # one copy of everything (the counters are live); the row's dtype is promoted from
        # the values' (at least float32: counters exact to 2**24)
        row = torch.stack([_on(t, device) for t in tensors])
        if layout != self._open_layout or len(self._open) >= _CHUNK:
            self._seal()
            self._open_layout = layout
        self._open.append((self.opt.steps, self.opt.hypersteps, floats, row))

    def _seal(self) -> None:
        """Stack the open records into one device tensor."""
        if self._open:
            metas = [(s, h, f) for s, h, f, _ in self._open]
            self._stacked.append((self._open_layout, metas,
                                  torch.stack([r for *_, r in self._open])))
        self._open = []

    def flush(self) -> None:
        """Move the device records to the host (one transfer per 256 records)."""
        self._seal()
        for (names, is_tensor), metas, table in self._stacked:
            for (step, hyperstep, floats), row in zip(metas, table.tolist()):
                t, f = iter(row), iter(floats)
                values = (next(t) if it else next(f) for it in is_tensor)
                self._rows.append((step, hyperstep, names,
                                   tuple(int(v) if n in _COUNTERS else v
                                         for n, v in zip(names, values))))
        self._stacked = []

    # ------------------------------------------------------------------ reading
    def __len__(self) -> int:
        return len(self._rows) + sum(len(m) for _, m, _ in self._stacked) + len(self._open)

    def history(self) -> dict[str, list]:
        """``{"step": [...], "hyperstep": [...], name: [...]}``, one float per record for every
        name (NaN where a name did not exist yet, e.g. before ``add_param_group``)."""
        self.flush()
        order: dict[str, None] = {}
        for _, _, names, _ in self._rows:
            order.update(dict.fromkeys(names))
        out: dict[str, list] = {"step": [r[0] for r in self._rows],
                                "hyperstep": [r[1] for r in self._rows]}
        out.update({name: [] for name in order})
        for _, _, names, values in self._rows:
            mine = dict(zip(names, values))
            for name in order:
                out[name].append(mine.get(name, math.nan))
        return out

    def latest(self) -> dict[str, float]:
        """The latest record as floats (``step``, ``hyperstep`` and every name); reads the
        device.  Empty before any record (after loading an empty state)."""
        self.flush()
        if not self._rows:
            return {}
        step, hyperstep, names, values = self._rows[-1]
        return {"step": step, "hyperstep": hyperstep, **dict(zip(names, values))}

    # ------------------------------------------------------------------ writers
    def write_tensorboard(self, writer_or_logdir, prefix: str = "hyper/") -> int:
        """Write the records not written yet as TensorBoard scalars ``<prefix><name>`` at
        ``global_step = step``; returns how many records it wrote.  ``writer_or_logdir``: a
        ``torch.utils.tensorboard.SummaryWriter`` (flushed, left open) or a log directory
        (a writer is opened there and closed)."""
        own = isinstance(writer_or_logdir, (str, os.PathLike))
        if own:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError("HyperMonitor.write_tensorboard needs TensorBoard: pip install "
                                  "tensorboard (or pip install hyperopt_wrap[ecosystem])") from e
            writer = SummaryWriter(os.fspath(writer_or_logdir))
        else:
            writer = writer_or_logdir
            if not callable(getattr(writer, "add_scalar", None)):
                raise TypeError(f"write_tensorboard needs a SummaryWriter or a log directory, "
                                f"got {type(writer).__name__}")
        self.flush()
        rows = self._rows[self._written:]
        try:
            for step, _, names, values in rows:
                for name, value in zip(names, values):
                    writer.add_scalar(prefix + name, value, global_step=step)
            writer.flush()
        finally:
            if own:
                writer.close()
        self._written = len(self._rows)
        return len(rows)

    def plot(self, path=None):
        """A matplotlib figure, one panel per tuned kind (a line per param group; min-max band
        around the mean for tensor / element granularity) and one of the hypergradient norms;
        log y for lr, weight decay and the norms.  Saved to ``path`` when given; returned."""
        try:
            from matplotlib.figure import Figure
        except ImportError as e:
            raise ImportError("HyperMonitor.plot needs matplotlib: pip install matplotlib") from e
        h = self.history()
        panels = [k for k in self.opt.tuned_kinds] + ["hypergrad_norm"]
        fig = Figure(figsize=(4.2 * len(panels), 3.4), layout="constrained")
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        steps = h["step"]
        for ax, kind in zip(axes, panels):
            log = kind in _LOG_SCALE

            def series(name):
                return [v if not log or v > 0 else math.nan for v in h[name]]
            for name in h:
                head, _, rest = name.partition("/")
                if head != kind or rest.endswith(("/min", "/max")):
                    continue
                label = rest if kind == "hypergrad_norm" else f"group {rest.split('/')[0]}"
                line, = ax.plot(steps, series(name), label=label)
                if rest.endswith("/mean"):
                    base = name[:-len("/mean")]
                    ax.fill_between(steps, series(base + "/min"), series(base + "/max"),
                                    color=line.get_color(), alpha=0.2)
            title = "hypergradient norm" if kind == "hypergrad_norm" else f"{kind} in use"
            ax.set(title=title, xlabel="step", yscale="log" if log else "linear")
            ax.legend(fontsize=7)
        if path is not None:
            fig.savefig(path, dpi=110)
        return fig

    # ------------------------------------------------------------------ life cycle
    def close(self) -> None:
        """Detach the step hook (the records stay readable)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    remove = close

    @property
    def attached(self) -> bool:
        return self._handle is not None

    def __enter__(self) -> HyperMonitor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def state_dict(self) -> dict[str, Any]:
        """The records (as floats) and settings, to resume a monitor with its run."""
        self.flush()
        layouts: dict[tuple, int] = {}
        rows = [(s, h, layouts.setdefault(names, len(layouts)), list(v))
                for s, h, names, v in self._rows]
        return {"every": self.every, "layouts": [list(n) for n in layouts], "rows": rows,
                "written": self._written}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace the records with a :meth:`state_dict`'s (checked first)."""
        try:
            every, layouts, rows, written = (state[k] for k in ("every", "layouts", "rows",
                                                                 "written"))
            layouts = [tuple(str(n) for n in names) for names in layouts]
            host = [(int(s), int(h), layouts[i], tuple(float(x) for x in v))
                    for s, h, i, v in rows]
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise ValueError(f"not a HyperMonitor.state_dict() ({type(e).__name__}: {e})") from None
        if any(len(names) != len(v) for _, _, names, v in host) or not 0 <= written <= len(host):
            raise ValueError("HyperMonitor state_dict is inconsistent (a row's values do not "
                             "match its names, or 'written' is out of range)")
        if not (isinstance(every, int) and every >= 1):
            raise ValueError(f"HyperMonitor state_dict has every={every!r}; expected an int >= 1")
        self.every, self._rows, self._written = every, host, written
        self._open, self._open_layout, self._stacked = [], None, []
        self._seen = self.opt.hypersteps

    def __repr__(self) -> str:
        return (f"HyperMonitor({type(self.opt).__name__}, every={self.every}, "
                f"records={len(self)}, attached={self.attached})")
