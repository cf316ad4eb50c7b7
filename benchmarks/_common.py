"""Shared helpers of the benchmark scripts: machine description and Markdown output."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from runtime.precision import cpu_description

RESULTS = Path(__file__).resolve().parent / "results"  # committed with the repository


def machine() -> str:
    cpu = cpu_description()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {gpu}; torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads; Python {platform.python_version()}")


def commit() -> str:
    """The checked-out commit of the suite's repository (short hash), marked if the tree has changes; "n/a"
    outside a git checkout (an installed copy)."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, cwd=RESULTS.parent).stdout.strip()
        except OSError:  # no git on the machine
            return ""

    head = git("rev-parse", "--short", "HEAD")
    if head and git("status", "--porcelain", "--untracked-files=no"):
        head += " + uncommitted changes (committed with these results)"
    return head or "n/a"


def header(title: str, command: str | None = None, measured_commit: str | None = None) -> str:
    """Title, machine, command and commit (``measured_commit``: the one taken when the measurement started)."""
    command = command or " ".join(["python", *sys.argv])
    return (f"# {title}\n\n- machine: {machine()}\n- command: `{command}`\n- commit: {measured_commit or commit()}, "
            f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC\n")


def table(rows: list[list], head: list[str]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def round_order(sides: int, round_index: int) -> list[int]:
    """The order the sides of a comparison run in round ``round_index``: 0, 1, ... in even rounds, reversed
    in odd ones (A B, B A, ...), so a drift of the shared machine's speed hits all sides alike."""
    order = list(range(sides))
    return order if round_index % 2 == 0 else order[::-1]


def paired_seconds(steps: list, rounds: int) -> list[float]:
    """Seconds per call of each closure in ``steps``, after one warm-up call each. The closures alternate
    call by call, the order reversed every round (A B, B A, ...), so the shared machine's speed drifts hit
    all of them alike."""
    for step in steps:
        step()
    spent = [0.0] * len(steps)
    for r in range(rounds):
        for j in round_order(len(steps), r):
            tic = time.perf_counter()
            steps[j]()
            spent[j] += time.perf_counter() - tic
    return [s / rounds for s in spent]


def train_step(model, batch: int, size: int, in_chans: int, num_classes: int, dtype, channels_last: bool = True,
               device: str = "cpu"):
    """A closure running one forward + backward + SGD step of ``model`` on a fixed random batch (no data, no
    logging): ``dtype`` other than float32 runs the forward under autocast to it, as the suite's trainer does."""
    import torch.nn.functional as F

    from runtime.optim import build_optimizer

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device, memory_format=fmt).train()
    opt = build_optimizer(model, lr=0.01)
    x = torch.randn(batch, in_chans, size, size, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, num_classes, (batch,), device=device)
    device_type = torch.device(device).type

    def step():
        with torch.autocast(device_type, dtype=dtype, enabled=dtype != torch.float32):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step
