"""Run configuration, model construction, run artifacts and offline metrics.

`pipelines/train.py` gets frames from Feast and calls these; `evaluate` and batch scoring
rebuild a trained model from its run folder alone (`TrainedRun.load`). No Beam and no Feast
here: this module takes pandas frames.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml
from torch import nn

from nlpctr.errors import UserError
from nlpctr.models import metrics
from nlpctr.models.ctr_net import CtrModel, InputShape, NetConfig
from nlpctr.models.data import FeatureColumns, Tensors, Vocabularies, build_vocabularies, tensorize
from nlpctr.models.encoder import EncoderConfig, TextEncoder
from nlpctr.models.joint import JointConfig
from nlpctr.models.trainer import LoopConfig, TextBatcher, TextScorer, pair_text, predict

MODES = ("baseline", "cascade-frozen", "cascade-finetuned", "joint")
DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "default.yaml"
RUN_FILE = "run.json"
RESULTS_FILE = "results.json"
PREDICTIONS_FILE = "predictions.parquet"
CHECKPOINTS = "checkpoints"


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
    try:  # fail on a misspelt key now, not after an hour of training
        net_config(config), loop_config(config, "loop"), loop_config(config, "lm_loop")
        encoder_config(config), joint_config(config)
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


def joint_config(config: Mapping[str, Any]) -> JointConfig:
    return JointConfig.from_dict(config.get("joint"))


# ------------------------------------------------------------------------------- inputs


@dataclass
class Preprocessing:
    """How a frame becomes tensors; saved with a run so new rows encode identically."""

    columns: FeatureColumns
    vocabularies: Vocabularies
    fill_ctr: float
    cascade_dims: tuple[int, ...]
    group: str

    @classmethod
    def fit(cls, frame: pd.DataFrame, columns: FeatureColumns, group: str, fill_ctr: float) -> Preprocessing:
        """Vocabularies from the frame's training rows; vector widths from its first non-null values."""
        dims = []
        for column in columns.cascade:
            present = frame[column].dropna()
            if present.empty:
                raise UserError(f"feature column {column} is null on every row; re-run the job behind it")
            dims.append(len(present.iloc[0]))
        return cls(columns, build_vocabularies(frame, columns.categorical), fill_ctr, tuple(dims), group)

    def tensorize(self, frame: pd.DataFrame) -> Tensors:
        tensors, _ = tensorize(
            frame, self.columns, self.group, self.vocabularies, self.fill_ctr, self.cascade_dims
        )
        return tensors

    @property
    def shape(self) -> InputShape:
        return InputShape(
            vocab_sizes=tuple(len(self.vocabularies[c]) + 1 for c in self.columns.categorical),
            dense_dim=len(self.columns.ctr) + len(self.columns.counts) + len(self.columns.scores),
            cascade_dims=self.cascade_dims,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "columns": {k: list(v) for k, v in asdict(self.columns).items()},
            "vocabularies": self.vocabularies,
            "fill_ctr": self.fill_ctr,
            "cascade_dims": list(self.cascade_dims),
            "group": self.group,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Preprocessing:
        columns = FeatureColumns(**{k: tuple(v) for k, v in data["columns"].items()})
        return cls(
            columns, data["vocabularies"], data["fill_ctr"], tuple(data["cascade_dims"]), data["group"]
        )


def build_model(
    pre: Preprocessing, config: Mapping[str, Any], fusion: str | None, text_dim: int = 0
) -> CtrModel:
    """The CTR network for these inputs, initialised from the run's seed."""
    torch.manual_seed(int(config["loop"]["seed"]))
    return CtrModel(pre.shape, net_config(config), fusion=fusion, text_dim=text_dim)


def build_scorer(config: Mapping[str, Any], text_dim: int) -> TextScorer:
    torch.manual_seed(int(config["lm_loop"]["seed"]))
    return TextScorer(text_dim, hidden=int(config["lm_head_hidden"]))


# ------------------------------------------------------------------------------- trained runs


@dataclass
class TrainedRun:
    """A trained CTR model rebuilt from `runs/NAME/` (weights loaded with weights_only=True)."""

    directory: Path
    spec: dict[str, Any]
    pre: Preprocessing
    model: CtrModel
    lm: TextEncoder | None

    @classmethod
    def load(cls, directory: Path) -> TrainedRun:
        directory = Path(directory)
        path = directory / RUN_FILE
        if not path.is_file():
            raise UserError(
                f"{directory} is not a finished run (no {RUN_FILE}); train it with `nlpctr train`"
            )
        spec = json.loads(path.read_text())
        pre = Preprocessing.from_json(spec["preprocessing"])
        state = torch.load(directory / spec["checkpoint"], weights_only=True)
        lm = None
        if spec["mode"] == "joint":
            lm = TextEncoder(encoder_config(spec["config"]))
            lm.load_state_dict(state["lm"])
        model = build_model(pre, spec["config"], spec.get("fusion"), lm.dim if lm else 0)
        model.load_state_dict(state["model"])
        model.eval()
        return cls(directory, spec, pre, model, lm)

    def predict_frame(self, frame: pd.DataFrame) -> tuple[Tensors, np.ndarray]:
        """Click probabilities for every row of a frame (rows in impression_id order)."""
        data = self.pre.tensorize(frame)
        texts = TextBatcher.for_data(self.lm, data) if self.lm is not None else None
        rows = torch.arange(len(data.impression_id))
        return data, predict(self.model, data, rows, texts)


# ------------------------------------------------------------------------------- LM outputs


def text_pairs(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (query_text_id, ad_text_id) pair the LM reads: its texts and earliest time.

    A missing query text is keyed by the empty id, the one Feast's online store is sent for it.
    """
    query_id = frame["query_text_id"] if "query_text_id" in frame else pd.Series(None, index=frame.index)
    query = frame["query_text"] if "query_text" in frame else pd.Series(None, index=frame.index)
    pairs = pd.DataFrame(
        {
            "query_text_id": query_id.fillna("").astype(str),
            "ad_text_id": frame["ad_text_id"].astype(str),
            "query_text": query.where(query.notna(), None),
            "ad_text": frame["ad_text"],
            "event_timestamp": frame["event_timestamp"],
        }
    )
    pairs = pairs.sort_values(["query_text_id", "ad_text_id", "event_timestamp"], kind="stable")
    first = pairs.groupby(["query_text_id", "ad_text_id"], sort=True, as_index=False).first()
    first["text"] = [pair_text(q, a) for q, a in zip(first["query_text"], first["ad_text"], strict=True)]
    return first


def lm_outputs(
    lm: TextEncoder, heads: Mapping[str, nn.Module], texts: list[str], batch_size: int = 64
) -> dict[str, np.ndarray]:
    """The LM's pooled vector of each text (`lm_embedding`) and each head applied to it."""
    lm.eval()
    vectors = lm.encode(texts, batch_size=batch_size)
    out: dict[str, np.ndarray] = {"lm_embedding": vectors}
    with torch.inference_mode():
        tensor = torch.as_tensor(vectors)
        for name, head in heads.items():
            head.eval()
            out[name] = head(tensor).squeeze(-1).numpy().astype(np.float32)
    return out


# ------------------------------------------------------------------------------- metrics


def metric_report(
    labels: metrics.Labels, predictions: np.ndarray, train_ctr: float, evaluation: Mapping[str, Any]
) -> dict[str, Any]:
    """AUC, GAUC, log loss, RIG (with group-bootstrap CIs) and calibration of one split."""
    draws = metrics.Draws.for_labels(
        labels, int(evaluation["bootstrap_rounds"]), int(evaluation["bootstrap_seed"])
    )
    result = metrics.resample(labels, predictions, draws)
    auc, rig, gauc = (metrics.Interval.of(*result.value(m, train_ctr)) for m in ("auc", "rig", "gauc"))
    bins = int(evaluation["calibration_bins"])
    return {
        "rows": len(predictions),
        "impressions": int(labels.impressions.sum()),
        "clicks": int(labels.clicks.sum()),
        "auc": auc.estimate,
        "auc_ci": auc.as_list(),
        "gauc": gauc.estimate,
        "gauc_ci": gauc.as_list(),
        "logloss": metrics.logloss(labels, predictions),
        "rig": rig.estimate,
        "rig_ci": rig.as_list(),
        "calibration": {
            "ratio": metrics.calibration_ratio(labels, predictions),
            "ece": metrics.ece(labels, predictions, bins),
            "curve": metrics.calibration_bins(labels, predictions, bins),
        },
    }


def paired_delta(
    labels: metrics.Labels,
    predictions: np.ndarray,
    baseline: np.ndarray,
    train_ctr: float,
    evaluation: Mapping[str, Any],
) -> dict[str, Any]:
    """ΔAUC, ΔRIG, ΔGAUC of a model over a baseline on the same rows, paired group bootstrap."""
    draws = metrics.Draws.for_labels(
        labels, int(evaluation["bootstrap_rounds"]), int(evaluation["bootstrap_seed"])
    )
    model, base = (metrics.resample(labels, p, draws) for p in (predictions, baseline))
    intervals = {}
    for metric in ("auc", "rig", "gauc"):
        (estimate, values), (base_estimate, base_values) = (r.value(metric, train_ctr) for r in (model, base))
        intervals[metric] = metrics.Interval.of(estimate - base_estimate, values - base_values)
    return delta_fields(intervals)


def delta_fields(intervals: Mapping[str, metrics.Interval]) -> dict[str, Any]:
    """`delta_<metric>`, `_ci`, `_significant` per interval; `significant` is the AUC's."""
    out: dict[str, Any] = {}
    for name, interval in intervals.items():
        out[f"delta_{name}"] = interval.estimate
        out[f"delta_{name}_ci"] = interval.as_list()
        out[f"delta_{name}_significant"] = interval.significant
    out["significant"] = intervals["auc"].significant
    return out


def delta_summary(baseline: str, delta: Mapping[str, Any]) -> str:
    """The `; ΔAUC vs RUN ...` clause of a one-line summary."""
    lo, hi = delta["delta_auc_ci"]
    return (
        f"; ΔAUC vs {baseline} {delta['delta_auc']:+.4f} [{lo:+.4f}, {hi:+.4f}]"
        f"{' (significant)' if delta['significant'] else ''}"
    )
