"""Training configuration (DESIGN.md, "Conventions"): a frozen `TrainConfig` of the typed
sections (`NetConfig`, `LoopConfig` for `loop` and `lm_loop`, `RecipeConfig`, `EncoderConfig`,
`EvaluationConfig`) and the top-level settings. The dataclass defaults are the defaults;
`models/configs/default.yaml`, its `modes.<mode>` sections, `--config` and the command line are
layers of overrides merged over them (`load_config`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cache
from pathlib import Path

from nlpctr.atomic import JsonObject
from nlpctr.config_files import LEAF, Schema, check_integer, check_keys, read_mapping
from nlpctr.errors import UserError
from nlpctr.models.ctr_net import NetConfig
from nlpctr.models.device import PLACEMENT_KEYS, Placement
from nlpctr.models.encoder import EncoderConfig
from nlpctr.models.evaluation import EvaluationConfig
from nlpctr.models.recipe import ProbeConfig, RecipeConfig, Stage2Config
from nlpctr.models.trainer import LoopConfig


class Mode(StrEnum):
    """What `nlpctr train --mode` trains (DESIGN.md, "The experiment protocol"); the value is the
    flag's spelling, `run_name` the protocol's run and the feature service's."""

    BASELINE = "baseline"  # E0
    CASCADE_FROZEN = "cascade-frozen"  # E1
    CASCADE_FINETUNED = "cascade-finetuned"  # E2
    JOINT = "joint"  # E3

    @property
    def run_name(self) -> str:
        return self.value.replace("-", "_")

    @property
    def trains_lm(self) -> bool:
        """E2 and E3: one trainable LM, by the LM recipe."""
        return self in (Mode.CASCADE_FINETUNED, Mode.JOINT)


MODES = tuple(m.value for m in Mode)  # the flag's choices
CASCADE_FORMS = ("score", "vector")
DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "default.yaml"


@dataclass(frozen=True)
class TrainConfig:
    """One run's training configuration, every section typed and checked.

    Attributes:
        net: the CTR network.
        loop: the CTR network's loop (E0, E1, E2's CTR step, E3's tower before the LM).
        lm_loop: the LM stage of E2 and E3 (`models/recipe.py`: one budget for both arms).
        recipe: the probe, whether the LM stage runs, and E3's stage 2.
        encoder: the one trainable LM of E2 and E3.
        lm_head_hidden: E2's click head width (`TextScorer`).
        cascade_form: the form of E2's LM feature its CTR step reads: `score` or `vector`.
        evaluation: the test report's bootstrap and calibration.
        device: `models/device.py`'s device spec; not part of the run's identity.
        precision: the LM's precision; not part of the run's identity.
    """

    net: NetConfig = field(default_factory=NetConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    lm_loop: LoopConfig = field(default_factory=LoopConfig)
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    lm_head_hidden: int = 64
    cascade_form: str = "score"
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    device: str = "auto"
    precision: str = "auto"

    def __post_init__(self) -> None:
        if self.cascade_form not in CASCADE_FORMS:
            raise UserError(f"cascade_form must be score or vector, got {self.cascade_form!r}")
        check_integer("lm_head_hidden", self.lm_head_hidden)

    @classmethod
    def from_dict(cls, config: JsonObject) -> TrainConfig:
        """The typed config of a merged mapping (a run's `config` in run.json); what it leaves out
        is the dataclasses' default.

        Raises:
            UserError: an unknown key of a section, or a value out of range.
        """
        defaults = cls()
        try:
            net = dict(config.get("net") or {})
            if isinstance(net.get("hidden"), list):
                net["hidden"] = tuple(net["hidden"])
            return cls(
                net=NetConfig(**net),
                loop=LoopConfig(**(config.get("loop") or {})),
                lm_loop=LoopConfig(**(config.get("lm_loop") or {})),
                recipe=RecipeConfig.from_dict(config.get("recipe")),
                encoder=EncoderConfig(**(config.get("encoder") or {})),
                lm_head_hidden=config.get("lm_head_hidden", defaults.lm_head_hidden),
                cascade_form=config.get("cascade_form", defaults.cascade_form),
                evaluation=EvaluationConfig(**(config.get("evaluation") or {})),
                device=config.get("device", defaults.device),
                precision=config.get("precision", defaults.precision),
            )
        except TypeError as exc:
            raise UserError(f"bad training config: {exc}") from None

    def to_dict(self) -> JsonObject:
        """Every setting as plain JSON values (what config.json, run.json and results.json hold)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def identity(self) -> JsonObject:
        """`to_dict` without where the run runs: a run started on one device resumes on another."""
        return {k: v for k, v in self.to_dict().items() if k not in PLACEMENT_KEYS}

    @property
    def placement(self) -> Placement:
        """Where the models train and at what precision the LM runs (`models/device.py`)."""
        return Placement.resolve(self.device, self.precision)


def deep_merge(base: JsonObject, override: JsonObject) -> JsonObject:
    """`override` over `base` (two parsed YAML layers), recursing into nested mappings."""
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def key_tree(document: JsonObject) -> Schema:
    """The keys of a YAML document as a schema (`config_files.check_keys`): its mappings are
    sections, everything else a value."""
    return {k: key_tree(v) if isinstance(v, Mapping) and v else LEAF for k, v in document.items()}


def _fields(cls: type) -> Schema:
    return dict.fromkeys((f.name for f in dataclasses.fields(cls)), LEAF)


@cache
def training_schema() -> Schema:
    """Every key a training config may hold: each typed section's fields, and default.yaml's
    keys; `modes.<mode>` holds the same sections."""
    defaults = _defaults()
    schema = key_tree({k: v for k, v in defaults.items() if k != "modes"})
    recipe = {"probe": _fields(ProbeConfig), "stage2": _fields(Stage2Config)}
    typed = {
        "net": _fields(NetConfig),
        "loop": _fields(LoopConfig),
        "lm_loop": _fields(LoopConfig),
        "encoder": _fields(EncoderConfig),
        "recipe": {**_fields(RecipeConfig), **recipe},
        "evaluation": _fields(EvaluationConfig),
    }
    for section, keys in typed.items():
        schema[section] = {**schema.get(section, {}), **keys}
    schema.update(
        dict.fromkeys((f.name for f in dataclasses.fields(TrainConfig) if f.name not in typed), LEAF)
    )
    return {**schema, "modes": {mode: dict(schema) for mode in MODES}}


def read_config_file(path: Path, flag: str = "--config") -> JsonObject:
    """A user's training config: a YAML mapping whose every key something reads.

    Raises:
        UserError: not a readable YAML mapping, or an unknown key (named with the nearest known one).
    """
    what = f"{flag} {path}"
    config = read_mapping(Path(path), what, "fix the file")
    check_keys(config, training_schema(), what)
    return config


def load_config(
    mode: str, config_file: Path | None = None, overrides: JsonObject | None = None
) -> TrainConfig:
    """The dataclass defaults <- default.yaml <- its `modes.<mode>` <- `config_file` <- its
    `modes.<mode>` <- the command line (`overrides`).

    Args:
        mode: one of MODES.
        config_file: a user's YAML of overrides (`--config`).
        overrides: the flags' layer (`TrainRequest.overrides`).

    Returns:
        The frozen, checked configuration.

    Raises:
        UserError: an unknown mode, a config file that is not a YAML mapping of known keys, or a
            value out of range (checked now, not after an hour of training).
    """
    layers = [_defaults()]
    if config_file is not None:
        layers.append(read_config_file(config_file))
    return merged_config(mode, layers, overrides)


def _defaults() -> JsonObject:
    return read_mapping(DEFAULT_CONFIG, str(DEFAULT_CONFIG), "reinstall nlpctr")


def merged_config(mode: str, layers: list[JsonObject], overrides: JsonObject | None = None) -> TrainConfig:
    """Each layer and then its `modes.<mode>` over the ones before, then `overrides`; checked."""
    if mode not in MODES:
        raise UserError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    config: JsonObject = {}
    for layer in layers:
        per_mode = layer.get("modes") or {}
        config = deep_merge(config, {k: v for k, v in layer.items() if k != "modes"})
        config = deep_merge(config, per_mode.get(mode) or {})
    config = deep_merge(config, overrides or {})
    return TrainConfig.from_dict(config)


def check_training_config(config: JsonObject, what: str) -> None:
    """Check a training config that is not read from a file (the experiment protocol's
    `train_config`) as `load_config` would, for every mode, before any run starts.

    Raises:
        UserError: an unknown key or a value out of range.
    """
    check_keys(config, training_schema(), what)
    for mode in MODES:
        merged_config(mode, [_defaults(), config])
