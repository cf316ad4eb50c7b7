"""Checkpoints that survive crashes: atomic writes, and everything needed to resume exactly."""
from __future__ import annotations

import logging
import os
import random
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

log = logging.getLogger(__name__)


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """``torch.save`` to a temporary file in the same directory, flushed to disk (fsync), then renamed
    over ``path`` and the directory entry synced.

    The rename is atomic: a crash during the write leaves the previous checkpoint intact; the fsyncs make
    the new one survive a power loss once this returns (a rename alone may reach the disk before the data).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state, tmp)
        with open(tmp, "rb") as written:  # fsync syncs the file's data, whichever descriptor names it
            os.fsync(written.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # a platform without directory handles (Windows): the rename is as durable as it gets
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the data itself is synced
    finally:
        os.close(fd)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint written by ``save_checkpoint`` (tensors and plain containers only)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt or foreign file: say which and what to do
        from .errors import CheckpointError

        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"cannot load checkpoint {path} ({first}): point train.resume at another checkpoint, "
                              "or remove it to start from scratch") from e


# Keys a resumed run must share with the run it resumes: its position is counted in steps of their batch.
RESUME_KEYS = ("train.batch_size", "train.accum_steps")


def load_training_checkpoint(path: Path, config: Optional[dict[str, Any]] = None,
                             keys: tuple[str, ...] = RESUME_KEYS) -> dict[str, Any]:
    """``load_checkpoint`` for ``train.resume``: the file must hold a training state (``training_state``:
    model, optimizer, position), and ``config`` (this run's, as a dict) must agree with the saved run's on
    ``keys``, else a ``CheckpointError`` / ``ConfigError`` saying what to resume from or with. Weights-only
    files (``model.safetensors``, ``model_final.pth``) are for ``model.weights`` (fine-tuning), not resuming."""
    from .errors import CheckpointError

    path = Path(path)
    weights_only = (f"{path} holds weights only, not a training state (optimizer, schedule, position): resume from "
                    f"the run's last.pth, or start a new run from these weights with model.weights={path}")
    if path.suffix == ".safetensors":
        raise CheckpointError(weights_only)
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict) or not {"model", "optimizer"} <= set(ckpt):
        raise CheckpointError(weights_only)
    saved = ckpt.get("config")
    if config is not None and isinstance(saved, dict):
        for key in keys:
            mine, theirs = _dotted(config, key), _dotted(saved, key)
            if mine is not None and theirs is not None and mine != theirs:
                from .config import ConfigError

                raise ConfigError(f"{key}={mine} but {path} was trained with {key}={theirs}: a resumed run continues "
                                  f"that run's schedule, counted in its steps; resume with {key}={theirs}, or start "
                                  f"a new run (model.weights={path.parent / 'model.safetensors'} or the weights you "
                                  "want, to fine-tune)")
    return ckpt


def _dotted(config: dict[str, Any], key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def training_state(model: torch.nn.Module, stepper: Any, **extra: Any) -> dict[str, Any]:
    """What every trainer's checkpoint holds: the model and the ``runtime.step.OptimizerStep``'s optimizer,
    schedule, loss scaler and non-finite streak (``extra``: position, RNG states, metrics, config)."""
    return {"model": model.state_dict(), "optimizer": stepper.optimizer.state_dict(),
            "scheduler": stepper.scheduler.state_dict(), "scaler": stepper.scaler.state_dict(),
            "stepper": stepper.state_dict(), **extra}


def restore_training_state(ckpt: dict[str, Any], model: torch.nn.Module, stepper: Any) -> None:
    """Load what ``training_state`` wrote into ``model`` and ``stepper`` (its optimizer, schedule, scaler)."""
    model.load_state_dict(ckpt["model"])
    # How this run's optimizer steps (fused kernel or not) is its own choice, not the checkpoint's: torch's
    # load_state_dict would take "fused"/"foreach" from the saved groups, and a fused SGD whose groups say
    # otherwise fails on the found_inf that OptimizerStep and GradScaler hand it.
    implementation = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in stepper.optimizer.param_groups]
    stepper.optimizer.load_state_dict(ckpt["optimizer"])
    for group, kept in zip(stepper.optimizer.param_groups, implementation):
        group.update(kept)
    stepper.scheduler.load_state_dict(ckpt["scheduler"])
    stepper.scaler.load_state_dict(ckpt["scaler"])
    stepper.load_state_dict(ckpt.get("stepper", {}))


def resolve_resume(resume: Optional[str], output_dir: Path) -> Optional[Path]:
    """``None`` -> no resume; ``"auto"`` -> ``output_dir/last.pth`` if it exists; else the given path."""
    if resume is None:
        return None
    if resume == "auto":
        last = output_dir / "last.pth"
        if last.is_file():
            return last
        log.info("train.resume=auto: no %s yet, starting from scratch", last)
        return None
    path = Path(resume)
    if not path.is_file():
        from .errors import UserPathError

        raise UserPathError(f"train.resume={resume!r}: no such checkpoint file")
    return path


def rng_state() -> dict[str, Any]:
    """Every random generator a training step touches, in a form ``torch.load(weights_only=True)`` reads."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    python = state["python"]  # lists after a round trip; random.setstate needs tuples
    random.setstate((python[0], tuple(python[1]), python[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_per_rank(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (``[obj]`` in a single process). A collective: every rank
    must call it."""
    if not torch.distributed.is_initialized():
        return [obj]
    objects: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(objects, obj)
    return objects


def gather_rng_states() -> list[dict[str, Any]]:
    """RNG states of every rank (rank order), so a resumed DDP run continues every stream exactly.
    A collective: every rank must call it."""
    return gather_per_rank(rng_state())


def restore_rng_states(states: list[dict[str, Any]], rank: int, world_size: int) -> None:
    """Restore this rank's stream from ``gather_rng_states``' list. Resuming with another number of
    processes is allowed (the weights, optimizer and position are exact) but the random streams cannot
    be: warn and continue, in every task."""
    if len(states) == world_size:
        set_rng_state(states[rank])
    else:
        log.warning("resuming with %d processes from a run with %d: the model, optimizer and position are "
                    "restored, the random streams are not (augmentation differs from an uninterrupted run)",
                    world_size, len(states))
