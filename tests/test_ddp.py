"""torchrun DDP on CPU (gloo, 2 processes) reaches the same weights as 1 process with the same global batch."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from backbones import load_state_dict

REPO = Path(__file__).resolve().parents[1]
# BN in eval mode (norm_eval) and no random augmentation: every quantity is independent of how the
# global batch is split over processes, so 2 x 8 and 1 x 16 must give the same update.
COMMON = [
    "model.name=resnet18d", "model.norm_eval=true", "data.name=synthetic", "data.synthetic_size=96",
    "data.img_size=16", "data.val_resize=16", "data.val_crop=16", "data.workers=0", "data.num_classes=4",
    "data.min_area=1.0", "data.hflip=0", "data.brightness=0", "data.contrast=0", "data.saturation=0",
    "data.lighting=0", "train.epochs=1", "train.max_steps=4", "optim.lr=0.4", "optim.warmup_epochs=0.5",
    "optim.schedule=cosine", "train.label_smoothing=0.1", "optim.no_bias_decay=true",
]


def _run(args, nproc, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc > 1 else [sys.executable])
    res = subprocess.run([*launcher, "-m", "tricks", "train", *args], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


@pytest.mark.slow
def test_two_process_ddp_matches_single_process(tmp_path):
    out1 = _run([*COMMON, "train.batch_size=16", f"output_dir={tmp_path / 'single'}"], 1, tmp_path)
    out2 = _run([*COMMON, "train.batch_size=8", f"output_dir={tmp_path / 'ddp'}"], 2, tmp_path)
    a = load_state_dict(tmp_path / "single" / "model.safetensors")
    b = load_state_dict(tmp_path / "ddp" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6, msg=k)
    # The weights moved (fc.bias starts at 0): the comparison is not between two initialisations.
    assert a["fc.bias"].abs().max() > 1e-3
    # Validation is sharded without padding and summed over ranks: same images, same accuracy.
    summary1, summary2 = (next(line for line in out.splitlines() if line.startswith("top-1")) for out in (out1, out2))
    assert "(24 images)" in summary1 and summary1 == summary2


@pytest.mark.slow
def test_detection_two_process_ddp_trains_and_evaluates_sharded(tmp_path):
    """`tricks train` (task=detection) under torchrun (gloo, 2 x 1 image): training runs, the sharded VOC07
    evaluation gathered over ranks equals a single-process evaluation of the saved weights."""
    from test_detection_train import TINY, make_devkit

    devkit = make_devkit(tmp_path / "VOCdevkit")
    args = ["task=detection", *TINY, f"data.root={devkit}", "train.batch_size=1", "train.max_iter=4", f"output_dir={tmp_path / 'ddp'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "tricks", "train", *args], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    ddp_line = next(line for line in res.stdout.splitlines() if line.startswith("VOC07 mAP"))
    assert "(4 images)" in ddp_line
    res = subprocess.run([sys.executable, "-m", "tricks", "eval", str(tmp_path / "ddp" / "config.yaml"),
                          str(tmp_path / "ddp" / "model_final.pth")], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    single_line = next(line for line in res.stdout.splitlines() if line.startswith("VOC07 mAP"))
    assert single_line.split("(")[0] == ddp_line.split("(")[0]  # "VOC07 mAP xx.xx%"
