"""The on-disk layout of a prepared data folder DIR: every name the jobs write there, and the
files that describe it.

    DIR/manifest.json, impressions/, rejected/, ctr_history/<entity>/, ctr_history_rows/,
    embeddings/<slug>/, lm_features/<run>/epoch-<k>/, lm_cache/<prefix>/, feature_repo/,
    training/<service>/<split>/, scored/<run>/, enriched/<service>/

Metadata files start with "_" so that parquet readers skip them. Its records: `Manifest`,
`EmbeddingsManifest`, `LmFeatureMeta`, `RunLayout`. Imports nothing from nlpctr but its errors,
atomic writer and compat shims, so every layer can use it. Which job writes each:
docs/DESIGN.md, "Modules in detail", layout.py.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import ClassVar

from nlpctr.atomic import JsonObject, write_json
from nlpctr.compat import lm_meta_checkpoints
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


def read_manifest(data_dir: Path) -> JsonObject:
    """DIR/manifest.json as parsed, or a UserError naming the command that writes it (the parse
    edge of `Manifest.read`).

    Args:
        data_dir: a prepared data folder.

    Returns:
        The manifest's JSON object (counts, split, spec hash, code version, ...).

    Raises:
        UserError: DIR has no manifest.json.
    """
    path = Path(data_dir).resolve() / MANIFEST
    if not path.is_file():
        fix = f"nlpctr data prepare --dataset NAME --out {path.parent}"
        raise UserError(f"{path.parent} has no {MANIFEST}; run `{fix}`")
    return json.loads(path.read_text())


def check_splits(manifest: Manifest, data_dir: Path) -> None:
    """Refuse a data folder with an empty split (its manifest's row counts): a run trains on one,
    chooses its checkpoint on another and is tested on the third, so a metric on nothing would
    end it half-built.

    Raises:
        UserError: naming the empty splits and the fix.
    """
    rows = manifest.split.rows
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
    def of_manifest(cls, manifest: Manifest) -> DatasetIdentity:
        return cls(manifest.dataset, manifest.spec_hash)

    @classmethod
    def of_run(cls, run_dir: Path, spec: JsonObject) -> DatasetIdentity:
        """A run's, from its run.json (`spec`); runs older than run.json's `dataset` key give
        their results.json's name, and None where neither says."""
        if "dataset" in spec:
            return cls(str(spec["dataset"]), spec.get("spec_hash"))
        try:
            return cls(str(json.loads(RunLayout(run_dir).results.read_text())["dataset"]))
        except (OSError, ValueError, KeyError, TypeError):
            return cls(None)

    def to_json(self) -> JsonObject:
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


def write_manifest(folder: Path, manifest: JsonObject) -> Path:
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


@dataclass(frozen=True)
class SplitRecord:
    """The manifest's `split`: how the rows were split and the counts per split."""

    mode: str = ""  # within_group | cold_group | time
    seed: int = 0
    fractions: tuple[float, ...] = ()
    group: str | None = None
    rows: Mapping[str, int] = field(default_factory=dict)
    impressions: Mapping[str, int] = field(default_factory=dict)
    clicks: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Manifest:
    """DIR/manifest.json, written by `nlpctr data prepare`: the dataset, its columns, the counts
    (rows_in == rows_written + rows_rejected), the split, the spec and the code that wrote it.
    A key an older or hand-made manifest lacks reads as its default."""

    dataset: str = ""
    description: str = ""
    spec_path: str = ""
    spec_hash: str | None = None
    spec: JsonObject = field(default_factory=dict)  # the dataset spec as its YAML holds it
    source: str = ""
    source_layout: str = "path"
    rows_in: int = 0
    rows_written: int = 0
    rows_rejected: int = 0
    rejected_by_reason: Mapping[str, int] = field(default_factory=dict)
    rows_truncated: Mapping[str, int] = field(default_factory=dict)
    id_hash_collisions: Mapping[str, int] = field(default_factory=dict)  # per id column
    source_stats: Mapping[str, int] = field(default_factory=dict)
    split: SplitRecord = field(default_factory=SplitRecord)
    context_columns: tuple[str, ...] = ()
    numeric_columns: tuple[str, ...] = ()  # served by the `numeric` feature view
    entities: tuple[str, ...] = ()
    group: str | None = None
    label_form: str | None = None
    limits: Mapping[str, int | bool] = field(default_factory=dict)  # max_text_chars, truncate_long_text
    code_version: str = ""
    wall_seconds: float = 0.0
    max_reject_rate: float | None = None

    def spec_column(self, target: str) -> str | None:
        """The source column the spec maps onto a canonical column (`query_id`, ...), if any."""
        return (self.spec.get("columns") or {}).get(target)

    @property
    def aggregated(self) -> bool:
        """Rows that carry impression and click counts (Upworthy), not one impression each."""
        return (self.label_form or (self.spec.get("label") or {}).get("form")) == "aggregated"

    def to_json(self) -> JsonObject:
        """The file's content: every field (written with sorted keys by `write_manifest`)."""
        content = {f.name: getattr(self, f.name) for f in fields(self)}
        content["split"] = {f.name: getattr(self.split, f.name) for f in fields(self.split)}
        # Tuples and mappings as the lists and objects JSON holds (what the file always held).
        return json.loads(json.dumps(content))

    def write(self, folder: Path) -> Path:
        """Write FOLDER/manifest.json (`write_manifest`); returns its path."""
        return write_manifest(folder, self.to_json())

    @classmethod
    def from_json(cls, content: JsonObject) -> Manifest:
        """The record of a parsed manifest; unknown keys are ignored, missing ones default."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in content.items() if k in known}
        split_known = {f.name for f in fields(SplitRecord)}
        split = {k: v for k, v in (content.get("split") or {}).items() if k in split_known}
        for name in ("context_columns", "numeric_columns", "entities"):
            values[name] = tuple(values.get(name) or ())
        values["split"] = SplitRecord(**{**split, "fractions": tuple(split.get("fractions") or ())})
        return cls(**values)

    @classmethod
    def read(cls, data_dir: Path) -> Manifest:
        """DIR/manifest.json (`read_manifest`) as a record.

        Args:
            data_dir: a prepared data folder.

        Returns:
            The manifest.

        Raises:
            UserError: DIR has no manifest.json.
        """
        return cls.from_json(read_manifest(data_dir))

    @classmethod
    def find(cls, data_dir: Path) -> Manifest | None:
        """DIR's manifest, or None where it has none that reads as one (a rebuild hint, a model
        card: what they say without it is still true)."""
        try:
            return cls.read(data_dir)
        except (UserError, OSError, ValueError, TypeError, AttributeError):
            return None


@dataclass(frozen=True)
class EmbeddingsManifest:
    """DIR/embeddings/<slug>/_manifest.json, written by `nlpctr embed`: the encoder that wrote the
    vectors (its version, slug, width and fields), the row count and what the run reused. Older
    folders record fewer keys: those read as None."""

    encoder_version: str | None = None
    slug: str | None = None
    dim: int | None = None
    rows: int | None = None
    encoder: JsonObject | None = None  # EncoderConfig's fields (what rebuilds the encoder)
    content: JsonObject = field(default_factory=dict, repr=False, compare=False)  # as written

    @classmethod
    def read(cls, folder: Path) -> EmbeddingsManifest | None:
        """FOLDER/_manifest.json, or None when it is missing, unreadable or not a JSON object (the
        callers each say what that means for them).

        Args:
            folder: an embeddings folder, DIR/embeddings/<slug>.

        Returns:
            The record; its `dim` and `rows` None unless they are integers.
        """
        try:
            content = json.loads((Path(folder) / EMBEDDINGS_MANIFEST).read_text())
        except (OSError, UnicodeDecodeError, ValueError):
            return None
        if not isinstance(content, dict):
            return None

        def integer(key: str) -> int | None:
            value = content.get(key)
            return value if isinstance(value, int) and not isinstance(value, bool) else None

        version, slug, encoder = content.get("encoder_version"), content.get("slug"), content.get("encoder")
        return cls(
            encoder_version=None if version is None else str(version),
            slug=None if slug is None else str(slug),
            dim=integer("dim"),
            rows=integer("rows"),
            encoder=encoder if isinstance(encoder, dict) else None,
            content=content,
        )


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

    def to_json(self) -> JsonObject:
        """The file's content: the fields, with the optional ones only when set."""
        content: JsonObject = {
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
            checkpoints=lm_meta_checkpoints(content),
            keys=tuple(content["keys"]),
            model_version=str(content["model_version"]),
            valid_auc=content.get("valid_auc"),
            fusion=content.get("fusion"),
        )
