"""Users' own data: image files in the formats they have (VOC and ADE20K layouts), class names that cannot be
file names, background entries in class lists, classes without ground truth, the checks of both splits
before training (in worker processes), and the final checkpoint on disk before the final evaluation."""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detection.voc import VOCDetection, VOCFormatError, build_voc, resolve_classes
from detection.voc_eval import class_file_name, read_voc_results, score_voc_results, write_voc_results
from runtime.errors import DataError
from runtime.images import IMAGE_EXTENSIONS, check_files, index_images
from segmentation.ade20k import ADE20K, ADE20KFormatError
from tricks.cli import main

from test_detection_train import make_devkit
from test_seg_train import write_tiny_ade

# PIL's writer for each extension (tiff via libtiff or PIL's own; bmp is uncompressed)
FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF"}


def _reformat(folder: Path, extensions: list[str], mixed_case: bool = True) -> dict[str, np.ndarray]:
    """Re-save every .jpg of ``folder`` under the given extensions in turn (upper-case every other one if
    ``mixed_case``); returns the pixels each id must decode to."""
    pixels = {}
    for k, path in enumerate(sorted(folder.glob("*.jpg"))):
        image = np.array(Image.open(path).convert("RGB"))
        ext = extensions[k % len(extensions)]
        ext = ext.upper() if k % 2 and mixed_case else ext
        path.unlink()
        Image.fromarray(image).save(folder / f"{path.stem}{ext}", format=FORMATS[ext.lower()])
        pixels[path.stem] = np.array(Image.open(folder / f"{path.stem}{ext}").convert("RGB"))
    return pixels


@pytest.fixture(scope="module")
def png_voc(tmp_path_factory) -> Path:
    devkit = make_devkit(tmp_path_factory.mktemp("voc") / "VOCdevkit", n=4)
    _reformat(devkit / "VOC2007" / "JPEGImages", [".png"])
    return devkit


@pytest.fixture(scope="module")
def png_ade(tmp_path_factory) -> Path:
    root = write_tiny_ade(tmp_path_factory.mktemp("ade") / "ADEChallengeData2016", n_train=4, n_val=2)
    for split in ("training", "validation"):
        _reformat(root / "images" / split, [".png"], mixed_case=False)  # mmseg matches one suffix exactly
    return root


def test_every_extension_reads_in_both_layouts(tmp_path):
    devkit = make_devkit(tmp_path / "VOCdevkit", n=6)
    pixels = _reformat(devkit / "VOC2007" / "JPEGImages", list(IMAGE_EXTENSIONS))
    dataset = VOCDetection(devkit, "2007", "trainval", check_images=True)
    assert {p.suffix.lower() for p in dataset.image_paths()} == set(IMAGE_EXTENSIONS)
    for i in range(len(dataset)):
        image, _ = dataset[i]
        assert np.array_equal(image.permute(1, 2, 0).numpy(), pixels[dataset.image_id(i)])
    root = write_tiny_ade(tmp_path / "ADEChallengeData2016", n_train=6, n_val=1)
    pixels = _reformat(root / "images" / "training", list(IMAGE_EXTENSIONS))
    ade = ADE20K(root, "training", num_classes=4, check=True)
    for i in range(len(ade)):
        image, _ = ade[i]
        assert np.array_equal(image.permute(1, 2, 0).numpy(), pixels[ade.ids[i]])
    with pytest.raises(ADE20KFormatError, match=r"images/training: images with extensions"):
        ade.image_suffix()  # the mmseg engine's datasets take one extension


def test_two_images_of_one_id_name_both(tmp_path):
    (tmp_path / "a.JPG").write_bytes(b"")
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "b.txt").write_bytes(b"")
    with pytest.raises(DataError, match=r"two images for id 'a' \(a.JPG and a.png\)"):
        index_images(tmp_path)
    (tmp_path / "a.JPG").unlink()
    assert index_images(tmp_path) == {"a": tmp_path / "a.png"}


def test_checks_run_in_worker_processes_and_report_the_first_failure(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(good)
    bad = [tmp_path / f"bad{i}.png" for i in range(2)]
    for path in bad:
        path.write_bytes(good.read_bytes()[:40])
    from detection.voc import _check_image

    items = [(str(good), 4, 4)] * 300 + [(str(bad[1]), 4, 4)] + [(str(good), 4, 4)] * 50 + [(str(bad[0]), 4, 4)]
    for workers in (0, 2):  # the first failing item in item order, whichever process meets it
        with pytest.raises(DataError, match=r"bad1.png: cannot read the image"):
            check_files(_check_image, items, "test", workers=workers, chunksize=8)
    check_files(_check_image, [(str(good), 4, 4)] * 200, "test", workers=2, chunksize=8)
    with pytest.raises(VOCFormatError, match=r"good.png: image is 4x4 but its annotation says 5x4"):
        check_files(_check_image, [(str(good), 5, 4)], "test", workers=0)


def test_png_voc_trains_and_evaluates_in_the_torch_engine(png_voc, tmp_path, capsys):
    from test_user_errors import DET

    out = tmp_path / "run"
    args = [*DET, f"data.root={png_voc}", f"output_dir={out}", "train.max_iter=1", "optim.warmup_iters=0",
            "optim.milestones=[]"]
    assert main(["train", *args]) == 0
    assert main(["eval", *args, str(out / "model_final.pth"), "--write-results", str(tmp_path / "results")]) == 0
    assert "VOC07 mAP" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["comp4_det_test_cat.txt",
                                                                        "comp4_det_test_dog.txt"]


def test_png_voc_in_the_detectron2_engine(png_voc):
    pytest.importorskip("detectron2")
    from detection import d2_engine
    from test_d2_engine import tiny_config

    cfg = tiny_config(png_voc, Path("/nonexistent"), "data.classes=[dog, cat]")
    dicts = d2_engine.voc_dataset_dicts(cfg, "2007-test", keep_difficult=True)
    assert [Path(d["file_name"]).suffix for d in dicts] == [".png", ".PNG", ".png", ".PNG"]
    from detectron2.data.detection_utils import read_image

    assert read_image(dicts[1]["file_name"], format="RGB").shape == (64, 64, 3)


def test_png_ade20k_trains_and_evaluates_in_the_torch_engine(png_ade, tmp_path, capsys):
    from test_user_errors import SEG

    out = tmp_path / "run"
    args = [*SEG, f"data.root={png_ade}", f"output_dir={out}"]
    assert main(["train", *args]) == 0
    assert main(["eval", *args, str(out / "model_final.pth")]) == 0
    assert "mIoU" in capsys.readouterr().out


def test_png_ade20k_in_the_mmseg_engine(png_ade, tmp_path):
    pytest.importorskip("mmseg")
    from segmentation import mmseg_engine
    from segmentation.config import SegmentationConfig
    from runtime.config import load_config
    from test_user_errors import SEG

    cfg = load_config(None, SegmentationConfig, [*SEG[1:], "engine=mmseg", f"data.root={png_ade}",
                                                 f"output_dir={tmp_path}"])
    dataset = mmseg_engine._dataset(cfg, "training", [])
    assert dataset["img_suffix"] == ".png"
    # mmseg's own dataset lists the same images through that suffix
    from mmseg.registry import DATASETS

    mmseg_engine.register_modules()
    built = DATASETS.build({**dataset, "lazy_init": False})
    assert sorted(Path(built.get_data_info(i)["img_path"]).name for i in range(len(built))) == \
        sorted(p.name for p in (png_ade / "images" / "training").iterdir())


# ----------------------------------------------------------------------------------------------- class names
def test_class_names_that_are_not_file_names_round_trip(tmp_path):
    classes = ("tv/monitor", "traffic light", "dog")
    assert [class_file_name(c) for c in classes] == ["tv_monitor", "traffic_light", "dog"]
    detections = {"a": {"boxes": np.array([[1.0, 2.0, 9.0, 9.0], [0.0, 0.0, 4.0, 4.0]]),
                        "labels": np.array([0, 1]), "scores": np.array([0.9, 0.4])}}
    files = write_voc_results(tmp_path / "r", detections, classes)
    assert [f.name for f in files] == ["comp4_det_test_tv_monitor.txt", "comp4_det_test_traffic_light.txt",
                                       "comp4_det_test_dog.txt"]
    back = read_voc_results(tmp_path / "r", classes)
    assert back["a"].labels.tolist() == [0, 1] and np.allclose(back["a"].boxes, detections["a"]["boxes"])
    with pytest.raises(DataError, match=r"classes 'tv/monitor' and 'tv monitor' both map to .*tv_monitor.txt"):
        write_voc_results(tmp_path / "collide", detections, ("tv/monitor", "tv monitor", "dog"))
    assert not (tmp_path / "collide").exists()  # nothing written


def test_voc_eval_with_a_labelme_classes_file(tmp_path, capsys, caplog):
    """labelme's class_names.txt: `_background_` first, VOC's "tv/monitor"; a class without test objects."""
    from test_voc import write_image, write_set

    devkit = tmp_path / "VOCdevkit"
    write_image(devkit, "2007", "0001", [("tv/monitor", 2, 2, 30, 30, 0), ("dog", 35, 5, 60, 40, 0)])
    write_image(devkit, "2007", "0002", [("dog", 5, 5, 40, 40, 0)])
    write_set(devkit, "2007", "test", ["0001", "0002"])
    names = tmp_path / "class_names.txt"
    names.write_text("_background_\ntv/monitor\ndog\nbird\n")
    assert resolve_classes(names) == ("tv/monitor", "dog", "bird")
    assert "'_background_', is the background" in caplog.text
    dataset = build_voc(devkit, "2007-test", classes=names)
    truth = {dataset.image_id(i): dataset.annotation(i) for i in range(len(dataset))}
    write_voc_results(tmp_path / "results", {k: {"boxes": a.boxes, "labels": a.labels, "scores": np.ones(len(a.labels))}
                                             for k, a in truth.items()}, dataset.classes)
    assert main(["voc-eval", "--devkit", str(devkit), "--results", str(tmp_path / "results"),
                 "--classes-file", str(names)]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split()[1:] for line in lines[3:6]}
    assert rows == {"tv/monitor": ["1", "100.00"], "dog": ["2", "100.00"], "bird": ["0", "no", "ground", "truth"]}
    assert lines[-5] == "mAP (VOC07 11-point): 100.00"
    assert lines[-1] == "mean over 2 of 3 classes: left out, no ground-truth object in the test split: bird"
    result = score_voc_results(devkit, 2007, "test", tmp_path / "results", classes=names)
    assert math.isnan(result["ap_per_class"]["bird"]) and result["map_voc07"] == 1.0


# ------------------------------------------------------------------------- fail before training, never after
def _crash(*args, **kwargs):
    raise RuntimeError("the evaluation failed")


def test_final_checkpoint_is_on_disk_before_the_final_evaluation(tmp_path, monkeypatch):
    import classification.train as cls_train
    import detection.train as det_train
    import segmentation.train as seg_train
    from classification.config import Config
    from detection.config import DetectionConfig
    from runtime.config import load_config
    from segmentation.config import SegmentationConfig
    from test_user_errors import CLS, DET, SEG

    devkit = make_devkit(tmp_path / "VOCdevkit", n=4)
    ade = write_tiny_ade(tmp_path / "ADEChallengeData2016", n_train=2, n_val=1)
    runs = [(cls_train, "evaluate", "train", Config, CLS + ["train.epochs=1", "train.eval_every=5"], "epoch", 1,
             "top1"),
            (det_train, "evaluate_detector", "train_detector", DetectionConfig,
             DET[1:] + [f"data.root={devkit}", "train.eval_every=0"], "iteration", 2, "mAP"),
            (seg_train, "evaluate", "train", SegmentationConfig,
             SEG[1:] + [f"data.root={ade}", "train.eval_every=0"], "iteration", 2, "mIoU")]
    for module, evaluate, train, schema, overrides, key, final, metric in runs:
        out = tmp_path / module.__name__
        cfg = load_config(None, schema, [*overrides, f"output_dir={out}", "train.resume=auto"])
        with monkeypatch.context() as patch:
            patch.setattr(module, evaluate, _crash)
            with pytest.raises(RuntimeError, match="the evaluation failed"):
                getattr(module, train)(cfg)
        state = torch.load(out / "last.pth", map_location="cpu", weights_only=True)
        assert state[key] == final, module.__name__  # the trained model survived its failed evaluation
        # resuming the finished run evaluates it (no stale result from an earlier evaluation)
        assert metric in getattr(module, train)(cfg), module.__name__


def test_a_broken_validation_split_stops_the_run_before_the_model_is_built(tmp_path, monkeypatch):
    import detection.train as det_train
    import segmentation.train as seg_train
    from detection.config import DetectionConfig
    from runtime.config import load_config
    from segmentation.config import SegmentationConfig
    from test_user_errors import DET, SEG

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the data was checked")

    devkit = make_devkit(tmp_path / "VOCdevkit", n=4)
    (devkit / "VOC2007" / "JPEGImages" / "000103.jpg").write_bytes(b"not an image")
    monkeypatch.setattr(det_train, "build_model", no_model)
    cfg = load_config(None, DetectionConfig, [*DET[1:], f"data.root={devkit}", f"output_dir={tmp_path / 'd'}"])
    with pytest.raises(DataError, match=r"000103.jpg: cannot read the image"):
        det_train.train_detector(cfg)
    ade = write_tiny_ade(tmp_path / "ADEChallengeData2016", n_train=2, n_val=2)
    shutil.copy(ade / "annotations" / "training" / "ADE_train_00000001.png",
                ade / "annotations" / "validation" / "ADE_val_00000002.png")
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(ade / "annotations" / "validation" / "ADE_val_00000002.png")
    monkeypatch.setattr(seg_train, "build_model", no_model)
    cfg = load_config(None, SegmentationConfig, [*SEG[1:], f"data.root={ade}", f"output_dir={tmp_path / 's'}"])
    with pytest.raises(ADE20KFormatError, match=r"ADE_val_00000002.png: annotation is 5x5"):
        seg_train.train(cfg)
