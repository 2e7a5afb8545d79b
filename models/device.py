"""Where torch work runs and at what precision: one resolution of `--device` and `--precision`.

`--device` auto|cpu|cuda|cuda:N, `--precision` bf16|fp16|fp32|auto (also top-level keys of
models/configs/default.yaml and experiment.yaml; a flag wins). Used by `nlpctr train`,
`experiment` and, per worker with `fallback=True`, the embed and score-batch Beam jobs. What
runs at which precision, and why CPU fp32 is bitwise unchanged: docs/DESIGN.md, "Modules in
detail", device.py; flags: docs/USAGE.md, "On a GPU".
"""

from __future__ import annotations

import logging
import os
import re
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from nlpctr.atomic import JsonObject
from nlpctr.errors import UserError

LOG = logging.getLogger(__name__)

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
PRECISIONS = ("bf16", "fp16", "fp32")
PLACEMENT_KEYS = ("device", "precision")  # top-level config keys; not part of a run's identity
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_CUDA = re.compile(r"cuda(?::(\d+))?")
_CPU = torch.device("cpu")
CUDA_FIX = (
    "install a CUDA build of torch (README, 'Training on a GPU': pip install torch --index-url "
    "https://download.pytorch.org/whl/cu124) or use --device cpu"
)


def device_spec(spec: str | None) -> str:
    """`spec` checked and normalised (`auto` for None), without asking torch what is there.

    Raises:
        UserError: a spec that is not auto, cpu, cuda or cuda:N.
    """
    text = "auto" if spec is None else str(spec).strip().lower()
    if text not in ("auto", "cpu") and _CUDA.fullmatch(text) is None:
        raise UserError(f"--device must be {DEVICE_CHOICES}, got {spec!r}")
    return text


def resolve_device(spec: str | None = "auto", *, fallback: bool = False) -> torch.device:
    """The torch device `spec` names (None: auto).

    Args:
        spec: `auto`, `cpu`, `cuda` or `cuda:N`.
        fallback: when CUDA is asked for and absent, log one warning and return the CPU
            (a Beam worker) instead of refusing.

    Returns:
        `cuda:N` or `cpu`.

    Raises:
        UserError: an unknown spec, CUDA asked for where torch sees none (unless `fallback`),
            or a GPU index past the last one.
    """
    text = device_spec(spec)
    if text == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else _CPU
    if text == "cpu":
        return _CPU
    match = _CUDA.fullmatch(text)
    assert match is not None  # (device_spec)
    if not torch.cuda.is_available():
        if fallback:
            LOG.warning("--device %s: no CUDA device on this worker; running on the CPU", text)
            return _CPU
        raise UserError(f"--device {text}: torch {torch.__version__} sees no CUDA device here; {CUDA_FIX}")
    index = int(match.group(1)) if match.group(1) is not None else torch.cuda.current_device()
    count = torch.cuda.device_count()
    if index >= count:
        raise UserError(
            f"--device {text}: this machine has {count} CUDA device(s); use cuda:0..cuda:{count - 1}"
        )
    return torch.device("cuda", index)


def resolve_precision(spec: str | None, device: torch.device) -> str:
    """The precision `spec` names on `device` (None or `auto`: bf16 on CUDA, fp32 on the CPU).

    Raises:
        UserError: an unknown precision, fp16 on the CPU, or bf16 on a GPU without it.
    """
    text = "auto" if spec is None else str(spec).strip().lower()
    cuda = device.type == "cuda"
    if text == "auto":
        if not cuda:
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if text not in PRECISIONS:
        raise UserError(f"--precision must be auto, {', '.join(PRECISIONS)}, got {spec!r}")
    if text == "fp16" and not cuda:
        raise UserError(
            "--precision fp16 needs a CUDA device (its loss scaling); on the CPU use bf16 or fp32"
        )
    if text == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise UserError(
            f"--precision bf16: {torch.cuda.get_device_name(device)} has no bf16; use fp16 or fp32"
        )
    return text


@dataclass(frozen=True)
class Placement:
    """A resolved device and precision (see the module docstring for what each governs)."""

    device: torch.device = field(default=_CPU)
    precision: str = "fp32"

    @classmethod
    def resolve(
        cls, device: str | None = "auto", precision: str | None = "auto", *, fallback: bool = False
    ) -> Placement:
        """`resolve_device` then `resolve_precision` (the one way flags and configs become a Placement).

        Raises:
            UserError: as `resolve_device` and `resolve_precision`.
        """
        resolved = resolve_device(device, fallback=fallback)
        return cls(resolved, resolve_precision(precision, resolved))

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The LM's autocast dtype; None at fp32."""
        return _DTYPES.get(self.precision)

    def autocast(self) -> AbstractContextManager[Any]:
        """The LM's layers at this precision (nothing at fp32)."""
        dtype = self.autocast_dtype
        return nullcontext() if dtype is None else torch.autocast(self.device.type, dtype=dtype)

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """A loss scaler for fp16 (whose gradients underflow without one); None otherwise."""
        return torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None

    def to_dict(self) -> JsonObject:
        """What a run records (run.json, results.json): the device, its name, the precision, torch."""
        cuda = self.device.type == "cuda"
        return {
            "device": str(self.device),
            "device_name": torch.cuda.get_device_name(self.device) if cuda else "cpu",
            "precision": self.precision,
            "torch": torch.__version__,
            "cuda": torch.version.cuda if cuda else None,
        }

    def __str__(self) -> str:
        return f"{self.device}/{self.precision}"


CPU = Placement()


class Placed(Protocol):
    """A configuration that names where it runs (`TrainConfig`)."""

    device: str
    precision: str


def placement_of(config: Placed) -> Placement:
    """The placement a config's `device` and `precision` name (`TrainConfig.placement`)."""
    return Placement.resolve(config.device, config.precision)


def without_placement(config: JsonObject) -> JsonObject:
    """A config without its device and precision keys: where a run ran is not what it is, so a
    run started on one device resumes on another."""
    return {k: v for k, v in config.items() if k not in PLACEMENT_KEYS}


def device_of(module: nn.Module) -> torch.device:
    """The device of a module's parameters (the CPU for a module without any)."""
    parameter = next(module.parameters(), None)
    return parameter.device if parameter is not None else _CPU


def seed_run(seed: int) -> None:
    """Seed torch for a run and make its kernels deterministic, so the same seed gives the same
    outputs. Without this, multi-threaded CPU kernels sum in a varying order: two identical joint
    runs differed by up to 2e-5 in p under bf16 autocast (1.5e-8 in fp32), enough to move a
    checkpoint choice. cuBLAS needs a fixed workspace for the same guarantee on a GPU; an op
    without a deterministic kernel warns instead of failing."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(seed)
