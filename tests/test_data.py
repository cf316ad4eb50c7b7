"""Datasets on data written in their real on-disk layouts: ImageNet folders, Fashion-MNIST idx(.gz), synthetic."""
from __future__ import annotations

import gc
import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from classification.config import DataConfig
from classification.data import (CorruptImageError, SyntheticImages, build_datasets, build_loader,
                                 collate_skip_none)

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
WNIDS = ["n01440764", "n01443537", "n01484850"]
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def small_cfg(**overrides) -> DataConfig:
    return DataConfig(**{"img_size": 8, "val_resize": 10, "val_crop": 8, **overrides})


def write_imagenet(root: Path, train_per_class: int = 2, val_per_class: int = 1) -> Path:
    """A tiny tree in the standard layout: <root>/{train,val}/<wnid>/<name>.JPEG."""
    for k, wnid in enumerate(WNIDS):
        for split, count in (("train", train_per_class), ("val", val_per_class)):
            folder = root / split / wnid
            folder.mkdir(parents=True)
            for i in range(count):
                name = f"{wnid}_{i}.JPEG" if split == "train" else f"ILSVRC2012_val_{k * 10 + i:08d}.JPEG"
                Image.new("RGB", (20, 14), (80 * k, 40 * i, 200)).save(folder / name)
    return root


def corrupt(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated JPEG: header fine, scan data cut


@pytest.mark.parametrize("workers", [0, 2])
def test_imagenet_folders_load_through_dataloader(tmp_path, workers):
    root = write_imagenet(tmp_path)
    train, val, num_classes, names = build_datasets(small_cfg(root=str(root)), MEAN, STD)
    assert (num_classes, names, len(train), len(val)) == (3, WNIDS, 6, 3)
    labels = []
    for images, batch_labels, n_skipped in build_loader(train, batch_size=4, workers=workers):
        assert images.shape[1:] == (3, 8, 8) and images.dtype == torch.float32 and n_skipped == 0
        labels += batch_labels.tolist()
    assert labels == [0, 0, 1, 1, 2, 2]
    batches = list(build_loader(val, batch_size=3, workers=workers))
    assert len(batches) == 1 and batches[0][0].shape == (3, 3, 8, 8) and batches[0][1].tolist() == [0, 1, 2]


@pytest.fixture
def corrupt_train(tmp_path):
    """An ImageNet-layout train split whose first image of class 1 is truncated: (dataset, bad path)."""
    root = write_imagenet(tmp_path)
    bad = root / "train" / WNIDS[1] / f"{WNIDS[1]}_0.JPEG"
    corrupt(bad)
    train, *_ = build_datasets(small_cfg(root=str(root)), MEAN, STD)
    return train, bad


def test_corrupt_image_error_names_the_file(corrupt_train):
    train, bad = corrupt_train
    with pytest.raises(CorruptImageError, match="skip_corrupt") as err:
        train[2]
    assert str(bad) in str(err.value)
    with pytest.raises(CorruptImageError, match=WNIDS[1]):
        list(build_loader(train, batch_size=6, workers=0))


@pytest.mark.slow  # ~5 s: DataLoader waits for its worker to join after a worker error
def test_corrupt_image_error_crosses_worker_processes(corrupt_train):
    train, bad = corrupt_train
    with pytest.raises(CorruptImageError, match="skip_corrupt") as err:
        list(build_loader(train, batch_size=6, workers=1))
    assert str(bad) in str(err.value)
    del err
    gc.collect()  # the failed iterator sits in a traceback cycle: shut its worker down here, not in a later test


def test_skip_corrupt_drops_and_counts(tmp_path):
    root = write_imagenet(tmp_path)
    corrupt(root / "train" / WNIDS[1] / f"{WNIDS[1]}_0.JPEG")
    train, *_ = build_datasets(small_cfg(root=str(root), skip_corrupt=True), MEAN, STD)
    assert train[2] is None
    (images, labels, n_skipped), = list(build_loader(train, batch_size=6, workers=0))
    assert n_skipped == 1 and images.shape == (5, 3, 8, 8) and labels.tolist() == [0, 0, 1, 2, 2]


def test_collate_of_a_fully_skipped_batch_is_empty():
    images, labels, n_skipped = collate_skip_none([None, None])
    assert images.numel() == 0 and labels.numel() == 0 and labels.dtype == torch.long and n_skipped == 2


def test_loose_val_images_ask_for_valprep(tmp_path):
    root = tmp_path / "imagenet"
    (root / "train" / WNIDS[0]).mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "train" / WNIDS[0] / "a.JPEG")
    (root / "val").mkdir()
    Image.new("RGB", (8, 8)).save(root / "val" / "ILSVRC2012_val_00000001.JPEG")
    with pytest.raises(ValueError, match="valprep") as err:
        build_datasets(small_cfg(root=str(root)), MEAN, STD)
    assert "ILSVRC2012_val_00000001.JPEG" in str(err.value)


def test_missing_root_or_split_names_the_path_and_layout(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="layout") as err:
        build_datasets(small_cfg(root=str(missing)), MEAN, STD)
    assert str(missing) in str(err.value)
    root = write_imagenet(tmp_path / "imagenet")
    with pytest.raises(FileNotFoundError, match="layout") as err:
        build_datasets(small_cfg(root=str(root), val_split="validation"), MEAN, STD)
    assert str(root / "validation") in str(err.value)


def test_train_and_val_classes_must_match(tmp_path):
    root = write_imagenet(tmp_path)
    os.rename(root / "val" / WNIDS[2], root / "val" / "n99999999")
    with pytest.raises(ValueError, match="n99999999"):
        build_datasets(small_cfg(root=str(root)), MEAN, STD)


def test_num_classes_must_match_the_data(tmp_path):
    root = write_imagenet(tmp_path)
    with pytest.raises(ValueError, match="num_classes"):
        build_datasets(small_cfg(root=str(root), num_classes=1000), MEAN, STD)


def test_unknown_dataset_name():
    with pytest.raises(ValueError, match="fashion_mnist"):
        build_datasets(small_cfg(name="cifar"), MEAN, STD)


def write_idx(path: Path, array: np.ndarray) -> None:
    """idx format: 2 zero bytes, dtype code (0x08 = uint8), ndim, big-endian int32 dims, then the data."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def read_idx_gz(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = struct.unpack(f">{ndim}i", data[4: 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def test_fashion_mnist_from_gz_files_via_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BAG_OF_TRICKS_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "fmnist"
    root.mkdir()
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 5), ("t10k", 3)):
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    cfg = small_cfg(name="fashion_mnist", root=str(root))
    train, val, num_classes, names = build_datasets(cfg, MEAN, STD)
    assert (len(train), len(val), num_classes, names[0]) == (5, 3, 10, "T-shirt/top")
    image, label = train[3]
    assert image.shape == (3, 8, 8) and label == 3
    np.testing.assert_array_equal(train.data[1].numpy(), read_idx_gz(root / "train-images-idx3-ubyte.gz")[1])
    cached = Path(train.raw_folder) / "train-images-idx3-ubyte"
    assert cached.is_relative_to(tmp_path / "cache")
    stamp = (cached.stat().st_ino, cached.stat().st_ctime_ns)
    build_datasets(cfg, MEAN, STD)
    assert (cached.stat().st_ino, cached.stat().st_ctime_ns) == stamp  # decompressed once, then reused
    # A replaced source is copied again, even with an older modification time (tar, cp -p, a package install).
    old_time = (root / "train-labels-idx1-ubyte.gz").stat().st_mtime_ns - 10**9
    write_idx(root / "train-labels-idx1-ubyte.gz", np.full(5, 7))
    os.utime(root / "train-labels-idx1-ubyte.gz", ns=(old_time, old_time))
    assert build_datasets(cfg, MEAN, STD)[0].targets.tolist() == [7] * 5
    # The cache holds the torchvision layout, which is itself accepted as a root.
    assert len(build_datasets(small_cfg(name="fashion_mnist", root=train.root), MEAN, STD)[0]) == 5


def test_fashion_mnist_missing_files_say_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        build_datasets(small_cfg(name="fashion_mnist", root=str(tmp_path)), MEAN, STD)


@pytest.mark.skipif(not (FASHION_MNIST / "train-labels-idx1-ubyte.gz").is_file(),
                    reason="Debian package dataset-fashion-mnist not installed (apt-get install dataset-fashion-mnist)")
def test_fashion_mnist_debian_package(tmp_path, monkeypatch):
    monkeypatch.setenv("BAG_OF_TRICKS_CACHE", str(tmp_path))
    cfg = small_cfg(name="fashion_mnist", root=str(FASHION_MNIST), img_size=28, val_resize=28, val_crop=28)
    train, val, num_classes, names = build_datasets(cfg, MEAN, STD)
    assert (len(train), len(val), num_classes, len(names)) == (60000, 10000, 10, 10)
    for ds, prefix in ((train, "train"), (val, "t10k")):
        labels = read_idx_gz(FASHION_MNIST / f"{prefix}-labels-idx1-ubyte.gz")
        assert ds.targets[:100].tolist() == labels[:100].tolist()
    images = read_idx_gz(FASHION_MNIST / "t10k-images-idx3-ubyte.gz")
    image, label = val[0]
    # Val at 28 px is the raw image: grayscale replicated to 3 channels, then normalized.
    expected = (torch.from_numpy(images[0].copy()).float() / 255 - MEAN[0]) / STD[0]
    assert label == int(labels[0]) and image.shape == (3, 28, 28)
    torch.testing.assert_close(image, expected.expand(3, 28, 28), rtol=0, atol=1e-5)


def test_synthetic_is_deterministic_and_learnable():
    cfg = small_cfg(name="synthetic", synthetic_size=40, num_classes=4)
    train_a, val_a, num_classes, names = build_datasets(cfg, MEAN, STD)
    assert (len(train_a), len(val_a), num_classes, names) == (40, 10, 4, ["class_0", "class_1", "class_2", "class_3"])
    raw_a, raw_b = SyntheticImages(40, 4, 8), SyntheticImages(40, 4, 8)
    for i in (0, 7, 39):
        torch.testing.assert_close(raw_a[i][0], raw_b[i][0], rtol=0, atol=0)
        assert raw_a[i][1] == i % 4
    assert not torch.equal(raw_a[0][0], SyntheticImages(40, 4, 8, split=1)[0][0])
    # The class signal: per-class mean colours are far apart compared with the noise of the mean.
    means = torch.stack([raw_a[i][0].float().mean((1, 2)) for i in range(4)])
    assert torch.cdist(means, means).add(torch.eye(4) * 1e9).min() > 50
    images, labels, _ = next(iter(build_loader(train_a, batch_size=8)))
    assert images.shape == (8, 3, 8, 8) and labels.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert build_datasets(small_cfg(name="synthetic"), MEAN, STD)[2] == 10


def test_a_batch_left_with_one_image_by_skip_corrupt_is_a_clear_error(tmp_path):
    """Two training images, one unreadable, batch 2: skip_corrupt keeps one image, whose 16 px give ResNet a 1x1
    last feature map, where BatchNorm cannot train; the error says why and what to do (not BatchNorm's own)."""
    from classification.config import Config
    from classification.train import train
    from runtime.config import load_config
    from runtime.errors import DataError

    root = tmp_path / "imagenet"
    for split in ("train", "val"):
        for k in range(2):
            folder = root / split / WNIDS[k]
            folder.mkdir(parents=True)
            Image.new("RGB", (20, 14), (80 * k, 40, 200)).save(folder / f"{WNIDS[k]}_0.JPEG")
    corrupt(root / "train" / WNIDS[1] / f"{WNIDS[1]}_0.JPEG")
    cfg = load_config(None, Config, ["model.name=resnet18d", "data.name=imagenet", f"data.root={root}",
                                     "data.skip_corrupt=true", "data.img_size=16", "data.val_resize=16",
                                     "data.val_crop=16", "data.workers=0", "train.batch_size=2", "train.epochs=1",
                                     f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(DataError, match="kept 1 of its 2 images: data.skip_corrupt skipped 1 unreadable") as err:
        train(cfg)
    assert "raise train.batch_size" in str(err.value)


def test_jpeg_samples_decoded_by_torchvision_equal_the_pil_path(tmp_path, monkeypatch):
    """.JPEG files come from torchvision.io (runtime.images.decode_jpeg_file), others from PIL: the same training
    and validation samples under the same seeds either way."""
    import classification.data as data

    root = tmp_path / "imagenet"
    for k, wnid in enumerate(WNIDS[:2]):
        for split in ("train", "val"):
            (root / split / wnid).mkdir(parents=True)
            rng = np.random.default_rng(k)
            smooth = Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)).resize((57, 41), Image.BILINEAR)
            smooth.save(root / split / wnid / f"{wnid}_{k}.JPEG", quality=85)
    cfg = DataConfig(name="imagenet", root=str(root), img_size=24, val_resize=28, val_crop=24, lighting=0.1)
    fast = build_datasets(cfg, MEAN, STD)[:2]
    assert isinstance(data.read_rgb(str(next(root.rglob("*.JPEG")))), torch.Tensor)
    monkeypatch.setattr(data, "decode_jpeg_file", lambda path, exif_orientation=True: None)
    slow = build_datasets(cfg, MEAN, STD)[:2]
    assert isinstance(data.read_rgb(str(next(root.rglob("*.JPEG")))), Image.Image)
    for a, b in zip(fast, slow):
        for i in range(len(a)):
            torch.manual_seed(i)
            x, y = a[i]
            torch.manual_seed(i)
            x_ref, y_ref = b[i]
            assert y == y_ref and torch.equal(x, x_ref), i
