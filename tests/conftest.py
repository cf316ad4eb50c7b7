"""Helpers shared by the trainers' tests."""
from __future__ import annotations

import contextlib
from typing import Iterator

import pytest


class Crash(Exception):
    """What ``crash_after_checkpoint`` raises: the run dies right after a checkpoint is on disk."""


@contextlib.contextmanager
def crash_after_checkpoint(monkeypatch: pytest.MonkeyPatch, module, key: str, value: int) -> Iterator[None]:
    """Within the block, ``module.save_checkpoint`` saves as usual and then raises ``Crash`` once the saved
    state has ``state[key] == value`` (``"step"`` for classification, ``"iteration"`` for detection and
    segmentation); the block must raise it. The original function is back afterwards, for the resume."""
    original = module.save_checkpoint

    def save_then_crash(state, path):
        original(state, path)
        if state[key] == value:
            raise Crash

    monkeypatch.setattr(module, "save_checkpoint", save_then_crash)
    try:
        with pytest.raises(Crash):
            yield
    finally:
        monkeypatch.setattr(module, "save_checkpoint", original)
