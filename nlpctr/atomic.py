"""The one atomic writer: a file is written to a hidden temporary name beside it, then renamed
into place, so a reader (or the next run after a crash) sees the old file or the new one, never
half of one. Every room writes its files through it (DESIGN.md, "Data flow"); whole folders are
staged and swapped by `pipelines/outputs.py`.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# A JSON (or YAML) object where a file is read or written, before it is validated into (or after it
# is serialised from) a typed record: the one place a str-keyed dict of any values is the right type.
JsonObject = dict[str, Any]


@contextmanager
def atomic_path(path: Path, *, sync: bool = False) -> Iterator[Path]:
    """A temporary name beside `path` for the block to write; renamed onto `path` when the block
    ends without an error, removed in every case.

    Args:
        path: the file to write (its folder exists).
        sync: flush the file and the rename to disk (a power cut keeps the old file or the new).

    Yields:
        The temporary path: `.NAME.tmp-PID-HEX`, hidden from dataset readers and globs.
    """
    path = Path(path)
    partial = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        yield partial
        if sync:
            _fsync(partial, os.O_RDONLY)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    if sync:
        _fsync(path.parent, os.O_RDONLY)


def _fsync(path: Path, flags: int) -> None:
    handle = os.open(path, flags)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def write_atomic(path: Path, data: str | bytes, *, sync: bool = False) -> None:
    """Write `data` (text as UTF-8) to `path` whole or not at all (`atomic_path`)."""
    with atomic_path(path, sync=sync) as partial:
        if isinstance(data, bytes):
            partial.write_bytes(data)
        else:
            partial.write_text(data, encoding="utf-8")


def write_json(
    path: Path, value: Any, *, sort_keys: bool = True, default: Callable[[Any], Any] | None = None
) -> None:
    """`value` as indented JSON with a final newline, written atomically (`write_atomic`)."""
    write_atomic(path, json.dumps(value, indent=2, sort_keys=sort_keys, default=default) + "\n")
