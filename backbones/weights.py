"""Weights I/O: safetensors with metadata out; safetensors, suite checkpoints, timm, torchvision,
OpenMMLab, detectron2 and Caffe2/MSRA ResNets in (foreign names: ``backbones.convert``).

Pickled files (``.pth``) are read with ``torch.load(weights_only=True)``: tensors and plain
containers only. A file that needs arbitrary unpickling must be opted into with ``allow_pickle=True``
because unpickling runs code from the file. detectron2's ``.pkl`` files (numpy arrays in a plain
pickle) are read by an unpickler that builds numpy arrays and plain containers only.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
import torch.nn as nn
from torch import Tensor

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
# Keys under which trainers store the model inside a checkpoint (ours: "model").
_CHECKPOINT_KEYS = ("model", "state_dict", "model_state_dict", "model_ema")
# Prefixes added by DistributedDataParallel and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class WeightsError(ValueError):
    """A weights file that cannot be read or does not fit the model; the message names the file.

    (``runtime.errors.user_errors()`` lists it: the ``tricks`` command prints it as one line.)"""


class WeightsNotFoundError(WeightsError, FileNotFoundError):
    """The weights file does not exist."""


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same directory and rename: a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_weights(model: nn.Module, path: PathLike, *, metadata: Optional[Mapping[str, Any]] = None) -> Path:
    """Save ``model``'s state dict as safetensors with metadata.

    Metadata records the architecture (registry name), its variant arguments, input size, mean/std
    and ``num_classes``, plus whatever ``metadata`` adds (provenance, top-1, ...). Values that are not
    strings are stored as JSON.
    """
    from safetensors.torch import save_file

    path = Path(path)
    meta: dict[str, Any] = {
        "format": "bag-of-tricks/1",
        "architecture": getattr(model, "arch", type(model).__name__),
        "variant": getattr(model, "variant", {}),
        "num_classes": getattr(model, "num_classes", None),
    }
    cfg = getattr(model, "default_cfg", None)
    if cfg:
        meta.update(input_size=list(cfg["input_size"]), mean=list(cfg["mean"]), std=list(cfg["std"]))
    meta.update(metadata or {})
    meta_str = {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    _atomic_write(path, lambda tmp: save_file(state, tmp, metadata=meta_str))
    return path


def read_metadata(path: PathLike) -> dict[str, Any]:
    """Metadata of a safetensors file, JSON values decoded."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata() or {}
    out = {}
    for k, v in raw.items():
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, numbers, strings and containers; any other class is refused (a pickle can
    name any callable, and unpickling calls it)."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict")}

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED or (module == "numpy.dtypes" and name.endswith("DType")):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not a numpy array or a plain container")


def _load_pkl(path: Path, allow_pickle: bool) -> Any:
    """A detectron2 ``.pkl`` (``{"model": {name: array}, "__author__": ...}``) or a Caffe2/Detectron1 one
    (``{name: array}``, detections under ``"blobs"``), as a mapping of names to tensors."""
    with open(path, "rb") as f:
        try:
            unpickler = pickle.Unpickler if allow_pickle else _ArraysOnlyUnpickler
            data = unpickler(f, encoding="latin1").load()
        except pickle.UnpicklingError as e:
            raise WeightsError(f"{path}: {e}. If you trust the file, pass allow_pickle=True (it runs code "
                               "from the file)") from e
    if isinstance(data, Mapping) and isinstance(data.get("model"), Mapping):
        data = data["model"]
    elif isinstance(data, Mapping) and isinstance(data.get("blobs"), Mapping):
        data = data["blobs"]
    if not isinstance(data, Mapping):
        return data
    # Caffe2 files hold solver state (``*_momentum``) and counters beside the arrays.
    return {k: torch.as_tensor(v) for k, v in data.items()
            if hasattr(v, "dtype") and hasattr(v, "shape") and not k.endswith("_momentum")}


def load_state_dict(path: PathLike, *, allow_pickle: bool = False) -> dict[str, Tensor]:
    """Read a state dict from safetensors, a suite checkpoint, a timm/torchvision ``.pth``, an OpenMMLab
    (``state_dict``) or detectron2 (``model``) checkpoint, or a detectron2/Caffe2 ``.pkl``. Names are
    the file's own (see ``backbones.convert.to_suite_names``)."""
    path = Path(path)
    if path.is_dir():
        found = sorted(q.name for q in path.iterdir() if q.suffix in (".safetensors", ".pth", ".pt", ".pkl"))[:4]
        raise WeightsNotFoundError(f"{path} is a folder: give the weights file in it"
                                   + (f" ({', '.join(found)})" if found else " (e.g. a run's model.safetensors)"))
    if not path.is_file():
        raise WeightsNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".pkl":
        state: Any = _load_pkl(path, allow_pickle)
    elif path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state: Any = load_file(str(path))
        except (SafetensorError, OSError) as e:  # truncated, or not safetensors at all
            raise WeightsError(f"{path}: not a readable safetensors file ({e}); the file is damaged or "
                               "incomplete: copy or save it again") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
        except Exception as e:  # torch raises UnpicklingError subclasses and RuntimeErrors here
            if allow_pickle:
                raise
            if "Weights only load failed" not in str(e):  # torch's words when only the pickle safety refused it
                raise WeightsError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e}); the file is "
                                   "damaged or incomplete (an interrupted copy or save?): copy or save it again") from None
            raise WeightsError(
                f"{path} cannot be loaded with weights_only=True ({type(e).__name__}: {e}). If you trust "
                "the file, pass allow_pickle=True (it runs code from the file), or convert it to safetensors."
            ) from e
    if isinstance(state, Mapping):
        for key in _CHECKPOINT_KEYS:
            if key in state and isinstance(state[key], Mapping):
                state = state[key]
                break
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise WeightsError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    out = {}
    for k, v in state.items():
        for prefix in _WRAPPER_PREFIXES:
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def _classifier_keys(model: nn.Module, state: Mapping[str, Tensor]) -> list[str]:
    """Classifier keys of ``state`` that cannot go into ``model``: it has none, or another class count."""
    fc = getattr(model, "fc", None)
    keys = [k for k in state if k.startswith("fc.")]
    if not keys:
        return []
    if not isinstance(fc, nn.Linear):
        return keys
    own = {f"fc.{n}": p.shape for n, p in fc.named_parameters()}
    return keys if any(k in own and state[k].shape != own[k] for k in keys) else []


def _saved_metadata(weights: Any) -> dict[str, Any]:
    """The metadata of a safetensors file of ``save_weights`` ({} for a state dict, another format, or metadata
    that cannot be read: it is a courtesy, the file itself is read and reported by ``load_state_dict``)."""
    if isinstance(weights, Mapping) or Path(weights).suffix != ".safetensors":
        return {}
    try:
        return read_metadata(weights)
    except Exception:
        return {}


def spread_input_channels(stem_weight: Tensor, channels: int) -> Tensor:
    """A stem conv weight trained on 1 input channel, repeated over ``channels`` and divided by them: a grey image
    given as ``channels`` equal channels produces exactly the 1-channel network's activations."""
    return stem_weight.repeat(1, channels, 1, 1) / channels


# Variant keys that change what a network computes without changing a parameter's name or shape: a file saved
# with another value loads strictly into the wrong network. (name -> the value when the variant does not say)
_SILENT_VARIANT_KEYS = {"downsample_in": None, "transform_input": False}


def _check_saved_variant(model: nn.Module, weights: Any, source: str) -> None:
    """A ``save_weights`` file whose metadata variant differs from ``model``'s in a ``_SILENT_VARIANT_KEYS`` key
    (ResNet's stride on the 1x1 or the 3x3 conv, Inception's input transform) is an error naming both."""
    ours = getattr(model, "variant", None)
    meta = _saved_metadata(weights) if isinstance(ours, Mapping) else {}
    saved = meta.get("variant")
    if not isinstance(saved, Mapping):
        return
    for key, default in _SILENT_VARIANT_KEYS.items():
        theirs, mine = saved.get(key, default), ours.get(key, default)
        if theirs is not None and mine is not None and theirs != mine:
            raise WeightsError(f"weights {source} were saved from {meta.get('architecture', '?')} with {key}={theirs!r}, "
                               f"but the model ({getattr(model, 'arch', type(model).__name__)}) has {key}={mine!r}: "
                               "the same parameter names and shapes, another network. Build the architecture the file "
                               "names")


def _first_conv_key(model: nn.Module) -> Optional[str]:
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            return f"{name}.weight"
    return None


def load_weights(model: nn.Module, weights: Union[PathLike, Mapping[str, Tensor]], *, allow_pickle: bool = False,
                 new_head: bool = False, adapt_input: bool = False) -> None:
    """Load weights into ``model`` strictly.

    ``weights`` is a path (see ``load_state_dict``) or a state dict. Any missing, unexpected or
    mis-shaped key is an error that lists them; so is a classifier (``fc.*``) of another size, or one the
    model does not have (``num_classes=0``), naming both sizes. Fine-tuning opts in:

    * ``new_head=True``: such a classifier is not loaded and the model keeps its freshly initialised head
      (or none);
    * ``adapt_input=True``: a stem conv trained on 1 input channel (Fashion-MNIST) is repeated over the
      model's ``C`` channels and divided by ``C``, so a grey image given as ``C`` equal channels produces
      exactly the activations the 1-channel network computed.
    """
    from .convert import structure_mismatch, to_suite_names

    source = str(weights) if not isinstance(weights, Mapping) else "state dict"
    _check_saved_variant(model, weights, source)
    state = dict(weights) if isinstance(weights, Mapping) else load_state_dict(weights, allow_pickle=allow_pickle)
    state, foreign = to_suite_names(state, source)
    notes: list[str] = []  # what the load changed, logged once it has succeeded (never before its error)
    if foreign:
        notes.append(f"{source}: {foreign} checkpoint, converted to the suite's names")
        # BN step counters: detectron2's FrozenBN and Caffe2 have none; nothing reads them in eval or fine-tuning.
        own_keys = model.state_dict()
        for k in [k for k in state if k.endswith("num_batches_tracked") and k not in own_keys]:
            del state[k]
        for k in own_keys:
            if k.endswith("num_batches_tracked") and k not in state and k.rsplit(".", 1)[0] + ".running_mean" in state:
                state[k] = torch.zeros((), dtype=torch.long)
    skipped = _classifier_keys(model, state)
    fc = getattr(model, "fc", None)
    theirs = state["fc.weight"].shape[0] if "fc.weight" in state else "?"
    ours = fc.weight.shape[0] if isinstance(fc, nn.Linear) else 0
    if skipped and not new_head and theirs == ours:
        # Same number of classes, another feature width: a different architecture, reported below.
        skipped = []
    if skipped and not new_head:
        raise WeightsError(f"weights {source} hold a {theirs}-class classifier but the model has "
                         f"{f'a {ours}-class one' if ours else 'none (num_classes=0)'}: set num_classes={theirs} to "
                         "use it, or load for fine-tuning with a new head (new_head=True; model.weights in a "
                         "training config does)")
    for k in skipped:
        del state[k]
    if skipped:
        notes.append(f"{source}: classifier {skipped} not loaded (model has another head); it keeps its initialisation")
    fc = getattr(model, "fc", None)
    headless = isinstance(fc, nn.Linear) and not any(k.startswith("fc.") for k in state)
    if headless and not new_head:
        raise WeightsError(f"weights {source} hold no classifier (a backbone without its head) but the model has a "
                         f"{fc.weight.shape[0]}-class one: build it with num_classes=0, or load for fine-tuning with "
                         "a new head (new_head=True; model.weights in a training config does)")
    if headless:
        skipped = [f"fc.{n}" for n, _ in fc.named_parameters()]
        notes.append(f"{source}: no classifier in the file; the model's keeps its initialisation")
    stem = _first_conv_key(model)
    own = model.state_dict()
    theirs, ours = (state[stem].shape, own[stem].shape) if stem in state and stem in own else (None, None)
    if adapt_input and theirs is not None and theirs != ours and theirs[1] == 1 \
            and theirs[0] == ours[0] and theirs[2:] == ours[2:]:
        channels = own[stem].shape[1]
        state[stem] = spread_input_channels(state[stem], channels)
        notes.append(f"{source}: 1-channel stem {stem} repeated over {channels} input channels (/{channels})")

    if skipped:  # the head keeps its init: not "missing"
        own = {k: v for k, v in own.items() if not k.startswith("fc.")}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                        for k in set(own) & set(state) if state[k].shape != own[k].shape)
    if missing or unexpected or mismatched:
        def show(keys: list[str]) -> str:
            return ", ".join(keys[:20]) + (f", ... ({len(keys)} in all)" if len(keys) > 20 else "")
        parts = [f"{name} ({len(keys)}): {show(keys)}" for name, keys in
                 (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)) if keys]
        arch = getattr(model, "arch", type(model).__name__)
        variant = getattr(model, "variant", None)
        # For a ResNet, say which network the file holds (stem, shortcut, depth), then list the keys.
        mismatch = structure_mismatch(variant, state) if isinstance(variant, Mapping) else None
        saved = _saved_metadata(weights).get("architecture")
        raise WeightsError(f"weights {source} do not fit {arch}"
                           + (f" (the file was saved from {saved})" if saved and saved != arch else "")
                           + (f": {mismatch}" if mismatch else "")
                           + ":\n  " + "\n  ".join(parts)
                           + "\nCheck that the file was saved from the same architecture and variant.")
    model.load_state_dict(state, strict=not skipped)
    for note in notes:
        log.info("%s", note)
