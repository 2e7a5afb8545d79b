"""Compatibility shims, gathered in one place: each names what still needs it and when it goes.
Nothing else in the project converts an old shape into a new one."""

from __future__ import annotations

from nlpctr.atomic import JsonObject
from nlpctr.layout import Manifest


def as_manifest(manifest: Manifest | JsonObject) -> Manifest:
    """A `Manifest`, from the record or from the parsed JSON `read_manifest` returns.

    The experiment protocol (`pipelines/protocol.py`, `models/increments.py`) still reads the
    manifest as JSON and hands it to the trainers; this goes when they read `Manifest.read`.
    """
    return manifest if isinstance(manifest, Manifest) else Manifest.from_json(manifest)
