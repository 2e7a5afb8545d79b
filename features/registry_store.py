"""Feast's local registry file, written whole or not at all.

Feast's `FileRegistryStore` opens `registry.db` for writing (truncating it) and then writes the
new registry into it, so a process killed, or a disk that fills, between the two leaves a
half-written registry that no `FeatureStore` can load: every view, service and
materialisation record of the dataset gone. Every registry write goes through
`update_registry_proto` (`feast apply`, `nlpctr features apply`, each view's materialisation
record), so this store writes a temporary file beside the registry, syncs it and renames it
over the old one: a reader, or the next run after a crash, sees the old registry or the new one.

The rendered `feature_store.yaml` names this class (`registry.registry_store_type`), so the
stock `feast` CLI run in a dataset's repo writes the registry the same way.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path

from feast.infra.registry.file import FileRegistryStore
from feast.protos.feast.core.Registry_pb2 import Registry as RegistryProto
from feast.repo_config import RegistryConfig

from nlpctr.atomic import write_atomic


class AtomicFileRegistryStore(FileRegistryStore):
    """A local registry file replaced by rename, never rewritten in place."""

    def __init__(self, registry_config: RegistryConfig, repo_path: Path) -> None:
        super().__init__(registry_config, repo_path)
        path = Path(registry_config.path)
        self.path = path if path.is_absolute() else Path(repo_path) / path

    def update_registry_proto(self, registry_proto: RegistryProto) -> None:
        # The same stamps Feast's file store puts on every write.
        registry_proto.version_id = str(uuid.uuid4())
        registry_proto.last_updated.FromDatetime(datetime.now(UTC))
        write_atomically(self.path, registry_proto.SerializeToString())


def write_atomically(path: Path, data: bytes) -> None:
    """Replace `path` with `data` by rename: a crash leaves the old file (and, at worst, a hidden
    temporary beside it), never a partial one. The rename is synced, so it survives a power cut."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, data, sync=True)
