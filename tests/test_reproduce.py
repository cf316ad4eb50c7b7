"""``tricks reproduce``: each row is the row above plus exactly the paper's step (resolved configs compared), the
statistics and the verdict rule on hand-made numbers, resume of a half-finished table with a fake trainer, and
the Markdown layout."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from tricks import reproduce as rp
from tricks.reproduce import ROWS, TABLES, Reproduction, config_diff, mean_std, resolved_config, verdict

EFFICIENT_STEP = {"train.batch_size": (256, 1024), "train.precision": ("fp32", "bf16"),
                  "optim.warmup_epochs": (0.0, 0.2), "optim.no_bias_decay": (False, True)}
TEACHER = {"distill.teacher": "resnet101d", "distill.teacher_kwargs": {"width_mult": 0.25}}

# The paper's step from the row above, per row: {key: (value above, value here)}, written out independently of
# tricks/reproduce.py (§3: efficient training, §4: ResNet tweaks, §5: refinements).
STEPS = {
    # Table 4, batch 256 and 1024
    "r50-b256-1": {"optim.warmup_epochs": (0.0, 0.2)},
    "r50-b256-2": {"model.zero_init_last": (False, True)},
    "r50-b256-3": {"optim.no_bias_decay": (False, True)},
    "r50-b256-4": {"train.precision": ("fp32", "bf16")},
    "r50-b1024-1": {"optim.warmup_epochs": (0.0, 0.2)},
    "r50-b1024-2": {"model.zero_init_last": (False, True)},
    "r50-b1024-3": {"optim.no_bias_decay": (False, True)},
    "r50-efficient": {"train.precision": ("fp32", "bf16")},
    # Table 5
    "r50b-efficient": {"model.name": ("resnet50", "resnet50b")},
    "r50c-efficient": {"model.name": ("resnet50b", "resnet50c")},
    "r50d-efficient": {"model.name": ("resnet50c", "resnet50d")},
}
for prefix in ("r50d", "mobilenet", "inception"):  # Table 6, every network
    STEPS[f"{prefix}-cos"] = {"optim.schedule": ("step", "cosine")}
    STEPS[f"{prefix}-cos-ls"] = {"train.label_smoothing": (0.0, 0.1)}
    STEPS[f"{prefix}-cos-ls-distill"] = {"distill.teacher": (None, "resnet101d"),
                                         "distill.teacher_kwargs": ({}, {"width_mult": 0.25}),
                                         "distill.teacher_weights": (None, "<weights:teacher>")}
    STEPS[f"{prefix}-cos-ls-mixup"] = {"distill.teacher": ("resnet101d", None),
                                       "distill.teacher_kwargs": ({"width_mult": 0.25}, {}),
                                       "distill.teacher_weights": ("<weights:teacher>", None),
                                       "train.mixup_alpha": (0.0, 0.2), "train.epochs": (2, 3)}
    STEPS[f"{prefix}-cos-ls-mixup-distill"] = {"distill.teacher": (None, "resnet101d"),
                                               "distill.teacher_kwargs": ({}, {"width_mult": 0.25}),
                                               "distill.teacher_weights": (None, "<weights:teacher-mixup>")}
for row, (above, here) in (("inception-cos-ls-distill", (None, 28)), ("inception-cos-ls-mixup", (28, None)),
                           ("inception-cos-ls-mixup-distill", (None, 28))):  # the teacher sees its own 28 px
    STEPS[row] = {**STEPS[row], "distill.teacher_img_size": (above, here)}
STEPS["r50-efficient@table3"] = {**EFFICIENT_STEP, "model.zero_init_last": (False, True)}
STEPS["mobilenet-efficient"] = EFFICIENT_STEP        # no residual blocks: no zero-gamma, as in the paper
STEPS["inception-efficient"] = EFFICIENT_STEP


def _diff(above: str, row: str) -> dict:
    diff = config_diff(resolved_config(ROWS[above]), resolved_config(ROWS[row]))
    diff.pop("output_dir", None)
    return diff


def test_every_row_differs_from_the_row_above_by_exactly_the_papers_step():
    checked = 0
    for table in TABLES.values():
        for _, ids in table.groups:
            for above, row in zip(ids, ids[1:]):
                diff = _diff(above, row)
                if table.name in ("table8", "table9"):
                    # the fine-tuning schedule is the same; only the backbone (and its weights) changes
                    assert set(diff) <= {"model.weights", "model.backbone"}, (table.name, row, diff)
                    assert diff["model.weights"] == (f"<weights:{ROWS[above].backbone}>", f"<weights:{ROWS[row].backbone}>")
                    continue
                key = f"{row}@table3" if (table.name, row) == ("table3", "r50-efficient") else row
                assert diff == STEPS[key], (table.name, row, diff)
                checked += 1
    assert checked == 3 + 8 + 3 + 15    # tables 5, 4, 3, 6


def test_every_row_pins_its_precision():
    """A record's hash is over the config: ``train.precision=auto`` would resolve to another precision on
    another machine (fp16 on CUDA, bf16 with AMX, fp32 otherwise) under the same record."""
    for row in ROWS.values():
        assert rp.resolved_config(row).train.precision in ("fp32", "bf16"), row.id


def test_first_rows_and_the_backbones_of_tables_8_and_9():
    # Table 4's batch-1024 column starts from the batch-256 one with only the batch (lr 0.1 per 256: scaled to 0.4)
    assert _diff("r50-baseline", "r50-b1024-0") == {"train.batch_size": (256, 1024)}
    # Table 6 starts where Table 5 ends (one record serves both); Tables 8-9 fine-tune exactly Table 6's ResNet-D rows
    assert TABLES["table5"].groups[0][1][-1] == TABLES["table6"].groups[0][1][0] == "r50d-efficient"
    assert [ROWS[r].backbone for r in TABLES["table8"].groups[0][1]] == ["r50b-baseline", *rp.TABLE6["resnet"]]
    assert [ROWS[r].backbone for r in TABLES["table9"].groups[0][1]] == ["r50b-baseline", *rp.TABLE6["resnet"]]
    # B-standard: ResNet-50-B with the baseline recipe
    assert _diff("r50-baseline", "r50b-baseline") == {"model.name": ("resnet50", "resnet50b")}
    # the teacher of the mixup row is the teacher trained with mixup and the longer schedule
    assert _diff("teacher", "teacher-mixup") == {"train.mixup_alpha": (0.0, 0.2), "train.epochs": (2, 3)}
    teacher = resolved_config(ROWS["teacher"])
    assert (teacher.model.name, teacher.optim.schedule, teacher.train.label_smoothing) == ("resnet101d", "cosine", 0.1)
    # the detection/segmentation rows load the backbone they name, at the classification run's width
    det = resolved_config(ROWS["det-r50d-cos"])
    assert (det.model.backbone, det.model.kwargs, det.model.weights) == ("resnet50d", {"width_mult": 0.25},
                                                                         "<weights:r50d-cos>")


def test_quick_overrides_keep_the_schedule_fractions():
    over = rp.quick_overrides(ROWS["r50-b1024-1"], epochs=1)
    assert over == ["train.epochs=1", "optim.milestones=[0.25,0.5,0.75]", "optim.warmup_epochs=0.1"]
    assert rp.quick_overrides(ROWS["r50d-cos-ls-mixup"], epochs=4)[0] == "train.epochs=6"   # 200/120 of the others
    # fine-tuning (400 iterations, warm-up 50, steps at 300 and 360): the schedule scaled to 5 iterations
    assert rp.quick_overrides(ROWS["det-r50d-cos"], iters=5) == ["train.max_iter=5", "optim.warmup_iters=1",
                                                               "optim.milestones=[4,4]"]
    assert rp.quick_overrides(ROWS["seg-r50d-cos"], iters=5) == ["train.max_iter=5", "optim.warmup_iters=0"]
    assert rp.quick_overrides(ROWS["r50-baseline"], iters=5) == ["train.max_steps=5"]


def test_mean_std_and_verdict_on_hand_made_numbers():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    mean, std = mean_std([90.0, 91.0, 92.5, 92.5])
    assert mean == 91.5 and std == pytest.approx(math.sqrt((2.25 + 0.25 + 1 + 1) / 3))
    assert math.isnan(mean_std([5.0])[1])
    above = [90.0, 90.2, 90.4]           # mean 90.2, std 0.2
    up = [91.0, 91.2, 91.4]              # +1.0; standard error of the difference sqrt(2 * 0.04 / 3) = 0.163
    assert verdict(up, above, paper_change=0.5) == "same direction"
    assert verdict(up, above, paper_change=-0.3) == "opposite"
    assert verdict(above, up, paper_change=-0.3) == "same direction"
    # +0.3 < 2 x 0.163 = 0.327: within noise; +0.4 is not
    assert verdict([90.3, 90.5, 90.7], above, paper_change=0.5) == "within noise"
    assert verdict([90.4, 90.6, 90.8], above, paper_change=0.5) == "same direction"
    assert verdict([91.0], [90.0], paper_change=0.5) == "n/a (1 seed)"


class FakeTrainer:
    """Stands in for ``run_config``: records the configs, writes model.safetensors, can die after ``die_after`` runs."""

    def __init__(self, die_after: int | None = None):
        self.configs: list = []
        self.die_after = die_after

    def __call__(self, cfg) -> dict:
        if self.die_after is not None and len(self.configs) >= self.die_after:
            raise KeyboardInterrupt("killed")
        self.configs.append(cfg)
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "model.safetensors").write_bytes(b"")
        (out / "last.pth").write_bytes(b"")
        top1 = 80.0 + len(cfg.model.name) + cfg.train.seed * 0.1
        return {"top1": top1, "top5": 99.0, "loss": 0.5, "images": 10000, "epoch": cfg.train.epochs,
                "train_time_s": 100.0 + cfg.train.seed, "train_img_per_s": 600.0}


def test_a_half_finished_table_resumes_without_rerunning_and_from_a_copied_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(rp, "table5_complexity", lambda: {r: ("1M", "9M") for r in rp.PAPER_COMPLEXITY})  # speed
    out = tmp_path / "run"
    killed = FakeTrainer(die_after=3)
    with pytest.raises(KeyboardInterrupt):
        rp.reproduce(["table5"], out, seeds=2, runner=killed)
    records = sorted((out / "records").glob("*.json"))
    assert len(records) == 3
    first = json.loads(records[0].read_text())
    assert first["metrics"]["top1"] is not None and first["seed"] in (0, 1) and first["wall_s"] >= 0
    assert not any(Path(c.output_dir, "last.pth").exists() for c in killed.configs)   # finished: checkpoint dropped
    assert all(c.train.resume == "auto" for c in killed.configs)                     # a killed run continues

    rest = FakeTrainer()
    rp.reproduce(["table5"], out, seeds=2, runner=rest)
    done = {(c.model.name, c.train.seed) for c in killed.configs}
    again = {(c.model.name, c.train.seed) for c in rest.configs}
    assert len(rest.configs) == 8 - 3 and not done & again          # the finished row-seeds were read back
    assert len(list((out / "records").glob("*.json"))) == 8
    assert "pending" not in (out / "table5.md").read_text()

    copy = tmp_path / "copied"                       # the records alone, elsewhere: nothing to rerun
    shutil.copytree(out / "records", copy / "records")
    idle = FakeTrainer()
    rp.reproduce(["table5"], copy, seeds=2, runner=idle)
    assert idle.configs == []
    assert (copy / "table5.md").read_text().split("## Runs")[0] == (out / "table5.md").read_text().split("## Runs")[0]


def test_the_teacher_is_trained_once_and_rerun_when_its_weights_are_gone(tmp_path):
    trainer = FakeTrainer()
    repro = Reproduction(tmp_path, seeds=2, nets=("resnet",), runner=trainer)
    for seed in (0, 1):
        repro.run(ROWS["r50d-cos-ls-distill"], seed)
    names = [c.model.name for c in trainer.configs]
    assert names == ["resnet101d", "resnet50d", "resnet50d"]        # the teacher once (seed 0), then each seed
    teacher_dir = repro.run_dir(ROWS["teacher"], 0)
    assert trainer.configs[1].distill.teacher_weights == str(teacher_dir / "model.safetensors")
    assert trainer.configs[0].train.seed == 0
    # a copied records/ folder lacks the weights: the teacher is retrained before a row that needs it
    (teacher_dir / "model.safetensors").unlink()
    repro.run(ROWS["r50d-cos-ls-mixup-distill"], 0)
    assert [c.model.name for c in trainer.configs[3:]] == ["resnet101d", "resnet50d"]
    assert trainer.configs[3].train.mixup_alpha == 0.2                       # the mixup teacher, first trained now
    repro.run(ROWS["r50d-cos-ls-distill"], 0)                                # recorded: read back, nothing runs
    assert len(trainer.configs) == 5


def test_markdown_layout_with_the_papers_numbers_beside_ours():
    numbers = {"r50-efficient": [92.0, 92.2, 92.4], "r50b-efficient": [92.6, 92.8, 93.0],
               "r50c-efficient": [92.7, 92.8, 92.9], "r50d-efficient": [92.0]}
    table = TABLES["table5"]
    context = {"records": 10, "wanted": 12, "wall_s": 3725.0, "machines": ["x86_64, 2 CPUs, 1 thread(s), torch 2"],
               "commits": ["abc1234"], "commands": {"r50-efficient": "tricks train X"}, "nets": rp.DEFAULT_NETS,
               "quick": set()}
    md = rp.render_markdown(table, lambda row, metric: numbers[row.id] if metric == "top1" else [], 3, context,
                            complexity={r: ("1.48M", "9.9M") for r in numbers})
    lines = md.splitlines()
    head = lines.index("| row | params (ours) | MACs (ours) | params (paper) | FLOPs (paper) | top-1 % (ours) | Δ | "
                       "ImageNet top-1 % (paper) | Δ paper | verdict |")
    assert lines[head + 2:head + 6] == [
        "| ResNet-50 | 1.48M | 9.9M | 25M | 3.86G | 92.20 ± 0.20 |  | 76.21 |  |  |",
        "| ResNet-50-B | 1.48M | 9.9M | 25M | 4.36G | 92.80 ± 0.20 | +0.60 | 76.66 | +0.45 | same direction |",
        "| ResNet-50-C | 1.48M | 9.9M | 25M | 4.35G | 92.80 ± 0.10 | +0.00 | 76.87 | +0.21 | within noise |",
        "| ResNet-50-D | 1.48M | 9.9M | 25M | 4.35G | 92.00 | -0.80 | 77.16 | +0.29 | n/a (1 seed) |"]
    assert "- records: 10 of 12 row-seeds finished" in lines
    assert "- wall time of those runs: 1:02:05 (each run on the thread count below)" in lines
    assert "- commit: abc1234" in lines
    # Table 6 without Inception says how to add it instead of an empty column
    md6 = rp.render_markdown(TABLES["table6"], lambda row, metric: [], 3, {**context, "commands": {}})
    assert "Not run (`--nets` resnet,mobilenet; add `--nets resnet,mobilenet,inception`)." in md6
    assert "| + cosine decay | pending |  | 77.91 | +0.75 | pending |" in md6
    # Tables 8-9: the backbone's top-1 beside the paper's ImageNet top-1 as those tables list it, then the transfer
    same = {"top1": [90.0, 90.2, 90.4], "mAP": [40.0, 41.0, 42.0]}
    md8 = rp.render_markdown(TABLES["table8"], lambda row, metric: same[metric], 3, {**context, "commands": {}})
    assert "| B-standard | 90.20 ± 0.20 | 76.14 | 41.00 ± 1.00 |  | 77.54 |  |  |" in md8
    assert "| + label smoothing | 90.20 ± 0.20 | 78.34 | 41.00 ± 1.00 | +0.00 | 80.71 | +1.48 | within noise |" in md8


def test_unknown_table_or_net_is_one_clear_error(capsys):
    from tricks.cli import main

    with pytest.raises(ValueError, match="unknown table 'table7'; choose from table5, table4"):
        rp.reproduce(["table7"], "unused")
    with pytest.raises(ValueError, match="--nets: unknown"):
        rp.reproduce(["table5"], "unused", nets=["vgg"])
    # the command: one line on stderr, status 2 (a user error, as every command's)
    assert main(["reproduce", "table7", "--out", "unused"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tricks reproduce: error: unknown table 'table7'; choose from table5") and err.count("\n") == 1


def test_a_failing_row_does_not_stop_the_others_and_is_retried(tmp_path, monkeypatch):
    monkeypatch.setattr(rp, "table5_complexity", lambda: {r: ("1M", "9M") for r in rp.PAPER_COMPLEXITY})

    def flaky(cfg):
        if cfg.model.name == "resnet50b":
            raise OSError("disk full")
        return FakeTrainer()(cfg)

    with pytest.raises(RuntimeError, match="1 row-seed\\(s\\) failed: r50b-efficient seed 0: OSError: disk full"):
        rp.reproduce(["table5"], tmp_path, seeds=1, runner=flaky)
    assert len(list((tmp_path / "records").glob("*.json"))) == 3
    retry = FakeTrainer()
    rp.reproduce(["table5"], tmp_path, seeds=1, runner=retry)
    assert [c.model.name for c in retry.configs] == ["resnet50b"]


def test_the_trainer_takes_a_narrow_teacher_and_fractional_milestones(tmp_path):
    """What the reproduction needs from the classification trainer: ``distill.teacher_kwargs`` (the quarter-width
    teacher) and ``optim.milestones`` in fractions of an epoch (30/60/90 of 120 epochs, scaled to 2)."""
    from backbones import create_backbone, save_weights
    from classification.config import Config
    from classification.train import train
    from runtime.config import load_config
    from runtime.logger import read_records

    tiny = ["model.name=resnet18d", "data.name=synthetic", "data.synthetic_size=96", "data.img_size=16",
            "data.val_resize=16", "data.val_crop=16", "data.workers=0", "data.num_classes=4", "train.batch_size=16",
            "train.epochs=1", "train.log_every=1", "optim.lr=0.4", "optim.warmup_epochs=0", "model.width_mult=0.25"]
    save_weights(create_backbone("resnet18d", num_classes=4, width_mult=0.5), tmp_path / "teacher.safetensors")
    cfg = load_config(None, Config, [*tiny, "optim.schedule=step", "optim.milestones=[0.5]", "optim.gamma=0.1",
                                     "distill.teacher=resnet18d", "distill.teacher_kwargs={width_mult: 0.5}",
                                     f"distill.teacher_weights={tmp_path / 'teacher.safetensors'}",
                                     f"output_dir={tmp_path / 'run'}"])
    train(cfg)
    # 96 images / 16 = 6 steps; the milestone at half an epoch is step index 3: each record logs the lr its step used,
    # so the 4th to 6th steps are decayed
    lrs = [r["lr"] for r in read_records(tmp_path / "run" / "metrics.jsonl", "train")]
    base = 0.4 * 16 / 256
    assert lrs == pytest.approx([base, base, base, base / 10, base / 10, base / 10])
