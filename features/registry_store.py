"""Feast's local registry file, written whole or not at all.

Every registry write (`update_registry_proto`) goes to a synced temporary file renamed over
`registry.db`, so a crash leaves the old registry or the new one; the rendered
`feature_store.yaml` names this class, so the stock `feast` CLI writes the same way. Why Feast's
own store is not enough: docs/DESIGN.md, "Modules in detail", registry_store.py.
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
