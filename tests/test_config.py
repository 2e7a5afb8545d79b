"""One source of training defaults: models/configs/default.yaml is the configuration, and the
dataclasses it feeds default to the same values (for code that builds them directly: E4's loops,
tests), so neither can drift from the other."""

from __future__ import annotations

import dataclasses

import yaml

from nlpctr.models.config import DEFAULT_CONFIG, encoder_config, load_config, loop_config, net_config
from nlpctr.models.ctr_net import NetConfig
from nlpctr.models.encoder import EncoderConfig
from nlpctr.models.recipe import ProbeConfig, RecipeConfig, Stage2Config
from nlpctr.models.trainer import LoopConfig

DEFAULTS = yaml.safe_load(DEFAULT_CONFIG.read_text())


def field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def test_the_yaml_loop_is_the_loop_config_default() -> None:
    assert set(DEFAULTS["loop"]) == field_names(LoopConfig)  # every knob listed, none unknown
    assert loop_config(DEFAULTS) == LoopConfig()


def test_the_lm_loop_differs_only_where_it_says_so() -> None:
    """The LM stage's loop (E2 and E3) lists its own values; what it leaves out is the loop default."""
    assert set(DEFAULTS["lm_loop"]) <= field_names(LoopConfig)
    lm_loop = loop_config(DEFAULTS, "lm_loop")
    unlisted = field_names(LoopConfig) - set(DEFAULTS["lm_loop"])
    assert all(getattr(lm_loop, name) == getattr(LoopConfig(), name) for name in unlisted)


def test_net_recipe_and_encoder_sections_match_their_dataclasses() -> None:
    assert set(DEFAULTS["net"]) == field_names(NetConfig)
    assert net_config(DEFAULTS) == NetConfig()
    assert RecipeConfig.from_dict(DEFAULTS["recipe"]) == RecipeConfig(
        probe=ProbeConfig(**DEFAULTS["recipe"]["probe"]), stage2=Stage2Config(**DEFAULTS["recipe"]["stage2"])
    )
    assert set(DEFAULTS["recipe"]) == field_names(RecipeConfig)
    assert set(DEFAULTS["recipe"]["stage2"]) == field_names(Stage2Config)
    assert set(DEFAULTS["recipe"]["probe"]) == field_names(ProbeConfig)
    assert set(DEFAULTS["encoder"]) == field_names(EncoderConfig)


def test_the_lm_stage_validates_every_quarter_epoch_on_cached_layers() -> None:
    config = load_config("joint")
    assert loop_config(config, "lm_loop").evals_per_epoch >= 4 and encoder_config(config).trainable_layers
