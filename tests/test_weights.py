"""Weights I/O: safetensors with metadata, suite checkpoints, prefixes, pickle opt-in, clear errors."""

import pytest
import torch

from backbones import create_backbone, load_state_dict, load_weights, read_metadata, save_weights


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_safetensors_roundtrip_with_metadata(tmp_path):
    model = create_backbone("resnet18d", num_classes=10)
    path = save_weights(model, tmp_path / "w.safetensors", metadata={"top1": 91.5, "provenance": "unit test"})
    meta = read_metadata(path)
    assert meta["architecture"] == "resnet18d"
    assert meta["variant"] == {"depth": 18, "stem": "deep", "downsample_in": "3x3", "avg_down": True}
    assert meta["num_classes"] == 10 and meta["top1"] == 91.5 and meta["provenance"] == "unit test"
    assert meta["input_size"] == [3, 224, 224] and len(meta["mean"]) == 3 and len(meta["std"]) == 3
    _same_state(model, create_backbone("resnet18d", num_classes=10, weights=str(path)))
    assert not list(tmp_path.glob("*.tmp"))  # atomic write leaves no temporary file


def test_suite_checkpoint_and_ddp_prefix(tmp_path):
    model = create_backbone("resnet18d", num_classes=10)
    wrapped = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"model": wrapped, "epoch": 3, "optimizer": {"state": {}}}, tmp_path / "ckpt.pth")
    _same_state(model, create_backbone("resnet18d", num_classes=10, weights=str(tmp_path / "ckpt.pth")))


def test_finetune_head_is_reinitialised_when_asked(tmp_path):
    model = create_backbone("resnet18d", num_classes=1000)
    save_weights(model, tmp_path / "in1k.safetensors")
    tuned = create_backbone("resnet18d", num_classes=5, weights=str(tmp_path / "in1k.safetensors"), new_head=True)
    assert tuned.fc.weight.shape == (5, 512)
    assert torch.equal(tuned.layer4[1].conv2.weight, model.layer4[1].conv2.weight)
    headless = create_backbone("resnet18d", num_classes=0, weights=str(tmp_path / "in1k.safetensors"), new_head=True)
    assert torch.equal(headless.conv1[0].weight, model.conv1[0].weight)


def test_classifier_of_another_size_is_an_error_naming_both_sizes(tmp_path):
    """Before: silently a random head (a distillation teacher or `tricks eval` then scored noise)."""
    save_weights(create_backbone("resnet18d", num_classes=1000), tmp_path / "in1k.safetensors")
    with pytest.raises(ValueError, match=r"1000-class classifier but the model has a 5-class one"):
        create_backbone("resnet18d", num_classes=5, weights=str(tmp_path / "in1k.safetensors"))
    with pytest.raises(ValueError, match=r"1000-class classifier but the model has none"):
        create_backbone("resnet18d", num_classes=0, weights=str(tmp_path / "in1k.safetensors"))


def test_one_channel_stem_spreads_over_rgb_exactly(tmp_path):
    """Fashion-MNIST (1 channel) weights in a 3-channel network: the same output on a grey image as 3 channels."""
    grey = create_backbone("resnet18d", num_classes=10, in_chans=1).eval()
    save_weights(grey, tmp_path / "grey.safetensors")
    with pytest.raises(ValueError, match="shape mismatches"):
        create_backbone("resnet18d", num_classes=10, in_chans=3, weights=str(tmp_path / "grey.safetensors"))
    rgb = create_backbone("resnet18d", num_classes=10, in_chans=3, weights=str(tmp_path / "grey.safetensors"),
                          adapt_input=True).eval()
    x = torch.randn(2, 1, 64, 64)
    torch.testing.assert_close(rgb(x.expand(-1, 3, -1, -1)), grey(x), rtol=1e-5, atol=1e-5)


def test_wrong_architecture_lists_keys(tmp_path):
    save_weights(create_backbone("resnet18b"), tmp_path / "b.safetensors")
    with pytest.raises(ValueError) as e:
        create_backbone("resnet18d", weights=str(tmp_path / "b.safetensors"))
    msg = str(e.value)
    assert "missing keys" in msg and "conv1.0.weight" in msg
    assert "unexpected keys" in msg and "conv1.weight" in msg
    assert "b.safetensors" in msg


def test_shape_mismatch_is_reported():
    state = create_backbone("resnet18d").state_dict()
    state["layer1.0.conv1.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"shape mismatches.*layer1\.0\.conv1\.weight"):
        load_weights(create_backbone("resnet18d"), state)


class _Custom:  # an arbitrary object: needs full unpickling
    pass


def test_pickle_needs_opt_in(tmp_path):
    state = create_backbone("resnet18d").state_dict()
    torch.save({"model": state, "extra": _Custom()}, tmp_path / "pickled.pth")
    with pytest.raises(ValueError, match="allow_pickle=True"):
        load_state_dict(tmp_path / "pickled.pth")
    loaded = load_state_dict(tmp_path / "pickled.pth", allow_pickle=True)
    assert loaded.keys() == state.keys()


def test_missing_file_and_non_state_dict(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_state_dict(tmp_path / "nope.pth")
    torch.save({"a": 1}, tmp_path / "x.pth")
    with pytest.raises(ValueError, match="state dict"):
        load_state_dict(tmp_path / "x.pth")


def test_what_a_load_changed_is_logged_only_once_it_succeeded(tmp_path, caplog):
    """"no classifier in the file" (and the other notes) after the load, never before its error: a headless file
    into a 5-class model of another width is one error, without a note that its head was kept."""
    import logging

    save_weights(create_backbone("resnet18d", num_classes=0), tmp_path / "headless.safetensors")
    with caplog.at_level(logging.INFO, logger="backbones"):
        with pytest.raises(ValueError, match="do not fit"):
            create_backbone("resnet18d", num_classes=5, width_mult=0.5, weights=str(tmp_path / "headless.safetensors"),
                            new_head=True)
        assert "no classifier" not in caplog.text
        create_backbone("resnet18d", num_classes=5, weights=str(tmp_path / "headless.safetensors"), new_head=True)
        assert "headless.safetensors: no classifier in the file; the model's keeps its initialisation" in caplog.text
