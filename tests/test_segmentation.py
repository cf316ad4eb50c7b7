"""ADE20K loader on its release layout, and the dilated FCN against torchvision's fcn_resnet50."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.models.segmentation import fcn_resnet50

from segmentation.ade20k import ADE20K, IGNORE_INDEX, ADE20KFormatError
from segmentation.metrics import SegmentationMetric
from segmentation.inference import predict, slide_inference, whole_inference
from segmentation.model import FCNHead, build_fcn


def import_mmseg_decode_heads():
    """mmseg's decode heads, imported through the engine's importer (it installs the stand-in for mmcv's
    missing compiled ops); skipped, saying why, when the foreign stack cannot import."""
    try:
        from segmentation.mmseg_engine import import_mmseg

        import_mmseg()
        from mmseg.models import decode_heads
    except Exception as e:  # any import failure of the foreign stack means: skip, saying why
        pytest.skip(f"mmseg cannot be imported ({type(e).__name__}: {e})")
    return decode_heads


def write_pair(root: Path, split: str, name: str, annotation: np.ndarray, mode: str = "L") -> None:
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
    h, w = annotation.shape
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
        root / "images" / split / f"{name}.jpg")
    Image.fromarray(annotation.astype(np.uint8)).convert(mode).save(root / "annotations" / split / f"{name}.png")


@pytest.fixture
def ade(tmp_path) -> Path:
    root = tmp_path / "ADEChallengeData2016"
    ann = np.zeros((24, 32), np.uint8)
    ann[:, 8:16], ann[:, 16:] = 1, 150
    write_pair(root, "validation", "ADE_val_00000001", ann)
    write_pair(root, "validation", "ADE_val_00000002", np.full((20, 30), 7, np.uint8))
    write_pair(root, "training", "ADE_train_00000001", ann)
    return root


def test_labels_reduce_zero_and_transforms_follow(ade):
    ds = ADE20K(ade.parent, "val")  # the folder's parent works too
    assert len(ds) == 2
    image, mask = ds[0]
    assert image.shape == (3, 24, 32) and image.dtype == torch.uint8 and mask.dtype == torch.int64
    assert mask[0, :8].eq(IGNORE_INDEX).all() and mask[0, 8:16].eq(0).all() and mask[0, 16:].eq(149).all()
    from torchvision.transforms import v2
    flipped = ADE20K(ade, "validation", transforms=v2.RandomHorizontalFlip(p=1.0))[0][1]
    assert torch.equal(flipped, mask.flip(-1))
    # The whole image as its own prediction: 100% on what is evaluated, "other" ignored.
    metric = SegmentationMetric(150)
    metric.update(mask.clamp(max=149), mask)
    assert metric.compute()["aAcc"] == 100


def test_load_keeps_8bit_masks_compact_and_equal(ade, tmp_path):
    """``ADE20K.load`` (the training loader's form): an 8-bit annotation stays uint8, with the values of
    ``dataset[i]`` (int64); a 16-bit one is int64 (classes above 255 must not wrap), reduced or not."""
    ds = ADE20K(ade, "val")
    for i in range(len(ds)):
        image, label = ds.load(i)
        assert label.dtype == np.uint8 and isinstance(image, torch.Tensor) and image.dtype == torch.uint8
        assert np.array_equal(label.astype(np.int64), ds[i][1].numpy()) and torch.equal(image, ds[i][0])
    root = tmp_path / "wide" / "ADEChallengeData2016"
    wide = np.arange(12 * 40, dtype=np.uint16).reshape(12, 40) % 300  # 0..299: classes past 255
    write_pair(root, "training", "a", np.zeros((12, 40), np.uint8))
    Image.fromarray(wide).save(root / "annotations" / "training" / "a.png")  # 16-bit grey
    for reduce, expected in ((False, wide), (True, np.where(wide == 0, IGNORE_INDEX, wide.astype(np.int64) - 1))):
        ds = ADE20K(root, "train", num_classes=300, reduce_zero_label=reduce)
        label = ds.load(0)[1]
        assert label.dtype == np.int64 and np.array_equal(label, expected)
        assert torch.equal(ds[0][1], torch.from_numpy(label))


def test_errors_name_the_file(ade, tmp_path):
    with pytest.raises(FileNotFoundError, match="images/training"):
        ADE20K(tmp_path / "nowhere", "train")
    with pytest.raises(ValueError, match="split 'test'"):
        ADE20K(ade, "test")
    write_pair(ade, "validation", "ADE_val_00000003", np.full((8, 8), 200, np.uint8))
    with pytest.raises(ADE20KFormatError, match="ADE_val_00000003.png: value 200"):
        ADE20K(ade, "val")[2]
    write_pair(ade, "validation", "ADE_val_00000003", np.full((8, 8), 3, np.uint8), mode="RGB")
    with pytest.raises(ADE20KFormatError, match="ADE_val_00000003.png: expected a single-channel"):
        ADE20K(ade, "val")[2]
    (ade / "annotations" / "validation" / "ADE_val_00000003.png").unlink()
    with pytest.raises(ADE20KFormatError, match="no annotation for 1 image.*ADE_val_00000003.png"):
        ADE20K(ade, "val")


def test_torchvision_fcn_resnet50_loads_strictly_and_gives_the_same_logits():
    torch.manual_seed(0)
    theirs = fcn_resnet50(weights=None, weights_backbone=None, num_classes=7, aux_loss=True).eval()
    g = torch.Generator().manual_seed(0)
    for m in theirs.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    ours = build_fcn("resnet50b", num_classes=7, head="torchvision").eval()
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(1, 3, 72, 88)
    with torch.no_grad():
        a, b = ours(x), theirs(x)
    assert a["out"].shape == (1, 7, 72, 88)
    for k in ("out", "aux"):
        torch.testing.assert_close(a[k], b[k])


@pytest.mark.parametrize("shape,size", [((2, 11, 12, 12), (96, 96)), ((1, 6, 17, 9), (8, 20)),
                                        ((2, 4, 7, 7), (7, 30)), ((1, 3, 40, 50), (13, 11))])
def test_resize_logits_is_bilinear_interpolation_with_its_gradient(shape, size):
    """The FCN's upsampling of its logits: in training two matmuls, with F.interpolate's values and gradients (up,
    down and mixed scales); without grad F.interpolate itself."""
    from segmentation.model import resize_logits

    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    g = torch.randn(shape[0], shape[1], *size, dtype=torch.float64)
    grads = []
    for fn in (resize_logits, lambda t, s: F.interpolate(t, size=s, mode="bilinear", align_corners=False)):
        leaf = x.clone().requires_grad_()
        out = fn(leaf, size)
        (out * g).sum().backward()
        grads.append((out.detach(), leaf.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=0, atol=1e-12)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=0, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(resize_logits(x, size), grads[1][0], rtol=0, atol=0)


def test_resize_logits_under_torch_compile_is_interpolate():
    """Compiled (train.compile=true) the upsampling is F.interpolate: dynamo would otherwise trace the matrices'
    construction (past the lru_cache) into every step, with a host-to-device copy on CUDA."""
    from segmentation.model import resize_logits

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    torch._dynamo.reset()
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    out = torch.compile(lambda t: resize_logits(t * 2, (24, 24)), backend=backend)(x)
    torch.testing.assert_close(out, F.interpolate(x * 2, size=(24, 24), mode="bilinear", align_corners=False))
    assert graphs and all("interpolate" in g and "index_put" not in g and "matmul" not in g for g in graphs)


def test_fcn_on_other_backbones_trains():
    model = build_fcn("resnet18d", num_classes=5).train()
    x, y = torch.randn(2, 3, 64, 64), torch.randint(0, 5, (2, 64, 64))
    y[:, :4] = IGNORE_INDEX
    out = model(x)
    loss = torch.nn.functional.cross_entropy(out["out"], y, ignore_index=IGNORE_INDEX) + \
        0.4 * torch.nn.functional.cross_entropy(out["aux"], y, ignore_index=IGNORE_INDEX)
    loss.backward()
    assert model.backbone.layer4[0].conv1.weight.grad is not None
    assert model.backbone.feature_info[-1].stride == 8  # dilated: res5 at 1/8
    assert build_fcn("mobilenet", num_classes=5, aux=False)(torch.randn(1, 3, 64, 64))["out"].shape == (1, 5, 64, 64)


def _randomise_bn(module: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


@pytest.mark.parametrize("in_channels,channels,num_convs,concat_input", [(64, 32, 2, True), (48, 16, 1, False)])
def test_fcn_head_equals_mmseg_fcn_head(in_channels, channels, num_convs, concat_input):
    decode_heads = import_mmseg_decode_heads()
    torch.manual_seed(0)
    ours = FCNHead(in_channels, channels, 5, num_convs=num_convs, concat_input=concat_input, dropout=0.1)
    theirs = decode_heads.FCNHead(in_channels=in_channels, channels=channels, num_convs=num_convs,
                                  concat_input=concat_input, dropout_ratio=0.1, num_classes=5,
                                  norm_cfg=dict(type="BN", requires_grad=True), align_corners=False)
    _randomise_bn(ours)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, in_channels, 9, 11)
    ours.eval(), theirs.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs([x]), atol=1e-5, rtol=1e-5)
    # training mode: batch statistics and dropout; equal with equal dropout draws
    ours.train(), theirs.train()
    torch.manual_seed(1)
    a = ours(x)
    torch.manual_seed(1)
    b = theirs([x])
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # mmseg's initialisation of the classifier: N(0, 0.01), bias 0
    assert ours.conv_seg.bias.abs().max() == 0 and 0.005 < float(FCNHead(512, 512, 150).conv_seg.weight.detach().std()) < 0.015


def test_build_fcn_mmseg_head_layout():
    model = build_fcn("resnet18d", num_classes=5, channels=32, aux_channels=16)
    keys = model.state_dict().keys()
    for k in ("classifier.convs.0.conv.weight", "classifier.convs.1.bn.running_var", "classifier.conv_cat.conv.weight",
              "classifier.conv_seg.bias", "aux_classifier.convs.0.conv.weight", "aux_classifier.conv_seg.weight"):
        assert k in keys
    assert not any(k.startswith("aux_classifier.conv_cat") or k.startswith("aux_classifier.convs.1") for k in keys)
    assert model.classifier.conv_cat.conv.in_channels == 512 + 32  # res5 of resnet18 + channels
    assert model.aux_classifier.convs[0].conv.in_channels == 256 and model.classifier.dropout.p == 0.1
    out = model.eval()(torch.randn(1, 3, 40, 48))
    assert out["out"].shape == out["aux"].shape == (1, 5, 40, 48)
    assert build_fcn("resnet18d", num_classes=5, aux=False, channels=8).aux_classifier is None
    with pytest.raises(ValueError, match="FCN head 'deeplab'"):
        build_fcn("resnet18d", head="deeplab")


def test_ade20k_layout_with_own_classes_and_errors(ade, tmp_path):
    # reduce_zero_label=False: PNGs hold 0..K-1 and 255
    root = tmp_path / "other" / "ADEChallengeData2016"
    ann = np.full((8, 10), 2, np.uint8)
    ann[:, :3] = 255
    write_pair(root, "training", "a", ann)
    write_pair(root, "training", "b", np.zeros((8, 10), np.uint8))
    ds = ADE20K(root, "train", num_classes=3, reduce_zero_label=False)
    mask = ds[0][1]
    assert mask[:, :3].eq(255).all() and mask[:, 3:].eq(2).all()
    assert len(ADE20K(root, "train", num_classes=3, reduce_zero_label=False, max_images=1)) == 1
    with pytest.raises(ADE20KFormatError, match=r"a.png: value 2 is not a class: expected 0..1 or 255"):
        ADE20K(root, "train", num_classes=2, reduce_zero_label=False)[0]
    # reduce_zero_label with 3 classes: 0..3 allowed, 0 ignored; 255 is out of range
    with pytest.raises(ADE20KFormatError, match=r"a.png: value 255 is not a class: expected 0..3"):
        ADE20K(root, "train", num_classes=3)[0]
    assert ADE20K(root, "train", num_classes=3)[1][1].eq(255).all()
    # size mismatch, unreadable image, empty split
    Image.fromarray(np.zeros((9, 10), np.uint8)).save(root / "annotations" / "training" / "b.png")
    with pytest.raises(ADE20KFormatError, match=r"b.png: annotation is 10x9, its image b.jpg 10x8"):
        ds[1]
    (root / "images" / "training" / "a.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ADE20KFormatError, match=r"a.jpg: cannot read the image"):
        ds[0]
    (root / "images" / "validation").mkdir(parents=True)
    (root / "annotations" / "validation").mkdir(parents=True)
    with pytest.raises(ADE20KFormatError, match=r"images/validation: no images \(.jpg .jpeg .png .bmp .tif .tiff; empty split .val.\)"):
        ADE20K(root, "val")


class ConvSegmenter(torch.nn.Module):
    """A tiny "segmenter": one conv at full resolution (kernel 1: local, translation- and flip-equivariant;
    kernel 3 with a random, asymmetric weight: uses context and is not flip-equivariant)."""

    def __init__(self, kernel_size: int, num_classes: int = 4):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, num_classes, kernel_size, padding=kernel_size // 2)

    def forward(self, x):
        return {"out": self.conv(x)}


def test_slide_inference_equals_whole_and_mmseg():
    x = torch.randn(2, 3, 23, 37)
    context = ConvSegmenter(3)
    whole = whole_inference(context, x, 4)
    # one window covering the image (or larger: it shrinks to the image) = whole-image inference
    torch.testing.assert_close(slide_inference(context, x, (23, 37), (10, 10), 4), whole)
    torch.testing.assert_close(slide_inference(context, x, (64, 64), (32, 32), 4), whole)
    # a local model: overlapping windows averaged give the whole-image logits again
    local = ConvSegmenter(1)
    torch.testing.assert_close(slide_inference(local, x, (10, 16), (7, 9), 4), whole_inference(local, x, 4))
    # against mmseg's EncoderDecoder.slide_inference on the same model (window grid, count matrix)
    from types import SimpleNamespace
    import_mmseg_decode_heads()
    from mmseg.models.segmentors import EncoderDecoder
    fake = SimpleNamespace(test_cfg=SimpleNamespace(crop_size=(10, 16), stride=(7, 9)), out_channels=4,
                           encode_decode=lambda crop, metas: context(crop)["out"])
    theirs = EncoderDecoder.slide_inference(fake, x, [dict()])
    torch.testing.assert_close(slide_inference(context, x, (10, 16), (7, 9), 4), theirs)
    assert not torch.allclose(theirs, whole)  # windows cut the context: the test above is not trivial


def test_slide_inference_refuses_windows_farther_apart_than_their_size():
    from runtime.config import ConfigError
    from segmentation.inference import slide_inference

    model = build_fcn("resnet18d", num_classes=3, aux=False, channels=8, width_mult=0.25).eval()
    with pytest.raises(ConfigError, match=r"eval.stride=\[48, 24\]: must be <= eval.crop_size=\[32, 32\]"):
        slide_inference(model, torch.randn(1, 3, 96, 96), (32, 32), (48, 24))


def test_predict_flip_and_scales_average_probabilities_at_label_size():
    x = torch.randn(1, 3, 20, 30)
    local = ConvSegmenter(1)
    # one view: logits resized to the label size
    torch.testing.assert_close(predict(local, x, (20, 30)), whole_inference(local, x))
    resized = predict(local, x, (40, 60))
    assert resized.shape == (1, 4, 40, 60)
    # a flip-equivariant model: the flipped view equals the plain one -> mean probability = its softmax
    torch.testing.assert_close(predict(local, x, (20, 30), flip=True), local(x)["out"].softmax(1))
    # a model that is not flip-equivariant: the mirrored view's output is flipped back before averaging
    context = ConvSegmenter(3)
    expected = (context(x)["out"].softmax(1) + context(x.flip(-1))["out"].flip(-1).softmax(1)) / 2
    got = predict(context, x, (20, 30), flip=True)
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, context(x)["out"].softmax(1), atol=1e-3)
    # scales of the (long, short) bound: 0.5 x (60, 20) -> the 20x30 image resized into (30, 10) = 10x15
    half = torch.nn.functional.interpolate(x, size=(10, 15), mode="bilinear", align_corners=False)
    up = lambda t: torch.nn.functional.interpolate(t, size=(20, 30), mode="bilinear", align_corners=False)
    expected = (up(context(half)["out"]).softmax(1) + context(x)["out"].softmax(1)) / 2
    got = predict(context, x, (20, 30), scales=(0.5, 1.0), base_scale=(60, 20))
    torch.testing.assert_close(got, expected)
    got = predict(context, x, (20, 30), mode="slide", crop_size=(12, 12), stride=(8, 8), scales=(0.5, 1.0),
                  base_scale=(60, 20), num_classes=4)
    assert got.shape == (1, 4, 20, 30) and torch.allclose(got.sum(1), torch.ones(1, 20, 30))


def test_annotations_without_an_image_are_reported(ade, caplog):
    """An annotation PNG whose image is missing is not used (as mmseg, which lists the images): said, with the
    count and an example, not dropped silently."""
    import logging
    import shutil

    shutil.copy(ade / "annotations" / "validation" / "ADE_val_00000001.png",
                ade / "annotations" / "validation" / "ADE_val_00000009.png")
    with caplog.at_level(logging.WARNING):
        assert len(ADE20K(ade, "val")) == 2
    assert "1 annotation(s) without an image" in caplog.text and "ADE_val_00000009.png" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        ADE20K(ade, "train")
    assert "without an image" not in caplog.text
