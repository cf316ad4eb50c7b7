"""Classification datasets (ImageNet folders, Fashion-MNIST, synthetic) and their DataLoader.

Public API:
- ``build_datasets(cfg, mean, std) -> (train_ds, val_ds, num_classes, class_names)``
- ``build_loader(dataset, batch_size=..., ...) -> DataLoader`` whose batches are always
  ``(images, labels, n_skipped)``: ``n_skipped`` is the number of unreadable images dropped from
  this batch (always 0 unless ``data.skip_corrupt=true``). It is computed in the worker that built
  the batch, so summing it over batches (and ranks) counts every skipped file exactly once. If a
  whole batch was skipped, ``images`` and ``labels`` are empty (``labels.numel() == 0``): skip the step.
"""
from __future__ import annotations

import colorsys
import gzip
import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import datasets, tv_tensors
from torchvision.datasets.folder import IMG_EXTENSIONS

from runtime.config import ConfigError
from runtime.errors import DataError, UserPathError
from runtime.images import JPEG_SUFFIXES, decode_jpeg_file

from .config import DataConfig
from .transforms import train_transform, val_transform

log = logging.getLogger(__name__)

Sample = tuple[Tensor, int]
Transform = Callable[..., Tensor]

IMAGENET_LAYOUT = ("expected the standard ImageNet layout: <root>/<train_split>/<wnid>/<image>.JPEG and "
                   "<root>/<val_split>/<wnid>/<image>.JPEG, e.g. val/n01440764/ILSVRC2012_val_00000293.JPEG")
FASHION_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                       "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


class CorruptImageError(DataError, RuntimeError):
    """An image file that PIL cannot decode; the message names the file and the way out."""


def read_rgb(path: str) -> Image.Image | tv_tensors.Image:
    """Decode ``path`` as RGB, raising ``CorruptImageError`` naming the file if it fails: a ``.jpg``/``.jpeg`` by
    ``torchvision.io`` as a uint8 ``tv_tensors.Image`` [3, H, W] (PIL's pixels, about half PIL's time:
    ``runtime.images.decode_jpeg_file``), any other file as a PIL image. The transforms start with ``ToImage``,
    which takes either. As torchvision's ``ImageFolder`` and timm, the EXIF orientation is not applied."""
    if path.lower().endswith(JPEG_SUFFIXES):
        image = decode_jpeg_file(path, exif_orientation=False)
        if image is not None:
            return tv_tensors.Image(image)
    try:
        with Image.open(path) as image:
            return image.convert("RGB")  # convert() forces the (lazy) decode inside the try
    except (OSError, SyntaxError, ValueError) as e:  # what PIL raises for unidentified/truncated data
        raise CorruptImageError(f"cannot read image {path}: {e}. Fix or delete the file, or set "
                                "data.skip_corrupt=true to skip and count such files") from e


class ImageFolderDataset(datasets.ImageFolder):
    """``ImageFolder`` whose samples are ``None`` for unreadable files when ``skip_corrupt`` is set.

    Returning ``None`` (dropped and counted by ``collate_skip_none``) instead of substituting another
    image keeps the dataset stateless, so it behaves the same in any number of DataLoader workers.
    """

    def __init__(self, root: str, transform: Optional[Transform] = None, skip_corrupt: bool = False) -> None:
        super().__init__(root, transform=transform, loader=read_rgb)
        self.skip_corrupt = skip_corrupt

    def __getitem__(self, index: int) -> Optional[Sample]:
        path, target = self.samples[index]
        try:
            image = self.loader(path)
        except CorruptImageError as e:
            if not self.skip_corrupt:
                raise
            log.warning("skipping unreadable image %s (%s)", path, e.__cause__)
            return None
        return (self.transform(image) if self.transform is not None else image), target


class SyntheticImages(Dataset):
    """Deterministic random RGB images with a learnable class signal.

    Sample ``i`` has label ``i % num_classes`` and is the class colour (hues evenly spaced on the
    colour circle, which colour jitter without hue shift preserves) plus Gaussian noise, drawn from a
    generator seeded by ``(split, i)``: identical across constructions, workers and processes.
    """

    def __init__(self, size: int, num_classes: int, img_size: int, split: int = 0,  # 0 = train, 1 = val
                 transform: Optional[Transform] = None, noise_std: float = 40.0) -> None:
        self.size, self.num_classes, self.img_size, self.split = size, num_classes, img_size, split
        self.transform, self.noise_std = transform, noise_std
        self.classes = [f"class_{k}" for k in range(num_classes)]
        self.colours = torch.tensor([colorsys.hsv_to_rgb(k / num_classes, 0.8, 0.8) for k in range(num_classes)]) * 255

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} synthetic images")
        label = index % self.num_classes
        generator = torch.Generator().manual_seed(2 * index + self.split)  # distinct streams per split
        noise = torch.randn(3, self.img_size, self.img_size, generator=generator) * self.noise_std
        image = (self.colours[label][:, None, None] + noise).round().clamp(0, 255).to(torch.uint8)
        return (self.transform(image) if self.transform is not None else image), label


def collate_skip_none(batch: Sequence[Optional[Sample]]) -> tuple[Tensor, Tensor, int]:
    """Stack ``(image, label)`` samples into ``(images, labels, n_skipped)``, dropping ``None`` samples."""
    kept = [sample for sample in batch if sample is not None]
    n_skipped = len(batch) - len(kept)
    if not kept:
        return torch.empty(0), torch.empty(0, dtype=torch.long), n_skipped
    images, labels = zip(*kept)
    return torch.stack(images), torch.as_tensor(labels, dtype=torch.long), n_skipped


def build_loader(dataset: Dataset, *, batch_size: int, shuffle: bool = False, workers: int = 0,
                 sampler: Optional[Sampler] = None, drop_last: bool = False,
                 collate_fn: Callable = collate_skip_none, persistent_workers: bool = True,
                 generator: Optional[torch.Generator] = None) -> DataLoader:
    """DataLoader over ``dataset`` yielding ``(images, labels, n_skipped)`` (see the module docstring).

    Pass a ``DistributedSampler`` as ``sampler`` under DDP (then ``shuffle`` must be False).
    """
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, sampler=sampler, num_workers=workers,
                      collate_fn=collate_fn, drop_last=drop_last, pin_memory=torch.cuda.is_available(), generator=generator,
                      # Persistent workers keep start-up out of every epoch; exact resume holds because each
                      # sample is augmented under its own seed (runtime.data.SeededSampler).
                      persistent_workers=persistent_workers and workers > 0)


def _imagenet_split(root: Path, split: str, transform: Transform, skip_corrupt: bool) -> ImageFolderDataset:
    split_dir = root / split
    if not split_dir.is_dir():
        raise UserPathError(f"ImageNet split directory {split_dir} does not exist (data.root={root}, "
                                f"split={split!r}); {IMAGENET_LAYOUT}")
    loose = sorted(p.name for p in split_dir.iterdir() if p.is_file() and p.name.lower().endswith(IMG_EXTENSIONS))
    if loose:
        raise DataError(f"{split_dir} holds {len(loose)} images directly (e.g. {loose[0]}) instead of one "
                         f"folder per class; {IMAGENET_LAYOUT}. The validation set as distributed is a flat "
                         "folder: sort it into class folders first with the standard valprep.sh script "
                         "(it moves each ILSVRC2012_val_*.JPEG into its wnid folder)")
    try:
        return ImageFolderDataset(str(split_dir), transform=transform, skip_corrupt=skip_corrupt)
    except FileNotFoundError as e:  # torchvision: no class folder, or no image in any of them
        raise DataError(f"{split_dir} (data.{split_key(split)}): no images to read ({e}); {IMAGENET_LAYOUT}") from None


def split_key(split: str) -> str:
    return "val_split" if "val" in split else "train_split"


def _imagenet(cfg: DataConfig, train_tf: Transform, val_tf: Transform) -> tuple[Dataset, Dataset, list[str]]:
    root = Path(cfg.root)
    if not root.is_dir():
        raise UserPathError(f"ImageNet root {root} does not exist (data.root); {IMAGENET_LAYOUT}")
    val = _imagenet_split(root, cfg.val_split, val_tf, cfg.skip_corrupt)
    if train_tf is None:  # evaluation only: the 1.28M-file training folder is not scanned
        return None, val, val.classes
    train = _imagenet_split(root, cfg.train_split, train_tf, cfg.skip_corrupt)
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise DataError(f"class folders of {root / cfg.train_split} and {root / cfg.val_split} differ "
                         f"(only in train: {only_train[:5]}, only in val: {only_val[:5]}, "
                         f"{len(only_train)}/{len(only_val)} in all); both splits need the same wnid folders")
    return train, val, train.classes


def fashion_mnist_cache_dir() -> Path:
    """Base cache directory: ``$BAG_OF_TRICKS_CACHE``, else ``${XDG_CACHE_HOME:-~/.cache}/bag-of-tricks``."""
    if os.environ.get("BAG_OF_TRICKS_CACHE"):
        return Path(os.environ["BAG_OF_TRICKS_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "bag-of-tricks"


def _copy_decompressed(source: Path, target: Path) -> None:
    """Write ``source`` (gunzipped if ``.gz``) to ``target`` unless the copy of this very source is there: the copy
    takes the source's modification time, and only an equal time reuses it (a replaced source with an older time,
    as tar, ``cp -p`` and package installs keep it, is copied again)."""
    stat = source.stat()
    if target.is_file() and target.stat().st_mtime_ns == stat.st_mtime_ns:
        return
    opener = gzip.open if source.suffix == ".gz" else open
    # temp + rename: concurrent ranks or an interrupted run never leave a partial file behind.
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with opener(source, "rb") as src, os.fdopen(fd, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        os.utime(tmp, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fashion_mnist_root(cfg: DataConfig) -> tuple[str, bool]:
    """Return a torchvision-layout root (``<root>/FashionMNIST/raw/<files>``) and whether to download."""
    root = Path(cfg.root)
    if all((root / "FashionMNIST" / "raw" / name).is_file() for name in FASHION_MNIST_FILES):
        return str(root), False
    sources = [next((p for p in (root / name, root / f"{name}.gz") if p.is_file()), None)
               for name in FASHION_MNIST_FILES]
    if None not in sources:
        # torchvision reads only the uncompressed files (a symlink to the .gz fails), and the source
        # (e.g. /usr/share/datasets) may be read-only: decompress into a cache directory per source.
        source_key = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:12]
        cache = fashion_mnist_cache_dir() / "fashion-mnist" / source_key
        raw = cache / "FashionMNIST" / "raw"
        raw.mkdir(parents=True, exist_ok=True)
        for name, source in zip(FASHION_MNIST_FILES, sources):
            _copy_decompressed(source, raw / name)
        return str(cache), False
    if cfg.download:
        return str(root), True
    missing = [name for name, source in zip(FASHION_MNIST_FILES, sources) if source is None]
    raise UserPathError(f"Fashion-MNIST files {missing} (or their .gz) not found in {root} (data.root), nor "
                            f"the torchvision layout {root}/FashionMNIST/raw/. Install them with `apt-get install "
                            "dataset-fashion-mnist` and set data.root=/usr/share/datasets/fashion-mnist, "
                            "or set data.download=true (needs internet)")


def _fashion_mnist(cfg: DataConfig, train_tf: Transform, val_tf: Transform) -> tuple[Dataset, Dataset, list[str]]:
    root, download = _fashion_mnist_root(cfg)
    train = datasets.FashionMNIST(root, train=True, transform=train_tf, download=download)
    val = datasets.FashionMNIST(root, train=False, transform=val_tf, download=download)
    return train, val, list(train.classes)


def _synthetic(cfg: DataConfig, train_tf: Transform, val_tf: Transform) -> tuple[Dataset, Dataset, list[str]]:
    num_classes = cfg.num_classes or 10
    train = SyntheticImages(cfg.synthetic_size, num_classes, cfg.img_size, split=0, transform=train_tf)
    val = SyntheticImages(max(1, cfg.synthetic_size // 4), num_classes, cfg.img_size, split=1, transform=val_tf)
    return train, val, train.classes


class TensorLoader:
    """Batches ``(uint8 images, labels, 0)`` from in-memory tensors, in the order of ``sampler``.

    The loader of the batched pipeline (``batch_transforms.BatchAugment`` augments on the device):
    no workers, no per-sample Python. Same batch contract as ``build_loader``.
    """

    def __init__(self, images: Tensor, labels: Tensor, batch_size: int, sampler: Sampler, drop_last: bool = False):
        self.images, self.labels, self.batch_size = images, labels, batch_size
        self.sampler, self.drop_last = sampler, drop_last
        self.skip = 0  # batches to leave out of each pass until set again (resuming inside an epoch)

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        order = torch.as_tensor(list(self.sampler), dtype=torch.long)
        for b in range(self.skip, len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            yield self.images[idx], self.labels[idx], 0


def _fashion_mnist_tensors(cfg: DataConfig) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor], list[str]]:
    root, download = _fashion_mnist_root(cfg)
    train = datasets.FashionMNIST(root, train=True, download=download)
    val = datasets.FashionMNIST(root, train=False, download=download)
    return (train.data[:, None], train.targets), (val.data[:, None], val.targets), list(train.classes)


def _synthetic_tensors(cfg: DataConfig) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor], list[str]]:
    train, val, classes = _synthetic(cfg, None, None)

    def stack(ds: Dataset) -> tuple[Tensor, Tensor]:
        images, labels = zip(*(ds[i] for i in range(len(ds))))
        return torch.stack(images), torch.tensor(labels)

    return stack(train), stack(val), classes


TENSOR_DATASETS = {"fashion_mnist": _fashion_mnist_tensors, "synthetic": _synthetic_tensors}


def resolve_pipeline(cfg: DataConfig) -> str:
    """``data.pipeline``: "auto" is "tensor" for datasets held in memory (Fashion-MNIST), else "samples";
    "samples" and "hybrid" work for every dataset."""
    if cfg.pipeline == "auto":
        return "tensor" if cfg.name == "fashion_mnist" else "samples"
    if cfg.pipeline == "tensor" and cfg.name not in TENSOR_DATASETS:
        raise ConfigError(f"data.pipeline=tensor needs a dataset held in memory ({sorted(TENSOR_DATASETS)}); "
                         f"{cfg.name!r} uses data.pipeline=samples")
    return cfg.pipeline


def build_tensors(cfg: DataConfig) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor], int, list[str]]:
    """uint8 ``[N, C, H, W]`` images and labels of train and val, for the batched pipeline."""
    train, val, class_names = TENSOR_DATASETS[cfg.name](cfg)
    if cfg.num_classes and cfg.num_classes != len(class_names):
        raise ConfigError(f"data.num_classes={cfg.num_classes} but the {cfg.name} data has {len(class_names)} classes")
    return train, val, len(class_names), class_names


DATASETS: dict[str, Callable[[DataConfig, Transform, Transform], tuple[Dataset, Dataset, list[str]]]] = {
    "imagenet": _imagenet,
    "fashion_mnist": _fashion_mnist,
    "synthetic": _synthetic,
}


def build_datasets(cfg: DataConfig, mean: Sequence[float], std: Sequence[float], in_chans: int = 3,
                   with_train: bool = True, uint8: bool = False) -> tuple[Optional[Dataset], Dataset, int, list[str]]:
    """Build ``(train_ds, val_ds, num_classes, class_names)`` for ``cfg.name`` with the §2.1 transforms.

    ``mean``/``std`` are per-channel on the 0-1 scale. Samples are ``(float image (in_chans, H, W), label)``,
    or ``None`` for an unreadable ImageNet file when ``cfg.skip_corrupt`` (see ``collate_skip_none``).
    ``uint8=True`` (``data.pipeline=hybrid``): the images are uint8, augmented geometrically only (crop, flip,
    translate; validation: resize and centre crop), for ``BatchAugment(geometry=False)`` on the device.
    ``with_train=False`` (evaluation) does not index the ImageNet training folder (train_ds is then None).
    """
    if cfg.name not in DATASETS:
        raise ConfigError(f"unknown data.name {cfg.name!r}; choose one of {sorted(DATASETS)}")
    train_tf = train_transform(cfg, mean, std, in_chans, colour=not uint8) if with_train else None
    train, val, class_names = DATASETS[cfg.name](cfg, train_tf, val_transform(cfg, mean, std, in_chans,
                                                                              normalize=not uint8))
    if cfg.num_classes and cfg.num_classes != len(class_names):
        raise ConfigError(f"data.num_classes={cfg.num_classes} but the {cfg.name} data at {cfg.root} has "
                         f"{len(class_names)} classes; set data.num_classes=0 to take it from the data")
    return train, val, len(class_names), class_names
