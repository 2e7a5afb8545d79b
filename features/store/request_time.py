"""Vectors of texts the store has never seen, computed when they are looked up.

A lookup row may carry `ad_text` / `query_text`; where the service's embedding view has no
vector for its derived id, the view's own encoder (rebuilt from the embedding manifest and
checked against its `encoder_version`) computes it, once loaded per `OnlineFeatures`. Computed
vectors are returned, never written to the online store. Usage: docs/USAGE.md, "Texts first
seen at request time"; why not a Feast on-demand view: docs/DESIGN.md, "Modules in detail",
request_time.py.
"""

from __future__ import annotations

from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from feast import FeatureService, FeatureStore

from nlpctr.atomic import JsonObject
from nlpctr.compat import encoder_fields_of_version
from nlpctr.errors import UserError
from nlpctr.features.names import EMBEDDING, TEXT_ID, TEXT_ROLES
from nlpctr.layout import EMBEDDINGS_MANIFEST, EmbeddingsManifest, embeddings_dir
from nlpctr.models.encoder_source import DEFAULT_ENCODER
from nlpctr.models.schema import normalize_text, text_id

if TYPE_CHECKING:  # torch is imported only when a vector has to be computed
    from nlpctr.models.encoder import EncoderConfig, TextEncoder

ROLE_OF_ID = {column: role for role, column in TEXT_ROLES.items()}  # ad_text_id -> ad_text


@dataclass(frozen=True)
class TextProjection:
    """An embedding view as a service reads it for one text role."""

    column: str  # the served column, `<role>_<slug>__embedding`
    role: str  # ad_text | query_text: the request field that carries the text
    id_column: str  # ad_text_id | query_text_id
    view: str
    slug: str
    encoder_version: str


def text_projections(store: FeatureStore, service: FeatureService) -> list[TextProjection]:
    """The service's projections of embedding views (those with a `slug` and `encoder_version`)."""
    out = []
    for projection in service.feature_view_projections:
        view = store.get_feature_view(projection.name)
        tags = view.tags or {}
        id_column = projection.join_key_map.get(TEXT_ID)
        features = {f.name for f in projection.features}
        if id_column not in ROLE_OF_ID or EMBEDDING not in features or "slug" not in tags:
            continue
        out.append(
            TextProjection(
                column=f"{projection.name_to_use()}__{EMBEDDING}",
                role=ROLE_OF_ID[id_column],
                id_column=id_column,
                view=view.name,
                slug=tags["slug"],
                encoder_version=tags.get("encoder_version", ""),
            )
        )
    return out


def text_fields(keys: Sequence[str]) -> list[str]:
    """The request fields that may carry a text: the roles whose id column is one of `keys`."""
    return [role for role, column in TEXT_ROLES.items() if column in keys]


def ids_from_texts(rows: Sequence[JsonObject], keys: Sequence[str]) -> list[JsonObject]:
    """Entity rows as a request gives them (before they are checked), with each given text's id
    filled in (`text_id`); a row's own id must agree with it."""
    out = []
    for row in rows:
        row = dict(row)
        for role in text_fields(keys):
            text = row.get(role)
            if text is None:
                continue
            if not isinstance(text, str) or not normalize_text(text):
                raise UserError(f"entity row's {role} must be a non-empty text, got {text!r}")
            derived = text_id(text)
            given = row.get(TEXT_ROLES[role])
            if given not in (None, "", derived):
                raise UserError(
                    f"entity row's {TEXT_ROLES[role]} {given!r} is not the id of its {role} ({derived}); "
                    f"give one of them"
                )
            row[TEXT_ROLES[role]] = derived
        out.append(row)
    return out


def encoder_config_of(folder: Path, view: str, encoder_version: str) -> EncoderConfig:
    """The encoder that wrote an embedding folder, from its manifest, checked to give the view's
    version (a changed package or folder would give other vectors: refused, not mixed)."""
    from nlpctr.models.encoder import EncoderConfig

    manifest = EmbeddingsManifest.read(folder)
    if manifest is None:
        raise UserError(f"{folder / EMBEDDINGS_MANIFEST} cannot be read; re-run `nlpctr embed` for {view}")
    fields = manifest.encoder
    if fields is None:
        fields = encoder_fields_of_version(manifest.encoder_version or "", DEFAULT_ENCODER)
    if fields is None:
        raise UserError(f"{folder} does not record its encoder; re-run `nlpctr embed` for {view}")
    try:
        config = EncoderConfig(**fields)
    except (UserError, TypeError) as exc:
        raise UserError(f"request-time vectors of {view}: its encoder cannot be loaded: {exc}") from None
    if encoder_version and config.version != encoder_version:
        raise UserError(
            f"request-time vectors of {view}: the store's vectors are {encoder_version} but its encoder "
            f"now gives {config.version}; re-run `nlpctr embed` (then apply and materialize) or restore "
            "the encoder"
        )
    return config


class RequestTimeVectors:
    """Computes the vectors an embedding view lacks, one encoder per view, loaded on first use."""

    def __init__(self, data_dir: Path, projections: Sequence[TextProjection]) -> None:
        self.data_dir = Path(data_dir)
        self.projections = list(projections)
        self.encoders: dict[str, TextEncoder] = {}

    def encoder(self, projection: TextProjection) -> TextEncoder:
        if projection.view not in self.encoders:
            from nlpctr.models.encoder import TextEncoder

            folder = embeddings_dir(self.data_dir, projection.slug)
            config = encoder_config_of(folder, projection.view, projection.encoder_version)
            self.encoders[projection.view] = TextEncoder(config)
        return self.encoders[projection.view]

    def fill(self, values: MutableMapping[str, list[Any]], rows: Sequence[JsonObject]) -> dict[str, int]:
        """Fill each null embedding whose row carries its text; returns how many per column."""
        computed: dict[str, int] = {}
        for projection in self.projections:
            column = values.get(projection.column)
            if column is None:
                continue
            todo = [
                i for i, row in enumerate(rows) if column[i] is None and row.get(projection.role) is not None
            ]
            if not todo:
                continue
            texts = list(dict.fromkeys(rows[i][projection.role] for i in todo))
            vectors = dict(zip(texts, self.encoder(projection).encode(texts).tolist(), strict=True))
            for i in todo:
                column[i] = vectors[rows[i][projection.role]]
            computed[projection.column] = len(todo)
        return computed
