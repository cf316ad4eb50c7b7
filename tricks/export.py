"""``tricks export``: a trained backbone in the file format and names of timm, torchvision, detectron2 or
OpenMMLab (mmsegmentation / mmdetection / mmpretrain), with the config lines that load and feed it.

    tricks export runs/cls/model.safetensors --to detectron2 --out r50.pkl

The key mappings live in ``backbones.convert`` (torch only); this module reads the suite's file, writes
the target's and prints what the target needs: its model name or config keys, the load call, and the
pretraining's mean/std in the target's convention (0-255 and RGB input for detectron2 and OpenMMLab).
No target library is imported here, and nothing heavy at import time (``tricks --help`` stays light).
"""
from __future__ import annotations

import argparse
import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor

# = backbones.convert.TARGETS (a test checks), spelled out so the parser needs no torch.
TARGETS = ("timm", "torchvision", "detectron2", "mmseg")
# The output suffixes each target reads.
SUFFIXES = {"timm": (".safetensors", ".pth"), "torchvision": (".pth",), "detectron2": (".pkl", ".pth"),
            "mmseg": (".pth",)}


@dataclass
class SuiteWeights:
    """A backbone of the suite: its state dict and what its metadata says."""

    state: dict[str, Tensor]
    arch: str                 # registry name
    variant: dict[str, Any]   # the model's .variant (ResNet: depth, stem, downsample_in, avg_down)
    num_classes: int          # 0: no classifier
    mean: list[float]         # RGB, 0-1 scale
    std: list[float]
    input_size: list[int]     # C, H, W


def read_suite_weights(path: str | Path) -> SuiteWeights:
    """A ``model.safetensors`` of ``tricks train`` (metadata), or its ``last.pth``/``best.pth`` (config)."""
    import torch

    from backbones import load_state_dict, read_metadata

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    state = load_state_dict(path)
    if path.suffix == ".safetensors":
        meta = read_metadata(path)
        if "architecture" not in meta or "mean" not in meta:
            raise ValueError(f"{path}: no architecture/mean/std in its metadata; export takes the model.safetensors "
                             "that tricks train writes (or backbones.save_weights)")
        arch, variant = meta["architecture"], meta.get("variant") or {}
        num_classes = meta.get("num_classes") or 0
        mean, std, input_size = meta["mean"], meta["std"], meta.get("input_size", [3, 224, 224])
    else:
        from backbones import create_backbone
        from runtime.data import normalization, recorded_normalization

        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        config = ckpt.get("config") if isinstance(ckpt, dict) else None
        if not isinstance(config, dict) or "model" not in config:
            raise ValueError(f"{path}: holds no run config (a bare state dict, as a detection or segmentation run's "
                             "model_final.pth): export takes a classification run's model.safetensors or last.pth")
        if config.get("task", "classification") != "classification":
            raise ValueError(f"{path}: a {config['task']} checkpoint; export converts classification backbones (a "
                             "classification run's model.safetensors or last.pth). Export the backbone this run "
                             "fine-tuned from (its model.weights), or evaluate this run with tricks eval")
        if isinstance(ckpt.get("ema"), dict):  # train.ema_decay: the averaged weights, the ones evaluated and saved
            state = {k[len("module."):]: v for k, v in ckpt["ema"].items() if k.startswith("module.")}
        m = config["model"]
        kwargs = dict(m.get("kwargs") or {})
        if m.get("width_mult", 1.0) != 1.0:
            kwargs["width_mult"] = m["width_mult"]
        num_classes = state["fc.weight"].shape[0] if "fc.weight" in state else 0
        with torch.device("meta"):
            probe = create_backbone(m["name"], num_classes=num_classes, in_chans=m.get("in_chans", 3), **kwargs)
        data = config.get("data", {})
        # the mean/std the run recorded; an older last.pth with null ones: its model.weights', or the backbone's
        mean, std = recorded_normalization(ckpt) or normalization(
            data.get("mean"), data.get("std"), m["name"], m.get("in_chans", 3), kwargs, key="model.name",
            weights=m.get("weights"))
        arch, variant, input_size = m["name"], probe.variant, list(probe.default_cfg["input_size"])
        if data.get("val_crop"):  # the size the run evaluated at
            input_size = [m.get("in_chans", 3), data["val_crop"], data["val_crop"]]
    return SuiteWeights(state, arch, dict(variant), int(num_classes), list(mean), list(std), list(input_size))


def _check_out(target: str, out: Path) -> None:
    if out.suffix not in SUFFIXES[target]:
        raise ValueError(f"--out {out}: {target} reads {' or '.join(SUFFIXES[target])} files")


def _fmt(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.6g}" for v in values) + "]"


def export(weights: str | Path, target: str, out: str | Path) -> str:
    """Write ``weights`` (the suite's) for ``target`` to ``out`` and return the lines to print: config
    and load call. A network the target cannot build raises ``convert.NotExportableError``."""
    from backbones import convert

    out = Path(out)
    if out.exists() and Path(weights).exists() and out.resolve() == Path(weights).resolve():
        raise ValueError(f"--out {out} is the input file: write the export to another path (it would replace the "
                         "suite's file and its metadata)")
    src = read_suite_weights(weights)
    spec = convert.export_target(src.arch, src.variant, target)
    _check_out(target, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    note = _rgb_stem(src) if target != "timm" else ""  # timm builds in_chans=1 itself
    mean255, std255 = [255 * v for v in src.mean], [255 * v for v in src.std]
    text = {"timm": _timm, "torchvision": _torchvision, "detectron2": _detectron2, "mmseg": _openmmlab}[target](
        src, spec, out, mean255, std255)
    return f"{note}\n{text}" if note else text


def _rgb_stem(src: SuiteWeights) -> str:
    """A network trained on 1 input channel (Fashion-MNIST) for a library whose networks take RGB: the stem's
    filters are spread over the 3 channels (``backbones.weights.spread_input_channels``, as ``load_weights(adapt_input=True)``), so a grey image
    given as 3 equal channels gives the 1-channel network's activations; mean and std are repeated. Without
    this detectron2 and mmseg skip the mismatched stem with a warning and keep a random one."""
    from backbones.weights import spread_input_channels

    stem = next((k for k, v in src.state.items() if v.ndim == 4), None)
    if stem is None or src.state[stem].shape[1] != 1:
        return ""
    src.state[stem] = spread_input_channels(src.state[stem], 3)
    src.mean, src.std = src.mean * 3 if len(src.mean) == 1 else src.mean, src.std * 3 if len(src.std) == 1 else src.std
    src.input_size = [3, *src.input_size[1:]]
    return (f"# the network was trained on 1 input channel: its stem ({stem}) is spread over RGB (weights / 3); "
            "give grey images as 3 equal channels")


def _timm(src: SuiteWeights, spec: dict, out: Path, mean255, std255) -> str:
    import torch

    kwargs = dict(spec.get("kwargs") or {})
    if src.arch == "inception_v3" and any(k.startswith("AuxLogits.") for k in src.state):
        kwargs["aux_logits"] = True
    if out.suffix == ".safetensors":
        from safetensors.torch import save_file

        meta = {"format": "pt", "architecture": spec["name"], "num_classes": str(src.num_classes),
                "mean": json.dumps(src.mean), "std": json.dumps(src.std), "exported_from": src.arch}
        save_file({k: v.contiguous() for k, v in src.state.items()}, str(out), metadata=meta)
    else:
        torch.save(src.state, out)
    args = "".join(f", {k}={v!r}" for k, v in kwargs.items())
    cfg = (f"file={str(out)!r}, num_classes={src.num_classes}, input_size={tuple(src.input_size)}, "
           f"mean={tuple(round(v, 6) for v in src.mean)}, std={tuple(round(v, 6) for v in src.std)}")
    return "\n".join([
        f"# timm: {src.arch} is timm's {spec['name']}{' with ' + args[2:] if args else ''}; the classifier is kept "
        f"({src.num_classes or 'none'}). pretrained_cfg (mean/std on the 0-1 scale, RGB) is what timm's data config reads:",
        "import timm",
        f"model = timm.create_model({spec['name']!r}, pretrained=True, num_classes={src.num_classes}{args},",
        f"                          pretrained_cfg_overlay=dict({cfg}))",
        "data_cfg = timm.data.resolve_data_config({}, model=model)  # mean/std/input_size from the overlay",
    ])


def _torchvision(src: SuiteWeights, spec: dict, out: Path, mean255, std255) -> str:
    import torch

    torch.save(src.state, out)
    head = f"num_classes={src.num_classes}" if src.num_classes else "num_classes=1000"
    lines = [f"# torchvision: {src.arch} is torchvision's {spec['name']}; the classifier is kept "
             f"({src.num_classes or 'none'}). Inputs: RGB on the 0-1 scale (ToDtype(scale=True)), then Normalize:",
             "import torch, torchvision",
             "from torchvision.transforms import v2 as T"]
    if spec["name"] == "inception_v3":
        aux = any(k.startswith("AuxLogits.") for k in src.state)
        transform = bool((spec.get("kwargs") or {}).get("transform_input"))
        lines.append(f"model = torchvision.models.inception_v3(weights=None, {head}, aux_logits={aux}, "
                     f"init_weights=False, transform_input={transform})")
    else:
        lines.append(f"model = torchvision.models.{spec['name']}(weights=None, {head})")
    if not src.num_classes:
        lines.append("model.fc = torch.nn.Identity()  # the file holds no classifier")
    lines += [f"model.load_state_dict(torch.load({str(out)!r}, weights_only=True))",
              f"normalize = T.Normalize(mean={_fmt(src.mean)}, std={_fmt(src.std)})"]
    return "\n".join(lines)


def _detectron2(src: SuiteWeights, spec: dict, out: Path, mean255, std255) -> str:
    import torch

    from backbones import convert

    state = convert.to_detectron2(src.state)
    author = f"bag-of-tricks ({src.arch})"
    if out.suffix == ".pkl":  # the layout of detectron2's tools/convert-torchvision-to-d2.py
        blob = {"model": {k: v.numpy() for k, v in state.items()}, "__author__": author, "matching_heuristics": True}
        with open(out, "wb") as f:
            pickle.dump(blob, f)
    else:
        torch.save({"model": state, "__author__": author, "matching_heuristics": True}, out)
    resnets = [f"    DEPTH: {spec['depth']}", f"    STRIDE_IN_1X1: {spec['stride_in_1x1']}"]
    if spec["depth"] in (18, 34):
        resnets.append("    RES2_OUT_CHANNELS: 64  # R18/R34: basic blocks")
    return "\n".join([
        f"# detectron2: {convert.describe_resnet(src.variant)}. Merge into your config (YAML); the weights take RGB",
        "# normalised with the pretraining's mean/std, here on detectron2's 0-255 scale:",
        "MODEL:",
        f"  WEIGHTS: \"{out}\"",
        f"  PIXEL_MEAN: {_fmt(mean255)}",
        f"  PIXEL_STD: {_fmt(std255)}",
        "  RESNETS:",
        *resnets,
        "INPUT:",
        "  FORMAT: \"RGB\"",
        "# In Python: DetectionCheckpointer(build_model(cfg)).load(cfg.MODEL.WEIGHTS)",
    ])


def _openmmlab(src: SuiteWeights, spec: dict, out: Path, mean255, std255) -> str:
    import torch

    from backbones import convert

    state = convert.to_openmmlab(src.state, deep_stem=src.variant.get("stem") == "deep")
    meta = {"exported_from": src.arch, "variant": json.dumps(src.variant), "mean": mean255, "std": std255,
            "bgr_to_rgb": True, "backbone": spec["type"], **{k: v for k, v in spec["kwargs"].items()}}
    torch.save({"state_dict": state, "meta": meta}, out)
    args = ", ".join(f"{k}={v!r}" for k, v in spec["kwargs"].items())
    return "\n".join([
        f"# OpenMMLab (mmsegmentation 1.x, mmdetection 3.x, mmpretrain): {convert.describe_resnet(src.variant)} is "
        f"{spec['type']}({args}). Add to your config:",
        "model = dict(",
        "    pretrained=None,  # the recipes' own (e.g. open-mmlab://resnet50_v1c) would conflict with init_cfg",
        f"    data_preprocessor=dict(mean={_fmt(mean255)}, std={_fmt(std255)}, bgr_to_rgb=True),",
        f"    backbone=dict(type={spec['type']!r}, {args},",
        f"                  init_cfg=dict(type='Pretrained', checkpoint={str(out)!r})))",
        f"# mmseg 0.x / mmdet 2.x: img_norm_cfg = dict(mean={_fmt(mean255)}, std={_fmt(std255)}, to_rgb=True)",
        f"# In Python: mmengine.runner.load_checkpoint(backbone, {str(out)!r}, strict=True)",
    ])


def cmd_export(args: argparse.Namespace) -> int:
    from backbones import convert

    try:
        lines = export(args.weights, args.to, args.out)
    except (convert.NotExportableError, ValueError, FileNotFoundError) as e:  # the user's file or choice
        from runtime.errors import UserError

        raise UserError(str(e)) from None
    print(f"wrote {args.out}\n")
    print(lines)
    return 0


def add_subcommand(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a backbone for timm, torchvision, detectron2 or OpenMMLab and print "
                       "the config lines that load it")
    p.add_argument("weights", help="model.safetensors (or last.pth / best.pth) of tricks train")
    p.add_argument("--to", required=True, choices=TARGETS,
                   help="mmseg: the OpenMMLab layout (mmsegmentation, mmdetection, mmpretrain)")
    p.add_argument("--out", required=True, help="file to write: timm .safetensors/.pth, torchvision .pth, "
                   "detectron2 .pkl (as convert-torchvision-to-d2.py) or .pth, mmseg .pth")
    p.set_defaults(func=cmd_export)

