"""Fashion scenes written as an ADE20K release (``ADEChallengeData2016`` layout) for smoke runs.

::

    <out>/images/{training,validation}/fashion_{train,val}_00000001.jpg
    <out>/annotations/{training,validation}/fashion_{train,val}_00000001.png
    <out>/classes.txt

PNG values as ADE20K's: 0 = "other" (never written, ignored with ``reduce_zero_label``), 1 = background,
2..11 = the 10 Fashion-MNIST classes. So ``reduce_zero_label=True, num_classes=11`` reads class 0 =
background, 1..10 = the items; ``classes.txt`` lists those 11 names in that order. Training scenes use
Fashion-MNIST's training items, validation scenes its test items.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from runtime.scenes import BACKGROUND, FASHION_CLASSES, compose_scenes, load_fashion_mnist

CLASS_NAMES = ("background",) + FASHION_CLASSES  # after reduce_zero_label: 11 classes


def write_fashion_scenes(out_dir: Path | str, n_train: int = 2000, n_val: int = 500, *,
                         canvas: Sequence[int] = (128, 128), items: Sequence[int] = (2, 5),
                         scale: Sequence[float] = (1.0, 2.0), seed: int = 0,
                         fashion_root: Path | str | None = None) -> Path:
    """Write the scenes; returns ``out_dir`` (use it as ``data.root`` with ``num_classes=11``)."""
    out = Path(out_dir)
    kwargs = {} if fashion_root is None else {"root": fashion_root}
    for split, folder, tag, n, offset in (("train", "training", "train", n_train, 0),
                                          ("test", "validation", "val", n_val, 1)):
        images_dir, annotations_dir = out / "images" / folder, out / "annotations" / folder
        images_dir.mkdir(parents=True, exist_ok=True)
        annotations_dir.mkdir(parents=True, exist_ok=True)
        items_images, items_labels = load_fashion_mnist(split, **kwargs)
        scenes = compose_scenes(items_images, items_labels, n, canvas=canvas, items=items, scale=scale,
                                seed=seed * 2 + offset)
        for i, scene in enumerate(scenes, start=1):
            name = f"fashion_{tag}_{i:08d}"
            Image.fromarray(scene.image).save(images_dir / f"{name}.jpg", quality=95)
            annotation = np.where(scene.classes == BACKGROUND, 1, scene.classes + 2).astype(np.uint8)
            Image.fromarray(annotation).save(annotations_dir / f"{name}.png")
    (out / "classes.txt").write_text("\n".join(CLASS_NAMES) + "\n")
    return out
