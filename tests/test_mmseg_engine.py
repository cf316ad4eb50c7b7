"""The mmseg engine: our metric equals mmseg's IoUMetric, the registered backbone keeps its declared
features, and a tiny run in the exact ADE20K layout learns, evaluates and resumes through mmengine's Runner."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from easy_scenes import SEGMENTATION_LEARN, all_background_scores, write_easy_ade
from runtime.config import ConfigError, load_config
from segmentation.config import SegmentationConfig
from segmentation.metrics import SegmentationMetric

mmseg_engine = pytest.importorskip("segmentation.mmseg_engine")
try:
    mmseg_engine.register_modules()
except ImportError as e:  # mmsegmentation is an optional extra
    pytest.skip(f"mmsegmentation cannot be imported: {e}", allow_module_level=True)


def test_metric_equals_mmseg_iou_metric():
    from mmseg.evaluation import IoUMetric

    rng = np.random.default_rng(0)
    k, ours = 5, SegmentationMetric(num_classes=5)
    mmseg_metric = IoUMetric(iou_metrics=["mIoU"], ignore_index=255)
    mmseg_metric.dataset_meta = dict(classes=[f"c{i}" for i in range(k)])
    for _ in range(3):
        label = torch.from_numpy(rng.integers(0, k - 1, (1, 17, 23)))  # class k-1 never labelled
        label[torch.from_numpy(rng.random((1, 17, 23)) < 0.25)] = 255
        pred = torch.from_numpy(rng.integers(0, k, (1, 17, 23)))
        ours.update(pred, label)
        mmseg_metric.process({}, [dict(pred_sem_seg=dict(data=pred), gt_sem_seg=dict(data=label))])
    expected = ours.compute()

    # compute_metrics() reports percentages rounded to 0.01; the areas it sums give the exact values.
    reported = mmseg_metric.compute_metrics(mmseg_metric.results)
    for key in ("mIoU", "mAcc", "aAcc"):
        assert reported[key] == pytest.approx(round(expected[key], 2), abs=1e-9)
    inter, union, pred_area, label_area = (sum(x) for x in zip(*mmseg_metric.results))
    exact = IoUMetric.total_area_to_metrics(inter, union, pred_area, label_area, ["mIoU"])
    assert 100 * np.nanmean(exact["IoU"]) == pytest.approx(expected["mIoU"], abs=1e-6)
    assert 100 * np.nanmean(exact["Acc"]) == pytest.approx(expected["mAcc"], abs=1e-6)
    assert 100 * float(exact["aAcc"]) == pytest.approx(expected["aAcc"], abs=1e-6)


def test_registered_backbone_returns_its_declared_features():
    from mmseg.registry import MODELS

    mmseg_engine.register_modules()  # a second registration is harmless
    backbone = MODELS.build(dict(type="TricksBackbone", name="resnet18d", width_mult=0.25))
    features = backbone(torch.randn(2, 3, 64, 64))
    assert [f.name for f in backbone.feature_info] == ["res2", "res3", "res4", "res5"]
    assert [(f.channels, f.stride) for f in backbone.feature_info] == [(16, 4), (32, 8), (64, 8), (128, 8)]
    for feature, info in zip(features, backbone.feature_info):
        assert feature.shape == (2, info.channels, 64 // info.stride, 64 // info.stride)
    heads_input = MODELS.build(dict(type="TricksBackbone", name="resnet18d", width_mult=0.25, out_indices=(2, 3)))
    assert [f.name for f in heads_input.feature_info] == ["res4", "res5"]


def _write_ade20k(root, sizes: dict[str, int], num_classes: int) -> None:
    """ADEChallengeData2016 layout: RGB JPEG images, uint8 PNG annotations with 0 = other, 1..K classes."""
    rng = np.random.default_rng(0)
    prefix = {"training": "ADE_train", "validation": "ADE_val"}
    for split, count in sizes.items():
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i in range(count):
            h, w = 64, 80
            annotation = np.zeros((h, w), np.uint8)
            for c in range(1, num_classes + 1):  # vertical bands of each class, "other" in the rest
                annotation[:, (c - 1) * w // num_classes: c * w // num_classes - 4] = c
            image = (rng.integers(0, 60, (h, w, 3)) + 60 * annotation[..., None]).astype(np.uint8)
            name = f"{prefix[split]}_{i + 1:08d}"
            Image.fromarray(image, "RGB").save(root / "images" / split / f"{name}.jpg")
            Image.fromarray(annotation).save(root / "annotations" / split / f"{name}.png")


def _scalars(work_dir) -> list[dict]:
    """mmengine's JSON log records of the most recent run in ``work_dir``."""
    newest = max(work_dir.glob("*/vis_data/scalars.json"), key=lambda p: p.stat().st_mtime)
    return [json.loads(line) for line in newest.read_text().splitlines()]


def test_tiny_run_learns_evaluates_and_resumes(tmp_path):
    """mmengine's Runner, 100 iterations from scratch on eight easy scenes in the ADE20K layout (the torch
    engine's learning check, the same overrides): learning happened, far above predicting background
    everywhere (seeds 0-2: mIoU 81.5 / 80.5 / 77.8 against 21.1 / 19.8 / 20.9); the checkpoint evaluates to
    the same numbers; resuming continues at iteration 100."""
    root = write_easy_ade(tmp_path / "ADEChallengeData2016")
    out = tmp_path / "run"
    overrides = ["engine=mmseg", *SEGMENTATION_LEARN, f"data.root={tmp_path}", f"output_dir={out}"]
    cfg = load_config(None, SegmentationConfig, overrides)
    metrics = mmseg_engine.train(cfg)
    assert set(metrics) == {"mIoU", "mAcc", "aAcc"}
    baseline = all_background_scores(root)
    assert baseline["mIoU"] < 35
    assert metrics["mIoU"] > baseline["mIoU"] + 30, (metrics, baseline)
    assert metrics["aAcc"] > baseline["aAcc"] + 10, (metrics, baseline)
    checkpoint = out / "iter_100.pth"
    assert checkpoint.is_file() and (out / "config.yaml").is_file()

    # The checkpoint holds the weights that were just validated: evaluating it gives the same numbers.
    assert mmseg_engine.evaluate(cfg, str(checkpoint)) == metrics

    # Resume continues at iteration 100 (one more step, under CPU bf16 autocast) and validates again.
    resumed_cfg = load_config(None, SegmentationConfig, [*overrides, "train.max_iter=101", "train.checkpoint_every=1",
                                                         "train.log_every=1", "train.resume=auto",
                                                         "train.precision=bf16"])
    resumed = mmseg_engine.train(resumed_cfg)
    assert set(resumed) == {"mIoU", "mAcc", "aAcc"}
    assert (out / "iter_101.pth").is_file()
    train_steps = [r["step"] for r in _scalars(out) if "loss" in r]
    assert train_steps == [101]


def test_torch_engine_checkpoint_scores_the_same_through_mmseg(tmp_path):
    """One checkpoint of the torch engine, evaluated by both engines: the same weights (renamed for mmseg's
    EncoderDecoder) give the same mIoU/mAcc/aAcc. data.scale (100, 48) resizes the 64 x 80 images to
    48 x 60 in both engines and the logits back to the label size: the resize path of both, not only the
    network. Both resize bilinearly without antialias, but cv2.resize in fixed point and torchvision in
    float: pixels up to one grey level apart flip a few argmaxes (0.04 points here; mmseg also rounds to
    0.01), hence 0.25 points."""
    from segmentation import train as torch_engine

    root = tmp_path / "ADEChallengeData2016"
    _write_ade20k(root, {"training": 4, "validation": 3}, num_classes=3)
    overrides = [
        f"data.root={tmp_path}", f"output_dir={tmp_path / 'run'}",
        "model.backbone=resnet18d", "model.kwargs={width_mult: 0.25}", "model.channels=16", "model.aux_channels=8",
        "data.num_classes=3", "data.scale=[100, 48]", "data.crop_size=[48, 48]", "data.workers=0",
        "train.batch_size=2", "train.max_iter=3", "train.eval_every=0", "train.checkpoint_every=3", "eval.overlays=0",
        "optim.lr=0.05",
    ]
    cfg = load_config(None, SegmentationConfig, overrides)
    trained = torch_engine.train(cfg)
    checkpoint = tmp_path / "run" / "model_final.pth"
    state = torch.load(checkpoint, weights_only=True)
    renamed = mmseg_engine.torch_engine_state_to_mmseg(state.get("model", state))
    mm_cfg = load_config(None, SegmentationConfig, [*overrides, "engine=mmseg", f"output_dir={tmp_path / 'mm'}"])
    ours, theirs = torch_engine.evaluate_checkpoint(cfg, str(checkpoint)), mmseg_engine.evaluate(mm_cfg, str(checkpoint))
    for key in ("mIoU", "mAcc", "aAcc"):
        assert ours[key] == pytest.approx(trained[key], abs=1e-9)
        assert theirs[key] == pytest.approx(ours[key], abs=0.25), key
    assert any(k.startswith("backbone.body.") for k in renamed) and any(k.startswith("auxiliary_head.") for k in renamed)
    with pytest.raises(KeyError, match="not a torch-engine FCN key"):
        mmseg_engine.torch_engine_state_to_mmseg({"head.weight": torch.zeros(1)})


def test_accumulation_gives_both_engines_the_same_optimizer_steps_and_lrs(tmp_path):
    """train.max_iter counts optimizer steps in both engines: with train.accum_steps=2 mmengine runs twice as
    many (micro-batch) iterations, and the lr of every optimizer step is runtime.schedules' (warm-up, poly
    to min_lr), recorded at the optimizer itself."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from runtime.schedules import lr_at, scale_lr
    from segmentation import train as torch_engine

    root = tmp_path / "ADEChallengeData2016"
    _write_ade20k(root, {"training": 4, "validation": 1}, num_classes=3)
    overrides = [
        f"data.root={tmp_path}", "model.backbone=resnet18d", "model.kwargs={width_mult: 0.25}", "model.channels=16",
        "model.aux_channels=8", "data.num_classes=3", "data.scale=[80, 64]", "data.crop_size=[64, 64]",
        "data.workers=0", "train.batch_size=2", "train.accum_steps=2", "train.max_iter=4", "optim.warmup_iters=1",
        "train.eval_every=0", "train.checkpoint_every=2", "train.log_every=1", "eval.overlays=0",
    ]
    lrs: list[float] = []
    hook = register_optimizer_step_pre_hook(
        lambda optimizer, args, kwargs: lrs.append(optimizer.param_groups[0]["lr"]))
    try:
        torch_engine.train(load_config(None, SegmentationConfig, [*overrides, f"output_dir={tmp_path / 'torch'}"]))
        torch_lrs = lrs[:]
        lrs.clear()
        mmseg_engine.train(load_config(None, SegmentationConfig,
                                       [*overrides, "engine=mmseg", f"output_dir={tmp_path / 'mm'}"]))
        mm_lrs = lrs[:]
    finally:
        hook.remove()
    base_lr, min_lr = scale_lr(0.01, 2 * 2, 16), scale_lr(1e-4, 2 * 2, 16)  # 2 images x 2 micro-batches
    expected = [lr_at(s, base_lr=base_lr, total_steps=4, warmup_steps=1, schedule="poly", power=0.9, min_lr=min_lr)
                for s in range(4)]
    assert len(torch_lrs) == len(mm_lrs) == 4
    assert torch_lrs == pytest.approx(expected, rel=1e-12)
    assert mm_lrs == pytest.approx(expected, rel=1e-9, abs=1e-6 * base_lr)  # mmengine's warm-up starts at 1e-6
    # mmengine names checkpoints by micro-batch iterations: optimizer step 2 and 4
    assert sorted(p.name for p in (tmp_path / "mm").glob("iter_*.pth")) == ["iter_4.pth", "iter_8.pth"]


def test_nonfinite_losses_are_skipped_and_a_streak_stops_the_run(tmp_path, monkeypatch):
    """train.max_nonfinite in the mmseg engine (fp32): from iteration 3 on the loss is NaN; iteration 3 is
    skipped (weights and momentum unchanged), iteration 4 makes 2 in a row: TrainingDiverged before its
    checkpoint is written, so the last checkpoint holds the last good weights."""
    from mmseg.models.segmentors import EncoderDecoder

    from runtime.step import TrainingDiverged

    root = tmp_path / "ADEChallengeData2016"
    _write_ade20k(root, {"training": 4, "validation": 1}, num_classes=3)
    out = tmp_path / "run"
    cfg = load_config(None, SegmentationConfig, [
        "engine=mmseg", f"data.root={tmp_path}", f"output_dir={out}", "model.backbone=resnet18d",
        "model.kwargs={width_mult: 0.25}", "model.channels=16", "model.aux_channels=8", "data.num_classes=3",
        "data.scale=[80, 64]", "data.crop_size=[64, 64]", "data.workers=0", "train.batch_size=2",
        "train.max_iter=6", "train.eval_every=0", "train.checkpoint_every=1", "train.max_nonfinite=2",
    ])
    calls = []
    loss = EncoderDecoder.loss

    def nan_from_the_third(self, inputs, data_samples):
        losses = loss(self, inputs, data_samples)
        calls.append(None)
        return {k: v * float("nan") if len(calls) >= 3 and k.startswith("decode.loss") else v
                for k, v in losses.items()}

    monkeypatch.setattr(EncoderDecoder, "loss", nan_from_the_third)
    with pytest.raises(TrainingDiverged, match="2 steps in a row"):
        mmseg_engine.train(cfg)
    assert len(calls) == 4 and (out / "iter_3.pth").is_file() and not (out / "iter_4.pth").exists()
    good, skipped = (torch.load(out / f"iter_{i}.pth", map_location="cpu", weights_only=False) for i in (2, 3))
    weights = [k for k in good["state_dict"] if "running_" not in k and "num_batches_tracked" not in k]
    assert all(torch.equal(good["state_dict"][k], skipped["state_dict"][k]) for k in weights)
    assert all(torch.isfinite(skipped["state_dict"][k]).all() for k in weights)
    momenta = lambda ckpt: [s["momentum_buffer"] for s in ckpt["optimizer"]["state"].values()]
    assert all(torch.equal(a, b) for a, b in zip(momenta(good), momenta(skipped)))


_UNDER_TORCHRUN = """
import json, sys
import torch.distributed as dist
from runtime.config import load_config
from segmentation import mmseg_engine
from segmentation.config import SegmentationConfig

root, checkpoint, out = sys.argv[1:4]
writers = []
dump = mmseg_engine.dump_config
mmseg_engine.dump_config = lambda cfg, path: (writers.append(dist.get_rank()), dump(cfg, path))
overrides = [
    "engine=mmseg", f"data.root={root}", f"output_dir={out}", "model.backbone=resnet18d",
    "model.kwargs={width_mult: 0.25}", "model.channels=16", "model.aux_channels=8", "data.num_classes=3",
    "data.scale=[80, 64]", "data.crop_size=[64, 64]", "data.workers=0", "train.batch_size=1", "train.max_iter=2",
    "train.eval_every=0", "train.checkpoint_every=2", "eval.overlays=0",
]
cfg = load_config(None, SegmentationConfig, overrides)
trained = mmseg_engine.train(cfg)
evaluated = mmseg_engine.evaluate(cfg, checkpoint)
# one file per rank: two ranks printing to one pipe can interleave within a line
with open(f"{root}/rank{dist.get_rank()}.json", "w") as f:
    json.dump(dict(rank=dist.get_rank(), writers=writers, trained=trained, evaluated=evaluated), f)
dist.destroy_process_group()  # as tricks.cli.main does after a command
"""


@pytest.mark.slow
def test_under_torchrun_trains_and_evaluates_a_torch_engine_checkpoint(tmp_path):
    """torchrun (gloo, 2 CPU processes): the mmseg engine trains (config.yaml written by rank 0 only) and
    evaluates a torch-engine checkpoint (loaded into the DDP-wrapped model's module): every rank gets the
    single-process evaluation of the same checkpoint."""
    import os
    import subprocess
    import sys

    from segmentation import train as torch_engine

    root = tmp_path / "ADEChallengeData2016"
    _write_ade20k(root, {"training": 4, "validation": 3}, num_classes=3)
    overrides = [
        f"data.root={tmp_path}", f"output_dir={tmp_path / 'torch'}", "model.backbone=resnet18d",
        "model.kwargs={width_mult: 0.25}", "model.channels=16", "model.aux_channels=8", "data.num_classes=3",
        "data.scale=[80, 64]", "data.crop_size=[64, 64]", "data.workers=0", "train.batch_size=2",
        "train.max_iter=2", "train.eval_every=0", "train.checkpoint_every=2", "eval.overlays=0", "optim.lr=0.05",
    ]
    torch_engine.train(load_config(None, SegmentationConfig, overrides))
    checkpoint = tmp_path / "torch" / "model_final.pth"
    single = mmseg_engine.evaluate(load_config(None, SegmentationConfig, [
        *overrides, "engine=mmseg", f"output_dir={tmp_path / 'single'}"]), str(checkpoint))

    script = tmp_path / "under_torchrun.py"
    script.write_text(_UNDER_TORCHRUN)
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script), str(tmp_path), str(checkpoint), str(tmp_path / "ddp")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert [r["writers"] for r in ranks] == [[0], []] and (tmp_path / "ddp" / "config.yaml").is_file()
    assert (tmp_path / "ddp" / "iter_2.pth").is_file() and ranks[0]["trained"] == ranks[1]["trained"]
    assert ranks[0]["evaluated"] == ranks[1]["evaluated"] == single


def test_config_follows_the_recipe_with_ours_written_in():
    cfg = load_config(None, SegmentationConfig, ["engine=mmseg", "model.backbone=resnet18d", "train.batch_size=8",
                                                  "train.accum_steps=2", "optim.warmup_iters=10", "model.aux_weight=0",
                                                  "data.num_classes=2", "data.class_names=[road, car]"])
    mc = mmseg_engine.build_mmseg_config(cfg)
    assert mc.model.backbone.type == "TricksBackbone" and mc.model.auxiliary_head is None
    assert mc.model.decode_head.in_channels == 512 and mc.model.decode_head.num_classes == 2
    assert mc.model.decode_head.norm_cfg.type == "BN"  # SyncBN only under DDP on CUDA
    assert mc.data_preprocessor.mean == pytest.approx([123.68, 116.779, 103.939])
    assert mc.optim_wrapper.optimizer.lr == pytest.approx(0.01 * 16 / 16)  # 8 images x 2 accumulation steps
    assert mc.optim_wrapper.accumulative_counts == 2
    assert [s.type for s in mc.param_scheduler] == ["LinearLR", "PolyLR"]
    assert mc.param_scheduler[1].eta_min == pytest.approx(1e-4)
    assert mc.train_dataloader.dataset.type == "BaseSegDataset"
    assert mc.train_dataloader.dataset.metainfo.classes == ("road", "car")
    assert mc.get("compile") is None  # eager by default
    compiled = mmseg_engine.build_mmseg_config(load_config(None, SegmentationConfig, ["train.compile=true"]))
    assert compiled.compile is True  # mmengine's Runner compiles the model's train_step
    # the torch engine's photometric_on=device has no mmseg counterpart: said, not ignored
    with pytest.raises(ConfigError, match="data.photometric_on=device is the torch engine's"):
        mmseg_engine.build_mmseg_config(load_config(None, SegmentationConfig, ["data.photometric_on=device"]))


def test_shipped_config_is_the_80k_ade20k_recipe():
    configs = Path(__file__).parents[1] / "configs" / "segmentation"
    cfg = load_config(configs / "fcn_resnet50d-d8_4xb4-80k_ade20k-512x512_mmseg.yaml", SegmentationConfig)
    assert cfg.engine == "mmseg"
    assert cfg.model.weights.endswith("resnet50d_8xb128_efficient-cosine-ls_imagenet/model.safetensors")
    mc = mmseg_engine.build_mmseg_config(cfg)
    assert mc.train_dataloader.dataset.type == "ADE20KDataset" and mc.train_dataloader.batch_size == 4
    assert mc.train_cfg.max_iters == 80000 and mc.train_cfg.val_interval == 8000
    assert mc.model.backbone.name == "resnet50d" and mc.model.decode_head.in_channels == 2048
    assert mc.model.auxiliary_head.in_channels == 1024 and mc.model.auxiliary_head.loss_decode.loss_weight == 0.4


def test_scale_schedule_runs_the_recipes_epochs(tmp_path, caplog):
    """Global batch 4 against the recipe's 16: train.scale_schedule=true runs 4x the iterations."""
    root = tmp_path / "ADEChallengeData2016"
    _write_ade20k(root, {"training": 4, "validation": 1}, num_classes=3)
    out = tmp_path / "run"
    cfg = load_config(None, SegmentationConfig, [
        "engine=mmseg", f"data.root={tmp_path}", f"output_dir={out}", "model.backbone=resnet18d",
        "model.kwargs={width_mult: 0.25}", "model.channels=16", "model.aux_channels=8", "data.num_classes=3",
        "data.scale=[40, 32]", "data.crop_size=[32, 32]", "data.workers=0", "train.batch_size=4",
        "train.max_iter=1", "train.eval_every=0", "train.checkpoint_every=1", "train.log_every=1",
        "train.scale_schedule=true"])
    with caplog.at_level("WARNING", logger="runtime.schedules"):
        mmseg_engine.train(cfg)
    assert sorted(p.name for p in out.glob("iter_*.pth")) == ["iter_4.pth"]  # the period too: 1 -> 4
    assert [r["step"] for r in _scalars(out) if "loss" in r] == [1, 2, 3, 4]
    assert any("runs 4 iterations instead of 1" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("amx", [True, False])
def test_auto_precision_picks_the_optimizer_wrapper_the_device_computes_fast(monkeypatch, amx):
    """train.precision=auto through mmengine: on a CPU with AMX the bf16 autocast wrapper, otherwise fp32's
    plain wrapper; on CUDA mmengine's AmpOptimWrapper with dynamic loss scaling (fp16)."""
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"amx_bf16": amx, "amx_tile": amx})
    cfg = load_config(None, SegmentationConfig, ["engine=mmseg", "train.precision=auto"])
    cpu = mmseg_engine._optim_wrapper(cfg, 0.01, on_cuda=False)
    assert cpu["type"] == ("CPUAutocastOptimWrapper" if amx else "TricksOptimWrapper")
    cuda = mmseg_engine._optim_wrapper(cfg, 0.01, on_cuda=True)
    assert cuda["type"] == "TricksAmpOptimWrapper" and cuda["loss_scale"] == "dynamic"


def test_auto_precision_keeps_fp32_for_a_depthwise_backbone(monkeypatch):
    """auto in the mmseg engine looks at the backbone as the torch engine does (built on the meta device: no
    memory): MobileNet's depthwise convolutions stay fp32 on a CPU where ResNet takes the bf16 wrapper."""
    from runtime import precision

    monkeypatch.setattr(precision, "cpu_bf16_is_fast", lambda: True)
    for backbone, wrapper in (("mobilenet", "TricksOptimWrapper"), ("resnet18d", "CPUAutocastOptimWrapper")):
        cfg = load_config(None, SegmentationConfig, ["engine=mmseg", "train.precision=auto", f"model.backbone={backbone}"])
        assert mmseg_engine._optim_wrapper(cfg, 0.01, on_cuda=False)["type"] == wrapper
