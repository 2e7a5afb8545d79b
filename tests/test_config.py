"""The training configuration: a frozen `TrainConfig` whose dataclass defaults are the defaults,
with default.yaml, `--config` and the flags merged over them as overrides."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from nlpctr.errors import UserError
from nlpctr.models.config import DEFAULT_CONFIG, TrainConfig, load_config, training_schema
from nlpctr.models.evaluation import EvaluationConfig
from nlpctr.models.trainer import LoopConfig

DEFAULTS = yaml.safe_load(DEFAULT_CONFIG.read_text())


def test_load_config_is_typed_and_round_trips_through_a_runs_json() -> None:
    config = load_config("joint")
    assert isinstance(config, TrainConfig) and isinstance(config.lm_loop, LoopConfig)
    assert TrainConfig.from_dict(config.to_dict()) == config
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.cascade_form = "vector"  # type: ignore[misc]
    assert "device" not in config.identity() and "device" in config.to_dict()


def test_what_a_layer_leaves_out_is_the_dataclass_default() -> None:
    """default.yaml's lm_loop lists some keys; the rest are LoopConfig's, and an empty mapping is
    every default."""
    unlisted = {f.name for f in dataclasses.fields(LoopConfig)} - set(DEFAULTS["lm_loop"])
    assert unlisted  # (the YAML leaves some out)
    lm_loop = load_config("joint").lm_loop
    assert all(getattr(lm_loop, name) == getattr(LoopConfig(), name) for name in unlisted)
    assert TrainConfig.from_dict({}) == TrainConfig()
    assert TrainConfig.from_dict({"loop": {"epochs": 2}}).loop == LoopConfig(epochs=2)


def test_every_typed_field_is_a_known_key() -> None:
    schema = training_schema()
    for section, cls in (("loop", LoopConfig), ("lm_loop", LoopConfig), ("evaluation", EvaluationConfig)):
        assert set(schema[section]) >= {f.name for f in dataclasses.fields(cls)}
    assert set(schema) >= {f.name for f in dataclasses.fields(TrainConfig)}


def test_bad_values_are_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    for section, message in (
        ({"evaluation": {"bootstrap_rounds": True}}, "evaluation.bootstrap_rounds must be an integer >= 1"),
        ({"evaluation": {"bootstrap_seed": -1}}, "evaluation.bootstrap_seed must be an integer >= 0"),
        ({"lm_head_hidden": 0}, "lm_head_hidden must be an integer >= 1"),
        ({"cascade_form": "both"}, "cascade_form must be score or vector"),
    ):
        bad.write_text(yaml.safe_dump(section))
        with pytest.raises(UserError, match=message):
            load_config("baseline", bad)


def test_the_lm_stage_validates_every_quarter_epoch_on_cached_layers() -> None:
    config = load_config("joint")
    assert config.lm_loop.evals_per_epoch >= 4 and config.encoder.trainable_layers
