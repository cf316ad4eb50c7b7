"""Strict weight compatibility with timm and torchvision: same names, same shapes, same logits.

For every depth/variant that timm or torchvision has, the reference model (randomly initialised,
with BN statistics calibrated on random data so every layer matters) is loaded into ours with
``strict=True``, and both must give the same logits in fp32 eval mode (max |diff| <= 1e-5).
"""
import pytest
import torch
import torch.nn as nn

from backbones import create_backbone, load_weights, save_weights

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

# ours -> timm name. timm's resnet50 etc. put the stride on the 3x3 conv: our ResNet-B.
TIMM = {
    "resnet18b": "resnet18", "resnet18d": "resnet18d", "resnet34b": "resnet34", "resnet34d": "resnet34d",
    "resnet50b": "resnet50", "resnet50c": "resnet50c", "resnet50d": "resnet50d",
    "resnet101b": "resnet101", "resnet101c": "resnet101c", "resnet101d": "resnet101d",
    "resnet152b": "resnet152", "resnet152c": "resnet152c", "resnet152d": "resnet152d",
}
TORCHVISION = {f"resnet{d}b": f"resnet{d}" for d in (18, 34, 50, 101, 152)}


def _calibrate(model: nn.Module, size: int) -> nn.Module:
    """Give BN layers data-driven statistics and non-trivial affine parameters, then eval mode."""
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(4, 3, size, size))
    return model.eval()


def _assert_same_logits(ours: nn.Module, ref: nn.Module, size: int) -> None:
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ours.eval()(x), ref.eval()(x)
    b = b[0] if isinstance(b, tuple) else b  # timm's inception_v3 with aux_logits returns (logits, aux)
    assert a.shape == b.shape
    assert (a - b).abs().max().item() <= 1e-5, (a - b).abs().max()
    assert b.std() > 1e-2  # the comparison is not between two near-constant outputs


@pytest.mark.parametrize("ours,theirs", sorted(TIMM.items()))
def test_timm_state_dict_loads_strict_same_logits(ours, theirs):
    ref = _calibrate(timm.create_model(theirs, pretrained=False), 64)
    model = create_backbone(ours)
    model.load_state_dict(ref.state_dict(), strict=True)
    _assert_same_logits(model, ref, 64)
    # And the other way round: our state dict is a timm state dict.
    assert list(model.state_dict()) == list(ref.state_dict())


@pytest.mark.parametrize("ours,theirs", sorted(TORCHVISION.items()))
def test_torchvision_state_dict_loads_strict_same_logits(ours, theirs):
    ref = _calibrate(getattr(torchvision.models, theirs)(weights=None), 64)
    model = create_backbone(ours)
    model.load_state_dict(ref.state_dict(), strict=True)
    _assert_same_logits(model, ref, 64)


def test_original_and_b_basic_block_names_are_one_network():
    a, b = create_backbone("resnet34"), create_backbone("resnet34b")
    b.load_state_dict(a.state_dict(), strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(x), b.eval()(x), rtol=0, atol=0)


def test_resnet50d_at_224_and_via_files(tmp_path):
    """Full-size check, through the weights loader (.pth as timm saves it, and our safetensors)."""
    ref = _calibrate(timm.create_model("resnet50d", pretrained=False), 96)
    torch.save(ref.state_dict(), tmp_path / "timm_resnet50d.pth")
    model = create_backbone("resnet50d", weights=str(tmp_path / "timm_resnet50d.pth"))
    _assert_same_logits(model, ref, 224)
    save_weights(model, tmp_path / "ours.safetensors")
    again = create_backbone("resnet50d", weights=str(tmp_path / "ours.safetensors"))
    _assert_same_logits(again, ref, 224)


@pytest.mark.parametrize("source", ["torchvision", "timm"])
def test_inception_v3_weights_load(source):
    if source == "torchvision":
        ref = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=True, transform_input=False)
    else:
        ref = timm.create_model("inception_v3", pretrained=False, aux_logits=True)
    ref = _calibrate(ref, 299)
    model = create_backbone("inception_v3", aux_logits=True)
    load_weights(model, ref.state_dict())
    _assert_same_logits(model, ref, 299)


def test_inception_v3_transform_input_matches_torchvision():
    ref = _calibrate(torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=True,
                                                     transform_input=True), 299)
    model = create_backbone("inception_v3", transform_input=True)
    load_weights(model, ref.state_dict())
    _assert_same_logits(model, ref, 299)


def test_inception_aux_keys_need_aux_logits():
    ref = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
    with pytest.raises(ValueError, match="unexpected keys.*AuxLogits"):
        load_weights(create_backbone("inception_v3"), ref.state_dict())
