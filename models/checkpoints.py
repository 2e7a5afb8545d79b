"""The one loader and writer of a run's checkpoints: every `torch.load` and `torch.save` of a
state dict (the resume point `last.pt`, the best and per-epoch checkpoints, a student's weights).

A checkpoint is written whole or not at all (a staging file renamed into place; a failed write,
a full disk say, removes what it wrote and says so in one line), and read with `weights_only=True`:
a missing, truncated or foreign file is one line naming it and what to do, never torch's
traceback. No Beam and no Feast here.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from nlpctr.atomic import atomic_path
from nlpctr.errors import UserError
from nlpctr.layout import RunLayout

CHECKPOINTS = RunLayout.CHECKPOINTS  # RUN/checkpoints/<part>/*.pt


def run_of(path: Path) -> Path | None:
    """The run folder a checkpoint lies in (RUN/checkpoints/...), if it lies in one."""
    for parent in Path(path).parents:
        if parent.name == CHECKPOINTS:
            return parent.parent
    return None


def retrain_hint(path: Path) -> str:
    """What to do about a damaged or missing checkpoint: delete the run and retrain it."""
    run = run_of(path)
    where = f"`rm -r {run}`" if run is not None else f"delete {Path(path).parent}"
    return f"delete the run and retrain it ({where}, then rerun its `nlpctr train`)"


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu", fix: str | None = None) -> Any:
    """A checkpoint written by `save_checkpoint` (or torch.save), loaded with weights_only=True.

    Args:
        path: the .pt file.
        map_location: where its tensors go (torch.load's argument).
        fix: what the user should do when it cannot be read (default: `retrain_hint`).

    Returns:
        What was saved (a state dict, or a dict of them).

    Raises:
        UserError: the file is missing, truncated or not a checkpoint of weights; names the file
            and the fix.
    """
    path = Path(path)
    fix = fix or retrain_hint(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} is missing; {fix}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # anything torch raises on a file's content: the file is not usable
        raise UserError(f"checkpoint {path} is damaged ({_damage(path, exc)}); {fix}") from None


def _damage(path: Path, exc: Exception) -> str:
    """Why a checkpoint did not load, in words (torch's messages run to a paragraph)."""
    if not zipfile.is_zipfile(path):
        return "not a whole checkpoint: truncated or overwritten"
    if isinstance(exc, pickle.UnpicklingError):
        return "it holds objects other than weights, which weights_only loading refuses"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return first[:120]


def save_checkpoint(state: Any, path: Path) -> None:
    """Write `state` to `path` whole or not at all (a staging file beside it, renamed into place).

    Raises:
        UserError: the write failed (a full disk, a read-only folder): nothing half-written is
            left, and the message says what to free or fix.
    """
    path = Path(path)
    # Serialised in memory first: torch's own file writer reports a full disk as a RuntimeError
    # without an errno ("unexpected pos ..."); Python's write raises the OSError that names it.
    serialised = io.BytesIO()
    torch.save(state, serialised)
    try:
        with atomic_path(path) as staging:  # a crash never leaves half a checkpoint
            _write(staging, serialised.getbuffer())
    except OSError as exc:
        raise UserError(
            f"checkpoint {path} could not be written ({exc.strerror or exc}); nothing half-written was kept; "
            f"free space on that disk (or make {path.parent} writable) and rerun the same command: "
            "training resumes from its last complete checkpoint"
        ) from None


def _write(staging: Path, data: memoryview) -> None:
    with open(staging, "wb") as handle:
        handle.write(data)
