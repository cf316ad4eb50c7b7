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

RESULTS = Path(__file__).resolve().parent / "results"
RESULTS.mkdir(exist_ok=True)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {gpu}; torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads; Python {platform.python_version()}")


def header(title: str) -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=RESULTS.parent).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                           cwd=RESULTS.parent).stdout.strip()
    commit += " + uncommitted changes (committed with these results)" if dirty else ""
    command = " ".join(["python", *sys.argv])
    return (f"# {title}\n\n- machine: {machine()}\n- command: `{command}`\n- commit: {commit or 'n/a'}, "
            f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC\n")


def table(rows: list[list], head: list[str]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def paired_seconds(steps: list, rounds: int) -> list[float]:
    """Seconds per call of each closure in ``steps``, after one warm-up call each. The closures alternate
    call by call, the order reversed every round (A B, B A, ...), so the shared machine's speed drifts hit
    all of them alike."""
    for step in steps:
        step()
    spent = [0.0] * len(steps)
    for r in range(rounds):
        for j in (range(len(steps)) if r % 2 == 0 else reversed(range(len(steps)))):
            tic = time.perf_counter()
            steps[j]()
            spent[j] += time.perf_counter() - tic
    return [s / rounds for s in spent]
