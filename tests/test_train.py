"""The classification trainer end to end on tiny synthetic data (CPU): learning, exact resume,
clean stop on a non-finite loss, distillation/mixup wiring, evaluation, run artefacts."""
import math
from pathlib import Path

import pytest
import yaml
import torch
import torchvision.transforms.v2.functional as tvF

import classification.train as train_mod
from conftest import crash_after_checkpoint
from backbones import create_backbone, load_state_dict, read_metadata, save_weights
from classification.config import Config
from runtime.logger import read_records
from classification.train import TrainingDiverged, evaluate_checkpoint, train
from runtime.config import load_config

TINY = [
    "model.name=resnet18d", "data.name=synthetic", "data.synthetic_size=96", "data.img_size=16",
    "data.val_resize=16", "data.val_crop=16", "data.workers=0", "data.num_classes=4",
    "train.batch_size=16", "train.epochs=2", "train.log_every=2", "optim.lr=0.4", "optim.warmup_epochs=0.5",
    "optim.schedule=cosine", "train.label_smoothing=0.1", "optim.no_bias_decay=true", "model.zero_init_last=true",
]


def tiny(tmp_path: Path, *extra: str, name: str = "run") -> Config:
    return load_config(None, Config, [*TINY, f"output_dir={tmp_path / name}", *extra])


def test_train_learns_and_writes_artefacts(tmp_path):
    cfg = tiny(tmp_path, "train.epochs=3", "data.mean=[0.45,0.45,0.4]", "data.std=[0.25,0.25,0.3]")
    metrics = train(cfg)
    out = Path(cfg.output_dir)
    assert metrics["top1"] > 60  # 4 well-separated classes; chance is 25%
    for name in ("config.yaml", "last.pth", "best.pth", "model.safetensors", "metrics.jsonl", "loss.png",
                 "accuracy.png", "lr.png"):
        assert (out / name).is_file(), name
    assert load_config(out / "config.yaml", Config) == cfg  # the resolved config round-trips
    assert torch.load(out / "last.pth", weights_only=True)["normalization"] == {"mean": [0.45, 0.45, 0.4],
                                                                                "std": [0.25, 0.25, 0.3]}
    val = read_records(out / "metrics.jsonl", "val")
    assert [r["epoch"] for r in val] == [1, 2, 3]
    lrs = [r["lr"] for r in read_records(out / "metrics.jsonl", "train")]
    assert max(lrs) <= 0.4 * 16 / 256 + 1e-12  # linear scaling: 0.4 per 256 images, batch 16
    # the weights' metadata: the run's normalisation and evaluation size (exports print them), not ImageNet's
    from backbones import read_metadata

    meta = read_metadata(out / "model.safetensors")
    assert meta["mean"] == [0.45, 0.45, 0.4] and meta["std"] == [0.25, 0.25, 0.3]
    assert meta["input_size"] == [cfg.model.in_chans, cfg.data.val_crop, cfg.data.val_crop]
    meta = read_metadata(out / "model.safetensors")
    assert meta["architecture"] == "resnet18d" and meta["top1"] == pytest.approx(metrics["top1"])
    # tricks eval on the exported weights reproduces the final validation accuracy.
    again = evaluate_checkpoint(cfg, str(out / "model.safetensors"))
    assert again["top1"] == pytest.approx(metrics["top1"]) and again["images"] == metrics["images"]


class _Interrupt(Exception):
    pass


def _interrupt_after_first_epoch(epoch, metrics):
    if epoch == 0:
        raise _Interrupt


@pytest.mark.parametrize("pipeline", ["samples", "tensor", "hybrid"])
def test_resume_is_exact(tmp_path, pipeline):
    """Interrupted after epoch 1 and resumed == uninterrupted, bit for bit (mixup and aug included)."""
    extra = ("train.mixup_alpha=0.2", "data.workers=2", "train.epochs=3", f"data.pipeline={pipeline}")
    full = tiny(tmp_path, *extra, name="full")
    train(full)
    part = tiny(tmp_path, *extra, name="part")
    with pytest.raises(_Interrupt):
        train(part, callbacks=[_interrupt_after_first_epoch])
    assert torch.load(Path(part.output_dir) / "last.pth", weights_only=True)["epoch"] == 1
    resumed = tiny(tmp_path, *extra, "train.resume=auto", name="part")
    train(resumed)
    a = load_state_dict(Path(full.output_dir) / "model.safetensors")
    b = load_state_dict(Path(part.output_dir) / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("precision, check", [("fp32", "log"), ("fp16", "checkpoint")])
def test_nonfinite_loss_stops_cleanly_and_keeps_checkpoint(tmp_path, monkeypatch, precision, check):
    """Resumed at step 6 with a NaN loss from step 7 on (max_nonfinite=3: reached at step 9). The streak is
    read where the loop syncs: the log step 10 (log_every=2), or, logging rarely, the checkpoint of step 10
    (checkpoint_every=5), which it must stop before writing."""
    every = ("train.log_every=2",) if check == "log" else ("train.log_every=1000", "train.checkpoint_every=5")
    cfg = tiny(tmp_path, "train.epochs=1", f"train.precision={precision}", *every)
    train(cfg)
    last = Path(cfg.output_dir) / "last.pth"
    before = last.read_bytes()

    class NaNLoss(train_mod.ClassificationLoss):
        def forward(self, logits, target, teacher_logits=None):
            return super().forward(logits, target, teacher_logits) * float("nan")

    monkeypatch.setattr(train_mod, "ClassificationLoss", NaNLoss)
    resumed = tiny(tmp_path, "train.epochs=2", "train.resume=auto", "train.max_nonfinite=3",
                   f"train.precision={precision}", *every)
    seen = "epoch 1, step 10" if check == "log" else "step 10"
    with pytest.raises(TrainingDiverged, match=rf"non-finite for 4 steps in a row \(train.max_nonfinite=3; "
                                               rf"seen at {seen}\).*last.pth"):
        train(resumed)
    assert last.read_bytes() == before  # the last good checkpoint is untouched


def test_distillation_teacher_frozen_and_mixup_changes_training(tmp_path):
    teacher = create_backbone("resnet18d", num_classes=4)
    save_weights(teacher, tmp_path / "teacher.safetensors")
    ref = {k: v.clone() for k, v in teacher.state_dict().items()}
    seen = {}
    original = train_mod.create_backbone

    def spy(name, **kw):
        model = original(name, **kw)
        if kw.get("weights") == str(tmp_path / "teacher.safetensors"):
            seen["teacher"] = model
        return model

    train_mod.create_backbone = spy
    try:
        cfg = tiny(tmp_path, "train.epochs=1", "distill.teacher=resnet18d",
                   f"distill.teacher_weights={tmp_path / 'teacher.safetensors'}", "distill.temperature=20",
                   name="distill")
        train(cfg)
    finally:
        train_mod.create_backbone = original
    t = seen["teacher"]
    assert not t.training and not any(p.requires_grad for p in t.parameters())
    for k, v in t.state_dict().items():  # weights and BN statistics untouched
        assert torch.equal(v, ref[k]), k

    plain = tiny(tmp_path, "train.epochs=1", "train.max_steps=2", name="plain")
    mixed = tiny(tmp_path, "train.epochs=1", "train.max_steps=2", "train.mixup_alpha=0.2", name="mixed")
    train(plain)
    train(mixed)
    a = load_state_dict(Path(plain.output_dir) / "model.safetensors")
    b = load_state_dict(Path(mixed.output_dir) / "model.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="teacher_weights"):
        train(tiny(tmp_path, "distill.teacher=resnet18d"))
    with pytest.raises(ValueError, match="teacher_img_size=8: .* with distill.teacher set"):
        train(tiny(tmp_path, "distill.teacher_img_size=8"))  # no teacher to show the resized batch to
    with pytest.raises(ValueError, match="train.eval_every=-1: must be >= 0"):
        train(tiny(tmp_path, "train.eval_every=-1"))


def test_eval_every_zero_evaluates_only_after_the_last_epoch(tmp_path):
    cfg = tiny(tmp_path, "train.eval_every=0")
    metrics = train(cfg)
    assert [r["epoch"] for r in read_records(Path(cfg.output_dir) / "metrics.jsonl", "val")] == [2]
    assert metrics["epoch"] == 2


def test_fp16_grad_scaler_learns_and_resumes_exactly(tmp_path):
    """The CUDA recipe's fp16 path (autocast + GradScaler, fp32 master weights) run on CPU."""
    extra = ("train.precision=fp16", "train.epochs=3")
    full = tiny(tmp_path, *extra, name="full")
    metrics = train(full)
    assert metrics["top1"] > 60
    ckpt = torch.load(Path(full.output_dir) / "last.pth", weights_only=True)
    scale = ckpt["scaler"]["scale"]  # 2^16 at the start, halved per overflow, no growth before 2000 steps
    assert scale <= 2.0 ** 16 and math.log2(scale).is_integer()
    assert all(v.dtype == torch.float32 for v in ckpt["model"].values() if v.is_floating_point())
    part = tiny(tmp_path, *extra, name="part")
    with pytest.raises(_Interrupt):
        train(part, callbacks=[_interrupt_after_first_epoch])
    train(tiny(tmp_path, *extra, "train.resume=auto", name="part"))
    a = load_state_dict(Path(full.output_dir) / "model.safetensors")
    b = load_state_dict(Path(part.output_dir) / "model.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_fp16_overflow_skips_the_step_and_halves_the_scale(tmp_path, monkeypatch):
    calls = {"n": 0}

    class OneInfLoss(train_mod.ClassificationLoss):
        def forward(self, logits, target, teacher_logits=None):
            calls["n"] += 1
            loss = super().forward(logits, target, teacher_logits)
            return loss * float("inf") if calls["n"] == 3 else loss

    monkeypatch.setattr(train_mod, "ClassificationLoss", OneInfLoss)
    cfg = tiny(tmp_path, "train.precision=fp16", "train.epochs=1", "train.max_nonfinite=5")
    train(cfg)  # a non-finite step is skipped, the run goes on
    assert calls["n"] == 6
    ckpt = torch.load(Path(cfg.output_dir) / "last.pth", weights_only=True)
    # Every skipped step (the inf one, and any real fp16 overflow) halved the scale once and was counted
    # (that a skipped step leaves weights and momentum untouched: tests/test_step.py).
    assert ckpt["stepper"]["skipped_steps"] == round(math.log2(2.0 ** 16 / ckpt["scaler"]["scale"])) >= 1


@pytest.mark.parametrize("pipeline", ["tensor", "hybrid"])
def test_batched_pipelines_learn(tmp_path, pipeline):
    metrics = train(tiny(tmp_path, f"data.pipeline={pipeline}", "train.epochs=3"))
    assert metrics["top1"] > 60


def _first_batches(cfg, mean, std):
    """(train images, labels, val images) of ``build_data``'s first batches, and its (train, val) prepare."""
    from classification.train import build_data
    from runtime.distributed import DistInfo

    info = DistInfo(0, 0, 1, torch.device("cpu"))
    train_loader, val_loader, train_prepare, val_prepare, *_ = build_data(cfg, mean, std, info)
    (images, labels, _), (val_images, _, _) = next(iter(train_loader)), next(iter(val_loader))
    return (images, labels, val_images), (train_prepare, val_prepare)


def test_hybrid_pipeline_is_the_per_sample_pipeline_with_the_colour_steps_per_batch(tmp_path):
    """data.pipeline=hybrid: the workers ship the per-sample pipeline's crops and flips as uint8 (the same draws:
    each sample under its own seed) and ``prepare`` on the device normalises them to the per-sample pipeline's
    network input, in training and validation; the colour jitter and lighting run there, per batch, and only there."""
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    small = ("data.synthetic_size=32", "data.img_size=12")
    off = ("data.brightness=0", "data.contrast=0", "data.saturation=0", "data.lighting=0")
    (ref, ref_labels, ref_val), _ = _first_batches(tiny(tmp_path, "data.pipeline=samples", *small, *off), mean, std)
    (images, labels, val_images), (train_prep, val_prep) = _first_batches(
        tiny(tmp_path, "data.pipeline=hybrid", *small, *off), mean, std)
    assert images.dtype == val_images.dtype == torch.uint8 and ref.dtype == torch.float32
    assert torch.equal(labels, ref_labels) and images.shape == ref.shape == (16, 3, 12, 12)
    torch.testing.assert_close(train_prep(images), ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(val_prep(val_images), ref_val, rtol=0, atol=1e-5)
    # colour on: the workers' uint8 crops are the same; the device adds the jitter, a different factor per image
    (coloured, _, _), (train_prep, _) = _first_batches(
        tiny(tmp_path, "data.pipeline=hybrid", *small, "data.brightness=0.4", "data.contrast=0", "data.saturation=0",
             "data.lighting=0"), [0.0] * 3, [1.0] * 3)
    assert torch.equal(coloured, images)
    factors = train_prep(coloured).flatten(1).sum(1) / (coloured.float() / 255).flatten(1).sum(1)
    assert factors.min() >= 0.6 - 1e-4 and factors.max() <= 1.4 + 1e-4 and factors.std() > 0.05


def test_demo_command_runs_every_stage_on_fashion_mnist(tmp_path, capsys):
    """The README's main job, shortened: Table 5, pretraining, both transfer stages and the report."""
    from tricks.cli import main

    if not Path("/usr/share/datasets/fashion-mnist").is_dir():
        pytest.skip("dataset-fashion-mnist is not installed (scripts/setup.sh installs it)")
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--scenes", "16", "8", "classification.train.max_steps=3",
                 "segmentation.train.max_iter=2", "segmentation.train.eval_every=0", "segmentation.data.workers=0",
                 "detection.train.max_iter=2", "detection.optim.warmup_iters=1", "detection.optim.milestones=[1]",
                 "detection.data.workers=0", "detection.train.visualize=2"]) == 0
    printed = capsys.readouterr().out
    assert "resnet50d" in printed and "(10000 images)" in printed and "mIoU" in printed and "VOC07 mAP" in printed
    assert (out / "classification" / "model.safetensors").is_file()
    # The transfer stages start from the pretrained weights, normalised as the classification run was.
    for stage in ("segmentation", "detection"):
        cfg = yaml.safe_load((out / stage / "config.yaml").read_text())
        assert cfg["model"]["weights"] == str(out / "classification" / "model.safetensors")
        assert cfg["data"]["mean"] == [0.286] * 3 and cfg["data"]["std"] == [0.353] * 3
    assert len(list((out / "segmentation" / "overlays").glob("*.png"))) == 4
    assert len(list((out / "detection" / "detections").glob("*.png"))) == 2
    report = (out / "REPORT.md").read_text()
    for needle in ("| classification | top-1", "| segmentation | mIoU", "| detection | VOC07 mAP", "overlays/",
                   "detections/", "tricks train configs/detection/fashion_voc/"):
        assert needle in report


def test_demo_overrides_name_their_stage():
    from runtime.config import ConfigError
    from tricks.demo import split_overrides

    assert split_overrides(["detection.train.max_iter=5"])["detection"] == ["train.max_iter=5"]
    with pytest.raises(ConfigError, match="<stage>.<key>=<value>"):
        split_overrides(["train.epochs=3"])


def test_default_normalization_draws_no_random_numbers():
    from classification.train import normalization
    cfg = load_config(None, Config, ["model.name=resnet50d"])
    state = torch.random.get_rng_state()
    mean, std = normalization(cfg)
    assert torch.equal(state, torch.random.get_rng_state())
    assert mean == pytest.approx([123.68 / 255, 116.779 / 255, 103.939 / 255], abs=1e-3) and len(std) == 3
    with pytest.raises(ValueError, match="one value per input channel"):
        normalization(load_config(None, Config, ["model.in_chans=1"]))


def test_null_normalization_takes_the_weights_own_and_warns_on_a_different_one(tmp_path, caplog):
    """As timm takes a pretrained model's mean/std: data.mean/std null -> those the weights were trained with
    (a model.safetensors's metadata, a last.pth's config), when they have one value per input channel; given
    values that differ are kept, with a warning; other files -> the backbone's defaults."""
    import logging

    from runtime.data import normalization

    model = create_backbone("resnet18d", num_classes=4, width_mult=0.25)
    saved = save_weights(model, tmp_path / "model.safetensors", metadata={"mean": [0.9] * 3, "std": [0.05] * 3})
    pth = tmp_path / "last.pth"
    torch.save({"model": model.state_dict(), "config": {"data": {"mean": [0.2] * 3, "std": [0.3] * 3}}}, pth)
    plain = save_weights(model, tmp_path / "plain.safetensors")  # no mean/std recorded
    args = ("resnet18d", 3, {"width_mult": 0.25})
    imagenet = normalization(None, None, *args)
    assert normalization(None, None, *args, weights=str(saved)) == ([0.9] * 3, [0.05] * 3)
    assert normalization(None, None, *args, weights=str(pth)) == ([0.2] * 3, [0.3] * 3)
    assert normalization(None, None, *args, weights=str(plain)) == imagenet
    assert normalization(None, None, *args, weights=str(tmp_path / "gone.safetensors")) == imagenet
    # a 1-channel pretraining's statistics do not apply to a 3-channel network (its stem is spread over RGB)
    one = save_weights(model, tmp_path / "one.safetensors", metadata={"mean": [0.3], "std": [0.4]})
    assert normalization(None, None, *args, weights=str(one)) == imagenet
    with caplog.at_level(logging.WARNING):
        assert normalization([0.5] * 3, [0.25] * 3, *args, weights=str(saved)) == ([0.5] * 3, [0.25] * 3)
    assert "differ from the [0.9, 0.9, 0.9]" in caplog.text and "model.safetensors" in caplog.text


def test_eval_normalises_as_the_run_it_evaluates(tmp_path):
    """A run trained with its own data.mean/std, evaluated with a config that leaves them null, scores exactly as
    with them given (it used the backbone's ImageNet defaults before)."""
    cfg = tiny(tmp_path, "data.mean=[0.9, 0.9, 0.9]", "data.std=[0.05, 0.05, 0.05]", "train.epochs=1")
    train(cfg)
    run = Path(cfg.output_dir)
    given = tiny(tmp_path, "data.mean=[0.9, 0.9, 0.9]", "data.std=[0.05, 0.05, 0.05]")
    for name in ("model.safetensors", "last.pth"):
        expected = evaluate_checkpoint(given, str(run / name))
        assert evaluate_checkpoint(tiny(tmp_path), str(run / name)) == expected


def test_evaluate_hflip_tta_averages_probabilities():
    from contextlib import nullcontext

    from classification.train import evaluate
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(2 * 4 * 4, 5))
    images, labels = torch.randn(16, 2, 4, 4), torch.randint(0, 5, (16,))
    loader = [(images[:10], labels[:10], 0), (images[10:], labels[10:], 0)]
    with torch.no_grad():
        probs = (net(images).softmax(1) + net(images.flip(-1)).softmax(1)) / 2
    expected_top1 = 100 * (probs.argmax(1) == labels).float().mean().item()
    expected_loss = torch.nn.functional.nll_loss(probs.log(), labels).item()
    got = evaluate(net, loader, torch.device("cpu"), nullcontext, channels_last=False, hflip_tta=True)
    assert got["top1"] == pytest.approx(expected_top1) and got["loss"] == pytest.approx(expected_loss, rel=1e-5)
    plain = evaluate(net, loader, torch.device("cpu"), nullcontext, channels_last=False)
    with torch.no_grad():
        assert plain["loss"] == pytest.approx(torch.nn.functional.cross_entropy(net(images), labels).item(), rel=1e-5)


def test_evaluate_translate_tta_weights_the_shifted_views():
    """data.val_translate_tta=1: probabilities 1/2 of the image, 1/4 of each diagonal shift by one pixel
    (reflect-padded), each view with its mirror image under hflip_tta (airbench's TTA)."""
    from contextlib import nullcontext

    from classification.train import evaluate
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(2 * 4 * 4, 5))
    images, labels = torch.randn(16, 2, 4, 4), torch.randint(0, 5, (16,))
    loader = [(images[:10], labels[:10], 0), (images[10:], labels[10:], 0)]
    padded = torch.nn.functional.pad(images, (1, 1, 1, 1), mode="reflect")
    up_left, down_right = padded[..., :4, :4], padded[..., 2:, 2:]
    assert torch.equal(up_left[..., 1:, 1:], images[..., :3, :3]) and torch.equal(down_right[..., :3, :3], images[..., 1:, 1:])
    for hflip in (False, True):
        def p(x):
            return (net(x).softmax(1) + net(x.flip(-1)).softmax(1)) / 2 if hflip else net(x).softmax(1)
        with torch.no_grad():
            probs = p(images) / 2 + p(up_left) / 4 + p(down_right) / 4
        got = evaluate(net, loader, torch.device("cpu"), nullcontext, channels_last=False, hflip_tta=hflip,
                       translate_tta=1)
        assert got["top1"] == pytest.approx(100 * (probs.argmax(1) == labels).float().mean().item())
        assert got["loss"] == pytest.approx(torch.nn.functional.nll_loss(probs.log(), labels).item(), rel=1e-5)
    seen = []  # evaluation builds no autograd graph (one kept across batches grows without bound)
    net.register_forward_hook(lambda *_: seen.append(torch.is_grad_enabled()))
    evaluate(net, loader, torch.device("cpu"), nullcontext, channels_last=False, hflip_tta=True, translate_tta=1)
    assert len(seen) == 12 and not any(seen)
    with pytest.raises(ValueError, match="data.val_translate_tta=4"):
        evaluate(net, loader, torch.device("cpu"), nullcontext, channels_last=False, translate_tta=4)


@pytest.mark.parametrize("pipeline,workers", [("samples", 2), ("tensor", 0)])
def test_resume_inside_an_epoch_is_exact(tmp_path, monkeypatch, pipeline, workers):
    """train.checkpoint_every: a crash right after the step-4 checkpoint (epoch 1 has 6 steps), then
    train.resume=auto == uninterrupted, bit for bit (augmentation, mixup and persistent workers included)."""
    extra = ("train.mixup_alpha=0.2", f"data.workers={workers}", "train.epochs=2", f"data.pipeline={pipeline}",
             "train.checkpoint_every=4")
    full = tiny(tmp_path, *extra, name="full")
    train(full)
    with crash_after_checkpoint(monkeypatch, train_mod, "step", 4):
        train(tiny(tmp_path, *extra, name="part"))
    assert torch.load(Path(tmp_path / "part" / "last.pth"), weights_only=True)["step"] == 4
    train(tiny(tmp_path, *extra, "train.resume=auto", name="part"))
    a = load_state_dict(Path(full.output_dir) / "model.safetensors")
    b = load_state_dict(tmp_path / "part" / "model.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_logged_lr_is_the_schedule_at_every_step(tmp_path):
    """Warm-up from 0 per iteration, then cosine: every logged lr equals runtime.schedules.lr_at."""
    from runtime.schedules import lr_at

    cfg = tiny(tmp_path, "train.log_every=1", "train.epochs=2")
    train(cfg)
    records = read_records(Path(cfg.output_dir) / "metrics.jsonl", "train")
    base = 0.4 * 16 / 256
    assert [r["step"] for r in records] == list(range(1, 13))
    for r in records:  # logged after step r["step"] (1-based): the lr that step used, lr_at(step - 1)
        assert r["lr"] == pytest.approx(lr_at(r["step"] - 1, base_lr=base, total_steps=12, warmup_steps=3,
                                              schedule="cosine"), abs=1e-12)


# A quarter of resnet18d's channels: the wiring tests below need steps, not capacity (~0.1 s a step on CPU).
NARROW = "model.width_mult=0.25"


@pytest.fixture
def one_thread():
    """torch on one thread: on a shared CPU, threads waiting for each other make tiny models many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("teacher_size", [None, 11])
def test_teacher_sees_exactly_the_students_mixed_batch(tmp_path, monkeypatch, one_thread, teacher_size):
    """Distillation with mixup: at every step the teacher is fed the very (mixed) batch the student trains
    on (resized to distill.teacher_img_size when set), and the loss is the paper's
    l(p, softmax(z)) + T^2 l(softmax(r/T), softmax(z/T)) of that step."""
    weights = tmp_path / "teacher.safetensors"
    save_weights(create_backbone("resnet18d", num_classes=4), weights)
    student_inputs, teacher_inputs, mixups, losses = [], [], [], []
    teachers = []

    def record_input(store, only_training):
        def hook(module, args):
            if module.training or not only_training:  # the student's validation passes are not training
                store.append(args[0].detach().clone())
        return hook

    build_model, create_backbone_, mixup_ = train_mod.build_model, train_mod.create_backbone, train_mod.mixup

    def spy_student(cfg, num_classes):
        model = build_model(cfg, num_classes)
        model.register_forward_pre_hook(record_input(student_inputs, only_training=True))
        return model

    def spy_teacher(name, **kwargs):
        model = create_backbone_(name, **kwargs)
        if kwargs.get("weights") != str(weights):  # the student (build_model), spied above
            return model
        model.register_forward_pre_hook(record_input(teacher_inputs, only_training=False))
        teachers.append(model)
        return model

    def spy_mixup(images, targets, alpha):
        mixed, mixed_targets, lam = mixup_(images, targets, alpha)
        mixups.append((images.clone(), mixed.clone(), lam))
        return mixed, mixed_targets, lam

    class SpyLoss(train_mod.ClassificationLoss):
        def forward(self, logits, target, teacher_logits=None):
            loss = super().forward(logits, target, teacher_logits)
            losses.append((logits.detach().clone(), target.clone(), teacher_logits.clone(), loss.detach().clone()))
            return loss

    monkeypatch.setattr(train_mod, "build_model", spy_student)
    monkeypatch.setattr(train_mod, "create_backbone", spy_teacher)
    monkeypatch.setattr(train_mod, "mixup", spy_mixup)
    monkeypatch.setattr(train_mod, "ClassificationLoss", SpyLoss)
    temperature = 4.0
    train(tiny(tmp_path, NARROW, "train.epochs=1", "train.max_steps=3", "train.mixup_alpha=0.2",
               "distill.teacher=resnet18d", f"distill.teacher_weights={weights}",
               f"distill.temperature={temperature}", f"distill.teacher_img_size={teacher_size or 'null'}"))

    assert len(student_inputs) == len(teacher_inputs) == len(mixups) == len(losses) == 3
    for step, (student_x, teacher_x, (unmixed, mixed, lam), (z, p, r, loss)) in enumerate(
            zip(student_inputs, teacher_inputs, mixups, losses)):
        assert 0 < lam < 1 and not torch.equal(mixed, unmixed), step  # mixup really mixed this batch
        assert torch.equal(student_x, mixed), step
        if teacher_size is None:
            assert torch.equal(teacher_x, student_x), step
        else:  # the student's 16 px batch, shrunk as torchvision's Resize(antialias=True) does
            assert teacher_x.shape[-2:] == (teacher_size, teacher_size), step
            torch.testing.assert_close(teacher_x, tvF.resize(student_x, [teacher_size, teacher_size], antialias=True))
        with torch.no_grad():
            torch.testing.assert_close(teachers[0](teacher_x), r, rtol=0, atol=1e-5)  # r = teacher(that batch)
        soft_teacher = torch.softmax(r.double() / temperature, 1)
        hard = -(p.double() * torch.log_softmax(z.double(), 1)).sum(1).mean()
        soft = -(soft_teacher * torch.log_softmax(z.double() / temperature, 1)).sum(1).mean()
        assert loss.item() == pytest.approx((hard + temperature ** 2 * soft).item(), abs=1e-5), step


def test_mixup_off_epochs_turns_mixup_off_for_exactly_the_last_epochs(tmp_path, monkeypatch, one_thread):
    """train.mixup_off_epochs=2 of 4: every step of epochs 0 and 1 is mixed, no step of epochs 2 and 3."""
    calls_per_epoch = [0]
    mixup_ = train_mod.mixup

    def spy_mixup(images, targets, alpha):
        mixed, mixed_targets, lam = mixup_(images, targets, alpha)
        assert alpha == 0.2 and 0 < lam < 1 and not torch.equal(mixed, images)
        calls_per_epoch[-1] += 1
        return mixed, mixed_targets, lam

    monkeypatch.setattr(train_mod, "mixup", spy_mixup)
    # synthetic_size=48, batch 16: 3 steps an epoch
    train(tiny(tmp_path, NARROW, "data.synthetic_size=48", "train.epochs=4", "train.mixup_alpha=0.2",
               "train.mixup_off_epochs=2"), callbacks=[lambda epoch, metrics: calls_per_epoch.append(0)])
    assert calls_per_epoch == [3, 3, 0, 0, 0]


# Run in a child process: train, and SIGKILL the process halfway through writing the checkpoint of step
# argv[1] (the first half of its bytes is on disk, in the temporary file save_checkpoint renames from).
_KILLED_WHILE_SAVING = """
import io, os, signal, sys
import torch
from classification.config import Config
from classification.train import train
from runtime.config import load_config

kill_at_step, real_save = int(sys.argv[1]), torch.save

def save_then_die_halfway(obj, f, *args, **kwargs):
    if isinstance(obj, dict) and obj.get("step") == kill_at_step:
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        with open(f, "wb") as file:
            file.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            file.flush()
            os.fsync(file.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    real_save(obj, f, *args, **kwargs)

torch.save = save_then_die_halfway  # runtime.checkpoint.save_checkpoint writes through it
train(load_config(None, Config, sys.argv[2:]))
"""


def test_sigkill_inside_an_epoch_resumes_exactly_from_the_last_whole_checkpoint(tmp_path, one_thread):
    """SIGKILL (no exception handler, no cleanup) while the step-7 checkpoint is half written, inside the
    second epoch: last.pth still holds step 6 and loads (the write is atomic), and train.resume=auto from it
    ends with the weights of an uninterrupted run, bit for bit (augmentation and mixup included)."""
    import os
    import signal
    import subprocess
    import sys

    from runtime.checkpoint import load_checkpoint

    # synthetic_size=64, batch 16: 4 steps an epoch; a checkpoint after every step
    extra = (NARROW, "data.synthetic_size=64", "train.epochs=2", "train.mixup_alpha=0.2", "train.checkpoint_every=1")
    full = tiny(tmp_path, *extra, name="full")
    train(full)
    part = tmp_path / "part"
    repo = Path(__file__).resolve().parents[1]
    # the child's thread count is ours: CPU kernels sum in an order set by the number of threads
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    child = subprocess.run([sys.executable, "-c", _KILLED_WHILE_SAVING, "7", *TINY, *extra, f"output_dir={part}"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stdout + child.stderr
    half_written = list(part.glob(".last.pth.*.tmp"))
    assert len(half_written) == 1  # killed inside the write ...
    with pytest.raises(Exception):
        torch.load(half_written[0], weights_only=True)
    ckpt = load_checkpoint(part / "last.pth")  # ... which never touched last.pth
    assert ckpt["step"] == 6 and ckpt["epoch"] == 1  # 2 steps into the second epoch
    assert not (part / "model.safetensors").exists()

    train(tiny(tmp_path, *extra, "train.resume=auto", name="part"))
    a = load_state_dict(Path(full.output_dir) / "model.safetensors")
    b = load_state_dict(part / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_auto_precision_trains_a_depthwise_network_in_fp32_on_a_cpu(tmp_path, monkeypatch, caplog):
    """The trainer resolves `auto` for its model: MobileNet stays fp32 on a CPU where ResNet takes bf16."""
    import logging

    from runtime import precision

    monkeypatch.setattr(precision, "cpu_bf16_is_fast", lambda: True)
    with caplog.at_level(logging.INFO, logger="runtime.precision"):
        train(tiny(tmp_path, "model.name=mobilenet", "model.width_mult=0.25", "model.zero_init_last=false",
                   "train.precision=auto", "train.epochs=1", name="mobilenet"))
        train(tiny(tmp_path, "model.width_mult=0.25", "train.precision=auto", "train.epochs=1", name="resnet"))
    chosen = [r.getMessage() for r in caplog.records if r.getMessage().startswith("train.precision=auto")]
    assert len(chosen) == 2
    assert chosen[0].startswith("train.precision=auto: fp32 (the model's depthwise convolutions")
    assert chosen[1].startswith("train.precision=auto: bf16")


def test_compiled_run_trains_through_the_compiled_model_as_eager(tmp_path, monkeypatch):
    """train.compile=true: the model runs through torch.compile (here its aot_eager backend: graph capture and AOT
    autograd without inductor's C++ build), trains as the eager run does, and exports the plain model's weights."""
    compiled, real_compile = [], torch.compile

    def compile_(model, **kwargs):
        compiled.append(model)
        return real_compile(model, backend="aot_eager")

    monkeypatch.setattr(torch, "compile", compile_)
    eager = train(tiny(tmp_path, "train.epochs=1", name="eager"))
    assert not compiled
    again = train(tiny(tmp_path, "train.epochs=1", "train.compile=true", name="compiled"))
    assert len(compiled) == 1 and isinstance(compiled[0], torch.nn.Module)
    assert again["top1"] == pytest.approx(eager["top1"])
    losses = lambda name: [r["loss"] for r in read_records(tmp_path / name / "metrics.jsonl", "train")]
    assert losses("compiled") == pytest.approx(losses("eager"), rel=1e-4)
    a, b = (load_state_dict(tmp_path / name / "model.safetensors") for name in ("eager", "compiled"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), atol=1e-4) for k in a)


def test_epochs_to_steps_rounds_half_up_and_keeps_a_warmup():
    from classification.train import epochs_to_steps

    assert [epochs_to_steps(e, 5) for e in (0.5, 1.5, 2.5, 0.1, 0.0, 3)] == [3, 8, 13, 1, 0, 15]  # round(): 2, 8, 12
    assert epochs_to_steps(0.05, 5) == 0 and epochs_to_steps(0.05, 5, at_least_one=True) == 1
    assert epochs_to_steps(0.0, 5, at_least_one=True) == 0


def test_resuming_past_the_configured_end_says_nothing_is_trained(tmp_path, caplog):
    """train.epochs lowered below where the checkpoint is: nothing to train, said (it exited 0 without a word)."""
    import logging

    cfg = tiny(tmp_path, "train.epochs=2")
    train(cfg)
    with caplog.at_level(logging.WARNING):
        train(tiny(tmp_path, "train.epochs=1", "train.resume=auto"))
    assert "nothing is trained" in caplog.text and "raise train.epochs" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        train(tiny(tmp_path, "train.epochs=2", "train.resume=auto"))  # a finished run resumed again: its result
    assert "nothing is trained" not in caplog.text
