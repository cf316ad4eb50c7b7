"""``tricks bench`` (benchmarks/bench.py): the alternation, the statistics, the report and one tiny row."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn as nn

from benchmarks import bench
from benchmarks._common import train_step


def test_round_order_alternates():
    assert bench.round_order(2, 0) == [0, 1]
    assert bench.round_order(2, 1) == [1, 0]
    assert bench.round_order(3, 2) == [0, 1, 2]
    assert bench.round_order(3, 3) == [2, 1, 0]


def test_run_rounds_calls_in_alternated_order_after_warmup():
    calls: list[str] = []

    def side(name: str, seconds: list[float]):
        def measure():
            calls.append(name)
            return seconds
        return measure

    times = bench.run_rounds([side("A", [1.0, 2.0]), side("B", [3.0])], rounds=3, warmup_calls=1)
    assert calls == ["A", "B", "A", "B", "B", "A", "A", "B"]  # warm-up, then A B, B A, A B
    assert times == [[[1.0, 2.0], [3.0]]] * 3  # indexed by side, whatever the order they ran in


def test_run_rounds_rejects_an_empty_measurement():
    with pytest.raises(RuntimeError, match="side 1 .* round 0"):
        bench.run_rounds([lambda: [1.0], lambda: []], rounds=1, warmup_calls=0)


# Three rounds, [round][side][unit] seconds: round medians (2, 2), (4, 2), (1, 4) -> ratios 1, 2, 0.25.
TIMES = [[[1.0, 2.0, 6.0], [2.0, 2.0, 2.0]], [[4.0], [2.0]], [[1.0], [4.0]]]


def test_ratio_is_the_median_of_per_round_ratios_with_quartiles_and_extremes():
    assert bench.round_values(TIMES) == [[2.0, 2.0], [4.0, 2.0], [1.0, 4.0]]
    assert bench.ratios(TIMES) == [1.0, 2.0, 0.25]
    spread = bench.Row("eval", "x", "a", "b", "evaluation", TIMES).ratio
    # Not the ratio of the summed times (14 / 12), nor of each round's sums (round 0: 9 / 6), nor of the sides'
    # medians over rounds (2 / 2): the median of 1, 2, 0.25.
    assert spread.median == 1.0
    assert (spread.low, spread.high) == (0.25, 2.0)
    # Inclusive quartiles of 0.25, 1, 2: halfway between neighbours.
    assert spread.q1 == pytest.approx(0.625) and spread.q3 == pytest.approx(1.5)
    assert bench.Spread.of([3.0]) == bench.Spread(3.0, 3.0, 3.0, 3.0, 3.0)


def test_markdown_layout():
    rows = [bench.Row("engines", "segmentation: cfg.yaml", "engine=torch", "engine=mmseg", "iteration", TIMES,
                      target="<= 0.80"),
            bench.Row("pipeline", "jpeg", "samples", "v2", "image", [[[0.01], [0.02]]], notes={})]
    peaks = {torch.float32: {"matmul": 2e9, "conv": 1e9}}
    text = bench.markdown(rows, peaks, "Title", "tricks bench --quick", "quick", load=(3.25, 4.0))
    lines = text.splitlines()
    assert lines[0] == "# Title"
    assert lines[2].startswith("- machine: ") and "cores" in lines[2]
    assert lines[3] == "- command: `tricks bench --quick`"
    assert lines[4].startswith("- commit: ") and lines[5] == "- mode: quick; rounds per row: 1, 3"
    assert lines[6] == "- 1-minute load average: 3.2 at the start, 4.0 at the end"
    head = ("| what | suite | reference | suite / reference (s per iteration) | ratio | IQR | min-max | per round "
            "| target |")
    i = lines.index("## Task engines vs reference engines")
    assert lines[i + 2] == head
    assert lines[i + 4] == ("| segmentation: cfg.yaml | engine=torch | engine=mmseg | 2 s / 2 s | **1.00** | "
                            "0.62-1.50 | 0.25-2.00 | 1.00 2.00 0.25 | <= 0.80 |")
    j = lines.index("## Input pipeline (per core)")
    assert "(img/s per core)" in lines[j + 2]
    assert lines[j + 4] == "| jpeg | samples | v2 | 100 / 50 img/s | **0.50** | 0.50-0.50 | 0.50-0.50 | 0.50 | - |"
    assert "## Train step vs timm and torchvision" not in text  # groups without rows are left out
    assert "| float32 | 2.0 | 1.0 |" in text


def test_unknown_row_group_is_one_clear_line(capsys):
    """A wrong argument is a user error: one line on stderr and status 2, as every other command's."""
    from tricks.cli import main

    assert main(["bench", "--quick", "--only", "engines,speed"]) == 2
    assert capsys.readouterr().err == ("tricks bench: error: --only engines,speed: row groups are train, engines, "
                                       "pipeline, eval (comma-separated)\n")
    assert main(["bench", "--quick", "--rounds", "0"]) == 2
    assert capsys.readouterr().err == "tricks bench: error: --rounds and --threads must be >= 1\n"


def test_engine_tasks_are_passed_and_checked(monkeypatch, tmp_path, capsys):
    """--tasks detection: only the detection engine row is measured; an unknown task is one clear line."""
    from tricks.cli import main

    asked = []
    monkeypatch.setattr(bench, "engine_rows", lambda sizes, work, tasks=(): asked.append(tuple(tasks)) or [])
    main(["bench", "--quick", "--only", "engines", "--tasks", "detection", "--out", str(tmp_path)])
    assert asked == [("detection",)] and "--tasks detection" in (tmp_path / "bench.md").read_text()
    main(["bench", "--quick", "--only", "engines", "--out", str(tmp_path)])  # quick: not the compiled row
    main(["bench", "--only", "engines", "--out", str(tmp_path)])
    assert asked[1:] == [("segmentation", "detection"), ("segmentation", "segmentation-compiled", "detection")]
    assert main(["bench", "--quick", "--only", "engines", "--tasks", "classification"]) == 2
    assert asked[3:] == [] and capsys.readouterr().err == (
        "tricks bench: error: --tasks classification: the engine rows' tasks are segmentation, "
        "segmentation-compiled, detection\n")


def test_write_outputs(tmp_path):
    rows = [bench.Row("eval", "voc", "ours", "d2", "evaluation", TIMES)]
    report = bench.write(rows, None, tmp_path, "tricks bench", "quick")
    assert report == tmp_path / "bench.md" and (tmp_path / "bench.png").stat().st_size > 0
    raw = json.loads((tmp_path / "bench.json").read_text())
    assert raw["rows"][0]["times"] == TIMES and raw["rows"][0]["ratios"] == [1.0, 2.0, 0.25]


def test_per_iteration_times_of_the_suite_engines(tmp_path):
    """Progress's img/s per log window back to seconds per iteration: batch 8 at 100 img/s = 0.08 s."""
    records = [{"kind": "train", "step": 1, "img_per_s": 100.0}, {"kind": "val", "step": 1, "mIoU": 1.0},
               {"kind": "train", "step": 2, "img_per_s": 80.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert bench.per_iteration_suite(tmp_path, 8) == {1: pytest.approx(0.08), 2: pytest.approx(0.1)}


def test_step_flops_count_forward_and_backward():
    """A linear classifier on a 3x4x4 input, batch 2, 10 classes: forward 2*2*48*10 FLOPs; backward the same
    again for the weight gradient (the input needs none)."""
    step = train_step(nn.Sequential(nn.Flatten(), nn.Linear(48, 10)), 2, 4, 3, 10, torch.float32)
    assert bench.step_flops(step) == 2 * (2 * 2 * 48 * 10)


def test_one_train_step_row_on_a_tiny_model():
    sizes = bench.Sizes(rounds=2, step_batch=2, step_size=32, step_timed=2, engine_warmup=0, engine_timed=0,
                        engine_scenes=0, jpeg_images=0, jpeg_size=(0, 0), tensor_batch=0, voc_images=0, seg_images=0,
                        seg_size=0, peak_size=64, ade_images=0, ade_scale=(0, 0), ade_crop=0)
    peaks = bench.measure_peaks(sizes, reps=1)
    assert set(peaks) == {torch.float32, torch.bfloat16} and all(v > 0 for p in peaks.values() for v in p.values())
    settings = (("fp32, contiguous", (torch.float32, False), (torch.float32, False)),)
    rows = bench.train_step_rows(sizes, {dtype: max(p.values()) for dtype, p in peaks.items()},
                                 pairs=(("resnet18d", "timm", "resnet18d"),), settings=settings)
    (row,) = rows
    assert (row.ours, row.reference, row.unit) == ("suite `resnet18d`", "timm `resnet18d`", "step")
    assert len(row.times) == 2 and all(len(side) == 2 and min(side) > 0 for rnd in row.times for side in rnd)
    assert row.target.startswith("<= 0.95")  # same precision and format as timm: the target applies
    ours_mfu, ref_mfu = (float(v.rstrip("%")) for v in row.notes["MFU ours / ref"].split(" / "))
    assert 0 < ours_mfu < 100 and 0 < ref_mfu < 100


@pytest.mark.parametrize("fast_bf16", [True, False])
def test_engine_rows_train_both_sides_at_one_pinned_precision(monkeypatch, tmp_path, fast_bf16):
    """`auto` resolves per engine (detectron2 has no bf16: fp32 on every CPU, where the suite's engines take bf16
    on CPUs that run it fast), so each row pins one precision for both sides: segmentation at what `auto` is on
    this device, detection at fp32 on a CPU."""
    from runtime import precision

    monkeypatch.setattr(precision, "cpu_bf16_is_fast", lambda: fast_bf16)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("segmentation.scenes.write_fashion_scenes", lambda root, *a: root)
    monkeypatch.setattr("detection.scenes.write_fashion_voc", lambda root, *a: root)
    seen: dict[str, str] = {}

    def runner(cfg):
        seen[cfg.engine] = cfg.train.precision
        return {i: 0.1 for i in range(1, 20)}

    monkeypatch.setattr(bench, "ENGINE_RUNNERS", {e: runner for e in ("torch", "mmseg", "detectron2")})
    monkeypatch.setattr(bench, "ISOLATE_ENGINES", False)
    rows = bench.engine_rows(bench.QUICK, tmp_path, tasks=("segmentation",))
    assert seen == {"torch": "bf16" if fast_bf16 else "fp32", "mmseg": "bf16" if fast_bf16 else "fp32"}
    assert rows[0].what.endswith("bf16" if fast_bf16 else "fp32")
    seen.clear()
    bench.engine_rows(bench.QUICK, tmp_path, tasks=("detection",))
    assert seen == {"torch": "fp32", "detectron2": "fp32"}


def test_compiled_segmentation_row_compiles_both_engines_and_leaves_out_the_compilation(monkeypatch, tmp_path):
    """segmentation-compiled: train.compile=true for the suite's engine and mmseg's, enough iterations to leave
    out COMPILE_WARMUP of them (mmengine recompiles in its first ~15) and time the mode's number after them."""
    monkeypatch.setattr("segmentation.scenes.write_fashion_scenes", lambda root, *a: root)
    monkeypatch.setattr("detection.scenes.write_fashion_voc", lambda root, *a: root)
    seen: dict[str, tuple] = {}

    def runner(cfg):
        seen[cfg.engine] = (cfg.train.compile, cfg.train.max_iter)
        return {i: 100.0 if i <= bench.COMPILE_WARMUP else (0.1 if cfg.engine == "torch" else 0.2)
                for i in range(1, cfg.train.max_iter + 1)}

    monkeypatch.setattr(bench, "ENGINE_RUNNERS", {e: runner for e in ("torch", "mmseg")})
    monkeypatch.setattr(bench, "ISOLATE_ENGINES", False)
    (row,) = bench.engine_rows(bench.QUICK, tmp_path, tasks=("segmentation-compiled",))
    iters = bench.COMPILE_WARMUP + bench.QUICK.engine_timed
    assert seen == {"torch": (True, iters), "mmseg": (True, iters)}
    assert "train.compile=true" in row.what and row.what.startswith("segmentation:")
    assert row.ratio.median == pytest.approx(0.5)  # the compilation's iterations are not in the ratio


def test_an_engine_runs_in_a_process_of_its_own(tmp_path):
    """The engine rows run each engine in a new process (with this one's torch threads) and read its per-iteration
    times back: here the suite's segmentation engine for 3 iterations. A failing run names its log."""
    from segmentation.scenes import write_fashion_scenes

    root = write_fashion_scenes(tmp_path / "scenes", 8, 2)
    overrides = [f"data.root={root}", "data.workers=0", "train.max_iter=3", "train.log_every=1", "train.eval_every=0",
                 "train.checkpoint_every=3", "eval.overlays=0", "data.crop_size=[32,32]", "train.batch_size=2",
                 f"output_dir={tmp_path / 'run'}"]
    per_iter = bench.run_engine_process(bench.SEG_CONFIG, "torch", overrides, tmp_path / "logs" / "torch.log")
    assert sorted(per_iter) == [1, 2, 3] and all(0 < s < 60 for s in per_iter.values())
    assert (tmp_path / "run" / "metrics.jsonl").exists()
    with pytest.raises(RuntimeError, match=f"(?s)failed .*its output is in {tmp_path / 'logs' / 'bad.log'}.*nonexistent"):
        bench.run_engine_process(bench.SEG_CONFIG, "torch", [*overrides, "data.root=/nonexistent"],
                                 tmp_path / "logs" / "bad.log")


def test_runtime_step_row_runs_each_trainer_in_its_own_process(tmp_path, monkeypatch):
    """The train step as each trainer runs it: a new process per side and round (the suite's after its runtime's
    device set-up, which on a CPU keeps freed memory), same precision and channels_last, the timm target."""
    from runtime import precision

    sizes = dataclasses.replace(bench.QUICK, rounds=1, step_timed=2)
    (row,) = bench.runtime_step_rows(sizes, tmp_path, pairs=(("resnet18d", "timm", "resnet18d"),))
    assert (row.ours, row.reference, row.target) == ("suite `resnet18d`", "timm `resnet18d`", "<= 0.95 (>= 1.05x speed)")
    assert len(row.times) == 1 and all(len(side) == 2 and min(side) > 0 for side in row.times[0])
    assert sorted(p.name for p in tmp_path.glob("*.json")) == ["suite_resnet18d_1.json", "timm_resnet18d_2.json"]
    set_up = []  # the suite's side runs its trainer's set-up (the reference's none)
    monkeypatch.setattr(precision, "setup_precision", lambda *a, **k: set_up.append((a, k)))
    assert len(bench.run_step("suite", "resnet18d", "fp32", True, 2, 32, 1)) == 1
    assert len(bench.run_step("timm", "resnet18d", "fp32", True, 2, 32, 1)) == 1
    assert [(a[0], a[1].type, k["channels_last"]) for a, k in set_up] == [("fp32", "cpu", True)]


def test_segmentation_pipeline_row_times_both_pipelines_on_ade20k_pairs(tmp_path):
    """The segmentation pipeline row: both sides time every image of every round, the suite's with its workers'
    share (the part left without the photometric step) in (0, 100]%, on ADE20K-layout pairs the suite reads."""
    pytest.importorskip("mmseg")
    from segmentation.ade20k import ADE20K

    sizes = dataclasses.replace(bench.QUICK, rounds=1, ade_images=5, ade_scale=(96, 32), ade_crop=32)
    row = bench.segmentation_pipeline_row(sizes, tmp_path)
    assert len(ADE20K(tmp_path / "ADEChallengeData2016", "train", check=True)) == 5
    assert [len(side) for side in row.times[0]] == [5, 5] and all(t > 0 for side in row.times[0] for t in side)
    assert 0 < float(row.notes["workers' share"].rstrip("%")) <= 100
