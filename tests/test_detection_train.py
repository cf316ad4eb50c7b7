"""The torchvision detection engine on a miniature VOCdevkit: training runs, evaluates, resumes exactly."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import detection.train as train_mod
from conftest import crash_after_checkpoint
from detection.config import DetectionConfig
from detection.train import evaluate_checkpoint, train_detector
from detection.voc import VOC_CLASSES
from easy_scenes import DETECTION_LEARN, SHAPES, random_boxes_map, write_easy_voc
from test_voc import write_set
from runtime.config import load_config


def make_devkit(root: Path, n: int = 8) -> Path:
    """Images with one bright square (a "dog") or a dark bar (a "cat") on noise."""
    rng = np.random.default_rng(0)
    for year, split, ids in (("2007", "trainval", [f"{i:06d}" for i in range(n)]),
                             ("2007", "test", [f"{i:06d}" for i in range(100, 104)])):
        base = root / f"VOC{year}"
        for sub in ("Annotations", "ImageSets/Main", "JPEGImages"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        for k, image_id in enumerate(ids):
            img = rng.integers(0, 60, (64, 64, 3), dtype=np.uint8)
            x, y = int(rng.integers(2, 30)), int(rng.integers(2, 30))
            name = "dog" if k % 2 == 0 else "cat"
            w, h = (24, 24) if name == "dog" else (30, 12)
            img[y:y + h, x:x + w] = 230 if name == "dog" else 120
            Image.fromarray(img).save(base / "JPEGImages" / f"{image_id}.jpg", quality=95)
            (base / "Annotations" / f"{image_id}.xml").write_text(
                f"<annotation><size><width>64</width><height>64</height><depth>3</depth></size><object>"
                f"<name>{name}</name><difficult>0</difficult><bndbox><xmin>{x + 1}</xmin><ymin>{y + 1}</ymin>"
                f"<xmax>{x + w}</xmax><ymax>{y + h}</ymax></bndbox></object></annotation>")
        write_set(root, year, split, ids)
    return root


TINY = ["model.backbone=resnet18d", "model.norm=batchnorm", "model.frozen_stages=-1", "model.min_size_train=[64]",
        "model.min_size_test=64", "model.max_size=64", "data.workers=0", "train.batch_size=2", "train.max_iter=6",
        "train.log_every=2", "train.checkpoint_every=3", "optim.lr=0.02", "optim.warmup_iters=2",
        "optim.milestones=[4]", "data.train_splits=2007-trainval"]


def tiny(tmp_path: Path, *extra: str, name: str = "run") -> DetectionConfig:
    devkit = tmp_path / "VOCdevkit"
    if not devkit.exists():
        make_devkit(devkit)
    return load_config(None, DetectionConfig, [*TINY, f"data.root={devkit}", f"output_dir={tmp_path / name}", *extra])


def test_a_short_run_beats_random_boxes(tmp_path):
    """Learning happened: 100 iterations from scratch on eight easy scenes (tests/easy_scenes.py, the same
    images in trainval and test) score far above random boxes (seeds 0-2: 87.3 / 94.5 / 75.6 against 0.8 /
    0.8 / 0.1 VOC07 mAP)."""
    devkit = write_easy_voc(tmp_path / "VOCdevkit")
    metrics = train_detector(load_config(None, DetectionConfig, [*DETECTION_LEARN, f"data.root={devkit}",
                                                                 f"output_dir={tmp_path / 'run'}"]))
    baseline = random_boxes_map(devkit, SHAPES)
    assert metrics["images"] == 8 and baseline < 5
    assert metrics["mAP"] > max(3 * baseline, baseline + 30), (metrics["mAP"], baseline)


def test_training_writes_artefacts_and_reports_voc_map(tmp_path):
    cfg = tiny(tmp_path)
    metrics = train_detector(cfg)
    out = Path(cfg.output_dir)
    for name in ("config.yaml", "last.pth", "model_final.pth", "metrics.jsonl"):
        assert (out / name).is_file(), name
    assert metrics["images"] == 4
    assert set(metrics["AP"]) == set(VOC_CLASSES)
    assert np.isnan(metrics["AP"]["car"])  # no car in the test set: left out of the mean
    again = evaluate_checkpoint(cfg, str(out / "model_final.pth"))
    assert again["mAP"] == pytest.approx(metrics["mAP"])
    # Resuming a finished run trains nothing and reports the same result.
    finished = load_config(out / "config.yaml", DetectionConfig, ["train.resume=auto"])
    assert train_detector(finished)["mAP"] == pytest.approx(metrics["mAP"])


def test_resume_inside_an_epoch_is_exact(tmp_path, monkeypatch):
    """8 images, batch 2: 4 iterations per epoch; interrupted after the checkpoint at iteration 3
    (mid-epoch, random flips on) and resumed to 6 == uninterrupted, bit for bit."""
    full = tiny(tmp_path, "data.hflip=0.5", name="full")
    train_detector(full)

    with crash_after_checkpoint(monkeypatch, train_mod, "iteration", 3):
        train_detector(tiny(tmp_path, "data.hflip=0.5", name="part"))
    resumed = tiny(tmp_path, "data.hflip=0.5", "train.resume=auto", name="part")
    train_detector(resumed)
    a = torch.load(Path(full.output_dir) / "model_final.pth", weights_only=True)
    b = torch.load(Path(resumed.output_dir) / "model_final.pth", weights_only=True)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_scale_schedule_runs_the_recipes_epochs(tmp_path, caplog):
    """Global batch 2 against the recipe's 16: train.scale_schedule=true runs 8x the iterations, milestones too."""
    cfg = tiny(tmp_path, "train.max_iter=2", "optim.warmup_iters=0", "optim.milestones=[1]", "train.log_every=1",
               "train.scale_schedule=true", "train.visualize=0")
    with caplog.at_level("WARNING", logger="runtime.schedules"):
        train_detector(cfg)
    lines = [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["kind"] == "train"] == list(range(1, 17))
    lrs = [r["lr"] for r in lines if r["kind"] == "train"]  # each record: the lr its iteration used
    assert lrs == pytest.approx([0.02 * 2 / 16] * 8 + [0.02 * 2 / 16 * 0.1] * 8)  # the milestone 1 -> 8
    assert any("runs 16 iterations instead of 2" in r.getMessage() for r in caplog.records)


def test_sync_bn_under_ddp_converts_the_trainable_bn(tmp_path):
    """model.sync_bn=true: every BatchNorm2d becomes SyncBatchNorm in a distributed run (on CUDA), none in one
    process; refused with frozen BN (nothing to synchronise) and on CPU (no kernel)."""
    from torch import nn

    from detection.config import check_sync_bn
    from detection.train import build_model, sync_batchnorm
    from runtime.distributed import DistInfo

    cfg = tiny(tmp_path, "model.sync_bn=true")
    count = lambda model, kind: sum(isinstance(m, kind) for m in model.modules())
    model = build_model(cfg, num_classes=20)
    bn = count(model, nn.BatchNorm2d)
    assert bn > 0
    ddp = sync_batchnorm(model, cfg, DistInfo(0, 0, 2, torch.device("cuda", 0)))
    assert count(ddp, nn.SyncBatchNorm) == bn and count(ddp, nn.BatchNorm2d) == 0
    assert count(sync_batchnorm(build_model(cfg, 20), cfg, DistInfo(0, 0, 1, torch.device("cuda", 0))),
                 nn.SyncBatchNorm) == 0
    check_sync_bn(cfg.model, cuda=True)
    with pytest.raises(ValueError, match="needs CUDA"):
        train_detector(cfg)
    with pytest.raises(ValueError, match="model.norm=batchnorm"):
        check_sync_bn(tiny(tmp_path, "model.sync_bn=true", "model.norm=frozenbatchnorm").model, cuda=True)


def test_frozen_bn_without_weights_is_refused(tmp_path):
    with pytest.raises(ValueError, match="model.weights"):
        train_detector(tiny(tmp_path, "model.norm=frozenbatchnorm"))


def test_cli_train_then_eval(tmp_path, capsys):
    from tricks.cli import main

    cfg = tiny(tmp_path)
    overrides = [*TINY, f"data.root={cfg.data.root}", f"output_dir={cfg.output_dir}", "train.max_iter=2",
                 "model.weights=null"]
    config = Path(__file__).resolve().parents[1] / "configs/detection/faster-rcnn_resnet50d-fpn_8xb2-18k_voc0712.yaml"
    assert main(["train", str(config), *overrides]) == 0
    assert "VOC07 mAP" in capsys.readouterr().out
    results = tmp_path / "results"
    assert main(["eval", str(config), str(Path(cfg.output_dir) / "model_final.pth"), *overrides,
                 "--write-results", str(results)]) == 0
    out = capsys.readouterr().out
    assert "aeroplane" in out and "VOC07 mAP" in out
    # the written results scored by the devkit-format scorer give the engine's mAP
    headline = next(line for line in out.splitlines() if line.startswith("VOC07 mAP")).split()
    engine_map, engine_ap, engine_ap75 = (float(headline[i][:-1]) for i in (2, 4, 6))
    assert main(["voc-eval", "--devkit", str(cfg.data.root), "--year", "2007", "--split", "test",
                 "--results", str(results), "--use-07-metric", "--json"]) == 0
    import json
    doc = json.loads(capsys.readouterr().out)
    assert 100 * doc["map_voc07"] == pytest.approx(engine_map, abs=0.006)
    assert 100 * doc["ap"] == pytest.approx(engine_ap, abs=0.006)
    assert 100 * doc["ap75"] == pytest.approx(engine_ap75, abs=0.006)
    assert main(["train", str(config), "train.max_iters=3"]) == 2  # a config error: one line, status 2


def test_shipped_config_is_the_paper_setting():
    config = Path(__file__).resolve().parents[1] / "configs/detection/faster-rcnn_resnet50d-fpn_8xb2-18k_voc0712.yaml"
    cfg = load_config(config, DetectionConfig)
    assert cfg.model.backbone == "resnet50d" and cfg.model.weights.endswith(
        "resnet50d_8xb128_efficient-cosine-ls_imagenet/model.safetensors")
    assert (cfg.data.train_splits, cfg.data.test_splits) == ("2007-trainval+2012-trainval", "2007-test")
    assert cfg.train.batch_size * 8 == 16 and cfg.train.max_iter == 18000
    assert cfg.output_dir == f"runs/detection/{config.stem}"


def test_detection_pictures_draw_what_scores_above_the_threshold():
    from detection.visualize import class_colours, draw_detections
    from detection.voc_eval import VOCBoxes

    image = torch.zeros(3, 40, 50, dtype=torch.uint8)
    prediction = VOCBoxes(np.array([[5.0, 5.0, 20.0, 30.0], [25.0, 10.0, 45.0, 35.0]]), np.array([1, 0]),
                          scores=np.array([0.9, 0.2]))
    truth = VOCBoxes(np.array([[2.0, 2.0, 10.0, 10.0]]), np.array([0]))
    picture = draw_detections(image, prediction, ["a", "b"], truth, score_thresh=0.5)
    assert picture.shape == (40, 50, 3) and picture.dtype == np.uint8
    assert tuple(picture[20, 5]) == class_colours(2)[1]          # the left edge of the 0.9 box, in class b's colour
    assert tuple(picture[20, 25]) == (0, 0, 0)                   # the 0.2 box is not drawn
    assert tuple(picture[6, 2]) == (255, 255, 255)               # ground truth in white
    assert draw_detections(image, prediction, ["a", "b"], upscale=2, score_thresh=0.1).shape == (80, 100, 3)


def test_training_writes_detection_pictures(tmp_path):
    cfg = tiny(tmp_path, "train.max_iter=2", "optim.milestones=[1]", "optim.warmup_iters=1", "train.visualize=2",
               "train.visualize_thresh=0.0")
    train_detector(cfg)
    pictures = sorted((Path(cfg.output_dir) / "detections").glob("*.png"))
    assert len(pictures) == 2
    from PIL import Image

    with Image.open(pictures[0]) as im:  # small test images are enlarged for legible labels
        assert min(im.size) >= 128
