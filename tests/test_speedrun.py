"""The time-to-accuracy recipe's pieces (not in the paper): airbench's network and patch whitening,
translate augmentation, the EMA of the weights, each against a reference."""
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from torchvision.transforms.v2 import functional as TF

from backbones import create_backbone, load_state_dict, profile_backbone
from backbones.airbench import patch_whitening_weights
from classification.batch_transforms import BatchAugment, translate
from classification.config import Config, DataConfig
from classification.train import evaluate_checkpoint, train, weight_ema
from classification.transforms import train_transform
from runtime.config import load_config

TINY = [
    "model.name=airbench", "model.kwargs={widths: [8, 16, 16]}", "data.name=synthetic", "data.synthetic_size=96",
    "data.img_size=16", "data.val_resize=16", "data.val_crop=16", "data.workers=0", "data.num_classes=4",
    "data.pipeline=tensor", "data.min_area=1.0", "data.translate=2", "train.batch_size=16", "train.epochs=2",
    "train.log_every=2", "optim.lr=0.4", "optim.warmup_epochs=0.5", "optim.schedule=cosine",
]


def tiny(tmp_path: Path, *extra: str, name: str = "run") -> Config:
    return load_config(None, Config, [*TINY, f"output_dir={tmp_path / name}", *extra])


# ---------------------------------------------------------------------------------------------- the network
def _airbench_reference_whitening(images: torch.Tensor, k: int, eps: float) -> torch.Tensor:
    """airbench94.py's get_patches / get_whitening_parameters / init_whitening_conv, verbatim in substance."""
    c = images.shape[1]
    patches = images.unfold(2, k, 1).unfold(3, k, 1).transpose(1, 3).reshape(-1, c, k, k).double()
    flat = patches.view(patches.shape[0], -1)
    cov = (flat.T @ flat) / flat.shape[0]
    eigenvalues, eigenvectors = torch.linalg.eigh(cov, UPLO="U")
    eigenvalues, eigenvectors = eigenvalues.flip(0).view(-1, 1, 1, 1), eigenvectors.T.reshape(c * k * k, c, k, k).flip(0)
    scaled = eigenvectors / torch.sqrt(eigenvalues + eps)
    return torch.cat((scaled, -scaled)).float()


@pytest.mark.parametrize("channels", [1, 3])
def test_patch_whitening_equals_airbench_and_whitens(channels):
    g = torch.Generator().manual_seed(0)
    # correlated pixels: smoothed noise
    images = nn.functional.avg_pool2d(torch.randn(64, channels, 13, 13, generator=g), 3, 1)
    weight = patch_whitening_weights(images, 2, eps=5e-4)
    ref = _airbench_reference_whitening(images, 2, 5e-4)
    # eigenvectors are defined up to sign: compare filter by filter up to sign
    assert weight.shape == ref.shape == (2 * channels * 4, channels, 2, 2)
    flat, ref_flat = weight.flatten(1), ref.flatten(1)
    signs = torch.sign((flat * ref_flat).sum(1, keepdim=True))
    torch.testing.assert_close(flat, signs * ref_flat, rtol=1e-4, atol=1e-4)
    # without eps, the first half of the output channels is white: second moment = identity
    white = patch_whitening_weights(images, 2, eps=0.0)
    out = nn.functional.conv2d(images, white[: channels * 4]).permute(0, 2, 3, 1).reshape(-1, channels * 4).double()
    moment = out.T @ out / out.shape[0]
    torch.testing.assert_close(moment, torch.eye(channels * 4, dtype=torch.float64), atol=1e-4, rtol=0)


def test_airbench_features_and_frozen_whitening():
    model = create_backbone("airbench", num_classes=10, in_chans=1).eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        feats = model.forward_features(x)
        logits = model(x)
    assert [(f.name, f.channels, f.stride) for f in model.feature_info] == [
        ("block1", 64, 2), ("block2", 256, 4), ("block3", 256, 8)]
    assert [tuple(feats[f.name].shape[1:]) for f in model.feature_info] == [(64, 13, 13), (256, 6, 6), (256, 3, 3)]
    assert logits.shape == (2, 10) and model.num_features == 256
    # the classifier's logits are scaled by 1/9 (airbench)
    with torch.no_grad():
        pooled = feats["block3"].amax((2, 3))
        torch.testing.assert_close(logits, model.fc(pooled) / 9)
    assert not model.whiten.weight.requires_grad and model.whiten.bias.requires_grad
    assert model.whiten.out_channels == 8  # 2 x (1 channel x 2 x 2 patch)
    assert profile_backbone("airbench")["input_size"] == (3, 32, 32)
    plain = create_backbone("airbench", whiten_from_data=False)  # the ablation: an ordinary trained conv
    assert plain.whiten.weight.requires_grad and plain.data_init_images == 0
    for bad in (dict(zero_init_last=True), dict(output_stride=16), dict(widths=(8, 8)), dict(pools=(True, True))):
        with pytest.raises(ValueError):
            create_backbone("airbench", **bad)
    # pools: a block without its max-pool keeps its input's resolution (and the nominal stride says so)
    unpooled = create_backbone("airbench", num_classes=10, in_chans=1, widths=(8, 16, 16), pools=(True, True, False))
    with torch.no_grad():
        feats = unpooled.forward_features(x)
    assert [(f.stride, tuple(feats[f.name].shape[1:])) for f in unpooled.feature_info] == [
        (2, (8, 13, 13)), (4, (16, 6, 6)), (4, (16, 6, 6))]


def test_airbench_dirac_init_and_batchnorm_options_are_airbench94s():
    """airbench94.py's Conv.reset_parameters (dirac_ on the first in_channels filters: each passes its input channel
    through) and its BatchNorm (momentum 0.6 in its convention = torch's 0.4, eps 1e-12, gamma frozen at 1)."""
    from runtime.optim import build_optimizer

    net = create_backbone("airbench", num_classes=10, in_chans=1, widths=(8, 16, 16), dirac_init=True, bn_momentum=0.4,
                          bn_eps=1e-12, bn_weight=False)
    for block in (net.layer1, net.layer2, net.layer3):
        for conv in (block.conv1, block.conv2):
            # filter i < in_channels is the identity on input channel i (3x3 with padding 1): the output equals x
            probe = torch.randn(2, conv.in_channels, 5, 5)
            torch.testing.assert_close(conv(probe)[:, : conv.in_channels], probe)
            if conv.out_channels > conv.in_channels:  # the rest keeps its random init
                assert conv.weight[conv.in_channels :].abs().sum() > 0
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 6 and all(m.momentum == 0.4 and m.eps == 1e-12 and not m.weight.requires_grad for m in bns)
    assert all(m.bias.requires_grad for m in bns)
    # frozen gamma gets no update (plain SGD skips tensors without a gradient) while beta trains
    opt = build_optimizer(net, lr=0.1, weight_decay=1e-3, no_bias_decay=True)
    gamma, beta = bns[0].weight.detach().clone(), bns[0].bias.detach().clone()
    net.train()
    net(torch.randn(4, 1, 28, 28)).sum().backward()
    opt.step()
    assert torch.equal(bns[0].weight, gamma) and not torch.equal(bns[0].bias, beta)
    default = create_backbone("airbench", num_classes=10, in_chans=1, widths=(8, 16, 16))
    assert all(m.momentum == 0.1 and m.eps == 1e-5 and m.weight.requires_grad
               for m in default.modules() if isinstance(m, nn.BatchNorm2d))


def test_trainer_sets_whitening_from_the_unaugmented_training_images(tmp_path, monkeypatch):
    from backbones.airbench import AirbenchNet
    from classification.train import build_data, normalization
    from runtime.distributed import DistInfo

    monkeypatch.setattr(AirbenchNet, "data_init_images", 40)  # of the 96 training images
    cfg = tiny(tmp_path, "train.max_steps=2", "train.epochs=1")
    train(cfg)
    saved = load_state_dict(Path(cfg.output_dir) / "model.safetensors")
    info = DistInfo(0, 0, 1, torch.device("cpu"))
    loader, _, _, val_prepare, _, _ = build_data(cfg, *normalization(cfg), info)
    expected = patch_whitening_weights(val_prepare(loader.images[:40]), 2)  # the first 40, unaugmented
    torch.testing.assert_close(saved["whiten.weight"], expected)


# ---------------------------------------------------------------------------------------------- translate
@pytest.mark.parametrize("dy", range(-2, 3))
@pytest.mark.parametrize("dx", [-2, 0, 1, 2])
def test_translate_equals_a_hand_made_shift(dy, dx):
    images = torch.rand(3, 2, 5, 6)
    out = translate(images, torch.tensor([[dy, dx]] * 3), pad=2)
    padded = np.pad(images.numpy(), ((0, 0), (0, 0), (2, 2), (2, 2)), mode="reflect")
    hand = np.empty_like(images.numpy())
    for i in range(5):
        for j in range(6):
            hand[:, :, i, j] = padded[:, :, i + dy + 2, j + dx + 2]
    np.testing.assert_array_equal(out.numpy(), hand)
    # = torchvision's RandomCrop(padding=2, padding_mode="reflect") at that position
    ref = TF.crop(TF.pad(images, [2], padding_mode="reflect"), 2 + dy, 2 + dx, 5, 6)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def _dot_positions(out: torch.Tensor) -> torch.Tensor:
    flat = out[:, 0].flatten(1).argmax(1)
    return torch.stack([flat // out.shape[-1], flat % out.shape[-1]], 1)


def test_batch_translate_draws_every_offset_uniformly():
    cfg = DataConfig(img_size=9, min_area=1.0, hflip=0.0, translate=2, brightness=0, contrast=0, saturation=0,
                     lighting=0)
    img = torch.zeros(5000, 1, 9, 9, dtype=torch.uint8)
    img[:, :, 4, 4] = 255  # a dot in the centre: where it lands is minus the offset
    torch.manual_seed(0)
    out = BatchAugment(cfg, [0.0], [1.0], 1, train=True)(img)
    offsets = 4 - _dot_positions(out)
    counts = torch.zeros(5, 5)
    for dy, dx in offsets.tolist():
        counts[dy + 2, dx + 2] += 1
    assert counts.min() > 0 and (counts / 5000 - 1 / 25).abs().max() < 0.015
    assert out.sum((1, 2, 3)).eq(1).all()  # a shift, nothing else: the dot stays one pixel of 1.0


def test_samples_pipeline_translates_alike():
    cfg = DataConfig(img_size=9, min_area=1.0, hflip=0.0, translate=2, brightness=0, contrast=0, saturation=0,
                     lighting=0)
    tf = train_transform(cfg, [0.0], [1.0], in_chans=1)
    img = torch.zeros(1, 9, 9, dtype=torch.uint8)
    img[:, 4, 4] = 255
    torch.manual_seed(0)
    out = torch.stack([tf(img) for _ in range(400)])
    offsets = 4 - _dot_positions(out)
    assert set(map(tuple, offsets.tolist())) == {(a, b) for a in range(-2, 3) for b in range(-2, 3)}


# ---------------------------------------------------------------------------------------------- weight EMA
def test_weight_ema_is_the_hand_computed_average_of_weights_and_bn_statistics():
    from timm.utils import ModelEmaV2

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    decay = 0.8
    ema = weight_ema(model, decay)
    timm_ema, hand = None, None
    for _ in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model.train()(torch.randn(4, 1, 5, 5))  # moves the BN statistics
        ema.update_parameters(model)
        state = {k: v.clone().double() for k, v in model.state_dict().items() if v.is_floating_point()}
        if hand is None:  # the first update copies the weights (torch AveragedModel)
            hand, timm_ema = state, ModelEmaV2(model, decay=decay)
        else:
            hand = {k: decay * hand[k] + (1 - decay) * state[k] for k in hand}
            timm_ema.update(model)
    got = ema.module.state_dict()
    for k in hand:
        torch.testing.assert_close(got[k].double(), hand[k], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got[k], timm_ema.module.state_dict()[k], rtol=1e-6, atol=1e-6)
    with pytest.raises(Exception, match="ema_decay"):
        weight_ema(model, 1.0)


def test_training_with_ema_evaluates_and_saves_the_averaged_weights_and_resumes_exactly(tmp_path):
    metrics = train(cfg := tiny(tmp_path, "train.ema_decay=0.9", "train.epochs=2", name="full"))
    out = Path(cfg.output_dir)
    ckpt = torch.load(out / "last.pth", weights_only=True)
    saved = load_state_dict(out / "model.safetensors")
    ema_weights = {k.removeprefix("module."): v for k, v in ckpt["ema"].items() if k.startswith("module.")}
    assert saved.keys() == ema_weights.keys()
    for k in saved:
        torch.testing.assert_close(saved[k], ema_weights[k], rtol=0, atol=0)
    # the averaged weights differ from the last raw weights, and they are the ones evaluated
    assert not torch.equal(saved["layer1.conv1.weight"], ckpt["model"]["layer1.conv1.weight"])
    assert evaluate_checkpoint(cfg, str(out / "model.safetensors"))["top1"] == pytest.approx(metrics["top1"])

    part = tiny(tmp_path, "train.ema_decay=0.9", "train.epochs=2", name="part")

    class Stop(Exception):
        pass

    def stop(epoch, _):
        if epoch == 0:
            raise Stop

    with pytest.raises(Stop):
        train(part, callbacks=[stop])
    train(tiny(tmp_path, "train.ema_decay=0.9", "train.epochs=2", "train.resume=auto", name="part"))
    resumed = load_state_dict(Path(part.output_dir) / "model.safetensors")
    for k in saved:
        assert torch.equal(saved[k], resumed[k]), k
    # a checkpoint without an average cannot resume a run with one
    train(tiny(tmp_path, "train.max_steps=1", "train.epochs=1", name="noema"))
    with pytest.raises(Exception, match="ema_decay"):
        train(tiny(tmp_path, "train.ema_decay=0.9", f"train.resume={tmp_path / 'noema' / 'last.pth'}", name="other"))


def test_weight_ema_update_reads_nothing_from_the_device_and_loads_averaged_model_state(monkeypatch):
    """No host sync per update (torch's AveragedModel reads ``n_averaged`` each time), and a checkpoint of
    torch's AveragedModel (the format train.ema_decay wrote before) loads and continues identically."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    ema = weight_ema(model, 0.9)
    theirs = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    reads = []
    for name in ("item", "__bool__", "__int__", "__float__", "cpu", "tolist"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda t, *a, _n=name, _o=original, **k: reads.append(_n) or _o(t, *a, **k))
    for _ in range(2):
        with torch.no_grad():
            model[0].weight.add_(1.0)
        ema.update_parameters(model)
    assert reads == []
    monkeypatch.undo()
    for _ in range(2):
        with torch.no_grad():
            model[0].weight.add_(1.0)
        theirs.update_parameters(model)
    resumed = weight_ema(model, 0.9)
    resumed.load_state_dict(theirs.state_dict())  # AveragedModel's keys: module.* and n_averaged
    with torch.no_grad():
        model[0].weight.add_(1.0)
    for avg in (resumed, theirs):
        avg.update_parameters(model)
    assert not torch.allclose(resumed.module[0].weight, model[0].weight)  # averaged, not copied
    torch.testing.assert_close(resumed.module[0].weight, theirs.module[0].weight)
