"""Mixed precision and memory format, chosen once per run (§3.2 of the paper) for every task: the autocast
context, the GradScaler and the tensor layout.

``fp16``: autocast to float16 + ``GradScaler`` (loss scaling; fp32 master weights), the CUDA choice.
``bf16``: autocast to bfloat16, no scaler (bf16 has fp32's exponent range).
``fp32``: neither.
``auto``: the low precision this device computes fast (``resolve_precision``): fp16 on CUDA (the paper's
FP16, with loss scaling, as detectron2's and mmengine's AMP); on a CPU, bf16 where oneDNN's bf16 kernels were
measured faster than fp32 and fp32 elsewhere (``cpu_bf16_is_fast``):

* a CPU with AMX (bf16 matrix tiles: Intel Sapphire Rapids and later): bf16, 0.5-0.8x fp32's time per step
  (benchmarks/results/bench/train_amx, benchmarks/results/reproduce_amx);
* an AMD CPU with AVX-512-BF16 (Zen 4 and later): bf16, 0.52-0.72x fp32's time per step for every network of the
  demos and recipes (benchmarks/results/step_settings_amd/);
* an Intel CPU with AVX-512-BF16 but no AMX: fp32, since bf16 autocast converts every operand and ran 1.5x
  slower per step there (benchmarks/results/step_settings.md);
* any other CPU: fp32.

On a CPU the rule also looks at the model when the caller passes it (``model=``): a network with depthwise
convolutions (MobileNet) stays fp32, since oneDNN's bf16 depthwise kernels are slow: its train step took 2.3x
fp32's time in bf16 on both the AMX and the AMD CPU (benchmarks/results/reproduce_amx, step_settings_amd/).

``channels_last`` (``model.channels_last`` of every task): model and inputs in NHWC, what cuDNN's tensor-core
convolutions and oneDNN's CPU convolutions read natively (measured 0.93x the time per step of contiguous
on the CPU above, fp32).

On a CPU the run also keeps freed memory in the process (``keep_cpu_memory``): glibc's malloc otherwise hands
blocks above its mmap threshold back to the kernel on free, and every step pays page faults to allocate the same
activations again (the segmentation demo's train step: 0.87x the time with it, bf16, one thread).

On CUDA the run also chooses cuDNN's autotuner (``cudnn_benchmark``): on where the input size is fixed
(classification crops, segmentation training crops), off where it varies (multi-scale detection training,
whole-image segmentation evaluation: ``cudnn_benchmark_off``), as detectron2 does (``CUDNN_BENCHMARK:
False``): the autotuner times every kernel again for each new shape.
"""
from __future__ import annotations

import ctypes
import logging
import os
import platform
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterator, Optional

import torch

from runtime.config import ConfigError

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "bf16", "auto")


@dataclass
class Precision:
    name: str                                # fp32, fp16 or bf16 ("auto" resolved)
    autocast: Callable[[], ContextManager]   # a fresh autocast context per call: `with precision.autocast():`
    scaler: torch.amp.GradScaler             # disabled (a pass-through) unless fp16
    memory_format: torch.memory_format = torch.contiguous_format  # of the model and of every input batch


def _cpu_capabilities() -> Optional[dict]:
    """torch's CPU feature flags (``avx512_bf16``, ``amx_tile``, ...); None on torch < 2.6, which has no query."""
    try:
        return torch.cpu.get_capabilities()
    except AttributeError:
        return None


def cpu_has_amx() -> bool:
    """True when this CPU has AMX bf16 tiles (Intel Sapphire Rapids and later)."""
    caps = _cpu_capabilities()
    if caps is None:  # torch < 2.6
        is_amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
        return bool(is_amx()) if is_amx is not None else False
    return bool(caps.get("amx_bf16") or caps.get("amx_tile"))


def _cpu_has_avx512_bf16() -> bool:
    return bool((_cpu_capabilities() or {}).get("avx512_bf16"))


def _cpuinfo(field: str) -> str:
    """The first value of ``field`` in ``/proc/cpuinfo`` (``vendor_id``, ``model name``), or ``""`` where there
    is no such file or field (macOS, Windows, some ARM kernels)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith(field)), "")
    except OSError:
        return ""


def _cpu_vendor() -> str:
    """``GenuineIntel``, ``AuthenticAMD``, ... (``/proc/cpuinfo``'s ``vendor_id``), or ``""``."""
    return _cpuinfo("vendor_id")


def cpu_bf16_is_fast() -> bool:
    """True where bf16 autocast was measured faster than fp32 on this kind of CPU: AMX, or AVX-512-BF16 on an
    AMD CPU (Zen 4+); False on other CPUs (see the module docstring for the measurements)."""
    return cpu_has_amx() or (_cpu_has_avx512_bf16() and _cpu_vendor() == "AuthenticAMD")


def cpu_description() -> str:
    """The CPU's model name and the features that decide low-precision speed (``AVX-512-BF16``, ``AMX``),
    e.g. ``Intel(R) Xeon(R) Processor (AVX-512-BF16, AMX)``: two machines of one model name may differ in
    them, and a run's wall time means little without them."""
    name = _cpuinfo("model name") or platform.processor() or platform.machine()
    features = ["AVX-512-BF16"] if _cpu_has_avx512_bf16() else []
    features += ["AMX"] if cpu_has_amx() else []
    return f"{name} ({', '.join(features)})" if features else name


def has_depthwise_conv(model: torch.nn.Module) -> bool:
    """True when ``model`` has a depthwise convolution (``groups == in_channels > 1``), e.g. MobileNet's."""
    return any(isinstance(m, torch.nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels for m in model.modules())


def resolve_precision(precision: str, device: torch.device, model: Optional[torch.nn.Module] = None) -> str:
    """``precision`` itself, or for ``auto`` the low precision ``device`` computes fast: fp16 on CUDA, bf16 on
    a CPU where it was measured faster (``cpu_bf16_is_fast``: AMX, or AMD with AVX-512-BF16) unless ``model``
    has depthwise convolutions, fp32 otherwise (any other device: fp32)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"train.precision={precision!r}: one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "fp16"
    if device.type != "cpu" or not cpu_bf16_is_fast():
        return "fp32"
    return "fp32" if model is not None and has_depthwise_conv(model) else "bf16"


AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}  # the low precisions' autocast dtypes


def memory_format_for(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def autocast_for(precision: str, device: torch.device,
                 model: Optional[torch.nn.Module] = None) -> Callable[[], ContextManager]:
    """A zero-argument factory of the autocast context for ``precision`` (``auto`` resolved, for ``model`` if
    given) on ``device``."""
    precision = resolve_precision(precision, device, model)
    if precision == "fp32":
        return nullcontext
    if precision == "fp16" and device.type == "cpu":
        # It works (autocast + GradScaler exist on CPU, which is how the tests cover the fp16 path), but
        # few CPUs compute in fp16 natively.
        log.warning("train.precision=fp16 on CPU is slow on most processors; train.precision=bf16 is the CPU choice")
    dtype = AUTOCAST_DTYPES[precision]
    return lambda: torch.autocast(device.type, dtype=dtype)


_MALLOC_KEPT: Optional[bool] = None
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h


def keep_cpu_memory() -> bool:
    """Have glibc's malloc keep freed memory for reuse instead of returning it to the kernel: its mmap threshold
    (blocks above it are mmap-ed, and unmapped on free) and its trim threshold (the heap's free top is given back
    above it) raised to 1 GiB. A train step allocates the same tensors again every step; with glibc's defaults
    (a threshold that adapts from 128 KiB up to 32 MiB) each step pays page faults for them. What jemalloc and
    tcmalloc do, which torch's CPU launcher (``python -m torch.backends.xeon.run_cpu``) preloads for the same
    reason; the process keeps its peak memory, as CUDA's caching allocator does. Process-wide (DataLoader workers
    forked afterwards inherit it), once; returns whether it is in effect: False where the C library is not glibc,
    or with ``TRICKS_CPU_MALLOC=default`` in the environment (glibc's defaults kept)."""
    global _MALLOC_KEPT
    if _MALLOC_KEPT is None:
        _MALLOC_KEPT = False
        if os.environ.get("TRICKS_CPU_MALLOC", "") != "default" and platform.libc_ver()[0] == "glibc":
            try:
                mallopt = ctypes.CDLL(None).mallopt
            except (OSError, AttributeError):
                mallopt = None
            if mallopt is not None:
                # 1 GiB where glibc takes it; older ones cap the mmap threshold at 32 MiB (HEAP_MAX_SIZE / 2)
                mmap = any(mallopt(_M_MMAP_THRESHOLD, size) == 1 for size in (1 << 30, 32 << 20))
                _MALLOC_KEPT = mmap and mallopt(_M_TRIM_THRESHOLD, 1 << 30) == 1
    return _MALLOC_KEPT


def setup_precision(precision: str, device: torch.device, *, channels_last: bool = False,
                    cudnn_benchmark: bool = True, model: Optional[torch.nn.Module] = None) -> Precision:
    """The autocast factory, GradScaler and memory format of a run (``auto`` resolved for ``model`` and logged
    once); on CUDA also sets cuDNN's autotuner to ``cudnn_benchmark``: True for fixed input sizes, False where
    they vary; on a CPU keeps freed memory in the process (``keep_cpu_memory``)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cudnn_benchmark
    elif device.type == "cpu":
        keep_cpu_memory()
    name = resolve_precision(precision, device, model)
    if precision == "auto":
        if device.type == "cuda":
            why = "CUDA"
        elif device.type != "cpu":
            why = f"{device.type}: no low-precision rule"
        elif not cpu_bf16_is_fast():
            why = "a CPU without AMX or AMD's AVX-512-BF16, where bf16 autocast is slower than fp32"
        elif name == "fp32":  # a CPU that runs bf16 fast, but not for this model
            why = "the model's depthwise convolutions, which oneDNN runs slower in bf16"
        else:
            why = "a CPU with AMX" if cpu_has_amx() else "an AMD CPU with AVX-512-BF16"
        log.info("train.precision=auto: %s (%s)", name, why)
    return Precision(name, autocast_for(name, device), torch.amp.GradScaler(device.type, enabled=name == "fp16"),
                     memory_format_for(channels_last))


@contextmanager
def cudnn_benchmark_off() -> Iterator[None]:
    """cuDNN's autotuner off inside (inputs of varying size, e.g. whole-image evaluation), restored after."""
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous
