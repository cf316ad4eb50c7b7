"""`tricks export` and foreign checkpoints, checked against the target libraries themselves.

Every exportable variant at depths 18 and 50 is written by ``tricks.export.export``, loaded by the target's
own model (detectron2 ``build_resnet_backbone`` through ``DetectionCheckpointer``; mmseg ``MODELS.build`` +
mmengine's ``load_checkpoint`` / ``init_cfg=Pretrained``; timm ``create_model``; torchvision
``resnetXX``) from the printed config lines, and must give our res2..res5 features to 1e-5 in fp32. The
round trip (export, load back) gives identical tensors. The reverse direction reads files written by the
targets' own models and checkpointers.
"""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from backbones import create_backbone, save_weights
from backbones.convert import NotExportableError
from backbones.weights import WeightsError
from tricks.export import export

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

SIZE = 64
FEATURES = ("res2", "res3", "res4", "res5")
# variant x target: True = loads with the same features; False = cannot be built there (README table).
CAN_BUILD = {
    "resnet18": dict(timm=True, torchvision=True, detectron2=True, mmseg=True),   # = resnet18b
    "resnet18b": dict(timm=True, torchvision=True, detectron2=True, mmseg=True),
    "resnet18c": dict(timm=True, torchvision=False, detectron2=False, mmseg=True),
    "resnet18d": dict(timm=True, torchvision=False, detectron2=False, mmseg=True),
    "resnet50": dict(timm=False, torchvision=False, detectron2=True, mmseg=True),
    "resnet50b": dict(timm=True, torchvision=True, detectron2=True, mmseg=True),
    "resnet50c": dict(timm=True, torchvision=False, detectron2=False, mmseg=True),
    "resnet50d": dict(timm=True, torchvision=False, detectron2=False, mmseg=True),
    "inception_v3": dict(timm=True, torchvision=True, detectron2=False, mmseg=False),
    "mobilenet": dict(timm=False, torchvision=False, detectron2=False, mmseg=False),
}
CASES = [(name, target) for name, row in CAN_BUILD.items() for target in row]
SUFFIX = {"timm": ".safetensors", "torchvision": ".pth", "detectron2": ".pkl", "mmseg": ".pth"}


def _randomise_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random affine parameters and statistics in every norm layer (BN, FrozenBN of any library), so a
    swapped or missing one changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "running_mean") and hasattr(m, "running_var") and m.running_mean is not None:
                n = m.running_mean.numel()
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
    model.eval()
    return model


def _image(channels: int = 3, size: int = SIZE) -> torch.Tensor:
    return torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(1))


def _assert_same(ours: dict, theirs: dict) -> None:
    assert list(ours) == list(theirs)
    for name in ours:
        a, b = ours[name], theirs[name]
        assert a.shape == b.shape, name
        assert (a - b).abs().max().item() <= 1e-5 * max(1.0, b.abs().max().item()), (name, (a - b).abs().max())
        assert b.std() > 1e-3  # not two near-constant maps


def _suite_weights(tmp_path: Path, name: str, num_classes: int = 10):
    kwargs = {"aux_logits": False} if name == "inception_v3" else {}
    model = _randomise_norms(create_backbone(name, num_classes=num_classes, **kwargs))
    return model, save_weights(model, tmp_path / f"{name}.safetensors")


def _our_features(model, x) -> dict:
    with torch.no_grad():
        return model.eval().forward_features(x)


# ---------------------------------------------------------------------------------------------- targets
def _detectron2_cfg(printed: str):
    from detection.d2_engine import import_detectron2

    import_detectron2()
    import yaml
    from detectron2.config import CfgNode, get_cfg

    cfg = get_cfg()
    cfg.merge_from_other_cfg(CfgNode(yaml.safe_load(printed)))
    return cfg


def _load_detectron2(out: Path, printed: str, x: torch.Tensor) -> dict:
    cfg = _detectron2_cfg(printed)
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.backbone.resnet import build_resnet_backbone

    cfg.MODEL.RESNETS.OUT_FEATURES = list(FEATURES)
    backbone = build_resnet_backbone(cfg, ShapeSpec(channels=3)).eval()
    checkpointer = DetectionCheckpointer(backbone)
    incompatible = checkpointer._load_model(checkpointer._load_file(str(out)))
    assert not incompatible.missing_keys and not incompatible.unexpected_keys and not incompatible.incorrect_shapes
    assert cfg.INPUT.FORMAT == "RGB"
    with torch.no_grad():
        return backbone(x)


def _mmseg():
    from segmentation.mmseg_engine import import_mmseg

    import_mmseg()
    from mmseg.registry import MODELS

    return MODELS


def _load_mmseg(out: Path, printed: str, x: torch.Tensor) -> dict:
    from mmengine.config import Config
    from mmengine.runner import load_checkpoint

    models = _mmseg()
    cfg = Config.fromstring(printed, ".py")
    # The config route (init_cfg=Pretrained, as a recipe's init_weights runs it) loads every key ...
    backbone = models.build(dict(cfg.model.backbone, out_indices=(0, 1, 2, 3)))
    backbone.init_weights()
    exported = torch.load(out, weights_only=True)["state_dict"]
    assert set(exported) == set(backbone.state_dict())
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, exported[k]), k
    # ... and so does mmengine's strict loader.
    load_checkpoint(backbone, str(out), strict=True)
    strict = backbone
    strict.eval()  # (mmseg's ResNet.train returns None)
    with torch.no_grad():
        return dict(zip(FEATURES, strict(x)))


def _load_timm(out: Path, printed: str, x: torch.Tensor, num_classes: int, name: str):
    namespace: dict = {}
    exec(printed, namespace)  # the printed lines are the user's code
    model = namespace["model"].eval()
    with torch.no_grad():
        logits = model(x)
        if name == "inception_v3":
            return None, logits
        feats = model.forward_intermediates(x, indices=[1, 2, 3, 4], intermediates_only=True)
    return dict(zip(FEATURES, feats)), logits


def _load_torchvision(out: Path, printed: str, x: torch.Tensor, name: str):
    namespace: dict = {}
    exec(printed, namespace)
    model = namespace["model"].eval()
    with torch.no_grad():
        logits = model(x)
        if name == "inception_v3":
            return None, logits, namespace["normalize"]
        from torchvision.models.feature_extraction import create_feature_extractor

        body = create_feature_extractor(model, {f"layer{i + 1}": f for i, f in enumerate(FEATURES)})
        return body(x), logits, namespace["normalize"]


@pytest.mark.parametrize("name,kwargs", [("inception_v3", {"width_mult": 0.25}), ("resnet50d", {"width_mult": 0.25})])
def test_narrow_networks_export_nowhere(tmp_path, name, kwargs):
    """A width multiplier makes a network only the suite builds: every target refuses it, naming why."""
    weights = save_weights(create_backbone(name, num_classes=10, **kwargs), tmp_path / "narrow.safetensors")
    for target in CAN_BUILD[name]:
        with pytest.raises(NotExportableError, match=rf"cannot be built by {target}: its variant width_mult=0.25 "
                                                     "exists only in the suite; no other library builds it"):
            export(weights, target, tmp_path / f"export{SUFFIX[target]}")


@pytest.mark.parametrize("name,target", CASES)
def test_export_loads_in_target_with_same_features(tmp_path, name, target):
    model, weights = _suite_weights(tmp_path, name)
    out = tmp_path / f"export{SUFFIX[target]}"
    if not CAN_BUILD[name][target]:
        able = [t for t, ok in CAN_BUILD[name].items() if ok]
        with pytest.raises(NotExportableError) as e:
            export(weights, target, out)
        msg = str(e.value)
        assert f"{name} cannot be built by {target}" in msg
        assert (f"--to {' / '.join(able)}" in msg) if able else "no other library" in msg
        assert not out.exists()
        return
    printed = export(weights, target, out)
    size = 96 if name == "inception_v3" else SIZE  # torchvision's Inception-V3 takes >= 75 px
    x = _image(size=size)
    ours = _our_features(model, x)
    if target == "detectron2":
        _assert_same(ours, _load_detectron2(out, printed, x))
        back = create_backbone(name, num_classes=0, weights=str(out))  # the round trip
        skip = ("fc.", "num_batches_tracked")
    elif target == "mmseg":
        _assert_same(ours, _load_mmseg(out, printed, x))
        back = create_backbone(name, num_classes=0, weights=str(out))
        skip = ("fc.",)
    else:
        if target == "timm":
            feats, logits = _load_timm(out, printed, x, 10, name)
        else:
            feats, logits, normalize = _load_torchvision(out, printed, x, name)
            torch.testing.assert_close(torch.tensor(normalize.mean), torch.tensor(model.default_cfg["mean"]))
        if feats is not None:
            _assert_same(ours, feats)
        with torch.no_grad():
            _assert_same({"logits": model(x)}, {"logits": logits})
        back = create_backbone(name, num_classes=10, weights=str(out), **({"aux_logits": False} if name == "inception_v3" else {}))
        skip = ()
    own, again = model.state_dict(), back.state_dict()
    for k, v in own.items():
        if not k.startswith(skip) and not k.endswith(skip):
            assert torch.equal(v, again[k]), k


def test_printed_input_conventions(tmp_path):
    model, weights = _suite_weights(tmp_path, "resnet18")
    mean255 = [255 * v for v in model.default_cfg["mean"]]
    std255 = [255 * v for v in model.default_cfg["std"]]
    cfg = _detectron2_cfg(export(weights, "detectron2", tmp_path / "r18.pkl"))
    assert cfg.INPUT.FORMAT == "RGB" and cfg.MODEL.RESNETS.RES2_OUT_CHANNELS == 64
    assert cfg.MODEL.PIXEL_MEAN == pytest.approx(mean255, abs=1e-3)
    assert cfg.MODEL.PIXEL_STD == pytest.approx(std255, abs=1e-3)
    from mmengine.config import Config

    _mmseg()
    mm = Config.fromstring(export(weights, "mmseg", tmp_path / "r18.pth"), ".py")
    assert mm.model.data_preprocessor.bgr_to_rgb is True
    assert mm.model.data_preprocessor.mean == pytest.approx(mean255, abs=1e-3)
    assert mm.model.data_preprocessor.std == pytest.approx(std255, abs=1e-3)


def test_cli_export_errors_name_the_targets(tmp_path):
    _, weights = _suite_weights(tmp_path, "resnet50d")
    run = subprocess.run([sys.executable, "-m", "tricks", "export", str(weights), "--to", "detectron2", "--out",
                          str(tmp_path / "x.pkl")], capture_output=True, text=True)
    assert run.returncode != 0
    assert "resnet50d cannot be built by detectron2" in run.stderr and "--to timm / mmseg" in run.stderr
    run = subprocess.run([sys.executable, "-m", "tricks", "export", str(weights), "--to", "mmseg", "--out",
                          str(tmp_path / "x.pth")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "type='ResNetV1d'" in run.stdout and "bgr_to_rgb=True" in run.stdout


# ---------------------------------------------------------------------------------------------- whole recipes
BASE_RCNN_FPN = """
MODEL:
  META_ARCHITECTURE: "GeneralizedRCNN"
  MASK_ON: False
  BACKBONE:
    NAME: "build_resnet_fpn_backbone"
  RESNETS:
    OUT_FEATURES: ["res2", "res3", "res4", "res5"]
  FPN:
    IN_FEATURES: ["res2", "res3", "res4", "res5"]
  ANCHOR_GENERATOR:
    SIZES: [[32], [64], [128], [256], [512]]
    ASPECT_RATIOS: [[0.5, 1.0, 2.0]]
  RPN:
    IN_FEATURES: ["p2", "p3", "p4", "p5", "p6"]
  ROI_HEADS:
    NAME: "StandardROIHeads"
    IN_FEATURES: ["p2", "p3", "p4", "p5"]
    NUM_CLASSES: 20
  ROI_BOX_HEAD:
    NAME: "FastRCNNConvFCHead"
    NUM_FC: 2
    POOLER_RESOLUTION: 7
  DEVICE: "cpu"
"""


def _faster_rcnn(printed: str = ""):
    """detectron2's PascalVOC faster_rcnn_R_50_FPN.yaml (Base-RCNN-FPN settings; DEPTH 50) + the printed lines."""
    import yaml

    cfg = _detectron2_cfg(BASE_RCNN_FPN)
    cfg.MODEL.RESNETS.DEPTH = 50
    if printed:
        from detectron2.config import CfgNode

        cfg.merge_from_other_cfg(CfgNode(yaml.safe_load(printed)))
    from detectron2.modeling import build_model

    return cfg, build_model(cfg).eval()


@pytest.mark.parametrize("name,suffix", [("resnet50", ".pkl"), ("resnet50b", ".pth")])
def test_detectron2_faster_rcnn_r50_fpn_loads_export(tmp_path, name, suffix):
    model, weights = _suite_weights(tmp_path, name)
    printed = export(weights, "detectron2", tmp_path / f"r50{suffix}")
    cfg, detector = _faster_rcnn(printed)
    from detectron2.checkpoint import DetectionCheckpointer

    checkpointer = DetectionCheckpointer(detector)
    incompatible = checkpointer._load_model(checkpointer._load_file(cfg.MODEL.WEIGHTS))
    assert not [k for k in incompatible.missing_keys if k.startswith("backbone.bottom_up.")]
    assert not incompatible.unexpected_keys and not incompatible.incorrect_shapes
    x = _image()
    with torch.no_grad():
        _assert_same(_our_features(model, x), detector.backbone.bottom_up(x))


def test_mmseg_fcn_r50_d8_loads_export(tmp_path):
    """mmseg's own fcn_r50-d8 recipe + the printed lines: the segmentor's init_weights loads every backbone key."""
    from mmengine.config import Config

    from segmentation.mmseg_engine import BASE_RECIPE

    models = _mmseg()
    import mmseg

    model, weights = _suite_weights(tmp_path, "resnet50c")
    printed = export(weights, "mmseg", tmp_path / "r50c.pth")
    recipe = Path(mmseg.__file__).parent / ".mim" / "configs" / BASE_RECIPE
    cfg = Config.fromfile(str(recipe))
    cfg.merge_from_dict(Config.fromstring(printed, ".py").to_dict())
    cfg.model.backbone.norm_cfg = dict(type="BN", requires_grad=True)  # SyncBN needs a process group
    cfg.model.decode_head.norm_cfg = cfg.model.auxiliary_head.norm_cfg = dict(type="BN", requires_grad=True)
    from mmengine.registry import init_default_scope

    init_default_scope("mmseg")  # the recipe's data_preprocessor type is mmseg's
    segmentor = models.build(cfg.model)
    segmentor.init_weights()
    exported = torch.load(tmp_path / "r50c.pth", weights_only=True)["state_dict"]
    backbone_state = segmentor.backbone.state_dict()
    assert set(exported) == set(backbone_state)  # no missing and no unexpected backbone key
    for k, v in exported.items():
        assert torch.equal(v, backbone_state[k]), k


# ---------------------------------------------------------------------------------------------- reverse
@pytest.mark.parametrize("depth,name", [(18, "resnet18"), (50, "resnet50")])
def test_detectron2_checkpoint_of_whole_detector_loads(tmp_path, depth, name):
    """A Faster R-CNN checkpoint detectron2's checkpointer writes ({"model": ...}, backbone.bottom_up.*)."""
    extra = "MODEL:\n  RESNETS:\n    DEPTH: %d\n    RES2_OUT_CHANNELS: %d\n" % (depth, 64 if depth < 50 else 256)
    _, detector = _faster_rcnn(extra)
    _randomise_norms(detector.backbone.bottom_up)
    from detectron2.checkpoint import DetectionCheckpointer

    DetectionCheckpointer(detector, save_dir=str(tmp_path)).save("model_final")
    ours = create_backbone(name, num_classes=0, weights=str(tmp_path / "model_final.pth"))  # STRIDE_IN_1X1 True
    x = _image()
    with torch.no_grad():
        _assert_same(_our_features(ours, x), detector.backbone.bottom_up(x))


def test_detectron2_pkl_of_convert_torchvision_to_d2(tmp_path):
    """The .pkl detectron2's own tools/convert-torchvision-to-d2.py writes from a torchvision ResNet-50."""
    script = Path(sys.prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / \
        "site-packages" / "tools" / "convert-torchvision-to-d2.py"
    if not script.is_file():
        pytest.skip("detectron2's tools/convert-torchvision-to-d2.py is not installed")
    ref = _randomise_norms(torchvision.models.resnet50(weights=None))
    torch.save(ref.state_dict(), tmp_path / "r50.pth")
    subprocess.run([sys.executable, str(script), str(tmp_path / "r50.pth"), str(tmp_path / "r50.pkl")], check=True,
                   capture_output=True)
    ours = create_backbone("resnet50b", weights=str(tmp_path / "r50.pkl"))
    x = _image()
    with torch.no_grad():
        _assert_same({"logits": ours.eval()(x)}, {"logits": ref(x)})


@pytest.mark.parametrize("mm_type,name", [("ResNetV1c", "resnet18c"), ("ResNetV1d", "resnet18d"), ("ResNet", "resnet50b"),
                                          ("ResNetV1c", "resnet50c"), ("ResNetV1d", "resnet50d")])
@pytest.mark.parametrize("layout", ["bare", "state_dict", "segmentor"])
def test_openmmlab_checkpoints_load(tmp_path, mm_type, name, layout):
    """Checkpoints of mmseg's own ResNets: bare, under state_dict (mmengine's save_checkpoint), with the
    backbone. prefix of a whole segmentor."""
    from mmengine.runner import save_checkpoint

    models = _mmseg()
    depth = int(name[6:8])
    theirs = models.build(dict(type=mm_type, depth=depth, out_indices=(0, 1, 2, 3)))
    _randomise_norms(theirs)
    theirs.eval()
    state = theirs.state_dict()
    path = tmp_path / "mm.pth"
    if layout == "bare":
        torch.save(state, path)
    elif layout == "state_dict":
        save_checkpoint({"state_dict": state, "meta": {}}, str(path))
    else:
        whole = {f"backbone.{k}": v for k, v in state.items()}
        whole.update({"decode_head.conv_seg.weight": torch.zeros(150, 512, 1, 1),
                      "auxiliary_head.conv_seg.weight": torch.zeros(150, 256, 1, 1)})
        save_checkpoint({"state_dict": whole, "meta": {}}, str(path))
    ours = create_backbone(name, num_classes=0, weights=str(path))
    x = _image()
    with torch.no_grad():
        _assert_same(_our_features(ours, x), dict(zip(FEATURES, theirs(x))))


@pytest.mark.parametrize("mm_type,name", [("ResNetV1d", "resnet50d")])
def test_openmmlab_fcn_d8_dilation_is_output_stride_8(tmp_path, mm_type, name):
    """fcn_r50-d8's backbone settings (strides 1,2,1,1; dilations 1,1,2,4; contract_dilation) = output_stride=8.
    (Bottlenecks only: mmseg's BasicBlock dilates its first conv only, ours and timm's both.)"""
    models = _mmseg()
    theirs = models.build(dict(type=mm_type, depth=int(name[6:8]), strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4),
                               contract_dilation=True, out_indices=(0, 1, 2, 3)))
    _randomise_norms(theirs)
    theirs.eval()
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in theirs.state_dict().items()}}, tmp_path / "fcn.pth")
    ours = create_backbone(name, num_classes=0, output_stride=8, weights=str(tmp_path / "fcn.pth"))
    x = _image()
    with torch.no_grad():
        _assert_same(_our_features(ours, x), dict(zip(FEATURES, theirs(x))))


@pytest.mark.parametrize("mm_type,into,differs", [("ResNetV1c", "resnet50d", "avg_down False vs the model's True"),
                                                  ("ResNetV1d", "resnet50c", "avg_down True vs the model's False"),
                                                  ("ResNetV1c", "resnet50b", "stem 'deep' vs the model's 'plain'")])
def test_openmmlab_mismatch_names_what_differs(tmp_path, mm_type, into, differs):
    models = _mmseg()
    torch.save({"state_dict": models.build(dict(type=mm_type, depth=50)).state_dict()}, tmp_path / "mm.pth")
    with pytest.raises(ValueError) as e:
        create_backbone(into, num_classes=0, weights=str(tmp_path / "mm.pth"))
    msg = str(e.value)
    assert differs in msg and "mm.pth" in msg
    assert f"build resnet50{'c' if mm_type == 'ResNetV1c' else 'd'}" in msg


def _caffe2_name(d2_key: str) -> str:
    """detectron2 ResNet name -> the MSRA/Detectron1 Caffe2 blob name (checked below by detectron2's own
    ``convert_c2_detectron_names``, which maps the other way)."""
    module, _, param = d2_key.rpartition(".")
    norm = module.endswith(".norm")
    module = module[: -len(".norm")] if norm else module
    suffix = {"weight": "_bn_s", "bias": "_bn_b"}[param] if norm else "_w"
    if module == "stem.conv1":
        return ("res_conv1" if norm else "conv1") + suffix
    stage, block, conv = module.split(".")
    branch = "branch1" if conv == "shortcut" else {"conv1": "branch2a", "conv2": "branch2b", "conv3": "branch2c"}[conv]
    return f"{stage}_{block}_{branch}{suffix}"


def test_caffe2_msra_pkl_loads_like_detectron2_and_warns_about_bgr(tmp_path, caplog):
    """A Caffe2-named ResNet-50 .pkl (MSRA layout: affine-channel BN, no statistics): ours equals
    detectron2's model loaded by its own checkpointer (c2 conversion), and the BGR convention is logged."""
    import logging
    import pickle

    cfg = _detectron2_cfg("MODEL:\n  RESNETS:\n    DEPTH: 50\n    STRIDE_IN_1X1: True\n")
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.checkpoint.c2_model_loading import convert_c2_detectron_names
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.backbone.resnet import build_resnet_backbone

    cfg.MODEL.RESNETS.OUT_FEATURES = list(FEATURES)
    source = _randomise_norms(build_resnet_backbone(cfg, ShapeSpec(channels=3)))
    blobs = {_caffe2_name(k): v.numpy() for k, v in source.state_dict().items()
             if not k.endswith(("running_mean", "running_var"))}
    renamed, _ = convert_c2_detectron_names(dict(blobs))
    assert set(renamed) == {k for k in source.state_dict() if not k.endswith(("running_mean", "running_var"))}
    with open(tmp_path / "R-50.pkl", "wb") as f:
        pickle.dump(blobs, f)
    d2 = build_resnet_backbone(cfg, ShapeSpec(channels=3)).eval()
    DetectionCheckpointer(d2).load(str(tmp_path / "R-50.pkl"))
    loaded = {k: v for k, v in d2.state_dict().items() if not k.endswith(("running_mean", "running_var"))}
    assert all(torch.equal(v, torch.as_tensor(source.state_dict()[k])) for k, v in loaded.items())
    with caplog.at_level(logging.WARNING, logger="backbones.convert"):
        ours = create_backbone("resnet50", num_classes=0, weights=str(tmp_path / "R-50.pkl"))
    assert "BGR" in caplog.text and "103.53" in caplog.text
    x = _image()
    with torch.no_grad():
        as_loaded = d2(x)
        # detectron2 fills the absent statistics with mean 0, var 1 (FrozenBatchNorm2d._load_from_state_dict,
        # checkpoint version None): scale / sqrt(1 + 1e-5) per layer. Caffe2's affine channel is exactly
        # x * scale + bias, which ours computes (var 1 - eps); with that in detectron2's layers the two agree.
        for m in d2.modules():
            if hasattr(m, "running_var"):
                m.running_var.fill_(1 - m.eps)
        _assert_same(_our_features(ours, x), d2(x))
        for name in FEATURES:
            assert (as_loaded[name] - d2(x)[name]).abs().max() <= 1e-3 * as_loaded[name].abs().max()


def test_pkl_with_code_is_refused(tmp_path):
    import pickle

    class Payload:
        def __reduce__(self):
            return (print, ("ran",))

    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump({"model": {"stem.conv1.weight": Payload()}}, f)
    with pytest.raises(WeightsError, match="builtins.print is not a numpy array.*allow_pickle=True"):
        create_backbone("resnet18", num_classes=0, weights=str(tmp_path / "evil.pkl"))


BASE_RCNN_C4 = """
MODEL:
  META_ARCHITECTURE: "GeneralizedRCNN"
  MASK_ON: False
  RESNETS:
    DEPTH: 50
    OUT_FEATURES: ["res4"]
  RPN:
    IN_FEATURES: ["res4"]
  ROI_HEADS:
    NAME: "Res5ROIHeads"
    IN_FEATURES: ["res4"]
  DEVICE: "cpu"
"""


def test_detectron2_c4_detector_checkpoint_loads_res5_from_box_head(tmp_path):
    """detectron2's C4 Faster R-CNN keeps res5 in roi_heads.res5: it is part of the backbone loaded."""
    cfg = _detectron2_cfg(BASE_RCNN_C4)
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    detector = build_model(cfg).eval()
    _randomise_norms(detector)
    DetectionCheckpointer(detector, save_dir=str(tmp_path)).save("model_final")
    ours = create_backbone("resnet50", num_classes=0, weights=str(tmp_path / "model_final.pth"))
    x = _image()
    with torch.no_grad():
        res4 = detector.backbone(x)["res4"]
        theirs = {"res4": res4, "res5": detector.roi_heads.res5(res4)}
        feats = _our_features(ours, x)
    _assert_same({k: feats[k] for k in ("res4", "res5")}, theirs)


def test_export_reads_a_training_checkpoint(tmp_path):
    """last.pth of tricks train: the architecture and mean/std come from its resolved config."""
    import dataclasses

    from classification.config import Config
    from runtime.config import to_dict

    cfg = Config()
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name="resnet18d"),
                              data=dataclasses.replace(cfg.data, mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3]))
    model = _randomise_norms(create_backbone("resnet18d", num_classes=7))
    torch.save({"model": model.state_dict(), "config": to_dict(cfg), "step": 1}, tmp_path / "last.pth")
    printed = export(tmp_path / "last.pth", "mmseg", tmp_path / "r18d.pth")
    assert "type='ResNetV1d', depth=18" in printed
    assert "mean=[127.5, 102, 76.5], std=[51, 63.75, 76.5]" in printed
    back = create_backbone("resnet18d", num_classes=0, weights=str(tmp_path / "r18d.pth"))
    for k, v in back.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k


def test_export_of_a_checkpoint_whose_mean_came_from_its_weights(tmp_path):
    """A 1-channel fine-tune with data.mean/std null took them from its model.weights (a grey pretraining): its
    config says null, so the export built ImageNet's 3 values and failed with 'data.mean ... one value per input
    channel' for a key the user never set. last.pth records the mean/std the run used; an older last.pth without
    them takes its model.weights' own."""
    import dataclasses

    from classification.config import Config
    from runtime.config import to_dict
    from runtime.data import saved_normalization

    cfg = Config()
    pre = save_weights(create_backbone("resnet18", num_classes=10, in_chans=1), tmp_path / "grey.safetensors",
                       metadata={"mean": [0.286], "std": [0.353]})
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name="resnet18", in_chans=1, weights=str(pre)))
    assert cfg.data.mean is None
    model = create_backbone("resnet18", num_classes=10, in_chans=1)
    torch.save({"model": model.state_dict(), "config": to_dict(cfg), "step": 1,
                "normalization": {"mean": [0.25], "std": [0.5]}}, tmp_path / "last.pth")
    assert "mean=[63.75, 63.75, 63.75], std=[127.5, 127.5, 127.5]" in export(tmp_path / "last.pth", "mmseg",
                                                                                tmp_path / "a.pth")
    assert saved_normalization(str(tmp_path / "last.pth")) == ([0.25], [0.5])  # tricks eval / a fine-tune of it
    torch.save({"model": model.state_dict(), "config": to_dict(cfg), "step": 1}, tmp_path / "old.pth")
    assert "72.93, 72.93, 72.93" in export(tmp_path / "old.pth", "mmseg", tmp_path / "b.pth")


def test_cli_targets_are_the_converters():
    from backbones import convert
    from tricks import export as export_module

    assert export_module.TARGETS == convert.TARGETS


def test_export_of_a_checkpoint_with_ema_takes_the_averaged_weights(tmp_path):
    """train.ema_decay: last.pth holds the raw weights under 'model' and the evaluated (averaged) ones under 'ema'."""
    from classification.config import Config
    from runtime.config import to_dict
    from runtime.ema import WeightEMA

    raw = create_backbone("resnet18d", num_classes=7)
    averaged = WeightEMA(_randomise_norms(create_backbone("resnet18d", num_classes=7)), 0.9)
    torch.save({"model": raw.state_dict(), "ema": averaged.state_dict(), "config": to_dict(Config()), "step": 1},
               tmp_path / "last.pth")
    export(tmp_path / "last.pth", "timm", tmp_path / "r18d.pth")
    exported = torch.load(tmp_path / "r18d.pth", weights_only=True)
    for k, v in averaged.module.state_dict().items():
        assert torch.equal(exported[k], v), k


@pytest.mark.parametrize("target", ["detectron2", "mmseg"])
def test_one_channel_stem_exports_spread_over_rgb(tmp_path, target):
    """A Fashion-MNIST network (1 input channel) for a library of RGB networks: the stem divided over the 3 channels,
    so a grey image as 3 equal channels gives the 1-channel network's features (detectron2 and mmseg would keep a
    random stem with only a warning); the printed mean/std are repeated."""
    model = _randomise_norms(create_backbone("resnet18", num_classes=10, in_chans=1))
    weights = save_weights(model, tmp_path / "grey.safetensors", metadata={"mean": [0.286], "std": [0.353]})
    out = tmp_path / f"grey{SUFFIX[target]}"
    printed = export(weights, target, out)
    assert "spread over RGB" in printed
    x = _image(channels=1)
    ours = _our_features(model, x)
    theirs = (_load_detectron2 if target == "detectron2" else _load_mmseg)(out, printed, x.expand(-1, 3, -1, -1))
    _assert_same(ours, theirs)
    assert "72.93, 72.93, 72.93" in printed  # 0.286 x 255, once per channel


def test_variants_that_change_no_parameter_are_kept_apart(tmp_path):
    """A file saved from ResNet-50-B does not load into the original ResNet-50 (the same names and shapes, another
    network); Inception-V3 with transform_input exports to torchvision only, with the flag; a 64-wide deep stem
    exports nowhere."""
    from backbones.weights import WeightsError

    b = save_weights(create_backbone("resnet50b", num_classes=0), tmp_path / "r50b.safetensors")
    with pytest.raises(WeightsError, match="downsample_in='3x3'.*downsample_in='1x1'"):
        create_backbone("resnet50", num_classes=0, weights=str(b))
    create_backbone("resnet50b", num_classes=0, weights=str(b))  # its own architecture loads
    inc = create_backbone("inception_v3", num_classes=10, aux_logits=False, transform_input=True)
    inc_file = save_weights(inc, tmp_path / "inc.safetensors")
    assert "transform_input=True" in export(inc_file, "torchvision", tmp_path / "inc.pth")
    with pytest.raises(NotExportableError, match="transform_input"):
        export(inc_file, "timm", tmp_path / "inc_timm.pth")
    with pytest.raises(WeightsError, match="transform_input"):
        create_backbone("inception_v3", num_classes=10, aux_logits=False, weights=str(inc_file))
    wide = save_weights(create_backbone("resnet50d", num_classes=0, stem_width=64), tmp_path / "wide.safetensors")
    for target in ("timm", "mmseg"):
        with pytest.raises(NotExportableError, match="stem_width=64"):
            export(wide, target, tmp_path / f"wide_{target}{SUFFIX[target]}")
