"""The Feast definitions of one prepared dataset: entities, sources, feature views, services.

A pure function of what the batch jobs wrote under DIR, so the same code serves every dataset
spec; `nlpctr features apply` renders it as `DIR/feature_repo/repo_definitions.py`
(features/render.py). Names are in names.py, the jobs' outputs (`JobOutputs`) in
job_outputs.py. Pure Feast and pyarrow: no Beam here. Which output becomes which view and
service, and why `numeric` is keyed by impression: docs/DESIGN.md, "Modules in detail",
definitions.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
from feast import Entity, FeatureService, FeatureView, Field, FileSource, ValueType
from feast.data_format import ParquetFormat
from feast.data_source import DataSource
from feast.infra.offline_stores.contrib.spark_offline_store.spark_source import SparkSource
from feast.types import Array, Bool, FeastType, Float32, Float64, Int32, Int64, String

from nlpctr.errors import UserError
from nlpctr.features.job_outputs import JobOutputs, feature_columns
from nlpctr.features.names import (
    BASELINE,
    CASCADE_FROZEN,
    CORE_ENTITIES,
    CTR_ROWS_VIEW,
    EMBEDDING,
    ENCODER_VERSION,
    IMPRESSION_ID,
    NUMERIC_VIEW,
    TEXT_ID,
    TEXT_ROLES,
    TIMESTAMP,
    ctr_view_name,
    embedding_view_name,
    lm_view_name,
    text_projection_name,
    training_service_name,
)
from nlpctr.layout import (
    EMBEDDINGS,
)
from nlpctr.models.encoder_source import resolve_encoder


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


@dataclass
class Definitions:
    """The Feast objects of one dataset, ready for `FeatureStore.apply`."""

    entities: dict[str, Entity]
    sources: dict[str, DataSource]
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


def parquet_source(name: str, path: Path, description: str, offline: str = "duckdb") -> DataSource:
    """A batch job's parquet folder as a Feast source: a FileSource, which Feast's DuckDB and file
    stores read, or for `offline="spark"` a SparkSource, the only kind its Spark store reads."""
    if offline == "spark":
        return SparkSource(
            name=name,
            path=str(path),
            file_format="parquet",
            timestamp_field=TIMESTAMP,
            description=description,
        )
    # The format declared, not left to the path: Feast's DuckDB offline store reads a source
    # only when its format is parquet or its path ends in .parquet (ours are folders).
    return FileSource(
        name=name,
        path=str(path),
        timestamp_field=TIMESTAMP,
        file_format=ParquetFormat(),
        description=description,
    )


def _entities(layout: JobOutputs) -> dict[str, Entity]:
    """One entity per join key: the core ones, the spec's entity columns, the LM views' text ids."""
    join_keys = {name: key for name, key in CORE_ENTITIES.items()}
    for column in layout.entities:
        name = entity_name(column)
        if name in join_keys and join_keys[name] != column:
            raise UserError(f"entity column {column!r} clashes with the built-in entity {name!r}")
        join_keys[name] = column
    for lm in layout.lm_features:
        for key in lm.keys:  # the text-id columns of an impression, each its own entity
            join_keys.setdefault(entity_name(key), key)
    return {
        name: Entity(name=name, join_keys=[key], value_type=ValueType.STRING, description=f"keyed by {key}")
        for name, key in join_keys.items()
    }


@dataclass
class _Views:
    """The feature views of one dataset and their parquet sources, added one job output at a time."""

    layout: JobOutputs
    entities: dict[str, Entity]
    ttl: timedelta
    offline: str
    sources: dict[str, DataSource] = field(default_factory=dict)
    views: dict[str, FeatureView] = field(default_factory=dict)

    def add(
        self,
        name: str,
        path: Path,
        key: str | tuple[str, ...],
        features: tuple[tuple[str, pa.DataType], ...],
        online: bool,
        description: str,
        extra_tags: dict[str, str] | None = None,
    ) -> FeatureView:
        """A view of `path`'s `features`, keyed by `key` (one text-id column, or a composite key)."""
        layout = self.layout
        source = parquet_source(
            f"{name}_source",
            path,
            f"parquet written by the batch job: {path.relative_to(layout.data_dir)}",
            self.offline,
        )
        keys = (key,) if isinstance(key, str) else key
        schema = [Field(name=k, dtype=String) for k in keys]
        schema += [
            Field(name=col, dtype=feast_type(typ, f"{path.relative_to(layout.data_dir)}:{col}"))
            for col, typ in features
        ]
        tags = {"dataset": layout.dataset, "generated_by": "nlpctr.features.definitions"}
        view = FeatureView(
            name=name,
            entities=[self.entities[entity_name(k)] for k in keys],
            ttl=self.ttl,
            schema=schema,
            source=source,
            online=online,
            description=description,
            tags={**tags, **(extra_tags or {})},
        )
        self.sources[source.name] = source
        self.views[name] = view
        return view


def build_definitions(
    layout: JobOutputs, *, encoder: str | None = None, ttl: timedelta = timedelta(0), offline: str = "duckdb"
) -> Definitions:
    """Feast objects for what `layout` holds.

    `encoder` (a slug, or the package or folder of an encoder that wrote one) picks the slug
    `cascade_frozen` serves when there are several (each also gets `cascade_frozen_<slug>`). `ttl`
    is every view's offline look-back window; 0 (the default) means a snapshot or an embedding stays
    valid until replaced. Feast does not apply ttl to online reads (feast-dev/feast#4133), so a
    non-zero ttl would make training frames null where serving is not. `offline`: the offline store the
    sources are declared for (`parquet_source`).
    """
    entities = _entities(layout)
    views = _Views(layout, entities, ttl, offline)
    for ctr in layout.ctr:
        views.add(
            ctr_view_name(ctr.entity),
            ctr.path,
            ctr.entity,
            ctr.features,
            online=True,
            description=f"CTR history of {ctr.entity} from training rows (entity level, what serving reads)",
        )
    if layout.ctr_rows is not None:
        views.add(
            CTR_ROWS_VIEW,
            layout.ctr_rows,
            IMPRESSION_ID,
            layout.ctr_rows_features,
            online=False,
            description="CTR history per impression, leave-one-out on training rows (what training reads)",
        )
    if layout.numeric:
        views.add(
            NUMERIC_VIEW,
            layout.impressions,
            IMPRESSION_ID,
            layout.numeric,
            online=True,
            description="the spec's numeric features per impression (standardised by the trainer)",
        )
    for emb in layout.embeddings:
        views.add(
            embedding_view_name(emb.slug),
            emb.path,
            TEXT_ID,
            tuple(
                (col, typ)
                for col, typ in feature_columns(emb.path, exclude={TEXT_ID, TIMESTAMP})
                if col in (EMBEDDING, ENCODER_VERSION)
            ),
            online=True,
            description=f"frozen text embeddings ({emb.dim}-d) of {emb.encoder_version}",
            extra_tags={"encoder_version": emb.encoder_version, "slug": emb.slug, "dim": str(emb.dim)},
        )

    for lm in layout.lm_features:
        views.add(
            lm_view_name(lm.run),
            lm.path,
            lm.keys,
            lm.features,
            online=True,
            description=f"{lm.kind} LM output per (query, ad) text pair of {lm.model_version}",
            extra_tags={"model_version": lm.model_version, "kind": lm.kind, "run": lm.run},
        )

    default_encoder = _default_encoder(layout, encoder)
    services = _services(layout, views.views, default_encoder)
    return Definitions(entities, views.sources, views.views, services, default_encoder)


def _default_encoder(layout: JobOutputs, encoder: str | None) -> str | None:
    """The slug `cascade_frozen` serves: `encoder` as a slug, or as the encoder (package or
    folder) behind exactly one embedding folder; the only one when `encoder` is None."""
    slugs = [e.slug for e in layout.embeddings]
    if encoder is not None:
        if encoder in slugs:
            return encoder
        try:  # an encoder's name or folder, as `embed --encoder` takes it
            identity = f"{resolve_encoder(encoder).identity}/"
        except UserError:
            identity = None
        matches = [e.slug for e in layout.embeddings if identity and e.encoder_version.startswith(identity)]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise UserError(
                f"--encoder {encoder} wrote {len(matches)} embedding folders ({', '.join(matches)}); "
                "name the one `cascade_frozen` serves by its slug: --encoder SLUG"
            )
        raise UserError(
            f"--encoder {encoder!r} has no embeddings in {layout.data_dir / EMBEDDINGS} "
            f"(found: {', '.join(slugs) or 'none'}); run `nlpctr embed --data {layout.data_dir}`"
        )
    if len(slugs) > 1:
        raise UserError(
            f"{layout.data_dir / EMBEDDINGS} holds {len(slugs)} encoders ({', '.join(slugs)}); "
            "pick the one `cascade_frozen` serves with --encoder SLUG (each still gets cascade_frozen_<slug>)"
        )
    return slugs[0] if slugs else None


def _services(
    layout: JobOutputs, views: dict[str, FeatureView], default_encoder: str | None
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
    if serving_ctr and NUMERIC_VIEW in views:  # E0's inputs, so every service built on E0's
        serving_ctr.append(views[NUMERIC_VIEW])
        training_ctr.append(views[NUMERIC_VIEW])

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
        numeric = " and numeric" if NUMERIC_VIEW in views else ""
        groups[BASELINE] = (serving_ctr, training_ctr, f"CTR history{numeric} features only (experiment E0)")
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
