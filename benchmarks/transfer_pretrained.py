"""Does pretraining transfer? The demo's segmentation and detection stages from the demo's pretrained
backbone vs from random initialisation, same schedule, 3 seeds each.

* segmentation: ``configs/segmentation/fashion_scenes/...`` (FCN-D8, mIoU on 500 validation scenes);
  random = ``model.weights`` unset (trainable BN, as mmseg trains from scratch).
* detection: ``configs/detection/fashion_voc/...`` (Faster R-CNN + FPN, VOC07 mAP on 500 test scenes);
  pretrained = frozen BN and stem + res2 frozen (detectron2's recipe), random = trainable BN, nothing
  frozen (a randomly initialised frozen BN diverges).
Both inits normalise inputs with the pretraining's mean/std, so only the initial weights differ.

Run (after ``tricks demo``, whose classification stage gives the weights):
``python benchmarks/transfer_pretrained.py --weights runs/demo/classification/model.safetensors``
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import RESULTS, header, table  # noqa: E402

from tricks.demo import REPO, STAGES, normalization_overrides  # noqa: E402

METRIC = {"segmentation": ("mIoU", "mIoU %"), "detection": ("mAP", "VOC07 mAP %")}


def overrides(task: str, init: str, seed: int, weights: str, data: Path, out: Path) -> list[str]:
    args = [f"train.seed={seed}", f"output_dir={out}", *normalization_overrides()]
    if task == "segmentation":
        args += [f"data.root={data / 'fashion_scenes' / 'ADEChallengeData2016'}"]
        args += [f"model.weights={weights}"] if init == "pretrained" else ["model.weights=null"]
    else:
        devkit = data / "fashion_voc" / "VOCdevkit"
        args += [f"data.root={devkit}", f"data.classes={devkit / 'classes.txt'}"]
        args += ([f"model.weights={weights}", *STAGES["detection"].overrides]  # the demo's: frozen BN, stem + res2
                 if init == "pretrained" else ["model.weights=null", "model.norm=batchnorm", "model.frozen_stages=0"])
    return args


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", default="runs/demo/classification/model.safetensors")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tasks", nargs="+", default=["segmentation", "detection"])
    parser.add_argument("--work", default="runs/bench/transfer_pretrained", help="runs and data go here")
    args = parser.parse_args()
    from detection.scenes import write_fashion_voc
    from segmentation.scenes import write_fashion_scenes
    from tricks.cli import load_task_config, run_config

    work = Path(args.work)
    data = work / "data"
    write_fashion_scenes(data / "fashion_scenes" / "ADEChallengeData2016", 2000, 500, seed=0)
    write_fashion_voc(data / "fashion_voc", 2000, 500, seed=0)
    results_file = work / "results.jsonl"
    done = {}
    if results_file.is_file():  # a rerun continues: finished runs are read back
        for line in results_file.read_text().splitlines():
            r = json.loads(line)
            done[(r["task"], r["init"], r["seed"])] = r
    for task in args.tasks:
        for seed in args.seeds:
            for init in ("pretrained", "random"):
                if (task, init, seed) in done:
                    continue
                out = work / task / f"{init}_seed{seed}"
                cfg = load_task_config(str(REPO / STAGES[task].config),
                                       overrides(task, init, seed, args.weights, data, out))
                tic = time.perf_counter()
                metrics = run_config(cfg)
                record = {"task": task, "init": init, "seed": seed, "metric": metrics[METRIC[task][0]],
                          "minutes": (time.perf_counter() - tic) / 60}
                done[(task, init, seed)] = record
                with results_file.open("a") as f:
                    f.write(json.dumps(record) + "\n")
    write_results(done, args)


def write_results(done: dict, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, summary = [], {}
    for task in args.tasks:
        for init in ("pretrained", "random"):
            values = [done[(task, init, s)]["metric"] for s in args.seeds]
            minutes = statistics.mean(done[(task, init, s)]["minutes"] for s in args.seeds)
            mean, std = statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0
            summary[(task, init)] = (mean, std)
            rows.append([task, f"`{Path(STAGES[task].config).name}`", init, METRIC[task][1],
                         " / ".join(f"{v:.2f}" for v in values), f"**{mean:.2f} ± {std:.2f}**", f"{minutes:.1f}"])
    text = header("Transfer: the demo's pretrained backbone vs random initialisation")
    text += ("\nThe demo's transfer stages (`tricks demo`), each run with seeds "
             f"{', '.join(map(str, args.seeds))} from the demo's pretrained ResNet-18-D (`{args.weights}`) and from "
             "random initialisation, on the same schedule. Mean ± sample standard deviation over the seeds.\n\n")
    text += table(rows, ["task", "config", "init", "metric", "per seed", "mean ± std", "min per run"])
    verdicts = []
    for task in args.tasks:
        (pm, ps), (rm, rs) = summary[(task, "pretrained")], summary[(task, "random")]
        verdicts.append(f"- {task}: pretrained {pm:.2f} vs random {rm:.2f} ({pm - rm:+.2f} points): target "
                        f"(pretrained beats random) **{'met' if pm > rm else 'NOT met'}**")
    text += "\n" + "\n".join(verdicts) + "\n"
    reused = [r for r in done.values() if r.get("source")]
    if reused:
        text += "\nRuns taken from elsewhere instead of rerun (same config, overrides and seed; runs are bit-reproducible):\n"
        text += "".join(f"- {r['task']} {r['init']} seed {r['seed']}: {r['source']}\n" for r in reused)
    text += ("\nWall minutes are per run on the shared 2-core machine (other jobs ran beside some of them), so they "
             "are not speed measurements; benchmarks/results/engines.md has those.\n")
    text += "\n![pretrained vs random](transfer_pretrained.png)\n"
    (RESULTS / "transfer_pretrained.md").write_text(text)

    fig, axes = plt.subplots(1, len(args.tasks), figsize=(4.5 * len(args.tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], args.tasks):
        for i, init in enumerate(("pretrained", "random")):
            mean, std = summary[(task, init)]
            ax.bar(i, mean, yerr=std, capsize=6, color=("tab:blue", "tab:gray")[i])
            ax.scatter([i] * len(args.seeds), [done[(task, init, s)]["metric"] for s in args.seeds], color="k", s=12,
                       zorder=3)
            ax.text(i, mean / 2, f"{mean:.1f}", ha="center", color="white")
        ax.set_xticks([0, 1], ["pretrained", "random"])
        ax.set_ylabel(METRIC[task][1])
        ax.set_title(task)
    fig.tight_layout()
    fig.savefig(RESULTS / "transfer_pretrained.png", dpi=100)
    print(text)


if __name__ == "__main__":
    main()
