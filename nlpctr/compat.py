"""Compatibility shims, gathered in one place: each reads an older shape of a file or value into
today's, and names what still needs it. Nothing else in the project converts old into new."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from nlpctr.atomic import JsonObject

if TYPE_CHECKING:  # layout imports this module; the record is imported where it is built
    from nlpctr.layout import Manifest

# An embeddings _manifest.json from before it recorded its encoder: the version string says it.
_ENCODER_VERSION = re.compile(
    r"(?P<identity>.+)/layers=(?P<layers>\d+)/pooling=(?P<pooling>\w+)/max_length=(?P<n>\d+)"
)


def as_manifest(manifest: Manifest | JsonObject) -> Manifest:
    """A `Manifest`, from the record or from the parsed JSON `read_manifest` returns.

    The experiment protocol (`pipelines/protocol.py`, `models/increments.py`) still reads the
    manifest as JSON and hands it to the trainers; this goes when they read `Manifest.read`.
    """
    from nlpctr.layout import Manifest

    return manifest if isinstance(manifest, Manifest) else Manifest.from_json(manifest)


def encoder_fields_of_version(version: str, default_name: str) -> JsonObject | None:
    """The encoder fields an embeddings folder written before its manifest recorded them implies
    (those folders were all written by the default encoder), or None when `version` says nothing.

    Needed while data folders embedded before `_manifest.json` had `encoder` are served.
    """
    older = _ENCODER_VERSION.fullmatch(version)
    if older is None:
        return None
    return {
        "name": default_name,
        "layers": int(older["layers"]),
        "pooling": older["pooling"],
        "max_length": int(older["n"]),
    }


def lm_meta_checkpoints(content: JsonObject) -> tuple[str, ...]:
    """An LM feature `_meta.json`'s checkpoint folders; `epochs` was their name before E2
    checkpointed within epochs, and a file with neither lists only its chosen one.

    Needed while LM feature folders trained before that change are read.
    """
    return tuple(content.get("checkpoints", content.get("epochs", [content["chosen"]])))
