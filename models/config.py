"""Training configuration: `models/configs/default.yaml`, its per-mode sections, `--config` and
command-line overrides merged into one dict, and the typed configs read from it.

The YAML is the configuration; the dataclasses it feeds (`LoopConfig`, `EncoderConfig`,
`RecipeConfig`) keep defaults equal to it for callers that build them directly (distillation, tests),
and `tests/test_joint.py::test_defaults_live_in_one_place` keeps the two from drifting.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from nlpctr.errors import UserError
from nlpctr.models.ctr_net import NetConfig
from nlpctr.models.encoder import EncoderConfig
from nlpctr.models.recipe import RecipeConfig
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


def load_config(
    mode: str, config_file: Path | None = None, overrides: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Defaults <- their `modes.<mode>` <- `config_file` <- its `modes.<mode>` <- command line."""
    if mode not in MODES:
        raise UserError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    layers = [yaml.safe_load(DEFAULT_CONFIG.read_text())]
    if config_file is not None:
        if not Path(config_file).is_file():
            raise UserError(f"--config {config_file} does not exist")
        layers.append(yaml.safe_load(Path(config_file).read_text()) or {})
    config: dict[str, Any] = {}
    for layer in layers:
        per_mode = layer.get("modes") or {}
        config = deep_merge(config, {k: v for k, v in layer.items() if k != "modes"})
        config = deep_merge(config, per_mode.get(mode) or {})
    config = deep_merge(config, overrides or {})
    if config.get("cascade_form") not in ("score", "vector"):
        raise UserError(f"cascade_form must be score or vector, got {config.get('cascade_form')!r}")
    try:  # fail on a misspelt key now, not after an hour of training
        net_config(config), loop_config(config, "loop"), loop_config(config, "lm_loop")
        encoder_config(config), recipe_config(config)
    except TypeError as exc:
        raise UserError(f"bad training config: {exc}") from None
    return config


def net_config(config: Mapping[str, Any]) -> NetConfig:
    net = dict(config["net"])
    return NetConfig(**{**net, "hidden": tuple(net.get("hidden", NetConfig.hidden))})


def loop_config(config: Mapping[str, Any], key: str = "loop") -> LoopConfig:
    return LoopConfig(**config[key])


def encoder_config(config: Mapping[str, Any]) -> EncoderConfig:
    return EncoderConfig(**config["encoder"])


def recipe_config(config: Mapping[str, Any]) -> RecipeConfig:
    return RecipeConfig.from_dict(config.get("recipe"))
