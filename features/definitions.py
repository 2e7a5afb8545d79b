"""The Feast definitions of one prepared dataset: entities, sources, feature views, services.

The objects are a pure function of what the batch jobs wrote under a dataset folder DIR, so the
same code serves every dataset spec. `nlpctr features apply --data DIR` writes them out as plain
declarations, Feast-template style, in `DIR/feature_repo/repo_definitions.py` (features/render.py),
and checks that the file yields exactly these objects, which keeps the stock `feast` CLI and
`nlpctr` on one set of objects.

What becomes a view (only what the jobs produced, never a placeholder):
- `DIR/ctr_history/<entity>/` -> `ctr_<entity>`: entity-level CTR history, the online view;
- `DIR/ctr_history_rows/` -> `ctr_rows`: row-level leave-one-out history, offline only (training);
- `DIR/embeddings/<slug>/` -> `text_embedding_<slug>`: one view per encoder, keyed by text_id;
- `DIR/lm_features/<run>/epoch-<k>/` -> `lm_<run>`: a trained LM's output (E2's fine-tuned score
  and pooled vector, or E3's supplementary feature) for the checkpoint `_meta.json` names. The LM
  reads the (query, ad) pair, so the view has a composite key (query_text_id, ad_text_id), the
  columns every impression already carries; a missing query is the empty id (the key an online
  lookup sends for it). Datasets without query text key it by ad_text_id alone.

Services: `baseline` (CTR history), `cascade_frozen` (baseline + the ad's and the query's text
embedding), `cascade_frozen_<slug>` per encoder, `cascade_finetuned_<run>` / `joint_<run>` per
LM feature set (baseline + `lm_<run>`), each with an offline twin `<name>_training`
that reads the leave-one-out view instead. Twins alias their projections to the serving names,
so a training frame and an online lookup yield the same column names.

Pure Feast and pyarrow: no Beam here.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
from feast import Entity, FeatureService, FeatureView, Field, FileSource, ValueType
from feast.types import Array, Bool, FeastType, Float32, Float64, Int32, Int64, String

from nlpctr.errors import UserError
from nlpctr.layout import (
    CTR_HISTORY,
    CTR_HISTORY_ROWS,
    EMBEDDINGS,
    IMPRESSIONS,
    LM_FEATURES,
    LmFeatureMeta,
    read_manifest,
)

LM_KINDS = ("cascade_finetuned", "joint")
TIMESTAMP = "event_timestamp"
TEXT_ID = "text_id"
IMPRESSION_ID = "impression_id"
EMBEDDING = "embedding"
ENCODER_VERSION = "encoder_version"

BASELINE = "baseline"
CASCADE_FROZEN = "cascade_frozen"
TRAINING_SUFFIX = "_training"
CTR_ROWS_VIEW = "ctr_rows"

# An impression names two texts; both are looked up in the one text-keyed embedding view
# through a join-key map (role -> impression column), so each vector is stored once.
TEXT_ROLES: dict[str, str] = {"ad_text": "ad_text_id", "query_text": "query_text_id"}
# Entities every dataset has, whatever its spec declares.
CORE_ENTITIES: dict[str, str] = {
    "text": TEXT_ID,
    "ad": "ad_id",
    "query": "query_id",
    "impression": IMPRESSION_ID,
}

_SAFE_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def ctr_view_name(entity: str) -> str:
    """The entity-level CTR view of a declared entity column (e.g. `ctr_ad_id`)."""
    return f"ctr_{entity}"


def embedding_view_name(slug: str) -> str:
    """The embedding view of one encoder (the slug names encoder, layers, pooling, length)."""
    return f"text_embedding_{slug}"


def text_projection_name(role: str, slug: str) -> str:
    """Alias of the embedding view as read for one text role (`ad_text_<slug>`)."""
    return f"{role}_{slug}"


def lm_view_name(run: str) -> str:
    """The view of one run's LM output (`lm_<run>`)."""
    return f"lm_{run}"


def lm_feature_slug(run: str) -> str:
    """A run name as a view/service identifier: [a-z0-9_], starting with a letter."""
    slug = re.sub(r"[^a-z0-9_]", "_", run.lower())
    return slug if slug[:1].isalpha() else f"r_{slug}"


def training_service_name(service: str) -> str:
    """The offline twin of a serving feature service."""
    return f"{service}{TRAINING_SUFFIX}"


def parquet_files(path: Path) -> list[Path]:
    """Data files of a parquet folder, skipping what dataset readers skip (`_meta`, `.tmp`)."""
    if not path.is_dir():
        return []
    return sorted(
        p
        for p in path.rglob("*.parquet")
        if not any(part.startswith((".", "_")) for part in p.relative_to(path).parts)
    )


def fingerprint(path: Path) -> str:
    """Identity of a parquet folder's current contents (names, sizes, mtimes), cheap to take."""
    digest = hashlib.sha1()
    for file in parquet_files(path):
        stat = file.stat()
        digest.update(f"{file.relative_to(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def feast_type(arrow_type: pa.DataType, where: str) -> FeastType:
    """The Feast type of a parquet column the jobs write."""
    scalar: dict[pa.DataType, FeastType] = {
        pa.string(): String,
        pa.large_string(): String,
        pa.int64(): Int64,
        pa.int32(): Int32,
        pa.float64(): Float64,
        pa.float32(): Float32,
        pa.bool_(): Bool,
    }
    if arrow_type in scalar:
        return scalar[arrow_type]
    if (
        pa.types.is_list(arrow_type)
        or pa.types.is_large_list(arrow_type)
        or pa.types.is_fixed_size_list(arrow_type)
    ):
        inner = arrow_type.value_type
        if inner in (pa.float32(), pa.float64(), pa.int64(), pa.int32(), pa.string()):
            return Array(scalar[inner])
    raise UserError(
        f"{where} has type {arrow_type}, which the feature store does not map; fix the job output"
    )


def arrow_type(dtype: FeastType) -> pa.DataType:
    """The arrow type of a Feast feature type (the inverse of `feast_type`)."""
    scalar: dict[FeastType, pa.DataType] = {
        String: pa.string(),
        Int64: pa.int64(),
        Int32: pa.int32(),
        Float64: pa.float64(),
        Float32: pa.float32(),
        Bool: pa.bool_(),
    }
    if dtype in scalar:
        return scalar[dtype]
    if isinstance(dtype, Array) and dtype.base_type in scalar:
        return pa.list_(scalar[dtype.base_type])
    raise ValueError(f"no arrow type for Feast type {dtype}")


# ------------------------------------------------------------------------------- layout


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
class Layout:
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

    @classmethod
    def discover(cls, data_dir: Path) -> Layout:
        """Read DIR's manifest and the outputs of the CTR and embedding jobs."""
        data_dir = Path(data_dir).resolve()
        manifest = read_manifest(data_dir)
        entities = tuple(dict.fromkeys(manifest.get("entities", [])))
        ctr = []
        for entity in entities:
            path = data_dir / CTR_HISTORY / entity
            if parquet_files(path):
                ctr.append(CtrSet(entity, path, _feature_columns(path, exclude={entity, TIMESTAMP})))
        rows_path = data_dir / CTR_HISTORY_ROWS
        ctr_rows = rows_path if parquet_files(rows_path) else None
        rows_features = _feature_columns(rows_path, exclude={IMPRESSION_ID, TIMESTAMP}) if ctr_rows else ()
        embeddings = []
        root = data_dir / EMBEDDINGS
        for path in sorted(root.iterdir()) if root.is_dir() else []:
            # Dot and underscore names are a job's staging folders or metadata, never inputs.
            if path.name.startswith((".", "_")) or not parquet_files(path):
                continue
            embeddings.append(_embedding_set(path))
        return cls(
            data_dir=data_dir,
            dataset=str(manifest.get("dataset", data_dir.name)),
            entities=entities,
            ctr=tuple(ctr),
            ctr_rows=ctr_rows,
            ctr_rows_features=rows_features,
            embeddings=tuple(embeddings),
            text_roles=_text_roles(data_dir),
            lm_features=_lm_feature_sets(data_dir / LM_FEATURES),
        )

    def sources(self) -> dict[str, Path]:
        """Every input folder that backs a view, by view name."""
        out = {ctr_view_name(c.entity): c.path for c in self.ctr}
        if self.ctr_rows is not None:
            out[CTR_ROWS_VIEW] = self.ctr_rows
        out.update({embedding_view_name(e.slug): e.path for e in self.embeddings})
        out.update({lm_view_name(f.run): f.path for f in self.lm_features})
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


def _feature_columns(path: Path, exclude: set[str]) -> tuple[tuple[str, pa.DataType], ...]:
    schema = ds.dataset(parquet_files(path), format="parquet").schema
    return tuple((f.name, f.type) for f in schema if f.name not in exclude)


def _embedding_set(path: Path) -> EmbeddingSet:
    slug = path.name
    if not _SAFE_NAME.match(slug):
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
                features=_feature_columns(path, exclude={*meta.keys, TIMESTAMP}),
            )
        )
    return tuple(sets)


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


# ------------------------------------------------------------------------------- objects


@dataclass
class Definitions:
    """The Feast objects of one dataset, ready for `FeatureStore.apply`."""

    entities: dict[str, Entity]
    sources: dict[str, FileSource]
    views: dict[str, FeatureView]
    services: dict[str, FeatureService]
    default_encoder: str | None

    def objects(self) -> list[Any]:
        return [
            *self.entities.values(),
            *self.sources.values(),
            *self.views.values(),
            *self.services.values(),
        ]


def entity_name(column: str) -> str:
    """Feast entity name for a join-key column (the core ones have short names)."""
    for name, key in CORE_ENTITIES.items():
        if key == column:
            return name
    return column


def build_definitions(
    layout: Layout, *, encoder: str | None = None, ttl: timedelta = timedelta(0)
) -> Definitions:
    """Feast objects for what `layout` holds.

    `encoder` picks the slug `cascade_frozen` serves when there are several (each also gets
    `cascade_frozen_<slug>`). `ttl` is every view's offline look-back window; 0 (the default)
    means a snapshot or an embedding stays valid until replaced. Feast does not apply ttl to
    online reads (feast-dev/feast#4133), so a non-zero ttl would make training frames null
    where serving is not.
    """
    join_keys = {name: key for name, key in CORE_ENTITIES.items()}
    for column in layout.entities:
        name = entity_name(column)
        if name in join_keys and join_keys[name] != column:
            raise UserError(f"entity column {column!r} clashes with the built-in entity {name!r}")
        join_keys[name] = column
    for lm in layout.lm_features:
        for key in lm.keys:  # the text-id columns of an impression, each its own entity
            join_keys.setdefault(entity_name(key), key)
    entities = {
        name: Entity(name=name, join_keys=[key], value_type=ValueType.STRING, description=f"keyed by {key}")
        for name, key in join_keys.items()
    }
    tags = {"dataset": layout.dataset, "generated_by": "nlpctr.features.definitions"}
    sources: dict[str, FileSource] = {}
    views: dict[str, FeatureView] = {}

    def add_view(
        name: str,
        path: Path,
        key: str | tuple[str, ...],
        features: tuple[tuple[str, pa.DataType], ...],
        online: bool,
        description: str,
        extra_tags: dict[str, str] | None = None,
    ) -> FeatureView:
        source = FileSource(
            name=f"{name}_source",
            path=str(path),
            timestamp_field=TIMESTAMP,
            description=f"parquet written by the batch job: {path.relative_to(layout.data_dir)}",
        )
        keys = (key,) if isinstance(key, str) else key
        schema = [Field(name=k, dtype=String) for k in keys]
        schema += [
            Field(name=col, dtype=feast_type(typ, f"{path.relative_to(layout.data_dir)}:{col}"))
            for col, typ in features
        ]
        view = FeatureView(
            name=name,
            entities=[entities[entity_name(k)] for k in keys],
            ttl=ttl,
            schema=schema,
            source=source,
            online=online,
            description=description,
            tags={**tags, **(extra_tags or {})},
        )
        sources[source.name] = source
        views[name] = view
        return view

    for ctr in layout.ctr:
        add_view(
            ctr_view_name(ctr.entity),
            ctr.path,
            ctr.entity,
            ctr.features,
            online=True,
            description=f"CTR history of {ctr.entity} from training rows (entity level, what serving reads)",
        )
    if layout.ctr_rows is not None:
        add_view(
            CTR_ROWS_VIEW,
            layout.ctr_rows,
            IMPRESSION_ID,
            layout.ctr_rows_features,
            online=False,
            description="CTR history per impression, leave-one-out on training rows (what training reads)",
        )
    for emb in layout.embeddings:
        add_view(
            embedding_view_name(emb.slug),
            emb.path,
            TEXT_ID,
            tuple(
                (col, typ)
                for col, typ in _feature_columns(emb.path, exclude={TEXT_ID, TIMESTAMP})
                if col in (EMBEDDING, ENCODER_VERSION)
            ),
            online=True,
            description=f"frozen text embeddings ({emb.dim}-d) of {emb.encoder_version}",
            extra_tags={"encoder_version": emb.encoder_version, "slug": emb.slug, "dim": str(emb.dim)},
        )

    for lm in layout.lm_features:
        add_view(
            lm_view_name(lm.run),
            lm.path,
            lm.keys,
            lm.features,
            online=True,
            description=f"{lm.kind} LM output per (query, ad) text pair of {lm.model_version}",
            extra_tags={"model_version": lm.model_version, "kind": lm.kind, "run": lm.run},
        )

    default_encoder = _default_encoder(layout, encoder)
    services = _services(layout, views, default_encoder)
    return Definitions(entities, sources, views, services, default_encoder)


def _default_encoder(layout: Layout, encoder: str | None) -> str | None:
    slugs = [e.slug for e in layout.embeddings]
    if encoder is not None:
        if encoder not in slugs:
            raise UserError(
                f"--encoder {encoder!r} has no embeddings in {layout.data_dir / EMBEDDINGS} "
                f"(found: {', '.join(slugs) or 'none'}); run `nlpctr embed --data {layout.data_dir}`"
            )
        return encoder
    if len(slugs) > 1:
        raise UserError(
            f"{layout.data_dir / EMBEDDINGS} holds {len(slugs)} encoders ({', '.join(slugs)}); "
            "pick the one `cascade_frozen` serves with --encoder SLUG (each still gets cascade_frozen_<slug>)"
        )
    return slugs[0] if slugs else None


def _services(
    layout: Layout, views: dict[str, FeatureView], default_encoder: str | None
) -> dict[str, FeatureService]:
    row_columns = {name for name, _ in layout.ctr_rows_features}
    serving_ctr: list[Any] = []
    training_ctr: list[Any] = []
    for ctr in layout.ctr:
        entity_columns = {name for name, _ in ctr.features}
        # Only what both levels carry, so training and serving see the same columns.
        wanted = [f"{ctr.entity}_ctr", f"{ctr.entity}_impressions"]
        shared = [c for c in wanted if c in entity_columns and c in row_columns]
        if not shared:
            continue
        view_name = ctr_view_name(ctr.entity)
        serving_ctr.append(views[view_name][shared])
        training_ctr.append(views[CTR_ROWS_VIEW][shared].with_name(view_name))

    def text_projections(slug: str) -> list[Any]:
        view = views[embedding_view_name(slug)]
        return [
            view[[EMBEDDING]]
            .with_name(text_projection_name(role, slug))
            .with_join_key_map({TEXT_ID: TEXT_ROLES[role]})
            for role in layout.text_roles
        ]

    groups: dict[str, tuple[list[Any], list[Any], str]] = {}
    if serving_ctr:
        groups[BASELINE] = (serving_ctr, training_ctr, "CTR history features only (experiment E0)")
    for emb in layout.embeddings:
        texts = text_projections(emb.slug)
        if not serving_ctr or not texts:
            continue
        about = f"baseline + frozen {emb.encoder_version} embeddings of {', '.join(layout.text_roles)} (E1)"
        groups[f"{CASCADE_FROZEN}_{emb.slug}"] = (serving_ctr + texts, training_ctr + texts, about)
        if emb.slug == default_encoder:
            groups[CASCADE_FROZEN] = (serving_ctr + texts, training_ctr + texts, about)
    for lm in layout.lm_features:
        if not serving_ctr:
            continue
        view = views[lm_view_name(lm.run)]
        about = f"baseline + {lm.kind} LM output of {lm.model_version}"
        groups[f"{lm.kind}_{lm.run}"] = ([*serving_ctr, view], [*training_ctr, view], about)

    services: dict[str, FeatureService] = {}
    for name, (serving, training, about) in groups.items():
        services[name] = FeatureService(name=name, features=serving, description=f"online: {about}")
        services[training_service_name(name)] = FeatureService(
            name=training_service_name(name),
            features=training,
            description=f"training (leave-one-out CTR history): {about}",
        )
    return services
