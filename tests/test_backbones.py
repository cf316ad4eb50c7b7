"""The backbone registry: architectures of the paper, feature contract, init, freezing.

Weight compatibility with timm / torchvision is in test_backbone_compat.py.
"""
import math

import pytest
import torch
import torch.nn as nn
import torchvision

import backbones
from backbones import FrozenBatchNorm2d, create_backbone, list_backbones, profile_backbone, register_backbone
from backbones.resnet import Bottleneck

ALL = list_backbones()


def _input(name: str, size: int | None = None) -> torch.Tensor:
    size = size or (299 if name.startswith("inception") else 64)  # small sizes; inception at its own
    return torch.randn(2, 3, size, size)


def test_registry_names():
    expected = {f"resnet{d}{v}" for d in (18, 34, 50, 101, 152) for v in ("", "b", "c", "d")}
    assert expected | {"mobilenet", "inception_v3", "airbench"} == set(ALL)


def test_register_duplicate_raises():
    with pytest.raises(ValueError, match="already registered"):
        register_backbone(lambda **kw: None, name="resnet50d")


def test_unknown_name_suggests():
    with pytest.raises(KeyError, match="resnet50d"):
        create_backbone("resnet50dd")


@pytest.mark.parametrize("name", [n for n in ALL if n != "airbench"])  # airbench: block1..3, test_speedrun.py
def test_feature_contract(name):
    """feature_info is declared at build time and matches what forward_features returns."""
    model = create_backbone(name, num_classes=7).eval()
    x = _input(name)
    with torch.no_grad():
        feats = model.forward_features(x)
        logits = model(x)
    assert list(feats) == [f.name for f in model.feature_info] == ["res2", "res3", "res4", "res5"]
    assert [f.stride for f in model.feature_info] == [4, 8, 16, 32]
    for info in model.feature_info:
        f = feats[info.name]
        assert f.shape[:2] == (2, info.channels), info
        if name.startswith("inception"):  # valid-padding convs: nominal stride up to rounding
            assert round(math.log2(x.shape[-1] / f.shape[-1])) == math.log2(info.stride)
        else:
            assert f.shape[-1] == math.ceil(x.shape[-1] / info.stride), info
    assert model.num_features == model.feature_info[-1].channels
    assert logits.shape == (2, 7)


@pytest.mark.parametrize("name", ["resnet18d", "resnet50", "resnet50d", "mobilenet"])
@pytest.mark.parametrize("output_stride", [16, 8])
def test_dilation(name, output_stride):
    model = create_backbone(name, output_stride=output_stride).eval()
    expected = {16: [4, 8, 16, 16], 8: [4, 8, 8, 8]}[output_stride]
    assert [f.stride for f in model.feature_info] == expected
    x = _input(name)
    with torch.no_grad():
        feats = model.forward_features(x)
    for info in model.feature_info:
        assert feats[info.name].shape[-1] == math.ceil(x.shape[-1] / info.stride)
    # Parameters are unchanged by dilation: same state dict shapes as the stride-32 network.
    ref = create_backbone(name).state_dict()
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in ref.items()}


def test_dilation_layout_fcn_d8():
    """output_stride 8: dilation 2 in res4 and 4 in res5; the first block keeps the previous dilation."""
    m = create_backbone("resnet50d", output_stride=8)
    assert m.layer3[0].conv2.dilation == (1, 1) and m.layer3[1].conv2.dilation == (2, 2)
    assert m.layer4[0].conv2.dilation == (2, 2) and m.layer4[2].conv2.dilation == (4, 4)
    assert all(c.stride == (1, 1) for c in (m.layer3[0].conv2, m.layer4[0].conv2))


def test_inception_rejects_dilation():
    with pytest.raises(ValueError, match="output_stride"):
        create_backbone("inception_v3", output_stride=8)


@pytest.mark.parametrize("width", [0.25, 0.5])
def test_inception_width_mult_scales_every_conv(width):
    """Every conv of torchvision's Inception3 (same names, kernels, strides, paddings) at width x its channels,
    except the image channels of the first; the features and the classifier follow."""
    ref = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False)
    model = create_backbone("inception_v3", width_mult=width, num_classes=10, in_chans=1)
    ref_convs = {n: m for n, m in ref.named_modules() if isinstance(m, nn.Conv2d)}
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert convs.keys() == ref_convs.keys()
    for n, m in convs.items():
        r = ref_convs[n]
        cin = 1 if n == "Conv2d_1a_3x3.conv" else r.in_channels * width
        assert (m.in_channels, m.out_channels) == (cin, r.out_channels * width), n
        assert (m.kernel_size, m.stride, m.padding) == (r.kernel_size, r.stride, r.padding), n
    assert model.fc.in_features == 2048 * width == model.num_features
    feats = model.forward_features(torch.randn(2, 1, 75, 75))
    assert [feats[f.name].shape[1] for f in model.feature_info] == [c * width for c in (192, 288, 768, 2048)]
    assert model(torch.randn(2, 1, 75, 75)).shape == (2, 10)


def test_inception_width_mult_errors():
    with pytest.raises(ValueError, match="multiple of 1/16"):
        create_backbone("inception_v3", width_mult=0.3)
    with pytest.raises(ValueError, match="aux_logits"):
        create_backbone("inception_v3", width_mult=0.5, aux_logits=True)


def test_variants_follow_the_paper():
    orig, b, c, d = (create_backbone(f"resnet50{v}") for v in ("", "b", "c", "d"))
    # Original: stride 2 on the first 1x1 conv of path A; B: on the 3x3.
    assert orig.layer2[0].conv1.stride == (2, 2) and orig.layer2[0].conv2.stride == (1, 1)
    assert b.layer2[0].conv1.stride == (1, 1) and b.layer2[0].conv2.stride == (2, 2)
    # C: deep stem, three 3x3 convs of 32, 32, 64 channels, the first with stride 2.
    convs = [m for m in c.conv1 if isinstance(m, nn.Conv2d)]
    assert [(m.out_channels, m.kernel_size, m.stride) for m in convs] == [
        (32, (3, 3), (2, 2)), (32, (3, 3), (1, 1)), (64, (3, 3), (1, 1))]
    assert isinstance(b.conv1, nn.Conv2d) and b.conv1.kernel_size == (7, 7)
    # D: path B = 2x2 avg pool stride 2, then a stride-1 1x1 conv.
    pool, conv = d.layer2[0].downsample[0], d.layer2[0].downsample[1]
    assert isinstance(pool, nn.AvgPool2d) and pool.kernel_size == 2 and pool.stride == 2
    assert conv.kernel_size == (1, 1) and conv.stride == (1, 1)
    assert c.layer2[0].downsample[0].stride == (2, 2)
    # The tweaks keep (almost) the parameter count: Table 5 lists 25M for all four.
    counts = [backbones.count_params(m) for m in (orig, b, c, d)]
    assert counts[0] == counts[1] and counts[2] == counts[3] and abs(counts[2] - counts[0]) < 0.1e6


def test_macs_match_references():
    """Multiply-adds from torch's FLOP counter against published numbers."""
    from torchvision.models import Inception_V3_Weights, ResNet50_Weights

    # Table 5 of the paper: ResNet-50 (original) 3.86 G.
    assert profile_backbone("resnet50")["macs"] / 1e9 == pytest.approx(3.86, abs=0.005)
    # torchvision's resnet50 (= our resnet50b) and inception_v3 metadata ("_ops" = GFLOPs as multiply-adds).
    assert profile_backbone("resnet50b")["macs"] / 1e9 == pytest.approx(ResNet50_Weights.IMAGENET1K_V1.meta["_ops"], abs=1e-3)
    assert profile_backbone("inception_v3")["macs"] / 1e9 == pytest.approx(Inception_V3_Weights.IMAGENET1K_V1.meta["_ops"], abs=1e-2)
    # MobileNet paper (Howard et al. 2017, Table 8): 1.0 MobileNet-224 has 569 M mult-adds, 4.2 M parameters.
    prof = profile_backbone("mobilenet")
    assert prof["macs"] / 1e6 == pytest.approx(569, abs=1) and prof["params"] / 1e6 == pytest.approx(4.2, abs=0.05)
    # Width 0.5: 150 M mult-adds, 1.3 M parameters (same table).
    prof = profile_backbone("mobilenet", width_mult=0.5)
    assert prof["macs"] / 1e6 == pytest.approx(150, abs=2) and prof["params"] / 1e6 == pytest.approx(1.3, abs=0.05)


def test_xavier_init_and_bn():
    model = create_backbone("resnet50d")
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            fan_in = m.weight[0].numel()
            fan_out = m.weight.shape[0] * m.weight[0, 0].numel()
            bound = math.sqrt(6 / (fan_in + fan_out))
            assert m.weight.abs().max() <= bound
            if m.weight.numel() > 10_000:
                assert m.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    assert torch.all(model.fc.bias == 0)
    kaiming = create_backbone("resnet50d", init="kaiming")
    w = kaiming.layer1[0].conv2.weight
    assert w.std().item() == pytest.approx(math.sqrt(2 / (w.shape[0] * 9)), rel=0.05)


@pytest.mark.parametrize("name,last", [("resnet50d", "bn3"), ("resnet18d", "bn2")])
def test_zero_gamma(name, last):
    model = create_backbone(name, zero_init_last=True)
    blocks = [m for m in model.modules() if hasattr(m, "last_norm")]
    assert blocks
    for block in blocks:
        assert torch.all(getattr(block, last).weight == 0)
        assert torch.all(block.bn1.weight == 1)
    # The zero-gamma network is an identity on each residual branch at init.
    block = model.layer1[1]
    x = torch.randn(1, block.conv1.in_channels, 8, 8).relu()
    assert torch.equal(block.eval()(x), x)


def test_zero_gamma_rejected_without_residual_blocks():
    with pytest.raises(ValueError, match="residual"):
        create_backbone("mobilenet", zero_init_last=True)


def test_frozen_stages_and_norm_eval():
    model = create_backbone("resnet50d", frozen_stages=1)
    frozen = [model.conv1, model.bn1, model.layer1]
    for mod in frozen:
        assert all(not p.requires_grad for p in mod.parameters())
    assert all(p.requires_grad for p in model.layer2.parameters())
    model.train()
    assert not model.layer1[0].bn1.training and model.layer2[0].bn1.training
    before = model.layer1[0].bn1.running_mean.clone()
    model(torch.randn(2, 3, 64, 64))
    assert torch.equal(model.layer1[0].bn1.running_mean, before)

    model = create_backbone("resnet18d", norm_eval=True).train()
    assert all(not m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert model.layer4.training
    with pytest.raises(ValueError, match="frozen_stages"):
        create_backbone("resnet18d", frozen_stages=5)


@pytest.mark.parametrize("name", ["resnet50d", "mobilenet", "inception_v3"])
def test_frozen_batchnorm_matches_bn_eval(name):
    model = create_backbone(name).eval()
    with torch.no_grad():  # non-trivial statistics
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    frozen = backbones.convert_norm(create_backbone(name).eval(), "frozenbatchnorm")
    frozen.load_state_dict(model.state_dict())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in frozen.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in frozen.modules())
    x = _input(name)
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), model(x), rtol=1e-4, atol=1e-5)
    # norm_layer given as a string converts after build; as a callable it is built in.
    m = create_backbone("resnet18d", norm_layer="frozenbatchnorm")
    assert isinstance(m.bn1, FrozenBatchNorm2d)
    m = create_backbone("resnet18d", norm_layer=lambda c: nn.GroupNorm(8, c))
    assert isinstance(m.layer1[0].bn1, nn.GroupNorm)


def test_in_chans_and_headless():
    model = create_backbone("resnet18d", in_chans=1, num_classes=0).eval()
    out = model(torch.randn(2, 1, 32, 32))
    assert out.shape == (2, 512)


def test_bottleneck_original_vs_b_same_shapes():
    orig, b = create_backbone("resnet101"), create_backbone("resnet101b")
    assert {k: v.shape for k, v in orig.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
    assert isinstance(orig.layer3[0], Bottleneck)


def test_width_mult_scales_channels():
    model = create_backbone("resnet18d", width_mult=0.5, in_chans=1, num_classes=10).eval()
    assert [f.channels for f in model.feature_info] == [32, 64, 128, 256]
    assert model.conv1[0].out_channels == 16 and model.conv1[6].out_channels == 32
    with torch.no_grad():
        feats = model.forward_features(torch.randn(2, 1, 42, 42))
    assert [feats[f.name].shape[1] for f in model.feature_info] == [32, 64, 128, 256]


def test_stem_without_pool_halves_every_stride():
    """stem_pool=False on a 28 px image gives the feature maps of the pooled stem on 56 px."""
    pooled = create_backbone("resnet18d", width_mult=0.5, in_chans=1, num_classes=10).eval()
    unpooled = create_backbone("resnet18d", width_mult=0.5, in_chans=1, num_classes=10, stem_pool=False).eval()
    assert [f.stride for f in pooled.feature_info] == [4, 8, 16, 32]
    assert [f.stride for f in unpooled.feature_info] == [2, 4, 8, 16]
    assert unpooled.variant["stem_pool"] is False and "stem_pool" not in pooled.variant
    unpooled.load_state_dict(pooled.state_dict())  # same parameters: the pool has none
    with torch.no_grad():
        a = pooled.forward_features(torch.randn(2, 1, 56, 56))
        b = unpooled.forward_features(torch.randn(2, 1, 28, 28))
    assert [t.shape[-1] for t in a.values()] == [t.shape[-1] for t in b.values()] == [14, 7, 4, 2]
    dilated = create_backbone("resnet18d", stem_pool=False, output_stride=8).eval()
    with torch.no_grad():
        feats = dilated.forward_features(torch.randn(1, 3, 64, 64))
    assert [t.shape[-1] for t in feats.values()] == [32, 16, 8, 8]


def test_unknown_builder_argument_names_backbone():
    from backbones import BackboneArgumentError
    with pytest.raises(BackboneArgumentError, match="mobilenet.*stem_pool"):
        create_backbone("mobilenet", stem_pool=False)
