"""torchrun DDP on CPU (gloo, 2 processes) reaches the same weights as 1 process with the same global batch."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from backbones import load_state_dict
from test_train import one_thread  # noqa: F401 (a fixture)

REPO = Path(__file__).resolve().parents[1]
# BN in eval mode (norm_eval) and no random augmentation: every quantity is independent of how the
# global batch is split over processes, so 2 x 8 and 1 x 16 must give the same update.
COMMON = [
    "model.name=resnet18d", "model.norm_eval=true", "data.name=synthetic", "data.synthetic_size=96",
    "data.img_size=16", "data.val_resize=16", "data.val_crop=16", "data.workers=0", "data.num_classes=4",
    "data.min_area=1.0", "data.hflip=0", "data.brightness=0", "data.contrast=0", "data.saturation=0",
    "data.lighting=0", "train.epochs=1", "train.max_steps=4", "optim.lr=0.4", "optim.warmup_epochs=0.5",
    "optim.schedule=cosine", "train.label_smoothing=0.1", "optim.no_bias_decay=true",
]


def _run(args, nproc, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc > 1 else [sys.executable])
    res = subprocess.run([*launcher, "-m", "tricks", "train", *args], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


@pytest.mark.slow
def test_two_process_ddp_matches_single_process(tmp_path):
    out1 = _run([*COMMON, "train.batch_size=16", f"output_dir={tmp_path / 'single'}"], 1, tmp_path)
    out2 = _run([*COMMON, "train.batch_size=8", f"output_dir={tmp_path / 'ddp'}"], 2, tmp_path)
    a = load_state_dict(tmp_path / "single" / "model.safetensors")
    b = load_state_dict(tmp_path / "ddp" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6, msg=k)
    # The weights moved (fc.bias starts at 0): the comparison is not between two initialisations.
    assert a["fc.bias"].abs().max() > 1e-3
    # Validation is sharded without padding and summed over ranks: same images, same accuracy.
    summary1, summary2 = (next(line for line in out.splitlines() if line.startswith("top-1")) for out in (out1, out2))
    assert "(24 images)" in summary1 and summary1 == summary2


@pytest.mark.slow
def test_detection_two_process_ddp_trains_and_evaluates_sharded(tmp_path):
    """`tricks train` (task=detection) under torchrun (gloo, 2 x 1 image): training runs, the sharded VOC07
    evaluation gathered over ranks equals a single-process evaluation of the saved weights, image by image."""
    from test_detection_train import TINY, make_devkit

    devkit = make_devkit(tmp_path / "VOCdevkit")
    out = tmp_path / "ddp"
    ranks = _train_recording_every_rank(tmp_path, "detection.train:train_detector", [
        "task=detection", *TINY, f"data.root={devkit}", "train.batch_size=1", "train.max_iter=4",
        "model.score_thresh_test=0.0", f"output_dir={out}"])
    for rank in ranks:  # every rank reports the gathered result
        assert sorted(rank["detections"]) == ["000100", "000101", "000102", "000103"]
    _assert_one_process_eval_gives(ranks[0]["detections"], out, tmp_path, VOC_NAMES)


# A classification run as `tricks train` does it; then every rank saves its own model (initial and final
# weights) and metrics as rank<RANK>.pt: model.safetensors holds rank 0's alone.
_TRAIN_AND_SAVE_EVERY_RANK = """
import os, sys
import torch
import classification.train as train_mod
from classification.config import Config
from runtime.config import load_config

models, initial, build_model = [], [], train_mod.build_model
def keep(cfg, num_classes):
    models.append(build_model(cfg, num_classes))
    initial.append({k: v.clone() for k, v in models[-1].state_dict().items()})
    return models[-1]
train_mod.build_model = keep
cfg = load_config(None, Config, sys.argv[1:])
metrics = train_mod.train(cfg)
torch.save({"initial": initial[0], "final": models[0].state_dict(), "metrics": metrics},
           os.path.join(cfg.output_dir, "rank%s.pt" % os.environ["RANK"]))
"""

# The default recipe's random augmentation (random-resized crops, flips, colour and PCA lighting noise) on a
# quarter-width resnet18d; COMMON without the lines that turn augmentation off.
AUGMENTED = [
    "model.name=resnet18d", "model.width_mult=0.25", "data.name=synthetic", "data.synthetic_size=96",
    "data.img_size=16", "data.val_resize=16", "data.val_crop=16", "data.workers=0", "data.num_classes=4",
    "train.epochs=1", "train.max_steps=4", "optim.lr=0.4", "optim.warmup_epochs=0.5", "optim.schedule=cosine",
    "train.label_smoothing=0.1", "optim.no_bias_decay=true",
]


def _train_on_two_ranks(tmp_path, args) -> list[dict]:
    """torchrun (gloo, 2 processes) of ``_TRAIN_AND_SAVE_EVERY_RANK``; each rank's initial/final weights and metrics."""
    script = tmp_path / "train_and_save_every_rank.py"
    script.write_text(_TRAIN_AND_SAVE_EVERY_RANK)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script), *args, "train.batch_size=8", f"output_dir={tmp_path / 'ddp'}"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    ranks = [torch.load(tmp_path / "ddp" / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    saved = load_state_dict(tmp_path / "ddp" / "model.safetensors")
    for k, v in saved.items():  # what the run exports is rank 0's model
        assert torch.equal(v, ranks[0]["final"][k]), k
    return ranks


def _assert_ranks_identical(ranks: list[dict]) -> None:
    r0, r1 = ranks
    assert r0["final"].keys() == r1["final"].keys()
    for k in r0["final"]:  # DDP broadcasts rank 0's initial weights, then all-reduces every gradient
        assert torch.equal(r0["final"][k], r1["final"][k]), k
    val0, val1 = ({k: r["metrics"][k] for k in ("top1", "top5", "loss", "images")} for r in ranks)
    assert val0 == val1 and val0["images"] == 24  # the sharded validation, summed over ranks: one result
    moved = max((r0["final"][k] - r0["initial"][k]).abs().max().item() for k in r0["initial"] if "weight" in k)
    assert moved > 1e-3


@pytest.mark.slow
def test_two_process_ddp_with_augmentation_matches_single_process(tmp_path, monkeypatch, one_thread):
    """With random augmentation the 2 x 8 run still equals 1 x 16, given the single process the per-sample
    seeds of two ranks. A sample's augmentation seed hashes (seed, epoch, rank, index); the DistributedSampler
    gives the sample at position j of the epoch's order to rank j % 2, and steps cover the same 16 positions."""
    import classification.train as train_mod
    from classification.config import Config
    from runtime.config import load_config
    from runtime.data import SeededSampler, sample_seed

    args = [*AUGMENTED, "model.norm_eval=true"]  # BN statistics would depend on the split of the batch
    ranks = _train_on_two_ranks(tmp_path, args)
    _assert_ranks_identical(ranks)

    class SeedsOfTwoRanks(SeededSampler):
        def __iter__(self):
            for position, index in enumerate(self.sampler):
                yield index, sample_seed(self.seed, self.epoch, position % 2, index)

    monkeypatch.setattr(train_mod, "SeededSampler", SeedsOfTwoRanks)
    cfg = load_config(None, Config, [*args, "train.batch_size=16", f"output_dir={tmp_path / 'single'}"])
    metrics = train_mod.train(cfg)
    single = load_state_dict(tmp_path / "single" / "model.safetensors")
    for k in single:
        torch.testing.assert_close(ranks[0]["final"][k], single[k], rtol=1e-4, atol=1e-6, msg=k)
    assert metrics["top1"] == ranks[0]["metrics"]["top1"] and metrics["images"] == 24

    # The augmentation was on: with its own seeds (all rank 0) the single process sees other crops.
    monkeypatch.setattr(train_mod, "SeededSampler", SeededSampler)
    train_mod.train(load_config(None, Config, [*args, "train.batch_size=16", f"output_dir={tmp_path / 'own'}"]))
    own = load_state_dict(tmp_path / "own" / "model.safetensors")
    assert (own["fc.weight"] - single["fc.weight"]).abs().max() > 1e-3


@pytest.mark.slow
def test_two_process_ddp_with_mixup_and_batch_statistics_keeps_ranks_identical(tmp_path):
    """Mixup (each rank draws its own lam and mixes within its own 8 images) and BN in train mode (batch
    statistics of each rank's 8 images; DDP broadcasts rank 0's running statistics): no single-process
    run computes the same update, but both ranks must end with the same weights and buffers, bit for bit."""
    _assert_ranks_identical(_train_on_two_ranks(tmp_path, [*AUGMENTED, "train.mixup_alpha=0.2"]))


# `tricks train` as `python -m tricks train` runs it (tricks.cli.main), recording on every rank the result of
# the engine's train function (RECORD=module:function) and, for detectron2, how many times its trainer ran
# inference on the test set (rank<RANK>.pt in output_dir).
_TRAIN_RECORDING_EVERY_RANK = """
import importlib, os, sys
import torch
from tricks.cli import main

module_name, function = os.environ["RECORD"].split(":")
module = importlib.import_module(module_name)
results, runs, train = [], [], getattr(module, function)
def recorded(cfg):
    results.append(train(cfg))
    return results[-1]
setattr(module, function, recorded)
if module_name == "detection.d2_engine":
    module.import_detectron2()  # the shims detectron2 v0.6 needs first
    from detectron2.engine import defaults
    inference = defaults.inference_on_dataset
    def counted(*args, **kwargs):
        runs.append(1)
        return inference(*args, **kwargs)
    defaults.inference_on_dataset = counted
assert main(["train", *sys.argv[1:]]) == 0
detections = {k: (v.boxes, v.labels, v.scores) for k, v in results[0].get("detections", {}).items()}
torch.save({"evaluations": len(runs), "detections": detections, "mAP": results[0].get("mAP")},
           os.path.join(sys.argv[-1].split("=", 1)[1], "rank%s.pt" % os.environ["RANK"]))
"""

VOC_NAMES = None  # the 20 VOC classes


def _train_recording_every_rank(tmp_path, record: str, args) -> list[dict]:
    """torchrun (gloo, 2 processes) of ``_TRAIN_RECORDING_EVERY_RANK``; args end with output_dir=..."""
    script = tmp_path / "train_recording_every_rank.py"
    script.write_text(_TRAIN_RECORDING_EVERY_RANK)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "RECORD": record}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    out = Path(args[-1].split("=", 1)[1])
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


def _assert_one_process_eval_gives(gathered: dict, out: Path, tmp_path, classes) -> None:
    """`tricks eval <out>/config.yaml <out>/model_final.pth --write-results` in one process writes, image by
    image, the detections ``gathered`` ({image_id: (boxes, labels, scores)}) from the sharded evaluation."""
    import numpy as np

    from detection.voc import resolve_classes
    from detection.voc_eval import read_voc_results

    assert sum(len(boxes) for boxes, _, _ in gathered.values()) > 0
    results = tmp_path / "results"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-m", "tricks", "eval", str(out / "config.yaml"), str(out / "model_final.pth"),
                          "--write-results", str(results)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    single = read_voc_results(results, resolve_classes(classes))  # per image, grouped by class in file order
    assert sorted(single) == sorted(k for k, (boxes, _, _) in gathered.items() if len(boxes))
    for image_id, (boxes, labels, scores) in gathered.items():
        if not len(boxes):
            continue
        order = np.lexsort((-scores, labels))  # the files' grouping: by class, then by score (both sort by it)
        theirs = single[image_id]
        assert len(theirs.boxes) == len(boxes), image_id
        np.testing.assert_array_equal(theirs.labels, labels[order])
        np.testing.assert_allclose(theirs.scores, scores[order], rtol=0, atol=1e-6)
        np.testing.assert_allclose(theirs.boxes, boxes[order], rtol=0, atol=1e-4)


@pytest.mark.slow
def test_detectron2_two_process_trains_evaluates_once_and_matches_one_process_eval(tmp_path):
    """`tricks train ... engine=detectron2` under torchrun on CPU (gloo, 2 x 1 image): training ends, each
    rank runs the test set once (the end-of-training evaluation, sharded), and the detections gathered on
    rank 0 are those of `tricks eval` of the saved checkpoint in one process, image by image."""
    pytest.importorskip("detectron2")
    from test_d2_engine import CLASSES, write_devkit

    write_devkit(tmp_path, {"trainval": ["000001", "000002", "000003", "000004"],
                            "test": ["000005", "000006", "000007"]})  # odd: the shards differ in size
    out = tmp_path / "d2ddp"
    args = ["task=detection", "engine=detectron2", "model.backbone=resnet18d", "model.norm=batchnorm",
            "model.frozen_stages=0", "model.min_size_train=[64, 96]", "model.min_size_test=80", "model.max_size=128",
            "model.fpn_channels=32", "model.box_fc_dim=64", "model.roi_batch_per_image=32",
            "model.rpn_pre_nms_topk_train=50", "model.rpn_post_nms_topk_train=50", "model.rpn_pre_nms_topk_test=50",
            "model.rpn_post_nms_topk_test=50", "model.score_thresh_test=0.0",
            f"data.root={tmp_path}", "data.train_splits=2007-trainval", "data.test_splits=2007-test",
            f"data.classes=[{', '.join(CLASSES)}]", "data.workers=0", "optim.lr=0.01", "optim.warmup_iters=1",
            "optim.milestones=[100]", "train.max_iter=3", "train.batch_size=1", "train.log_every=1",
            "train.checkpoint_every=100", "train.visualize=0", f"output_dir={out}"]
    ranks = _train_recording_every_rank(tmp_path, "detection.d2_engine:train", args)
    assert [r["evaluations"] for r in ranks] == [1, 1]
    assert ranks[1]["detections"] == {} and ranks[0]["mAP"] is not None
    assert sorted(ranks[0]["detections"]) == ["000005", "000006", "000007"]
    _assert_one_process_eval_gives(ranks[0]["detections"], out, tmp_path, CLASSES)
