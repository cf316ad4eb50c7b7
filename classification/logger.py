"""Run records: JSONL (the source of truth), TensorBoard, and PNG plots at the end of a run."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger(__name__)


class RunLogger:
    """Writes ``metrics.jsonl`` and TensorBoard events under ``output_dir``; a no-op off rank 0."""

    def __init__(self, output_dir: Path, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = output_dir / "metrics.jsonl"
        self._tb = None
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


def read_records(path: Path, kind: Optional[str] = None) -> list[dict]:
    if not path.is_file():
        return []
    with path.open() as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [r for r in records if kind is None or r["kind"] == kind]


def plot_run(output_dir: Path) -> list[Path]:
    """Plot training loss, validation accuracy and learning rate from ``metrics.jsonl`` as PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = read_records(output_dir / "metrics.jsonl", "train")
    val = read_records(output_dir / "metrics.jsonl", "val")
    written = []
    panels = [
        ("loss.png", "training loss", [("loss", train, "step", "loss")]),
        ("accuracy.png", "validation accuracy (%)", [("top-1", val, "epoch", "top1"), ("top-5", val, "epoch", "top5")]),
        ("lr.png", "learning rate", [("lr", train, "step", "lr")]),
    ]
    for filename, title, series in panels:
        if not any(records for _, records, _, _ in series):
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, records, x, y in series:
            ax.plot([r[x] for r in records], [r[y] for r in records], label=label, marker="o" if x == "epoch" else None)
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
