"""experiment.yaml, the protocol's sizes, as a typed `Protocol` (DESIGN.md, "Experiment protocol").

`load_protocol` reads the file, its `quick:` section, `--config` and `--encoder` over it;
`Protocol.from_mapping` checks the result (`__post_init__`) before any work. A protocol keeps
the values as the files gave them, so `to_dict` writes results.json's `protocol` unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nlpctr.config_files import LEAF, Schema, check_keys, is_integer, read_mapping
from nlpctr.errors import UserError
from nlpctr.models.config import check_training_config, deep_merge, key_tree, training_schema
from nlpctr.models.ctr_net import FUSIONS
from nlpctr.models.encoder import EncoderConfig
from nlpctr.models.encoder_source import resolve_encoder
from nlpctr.models.redundancy import RedundancySettings
from nlpctr.models.results import ProtocolDocument
from nlpctr.models.trainer import LoopConfig

PROTOCOL = Path(__file__).resolve().parents[2] / "models" / "configs" / "experiment.yaml"


@dataclass(frozen=True)
class DistillSettings:
    """`distill:`, E4. `loop` (SuKD and no-KD, over rows) and `feature_kd` (over texts) are
    LoopConfig fields over its defaults, one budget for both."""

    teacher_fusion: str  # `best` or one of `fusions`
    students: tuple[int, ...]  # layers per student; () skips E4
    weight: float  # SuKD's lambda
    loop: dict[str, int | float | str]
    feature_kd: dict[str, int | float | str]
    throughput_texts: int


@dataclass(frozen=True)
class SimulatorSettings:
    """`simulator:`, the redundancy sweep of `--dataset simulated` (None: the file's null)."""

    rho: tuple[float, ...]
    rows: int
    fusions: tuple[str, ...] | None  # the sweep's own, over the protocol's
    text_strength: float
    impressions_per_row: int | None  # 0 or None: one binary impression per row
    distill: bool
    seeds: tuple[int, ...] | None  # extra seeds, run at `seed_rho`
    seed_rho: tuple[float, ...] | None  # None: every rho
    train_config: dict[str, Any] | None  # a training config over `train_config`


@dataclass(frozen=True)
class Protocol:
    """experiment.yaml's settings, checked: every value a training config does not check itself,
    and `train_config` as `nlpctr train` would check it (`check_training_config`).

    Raises:
        UserError: a value out of range, in one line.
    """

    encoder: str  # E1's frozen encoder and E2-E4's LM
    device: str | None
    precision: str | None
    embed_layers: int
    lm_layers: int
    fusions: tuple[str, ...]
    joint_init_from_baseline: bool
    train_config: dict[str, Any]  # a training config merged over default.yaml for every run
    distill: DistillSettings
    redundancy: RedundancySettings
    simulator: SimulatorSettings

    def __post_init__(self) -> None:
        fusions = self.fusions
        if not isinstance(fusions, tuple) or not fusions or any(f not in FUSIONS for f in fusions):
            shown = list(fusions) if isinstance(fusions, tuple) else fusions
            raise UserError(f"fusions must be a non-empty list of {', '.join(FUSIONS)}, got {shown!r}")
        for layers in (self.embed_layers, self.lm_layers):
            EncoderConfig(name=self.encoder, layers=layers)  # a UserError names the range
        students = self.distill.students
        if not isinstance(students, tuple) or not all(is_integer(k) for k in students):
            shown = list(students) if isinstance(students, tuple) else students
            raise UserError(f"distill.students must be a list of layer counts, got {shown!r}")
        if students and max(students) > int(self.lm_layers):
            raise UserError(
                f"students of {max(students)} layers need a teacher of at least as many; lm_layers is "
                f"{self.lm_layers}"
            )
        if students and self.distill.teacher_fusion not in ["best", *fusions]:
            raise UserError(f"distill.teacher_fusion must be `best` or one of fusions {list(fusions)}")
        rho = self.simulator.rho
        parse_rho(list(rho) if isinstance(rho, tuple) else rho, "simulator.rho")
        check_training_config(self.train_config or {}, "train_config")

    @classmethod
    def from_mapping(cls, protocol: Mapping[str, Any], what: str) -> Protocol:
        """The protocol of a merged experiment.yaml document; `what` (the file) starts any error."""
        distill, simulator = protocol["distill"], protocol["simulator"]
        try:
            return cls(
                **{k: protocol[k] for k in ("encoder", "device", "precision", "embed_layers", "lm_layers")},
                fusions=_tuple(protocol["fusions"]),
                joint_init_from_baseline=protocol["joint_init_from_baseline"],
                train_config=protocol["train_config"],
                distill=DistillSettings(**{**distill, "students": _tuple(distill["students"])}),
                redundancy=RedundancySettings(**protocol["redundancy"]),
                simulator=SimulatorSettings(
                    **{
                        **simulator,
                        **{k: _tuple(simulator.get(k)) for k in ("rho", "fusions", "seeds", "seed_rho")},
                        "train_config": simulator.get("train_config"),
                    }
                ),
            )
        except UserError as exc:
            raise UserError(f"{what}: {exc}") from None

    def to_dict(self) -> ProtocolDocument:
        """The settings as the files gave them: results.json's `protocol`."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def without_students(self) -> Protocol:
        """The protocol without E4 (the sweep's, unless `simulator.distill`)."""
        return dataclasses.replace(self, distill=dataclasses.replace(self.distill, students=()))


def _tuple(value: Any) -> Any:
    """A YAML list as a tuple (a frozen protocol holds no lists); anything else as it is, for
    `__post_init__` to refuse."""
    return tuple(value) if isinstance(value, list) else value


def protocol_schema() -> Schema:
    """Every key experiment.yaml (and so a `--config` over it) may hold; `train_config` sections
    are training configs, E4's loops LoopConfigs."""
    protocol = read_mapping(PROTOCOL, str(PROTOCOL), "reinstall nlpctr")
    protocol.pop("quick", None)  # applied by --quick; a user's own `quick:` would be ignored
    schema = key_tree(protocol)
    loop = dict.fromkeys((f.name for f in dataclasses.fields(LoopConfig)), LEAF)
    schema["train_config"] = training_schema()
    schema["simulator"] = {**schema["simulator"], "train_config": training_schema()}
    schema["distill"] = {**schema["distill"], "loop": loop, "feature_kd": loop}
    return schema


def load_protocol(
    quick: bool, config_file: Path | None, simulated: bool = False, encoder: str | None = None
) -> Protocol:
    """The protocol of one `nlpctr experiment`, checked before anything runs.

    Args:
        quick: merge experiment.yaml's `quick:` section over it.
        config_file: `--config`, merged last.
        simulated: the sweep's: `simulator.train_config` over `train_config`, `simulator.fusions`.
        encoder: `--encoder` (`with_encoder`).

    Returns:
        The checked protocol.

    Raises:
        UserError: an unknown key, or a value out of range, in one line naming the file.
    """
    protocol = read_mapping(PROTOCOL, str(PROTOCOL), "reinstall nlpctr")
    quick_section = protocol.pop("quick")
    what = str(PROTOCOL.name)
    if config_file is not None:
        what = f"--config {config_file}"
        user = read_mapping(config_file, what, "fix the file")
        check_keys(user, protocol_schema(), what)
    if simulated:  # before `quick:`, whose sizes win
        protocol = deep_merge(protocol, {"train_config": protocol["simulator"].get("train_config") or {}})
    if quick:
        protocol = deep_merge(protocol, quick_section)
    if simulated and "fusions" in protocol["simulator"]:  # the sweep's own, quick or not
        protocol["fusions"] = protocol["simulator"]["fusions"]
    if config_file is not None:
        protocol = deep_merge(protocol, user)
    return Protocol.from_mapping(with_encoder(protocol, encoder), what)


def parse_rho(values: Any, flag: str = "--rho") -> list[float]:
    """Redundancy values: a comma-separated flag or a list, each a number in [0, 1], none twice.

    Raises:
        UserError: anything else, before any folder is made.
    """
    items = values.split(",") if isinstance(values, str) else values
    if not isinstance(items, list | tuple) or not items:
        raise UserError(f"{flag} must list values of rho in [0, 1], e.g. 0,0.5,1; got {values!r}")
    rhos = []
    for item in items:
        try:
            rho = float(item.strip() if isinstance(item, str) else item)
        except (TypeError, ValueError):
            rho = math.nan
        if isinstance(item, bool) or not 0 <= rho <= 1:  # NaN fails too
            raise UserError(
                f"{flag}: {str(item)[:40]!r} is not a value of rho in [0, 1]; pass comma-separated numbers, "
                "e.g. 0,0.5,1"
            )
        if rho in rhos:
            raise UserError(f"{flag}: rho {rho:g} is given twice")
        rhos.append(rho)
    return rhos


def with_encoder(protocol: Mapping[str, Any], encoder: str | None) -> dict[str, Any]:
    """The merged document with its encoder (`encoder`, else the protocol's) resolved, checked
    deep enough for its layer counts, and set as every training run's `encoder.name`."""
    source = resolve_encoder(encoder or protocol["encoder"])
    for key in ("embed_layers", "lm_layers"):
        if int(protocol[key]) > source.depth:
            raise UserError(
                f"{key} is {protocol[key]} but the encoder {source.model_name} has {source.depth} layers; "
                f"set {key} (and distill.students) to at most {source.depth} with --config FILE"
            )
    train_config = deep_merge(protocol["train_config"], {"encoder": {"name": source.name}})
    return {**protocol, "encoder": source.name, "train_config": train_config}
