"""The on-disk layout of a prepared data folder DIR: every name the jobs write there, and the
files that describe it.

    DIR/manifest.json, impressions/, rejected/, ctr_history/<entity>/, ctr_history_rows/,
    embeddings/<slug>/, lm_features/<run>/epoch-<k>/, lm_cache/<prefix>/, feature_repo/,
    training/<service>/<split>/, scored/<run>/, enriched/<service>/

Metadata files start with "_" so that parquet readers skip them. Imports nothing from nlpctr
but its errors, so every layer can use it. Which job writes each: docs/DESIGN.md, "Modules in
detail", layout.py.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from nlpctr.atomic import write_json
from nlpctr.errors import UserError

MANIFEST = "manifest.json"
IMPRESSIONS = "impressions"
REJECTED = "rejected"
CTR_HISTORY = "ctr_history"
CTR_HISTORY_ROWS = "ctr_history_rows"
CTR_META = "_meta.json"  # in CTR_HISTORY: entities, prior, global CTR, snapshot time
EMBEDDINGS = "embeddings"
EMBEDDINGS_MANIFEST = "_manifest.json"  # in EMBEDDINGS/<slug>: encoder version, slug, dim, rows
LM_FEATURES = "lm_features"
LM_META = "_meta.json"  # in LM_FEATURES/<run>: LmFeatureMeta
LM_CACHE = "lm_cache"  # its folders: <encoder slug>-frozen<k>-<dtype>-<device>-<weights sha1>
FEATURE_REPO = "feature_repo"
TRAINING = "training"
TRAINING_META = "_meta.json"  # in TRAINING/<service>: what the shards were joined from
SCORED = "scored"
ENRICHED = "enriched"

EXPERIMENT_RESULTS = "results.json"  # `nlpctr experiment`'s OUT/results.json (and each rho's)

_SPLITS = ("train", "valid", "test")  # models.schema.SPLITS (layout imports nothing from models)

QUERY_TEXT_ID = "query_text_id"
AD_TEXT_ID = "ad_text_id"


def pair_key_columns(with_query: bool = True) -> list[str]:
    """The key of a text pair's LM features: (query_text_id, ad_text_id), or ad_text_id alone
    for a dataset without query text (a fresh list: callers may extend it)."""
    return [QUERY_TEXT_ID, AD_TEXT_ID] if with_query else [AD_TEXT_ID]


def embeddings_dir(data_dir: Path, slug: str) -> Path:
    """DIR/embeddings/<slug>: where one encoder's embeddings of the dataset live."""
    return Path(data_dir) / EMBEDDINGS / slug


def lm_features_dir(data_dir: Path, run: str) -> Path:
    """DIR/lm_features/<run>: one training run's LM features (`run` already a safe slug)."""
    return Path(data_dir) / LM_FEATURES / run


def lm_cache_dir(data_dir: Path) -> Path:
    """DIR/lm_cache: the frozen-prefix states of DIR's texts, one folder per encoder prefix."""
    return Path(data_dir) / LM_CACHE


def require_writable(folder: Path, purpose: str) -> None:
    """Refuse, before any work, a folder a command must write into that cannot be written: it (or
    the nearest folder above it that exists) is on a read-only filesystem or not the user's.

    Args:
        folder: where the command writes.
        purpose: what it writes there and the other way, if any, e.g. "`train --streaming` writes
            its training shards there; make it writable, or pass --in-memory".

    Raises:
        UserError: naming the folder and `purpose`.
    """
    existing = Path(folder)
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{folder} is not writable (a read-only filesystem, or not yours): {purpose}")


# ------------------------------------------------------------------------------- a run folder


@dataclass(frozen=True)
class RunLayout:
    """The files of a training run's folder RUNS/NAME/ (`nlpctr train`; a student of E4 in
    RUNS/_students/KEY/ holds its `student` file and checkpoints).

        config.json          what makes two runs of a name the same run (written first)
        run.json             what `evaluate`, batch scoring and export rebuild the model from
        results.json         the run's metrics and provenance
        predictions.parquet  test and validation predictions
        checkpoints/<part>/  the weights (models/checkpoints.py)
        student.json         a student's `StudentMeta`
    """

    root: Path

    CONFIG: ClassVar[str] = "config.json"
    RUN: ClassVar[str] = "run.json"
    RESULTS: ClassVar[str] = "results.json"
    PREDICTIONS: ClassVar[str] = "predictions.parquet"
    CHECKPOINTS: ClassVar[str] = "checkpoints"
    STUDENT: ClassVar[str] = "student.json"

    @property
    def config(self) -> Path:
        return self.root / self.CONFIG

    @property
    def run(self) -> Path:
        return self.root / self.RUN

    @property
    def results(self) -> Path:
        return self.root / self.RESULTS

    @property
    def predictions(self) -> Path:
        return self.root / self.PREDICTIONS

    @property
    def student(self) -> Path:
        return self.root / self.STUDENT

    def checkpoints(self, part: str = "") -> Path:
        """RUN/checkpoints/<part>/ (`ctr`, `lm`; the folder itself without a part)."""
        folder = self.root / self.CHECKPOINTS
        return folder / part if part else folder


# ------------------------------------------------------------------------------- manifest


def read_manifest(data_dir: Path) -> dict[str, Any]:
    """DIR/manifest.json, or a UserError naming the command that writes it.

    Args:
        data_dir: a prepared data folder.

    Returns:
        The manifest as a dict (counts, split, spec hash, code version, ...).

    Raises:
        UserError: DIR has no manifest.json.
    """
    path = Path(data_dir).resolve() / MANIFEST
    if not path.is_file():
        fix = f"nlpctr data prepare --dataset NAME --out {path.parent}"
        raise UserError(f"{path.parent} has no {MANIFEST}; run `{fix}`")
    return json.loads(path.read_text())


def check_splits(manifest: Mapping[str, Any], data_dir: Path) -> None:
    """Refuse a data folder with an empty split (its manifest's row counts): a run trains on one,
    chooses its checkpoint on another and is tested on the third, so a metric on nothing would
    end it half-built.

    Raises:
        UserError: naming the empty splits and the fix.
    """
    rows = (manifest.get("split") or {}).get("rows") or {}
    empty = [split for split in _SPLITS if split in rows and not rows[split]]
    if empty:
        counts = ", ".join(f"{split} {int(rows.get(split, 0)):,}" for split in _SPLITS)
        raise UserError(
            f"{data_dir} has no {' or '.join(empty)} rows ({counts}): a run trains on the train split, "
            "chooses its checkpoint on valid and is tested on test; prepare a longer log into it (or "
            "give the empty split a larger share in the spec's split.fractions)"
        )


@dataclass(frozen=True)
class DatasetIdentity:
    """Which dataset a prepared folder holds (its manifest's), or a run was trained on (its
    run.json's): the spec's name and hash. The name alone is not enough: `data simulate` names
    every spec after its file's stem, so two simulated logs are both `log`."""

    dataset: str | None
    spec_hash: str | None = None  # None: a run written before run.json recorded it

    @classmethod
    def of_manifest(cls, manifest: Mapping[str, Any]) -> DatasetIdentity:
        return cls(manifest.get("dataset"), manifest.get("spec_hash"))

    @classmethod
    def of_run(cls, run_dir: Path, spec: Mapping[str, Any]) -> DatasetIdentity:
        """A run's, from its run.json (`spec`); runs older than run.json's `dataset` key give
        their results.json's name, and None where neither says."""
        if "dataset" in spec:
            return cls(str(spec["dataset"]), spec.get("spec_hash"))
        try:
            return cls(str(json.loads(RunLayout(run_dir).results.read_text())["dataset"]))
        except (OSError, ValueError, KeyError, TypeError):
            return cls(None)

    def to_json(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "spec_hash": self.spec_hash}

    def admits(self, data: DatasetIdentity) -> bool:
        """Whether a run trained on this dataset applies to a folder holding `data`: the same
        name, and the same spec hash where the run recorded one (older runs: the name only)."""
        return self.dataset == data.dataset and self.spec_hash in (None, data.spec_hash)

    def describe(self, where: object = None) -> str:
        """The name, with the spec hash where one is known (two of one name told apart) and
        `where` it is, when given."""
        detail = ", ".join(str(d) for d in (self.spec_hash and f"spec {self.spec_hash}", where) if d)
        return f"{self.dataset!r}" + (f" ({detail})" if detail else "")


def write_manifest(folder: Path, manifest: Mapping[str, Any]) -> Path:
    """Write `manifest` as FOLDER/manifest.json (sorted keys: runs diff cleanly); returns its path.

    Args:
        folder: the folder to write into (a job's staging folder).
        manifest: the manifest's content (JSON-serialisable).

    Returns:
        The path of the manifest.json written.
    """
    path = Path(folder) / MANIFEST
    write_json(path, manifest)
    return path


# ------------------------------------------------------------------------------- LM features


@dataclass(frozen=True)
class LmFeatureMeta:
    """DIR/lm_features/<run>/_meta.json: which checkpoint folder (`step-<k>`) of a trained LM's
    output the feature store serves, and how that output is keyed. Written by `nlpctr train` (E2, E3)."""

    run: str  # the run as a safe identifier (the folder's name)
    kind: str  # cascade_finetuned | joint
    chosen: str  # the served checkpoint folder, e.g. "step-120"
    checkpoints: tuple[str, ...]  # every checkpoint folder written
    keys: tuple[str, ...]  # pair_key_columns(): query_text_id?, ad_text_id
    model_version: str
    valid_auc: Mapping[str, float] | None = None  # E2: validation AUC per checkpoint folder
    fusion: str | None = None  # E3: how the LM joins the CTR tower (score | concat | gate)

    def __post_init__(self) -> None:
        # Lists from JSON or a caller become tuples, so a read-back record equals the one written.
        object.__setattr__(self, "checkpoints", tuple(self.checkpoints))
        object.__setattr__(self, "keys", tuple(self.keys))

    def to_json(self) -> dict[str, Any]:
        """The file's content: the fields, with the optional ones only when set."""
        content: dict[str, Any] = {
            "run": self.run,
            "kind": self.kind,
            "chosen": self.chosen,
            "checkpoints": list(self.checkpoints),
            "keys": list(self.keys),
            "model_version": self.model_version,
        }
        # The optional fields are left out, not written as null: the files the trainer wrote
        # before this class existed carry only the one their kind has.
        if self.valid_auc is not None:
            content["valid_auc"] = dict(self.valid_auc)
        if self.fusion is not None:
            content["fusion"] = self.fusion
        return content

    def write(self, folder: Path) -> Path:
        """Write FOLDER/_meta.json (the run's folder, above its checkpoint folders); returns its path."""
        path = Path(folder) / LM_META
        write_json(path, self.to_json())
        return path

    @staticmethod
    def exists(folder: Path) -> bool:
        """Whether FOLDER holds a run's _meta.json (a run whose training finished)."""
        return (Path(folder) / LM_META).is_file()

    @classmethod
    def read(cls, folder: Path) -> LmFeatureMeta:
        """FOLDER/_meta.json; a UserError naming the folder when it is not a complete record.

        Args:
            folder: an LM feature folder, `DIR/lm_features/<run>/`.

        Returns:
            The record: the run, its kind, chosen checkpoint, checkpoints, keys, model version,
            validation AUC and fusion.

        Raises:
            UserError: _meta.json is missing keys, or is not JSON.
            OSError: _meta.json is missing or unreadable (callers check `exists` first).
        """
        path = Path(folder) / LM_META
        try:
            content = json.loads(path.read_text())
        except ValueError:
            content = None
        required = ("kind", "chosen", "keys", "model_version")
        if not isinstance(content, dict) or any(k not in content for k in required):
            raise UserError(f"{path} is not a complete LM feature record; re-run its training")
        return cls(
            run=str(content.get("run", Path(folder).name)),
            kind=str(content["kind"]),
            chosen=str(content["chosen"]),
            # (`epochs`: the folders' name before E2 checkpointed within epochs)
            checkpoints=tuple(content.get("checkpoints", content.get("epochs", [content["chosen"]]))),
            keys=tuple(content["keys"]),
            model_version=str(content["model_version"]),
            valid_auc=content.get("valid_auc"),
            fusion=content.get("fusion"),
        )
