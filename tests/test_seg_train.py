"""The plain-PyTorch segmentation engine (segmentation/train.py) on a tiny dataset in the ADE20K layout:
a short run and its files, exact resume (bit for bit, with and without workers), the poly schedule as
logged, and the evaluation against an independent numpy recount."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import segmentation.train as seg_train
from conftest import crash_after_checkpoint
from easy_scenes import SEGMENTATION_LEARN, all_background_scores, write_easy_ade
from runtime.config import load_config
from runtime.distributed import DistInfo
from runtime.schedules import lr_at, scale_lr
from segmentation.metrics import SegmentationMetric
from segmentation.config import (SegDataConfig, SegEvalConfig, SegModelConfig, SegOptimConfig, SegmentationConfig,
                                 SegTrainConfig)

NUM_CLASSES = 4  # annotation values 1..4 (0 = "other", ignored: reduce_zero_label)
GREY_STEP = 50   # the image's grey level is GREY_STEP x the annotation value: the label is readable from it


def write_tiny_ade(root: Path, n_train: int = 6, n_val: int = 3, size=(48, 64), seed: int = 0) -> Path:
    """Images of vertical bands of annotation values 0..4 (grey GREY_STEP x value, plus noise) in the
    ADEChallengeData2016 layout."""
    rng = np.random.default_rng(seed)
    height, width = size
    for folder, tag, n in (("training", "train", n_train), ("validation", "val", n_val)):
        (root / "images" / folder).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / folder).mkdir(parents=True, exist_ok=True)
        for i in range(1, n + 1):
            cuts = np.sort(rng.choice(np.arange(4, width - 4), 4, replace=False))
            values = rng.integers(0, NUM_CLASSES + 1, 5)
            annotation = np.repeat(values[np.searchsorted(cuts, np.arange(width), side="right")][None], height, 0)
            grey = annotation * GREY_STEP + rng.normal(0, 3, (height, width))
            image = np.repeat(grey.clip(0, 255).astype(np.uint8)[..., None], 3, 2)
            Image.fromarray(image).save(root / "images" / folder / f"ADE_{tag}_{i:08d}.jpg", quality=95)
            Image.fromarray(annotation.astype(np.uint8)).save(root / "annotations" / folder / f"ADE_{tag}_{i:08d}.png")
    return root


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return write_tiny_ade(tmp_path_factory.mktemp("ade") / "ADEChallengeData2016")


def tiny_cfg(root: Path, out: Path, *, max_iter: int = 4, workers: int = 0, **train) -> SegmentationConfig:
    return SegmentationConfig(
        model=SegModelConfig(backbone="resnet18d", channels=16, aux_channels=8, kwargs={"width_mult": 0.25}),
        data=SegDataConfig(root=str(root), num_classes=NUM_CLASSES, class_names=["a", "b", "c", "d"],
                           scale=[64, 48], ratio_range=[0.75, 1.25], crop_size=[32, 40], workers=workers),
        optim=SegOptimConfig(lr=0.08, warmup_iters=1, min_lr=1e-3),
        train=SegTrainConfig(**{**dict(max_iter=max_iter, batch_size=2, log_every=1, eval_every=0,
                                       checkpoint_every=2, resume="auto"), **train}),
        eval=SegEvalConfig(overlays=2),
        output_dir=str(out))


@pytest.fixture(scope="module")
def finished_run(data_root, tmp_path_factory):
    cfg = tiny_cfg(data_root, tmp_path_factory.mktemp("run"))
    return cfg, seg_train.train(cfg)


def _records(out: str, kind: str) -> list[dict]:
    lines = (Path(out) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_short_run_trains_evaluates_and_writes_its_files(finished_run):
    cfg, metrics = finished_run
    out = Path(cfg.output_dir)
    assert set(metrics) == {"mIoU", "mAcc", "aAcc", "IoU", "images"}
    assert metrics["images"] == 3 and list(metrics["IoU"]) == ["a", "b", "c", "d"]
    for name in ("config.yaml", "metrics.jsonl", "last.pth", "model_final.pth", "loss.png", "lr.png",
                 "accuracy.png", "overlays/00000.png", "overlays/00001.png"):
        assert (out / name).is_file(), name
    assert not (out / "overlays/00002.png").exists()
    with Image.open(out / "overlays/00000.png") as overlay:
        assert overlay.size == (2 * 64, 48)  # prediction | ground truth at the label size
    train_records, val_records = _records(out, "train"), _records(out, "val")
    assert [r["step"] for r in train_records] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) and r["aux_loss"] > 0 for r in train_records)
    assert [r["step"] for r in val_records] == [4] and val_records[0]["mIoU"] == pytest.approx(metrics["mIoU"])
    final = torch.load(out / "model_final.pth", weights_only=True)
    assert set(final) == set(seg_train.build_model(cfg, pretrained=False).state_dict())

    # a finished run resumed again reports its evaluation without training
    again = seg_train.train(cfg)
    assert again["mIoU"] == metrics["mIoU"] and len(_records(out, "train")) == 4

    # evaluate_checkpoint on model_final.pth (bare state dict) and last.pth (under "model") agree with the run
    for name in ("model_final.pth", "last.pth"):
        assert seg_train.evaluate_checkpoint(cfg, str(out / name))["mIoU"] == pytest.approx(metrics["mIoU"])


def test_a_short_run_beats_the_all_background_prediction(tmp_path):
    """Learning happened: 100 iterations from scratch on eight easy scenes (tests/easy_scenes.py, the same
    images in training and validation) score far above predicting background everywhere, recounted from the
    annotation files (seeds 0-2: mIoU 84.1 / 79.5 / 82.3 against 21.1 / 19.8 / 20.9)."""
    root = write_easy_ade(tmp_path / "ADEChallengeData2016")
    metrics = seg_train.train(load_config(None, SegmentationConfig, [*SEGMENTATION_LEARN, f"data.root={root}",
                                                                     f"output_dir={tmp_path / 'run'}"]))
    baseline = all_background_scores(root)
    assert metrics["images"] == 8 and baseline["mIoU"] < 35
    assert metrics["mIoU"] > baseline["mIoU"] + 30, (metrics, baseline)
    assert metrics["aAcc"] > baseline["aAcc"] + 10, (metrics, baseline)


def test_the_all_background_baseline_is_the_metric_of_an_all_background_prediction(tmp_path):
    """The learning check's baseline, recounted from the PNGs, equals SegmentationMetric given class 0 at
    every pixel of the validation set as the engine reads it."""
    from segmentation.ade20k import ADE20K

    root = write_easy_ade(tmp_path / "ADEChallengeData2016", n=3, seed=1)
    metric = SegmentationMetric(num_classes=3)
    for _, mask in ADE20K(root, "validation", num_classes=3):
        metric.update(torch.zeros_like(mask.as_subclass(torch.Tensor)), mask.as_subclass(torch.Tensor))
    expected, baseline = metric.compute(), all_background_scores(root)
    assert baseline["mIoU"] == pytest.approx(expected["mIoU"]) and baseline["aAcc"] == pytest.approx(expected["aAcc"])
    assert 10 < baseline["mIoU"] < 35 < 50 < baseline["aAcc"] < 90


def test_logged_lr_follows_the_poly_schedule(finished_run):
    cfg, _ = finished_run
    base_lr, min_lr = scale_lr(cfg.optim.lr, 2, 16), scale_lr(cfg.optim.min_lr, 2, 16)
    logged = [(r["step"], r["lr"]) for r in _records(cfg.output_dir, "train")]
    # record "step" n (iterations done) logs the lr iteration n - 1 ran at: warm-up from 0, poly, min_lr last
    expected = [(n, lr_at(n - 1, base_lr=base_lr, total_steps=4, warmup_steps=1, schedule="poly", power=0.9,
                          min_lr=min_lr)) for n in range(1, 5)]
    assert [n for n, _ in logged] == [n for n, _ in expected]
    assert [lr for _, lr in logged] == pytest.approx([lr for _, lr in expected], rel=1e-12)
    assert logged[0][1] == 0 and logged[-1][1] == pytest.approx(min_lr)


def test_photometric_on_the_device_gives_the_workers_batches(tmp_path):
    """data.photometric_on=device: the loader ships the crops and their draws, the loop distorts them on the
    device (here the CPU) into the batches the workers would have made; a run trains to the same weights."""
    from segmentation.transforms import photometric_distortion_batch

    root = write_tiny_ade(tmp_path / "ADEChallengeData2016", n_train=6, n_val=1)
    rng = np.random.default_rng(1)
    for path in (root / "images" / "training").glob("*.jpg"):  # colours, so that saturation and hue matter
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(path, quality=95)
    dist = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    batches, cfgs = {}, {}
    for where in ("workers", "device"):
        cfgs[where] = cfg = tiny_cfg(root, tmp_path / where)
        cfg.data.photometric_on = where
        batches[where] = list(seg_train.build_train_loader(cfg, dist)[0])
    hsv_steps = 0
    for (images, labels, sizes, none), (raw, raw_labels, raw_sizes, draws) in zip(*batches.values()):
        assert none is None and len(draws) == len(raw)
        hsv_steps += sum(d is not None and (d["saturation"] is not None or d["hue"] is not None) for d in draws)
        distorted = photometric_distortion_batch(raw.clone(), draws)
        assert not torch.equal(distorted, raw)
        assert torch.equal(distorted, images) and torch.equal(labels, raw_labels) and torch.equal(sizes, raw_sizes)
    assert hsv_steps >= 2
    for cfg in cfgs.values():
        cfg.train.max_iter, cfg.eval.overlays = 2, 0
        seg_train.train(cfg)
    a, b = (torch.load(Path(c.output_dir) / "model_final.pth", weights_only=True) for c in cfgs.values())
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("workers", [0, 2])
def test_interrupted_and_resumed_run_equals_uninterrupted(data_root, tmp_path, monkeypatch, workers):
    straight = tiny_cfg(data_root, tmp_path / "straight", workers=workers, log_every=2)
    seg_train.train(straight)

    resumed = tiny_cfg(data_root, tmp_path / "resumed", workers=workers, log_every=2)
    # mid-epoch (3 batches per epoch): the run dies right after its checkpoint
    with crash_after_checkpoint(monkeypatch, seg_train, "iteration", 2):
        seg_train.train(resumed)
    assert not (tmp_path / "resumed" / "model_final.pth").exists()
    seg_train.train(resumed)  # train.resume=auto: continues from last.pth at iteration 2

    a = torch.load(tmp_path / "straight" / "model_final.pth", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "model_final.pth", weights_only=True)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    losses = lambda out: [(r["step"], r["loss"]) for r in _records(out, "train")]
    assert losses(tmp_path / "straight") == losses(tmp_path / "resumed")


class _GreyReader(nn.Module):
    """A "model" whose logits are a fixed function of the pixels: the class is the annotation value read
    from the grey level (minus one for reduce_zero_label), except that class 3 is always called class 2."""

    def forward(self, x):
        grey = x[:, 0] * 255  # data.mean 0, std 1: the network input is the image / 255
        cls = (grey / GREY_STEP).round().long().clamp(1, NUM_CLASSES) - 1
        cls = torch.where(cls == 3, torch.full_like(cls, 2), cls)
        return {"out": nn.functional.one_hot(cls, NUM_CLASSES).permute(0, 3, 1, 2).float() * 10}


def test_evaluation_equals_a_numpy_recount(data_root, tmp_path):
    cfg = tiny_cfg(data_root, tmp_path)
    cfg.data.mean, cfg.data.std = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
    cfg.eval.flip = True  # the mirrored view of a pixel-wise model gives the same scores
    metrics = seg_train.evaluate(_GreyReader(), cfg, DistInfo(0, 0, 1, torch.device("cpu")), overlays_dir=tmp_path)

    inter, union, labelled = np.zeros(NUM_CLASSES), np.zeros(NUM_CLASSES), np.zeros(NUM_CLASSES)
    for png in sorted((data_root / "annotations" / "validation").glob("*.png")):
        annotation = np.array(Image.open(png)).astype(np.int64)
        grey = np.array(Image.open(data_root / "images" / "validation" / f"{png.stem}.jpg").convert("RGB"))[..., 0]
        pred = np.clip(np.round(grey.astype(np.float32) / GREY_STEP), 1, NUM_CLASSES).astype(np.int64) - 1
        pred[pred == 3] = 2
        label, valid = annotation - 1, annotation > 0
        for c in range(NUM_CLASSES):
            p, t = (pred == c) & valid, (label == c) & valid
            inter[c] += (p & t).sum()
            union[c] += (p | t).sum()
            labelled[c] += t.sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = 100 * inter / union
    assert metrics["images"] == 3
    assert metrics["IoU"]["d"] == 0  # class 3 is never predicted
    assert [metrics["IoU"][k] for k in "abcd"] == pytest.approx(list(iou), nan_ok=True)
    assert metrics["mIoU"] == pytest.approx(np.nanmean(iou))
    assert metrics["aAcc"] == pytest.approx(100 * inter.sum() / labelled.sum())
    assert 0 < metrics["mIoU"] < 100
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["00000.png", "00001.png"]


class _BenchmarkRecorder(_GreyReader):
    """_GreyReader that records cuDNN's autotuner flag at every forward."""

    def __init__(self):
        super().__init__()
        self.flags = []

    def forward(self, x):
        self.flags.append(torch.backends.cudnn.benchmark)
        return super().forward(x)


@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_whole_image_evaluation_runs_without_the_cudnn_autotuner(data_root, tmp_path, monkeypatch, mode):
    """Whole images differ in size (the autotuner would re-tune for each): off while evaluating, restored
    after; slide windows are crop-sized and keep the run's setting. (CPU here: the flag itself is read.)"""
    cfg = tiny_cfg(data_root, tmp_path)
    cfg.data.mean, cfg.data.std = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
    cfg.eval.mode, cfg.eval.crop_size, cfg.eval.stride = mode, [32, 32], [24, 24]
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    model = _BenchmarkRecorder()
    seg_train.evaluate(model, cfg, DistInfo(0, 0, 1, torch.device("cpu")))
    assert model.flags and set(model.flags) == {mode == "slide"}
    assert torch.backends.cudnn.benchmark is True


def test_scale_schedule_runs_the_recipes_epochs(data_root, tmp_path, caplog):
    """Global batch 4 against the recipe's 16: train.scale_schedule=true runs 4x the iterations and warm-up."""
    cfg = tiny_cfg(data_root, tmp_path, max_iter=1, batch_size=4, checkpoint_every=1, scale_schedule=True)
    with caplog.at_level("WARNING", logger="runtime.schedules"):
        seg_train.train(cfg)
    assert [r["step"] for r in _records(cfg.output_dir, "train")] == [1, 2, 3, 4]
    assert any("runs 4 iterations instead of 1" in r.getMessage() for r in caplog.records)


def test_compiled_run_trains_through_the_compiled_model_as_eager(data_root, tmp_path, monkeypatch):
    """train.compile=true: the training forward runs through torch.compile (here its aot_eager backend: graph capture
    and AOT autograd without inductor's C++ build); the run trains as the eager one does and its checkpoint has the
    plain model's keys (evaluation and checkpoints use the uncompiled module)."""
    compiled, real_compile = [], torch.compile

    def compile_(model, **kwargs):
        compiled.append(model)
        return real_compile(model, backend="aot_eager")

    monkeypatch.setattr(torch, "compile", compile_)
    eager = tiny_cfg(data_root, tmp_path / "eager", max_iter=3, resume=None)
    seg_train.train(eager)
    assert not compiled
    seg_train.train(tiny_cfg(data_root, tmp_path / "compiled", max_iter=3, resume=None, compile=True))
    assert len(compiled) == 1 and isinstance(compiled[0], seg_train.FCN)
    losses = lambda out: [r["loss"] for r in _records(out, "train")]
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), rel=1e-4)
    a = torch.load(tmp_path / "eager" / "model_final.pth", weights_only=True)
    b = torch.load(tmp_path / "compiled" / "model_final.pth", weights_only=True)
    assert a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), atol=1e-4) for k in a)


def test_a_config_built_in_code_is_checked_against_the_bounds_too(data_root, tmp_path):
    """load_config checks the schema's BOUNDS; the engine checks them again for a config built in code (which never
    went through load_config): the periods a loop divides by, and the rest of the table."""
    from runtime.config import ConfigError

    for train, message in (({"log_every": 0}, "train.log_every=0: must be >= 1"),
                           ({"checkpoint_every": -1}, "train.checkpoint_every=-1: must be >= 0"),
                           ({"eval_every": -2}, "train.eval_every=-2: must be >= 0")):
        with pytest.raises(ConfigError, match=message):
            seg_train.train(tiny_cfg(data_root, tmp_path / "run", **train))
    assert not any((tmp_path / "run").rglob("*.pth"))
