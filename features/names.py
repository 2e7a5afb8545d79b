"""The names the feature store is built from: column and key names, view and service names.

One place, so the jobs, the Feast definitions and the store agree on them."""

from __future__ import annotations

import re

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
# A spec's numeric features, read from the impressions and keyed by impression_id.
NUMERIC_VIEW = "numeric"

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

# Slugs and run names become view and service names.
SAFE_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


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
