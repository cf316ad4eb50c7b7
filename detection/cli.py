"""``tricks voc-eval``: score detections written in the VOC devkit's results format against a VOCdevkit;
``tricks coco-eval``: score detections in the COCO results format against an instances JSON (COCOeval).

``add_subcommands(subparsers)`` registers the command on the ``tricks`` parser; ``python -m detection.cli``
runs it alone. The work is ``detection.voc_eval.score_voc_results``; this module only parses and prints.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Optional, Sequence


def _percent(value: float) -> str:
    return "-" if math.isnan(value) else f"{100 * value:.2f}"


def without_ground_truth_note(ap_per_class: dict, split: str) -> list[str]:
    """The line saying which classes have no ground-truth object and are left out of the mean (or none)."""
    absent = [name for name, ap in ap_per_class.items() if math.isnan(ap)]
    if not absent:
        return []
    return [f"mean over {len(ap_per_class) - len(absent)} of {len(ap_per_class)} classes: left out, no "
            f"ground-truth object in the {split} split: {', '.join(absent)}"]


def _report(result: dict, devkit: str, year: str, split: str) -> str:
    """Per-class AP table (percent), then both mAPs with the chosen metric first; a class without
    ground truth reads "no ground truth" and a last line names the classes left out of the mean."""
    metric = result["metric"]
    label = {"voc07": "VOC07 11-point", "area": "area under the PR curve"}
    rows = [(name, str(result["num_gt"][name]), "no ground truth" if math.isnan(ap) else _percent(ap))
            for name, ap in result["ap_per_class"].items()]
    header = ("class", "gt boxes", f"AP {metric} (%)")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    line = lambda r: f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}"
    other = "area" if metric == "voc07" else "voc07"
    return "\n".join([
        f"VOC{year} {split} ({devkit}), IoU > 0.5, difficult boxes ignored",
        line(header), "  ".join("-" * w for w in widths), *map(line, rows), "",
        f"mAP ({label[metric]}): {_percent(result[f'map_{metric}'])}",
        f"mAP ({label[other]}): {_percent(result[f'map_{other}'])}",
        f"AP IoU 0.50:0.95 ({label[metric]}, detectron2's VOC AP): {_percent(result['ap'])}",
        f"AP75 ({label[metric]}): {_percent(result['ap75'])}",
        *without_ground_truth_note(result["ap_per_class"], split),
    ])


def _json_ready(result: dict) -> dict:
    """The ``--json`` document: fractions in 0-1, NaN (a class without ground truth) as null."""
    clean = lambda v: None if math.isnan(v) else v
    return {"map_voc07": clean(result["map_voc07"]), "map_area": clean(result["map_area"]),
            "ap": clean(result["ap"]), "ap75": clean(result["ap75"]),
            "ap_per_class": {k: clean(v) for k, v in result["ap_per_class"].items()},
            "metric": result["metric"], "num_gt": result["num_gt"]}


def cmd_voc_eval(args: argparse.Namespace) -> int:
    from .voc import VOCFormatError
    from .voc_eval import score_voc_results

    classes = args.classes_file
    if args.classes is not None:
        classes = [name.strip() for name in args.classes.split(",")]
    # The devkit scores VOC2007 with the 11-point metric and VOC2010+ with the area (py-faster-rcnn does too).
    use_07 = args.use_07_metric
    if use_07 is None:
        use_07 = args.year.isdigit() and int(args.year) < 2010
    try:
        result = score_voc_results(args.devkit, args.year, args.split, args.results, classes=classes,
                                   use_07_metric=use_07, prefix=args.prefix, skip_invalid=args.skip_invalid)
    except (VOCFormatError, FileNotFoundError, ValueError, TypeError) as e:
        print(f"voc-eval: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(_json_ready(result), indent=2))
    else:
        print(_report(result, args.devkit, args.year, args.split))
    return 0


def cmd_coco_eval(args: argparse.Namespace) -> int:
    from .coco import COCOFormatError
    from .coco_eval import STAT_NAMES, score_coco_files

    try:
        result = score_coco_files(args.gt, args.results)
    except (COCOFormatError, ValueError, OSError) as e:  # OSError: a folder given for a file
        print(f"coco-eval: error: {e}", file=sys.stderr)
        return 2
    clean = lambda v: None if math.isnan(v) else v
    if args.json:
        doc = {name: clean(result[name]) for name in STAT_NAMES}
        doc["ap_per_class"] = {k: clean(v) for k, v in result["ap_per_class"].items()}
        print(json.dumps(doc, indent=2))
        return 0
    rows = [(name, _percent(ap)) for name, ap in result["ap_per_class"].items()]
    width = max(len(r[0]) for r in [("class", ""), *rows])
    print(f"COCOeval (bbox) of {args.results} against {args.gt}")
    print(f"{'class':<{width}}  AP (%)")
    print("\n".join(f"{name:<{width}}  {ap:>6}" for name, ap in rows))
    print("  ".join(f"{name} {_percent(result[name])}" for name in STAT_NAMES))
    return 0


def add_subcommands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``voc-eval`` and ``coco-eval`` on a parser's subcommands (the ``tricks`` command calls this)."""
    p = subparsers.add_parser(
        "coco-eval", help="COCO AP/AR of a COCO results JSON against an instances JSON (pycocotools' COCOeval)",
        description="Score detections in the COCO results format ([{image_id, category_id, bbox: [x, y, w, h], "
                    "score}, ...]) with pycocotools' COCOeval (bbox): AP (IoU 0.50:0.95), AP50, AP75, APs, "
                    "APm, APl, AR1, AR10, AR100 and per-class AP.")
    p.add_argument("--gt", required=True, metavar="ANNOTATIONS.json", help="COCO instances JSON (ground truth)")
    p.add_argument("--results", required=True, metavar="DETECTIONS.json", help="COCO results JSON")
    p.add_argument("--json", action="store_true", help='print {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", '
                   '"AR10", "AR100", "ap_per_class"} (fractions in 0-1; null where there is no ground truth)')
    p.set_defaults(func=cmd_coco_eval)

    p = subparsers.add_parser(
        "voc-eval", help="AP of devkit results files (comp4_det_<split>_<class>.txt) against a VOCdevkit",
        description="Score detections in the VOC devkit's results format: per-class AP and mAP (VOC07 "
                    "11-point and area under the PR curve; both are printed, the metric flag picks the headline).")
    p.add_argument("--devkit", required=True, metavar="DIR", help="the VOCdevkit folder (or its parent)")
    p.add_argument("--year", default="2007", help="VOC<year> folder inside the devkit (default 2007)")
    p.add_argument("--split", default="test", help="ImageSets/Main/<split>.txt (default test)")
    p.add_argument("--results", required=True, metavar="DIR", help="folder of <prefix>_<split>_<class>.txt files")
    p.add_argument("--prefix", default="comp4_det", help="results file prefix (default comp4_det)")
    names = p.add_mutually_exclusive_group()
    names.add_argument("--classes", metavar="A,B,...", help="class names, comma-separated (default: the 20 VOC)")
    names.add_argument("--classes-file", metavar="FILE", help="file with one class name per line")
    metric = p.add_mutually_exclusive_group()
    metric.add_argument("--use-07-metric", dest="use_07_metric", action="store_true", default=None,
                        help="headline the VOC07 11-point mAP (default for --year before 2010)")
    metric.add_argument("--area", dest="use_07_metric", action="store_false",
                        help="headline the area-under-the-curve mAP (VOC2010+; default for those years)")
    p.add_argument("--skip-invalid", action="store_true",
                   help="leave out ground-truth objects with unknown classes or empty boxes instead of failing")
    p.add_argument("--json", action="store_true",
                   help='print {"map_voc07", "map_area", "ap_per_class", ...} (fractions in 0-1) instead')
    p.set_defaults(func=cmd_voc_eval)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m detection.cli voc-eval ...``; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m detection.cli")
    add_subcommands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
