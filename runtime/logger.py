"""Run records: JSONL (the source of truth), TensorBoard, and PNG plots at the end of a run."""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

log = logging.getLogger(__name__)


class RunLogger:
    """Writes ``metrics.jsonl`` and TensorBoard events under ``output_dir``; a no-op off rank 0."""

    def __init__(self, output_dir: Path, enabled: bool = True, tensorboard: bool = True,
                 resumed_step: Optional[int] = None, resume: Optional[str] = None):
        """``resumed_step``: the step a resumed run continues from; the records of the earlier process after
        it (logged after its last checkpoint) are dropped, as the resumed run logs those steps again. None: a
        new run, which starts a new ``metrics.jsonl`` and TensorBoard log (an earlier run's in the same
        ``output_dir`` is replaced, with a warning: its records appended to would mix two runs). ``resume``:
        the run's ``train.resume``, for that warning (``auto`` that found no ``last.pth`` cannot continue it)."""
        self.enabled = enabled
        self.path = output_dir / "metrics.jsonl"
        self._tb = None
        if enabled and self.path.is_file():
            if resumed_step is None:
                if resume == "auto":
                    log.warning("%s holds an earlier run's metrics.jsonl but no last.pth (it ended before its first "
                                "checkpoint), so train.resume=auto starts anew: this run replaces those records",
                                output_dir)
                else:
                    log.warning("%s holds an earlier run (metrics.jsonl, checkpoints): this new run replaces it; "
                                "set train.resume=auto to continue that run instead, or choose another output_dir",
                                output_dir)
                self.path.unlink()
                for events in (output_dir / "tb").glob("events.out.tfevents.*"):
                    events.unlink()
            else:
                kept = [r for r in read_records(self.path) if r.get("step", 0) <= resumed_step]
                tmp = self.path.with_suffix(".jsonl.tmp")
                tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
                os.replace(tmp, self.path)
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is a declared dependency; keep running if a user removed it
                log.warning("tensorboard is not installed: metrics go to %s only", self.path)
            else:
                self._tb = SummaryWriter(str(output_dir / "tb"))

    def log(self, kind: str, step: int, **values: Any) -> None:
        """Append one record ``{"kind", "step", **values}``; numbers also go to TensorBoard as kind/key."""
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, **values}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def format_duration(seconds: float) -> str:
    """``H:MM:SS`` with as many hours as it takes (an ETA of 30 h reads 30:00:00, not 06:00:00)."""
    seconds = max(int(seconds), 0)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def reduce_mean(values: dict[str, torch.Tensor], count: int | torch.Tensor = 1) -> dict[str, float]:
    """Sums of ``count`` steps on this rank -> means over all steps of all ranks, as Python floats.

    ``count`` is a Python int (the same on every rank) or a device tensor (the loops count stepped
    steps on the device), summed over ranks in the same all-reduce; a tensor count of 0 gives NaN.
    One all-reduce for the whole dict, and the only host sync: call it at log steps, not every step."""
    names = sorted(values)
    if not names:
        return {}
    counted = isinstance(count, torch.Tensor)
    stacked = torch.stack([values[n].detach().float().reshape(()) for n in names]
                          + ([count.detach().float().reshape(())] if counted else []))
    world = 1
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(stacked)
        world = torch.distributed.get_world_size()
    means = stacked[:-1] / stacked[-1] if counted else stacked / (max(count, 1) * world)
    return dict(zip(names, means.tolist()))


class LossMeter:
    """Sums, on the device, of the losses of the optimizer steps that were taken (a skipped non-finite step's
    losses are not logged) and their count; ``mean()`` at a log step turns them into means over steps and
    ranks (``reduce_mean``: one all-reduce, the only host sync) and starts a new window."""

    def __init__(self, device: torch.device):
        self.sums: dict[str, torch.Tensor] = {}
        self.count = torch.zeros((), device=device)

    def add(self, stepped: torch.Tensor, **losses: torch.Tensor) -> None:
        """``stepped``: the step's bool tensor from ``OptimizerStep.step``; ``losses``: its scalar losses."""
        for name, value in losses.items():
            masked = torch.where(stepped, value.detach().float(), 0.0)
            self.sums[name] = self.sums[name] + masked if name in self.sums else masked
        self.count += stepped

    def mean(self) -> dict[str, float]:
        values = reduce_mean(self.sums, self.count)
        self.sums = {}
        self.count.zero_()
        return values


class Progress:
    """Progress of an iteration-counted run: a tqdm bar on a terminal, log lines otherwise (log files,
    nohup), both with img/s over the last window and the ETA of the whole run."""

    def __init__(self, total_steps: int, start_step: int, *, enabled: bool, desc: str = "train",
                 logger: Optional[logging.Logger] = None):
        from tqdm import tqdm

        self.total, self.logger = total_steps, logger or log
        self.enabled = enabled
        self.bar = tqdm(total=total_steps, initial=start_step, desc=desc, dynamic_ncols=True, leave=False,
                        disable=not enabled or not sys.stderr.isatty())
        self._tic, self._images, self._last_step = time.perf_counter(), 0, start_step

    def update(self, images: int) -> None:
        """One step done, ``images`` images in it (all ranks)."""
        self._images += images
        self.bar.update(1)

    def report(self, step: int, **values: float) -> dict[str, float]:
        """img/s since the last report and the ETA; shown with ``values`` (loss, lr, ...). Returns both."""
        now = time.perf_counter()
        elapsed = max(now - self._tic, 1e-9)
        rate = self._images / elapsed
        eta = (self.total - step) * elapsed / max(step - self._last_step, 1)
        self._tic, self._images, self._last_step = now, 0, step
        if self.enabled:
            shown = {k: f"{v:.4g}" for k, v in values.items()}
            if self.bar.disable:
                self.logger.info("step %d/%d  %s  %.1f img/s  ETA %s", step, self.total,
                                 "  ".join(f"{k} {v}" for k, v in shown.items()), rate, format_duration(eta))
            else:
                self.bar.set_postfix(**shown, img_s=f"{rate:.1f}")
        return {"img_per_s": rate, "eta_s": eta}

    def close(self) -> None:
        self.bar.close()


def read_records(path: Path, kind: Optional[str] = None) -> list[dict]:
    if not path.is_file():
        return []
    with path.open() as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [r for r in records if kind is None or r["kind"] == kind]


def plot_run(output_dir: Path, val_metrics: tuple[tuple[str, str], ...] = (("top-1", "top1"), ("top-5", "top5")),
             val_x: str = "epoch", val_title: str = "validation accuracy (%)") -> list[Path]:
    """Plot training loss, the validation metrics (``(label, key)`` pairs of the "val" records, against
    ``val_x``) and the learning rate from ``metrics.jsonl`` as PNGs: loss.png, accuracy.png, lr.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = read_records(output_dir / "metrics.jsonl", "train")
    val = [r for r in read_records(output_dir / "metrics.jsonl", "val") if val_x in r]
    written = []
    panels = [
        ("loss.png", "training loss", [("loss", train, "step", "loss")]),
        ("accuracy.png", val_title, [(label, [r for r in val if key in r], val_x, key) for label, key in val_metrics]),
        ("lr.png", "learning rate", [("lr", train, "step", "lr")]),
    ]
    for filename, title, series in panels:
        if not any(records for _, records, _, _ in series):
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, records, x, y in series:
            ax.plot([r[x] for r in records], [r[y] for r in records], label=label, marker=None if records is train else "o")
        ax.set_xlabel(series[0][2])
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend()
        fig.tight_layout()
        fig.savefig(output_dir / filename, dpi=100)
        plt.close(fig)
        written.append(output_dir / filename)
    return written
