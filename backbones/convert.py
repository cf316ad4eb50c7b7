"""The suite's networks in other libraries' names, and theirs in ours.

Parameter names equal timm's and torchvision's already. This module maps the ResNets to

* detectron2 (``detectron2/modeling/backbone/resnet.py``; the layout its
  ``tools/convert-torchvision-to-d2.py`` writes): ``stem.conv1`` (+ ``.norm``), ``res2``..``res5``
  blocks with ``conv1``..``conv3`` and ``shortcut``, each conv followed by its ``.norm``;
* OpenMMLab (``ResNet``/``ResNetV1c``/``ResNetV1d`` of mmsegmentation, mmdetection and mmpretrain):
  our names, except the deep stem, which is ``stem.0/.1/.3/.4/.6/.7`` (conv, BN, conv, BN, conv, BN);
* Caffe2 / Detectron1 (the MSRA ``R-50.pkl`` of detectron2's model zoo), in one direction only,

says which target can build which network (``export_target``), and turns a foreign state dict into
ours (``to_suite_names``), which ``load_weights`` applies to every file it reads. Only torch is imported.
"""
from __future__ import annotations

import logging
import re
from typing import Any, Mapping, Optional

from torch import Tensor

log = logging.getLogger(__name__)

TARGETS = ("timm", "torchvision", "detectron2", "mmseg")
# detectron2's pixel convention for the caffe-style MSRA ImageNet checkpoints (its defaults.py, 0-255, BGR).
MSRA_PIXEL_MEAN_BGR = (103.530, 116.280, 123.675)
MSRA_PIXEL_STD = (1.0, 1.0, 1.0)
# The ResNet variant arguments other libraries have equivalents for; any further key (width_mult,
# stem_pool=False) makes a network only the suite builds.
_RESNET_KEYS = {"depth", "stem", "downsample_in", "avg_down"}
_TIMM_NAMES = {18: ("", "d"), 34: ("", "d"), 50: ("", "c", "d"), 101: ("", "c", "d"), 152: ("", "c", "d")}


class NotExportableError(ValueError):
    """The target library cannot build this network; the message names the targets that can."""


# ---------------------------------------------------------------------------------------------- naming
def resnet_kind(variant: Mapping[str, Any]) -> str:
    """``"original"``, ``"B"``, ``"C"``, ``"D"`` (a basic-block ResNet is original = B: ``"B"``), or a
    description of an off-paper combination."""
    basic = variant["depth"] in (18, 34)
    deep, avg, in_3x3 = variant["stem"] == "deep", variant["avg_down"], basic or variant["downsample_in"] == "3x3"
    if not deep and not avg:
        return "B" if in_3x3 else "original"
    if deep and in_3x3:
        return "D" if avg else "C"
    return f"{'deep' if deep else 'plain'} stem, {'avg-pool' if avg else 'conv'} shortcut, stride on the " \
           f"{'3x3' if in_3x3 else '1x1'}"


def describe_resnet(variant: Mapping[str, Any]) -> str:
    kind = resnet_kind(variant)
    name = f"ResNet-{variant['depth']}" + (f"-{kind}" if kind in ("B", "C", "D") else "")
    what = {"original": "stride on the 1x1 conv", "B": "plain stem, stride on the 3x3 conv",
            "C": "deep 32-32-64 stem, conv shortcut", "D": "deep stem, avg-pool shortcut"}.get(kind, kind)
    return f"{name} ({what})"


def export_target(arch: str, variant: Mapping[str, Any], target: str) -> dict[str, Any]:
    """How ``target`` builds the network ``arch`` (registry name) with ``variant`` (its ``.variant``).

    Returns the target's description (model name and arguments); raises ``NotExportableError`` naming
    the targets that can build it when ``target`` cannot.
    """
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}: one of {', '.join(TARGETS)}")
    spec = _target_spec(arch, dict(variant or {}), target)
    if isinstance(spec, str):
        able = [t for t in TARGETS if not isinstance(_target_spec(arch, dict(variant or {}), t), str)]
        where = (f"export it --to {' / '.join(able)}" if able
                 else "no other library builds it; use the suite's model.safetensors")
        raise NotExportableError(f"{arch} cannot be built by {target}: {spec}; {where}")
    return spec


def _target_spec(arch: str, variant: dict, target: str) -> dict | str:
    if arch == "inception_v3":
        if variant.get("width_mult", 1.0) != 1.0:
            return f"its variant width_mult={variant['width_mult']} exists only in the suite"
        if variant.get("transform_input"):
            if target == "torchvision":
                return {"name": "inception_v3", "kwargs": {"transform_input": True}}
            return f"{target} has no transform_input (torchvision's input re-normalisation, on in this network)"
        if target in ("timm", "torchvision"):
            return {"name": "inception_v3"}
        return f"{target} has no Inception-V3 backbone"
    if "depth" not in variant or "stem" not in variant:
        return f"{target} has no network with the suite's {arch} parameter names"
    extra = sorted(set(variant) - _RESNET_KEYS)
    if extra:
        return f"its variant {', '.join(f'{k}={variant[k]}' for k in extra)} exists only in the suite"
    depth, kind = variant["depth"], resnet_kind(variant)
    basic = depth in (18, 34)
    if target == "torchvision":
        if kind != "B":
            return f"torchvision builds ResNet-B only (stride on the 3x3 conv, plain stem), not {describe_resnet(variant)}"
        return {"name": f"resnet{depth}"}
    if target == "timm":
        if kind not in ("B", "C", "D"):
            return f"timm's ResNet has no stride on the 1x1 conv ({describe_resnet(variant)})"
        suffix = {"B": "", "C": "c", "D": "d"}[kind]
        if suffix in _TIMM_NAMES[depth]:
            return {"name": f"resnet{depth}{suffix}", "kwargs": {}}
        return {"name": f"resnet{depth}", "kwargs": {"stem_type": "deep", "stem_width": 32}}  # resnet18c/34c
    if target == "detectron2":
        if variant["stem"] != "plain" or variant["avg_down"]:
            return (f"stock detectron2's ResNet has neither the deep stem nor the avg-pool shortcut "
                    f"({describe_resnet(variant)})")
        return {"depth": depth, "stride_in_1x1": (not basic) and variant["downsample_in"] == "1x1",
                "res2_out_channels": 64 if basic else 256}
    # mmseg (OpenMMLab): any combination, style='caffe' is the stride on the 1x1 conv.
    deep, avg = variant["stem"] == "deep", variant["avg_down"]
    mm_type = {(False, False): "ResNet", (True, False): "ResNetV1c", (True, True): "ResNetV1d"}.get((deep, avg), "ResNet")
    kwargs: dict[str, Any] = {"depth": depth}
    if not basic and variant["downsample_in"] == "1x1":
        kwargs["style"] = "caffe"
    if avg and not deep:
        kwargs["avg_down"] = True
    return {"type": mm_type, "kwargs": kwargs}


# ---------------------------------------------------------------------------------------------- detectron2
def _d2_name(key: str) -> Optional[str]:
    m = re.match(r"^layer(\d)\.(\d+)\.(.+)$", key)
    if m is None:
        if key == "conv1.weight":
            return "stem.conv1.weight"
        m = re.match(r"^bn1\.(.+)$", key)
        return f"stem.conv1.norm.{m.group(1)}" if m else None
    stage, block, rest = int(m.group(1)) + 1, m.group(2), m.group(3)
    rest = re.sub(r"^bn(\d)\.", r"conv\1.norm.", rest)
    rest = re.sub(r"^downsample\.0\.", "shortcut.", rest)
    rest = re.sub(r"^downsample\.1\.", "shortcut.norm.", rest)
    return f"res{stage}.{block}.{rest}"


def to_detectron2(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Our ResNet state dict in detectron2's names (``build_resnet_backbone``); the classifier and the
    BN counters (detectron2's FrozenBN has none) are dropped."""
    out = {}
    for key, value in state.items():
        if key.startswith("fc.") or key.endswith("num_batches_tracked"):
            continue
        name = _d2_name(key)
        if name is None:
            raise KeyError(f"{key}: not a ResNet parameter detectron2 has")
        out[name] = value
    return out


def from_detectron2(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """detectron2's ResNet names (also ``stem.fc.*`` of convert-torchvision-to-d2) in ours."""
    out = {}
    for key, value in state.items():
        k = key
        if k.startswith("stem."):
            k = k[len("stem."):]
            k = re.sub(r"^conv1\.norm\.", "bn1.", k)
        else:
            m = re.match(r"^res(\d)\.(.+)$", k)
            if m is None:
                raise KeyError(f"{key}: not a detectron2 ResNet parameter")
            k = f"layer{int(m.group(1)) - 1}.{m.group(2)}"
            k = re.sub(r"\.conv(\d)\.norm\.", r".bn\1.", k)
            k = re.sub(r"\.shortcut\.norm\.", ".downsample.1.", k)
            k = re.sub(r"\.shortcut\.weight$", ".downsample.0.weight", k)
        out[k] = value
    return out


# ---------------------------------------------------------------------------------------------- OpenMMLab
_DEEP_STEM = {"conv1.0.": "stem.0.", "conv1.1.": "stem.1.", "conv1.3.": "stem.3.", "conv1.4.": "stem.4.",
              "conv1.6.": "stem.6.", "bn1.": "stem.7."}


def _rename_prefixes(key: str, prefixes: Mapping[str, str]) -> str:
    """``key`` with its first matching prefix of ``prefixes`` ({old: new}) replaced."""
    for old, new in prefixes.items():
        if key.startswith(old):
            return new + key[len(old):]
    return key


def to_openmmlab(state: Mapping[str, Tensor], deep_stem: bool) -> dict[str, Tensor]:
    """Our ResNet state dict in OpenMMLab's names; the classifier is dropped (their ResNet has none)."""
    prefixes = _DEEP_STEM if deep_stem else {}
    return {_rename_prefixes(key, prefixes): value for key, value in state.items() if not key.startswith("fc.")}


def from_openmmlab(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """OpenMMLab ``ResNet``/``ResNetV1c``/``ResNetV1d`` names in ours."""
    back = {theirs: ours for ours, theirs in _DEEP_STEM.items()}
    return {_rename_prefixes(key, back): value for key, value in state.items()}


# ---------------------------------------------------------------------------------------------- Caffe2 (MSRA)
_C2_BRANCH = {"branch2a": "conv1", "branch2b": "conv2", "branch2c": "conv3"}


def from_caffe2(state: Mapping[str, Tensor], eps: float = 1e-5) -> dict[str, Tensor]:
    """The MSRA/Detectron1 ResNet names (``res2_0_branch2a_w``, ``res_conv1_bn_s``, ...) in ours.

    Their BN is an affine channel (scale, bias): it becomes a BN with mean 0 and variance ``1 - eps``, which
    computes exactly ``x * scale + bias`` (detectron2's FrozenBatchNorm2d does the same).
    """
    import torch

    out: dict[str, Tensor] = {}
    for key, value in state.items():
        m = re.match(r"^(?:res_)?conv1_(w|bn_s|bn_b)$", key) or re.match(r"^fc1000_(w|b)$", key)
        if m:
            out[{"conv1_w": "conv1.weight", "res_conv1_bn_s": "bn1.weight", "res_conv1_bn_b": "bn1.bias",
                 "fc1000_w": "fc.weight", "fc1000_b": "fc.bias"}[key]] = value
            continue
        m = re.match(r"^res(\d)_(\d+)_(branch2[abc]|branch1)_(w|bn_s|bn_b)$", key)
        if m is None:
            raise KeyError(f"{key}: not a Caffe2 ResNet parameter")
        stage, block, branch, kind = int(m.group(1)) - 1, m.group(2), m.group(3), m.group(4)
        if branch == "branch1":
            module = "downsample.0" if kind == "w" else "downsample.1"
        else:
            module = _C2_BRANCH[branch] if kind == "w" else _C2_BRANCH[branch].replace("conv", "bn")
        out[f"layer{stage}.{block}.{module}.{'weight' if kind in ('w', 'bn_s') else 'bias'}"] = value
    for key in [k for k in out if k.endswith(".bias") and not k.startswith("fc.")]:
        prefix = key[: -len("bias")]
        out[prefix + "running_mean"] = torch.zeros_like(out[key])
        out[prefix + "running_var"] = torch.full_like(out[key], 1 - eps)
    return out


# ---------------------------------------------------------------------------------------------- recognising
_OURS_FIRST = re.compile(r"^(conv1\.|bn1\.|layer1\.|stem\.|res2\.|res_conv1_bn_|conv1_w$)")


def _backbone_part(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], str]:
    """The backbone's entries of a whole detector / segmentor (``backbone.``, detectron2 FPN's
    ``backbone.bottom_up.``, its C4 ``roi_heads.res5.``), prefixes removed; ``""`` when bare."""
    if any(_OURS_FIRST.match(k) for k in state):
        return dict(state), ""
    for prefix in ("backbone.bottom_up.", "backbone.body.", "backbone."):
        part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if part and any(_OURS_FIRST.match(k) for k in part):
            if prefix == "backbone." and "res4.0.conv1.weight" in part:  # detectron2 C4: res5 is the box head
                part.update({k[len("roi_heads."):]: v for k, v in state.items() if k.startswith("roi_heads.res5.")})
            return part, prefix
    return dict(state), ""


def to_suite_names(state: Mapping[str, Tensor], source: str = "state dict") -> tuple[dict[str, Tensor], Optional[str]]:
    """``state`` in the suite's names, and the format it was found in (``None``: the suite's / timm's /
    torchvision's names, returned unchanged).

    Recognised: OpenMMLab ResNet/ResNetV1c/ResNetV1d, detectron2 (``stem.conv1``, ``res2``..), Caffe2/MSRA
    (``res2_0_branch2a_w``), each bare or inside a whole model (``backbone.``, ``backbone.bottom_up.``).
    """
    part, prefix = _backbone_part(state)
    dropped = len(state) - len(part)
    if "stem.conv1.weight" in part or any(k.startswith("res2.") for k in part):
        fmt, part = "detectron2", from_detectron2(part)
    elif "stem.0.weight" in part:
        fmt, part = "OpenMMLab (ResNetV1c/ResNetV1d deep stem)", from_openmmlab(part)
    elif "conv1_w" in part or "res_conv1_bn_s" in part:
        fmt, part = "Caffe2/MSRA", from_caffe2(part)
        log.warning("%s: a caffe-style MSRA ResNet (stride on the 1x1 conv: resnet50/101/152, not -b). It expects "
                    "BGR pixels on the 0-255 scale minus mean %s with std %s (detectron2's defaults), not RGB "
                    "normalised with ImageNet's mean/std", source, list(MSRA_PIXEL_MEAN_BGR), list(MSRA_PIXEL_STD))
    elif prefix:
        fmt = "whole model"  # OpenMMLab plain-stem ResNet (our names) inside a detector / segmentor
    else:
        return dict(state), None
    if prefix:
        fmt += f" (the backbone under {prefix!r}; {dropped} entries of the rest of the model not loaded)"
    return part, fmt


def resnet_structure(state: Mapping[str, Tensor]) -> Optional[dict[str, Any]]:
    """What the weights of a ResNet state dict (our names) fix: depth, stem, avg-pool shortcut; None if
    ``state`` is no ResNet. (The stride position is no parameter: the weights cannot tell original from B.)"""
    if "layer1.0.conv1.weight" not in state:
        return None
    blocks = [len({k.split(".")[1] for k in state if k.startswith(f"layer{i}.")}) for i in range(1, 5)]
    bottleneck = "layer1.0.conv3.weight" in state
    depth = sum(blocks) * (3 if bottleneck else 2) + 2
    return {"depth": depth, "stem": "deep" if "conv1.0.weight" in state else "plain",
            "avg_down": "layer2.0.downsample.2.weight" in state}


def structure_mismatch(variant: Mapping[str, Any], state: Mapping[str, Tensor]) -> Optional[str]:
    """A one-line description of how a ResNet state dict differs from ``variant``, or None."""
    found = resnet_structure(state)
    if found is None or "depth" not in variant:
        return None
    diffs = [f"{what} {theirs!r} vs the model's {variant[key]!r}" for key, what, theirs in
             (("depth", "depth", found["depth"]), ("stem", "stem", found["stem"]), ("avg_down", "avg_down", found["avg_down"]))
             if variant[key] != theirs]
    if not diffs:
        return None
    kind = {(False, False): "resnet{d} or resnet{d}b", (True, False): "resnet{d}c", (True, True): "resnet{d}d"}.get(
        (found["stem"] == "deep", found["avg_down"]), "a ResNet with stem={s!r}, avg_down=True")
    build = kind.format(d=found["depth"], s=found["stem"])
    return f"they hold a {_short(found)} but the model is a {_short(variant)} ({'; '.join(diffs)}): build {build}"


def _short(v: Mapping[str, Any]) -> str:
    stem = "deep 32-32-64 stem" if v["stem"] == "deep" else "plain 7x7 stem"
    return f"ResNet-{v['depth']} with a {stem} and {'an avg-pool' if v['avg_down'] else 'a conv'} shortcut"
