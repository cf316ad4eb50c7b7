"""The `tricks` command line."""
import subprocess
import sys

import pytest

from tricks.cli import main


def test_backbones_table5(capsys):
    assert main(["backbones", "--table5"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("resnet50")}
    assert set(lines) == {"resnet50", "resnet50b", "resnet50c", "resnet50d"}
    assert lines["resnet50"][1:3] == ["25.56M", "3.86G"]  # measured, equal to the paper's 3.86G
    assert lines["resnet50d"][1:3] == ["25.58M", "4.33G"]


def test_backbones_lists_registry(capsys):
    assert main(["backbones"]) == 0
    out = capsys.readouterr().out
    assert "resnet152d" in out and "mobilenet" in out and "299x299" in out


def test_console_entry_point_module():
    res = subprocess.run([sys.executable, "-m", "tricks", "backbones", "--filter", "mobilenet"],
                         capture_output=True, text=True, check=True)
    assert "4.23M" in res.stdout and "0.57G" in res.stdout


def test_config_error_is_a_clean_message(capsys, tmp_path):
    assert main(["train", "model.name=resnet18d", "optim.lrr=0.1", f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "config error" in err and "optim.lrr" in err and "optim.lr" in err and "Traceback" not in err


def test_help_does_not_import_torch():
    """`tricks --help` and every subcommand's parser stay light: each command imports what it needs when it runs."""
    import subprocess
    import sys

    code = "import sys, tricks.cli as c; c.build_parser(); print('torch' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"
