"""PNG pictures of detections: predicted boxes (coloured per class, with name and score) over the image,
ground-truth boxes in thin white beneath them. Both engines call ``save_detection_pictures`` after their
final evaluation; the demo puts a grid of them into its report."""
from __future__ import annotations

import colorsys
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from .voc_eval import VOCBoxes


def class_colours(num_classes: int) -> list[tuple[int, int, int]]:
    """``num_classes`` well separated colours (evenly spaced hues), the same for every picture."""
    return [tuple(int(255 * c) for c in colorsys.hsv_to_rgb(k / max(num_classes, 1), 0.85, 1.0))
            for k in range(num_classes)]


def draw_detections(image: torch.Tensor, prediction: VOCBoxes, classes: Sequence[str],
                    truth: VOCBoxes | None = None, score_thresh: float = 0.5, upscale: int = 1) -> np.ndarray:
    """``image`` (uint8 [3, H, W]) with the predictions scoring ``>= score_thresh`` drawn over it, and the
    ground truth (if given) in thin white; ``upscale`` enlarges small images first (nearest neighbour) so
    that the labels stay legible. Returns ``[H', W', 3]`` uint8."""
    from torchvision.utils import draw_bounding_boxes

    if upscale > 1:
        image = image.repeat_interleave(upscale, 1).repeat_interleave(upscale, 2)
    if truth is not None and len(truth.boxes):
        image = draw_bounding_boxes(image, torch.as_tensor(truth.boxes, dtype=torch.float32) * upscale,
                                    colors="white", width=1)
    keep = np.flatnonzero(prediction.scores >= score_thresh) if len(prediction.boxes) else np.zeros(0, np.int64)
    if len(keep):
        colours = class_colours(len(classes))
        labels = prediction.labels[keep]
        image = draw_bounding_boxes(
            image, torch.as_tensor(prediction.boxes[keep], dtype=torch.float32) * upscale,
            labels=[f"{classes[c]} {s:.2f}" for c, s in zip(labels, prediction.scores[keep])],
            colors=[colours[c] for c in labels], width=2)
    return image.permute(1, 2, 0).numpy()


def save_detection_pictures(dataset, detections: Mapping[str, VOCBoxes], out_dir: Path | str, count: int,
                            score_thresh: float = 0.5) -> list[Path]:
    """PNGs of the first ``count`` images of ``dataset`` (a ``detection.voc`` set: ``image_id(i)``,
    ``annotation(i)``, ``classes``; items ``(uint8 image, target)``) with their ``detections`` (keyed by
    image id), as ``<out_dir>/<image id>.png``. Small images (shorter side < 256 px) are enlarged 2-4x."""
    from PIL import Image

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(min(count, len(dataset))):
        image_id = dataset.image_id(index)
        image, _ = dataset[index]
        ann = dataset.annotation(index)
        upscale = max(1, min(4, 256 // max(1, min(ann.height, ann.width))))
        picture = draw_detections(image.as_subclass(torch.Tensor), detections[image_id], dataset.classes,
                                  VOCBoxes(ann.boxes, ann.labels), score_thresh, upscale)
        path = out_dir / f"{image_id}.png"
        Image.fromarray(picture).save(path)
        paths.append(path)
    return paths
