"""Small "fashion scenes" built from Fashion-MNIST, for segmentation and detection smoke runs.

Several Fashion-MNIST items are scaled and placed at random on a canvas whose background is a smooth,
tinted, noisy texture in the same intensity range as the items (so neither a threshold nor a colour
test separates them). Each scene comes with its per-pixel class map (an item's silhouette = its pixels
above ``threshold``; later items occlude earlier ones) and the boxes of the visible part of each item.

Fashion-MNIST is read from the Debian package's gzip idx files (``apt-get install dataset-fashion-mnist``
puts them in ``/usr/share/datasets/fashion-mnist``). Only numpy, PIL and the standard library are used.
"""
from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
# The 10 classes in label order, spelled as identifiers (VOC object names, file names).
FASHION_CLASSES = ("tshirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle_boot")
BACKGROUND = -1  # value of the class map where no item is visible


def _read_idx(path: Path, magic: int, header: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise ValueError(f"{path}: not an idx file of this kind (magic {found}, expected {magic})")
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range((header - 4) // 4)]
    array = np.frombuffer(data, np.uint8, offset=header)
    if array.size != int(np.prod(dims)):
        raise ValueError(f"{path}: {array.size} bytes of data for dimensions {dims} (truncated file?)")
    return array.reshape(dims)


def load_fashion_mnist(split: str = "train", root: Path | str = FASHION_MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [N, 28, 28], labels int64 [N])`` of the ``"train"`` (60k) or ``"test"`` (10k) split."""
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"Fashion-MNIST split {split!r}: choose 'train' or 'test'")
    root = Path(root)
    image_path, label_path = root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz"
    missing = [str(p) for p in (image_path, label_path) if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"Fashion-MNIST not found: {', '.join(missing)}. Install it with "
                                f"`apt-get install dataset-fashion-mnist` (or pass root= a folder holding "
                                f"{image_path.name} and {label_path.name})")
    images = _read_idx(image_path, 2051, 16)
    labels = _read_idx(label_path, 2049, 8).astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f"{image_path} has {len(images)} images but {label_path} {len(labels)} labels")
    return images, labels


@dataclass
class Scene:
    image: np.ndarray    # [H, W, 3] uint8 RGB
    classes: np.ndarray  # [H, W] int16: the visible item's class 0..9, BACKGROUND (-1) elsewhere
    boxes: np.ndarray    # [K, 4] int64 xyxy pixel extents of the visible items: x1, y1 inclusive, x2, y2 exclusive
    labels: np.ndarray   # [K] int64 classes of those items (items hidden entirely are left out)


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Smooth low-frequency texture + pixel noise, tinted, in the items' intensity range (float32 0..255)."""
    coarse = rng.uniform(40, 200, (max(height // 16, 2), max(width // 16, 2))).astype(np.float32)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BILINEAR))
    tint = rng.uniform(0.85, 1.15, 3).astype(np.float32)
    noise = rng.standard_normal((height, width, 3), dtype=np.float32) * 12
    return smooth[..., None] * tint + noise


def compose_scenes(images: np.ndarray, labels: np.ndarray, n_scenes: int, *, canvas: Sequence[int] = (128, 128),
                   items: Sequence[int] = (2, 5), scale: Sequence[float] = (1.0, 2.0), threshold: int = 50,
                   seed: int = 0) -> list[Scene]:
    """``n_scenes`` scenes of ``canvas`` (H, W) px with ``items`` (min, max inclusive) random items each,
    every item scaled by U[``scale``] from 28 px and placed wholly inside the canvas at random (numpy
    ``Generator`` seeded with ``seed``: the same arguments give the same scenes).

    An item is drawn as gray (its Fashion-MNIST intensity, alpha-blended by it); its silhouette (item
    pixels above ``threshold``) sets the class map. Boxes are the extents of what stays visible.
    """
    if len(images) != len(labels) or len(images) == 0:
        raise ValueError(f"compose_scenes needs as many labels as images (got {len(images)} and {len(labels)})")
    height, width = canvas
    rng = np.random.default_rng(seed)
    scenes = []
    for _ in range(n_scenes):
        image = _background(rng, height, width)
        instance = np.full((height, width), -1, np.int16)
        chosen = rng.integers(0, len(images), rng.integers(items[0], items[1] + 1))
        for k, index in enumerate(chosen):
            side = int(round(28 * rng.uniform(*scale)))
            side = max(4, min(side, height, width))
            item = np.asarray(Image.fromarray(images[index]).resize((side, side), Image.BILINEAR))
            y, x = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
            alpha = item.astype(np.float32)[..., None] / 255
            window = image[y:y + side, x:x + side]
            window *= 1 - alpha
            window += alpha * item[..., None]
            instance[y:y + side, x:x + side][item > threshold] = k
        classes = np.full((height, width), BACKGROUND, np.int16)
        boxes, box_labels = [], []
        for k, index in enumerate(chosen):
            visible = instance == k
            if not visible.any():
                continue
            classes[visible] = labels[index]
            rows, cols = np.nonzero(visible.any(1))[0], np.nonzero(visible.any(0))[0]
            boxes.append((cols[0], rows[0], cols[-1] + 1, rows[-1] + 1))
            box_labels.append(labels[index])
        scenes.append(Scene(np.clip(image, 0, 255).astype(np.uint8), classes,
                            np.array(boxes, np.int64).reshape(-1, 4), np.array(box_labels, np.int64)))
    return scenes
