"""Mixed precision, chosen once per run (§3.2 of the paper): the autocast context and the GradScaler.

``fp16``: autocast to float16 + ``GradScaler`` (loss scaling; fp32 master weights), the CUDA choice.
``bf16``: autocast to bfloat16, no scaler (bf16 has fp32's exponent range), the CPU choice.
``fp32``: neither. On CUDA the run also chooses cuDNN's autotuner (``cudnn_benchmark``): on where the input
size is fixed (classification crops, segmentation training crops), off where it varies (multi-scale
detection training, whole-image segmentation evaluation: ``cudnn_benchmark_off``), as detectron2 does
(``CUDNN_BENCHMARK: False``): the autotuner times every kernel again for each new shape.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterator

import torch

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "bf16")


@dataclass
class Precision:
    name: str
    autocast: Callable[[], ContextManager]   # a fresh autocast context per call: `with precision.autocast():`
    scaler: torch.amp.GradScaler             # disabled (a pass-through) unless fp16


def autocast_for(precision: str, device: torch.device) -> Callable[[], ContextManager]:
    """A zero-argument factory of the autocast context for ``precision`` on ``device``."""
    if precision not in PRECISIONS:
        raise ValueError(f"train.precision={precision!r}: one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return nullcontext
    if precision == "fp16" and device.type == "cpu":
        # It works (autocast + GradScaler exist on CPU, which is how the tests cover the fp16 path), but
        # few CPUs compute in fp16 natively.
        log.warning("train.precision=fp16 on CPU is slow on most processors; train.precision=bf16 is the CPU choice")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    return lambda: torch.autocast(device.type, dtype=dtype)


def setup_precision(precision: str, device: torch.device, *, cudnn_benchmark: bool = True) -> Precision:
    """The autocast factory and GradScaler of a run; on CUDA also sets cuDNN's autotuner to
    ``cudnn_benchmark``: True for fixed input sizes, False where they vary."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cudnn_benchmark
    return Precision(precision, autocast_for(precision, device),
                     torch.amp.GradScaler(device.type, enabled=precision == "fp16"))


@contextmanager
def cudnn_benchmark_off() -> Iterator[None]:
    """cuDNN's autotuner off inside (inputs of varying size, e.g. whole-image evaluation), restored after."""
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous
