"""Strict checkpoint loading for evaluation and resume, with errors that say what differs.

A checkpoint that does not fit the model (another architecture, another task or engine, another number of
classes) must never be evaluated as a partly random model: every engine loads strictly, and the error is
one line naming the file, the counts and first examples of missing / unexpected / mis-shaped keys, and,
when the run that wrote it is known (the checkpoint's ``config`` entry, or the ``config.yaml`` every run
writes next to its checkpoints), that run's task, engine, model and number of classes.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from .errors import CheckpointError, UserPathError

# Where trainers keep the model inside a checkpoint (ours, detectron2's and mmengine's: "model" / "state_dict").
_MODEL_KEYS = ("model", "state_dict")


def read_checkpoint(path: str | os.PathLike) -> Any:
    """``torch.load(weights_only=True)`` of ``path``; a missing, damaged or foreign file is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise UserPathError(f"checkpoint {path} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, not a torch file, or a pickle needing arbitrary code
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot read checkpoint {path} ({first}); the file is damaged or not a checkpoint "
                              "of this suite: copy or save it again") from None


def model_state(checkpoint: Any, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The model's state dict inside a loaded checkpoint (top level, or under "model" / "state_dict")."""
    state = checkpoint
    if isinstance(state, Mapping):
        for key in _MODEL_KEYS:
            if isinstance(state.get(key), Mapping):
                state = state[key]
                break
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"checkpoint {path} holds no model state dict (a mapping of names to tensors)")
    return dict(state)


def saved_config(checkpoint: Any, path: Path) -> Optional[Mapping[str, Any]]:
    """The resolved config of the run that wrote ``path``: its ``config`` entry, or the run's config.yaml."""
    if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("config"), Mapping):
        return checkpoint["config"]
    config_file = path.parent / "config.yaml"
    if config_file.is_file():
        import yaml

        try:
            found = yaml.safe_load(config_file.read_text(encoding="utf-8"))
        except (yaml.YAMLError, OSError, UnicodeDecodeError):
            return None
        return found if isinstance(found, Mapping) else None
    return None


def describe_run(config: Mapping[str, Any]) -> str:
    """``task=detection engine=torch model=resnet18d 3 classes`` from a resolved config dict."""
    model, data = config.get("model") or {}, config.get("data") or {}
    parts = [f"task={config.get('task', 'classification')}"]
    if "engine" in config:
        parts.append(f"engine={config['engine']}")
    name = model.get("backbone") or model.get("name")
    if name:
        parts.append(f"model={name}")
    classes = data.get("classes", "missing")
    if isinstance(classes, list):
        parts.append(f"{len(classes)} classes")
    elif classes is None:
        parts.append("20 classes (VOC)")
    elif isinstance(data.get("num_classes"), int):
        parts.append(f"{data['num_classes']} classes")
    return " ".join(parts)


def _examples(keys: list[str], limit: int = 3) -> str:
    return ", ".join(keys[:limit]) + (", ..." if len(keys) > limit else "")


def check_fits(model: torch.nn.Module, state: Mapping[str, torch.Tensor], path: str | os.PathLike, what: str,
               checkpoint: Any = None) -> None:
    """Raise ``CheckpointError`` unless ``state`` has exactly the keys and shapes of ``model``'s state dict.

    ``what`` describes the model being loaded ("a torchvision-engine Faster R-CNN with 20 classes");
    ``checkpoint`` (the whole loaded file) lets the message name the run that wrote it.
    """
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(f"{k} file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                        for k in set(own) & set(state) if tuple(state[k].shape) != tuple(own[k].shape))
    if not (missing or unexpected or mismatched):
        return
    path = Path(path)
    differences = [f"{len(keys)} {name} ({_examples(keys)})" for name, keys in
                   (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched))
                   if keys]
    saved = saved_config(checkpoint, path)
    origin = f"; it was written by a run of {describe_run(saved)}" if saved else ""
    raise CheckpointError(f"checkpoint {path} does not fit {what}: {', '.join(differences)}{origin}; evaluate or "
                          "resume it with the config (task, engine, model, classes) it was trained with")


def load_model_strictly(model: torch.nn.Module, path: str | os.PathLike, what: str) -> Any:
    """Read ``path``, check that its model state fits ``model`` exactly (``check_fits``), load it; returns
    the whole loaded checkpoint."""
    checkpoint = read_checkpoint(path)
    state = model_state(checkpoint, path)
    check_fits(model, state, path, what, checkpoint)
    model.load_state_dict(state)
    return checkpoint
