"""Shared by the benchmark scripts: the machine a report was measured on, and one markdown file
(``benchmarks/RESULTS.md``) that several scripts write, each into its own section.

A section is the text between ``<!-- begin KEY -->`` and ``<!-- end KEY -->``; writing it again
replaces just that text, so ``benchmarks.summary`` (overhead), ``benchmarks.study`` (tuning
quality) and ``benchmarks.peers`` (side by side with peer libraries) can be rerun
independently.  Also the markdown helpers they share (``format_bytes``, ``row``, ``grid``).
"""
from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Iterable, Sequence

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
TITLE = "# hyperopt_wrap: benchmark results\n"
# Sections in the order a fresh file gets them; unknown keys go at the end.
ORDER = ("overhead", "peers", "study")


def machine_info(threads: int | None = None) -> dict[str, str]:
    """Date, CPU, cores, torch/Python versions and the git commit of this checkout."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            cpu = names[0]
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=HERE,
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "cpu": cpu, "cores": f"{os.cpu_count()} logical ({usable} usable)",
            "torch": torch.__version__,
            "threads": str(threads if threads is not None else torch.get_num_threads()),
            "python": platform.python_version(), "commit": commit or "unknown"}


def format_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def row(cells: Sequence[str]) -> str:
    """One markdown table row."""
    return "| " + " | ".join(cells) + " |"


def grid(heads: Sequence[str], columns: Sequence[str],
         rows: Iterable[tuple[Sequence[str], Sequence[str]]]) -> list[str]:
    """A markdown table: the leading columns ``heads``, then a right-aligned column per entry of
    ``columns``; ``rows`` gives (leading cells, a cell per column), and a row whose column cells
    are all empty is left out."""
    lines = [row([*heads, *columns]), "|" + "---|" * len(heads) + "---:|" * len(columns)]
    return lines + [row([*lead, *cells]) for lead, cells in rows if any(cells)]


def machine_lines(info: dict[str, str]) -> list[str]:
    """The two markdown bullet lines every report starts with."""
    return [f"- CPU: {info['cpu']}; cores: {info['cores']}; "
            f"torch.set_num_threads({info['threads']})",
            f"- torch {info['torch']}, Python {info['python']}, hyperopt_wrap at "
            f"`{info['commit']}`"]


def _markers(key: str) -> tuple[str, str]:
    if not re.fullmatch(r"[a-z0-9_-]+", key):
        raise ValueError(f"section key {key!r}: use lower-case letters, digits, '-' or '_'")
    return f"<!-- begin {key} -->", f"<!-- end {key} -->"


def read_section(key: str, path: Path = RESULTS) -> str | None:
    """The text of section ``key`` in ``path``, or None when it has none."""
    begin, end = _markers(key)
    text = path.read_text() if path.exists() else ""
    match = re.search(re.escape(begin) + r"\n(.*?)" + re.escape(end), text, re.S)
    return match.group(1) if match else None


def write_section(key: str, body: str, path: Path = RESULTS) -> None:
    """Put ``body`` (markdown) into section ``key`` of ``path``, replacing only that section.

    A missing file is created with a title; a missing section is inserted before the first
    section that comes after it in ``ORDER`` (or at the end)."""
    begin, end = _markers(key)
    block = f"{begin}\n{body.rstrip()}\n{end}\n"
    text = path.read_text() if path.exists() else TITLE
    pattern = re.compile(re.escape(begin) + r"\n.*?" + re.escape(end) + r"\n?", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        later = ORDER[ORDER.index(key) + 1:] if key in ORDER else ()
        positions = [text.find(_markers(k)[0]) for k in later]
        positions = [p for p in positions if p >= 0]
        if positions:
            at = min(positions)
            text = text[:at] + block + "\n" + text[at:]
        else:
            text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text)
