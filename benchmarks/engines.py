"""The suite's own engines vs the reference libraries' engines, on the same model, data, sizes and batch:
the results. The demo's segmentation checkpoint evaluated by both engines (mIoU), and detection fine-tuned
from the demo's pretrained backbone by both engines with the same schedule (VOC07 mAP, wall time and peak
resident memory of each whole run). Their speed per iteration is a row of ``tricks bench``.

Run after ``tricks demo`` (its weights and data): ``python benchmarks/engines.py``
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import RESULTS, header, table  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SEG = "configs/segmentation/fashion_scenes/fcn_resnet18d-d8_1xb8-1k_fashion-scenes.yaml"
DET = "configs/detection/fashion_voc/faster-rcnn_resnet18d-fpn_1xb8-400_fashion-voc.yaml"

CHILD = r"""
import json, resource, sys, time
from tricks.cli import load_task_config, _engine
verb, config, checkpoint, *overrides = sys.argv[1:]
cfg = load_task_config(config, overrides)
tic = time.perf_counter()
metrics = _engine(cfg, verb)(cfg) if verb == "train" else _engine(cfg, verb)(cfg, checkpoint)
seconds = time.perf_counter() - tic
keep = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
print("RESULT " + json.dumps({"seconds": seconds, "max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                               "metrics": keep}))
"""


CACHE: Path | None = None  # <work>/runs.json: finished runs, so that a rerun only does what is missing


def run(verb: str, config: str, overrides: list[str], checkpoint: str = "-") -> dict:
    """One ``tricks train``/``eval`` in a fresh process; its wall time, peak RSS and numeric metrics."""
    key = json.dumps([verb, config, overrides, checkpoint])
    cache = json.loads(CACHE.read_text()) if CACHE is not None and CACHE.is_file() else {}
    if key in cache:
        return cache[key]
    result = _run(verb, config, overrides, checkpoint)
    if CACHE is not None:
        cache[key] = result
        CACHE.write_text(json.dumps(cache, indent=1))
    return result


def _run(verb: str, config: str, overrides: list[str], checkpoint: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, verb, str(REPO / config), checkpoint, *overrides],
                          capture_output=True, text=True, cwd=REPO)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"{verb} {config} {overrides} failed:\n{proc.stderr[-4000:]}")
    return json.loads(line[len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", default="runs/demo", help="the tricks demo output (weights, data, checkpoints)")
    parser.add_argument("--work", default="runs/bench/engines")
    parser.add_argument("--skip-full", action="store_true", help="no full detection runs")
    args = parser.parse_args()
    global CACHE
    from tricks.demo import STAGES, normalization_overrides

    demo, work = Path(args.demo).resolve(), Path(args.work).resolve()
    norm = normalization_overrides()  # the pretraining's mean/std, as the demo's transfer stages
    work.mkdir(parents=True, exist_ok=True)
    CACHE = work / "runs.json"
    weights = demo / "classification" / "model.safetensors"
    seg_data = [f"data.root={demo / 'data' / 'fashion_scenes' / 'ADEChallengeData2016'}", *norm]
    devkit = demo / "data" / "fashion_voc" / "VOCdevkit"
    det_data = [f"data.root={devkit}", f"data.classes={devkit / 'classes.txt'}", *norm]
    det_pretrained = [f"model.weights={weights}", *STAGES["detection"].overrides]  # frozen BN, stem + res2 frozen

    # The same segmentation checkpoint (the demo's) through both engines' evaluation.
    seg_ckpt = demo / "segmentation" / "model_final.pth"
    seg_eval = {engine: run("eval", SEG, [f"engine={engine}", *seg_data, "data.workers=0",
                                          f"output_dir={work / f'seg_eval_{engine}'}"], str(seg_ckpt))
                for engine in ("torch", "mmseg")}
    det_full = {}
    if not args.skip_full:
        det_full = {engine: run("train", DET, [f"engine={engine}", *det_data, *det_pretrained,
                                               f"output_dir={work / f'det_full_{engine}'}"])
                    for engine in ("torch", "detectron2")}
    write(seg_eval, det_full, seg_ckpt)


def write(seg_eval, det_full, seg_ckpt) -> None:
    text = header("Engines: the suite's vs mmsegmentation's and detectron2's, same model and data")
    text += ("\nEvery number comes from a whole `tricks train`/`tricks eval` in a fresh process on the demo's "
             "configs, data and pretrained backbone. Peak memory = maximum resident set of the process. Speed per "
             "iteration: `tricks bench` (benchmarks/bench.py).\n")
    a, b = seg_eval["torch"]["metrics"], seg_eval["mmseg"]["metrics"]
    text += (f"\n## One segmentation checkpoint, both engines' evaluation\n\n`{seg_ckpt}` (the demo's fine-tuned FCN; "
             "the mmseg engine loads it renamed by `segmentation.mmseg_engine.torch_engine_state_to_mmseg`).\n\n")
    text += table([["torch", f"{a['mIoU']:.2f}", f"{a['mAcc']:.2f}", f"{a['aAcc']:.2f}"],
                   ["mmseg", f"{b['mIoU']:.2f}", f"{b['mAcc']:.2f}", f"{b['aAcc']:.2f}"]],
                  ["engine", "mIoU %", "mAcc %", "aAcc %"])
    gap = abs(a["mIoU"] - b["mIoU"])
    text += (f"\nmIoU gap {gap:.2f} points (target <= 0.5: **{'met' if gap <= 0.5 else 'NOT met'}**). What differs: "
             "both engines resize bilinearly without antialias, the torch engine with torchvision on uint8 tensors, "
             "mmseg with OpenCV's `cv2.resize` (fixed-point arithmetic: pixels up to 1 level apart), and both resize "
             "the logits back with bilinear `F.interpolate`; mmseg rounds its metrics to 0.01. These scenes are "
             "evaluated at their own size (`data.scale` = the canvas), so no image is resized and only the "
             "rounding differs.\n")
    if det_full:
        text += "\n## Detection fine-tuned by both engines (same backbone, schedule, sizes)\n\n"
        text += table([[e, f"{r['metrics']['mAP']:.2f}", f"{r['seconds'] / 60:.1f}", f"{r['max_rss_gib']:.2f}"]
                       for e, r in det_full.items()], ["engine", "VOC07 mAP %", "wall min (train + eval)", "peak RSS GiB"])
        text += ("\nOne seed each, the demo's pretrained backbone, schedule, sizes, proposals and RoI sampling. The "
                 "networks have the same parameters but for detectron2's class-agnostic background row in the box "
                 "regressor (3,900,146 vs 3,901,174); the losses differ: detectron2 regresses boxes with L1 "
                 "(`SMOOTH_L1_BETA` 0), torchvision with smooth L1 (beta 1/9) in the box head, and the two "
                 "initialise the FPN and heads differently (caffe2 Xavier / MSRA fill vs PyTorch defaults).\n")
    (RESULTS / "engines.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
