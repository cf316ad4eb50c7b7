"""The `tricks` command line."""
import subprocess
import sys

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
