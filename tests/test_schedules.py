"""Learning-rate schedules against He et al. 2019 (§3.1 linear scaling and warmup, §5.1 cosine decay)."""
from __future__ import annotations

import math

import pytest
import torch

from runtime.schedules import build_scheduler, lr_at, scale_lr


@pytest.mark.parametrize("batch,want", [(256, 0.1), (1024, 0.4), (128, 0.05), (8 * 32, 0.1)])
def test_scale_lr_is_linear_in_the_batch(batch: int, want: float) -> None:
    assert scale_lr(0.1, batch) == pytest.approx(want)


def test_scale_lr_rejects_empty_batch() -> None:
    with pytest.raises(ValueError, match="global_batch"):
        scale_lr(0.1, 0)


def test_warmup_is_linear_from_zero() -> None:
    kw = dict(base_lr=0.4, total_steps=100, warmup_steps=10)
    for schedule in ("step", "cosine"):
        lrs = [lr_at(s, schedule=schedule, **kw) for s in range(10)]
        assert lrs == pytest.approx([0.4 * s / 10 for s in range(10)])
        # The ramp reaches base_lr exactly where the main schedule starts.
        assert lr_at(10, schedule=schedule, **kw) == pytest.approx(0.4)


def test_step_decay_at_exact_boundaries() -> None:
    kw = dict(base_lr=0.1, total_steps=120, schedule="step", milestones=[30, 60, 90], gamma=0.1)
    assert lr_at(0, **kw) == pytest.approx(0.1)
    assert lr_at(29, **kw) == pytest.approx(0.1)
    assert lr_at(30, **kw) == pytest.approx(0.01)
    assert lr_at(59, **kw) == pytest.approx(0.01)
    assert lr_at(60, **kw) == pytest.approx(0.001)
    assert lr_at(90, **kw) == pytest.approx(1e-4)
    assert lr_at(119, **kw) == pytest.approx(1e-4)


def test_step_without_milestones_is_constant() -> None:
    assert lr_at(50, base_lr=0.3, total_steps=100) == 0.3


def test_cosine_matches_the_paper_formula() -> None:
    # eta_t = 1/2 (1 + cos(t pi / T)) eta, t counted from the end of warmup.
    base, total, warmup = 0.4, 1000, 50
    big_t = total - warmup
    for t in (0, 1, 100, big_t // 4, big_t // 2, 3 * big_t // 4, big_t - 1, big_t):
        want = 0.5 * (1 + math.cos(math.pi * t / big_t)) * base
        assert lr_at(warmup + t, base_lr=base, total_steps=total, warmup_steps=warmup,
                     schedule="cosine") == pytest.approx(want, rel=1e-12, abs=1e-15)
    kw = dict(base_lr=base, total_steps=total, warmup_steps=warmup, schedule="cosine")
    assert lr_at(warmup, **kw) == pytest.approx(base)
    assert lr_at(warmup + big_t // 2, **kw) == pytest.approx(base / 2)
    assert lr_at(total, **kw) == pytest.approx(0.0, abs=1e-15)
    assert lr_at(total + 10, **kw) == pytest.approx(0.0, abs=1e-15)  # stays at 0, does not rise again


def test_cosine_ignores_milestones() -> None:
    kw = dict(base_lr=0.1, total_steps=100, schedule="cosine")
    assert lr_at(40, **kw, milestones=[10, 20]) == lr_at(40, **kw)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(schedule="linear"), "'step', 'cosine', 'poly'"),
        (dict(total_steps=0), "total_steps"),
        (dict(warmup_steps=-1), "warmup_steps"),
        (dict(warmup_steps=101), "warmup_steps"),
        (dict(base_lr=-0.1), "base_lr"),
        (dict(milestones=[60, 30]), "milestones"),
        (dict(gamma=0.0), "gamma"),
    ],
)
def test_lr_at_validates(kwargs: dict, match: str) -> None:
    args = dict(base_lr=0.1, total_steps=100) | kwargs
    with pytest.raises(ValueError, match=match):
        lr_at(0, **args)


def test_lr_at_rejects_negative_step() -> None:
    with pytest.raises(ValueError, match="step"):
        lr_at(-1, base_lr=0.1, total_steps=10)


@pytest.mark.parametrize("schedule", ["step", "cosine", "poly"])
def test_lambda_lr_agrees_with_lr_at_every_step(schedule: str) -> None:
    kw = dict(base_lr=0.4, total_steps=40, warmup_steps=5, schedule=schedule, milestones=[20, 30], gamma=0.1)
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=kw["base_lr"], momentum=0.9)
    scheduler = build_scheduler(optimizer, **kw)
    for step in range(kw["total_steps"]):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(lr_at(step, **kw), rel=1e-12, abs=1e-15)
        optimizer.step()
        scheduler.step()


def test_scheduler_state_dict_resumes() -> None:
    kw = dict(base_lr=0.4, total_steps=30, warmup_steps=4, schedule="cosine")

    def make() -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=kw["base_lr"])
        return opt, build_scheduler(opt, **kw)

    opt, sched = make()
    for _ in range(12):
        opt.step()
        sched.step()
    saved = (opt.state_dict(), sched.state_dict())

    opt2, sched2 = make()
    opt2.load_state_dict(saved[0])
    sched2.load_state_dict(saved[1])
    assert opt2.param_groups[0]["lr"] == pytest.approx(lr_at(12, **kw))
    opt2.step()
    sched2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(lr_at(13, **kw))


def test_build_scheduler_rejects_zero_base_lr() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    with pytest.raises(ValueError, match="base_lr"):
        build_scheduler(opt, base_lr=0.0, total_steps=10)


def test_scale_lr_reference_batch_of_the_task() -> None:
    # detection / segmentation recipes are written for 16 images: lr 0.02 at 2 x 8 = 16 stays 0.02
    assert scale_lr(0.02, 16, reference_batch=16) == pytest.approx(0.02)
    assert scale_lr(0.01, 8, reference_batch=16) == pytest.approx(0.005)
    with pytest.raises(ValueError, match="reference_batch"):
        scale_lr(0.1, 8, reference_batch=0)


def test_poly_matches_the_formula() -> None:
    base, lo, total, power = 0.01, 1e-4, 1000, 0.9
    for step in (0, 1, 250, 999, 1000, 1500):
        t = min(step / (total - 1), 1.0)  # mmengine's PolyLR span: min_lr at the last iteration
        want = (base - lo) * (1 - t) ** power + lo
        got = lr_at(step, base_lr=base, total_steps=total, schedule="poly", power=power, min_lr=lo)
        assert got == pytest.approx(want, rel=1e-12)


def test_poly_after_warmup_starts_at_base_lr() -> None:
    kw = dict(base_lr=0.1, total_steps=110, warmup_steps=10, schedule="poly", power=0.9, min_lr=0.0)
    assert lr_at(5, **kw) == pytest.approx(0.05)
    assert lr_at(10, **kw) == pytest.approx(0.1)
    assert lr_at(60, **kw) == pytest.approx(0.1 * (1 - 50 / 99) ** 0.9)
    assert lr_at(109, **kw) == 0.0


def test_poly_equals_mmengine_polylr_per_iteration() -> None:
    """mmseg's ADE20K schedule: mmengine PolyLR(eta_min=1e-4, power=0.9, by_epoch=False)."""
    pytest.importorskip("mmengine")
    from mmengine.optim.scheduler import PolyLR

    total, base = 200, 0.01
    param = torch.nn.Parameter(torch.zeros(1))
    reference_opt = torch.optim.SGD([param], lr=base)
    reference = PolyLR(reference_opt, eta_min=1e-4, power=0.9, begin=0, end=total, by_epoch=False)
    ours_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    ours = build_scheduler(ours_opt, base_lr=base, total_steps=total, schedule="poly", power=0.9, min_lr=1e-4)
    for _ in range(total):
        assert ours_opt.param_groups[0]["lr"] == pytest.approx(reference_opt.param_groups[0]["lr"], rel=1e-9, abs=1e-12)
        reference_opt.step(), ours_opt.step()
        reference.step(), ours.step()


def test_poly_validates_power_and_min_lr() -> None:
    with pytest.raises(ValueError, match="optim.power"):
        lr_at(0, base_lr=0.1, total_steps=10, schedule="poly", power=0.0)
    with pytest.raises(ValueError, match="optim.min_lr"):
        lr_at(0, base_lr=0.1, total_steps=10, schedule="poly", min_lr=0.5)


# ---- train.scale_schedule: detectron2's REFERENCE_WORLD_SIZE semantics -----------------------------------
def test_scale_schedule_by_hand() -> None:
    from runtime.schedules import scale_schedule

    # The VOC recipe (16 images per step, 18k iterations) on one GPU of 2 images: 8x as many iterations.
    assert scale_schedule(2, 16, max_iter=18000, milestones=[12000, 16000], warmup_iters=100, eval_every=0,
                          checkpoint_every=2000) == \
        {"max_iter": 144000, "milestones": [96000, 128000], "warmup_iters": 800, "eval_every": 0,
         "checkpoint_every": 16000}
    # 32 images per step: half; 5 / 2 = 2.5 rounds to 2 (Python's round, as detectron2), 3 / 2 = 1.5 to 2.
    assert scale_schedule(32, 16, max_iter=5, milestones=[3], warmup_iters=1, eval_every=5, checkpoint_every=1) == \
        {"max_iter": 2, "milestones": [2], "warmup_iters": 1, "eval_every": 2, "checkpoint_every": 1}
    # 1/64 of a 10-iteration period rounds to 0 in detectron2; kept at 1 here (0 is a period its hooks divide by).
    assert scale_schedule(1024, 16, max_iter=10, checkpoint_every=10)["checkpoint_every"] == 1
    with pytest.raises(ValueError, match="global_batch"):
        scale_schedule(0, 16, max_iter=10)


@pytest.mark.parametrize("workers,reference", [(1, 8), (2, 8), (16, 8), (3, 8), (8, 4)])
def test_scale_schedule_equals_detectron2_auto_scale_workers(workers: int, reference: int) -> None:
    """The same numbers through detectron2's DefaultTrainer.auto_scale_workers (2 images per worker)."""
    d2_engine = pytest.importorskip("detection.d2_engine")
    try:
        d2_engine.import_detectron2()
    except ImportError as e:  # pragma: no cover - depends on the machine
        pytest.skip(f"detectron2 cannot be imported: {e}")
    from detectron2.config import get_cfg
    from detectron2.engine import DefaultTrainer

    from runtime.schedules import scale_schedule

    cfg = get_cfg()
    cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.REFERENCE_WORLD_SIZE = 2 * reference, reference
    cfg.SOLVER.MAX_ITER, cfg.SOLVER.STEPS, cfg.SOLVER.WARMUP_ITERS = 18000, (12000, 16000), 100
    cfg.TEST.EVAL_PERIOD, cfg.SOLVER.CHECKPOINT_PERIOD = 5000, 2000
    theirs = DefaultTrainer.auto_scale_workers(cfg, workers)
    ours = scale_schedule(2 * workers, 2 * reference, max_iter=18000, milestones=[12000, 16000], warmup_iters=100,
                          eval_every=5000, checkpoint_every=2000)
    assert theirs.SOLVER.IMS_PER_BATCH == 2 * workers
    assert ours == {"max_iter": theirs.SOLVER.MAX_ITER, "milestones": list(theirs.SOLVER.STEPS),
                    "warmup_iters": theirs.SOLVER.WARMUP_ITERS, "eval_every": theirs.TEST.EVAL_PERIOD,
                    "checkpoint_every": theirs.SOLVER.CHECKPOINT_PERIOD}


def test_schedule_for_batch_scales_a_config_and_says_so(caplog) -> None:
    """The line names the epochs the run will see and the key; the scaled copy leaves the given config alone."""
    from detection.config import DetectionConfig
    from runtime.config import load_config
    from runtime.schedules import schedule_for_batch

    cfg = load_config(None, DetectionConfig, ["train.max_iter=18000", "optim.milestones=[12000, 16000]",
                                              "optim.warmup_iters=100", "train.checkpoint_every=2000"])
    with caplog.at_level("WARNING", logger="runtime.schedules"):
        same = schedule_for_batch(cfg, 2, 16, train_images=16551)  # VOC 07+12 trainval, one GPU of 2 images
    assert same is cfg
    [line] = [r.getMessage() for r in caplog.records]
    # 18000 x 2 / 16551 = 2.18 epochs; the recipe's 18000 x 16 / 16551 = 17.40
    assert "2.18 epochs of 16551" in line and "17.40" in line and "train.scale_schedule=true" in line
    assert "144000 iterations" in line

    caplog.clear()
    scaled_cfg = load_config(None, DetectionConfig, ["train.scale_schedule=true", "optim.milestones=[12000, 16000]"])
    with caplog.at_level("WARNING", logger="runtime.schedules"):
        scaled = schedule_for_batch(scaled_cfg, 2, 16, train_images=16551)
    assert (scaled.train.max_iter, scaled.optim.milestones, scaled.optim.warmup_iters, scaled.train.checkpoint_every) \
        == (144000, [96000, 128000], 800, 16000)
    assert scaled_cfg.train.max_iter == 18000  # the given config is not changed
    [line] = [r.getMessage() for r in caplog.records]
    assert "17.40 epochs of 16551" in line and "train.scale_schedule=true" in line

    caplog.clear()
    with caplog.at_level("WARNING", logger="runtime.schedules"):
        assert schedule_for_batch(scaled_cfg, 16, 16, train_images=16551) is scaled_cfg  # the recipe's batch
    assert not caplog.records


def test_step_schedule_with_warmup_equals_detectron2_warmup_multistep() -> None:
    """The step schedule with a linear warm-up from 0 is detectron2's WarmupMultiStepLR with warmup_factor 0 at every
    iteration, a milestone inside the warm-up included (it scales the ramp)."""
    pytest.importorskip("detectron2")
    from detectron2.solver.lr_scheduler import WarmupMultiStepLR

    for warmup, milestones in ((5, [3, 8]), (4, [6, 9]), (0, [2])):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.02)
        ref = WarmupMultiStepLR(opt, milestones=milestones, gamma=0.1, warmup_factor=0.0, warmup_iters=warmup,
                                warmup_method="linear")
        for step in range(12):
            ours = lr_at(step, base_lr=0.02, total_steps=12, warmup_steps=warmup, milestones=milestones)
            assert ours == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12, abs=1e-15), (warmup, milestones, step)
            opt.step()
            ref.step()


def test_milestones_after_the_run_are_reported(caplog):
    """Step decays at or after the last step never happen (a VOC config cut short with train.max_iter, the ImageNet
    milestones 30/60/90 at 12 epochs): said once, with how many and the lr the run stays at."""
    import logging

    from runtime.schedules import build_scheduler

    def build(milestones, schedule="step"):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="runtime.schedules"):
            build_scheduler(opt, base_lr=0.1, total_steps=50, schedule=schedule, milestones=milestones)
        return caplog.text

    text = build([10, 50, 120])
    assert "2 of 3 step decay(s)" in text and "[50, 120] of 50" in text and "0.1x of the base lr" in text
    assert build([10, 49]) == ""
    assert build([10, 120], schedule="cosine") == ""  # cosine has no milestones to miss
