"""Training configuration: `models/configs/default.yaml`, its per-mode sections, `--config` and
command-line overrides merged into one dict, and the typed configs read from it.

The YAML is the configuration; the dataclasses it feeds (`LoopConfig`, `EncoderConfig`,
`RecipeConfig`) keep defaults equal to it for callers that build them directly (distillation, tests),
and `tests/test_joint.py::test_defaults_live_in_one_place` keeps the two from drifting.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

from nlpctr.config_files import LEAF, Schema, check_keys, read_mapping
from nlpctr.errors import UserError
from nlpctr.models.ctr_net import NetConfig
from nlpctr.models.encoder import EncoderConfig
from nlpctr.models.recipe import ProbeConfig, RecipeConfig, Stage2Config
from nlpctr.models.trainer import LoopConfig

MODES = ("baseline", "cascade-frozen", "cascade-finetuned", "joint")
DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "default.yaml"


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """`override` over `base`, recursing into nested mappings."""
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def key_tree(document: Mapping[str, Any]) -> dict[str, Any]:
    """The keys of a YAML document as a schema (`config_files.check_keys`): its mappings are
    sections, everything else a value."""
    return {k: key_tree(v) if isinstance(v, Mapping) and v else LEAF for k, v in document.items()}


def _fields(cls: type) -> dict[str, Any]:
    return dict.fromkeys((f.name for f in dataclasses.fields(cls)), LEAF)


@cache
def training_schema() -> Schema:
    """Every key a training config may hold: default.yaml's, and each typed section's fields (so
    a field added to a dataclass is known before the YAML lists it); `modes.<mode>` holds the
    same sections."""
    defaults = _defaults()
    schema = key_tree({k: v for k, v in defaults.items() if k != "modes"})
    recipe = {"probe": _fields(ProbeConfig), "stage2": _fields(Stage2Config)}
    typed = {
        "net": _fields(NetConfig),
        "loop": _fields(LoopConfig),
        "lm_loop": _fields(LoopConfig),
        "encoder": _fields(EncoderConfig),
        "recipe": {**_fields(RecipeConfig), **recipe},
    }
    for section, keys in typed.items():
        schema[section] = {**schema.get(section, {}), **keys}
    return {**schema, "modes": {mode: dict(schema) for mode in MODES}}


def read_config_file(path: Path, flag: str = "--config") -> dict[str, Any]:
    """A user's training config: a YAML mapping whose every key something reads.

    Raises:
        UserError: not a readable YAML mapping, or an unknown key (named with the nearest known one).
    """
    what = f"{flag} {path}"
    config = read_mapping(Path(path), what, "fix the file")
    check_keys(config, training_schema(), what)
    return config


def load_config(
    mode: str, config_file: Path | None = None, overrides: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Defaults <- their `modes.<mode>` <- `config_file` <- its `modes.<mode>` <- command line.

    Raises:
        UserError: an unknown mode, a config file that is not a YAML mapping of known keys, or a
            value out of range (checked now, not after an hour of training).
    """
    layers = [_defaults()]
    if config_file is not None:
        layers.append(read_config_file(config_file))
    return merged_config(mode, layers, overrides)


def _defaults() -> dict[str, Any]:
    return read_mapping(DEFAULT_CONFIG, str(DEFAULT_CONFIG), "reinstall nlpctr")


def merged_config(
    mode: str, layers: list[Mapping[str, Any]], overrides: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Each layer and then its `modes.<mode>` over the ones before, then `overrides`; checked."""
    if mode not in MODES:
        raise UserError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    config: dict[str, Any] = {}
    for layer in layers:
        per_mode = layer.get("modes") or {}
        config = deep_merge(config, {k: v for k, v in layer.items() if k != "modes"})
        config = deep_merge(config, per_mode.get(mode) or {})
    config = deep_merge(config, overrides or {})
    if config.get("cascade_form") not in ("score", "vector"):
        raise UserError(f"cascade_form must be score or vector, got {config.get('cascade_form')!r}")
    try:  # fail on a misspelt key or a value out of range now, not after an hour of training
        net_config(config), loop_config(config, "loop"), loop_config(config, "lm_loop")
        encoder_config(config), recipe_config(config)
    except TypeError as exc:
        raise UserError(f"bad training config: {exc}") from None
    check_values(config)
    return config


def check_training_config(config: Mapping[str, Any], what: str) -> None:
    """Check a training config that is not read from a file (the experiment protocol's
    `train_config`) as `load_config` would, for every mode, before any run starts.

    Raises:
        UserError: an unknown key or a value out of range.
    """
    check_keys(config, training_schema(), what)
    for mode in MODES:
        merged_config(mode, [_defaults(), config])


def check_values(config: Mapping[str, Any]) -> None:
    """The settings no dataclass checks: the E2 head's width and the evaluation's sizes.

    Raises:
        UserError: naming the setting and the range it must be in.
    """
    counts = {"lm_head_hidden": config.get("lm_head_hidden")}
    evaluation = config.get("evaluation") or {}
    counts |= {f"evaluation.{k}": evaluation.get(k) for k in ("bootstrap_rounds", "calibration_bins")}
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{name} must be an integer >= 1, got {value!r}")
    seed = evaluation.get("bootstrap_seed")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UserError(f"evaluation.bootstrap_seed must be an integer >= 0, got {seed!r}")


def net_config(config: Mapping[str, Any]) -> NetConfig:
    net = dict(config["net"])
    hidden = net.get("hidden", NetConfig.hidden)
    return NetConfig(**{**net, "hidden": tuple(hidden) if isinstance(hidden, list | tuple) else hidden})


def loop_config(config: Mapping[str, Any], key: str = "loop") -> LoopConfig:
    return LoopConfig(**config[key])


def encoder_config(config: Mapping[str, Any]) -> EncoderConfig:
    return EncoderConfig(**config["encoder"])


def recipe_config(config: Mapping[str, Any]) -> RecipeConfig:
    return RecipeConfig.from_dict(config.get("recipe"))
