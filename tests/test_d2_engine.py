"""The detectron2 engine (detection/d2_engine.py) on a tiny VOC devkit written in tmp_path."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from detection import d2_engine
from detection import voc as voc_data
from detection.config import DetectionConfig
from runtime.config import load_config

try:
    d2_engine.import_detectron2()
except ImportError as e:  # pragma: no cover - depends on the machine
    pytest.skip(f"detectron2 cannot be imported: {e}", allow_module_level=True)

CLASSES = ["cat", "dog", "person"]


def _object_xml(name: str, box, difficult: bool) -> str:
    x1, y1, x2, y2 = box
    # <pose>/<truncated>/<difficult> present: detectron2's parse_rec needs all three.
    return (f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated>"
            f"<difficult>{int(difficult)}</difficult><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin>"
            f"<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>")


def write_devkit(root: Path, splits: dict[str, list[str]], seed: int = 0, images: bool = True,
                 size_range=(64, 128)) -> dict[str, list]:
    """A VOCdevkit/VOC2007 with random images, 1-3 boxes each (1-based inclusive corners), a few difficult."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = root / "VOCdevkit" / "VOC2007"
    for sub in ("Annotations", "ImageSets/Main", "JPEGImages"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    objects = {}
    for image_id in sorted({i for ids in splits.values() for i in ids}):
        w, h = (int(v) for v in rng.integers(*size_range, size=2))
        pixels = rng.integers(0, 60, size=(h, w, 3), dtype=np.uint8)
        objs = []
        for k in range(int(rng.integers(1, 4))):
            bw, bh = int(rng.integers(12, w // 2)), int(rng.integers(12, h // 2))
            x1, y1 = int(rng.integers(1, w - bw)), int(rng.integers(1, h - bh))
            box = (x1, y1, x1 + bw - 1, y1 + bh - 1)
            cls = CLASSES[int(rng.integers(len(CLASSES)))] if k else CLASSES[len(objects) % len(CLASSES)]
            objs.append((cls, box, bool(k == 2)))  # every third box difficult
            pixels[y1 - 1:box[3], x1 - 1:box[2]] = 80 + 60 * CLASSES.index(cls)
        objects[image_id] = objs
        if images:
            Image.fromarray(pixels).save(base / "JPEGImages" / f"{image_id}.jpg")
        (base / "Annotations" / f"{image_id}.xml").write_text(
            f"<annotation><folder>VOC2007</folder><filename>{image_id}.jpg</filename><size><width>{w}</width>"
            f"<height>{h}</height><depth>3</depth></size><segmented>0</segmented>"
            + "".join(_object_xml(*o) for o in objs) + "</annotation>")
    for split, ids in splits.items():
        (base / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return objects


def tiny_config(root: Path, out: Path, *overrides: str) -> DetectionConfig:
    return load_config(None, DetectionConfig, [
        "engine=detectron2", "model.backbone=resnet18d", "model.norm=batchnorm", "model.frozen_stages=0",
        "model.min_size_train=[64, 96]", "model.min_size_test=80", "model.max_size=128",
        f"data.root={root}", "data.train_splits=2007-trainval", "data.test_splits=2007-test",
        f"data.classes=[{', '.join(CLASSES)}]", "data.workers=0",
        "optim.lr=0.01", "optim.warmup_iters=1", "optim.milestones=[100]",
        "train.max_iter=2", "train.batch_size=2", "train.log_every=1", "train.checkpoint_every=100",
        f"output_dir={out}", *overrides])


@pytest.fixture
def small_heads(monkeypatch):
    """detectron2's recipe with narrow heads and few proposals: the same code paths, ~10x less CPU."""
    build = d2_engine.build_d2_config

    def build_small(cfg):
        d2 = build(cfg)
        d2.MODEL.FPN.OUT_CHANNELS = 32
        d2.MODEL.ROI_BOX_HEAD.FC_DIM = 64
        d2.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 32
        d2.MODEL.RPN.BATCH_SIZE_PER_IMAGE = 64
        for key in ("PRE_NMS_TOPK_TRAIN", "PRE_NMS_TOPK_TEST", "POST_NMS_TOPK_TRAIN", "POST_NMS_TOPK_TEST"):
            d2.MODEL.RPN[key] = 50
        return d2

    monkeypatch.setattr(d2_engine, "build_d2_config", build_small)


@pytest.fixture(scope="module")
def devkit(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("voc")
    write_devkit(root, {"trainval": ["000001", "000002", "000003", "000004"], "test": ["000005", "000006"]})
    return root


def test_import_is_repeatable_and_shims_installed():
    d2_engine.import_detectron2()
    d2_engine.register_d2_components()
    d2_engine.register_d2_components()  # idempotent
    from detectron2.modeling import BACKBONE_REGISTRY, ROI_HEADS_REGISTRY
    from PIL import Image

    assert d2_engine.FPN_BACKBONE in BACKBONE_REGISTRY and d2_engine.C4_ROI_HEADS in ROI_HEADS_REGISTRY
    assert np.int is int and Image.LINEAR == Image.Resampling.BILINEAR


def test_missing_detectron2_names_the_install_command(monkeypatch):
    for name in [n for n in sys.modules if n == "detectron2" or n.startswith("detectron2.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "detectron2", None)  # "not installed"
    with pytest.raises(ImportError, match="scripts/setup.sh"):
        d2_engine.import_detectron2()


def test_shipped_configs_build(tmp_path):
    for arch in ("fpn", "c4"):
        path = Path(__file__).parents[1] / f"configs/detection/faster-rcnn_resnet50d-{arch}_8xb2-18k_voc0712_detectron2.yaml"
        cfg = load_config(path, DetectionConfig, [f"output_dir={tmp_path}"])
        d2 = d2_engine.build_d2_config(cfg)
        assert cfg.engine == "detectron2" and cfg.model.arch == arch
        assert d2.SOLVER.MAX_ITER == 18000 and d2.SOLVER.STEPS == (12000, 16000) and d2.SOLVER.WARMUP_ITERS == 100
        assert d2.MODEL.ROI_HEADS.NUM_CLASSES == 20 and d2.INPUT.MIN_SIZE_TEST == 800
        assert d2.MODEL.ROI_HEADS.NAME == ("StandardROIHeads" if arch == "fpn" else d2_engine.C4_ROI_HEADS)


def test_d2_config_follows_recipe(devkit, tmp_path):
    cfg = tiny_config(devkit, tmp_path, "train.batch_size=4", "optim.lr=0.02", "train.eval_every=5")
    d2 = d2_engine.build_d2_config(cfg)
    assert d2.SOLVER.IMS_PER_BATCH == 4 and d2.SOLVER.BASE_LR == pytest.approx(0.02 * 4 / 16)
    assert d2.SOLVER.WARMUP_FACTOR == 0.0  # linear from 0, as runtime.schedules.lr_at
    for no_bias_decay, norm, bias in ((False, 1e-4, None), (True, 0.0, 0.0)):  # as runtime.optim.param_groups
        other = d2_engine.build_d2_config(tiny_config(devkit, tmp_path, "optim.weight_decay=1e-4",
                                                      f"optim.no_bias_decay={str(no_bias_decay).lower()}"))
        assert (other.SOLVER.WEIGHT_DECAY_NORM, other.SOLVER.WEIGHT_DECAY_BIAS) == (norm, bias)
    assert d2.MODEL.ROI_HEADS.NUM_CLASSES == 3 and d2.INPUT.FORMAT == "RGB"
    assert d2.MODEL.RPN.IN_FEATURES == ["p2", "p3", "p4", "p5", "p6"] and d2.MODEL.RPN.POST_NMS_TOPK_TRAIN == 1000
    from backbones import IMAGENET_MEAN, IMAGENET_STD  # the backbone's default, RGB, on 0-255

    assert d2.MODEL.PIXEL_MEAN == pytest.approx([255 * v for v in IMAGENET_MEAN])
    assert d2.MODEL.PIXEL_STD == pytest.approx([255 * v for v in IMAGENET_STD])
    assert d2.INPUT.MIN_SIZE_TRAIN == (64, 96) and d2.TEST.EVAL_PERIOD == 5 and d2.SOLVER.STEPS == (100,)
    with pytest.raises(ValueError, match="bf16"):
        d2_engine.build_d2_config(tiny_config(devkit, tmp_path, "train.precision=bf16"))
    # Training keeps difficult boxes (as detectron2's load_voc_instances) unless data.train_difficult=false;
    # the test set keeps them, flagged, for the devkit's AP.
    from detectron2.data import DatasetCatalog
    from detectron2.data.datasets.pascal_voc import load_voc_instances

    train = DatasetCatalog.get(d2.DATASETS.TRAIN[0])
    test = DatasetCatalog.get(d2.DATASETS.TEST[0])
    assert [r["image_id"] for r in test] == ["000005", "000006"] and len(train) == 4
    theirs = load_voc_instances(str(devkit / "VOCdevkit" / "VOC2007"), "trainval", CLASSES)
    assert [[(a["bbox"], a["category_id"]) for a in r["annotations"]] for r in train] == \
        [[(a["bbox"], a["category_id"]) for a in r["annotations"]] for r in theirs]
    assert any(a["difficult"] for r in train for a in r["annotations"])
    no_difficult = d2_engine.build_d2_config(tiny_config(devkit, tmp_path, "data.train_difficult=false"))
    assert no_difficult.DATASETS.TEST == d2.DATASETS.TEST
    dropped = DatasetCatalog.get(no_difficult.DATASETS.TRAIN[0])
    assert not any(a["difficult"] for r in dropped for a in r["annotations"])
    assert sum(map(len, (r["annotations"] for r in dropped))) == \
        sum(not a["difficult"] for r in train for a in r["annotations"])
    first = voc_data.build_voc(devkit, "2007-test", classes=CLASSES).annotation(0)
    assert [a["bbox"] for a in test[0]["annotations"]] == first.boxes.tolist()
    assert Path(test[0]["file_name"]).is_file()


def test_proposal_counts_follow_the_architecture_unless_set(devkit, tmp_path):
    """model.arch=c4 by override gets Base-RCNN-C4's proposals, fpn Base-RCNN-FPN's; a key set wins."""
    from detectron2.config import get_cfg

    rpn = lambda d2: (d2.MODEL.RPN.PRE_NMS_TOPK_TRAIN, d2.MODEL.RPN.POST_NMS_TOPK_TRAIN,
                      d2.MODEL.RPN.PRE_NMS_TOPK_TEST, d2.MODEL.RPN.POST_NMS_TOPK_TEST)
    base_c4 = get_cfg()  # Base-RCNN-C4.yaml changes only the test counts of detectron2's defaults
    base_c4.MODEL.RPN.PRE_NMS_TOPK_TEST, base_c4.MODEL.RPN.POST_NMS_TOPK_TEST = 6000, 1000
    fpn = Path(__file__).parents[1] / "configs/detection/faster-rcnn_resnet50d-fpn_8xb2-18k_voc0712_detectron2.yaml"
    c4 = load_config(fpn, DetectionConfig, [f"output_dir={tmp_path}", "model.arch=c4"])
    assert rpn(d2_engine.build_d2_config(c4)) == rpn(base_c4) == (12000, 2000, 6000, 1000)
    assert rpn(d2_engine.build_d2_config(load_config(fpn, DetectionConfig, [f"output_dir={tmp_path}"]))) == \
        (2000, 1000, 1000, 1000)
    c4_set = load_config(fpn, DetectionConfig, [f"output_dir={tmp_path}", "model.arch=c4",
                                                "model.rpn_post_nms_topk_test=300"])
    assert rpn(d2_engine.build_d2_config(c4_set)) == (12000, 2000, 6000, 300)


def test_scale_schedule_gives_detectron2_the_recipes_epochs(devkit, tmp_path, caplog):
    """train.scale_schedule=true at global batch 2 (the recipe's 16): 8x the iterations, milestones, warm-up,
    eval and checkpoint periods; one line names the epochs; config.yaml keeps the recipe's numbers."""
    cfg = tiny_config(devkit, tmp_path, "train.scale_schedule=true", "train.eval_every=3")
    with caplog.at_level("WARNING", logger="runtime.schedules"):
        trainer = d2_engine.build_trainer(cfg)
    solver = trainer.cfg.SOLVER
    assert (trainer.max_iter, solver.MAX_ITER, solver.STEPS, solver.WARMUP_ITERS, solver.CHECKPOINT_PERIOD,
            trainer.cfg.TEST.EVAL_PERIOD) == (16, 16, (800,), 8, 800, 24)
    assert solver.IMS_PER_BATCH == 2 and solver.BASE_LR == pytest.approx(0.01 * 2 / 16)  # lr: scale_lr, as before
    [line] = [r.getMessage() for r in caplog.records if r.name == "runtime.schedules"]
    assert "train.scale_schedule=true runs 16 iterations" in line and "8.00 epochs of 4 training images" in line
    saved = load_config(tmp_path / "config.yaml", DetectionConfig)
    assert saved.train.max_iter == 2 and saved.train.scale_schedule


def test_sync_bn_under_ddp_builds_sync_batchnorm(devkit, tmp_path, monkeypatch):
    from torch import nn

    cfg = tiny_config(devkit, tmp_path, "model.sync_bn=true")
    trainer_cls = d2_engine._trainer_class()
    single = trainer_cls.build_model(d2_engine.build_d2_config(cfg))
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it (the config only: no process group is joined)
    ddp = trainer_cls.build_model(d2_engine.build_d2_config(cfg))
    bn = sum(isinstance(m, nn.BatchNorm2d) for m in single.modules())
    assert bn > 0 and not any(isinstance(m, nn.SyncBatchNorm) for m in single.modules())
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in ddp.modules()) == bn
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(ValueError, match="needs CUDA"):
        d2_engine.build_trainer(cfg)


def test_frozen_random_bn_is_refused(devkit, tmp_path):
    with pytest.raises(ValueError, match="model.weights"):
        d2_engine.build_trainer(tiny_config(devkit, tmp_path, "model.norm=frozenbatchnorm"))
    with pytest.raises(ValueError, match="model.roi_align=gather chooses the torchvision engine's"):
        d2_engine.build_trainer(tiny_config(devkit, tmp_path, "model.roi_align=gather"))


def test_both_engines_read_the_same_detector_sizes(devkit, tmp_path):
    """Proposal counts, RoI batch, anchors, head widths, test threshold and normalisation: one set of keys,
    the same numbers in torchvision's Faster R-CNN and in detectron2's config."""
    from detection.train import build_model

    sizes = ["model.anchor_sizes=[16, 32, 64, 128, 256]", "model.rpn_pre_nms_topk_train=300",
             "model.rpn_post_nms_topk_train=150", "model.rpn_pre_nms_topk_test=200", "model.rpn_post_nms_topk_test=100",
             "model.roi_batch_per_image=64", "model.fpn_channels=32", "model.box_fc_dim=128",
             "model.score_thresh_test=0.01", "model.detections_per_image=50", "model.kwargs={width_mult: 0.5}",
             "data.mean=[0.3, 0.3, 0.3]", "data.std=[0.4, 0.4, 0.4]"]
    cfg = tiny_config(devkit, tmp_path, *sizes)
    d2 = d2_engine.build_d2_config(cfg)
    tv = build_model(cfg, num_classes=len(CLASSES))
    assert d2.MODEL.ANCHOR_GENERATOR.SIZES == [[16], [32], [64], [128], [256]]
    assert [s[0] for s in tv.rpn.anchor_generator.sizes] == [16, 32, 64, 128, 256]
    assert (d2.MODEL.RPN.PRE_NMS_TOPK_TRAIN, d2.MODEL.RPN.POST_NMS_TOPK_TRAIN) == (300, 150)
    assert (tv.rpn._pre_nms_top_n["training"], tv.rpn._post_nms_top_n["training"]) == (300, 150)
    assert (d2.MODEL.RPN.PRE_NMS_TOPK_TEST, d2.MODEL.RPN.POST_NMS_TOPK_TEST) == (200, 100)
    assert (tv.rpn._pre_nms_top_n["testing"], tv.rpn._post_nms_top_n["testing"]) == (200, 100)
    assert d2.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE == tv.roi_heads.fg_bg_sampler.batch_size_per_image == 64
    assert d2.MODEL.FPN.OUT_CHANNELS == tv.backbone.out_channels == 32
    assert d2.MODEL.ROI_BOX_HEAD.FC_DIM == tv.roi_heads.box_head.fc7.out_features == 128
    assert tv.roi_heads.box_head.fc6.in_features == 32 * 7 * 7
    assert tv.roi_heads.box_predictor.cls_score.out_features == len(CLASSES) + 1
    assert d2.MODEL.ROI_HEADS.SCORE_THRESH_TEST == tv.roi_heads.score_thresh == 0.01
    assert d2.TEST.DETECTIONS_PER_IMAGE == tv.roi_heads.detections_per_img == 50
    assert d2.MODEL.PIXEL_MEAN == pytest.approx([76.5] * 3) and tv.transform.image_mean == [0.3] * 3
    assert d2.MODEL.PIXEL_STD == pytest.approx([102.0] * 3) and tv.transform.image_std == [0.4] * 3
    assert dict(d2.MODEL.TRICKS.KWARGS) == {"width_mult": 0.5}
    assert tv.backbone.body.feature_info[-1].channels == 256  # half-width res5 (512 at full width)
    with pytest.raises(ValueError, match="one size per level"):
        d2_engine.build_d2_config(tiny_config(devkit, tmp_path, "model.anchor_sizes=[32, 64]"))


@pytest.mark.parametrize("arch", ["fpn", "c4"])
def test_backbone_output_shape_matches_features(devkit, tmp_path, arch):
    d2 = d2_engine.build_d2_config(tiny_config(devkit, tmp_path, f"model.arch={arch}"))
    from detectron2.modeling import build_backbone

    backbone = build_backbone(d2).eval()
    x = torch.randn(1, 3, 128, 192)  # a multiple of 64 (p6): every stride exact
    with torch.no_grad():
        feats = backbone(x)
    shapes = backbone.output_shape()
    assert set(feats) == set(shapes)
    for name, t in feats.items():
        assert t.shape[1] == shapes[name].channels and 128 // t.shape[2] == shapes[name].stride, name
    if arch == "fpn":
        bottom = backbone.bottom_up
        assert backbone.size_divisibility == 32 and set(feats) == {"p2", "p3", "p4", "p5", "p6"}
        with torch.no_grad():
            res = bottom(x)
        assert {k: (v.shape[1], 192 // v.shape[3]) for k, v in res.items()} == \
            {k: (s.channels, s.stride) for k, s in bottom.output_shape().items()} == \
            {"res2": (64, 4), "res3": (128, 8), "res4": (256, 16), "res5": (512, 32)}
    else:  # res4 only; res5 belongs to the box head
        assert set(feats) == {"res4"} and shapes["res4"].channels == 256 and shapes["res4"].stride == 16


def test_train_evaluate(devkit, tmp_path, small_heads):
    cfg = tiny_config(devkit, tmp_path / "run", "train.visualize=1", "train.visualize_thresh=0")
    metrics = d2_engine.train(cfg)
    assert set(metrics["AP"]) == set(CLASSES) and metrics["images"] == 2
    assert sorted(metrics["detections"]) == ["000005", "000006"]
    final = tmp_path / "run" / "model_final.pth"
    assert final.is_file() and (tmp_path / "run" / "last_checkpoint").read_text().strip() == "model_final.pth"
    assert (tmp_path / "run" / "config.yaml").is_file()
    assert [p.name for p in (tmp_path / "run" / "detections").glob("*.png")] == ["000005.png"]
    again = d2_engine.evaluate(cfg, str(final))  # the same weights, the same detections
    assert again["mAP"] == metrics["mAP"] and again["images"] == 2
    for image_id, boxes in metrics["detections"].items():
        assert np.array_equal(again["detections"][image_id].boxes, boxes.boxes)
        assert np.array_equal(again["detections"][image_id].scores, boxes.scores)


def test_a_short_run_beats_random_boxes(tmp_path):
    """Learning happened: detectron2's trainer, 100 iterations from scratch on eight easy scenes (the torch
    engine's learning check, the same overrides), scores far above random boxes (seeds 0-2: 85.2 / 79.4 /
    66.5 against 0.8 / 0.8 / 0.1 VOC07 mAP)."""
    from easy_scenes import DETECTION_LEARN, SHAPES, random_boxes_map, write_easy_voc

    devkit = write_easy_voc(tmp_path / "VOCdevkit")
    metrics = d2_engine.train(load_config(None, DetectionConfig, ["engine=detectron2", *DETECTION_LEARN,
                                                                  f"data.root={devkit}", f"output_dir={tmp_path / 'run'}"]))
    baseline = random_boxes_map(devkit, SHAPES)
    assert metrics["images"] == 8 and baseline < 5
    assert metrics["mAP"] > max(3 * baseline, baseline + 30), (metrics["mAP"], baseline)


class Crash(Exception):
    pass


@pytest.fixture(scope="module")
def one_image_devkit(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("voc1")
    write_devkit(root, {"trainval": ["000001"], "test": ["000005", "000006"]})
    return root


def test_interrupted_and_resumed_run_equals_uninterrupted(one_image_devkit, tmp_path, small_heads, monkeypatch):
    """train.resume=auto restores the optimizer (its momentum), the schedule and (the engine's hook) every
    rank's RNG: a run interrupted after the checkpoint of iteration 2 of 4 and resumed ends with the weights
    of the uninterrupted run, bit for bit. One training image, one per batch, one size, no flip: detectron2
    restarts its data stream on resume, so the test leaves the stream's position nothing to change."""
    from detectron2.modeling import GeneralizedRCNN
    from detectron2.utils.events import get_event_storage

    args = ("train.batch_size=1", "train.max_iter=4", "train.checkpoint_every=2", "model.min_size_train=[80]",
            "data.hflip=0", "optim.milestones=[3]", "optim.warmup_iters=2", "train.visualize=0")
    d2_engine.train(tiny_config(one_image_devkit, tmp_path / "full", *args))

    forward, crash = GeneralizedRCNN.forward, {"at": 2}

    def crashing(self, batched_inputs):
        if self.training and get_event_storage().iter == crash["at"]:
            raise Crash
        return forward(self, batched_inputs)

    monkeypatch.setattr(GeneralizedRCNN, "forward", crashing)
    part = tmp_path / "part"
    with pytest.raises(Crash):
        d2_engine.train(tiny_config(one_image_devkit, part, *args))
    assert (part / "last_checkpoint").read_text().strip() == "model_0000001.pth"
    crash["at"] = None

    trainer = d2_engine.build_trainer(tiny_config(one_image_devkit, part, *args, "train.resume=auto"), resume="auto")
    saved = torch.load(part / "model_0000001.pth", map_location="cpu", weights_only=False)
    assert trainer.start_iter == 2
    state, saved_state = trainer.optimizer.state_dict()["state"], saved["trainer"]["_trainer"]["optimizer"]["state"]
    assert state.keys() == saved_state.keys() and state
    for k in state:  # the momentum buffers as saved (not zero: two steps were taken)
        assert torch.equal(state[k]["momentum_buffer"], saved_state[k]["momentum_buffer"])
    assert any(v["momentum_buffer"].abs().sum() > 0 for v in state.values())
    assert trainer.scheduler.state_dict() == saved["trainer"]["hooks"]["LRScheduler"]
    assert trainer.scheduler.last_epoch == 2
    trainer.train()
    full = _weights(tmp_path / "full" / "model_final.pth")
    resumed = _weights(part / "model_final.pth")
    assert full.keys() == resumed.keys()
    for k in full:
        assert torch.equal(full[k], resumed[k]), k


@pytest.fixture
def nan_loss_at(monkeypatch) -> set:
    """Iterations (0-based) at which detectron2's model returns NaN losses in training: add them to the set."""
    from detectron2.modeling import GeneralizedRCNN
    from detectron2.utils.events import get_event_storage

    forward, poisoned_iterations = GeneralizedRCNN.forward, set()

    def poisoned(self, batched_inputs):
        out = forward(self, batched_inputs)
        if self.training and get_event_storage().iter in poisoned_iterations:
            out = {k: v * float("nan") for k, v in out.items()}
        return out

    monkeypatch.setattr(GeneralizedRCNN, "forward", poisoned)
    return poisoned_iterations


def _weights(path: Path) -> dict:
    """The trained parameters of a checkpoint (BN running statistics left out: a skipped step's forward
    still updates them, as in the torch engine)."""
    state = torch.load(path, map_location="cpu", weights_only=False)["model"]
    return {k: v for k, v in state.items() if "running_" not in k and "num_batches_tracked" not in k}


def test_a_nonfinite_loss_skips_the_step(devkit, tmp_path, small_heads, nan_loss_at):
    """train.max_nonfinite=2: one NaN loss (iteration 2 of 3) is skipped, not raised; the run goes on."""
    nan_loss_at.add(1)
    out = tmp_path / "skip"
    metrics = d2_engine.train(tiny_config(devkit, out, "train.max_iter=3", "train.checkpoint_every=1",
                                          "train.max_nonfinite=2"))
    assert metrics["images"] == 2
    first, skipped, final = (_weights(out / f"model_{n}.pth") for n in ("0000000", "0000001", "final"))
    assert all(torch.equal(first[k], skipped[k]) for k in first)  # the NaN step changed no weight
    assert all(torch.isfinite(v).all() for v in final.values() if v.is_floating_point())
    assert any(not torch.equal(skipped[k], final[k]) for k in final)  # the next step trained


def test_nonfinite_losses_in_a_row_stop_the_run_at_the_last_good_checkpoint(devkit, tmp_path, small_heads,
                                                                             nan_loss_at):
    from runtime.step import TrainingDiverged

    nan_loss_at.update({1, 2, 3})
    out = tmp_path / "diverge"
    with pytest.raises(TrainingDiverged, match="2 steps in a row"):
        d2_engine.train(tiny_config(devkit, out, "train.max_iter=5", "train.checkpoint_every=1",
                                    "train.max_nonfinite=2"))
    # Iteration 2 was skipped (and its checkpoint holds iteration 1's weights); iteration 3 stopped the run
    # before its checkpoint.
    assert sorted(p.name for p in out.glob("model_*.pth")) == ["model_0000000.pth", "model_0000001.pth"]
    assert (out / "last_checkpoint").read_text().strip() == "model_0000001.pth"
    good, last = _weights(out / "model_0000000.pth"), _weights(out / "model_0000001.pth")
    assert all(torch.equal(good[k], last[k]) for k in good)


def test_c4_trains_one_step(devkit, tmp_path, small_heads):
    cfg = tiny_config(devkit, tmp_path, "model.arch=c4", "train.max_iter=1")
    metrics = d2_engine.train(cfg)
    assert set(metrics["AP"]) == set(CLASSES) and metrics["images"] == 2


def _detections(objects: dict, rng) -> dict:
    """Per image: jittered copies of its boxes and random boxes, half-pixel corners and distinct 3-decimal
    scores, so detectron2's text files (score %.3f, corners %.1f) carry them exactly."""
    n = sum(3 * len(objs) + 3 for objs in objects.values())
    scores = iter(rng.permutation(np.arange(1, 1000))[:n] / 1000)
    out = {}
    for image_id, objs in objects.items():
        boxes, labels = [], []
        for cls, (x1, y1, x2, y2), _ in objs:
            for _ in range(3):
                j = rng.integers(-6, 7, size=4) / 2
                boxes.append([x1 - 1 + j[0], y1 - 1 + j[1], x2 + j[2], y2 + j[3]])
                labels.append(CLASSES.index(cls) if rng.random() < 0.8 else int(rng.integers(3)))
        for _ in range(3):
            x, y = rng.integers(0, 60, size=2) / 2
            boxes.append([x, y, x + 20 + rng.integers(0, 40) / 2, y + 20 + rng.integers(0, 40) / 2])
            labels.append(int(rng.integers(3)))
        out[image_id] = (np.array(boxes), np.array(labels), np.array([next(scores) for _ in labels]))
    return out


def test_evaluator_agrees_with_detectron2(tmp_path):
    from detectron2.evaluation import PascalVOCDetectionEvaluator
    from detectron2.evaluation.pascal_voc_evaluation import voc_eval
    from detectron2.structures import Boxes, Instances

    ids = [f"{i:06d}" for i in range(1, 9)]  # >= 2 ids: detectron2's np.loadtxt breaks on one
    objects = write_devkit(tmp_path, {"test": ids}, seed=3, images=False)
    cfg = tiny_config(tmp_path, tmp_path / "out")
    name = d2_engine.register_voc(cfg, "2007-test", train=False)
    ours = d2_engine.build_voc_evaluator(name)
    theirs = PascalVOCDetectionEvaluator(name)
    detections = _detections(objects, np.random.default_rng(0))
    for evaluator in (ours, theirs):
        evaluator.reset()
        for image_id, (boxes, labels, scores) in detections.items():
            inst = Instances((128, 128), pred_boxes=Boxes(torch.tensor(boxes, dtype=torch.float32)),
                             scores=torch.tensor(scores, dtype=torch.float32), pred_classes=torch.tensor(labels))
            evaluator.process([{"image_id": image_id}], [{"instances": inst}])
    result, reference = ours.evaluate(), theirs.evaluate()["bbox"]
    for key in ("AP", "AP50", "AP75"):  # AP: IoU 0.50:0.95, as detectron2 defines it
        assert result["bbox"][key] == pytest.approx(reference[key], abs=1e-9), key

    # Per class, both metrics, against detectron2's voc_eval on the same detections.
    dets = tmp_path / "dets"
    dets.mkdir()
    for c, cls in enumerate(CLASSES):
        (dets / f"{cls}.txt").write_text("\n".join(
            f"{i} {s:.3f} {b[0] + 1:.1f} {b[1] + 1:.1f} {b[2]:.1f} {b[3]:.1f}"
            for i, (boxes, labels, scores) in detections.items() for b, l, s in zip(boxes, labels, scores) if l == c))
    devkit = tmp_path / "VOCdevkit" / "VOC2007"
    for cls in CLASSES:
        args = (str(dets / "{}.txt"), str(devkit / "Annotations" / "{}.xml"),
                str(devkit / "ImageSets" / "Main" / "test.txt"), cls)
        _, _, ap07 = voc_eval(*args, ovthresh=0.5, use_07_metric=True)
        _, _, ap_area = voc_eval(*args, ovthresh=0.5, use_07_metric=False)
        assert result["bbox"][f"AP50-{cls}"] == pytest.approx(100 * ap07, abs=1e-9), cls
        assert result["voc"][f"AP50_area-{cls}"] == pytest.approx(100 * ap_area, abs=1e-9), cls
    assert 0 < result["bbox"]["AP50"] < 100  # a test that can tell right from wrong


def test_missing_checkpoint_is_a_clear_error(devkit, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        d2_engine.evaluate(tiny_config(devkit, tmp_path), str(tmp_path / "nope.pth"))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(pytest.main([os.path.abspath(__file__), "-q"]))


def test_channels_last_and_auto_precision(devkit, tmp_path):
    """model.channels_last puts the registry backbone in NHWC with the same features; train.precision=auto is
    detectron2's fp32 on a CPU (no AMP: AMPTrainer needs CUDA and v0.6 has no bf16)."""
    from detectron2.modeling import build_backbone

    torch.manual_seed(0)
    nhwc_cfg = d2_engine.build_d2_config(tiny_config(devkit, tmp_path, "model.channels_last=true",
                                                     "train.precision=auto"))
    assert nhwc_cfg.MODEL.TRICKS.CHANNELS_LAST and not nhwc_cfg.SOLVER.AMP.ENABLED
    nhwc = build_backbone(nhwc_cfg).eval()
    plain = build_backbone(d2_engine.build_d2_config(tiny_config(devkit, tmp_path, "model.channels_last=false"))).eval()
    plain.load_state_dict(nhwc.state_dict())
    conv = nhwc.bottom_up.body.layer1[0].conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    x = torch.randn(1, 3, 128, 192)
    with torch.no_grad():
        a, b = nhwc(x), plain(x)
    assert a["p2"].is_contiguous(memory_format=torch.channels_last)
    for k in b:
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-4)
