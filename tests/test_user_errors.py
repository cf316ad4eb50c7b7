"""The catalogue of user mistakes: each one, run through ``tricks`` in-process, exits with status 2 and one
line on stderr naming the culprit (file, line, key) without a traceback, and writes nothing (no checkpoint,
no partial results, inputs unchanged). ``--debug`` / ``TRICKS_DEBUG=1`` show the traceback; a programming
error keeps its own."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from backbones import create_backbone, save_weights
from tricks.cli import main

from test_detection_train import make_devkit
from test_seg_train import write_tiny_ade

CLS = ["model.name=resnet18d", "data.name=synthetic", "data.synthetic_size=32", "data.img_size=16",
       "data.val_resize=16", "data.val_crop=16", "data.workers=0", "data.num_classes=4", "train.batch_size=8",
       "train.epochs=1", "model.kwargs={width_mult: 0.25}"]
DET = ["task=detection", "model.backbone=resnet18d", "model.norm=batchnorm", "model.frozen_stages=-1",
       "model.min_size_train=[64]", "model.min_size_test=64", "model.max_size=64", "data.workers=0",
       "train.batch_size=2", "train.max_iter=2", "optim.warmup_iters=1", "optim.milestones=[1]",
       "data.train_splits=2007-trainval", "data.classes=[dog, cat]", "model.kwargs={width_mult: 0.25}"]
SEG = ["task=segmentation", "model.backbone=resnet18d", "model.channels=8", "model.aux_channels=8",
       "model.kwargs={width_mult: 0.25}", "data.num_classes=4", "data.class_names=[a, b, c, d]",
       "data.scale=[64, 48]", "data.crop_size=[32, 40]", "data.workers=0", "train.max_iter=2",
       "train.batch_size=2", "optim.warmup_iters=1"]


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """One tiny dataset in each layout, and checkpoints to load (each test copies what it breaks)."""
    base = tmp_path_factory.mktemp("catalogue")
    voc = make_devkit(base / "voc" / "VOCdevkit", n=4)
    ade = write_tiny_ade(base / "ade" / "ADEChallengeData2016", n_train=2, n_val=2)
    imagenet = base / "imagenet"
    for split in ("train", "val"):
        for wnid in ("n01", "n02"):
            (imagenet / split / wnid).mkdir(parents=True)
            Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(imagenet / split / wnid / "a.JPEG")
    weights = save_weights(create_backbone("resnet18d", num_classes=4, width_mult=0.25), base / "r18.safetensors")
    # another architecture with the same class count and another feature width (the fc's input)
    other = save_weights(create_backbone("resnet50d", num_classes=4, width_mult=0.25), base / "r50.safetensors")
    return {"base": base, "voc": voc, "ade": ade, "imagenet": imagenet, "weights": weights, "other": other}


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def one_error_line(capsys, argv: list[str], *culprits: str, expect_code: int = 2) -> str:
    """Run ``tricks argv``; the exit status is 2, stderr is exactly one line naming every culprit."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own exit
        code = e.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == expect_code, err
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for culprit in culprits:
        assert culprit in lines[0], (culprit, lines[0])
    return lines[0]


# ------------------------------------------------------------------------------------------ classification
def test_classification_mistakes(data, tmp_path, capsys):
    out = tmp_path / "run"
    # config: unknown key, non-positive counts, warm-up longer than the run, a missing file, invalid YAML
    one_error_line(capsys, ["train", *CLS, "optim.lrr=0.1", f"output_dir={out}"], "optim.lrr", "optim.lr")
    one_error_line(capsys, ["train", *CLS, "train.batch_size=0", f"output_dir={out}"], "train.batch_size=0")
    one_error_line(capsys, ["train", *CLS, "train.epochs=-1", f"output_dir={out}"], "train.epochs=-1")
    one_error_line(capsys, ["train", *CLS, "optim.warmup_epochs=5", f"output_dir={out}"], "optim.warmup_epochs=5",
                   "train.epochs=1")
    one_error_line(capsys, ["train", tmp_path / "nope.yaml"], "nope.yaml")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model:\n  name: [resnet18d\n")
    one_error_line(capsys, ["train", bad_yaml], "bad.yaml", "line")
    # data: missing root, empty validation class folders, class count
    imagenet = ["data.name=imagenet", "data.img_size=16", "data.val_resize=16", "data.val_crop=16", "data.workers=0",
                "model.name=resnet18d", "train.batch_size=1", "train.epochs=1", f"output_dir={out}"]
    one_error_line(capsys, ["train", *imagenet, f"data.root={tmp_path / 'nowhere'}"], "nowhere", "data.root")
    empty = _copy(data["imagenet"], tmp_path / "empty_val")
    for image in (empty / "val").rglob("*.JPEG"):
        image.unlink()
    one_error_line(capsys, ["train", *imagenet, f"data.root={empty}"], str(empty / "val"), "data.val_split")
    one_error_line(capsys, ["train", *imagenet, f"data.root={data['imagenet']}", "data.num_classes=3"],
                   "data.num_classes=3", "2 classes")
    # pipelines: the batched colour jitter has no hue; the tensor pipeline needs a dataset held in memory
    for pipeline in ("hybrid", "tensor"):
        one_error_line(capsys, ["train", *CLS, f"data.pipeline={pipeline}", "data.hue=0.1", f"output_dir={out}"],
                       "data.hue", "data.pipeline=samples")
    one_error_line(capsys, ["train", *imagenet, f"data.root={data['imagenet']}", "data.pipeline=tensor"],
                   "data.pipeline=tensor", "imagenet")
    # augmentation ranges across keys (each key alone is within its bounds)
    one_error_line(capsys, ["train", *CLS, "data.min_area=0.9", "data.max_area=0.5", f"output_dir={out}"],
                   "data.min_area=0.9", "data.max_area=0.5")
    one_error_line(capsys, ["train", *CLS, "data.translate=64", f"output_dir={out}"], "data.translate=64",
                   "data.img_size")
    one_error_line(capsys, ["train", *CLS, "data.random_erase=0.5", "data.erase_area=[0.5,0.1]", f"output_dir={out}"],
                   "data.erase_area")
    assert not out.exists() or not any(out.glob("*.pth"))
    # checkpoints: another architecture (same class count), truncated .pth / .safetensors, missing file
    line = one_error_line(capsys, ["eval", *CLS, data["other"], f"output_dir={out}"], "r50.safetensors",
                          "do not fit", "resnet50d")
    assert "classifier" not in line  # not reported as a class-count mismatch
    for name, source in (("cut.pth", None), ("cut.safetensors", data["weights"])):
        path = tmp_path / name
        if source is None:
            torch.save({"model": create_backbone("resnet18d", num_classes=4, width_mult=0.25).state_dict()}, path)
            source = path
        blob = Path(source).read_bytes()
        path.write_bytes(blob[: len(blob) // 2])
        line = one_error_line(capsys, ["eval", *CLS, path, f"output_dir={out}"], name, "damaged or incomplete")
        assert "allow_pickle" not in line
    one_error_line(capsys, ["eval", *CLS, tmp_path / "gone.pth", f"output_dir={out}"], "gone.pth")
    run_dir = tmp_path / "a_run"
    run_dir.mkdir()
    (run_dir / "model.safetensors").write_bytes(Path(data["weights"]).read_bytes())
    one_error_line(capsys, ["eval", *CLS, run_dir, f"output_dir={out}"], "a_run is a folder", "model.safetensors")
    one_error_line(capsys, ["train", run_dir], "a_run is a folder", "config file")
    # resume: a missing file, a checkpoint of another class count
    one_error_line(capsys, ["train", *CLS, f"train.resume={tmp_path / 'gone.pth'}", f"output_dir={out}"],
                   "train.resume", "gone.pth")
    other = tmp_path / "other_classes.pth"
    torch.save({"model": create_backbone("resnet18d", num_classes=7, width_mult=0.25).state_dict(), "optimizer": {}},
               other)
    before = other.read_bytes()
    one_error_line(capsys, ["train", *CLS, f"train.resume={other}", f"output_dir={out}"], "other_classes.pth",
                   "does not fit", "fc.weight file (7, ")
    assert not (out / "last.pth").exists() and other.read_bytes() == before


# ----------------------------------------------------------------------------------------------- detection
def _voc(data, tmp_path) -> Path:
    return _copy(data["voc"], tmp_path / "VOCdevkit")


def test_detection_data_mistakes(data, tmp_path, capsys):
    out = tmp_path / "run"

    def train(devkit: Path, *extra: str) -> list[str]:
        return ["train", *DET, f"data.root={devkit}", f"output_dir={out}", *extra]

    base = _voc(data, tmp_path)
    voc07 = base / "VOC2007"
    # an unreadable XML in the test split: found before training
    devkit = _copy(base, tmp_path / "xml")
    (devkit / "VOC2007" / "Annotations" / "000101.xml").write_text("<annotation><size>")
    one_error_line(capsys, train(devkit), "000101.xml", "not valid XML")
    # a class the config does not list
    devkit = _copy(base, tmp_path / "cls")
    xml = devkit / "VOC2007" / "Annotations" / "000001.xml"
    xml.write_text(xml.read_text().replace("<name>cat</name>", "<name>tiger</name>"))
    one_error_line(capsys, train(devkit), "000001.xml", "'tiger'", "data.classes")
    # an ImageSets line with a space in the id
    devkit = _copy(base, tmp_path / "space")
    test_txt = devkit / "VOC2007" / "ImageSets" / "Main" / "test.txt"
    test_txt.write_text(test_txt.read_text().replace("000102", "000102 copy"))
    one_error_line(capsys, train(devkit), "test.txt, line 3", "'000102 copy'")
    # a truncated test image, an image of another size than its XML, a missing image, two images of one id
    devkit = _copy(base, tmp_path / "cut")
    jpeg = devkit / "VOC2007" / "JPEGImages" / "000103.jpg"
    jpeg.write_bytes(jpeg.read_bytes()[:300])
    one_error_line(capsys, train(devkit), "000103.jpg", "cannot read the image")
    devkit = _copy(base, tmp_path / "size")
    Image.fromarray(np.zeros((50, 64, 3), np.uint8)).save(devkit / "VOC2007" / "JPEGImages" / "000100.jpg")
    one_error_line(capsys, train(devkit), "000100.jpg", "64x50", "64x64")
    devkit = _copy(base, tmp_path / "missing")
    (devkit / "VOC2007" / "JPEGImages" / "000102.jpg").unlink()
    one_error_line(capsys, train(devkit), "JPEGImages", "'000102'")
    devkit = _copy(base, tmp_path / "twice")
    Image.open(devkit / "VOC2007" / "JPEGImages" / "000002.jpg").save(devkit / "VOC2007" / "JPEGImages" / "000002.png")
    one_error_line(capsys, train(devkit), "000002.jpg", "000002.png")
    # the devkit folder is wrong; the classes file repeats a class or does not exist
    one_error_line(capsys, train(tmp_path / "nowhere"), "nowhere", "VOCdevkit")
    classes = tmp_path / "classes.txt"
    classes.write_text("dog\ncat\ndog\n")
    one_error_line(capsys, train(base, f"data.classes={classes}"), "classes.txt", "line 3", "'dog'")
    one_error_line(capsys, train(base, f"data.classes={tmp_path / 'none.txt'}"), "data.classes", "none.txt")
    # counts and warm-up named by their keys (detection's warm-up key is optim.warmup_iters)
    one_error_line(capsys, train(base, "train.max_iter=0"), "train.max_iter=0")
    one_error_line(capsys, train(base, "optim.warmup_iters=5"), "optim.warmup_iters=5", "train.max_iter=2")
    one_error_line(capsys, train(base, "train.batch_size=-2"), "train.batch_size=-2")
    assert not out.exists() or not any(out.rglob("*.pth"))
    assert _digest(voc07) == _digest(data["voc"] / "VOC2007")  # the inputs are untouched


def test_detection_checkpoint_and_output_mistakes(data, tmp_path, capsys):
    from detection.config import DetectionConfig
    from detection.train import build_model
    from runtime.config import load_config

    devkit = _voc(data, tmp_path)
    out = tmp_path / "run"
    cfg = load_config(None, DetectionConfig, [*DET[1:], "data.classes=[dog, cat, bird]", f"data.root={devkit}"])
    three = tmp_path / "three_classes.pth"
    torch.save(build_model(cfg, 3).state_dict(), three)
    evaluate = ["eval", *DET, f"data.root={devkit}", f"output_dir={out}"]
    one_error_line(capsys, [*evaluate, three], "three_classes.pth", "does not fit", "2 classes",
                   "shape mismatches", "roi_heads.box_predictor.bbox_pred.weight file (16, ")
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    # options and overrides in any order: key=value after --write-results DIR is an override
    one_error_line(capsys, [*evaluate, three, "--write-results", blocked / "sub", "train.visualize=0"],
                   "--write-results", "a_file")
    one_error_line(capsys, ["eval", *DET, f"data.root={devkit}", f"output_dir={blocked}", three], "output_dir",
                   "a_file")
    assert not out.exists() or not any(out.rglob("*"))


def test_voc_eval_results_folder_mistakes(data, tmp_path, capsys):
    voc_eval = ["voc-eval", "--devkit", data["voc"], "--classes", "dog,cat"]
    one_error_line(capsys, [*voc_eval, "--results", tmp_path / "none"], "none", "not found")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "comp4_det_val_dog.txt").write_text("")
    one_error_line(capsys, [*voc_eval, "--results", tmp_path / "empty"], "empty", "comp4_det_test_dog.txt",
                   "comp4_det_val_dog.txt")


# -------------------------------------------------------------------------------------------- segmentation
def test_segmentation_mistakes(data, tmp_path, capsys):
    out = tmp_path / "run"

    def train(root: Path, *extra: str) -> list[str]:
        return ["train", *SEG, f"data.root={root}", f"output_dir={out}", *extra]

    # a validation mask of another size, one with a value that is no class: found before training
    root = _copy(data["ade"], tmp_path / "size" / "ADEChallengeData2016")
    mask = root / "annotations" / "validation" / "ADE_val_00000002.png"
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(mask)
    one_error_line(capsys, train(root), "ADE_val_00000002.png", "10x10")
    root = _copy(data["ade"], tmp_path / "value" / "ADEChallengeData2016")
    mask = root / "annotations" / "validation" / "ADE_val_00000001.png"
    Image.fromarray(np.full((48, 64), 9, np.uint8)).save(mask)
    one_error_line(capsys, train(root), "ADE_val_00000001.png", "value 9")
    # class names against num_classes; an empty split; a missing annotations folder
    one_error_line(capsys, train(data["ade"], "data.class_names=[a, b]"), "data.class_names", "data.num_classes")
    root = _copy(data["ade"], tmp_path / "empty" / "ADEChallengeData2016")
    for image in (root / "images" / "validation").iterdir():
        image.unlink()
    one_error_line(capsys, train(root), "images/validation", "no images")
    root = _copy(data["ade"], tmp_path / "noann" / "ADEChallengeData2016")
    import shutil

    shutil.rmtree(root / "annotations" / "training")
    one_error_line(capsys, train(root), "annotations/training", "not found")
    assert not out.exists() or not any(out.rglob("*.pth"))
    # a checkpoint of another class count
    from segmentation.config import SegmentationConfig
    from segmentation.train import build_model
    from runtime.config import load_config

    cfg = load_config(None, SegmentationConfig, [*SEG[1:], "data.num_classes=6", "data.class_names=null",
                                                 f"data.root={data['ade']}"])
    six = tmp_path / "six.pth"
    torch.save(build_model(cfg, pretrained=False).state_dict(), six)
    one_error_line(capsys, ["eval", *SEG, f"data.root={data['ade']}", f"output_dir={out}", six], "six.pth",
                   "does not fit", "4 classes", "classifier")


@pytest.mark.parametrize("engine", ["classification", "segmentation/torch", "segmentation/mmseg", "detection/torch",
                                    "detection/detectron2"])
def test_periods_are_checked_in_every_engine(data, tmp_path, capsys, engine):
    """train.log_every must be >= 1 and train.eval_every / checkpoint_every >= 0 (0: none during the run): one
    line naming the key in each engine (the config's bounds), where a 0 or a negative value divided by zero or ran
    on; a run with both periods 0 evaluates and checkpoints at its end."""
    task, _, name = engine.partition("/")
    base = {"classification": CLS, "segmentation": [*SEG, f"data.root={data['ade']}"],
            "detection": [*DET, f"data.root={data['voc']}"]}[task]
    argv = ["train", *base, *([f"engine={name}"] if name else []), f"output_dir={tmp_path / 'run'}"]
    if name in ("mmseg", "detectron2"):
        pytest.importorskip("mmseg" if name == "mmseg" else "detectron2")
    one_error_line(capsys, [*argv, "train.log_every=0"], "train.log_every=0", ">= 1")
    one_error_line(capsys, [*argv, "train.eval_every=-2"], "train.eval_every=-2", ">= 0")
    one_error_line(capsys, [*argv, "train.checkpoint_every=-1"], "train.checkpoint_every=-1", ">= 0")
    assert not any((tmp_path / "run").rglob("*.pth"))
    # 0: nothing periodic, the end's evaluation and checkpoint only
    assert main([str(a) for a in [*argv, "train.eval_every=0", "train.checkpoint_every=0"]]) == 0
    assert any((tmp_path / "run").rglob("*.pth"))


@pytest.mark.parametrize("task", ["classification", "segmentation", "detection"])
def test_resume_needs_a_training_state_of_the_same_batch(data, tmp_path, capsys, task):
    """train.resume from weights only (model.safetensors, a bare state dict such as model_final.pth) was a
    KeyError 'model' traceback; resuming with another train.batch_size retrained finished steps under the old
    schedule (the position is counted in the saved run's steps). Both are one line saying what to do."""
    base = {"classification": CLS, "segmentation": [*SEG, f"data.root={data['ade']}"],
            "detection": [*DET, f"data.root={data['voc']}"]}[task]
    run = tmp_path / "run"
    assert main([str(a) for a in ["train", *base, f"output_dir={run}"]]) == 0
    capsys.readouterr()
    last = run / "last.pth"
    before = last.read_bytes()
    bare = tmp_path / "model_final.pth"
    torch.save(torch.load(last, weights_only=True)["model"], bare)
    sources = [bare] + ([run / "model.safetensors"] if task == "classification" else [])
    for source in sources:
        one_error_line(capsys, ["train", *base, f"train.resume={source}", f"output_dir={tmp_path / 'new'}"],
                       source.name, "weights only", "last.pth", "model.weights=")
    batch, saved = (4, 8) if task == "classification" else (1, 2)
    one_error_line(capsys, ["train", *base, f"train.batch_size={batch}", "train.resume=auto", f"output_dir={run}"],
                   f"train.batch_size={batch} but", f"train.batch_size={saved}")
    assert last.read_bytes() == before


@pytest.mark.parametrize("engine", ["classification", "segmentation/torch", "segmentation/mmseg", "detection/torch",
                                    "detection/detectron2"])
def test_unknown_backbones_and_builder_arguments_name_their_key_in_every_engine(data, tmp_path, capsys, engine):
    """A misspelt backbone, an argument its builder does not take, and the YAML pitfall of a flow mapping without
    a space after the colon (the key becomes 'width_mult:0.5'): one line naming the config key, in every engine
    (each built a throwaway copy of the backbone for its default mean/std first, which raised a KeyError or
    BackboneArgumentError traceback). data.mean/std given too: the copy is still built, so still checked."""
    task, _, name = engine.partition("/")
    base = {"classification": CLS, "segmentation": [*SEG, f"data.root={data['ade']}"],
            "detection": [*DET, f"data.root={data['voc']}"]}[task]
    if name in ("mmseg", "detectron2"):
        pytest.importorskip("mmseg" if name == "mmseg" else "detectron2")
    argv = ["train", *base, *([f"engine={name}"] if name else []), f"output_dir={tmp_path / 'run'}"]
    key = "model.name" if task == "classification" else "model.backbone"
    line = one_error_line(capsys, [*argv, f"{key}=resnet19"], key, "unknown backbone 'resnet19'", "resnet18")
    assert "Did you mean" in line
    one_error_line(capsys, [*argv, f"{key}=resnet19", "data.mean=[0.5, 0.5, 0.5]", "data.std=[0.2, 0.2, 0.2]"],
                   key, "resnet19")
    one_error_line(capsys, [*argv, "model.kwargs={bogus: 1}"], "model.kwargs", "bogus")
    one_error_line(capsys, [*argv, "model.kwargs={width_mult:0.5}"], "model.kwargs", "width_mult:0.5")
    assert not any((tmp_path / "run").rglob("*.pth"))


def test_distillation_keys_without_a_teacher(data, tmp_path, capsys):
    """distill.teacher_weights alone trained without distillation; a misspelt teacher or teacher argument was a
    traceback."""
    out = f"output_dir={tmp_path / 'run'}"
    one_error_line(capsys, ["train", *CLS, f"distill.teacher_weights={data['other']}", out],
                   "distill.teacher_weights", "distill.teacher is not")
    one_error_line(capsys, ["train", *CLS, "distill.teacher=resnet5", f"distill.teacher_weights={data['other']}", out],
                   "distill.teacher", "unknown backbone 'resnet5'")
    one_error_line(capsys, ["train", *CLS, "distill.teacher=resnet50d", f"distill.teacher_weights={data['other']}",
                            "distill.teacher_kwargs={bogus: 1}", out], "distill.teacher_kwargs", "bogus")
    seven = save_weights(create_backbone("resnet50d", num_classes=7, width_mult=0.25), tmp_path / "seven.safetensors")
    one_error_line(capsys, ["train", *CLS, "distill.teacher=resnet50d", f"distill.teacher_weights={seven}",
                            "distill.teacher_kwargs={width_mult: 0.25}", out], "distill.teacher_weights",
                   "seven.safetensors", "7-class", "data.num_classes")
    assert not any((tmp_path / "run").rglob("*.pth"))


@pytest.mark.parametrize("engine", ["torch", "detectron2"])
def test_detection_eval_refuses_another_class_order(data, tmp_path, capsys, engine):
    """A detector evaluated under data.classes in another order scored every box as the wrong class, silently
    (dog 3.54 / cat 0.00 for 0.32 / 0.51 in the report): the run's config (in last.pth, or config.yaml beside
    model_final.pth) names its classes."""
    if engine == "detectron2":
        pytest.importorskip("detectron2")
    run = tmp_path / "run"
    base = [*DET, f"data.root={data['voc']}", f"engine={engine}"]
    assert main([str(a) for a in ["train", *base, f"output_dir={run}"]]) == 0
    capsys.readouterr()
    files = [run / "model_final.pth"] + ([run / "last.pth"] if engine == "torch" else [])
    for checkpoint in files:
        one_error_line(capsys, ["eval", *base, "data.classes=[cat, dog]", f"output_dir={tmp_path / 'e'}", checkpoint],
                       checkpoint.name, "['dog', 'cat']", "in another order", "data.classes")
    assert main([str(a) for a in ["eval", *base, f"output_dir={tmp_path / 'e'}", files[0]]]) == 0


def test_a_data_error_in_a_loader_worker_is_its_own_message(data, tmp_path, capsys):
    """With DataLoader workers (data.workers=-1 gives some on most machines) a corrupt image came back as one
    1,759-character line: "Caught CorruptImageError in DataLoader worker process 0.; Original Traceback ...",
    the useful sentence last. Now the line is the error's own message, as without workers."""
    root = _copy(data["imagenet"], tmp_path / "imagenet")
    bad = root / "train" / "n01" / "a.JPEG"
    bad.write_bytes(b"not a jpeg")
    argv = ["train", "data.name=imagenet", f"data.root={root}", "data.img_size=16", "data.val_resize=16",
            "data.val_crop=16", "model.name=resnet18d", "model.kwargs={width_mult: 0.25}", "train.batch_size=1",
            "train.epochs=1", f"output_dir={tmp_path / 'run'}"]
    alone = one_error_line(capsys, [*argv, "data.workers=0"], "a.JPEG")
    in_worker = one_error_line(capsys, [*argv, "data.workers=1"], "a.JPEG")
    assert in_worker == alone and "worker" not in in_worker and len(in_worker) < 400


def test_demo_checks_its_arguments_before_running(tmp_path, capsys):
    """A misspelt stage was a ValueError traceback, and a typo in a transfer stage's override was found only after
    the classification stage had trained: both are one line before anything runs or prints."""
    out = ["--out", tmp_path / "demo"]
    one_error_line(capsys, ["demo", *out, "--stages", "segmentaton"], "segmentaton", "choose from")
    assert main([str(a) for a in ["demo", *out, "detection.train.max_itr=2"]]) == 2
    printed = capsys.readouterr()
    assert printed.out == "" and "demo stage detection" in printed.err and "train.max_itr" in printed.err
    assert not (tmp_path / "demo").exists()


def test_coco_mistakes(data, tmp_path, capsys):
    """COCO data errors were tracebacks in train/eval (COCOFormatError was a plain ValueError; a missing images
    folder a bare FileNotFoundError; a folder for a JSON an IsADirectoryError), and COCO keys with
    data.format=voc were ignored (the run trained on the VOC folder)."""
    from test_coco import write_coco

    gt = write_coco(tmp_path / "coco")
    images = tmp_path / "coco" / "images"
    coco = ["data.format=coco", f"data.train_json={gt}", f"data.train_images={images}", f"data.test_json={gt}",
            f"data.test_images={images}", "data.classes=null", f"output_dir={tmp_path / 'run'}"]
    base = [a for a in DET if not a.startswith("data.classes")]
    one_error_line(capsys, ["train", *base, f"data.root={data['voc']}", f"data.train_json={gt}",
                            f"output_dir={tmp_path / 'run'}"], "data.train_json", "data.format=coco")
    one_error_line(capsys, ["train", *base, *coco, f"data.train_images={tmp_path / 'nowhere'}"],
                   "data.train_images", "nowhere", "not found")
    one_error_line(capsys, ["train", *base, *coco, f"data.train_json={tmp_path / 'coco'}"], "coco", "a folder")
    broken = tmp_path / "broken.json"
    doc = __import__("json").loads(gt.read_text())
    doc["annotations"][0]["category_id"] = 99
    broken.write_text(__import__("json").dumps(doc))
    one_error_line(capsys, ["train", *base, *coco, f"data.train_json={broken}"], "broken.json", "99")
    one_error_line(capsys, ["coco-eval", "--gt", tmp_path / "coco", "--results", gt], "coco", "a folder")
    assert not any((tmp_path / "run").rglob("*.pth"))


def test_export_and_seg_eval_mistakes(data, tmp_path, capsys):
    """export over its own input replaced the suite's file and its metadata; a detection or segmentation
    checkpoint was a KeyError 'name' traceback (last.pth) or 'not a checkpoint of tricks train' (model_final.pth,
    which tricks train wrote); seg-eval's errors were tracebacks."""
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(Path(data["weights"]).read_bytes())
    before = weights.read_bytes()
    one_error_line(capsys, ["export", weights, "--to", "timm", "--out", weights], "w.safetensors", "input file")
    assert weights.read_bytes() == before
    run = tmp_path / "seg"
    assert main([str(a) for a in ["train", *SEG, f"data.root={data['ade']}", f"output_dir={run}"]]) == 0
    capsys.readouterr()
    one_error_line(capsys, ["export", run / "last.pth", "--to", "mmseg", "--out", tmp_path / "x.pth"],
                   "last.pth", "segmentation checkpoint", "model.weights")
    one_error_line(capsys, ["export", run / "model_final.pth", "--to", "mmseg", "--out", tmp_path / "x.pth"],
                   "model_final.pth", "no run config")
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    gt.mkdir(), pred.mkdir()
    from PIL import Image

    Image.fromarray(np.zeros((4, 5), np.uint8)).save(gt / "a.png")
    Image.fromarray(np.full((4, 5), 9, np.uint8)).save(pred / "a.png")
    one_error_line(capsys, ["seg-eval", "--gt", gt, "--pred", pred, "--num-classes", "4"], "a.png", "9")
    one_error_line(capsys, ["seg-eval", "--gt", gt, "--pred", pred, "--num-classes", "0"], "--num-classes 0")
    one_error_line(capsys, ["seg-eval", "--gt", tmp_path / "nowhere", "--pred", pred, "--num-classes", "4"],
                   "nowhere", "not found")
    Image.fromarray(np.zeros((4, 5), np.uint8)).save(pred / "b.png")
    one_error_line(capsys, ["seg-eval", "--gt", gt, "--pred", pred, "--num-classes", "4"], "b.png", "no ground truth")


# ----------------------------------------------------------------------------------------------------- CLI
def test_command_line_mistakes(capsys):
    one_error_line(capsys, ["trian"], "invalid choice", "'trian'")
    one_error_line(capsys, ["eval", "model.name=resnet18d"], "no CHECKPOINT")
    one_error_line(capsys, ["train", "model.name=resnet18d", "--epochs", "3"], "unrecognized arguments", "--epochs")
    one_error_line(capsys, ["eval", "a.pth", "b.pth", "model.name=resnet18d"], "2 checkpoints", "a.pth", "b.pth")
    # counts of at least 1 (--seeds 0 wrote an all-"pending" table and exited 0)
    one_error_line(capsys, ["reproduce", "table5", "--seeds", "0"], "--seeds", "at least 1")
    one_error_line(capsys, ["demo", "--scenes", "0", "8"], "--scenes", "at least 1")


def test_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    from runtime.config import ConfigError

    with pytest.raises(ConfigError, match="optim.lrr"):
        main(["--debug", "train", "model.name=resnet18d", "optim.lrr=1", f"output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="optim.lrr"):
        main(["train", "model.name=resnet18d", "optim.lrr=1", f"output_dir={tmp_path}", "--debug"])
    monkeypatch.setenv("TRICKS_DEBUG", "1")
    with pytest.raises(ConfigError, match="optim.lrr"):
        main(["train", "model.name=resnet18d", "optim.lrr=1", f"output_dir={tmp_path}"])


def test_programming_errors_keep_their_traceback(tmp_path, monkeypatch):
    import classification.train as train_mod

    def bug(cfg, callbacks=()):
        raise KeyError("a bug, not a user mistake")

    monkeypatch.setattr(train_mod, "train", bug)
    with pytest.raises(KeyError, match="a bug"):
        main(["train", *CLS, f"output_dir={tmp_path}"])


def test_eval_takes_options_and_overrides_in_any_order(data, tmp_path, capsys):
    """``tricks eval CONFIG key=value CHECKPOINT`` and ``... CHECKPOINT --write-results DIR key=value``."""
    for argv in (["eval", *CLS, data["weights"], f"output_dir={tmp_path}"],
                 ["eval", "model.name=resnet18d", data["weights"], *CLS[1:], f"output_dir={tmp_path}"]):
        assert main([str(a) for a in argv]) == 0
        assert "top-1" in capsys.readouterr().out


D2 = ["task=detection", "engine=detectron2", "model.backbone=resnet18d", "model.norm=batchnorm", "model.frozen_stages=0",
      "model.min_size_train=[64]", "model.min_size_test=64", "model.max_size=64", "data.train_splits=2007-trainval",
      "data.workers=0", "optim.warmup_iters=1", "optim.milestones=[100]", "train.max_iter=2", "train.batch_size=2",
      "model.kwargs={width_mult: 0.25}"]


def test_detectron2_engine_loads_strictly(data, tmp_path, capsys):
    """fvcore's checkpointer loads what fits and logs "Skip loading" for the rest: the engine refuses instead."""
    pytest.importorskip("detectron2")
    from detection import d2_engine
    from detection.config import DetectionConfig
    from detection.train import build_model as build_torch_model
    from runtime.config import load_config

    d2_engine.import_detectron2()
    cfg = load_config(None, DetectionConfig, [*D2[1:], f"data.root={data['voc']}", "data.classes=[dog, cat]"])
    model = d2_engine._trainer_class().build_model(d2_engine.build_d2_config(cfg))
    run = tmp_path / "d2run"
    run.mkdir()
    torch.save({"model": model.state_dict(), "iteration": 1}, run / "model_final.pth")
    evaluate = ["eval", *D2, f"data.root={data['voc']}", f"output_dir={tmp_path / 'out'}"]
    one_error_line(capsys, [*evaluate, "data.classes=[dog, cat, bird]", run / "model_final.pth"], "model_final.pth",
                   "does not fit", "detectron2-engine", "3 classes", "roi_heads.box_predictor")
    torch_cfg = load_config(None, DetectionConfig, [*DET[1:], f"data.root={data['voc']}"])
    torch.save(build_torch_model(torch_cfg, 2).state_dict(), tmp_path / "torch_engine.pth")
    one_error_line(capsys, [*evaluate, "data.classes=[dog, cat]", tmp_path / "torch_engine.pth"], "torch_engine.pth",
                   "does not fit", "missing keys", "unexpected keys")


def test_mmseg_engine_loads_strictly(data, tmp_path, capsys):
    pytest.importorskip("mmseg")
    from segmentation.config import SegmentationConfig
    from segmentation.train import build_model
    from runtime.config import load_config

    cfg = load_config(None, SegmentationConfig, [*SEG[1:], "data.num_classes=6", "data.class_names=null",
                                                 f"data.root={data['ade']}"])
    six = tmp_path / "six_classes.pth"
    torch.save(build_model(cfg, pretrained=False).state_dict(), six)
    one_error_line(capsys, ["eval", *SEG, "engine=mmseg", f"data.root={data['ade']}", f"output_dir={tmp_path / 'o'}",
                            six], "six_classes.pth", "does not fit", "mmseg engine", "4 classes", "decode_head")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    one_error_line(capsys, ["eval", *SEG, "engine=mmseg", f"data.root={data['ade']}", f"output_dir={tmp_path / 'o'}",
                            tmp_path / "junk.pth"], "junk.pth", "cannot be loaded into")
