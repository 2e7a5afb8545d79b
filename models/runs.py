"""A trained run's files and the model rebuilt from them.

`Preprocessing` (how a frame becomes tensors) is saved with a run so new rows encode identically;
`build_model` / `build_scorer` construct the networks from a run's configuration; `TrainedRun`
rebuilds a trained CTR model from its folder alone (what `evaluate` and batch scoring use). No
Beam and no Feast here: frames in, tensors and models out.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NotRequired, TypedDict

import numpy as np
import pandas as pd
import torch

from nlpctr.atomic import write_json
from nlpctr.errors import UserError
from nlpctr.layout import RunLayout
from nlpctr.models.checkpoints import load_checkpoint
from nlpctr.models.config import Mode, TrainConfig
from nlpctr.models.ctr_net import CtrModel, InputShape, TextScorer
from nlpctr.models.data import (
    FeatureColumns,
    NumericStats,
    Tensors,
    Vocabularies,
    build_vocabularies,
    fit_numeric_stats,
    tensorize,
)
from nlpctr.models.device import CPU, Placement, seed_run
from nlpctr.models.encoder import TextEncoder
from nlpctr.models.prediction import predict
from nlpctr.models.text_batches import TextBatcher

STUDENTS = "_students"  # RUNS/_students/<key>/: E4's students (`pipelines/experiment/students.py`)


class PreprocessingRecord(TypedDict):
    """`Preprocessing` in run.json."""

    columns: dict[str, list[str]]  # FeatureColumns' fields
    vocabularies: Vocabularies
    fill_ctr: float
    cascade_dims: list[int]
    group: str
    numeric_stats: NotRequired[list[list[float]]]  # (mean, sd) per numeric column; older runs lack it


@dataclass
class Preprocessing:
    """How a frame becomes tensors; saved with a run so new rows encode identically (the
    vocabularies and the numeric features' training mean and sd among it)."""

    columns: FeatureColumns
    vocabularies: Vocabularies
    fill_ctr: float
    cascade_dims: tuple[int, ...]
    group: str
    numeric_stats: NumericStats = ()

    @classmethod
    def fit(cls, frame: pd.DataFrame, columns: FeatureColumns, group: str, fill_ctr: float) -> Preprocessing:
        """Vocabularies and numeric scaling from the frame's training rows; vector widths from its
        first non-null values."""
        dims = []
        for column in columns.cascade:
            present = frame[column].dropna()
            if present.empty:
                raise UserError(f"feature column {column} is null on every row; re-run the job behind it")
            dims.append(len(present.iloc[0]))
        vocabularies = build_vocabularies(frame, columns.categorical)
        numeric = fit_numeric_stats(frame, columns.numeric)
        return cls(columns, vocabularies, fill_ctr, tuple(dims), group, numeric)

    def tensorize(self, frame: pd.DataFrame) -> Tensors:
        tensors, _ = tensorize(
            frame,
            self.columns,
            self.group,
            self.vocabularies,
            self.fill_ctr,
            self.cascade_dims,
            self.numeric_stats,
        )
        return tensors

    @property
    def shape(self) -> InputShape:
        return InputShape(
            vocab_sizes=tuple(len(self.vocabularies[c]) + 1 for c in self.columns.categorical),
            dense_dim=len(self.columns.ctr)
            + len(self.columns.counts)
            + len(self.columns.numeric)
            + len(self.columns.scores),
            cascade_dims=self.cascade_dims,
        )

    def to_json(self) -> PreprocessingRecord:
        return {
            "columns": {k: list(v) for k, v in asdict(self.columns).items()},
            "vocabularies": self.vocabularies,
            "fill_ctr": self.fill_ctr,
            "cascade_dims": list(self.cascade_dims),
            "group": self.group,
            "numeric_stats": [list(pair) for pair in self.numeric_stats],
        }

    @classmethod
    def from_json(cls, data: PreprocessingRecord) -> Preprocessing:
        columns = FeatureColumns(**{k: tuple(v) for k, v in data["columns"].items()})
        # Runs saved before numeric features had none.
        numeric = tuple((float(m), float(sd)) for m, sd in data.get("numeric_stats", []))
        return cls(
            columns,
            data["vocabularies"],
            data["fill_ctr"],
            tuple(data["cascade_dims"]),
            data["group"],
            numeric,
        )


def build_model(pre: Preprocessing, config: TrainConfig, fusion: str | None, text_dim: int = 0) -> CtrModel:
    """The CTR network for these inputs, initialised from the run's seed."""
    seed_run(int(config.loop.seed))
    return CtrModel(pre.shape, config.net, fusion=fusion, text_dim=text_dim)


def build_scorer(config: TrainConfig, text_dim: int, base_rate: float | None = None) -> TextScorer:
    """E2's click head on the LM's pooled vector, its output bias at `base_rate`'s log-odds."""
    seed_run(int(config.lm_loop.seed))
    return TextScorer(text_dim, hidden=config.lm_head_hidden, base_rate=base_rate)


@dataclass
class TrainedRun:
    """A trained CTR model rebuilt from `runs/NAME/` (weights loaded with weights_only=True),
    on the device of the placement `load` is given, wherever it was trained."""

    directory: Path
    spec: dict[str, Any]  # its run.json
    config: TrainConfig  # its training configuration (run.json's `config`)
    pre: Preprocessing
    model: CtrModel
    lm: TextEncoder | None

    @classmethod
    def load(cls, directory: Path, placement: Placement = CPU) -> TrainedRun:
        """The run in `directory`, its weights loaded onto `placement`'s device.

        Args:
            directory: a run folder, `RUNS/NAME/`.
            placement: the device and precision to load onto (default: the CPU at fp32).

        Returns:
            The run: its run.json, configuration, preprocessing, model (in eval mode) and, for
            a joint run, its LM.

        Raises:
            UserError: not a finished run, or its checkpoint missing or damaged.
        """
        directory = Path(directory)
        path = RunLayout(directory).run
        if not path.is_file():
            raise UserError(
                f"{directory} is not a finished run (no {RunLayout.RUN}); train it with `nlpctr train`"
            )
        spec = json.loads(path.read_text())
        pre = Preprocessing.from_json(spec["preprocessing"])
        config = TrainConfig.from_dict(spec["config"])
        state = load_checkpoint(directory / spec["checkpoint"], placement.device)
        lm = None
        if spec["mode"] == Mode.JOINT:
            lm = TextEncoder(config.encoder, placement=placement)
            lm.load_state_dict(state["lm"])
        text_dim = TextBatcher(lm, _with_query(spec)).dim if lm is not None else 0
        model = build_model(pre, config, spec.get("fusion"), text_dim).to(placement.device)
        model.load_state_dict(state["model"])
        model.eval()
        return cls(directory, spec, config, pre, model, lm)

    def text_batcher(self, data: Tensors | None = None) -> TextBatcher:
        """How this run's LM reads pairs: for `data`'s pairs, or for streamed batches."""
        assert self.lm is not None
        with_query = _with_query(self.spec)
        if data is not None:
            return TextBatcher.for_data(self.lm, data, with_query)
        return TextBatcher(self.lm, with_query)

    def predict_frame(self, frame: pd.DataFrame) -> tuple[Tensors, np.ndarray]:
        """Click probabilities for every row of a frame (rows in impression_id order)."""
        data = self.pre.tensorize(frame)
        texts = self.text_batcher(data) if self.lm is not None else None
        rows = torch.arange(len(data.impression_id))
        return data, predict(self.model, data, rows, texts)


def _with_query(spec: Mapping[str, Any]) -> bool:
    """Whether a joint run's pair vectors have a query part (runs before the key: one width)."""
    return bool(spec.get("text_with_query", False))


@dataclass(frozen=True)
class StudentMeta:
    """RUNS/_students/<key>/student.json: what an E4 student is and where its best weights are,
    so that it can be rebuilt (`nlpctr export`) from its folder and its teacher's run."""

    key: str  # <method>_L<layers>
    method: str  # sukd | nokd | featurekd
    layers: int
    teacher: str  # the joint run in RUNS it was distilled from
    checkpoint: str  # the best weights, relative to the folder

    def write(self, folder: Path) -> Path:
        path = RunLayout(Path(folder)).student
        write_json(path, asdict(self))
        return path

    @classmethod
    def read(cls, folder: Path) -> StudentMeta:
        """The folder's student.json; a UserError naming the fix when it is missing or incomplete."""
        path = RunLayout(Path(folder)).student
        try:
            content = json.loads(path.read_text())
            return cls(**{k: content[k] for k in ("key", "method", "layers", "teacher", "checkpoint")})
        except (OSError, ValueError, KeyError, TypeError):
            raise UserError(
                f"{folder} has no complete {RunLayout.STUDENT} (students written before it existed lack it); "
                "re-run the experiment into its folder to train E4 again"
            ) from None
