"""What the batch jobs wrote under a prepared dataset folder (`JobOutputs`), read from files and
schemas only: the inputs the Feast definitions are built from."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from nlpctr.errors import UserError
from nlpctr.features.names import (
    CTR_ROWS_VIEW,
    EMBEDDING,
    ENCODER_VERSION,
    IMPRESSION_ID,
    LM_KINDS,
    NUMERIC_VIEW,
    SAFE_NAME,
    TEXT_ID,
    TEXT_ROLES,
    TIMESTAMP,
    ctr_view_name,
    embedding_view_name,
    lm_feature_slug,
    lm_view_name,
)
from nlpctr.layout import (
    CTR_HISTORY,
    CTR_HISTORY_ROWS,
    EMBEDDINGS,
    IMPRESSIONS,
    LM_FEATURES,
    LmFeatureMeta,
    Manifest,
)
from nlpctr.prepared import parquet_files


def fingerprint(path: Path) -> str:
    """Identity of a parquet folder's current contents (names, sizes, mtimes), cheap to take."""
    digest = hashlib.sha1()
    for file in parquet_files(path):
        stat = file.stat()
        digest.update(f"{file.relative_to(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class CtrSet:
    """One entity-level CTR history folder."""

    entity: str
    path: Path
    features: tuple[tuple[str, pa.DataType], ...]


@dataclass(frozen=True)
class EmbeddingSet:
    """One encoder's embeddings folder (one row per unique text)."""

    slug: str
    path: Path
    encoder_version: str
    dim: int


@dataclass(frozen=True)
class LmFeatureSet:
    """One trained LM's output per text pair, for the checkpoint the run chose."""

    run: str  # safe identifier (lm_feature_slug)
    kind: str  # cascade_finetuned | joint
    path: Path  # DIR/lm_features/<run>/epoch-<k>
    keys: tuple[str, ...]  # query_text_id?, ad_text_id
    model_version: str
    features: tuple[tuple[str, pa.DataType], ...]


@dataclass(frozen=True)
class JobOutputs:
    """What the jobs wrote under a prepared dataset folder, read from files and schemas only."""

    data_dir: Path
    dataset: str
    entities: tuple[str, ...]
    ctr: tuple[CtrSet, ...]
    ctr_rows: Path | None
    ctr_rows_features: tuple[tuple[str, pa.DataType], ...]
    embeddings: tuple[EmbeddingSet, ...]
    text_roles: tuple[str, ...]
    lm_features: tuple[LmFeatureSet, ...] = ()
    # The spec's numeric features: (name, arrow type) of impression columns (`data prepare`).
    numeric: tuple[tuple[str, pa.DataType], ...] = ()

    @property
    def impressions(self) -> Path:
        """DIR/impressions, the source of the numeric view."""
        return self.data_dir / IMPRESSIONS

    @classmethod
    def discover(cls, data_dir: Path) -> JobOutputs:
        """Read DIR's manifest and the outputs of the CTR and embedding jobs."""
        data_dir = Path(data_dir).resolve()
        manifest = Manifest.read(data_dir)
        entities = tuple(dict.fromkeys(manifest.entities))
        ctr = []
        for entity in entities:
            path = data_dir / CTR_HISTORY / entity
            if parquet_files(path):
                ctr.append(CtrSet(entity, path, feature_columns(path, exclude={entity, TIMESTAMP})))
        rows_path = data_dir / CTR_HISTORY_ROWS
        ctr_rows = rows_path if parquet_files(rows_path) else None
        rows_features = feature_columns(rows_path, exclude={IMPRESSION_ID, TIMESTAMP}) if ctr_rows else ()
        embeddings = []
        root = data_dir / EMBEDDINGS
        for path in sorted(root.iterdir()) if root.is_dir() else []:
            # Dot and underscore names are a job's staging folders or metadata, never inputs.
            if path.name.startswith((".", "_")) or not parquet_files(path):
                continue
            embeddings.append(_embedding_set(path))
        return cls(
            data_dir=data_dir,
            dataset=manifest.dataset or data_dir.name,
            entities=entities,
            ctr=tuple(ctr),
            ctr_rows=ctr_rows,
            ctr_rows_features=rows_features,
            embeddings=tuple(embeddings),
            text_roles=_text_roles(data_dir),
            lm_features=_lm_feature_sets(data_dir / LM_FEATURES),
            numeric=_numeric_columns(data_dir, manifest.numeric_columns),
        )

    def sources(self) -> dict[str, Path]:
        """Every input folder that backs a view, by view name."""
        out = {ctr_view_name(c.entity): c.path for c in self.ctr}
        if self.ctr_rows is not None:
            out[CTR_ROWS_VIEW] = self.ctr_rows
        out.update({embedding_view_name(e.slug): e.path for e in self.embeddings})
        out.update({lm_view_name(f.run): f.path for f in self.lm_features})
        if self.numeric:
            out[NUMERIC_VIEW] = self.impressions
        return out

    def check_unique_keys(self) -> None:
        """Refuse sources with two rows for one key at one event time.

        Feast's file store breaks such ties by two unstable sorts (feast-dev/feast#3360): with
        3+ rows per key it returns an arbitrary one offline and, with pull_latest_features,
        online too; a created-timestamp column does not help. Our jobs write one row per key,
        so a tie means a stray or appended file, and the fix is to re-run the job.
        """
        keyed: list[tuple[Path, tuple[str, ...]]] = [(c.path, (c.entity,)) for c in self.ctr]
        keyed += [(e.path, (TEXT_ID,)) for e in self.embeddings]
        keyed += [(f.path, f.keys) for f in self.lm_features]
        if self.ctr_rows is not None:
            keyed.append((self.ctr_rows, (IMPRESSION_ID,)))
        if self.numeric:
            keyed.append((self.impressions, (IMPRESSION_ID,)))
        for path, keys in keyed:
            table = ds.dataset(parquet_files(path), format="parquet").to_table(columns=[*keys, TIMESTAMP])
            counts = table.group_by([*keys, TIMESTAMP]).aggregate([([], "count_all")])
            dupes = counts.filter(pc.greater(counts["count_all"], 1))
            if dupes.num_rows:
                example = dupes.slice(0, 1).to_pylist()[0]
                key = ", ".join(keys)
                value = tuple(example[k] for k in keys)
                raise UserError(
                    f"{path.relative_to(self.data_dir)} has {dupes.num_rows} {key} value(s) with "
                    f"several rows at one {TIMESTAMP} (e.g. {value!r}: {example['count_all']} rows); "
                    "Feast's file store picks one arbitrarily (feast-dev/feast#3360). Keep one row per "
                    "key and time: re-run the job that wrote it into a clean folder"
                )


def feature_columns(path: Path, exclude: set[str]) -> tuple[tuple[str, pa.DataType], ...]:
    """(name, arrow type) of a parquet folder's columns, less `exclude` (its keys and time)."""
    schema = ds.dataset(parquet_files(path), format="parquet").schema
    return tuple((f.name, f.type) for f in schema if f.name not in exclude)


def _embedding_set(path: Path) -> EmbeddingSet:
    slug = path.name
    if not SAFE_NAME.match(slug):
        raise UserError(f"embedding folder name {slug!r} is not a safe identifier ([a-z][a-z0-9_]*)")
    dataset = ds.dataset(parquet_files(path), format="parquet")
    missing = {TEXT_ID, EMBEDDING, ENCODER_VERSION, TIMESTAMP} - set(dataset.schema.names)
    if missing:
        raise UserError(f"{path} lacks column(s) {', '.join(sorted(missing))}; re-run `nlpctr embed`")
    versions = pc.unique(dataset.to_table(columns=[ENCODER_VERSION])[ENCODER_VERSION]).to_pylist()
    # A view must never mix two encoders: one folder, one encoder_version.
    if len(versions) != 1 or versions[0] is None:
        raise UserError(
            f"{path} mixes encoder versions {sorted(map(str, versions))}; each encoder writes its own "
            "folder: remove the stray files or re-run `nlpctr embed` into a clean folder"
        )
    first = dataset.head(1, columns=[EMBEDDING])[EMBEDDING]
    dim = len(first[0].as_py() or []) if len(first) else 0
    return EmbeddingSet(slug=slug, path=path, encoder_version=str(versions[0]), dim=dim)


def _lm_feature_sets(root: Path) -> tuple[LmFeatureSet, ...]:
    """Each `<run>/` with a `_meta.json` naming its chosen epoch folder (written by `nlpctr train`)."""
    sets = []
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        if folder.name.startswith((".", "_")) or not LmFeatureMeta.exists(folder):
            continue
        meta = LmFeatureMeta.read(folder)
        path = folder / meta.chosen
        if meta.kind not in LM_KINDS or not parquet_files(path):
            raise UserError(f"{folder} is incomplete (no {meta.chosen} features); re-run its training")
        if folder.name != lm_feature_slug(folder.name):
            raise UserError(f"LM feature folder name {folder.name!r} is not a safe identifier")
        sets.append(
            LmFeatureSet(
                run=folder.name,
                kind=meta.kind,
                path=path,
                keys=meta.keys,
                model_version=meta.model_version,
                features=feature_columns(path, exclude={*meta.keys, TIMESTAMP}),
            )
        )
    return tuple(sets)


def _numeric_columns(data_dir: Path, names: Sequence[str]) -> tuple[tuple[str, pa.DataType], ...]:
    """The manifest's numeric features as typed impression columns."""
    if not names:
        return ()
    schema = ds.dataset(parquet_files(data_dir / IMPRESSIONS), format="parquet").schema
    missing = [n for n in names if n not in schema.names]
    if missing:
        raise UserError(
            f"{data_dir / IMPRESSIONS} lacks the numeric column {missing[0]!r} its manifest names; "
            f"re-run `nlpctr data prepare` into {data_dir}"
        )
    return tuple((n, schema.field(n).type) for n in names)


def _text_roles(data_dir: Path) -> tuple[str, ...]:
    """Text roles that occur in the impressions (Upworthy has no query text)."""
    files = parquet_files(data_dir / IMPRESSIONS)
    if not files:
        raise UserError(f"{data_dir} has no impressions; run `nlpctr data prepare` into it")
    dataset = ds.dataset(files, format="parquet")
    roles = []
    for role, column in TEXT_ROLES.items():
        if column in dataset.schema.names:
            values = dataset.to_table(columns=[column])[column]
            if values.null_count < len(values):
                roles.append(role)
    return tuple(roles)
