"""Errors that are the user's to fix, as opposed to bugs.

Every mistake in what a user hands the suite (a config key, a data folder, an annotation, a checkpoint,
a command-line argument, an output path) raises a ``UserError`` whose message names the culprit (file,
line, object, key) and says what to do. The ``tricks`` command prints such an error as one line and exits
with status 2; ``--debug`` (or ``TRICKS_DEBUG=1``) shows the traceback as well. Any other exception is a
bug and keeps its traceback.

The subclasses also derive from the built-in type the error used to be (``ValueError``,
``FileNotFoundError``), so code catching those keeps working.

``backbones/`` sits below the runtime and cannot import it: its ``WeightsError`` is listed beside
``UserError`` by ``user_errors()``, the tuple the command catches (this module stays free of torch, so
``runtime.config`` and ``tricks --help`` stay light).
"""
from __future__ import annotations

import os
from pathlib import Path


class UserError(Exception):
    """A mistake in the user's input; the message names the culprit and what to do."""


class DataError(UserError, ValueError):
    """A dataset that cannot be read as its layout says (file list, annotation, image, mask)."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be read, or that does not fit the model it is loaded into."""


class UsageError(UserError, ValueError):
    """A command-line argument the command does not take (an unknown table, row group or task, a bad count)."""


class UserPathError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist or cannot be written."""


def user_errors() -> tuple[type[Exception], ...]:
    """Every exception type that is a user mistake: ``UserError`` and ``backbones``' ``WeightsError``."""
    from backbones.weights import WeightsError

    return UserError, WeightsError


def one_line(error: BaseException) -> str:
    """The error's message on one line (multi-line messages joined with "; "). An error raised in a DataLoader
    worker comes back as "Caught X in DataLoader worker process N. Original Traceback ...": its own message
    is the traceback's last line, after the exception's name."""
    text = str(error)
    if "in DataLoader worker process" in text and "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1].strip()
        name = type(error).__name__
        for prefix in (f"{type(error).__module__}.{name}: ", f"{name}: "):
            if last.startswith(prefix):
                return last[len(prefix):]
    parts = [line.strip() for line in text.splitlines() if line.strip()]
    return "; ".join(parts) or type(error).__name__


def check_writable_dir(path: str | os.PathLike, key: str) -> Path:
    """Make sure the folder ``path`` (the value of ``key``) can be created and written *before* the work
    whose results go there starts; a ``UserPathError`` naming ``key`` otherwise. Creates the folder."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".tricks-write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except FileExistsError:
        raise UserPathError(f"{key}={str(path)!r}: a file of that name exists where a folder is needed; "
                            "choose another folder") from None
    except OSError as e:
        raise UserPathError(f"{key}={str(path)!r}: cannot write there ({e.strerror or e}); choose a folder "
                            "you can write to") from None
    return path
