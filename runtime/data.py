"""Data loading pieces every trainer shares: worker counts, per-sample seeds, resuming inside an epoch.

Exact resume with persistent workers: the augmentation of a sample is a function of (seed, epoch, rank,
index) alone. ``SeededSampler`` yields ``(index, sample_seed)`` pairs and ``SeededDataset`` runs the
wrapped dataset (its transforms draw from torch's RNG, as torchvision.transforms.v2 does) under that seed,
inside ``torch.random.fork_rng`` so the caller's stream is untouched. So it does not matter which worker
loads a sample, whether workers persist across epochs, or where in the epoch a run resumed.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from backbones import BackboneArgumentError, create_backbone
from runtime.config import ConfigError

log = logging.getLogger(__name__)


@contextlib.contextmanager
def backbone_config_errors(key: str, kwargs: Optional[dict] = None, kwargs_key: str = "model.kwargs"):
    """Turn the registry's errors for a config's backbone (an unknown name: ``KeyError``; an argument the
    builder does not take: ``BackboneArgumentError``) into a ``ConfigError`` naming the config key."""
    try:
        yield
    except KeyError as e:
        if not str(e.args[0] if e.args else "").startswith("unknown backbone"):
            raise
        raise ConfigError(f"{key}: {e.args[0]}") from None
    except BackboneArgumentError as e:
        where = f"{kwargs_key} {kwargs}" if kwargs else key
        raise ConfigError(f"{where}: {e}") from None


def saved_normalization(weights: Optional[str]) -> Optional[tuple[list[float], list[float]]]:
    """The mean/std a ``tricks train`` run recorded with its weights: the metadata of its ``model.safetensors``,
    or ``recorded_normalization`` of its ``.pth`` checkpoint. None for other files (timm, torchvision, a state
    dict, a missing or unreadable file: those are reported where the weights load)."""
    if not weights:
        return None
    path = Path(weights)
    try:
        if path.suffix == ".safetensors":
            from backbones.weights import read_metadata

            meta = read_metadata(path)
        elif path.suffix in (".pth", ".pt"):
            return recorded_normalization(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
        else:
            return None
    except Exception:
        return None
    return _mean_std(meta)


def recorded_normalization(ckpt: Any) -> Optional[tuple[list[float], list[float]]]:
    """The mean/std inside a ``tricks train`` checkpoint: the ``normalization`` the run resolved and used (a
    classification ``last.pth`` records it: its config's may be null, taken from its own ``model.weights``),
    else its config's ``data.mean``/``data.std`` when set. None for anything else."""
    if not isinstance(ckpt, dict):
        return None
    return _mean_std(ckpt.get("normalization") or (ckpt.get("config") or {}).get("data"))


def _mean_std(meta: Any) -> Optional[tuple[list[float], list[float]]]:
    mean, std = (meta or {}).get("mean"), (meta or {}).get("std")
    if isinstance(mean, list) and isinstance(std, list) and mean and len(mean) == len(std):
        return [float(v) for v in mean], [float(v) for v in std]
    return None


def normalization(mean: Optional[Sequence[float]], std: Optional[Sequence[float]], backbone: str, in_chans: int,
                  builder_kwargs: Optional[dict] = None, key: str = "model.backbone",
                  weights: Optional[str] = None) -> tuple[list[float], list[float]]:
    """``data.mean``/``data.std`` (0-1 scale), one value per input channel. Where they are null: the mean/std
    ``weights`` were trained with (``saved_normalization``: a ``tricks train`` file with as many channels, as
    timm takes a pretrained model's own), else the defaults of registry backbone ``backbone`` (read from a
    copy built on the meta device: no memory, no random numbers drawn). Given values that differ from the
    ones ``weights`` recorded are kept, with a warning.
    The copy is built also when both are given: every engine calls this first, so an unknown backbone or
    builder argument is a ``ConfigError`` naming ``key`` (or ``model.kwargs``) before anything else is built."""
    with torch.device("meta"), backbone_config_errors(key, builder_kwargs):
        probe = create_backbone(backbone, num_classes=0, in_chans=in_chans, **(builder_kwargs or {}))
    saved = saved_normalization(weights)
    if saved is not None and len(saved[0]) != in_chans:
        saved = None  # e.g. a 1-channel pretraining whose stem is spread over RGB: its statistics do not apply
    if mean is None or std is None:
        if saved is not None:
            log.info("data.mean/data.std: %s / %s, as %s was trained (data.mean and data.std in the config "
                     "override this)", saved[0], saved[1], weights)
            mean, std = mean or saved[0], std or saved[1]
        mean, std = mean or probe.default_cfg["mean"], std or probe.default_cfg["std"]
    elif saved is not None and len(mean) == len(std) == len(saved[0]) and (
            not np.allclose(mean, saved[0]) or not np.allclose(std, saved[1])):
        log.warning("data.mean/data.std %s / %s differ from the %s / %s that %s was trained with: inputs are "
                    "normalised unlike in its training (set data.mean and data.std to null to take the file's)",
                    list(mean), list(std), saved[0], saved[1], weights)
    mean, std = list(mean), list(std)
    if not len(mean) == len(std) == in_chans:
        raise ConfigError(f"data.mean ({len(mean)} values) and data.std ({len(std)} values) must have one value "
                         f"per input channel (model.in_chans={in_chans})")
    return mean, std


def default_workers(requested: int = -1) -> int:
    """``requested`` if >= 0, else DataLoader workers per process from the CPUs this process may use
    divided by the processes on this machine (torchrun's LOCAL_WORLD_SIZE), one left for the main
    process, at most 8."""
    if requested >= 0:
        return requested
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        cpus = os.cpu_count() or 1
    per_process = cpus // max(int(os.environ.get("LOCAL_WORLD_SIZE", 1)), 1)
    return max(min(per_process - 1, 8), 0)


def sample_seed(seed: int, epoch: int, rank: int, index: int) -> int:
    """A 63-bit seed, a hash of (seed, epoch, rank, index)."""
    return int(np.random.SeedSequence([seed, epoch, rank, index]).generate_state(2, np.uint32).astype(np.uint64)
               .dot(np.array([1 << 31, 1], dtype=np.uint64)))


class SeededSampler(Sampler[tuple[int, int]]):
    """``(index, seed)`` pairs in the order of ``sampler`` (e.g. a ``DistributedSampler``); ``set_epoch``
    reaches both."""

    def __init__(self, sampler: Sampler[int], seed: int, rank: int = 0):
        self.sampler, self.seed, self.rank, self.epoch = sampler, seed, rank, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for index in self.sampler:
            yield index, sample_seed(self.seed, self.epoch, self.rank, index)

    def __len__(self) -> int:
        return len(self.sampler)


class SeededDataset(Dataset):
    """Items of ``dataset`` keyed by ``(index, seed)``: loaded and augmented with torch's CPU generator seeded
    with ``seed`` (what ``torch.manual_seed`` does on the CPU). Only the CPU generator: ``torch.manual_seed``
    also queues a seed for every accelerator backend, formatting a stack trace each time while CUDA is not
    initialised (about a millisecond per sample on a CPU, as much as a sample's whole augmentation)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            return self.dataset[index]


class GroupedBatchSampler(Sampler[list]):
    """Batches whose items share a group (aspect ratio wider / taller than 1, as torchvision's detection
    references and detectron2 group them), in the order the items come from ``sampler``: an item joins
    its group's buffer, and a full buffer is a batch. Incomplete buffers at the end of an epoch are
    dropped (their items come back in other epochs). ``sampler`` may yield ``(index, seed)`` pairs."""

    def __init__(self, sampler: Sampler, group_ids: Sequence[int], batch_size: int):
        self.sampler, self.group_ids, self.batch_size = sampler, list(group_ids), batch_size

    def __iter__(self):
        buffers: dict[int, list] = defaultdict(list)
        for item in self.sampler:
            index = item[0] if isinstance(item, tuple) else item
            buffer = buffers[self.group_ids[index]]
            buffer.append(item)
            if len(buffer) == self.batch_size:
                yield list(buffer)
                buffer.clear()

    def __len__(self) -> int:  # an upper bound is not allowed here: the exact count of full batches
        counts: dict[int, int] = defaultdict(int)
        for item in self.sampler:
            counts[self.group_ids[item[0] if isinstance(item, tuple) else item]] += 1
        return sum(c // self.batch_size for c in counts.values())

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)


class SkipBatches(Sampler[list]):
    """The wrapped batch sampler without its first ``skip`` batches: resuming inside an epoch without
    loading what the interrupted run already used. ``skip`` stays until it is set again (a DataLoader with
    workers starts its batch sampler twice per ``iter``): set it back to 0 for the next epoch."""

    def __init__(self, batch_sampler: Sampler[list]):
        self.batch_sampler, self.skip = batch_sampler, 0

    def __iter__(self):
        return itertools.islice(iter(self.batch_sampler), self.skip, None)

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def set_epoch(self, epoch: int) -> None:
        self.batch_sampler.set_epoch(epoch) if hasattr(self.batch_sampler, "set_epoch") else None


class EpochStream:
    """Batches of ``loader`` across epochs, for iteration-based loops: starts at epoch ``epoch`` after its
    first ``used`` batches (resuming inside an epoch), then moves to the next epoch whenever the loader
    ends. ``epoch`` and ``used`` always name the position of the next batch. ``loader.batch_sampler`` is a
    ``SkipBatches``; ``sampler.set_epoch`` sets the order (and seeds) of each epoch. Workers start at the
    first ``next``, so a finished run that is resumed starts none."""

    def __init__(self, loader, sampler, epoch: int = 0, used: int = 0):
        self.loader, self.sampler, self.epoch, self.used = loader, sampler, epoch, used
        self._batches = None

    def _start(self) -> None:
        self.sampler.set_epoch(self.epoch)
        self.loader.batch_sampler.skip = self.used
        self._batches = iter(self.loader)

    def __iter__(self):
        return self

    def __next__(self):
        if self._batches is None:
            self._start()
        try:
            batch = next(self._batches)
        except StopIteration:
            self.epoch, self.used = self.epoch + 1, 0
            self._start()
            batch = next(self._batches)  # an epoch without a single batch ends the stream
        self.used += 1
        return batch
