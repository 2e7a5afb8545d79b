"""The store under failure: a registry write that dies midway."""

from __future__ import annotations

import builtins
import errno
from pathlib import Path
from typing import Any

import pytest
from test_features import make_dataset, write_ctr_history, write_embeddings

from nlpctr.features import render, store


@pytest.fixture
def data(tmp_path: Path) -> Path:
    folder = make_dataset(tmp_path / "ds", rows=80, seed=11)
    write_ctr_history(folder)
    return folder


class HalfWrite:
    """A file whose write puts down half the bytes and then fails, as a full disk would."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    def write(self, data: bytes) -> int:
        self.handle.write(data[: len(data) // 2])
        self.handle.flush()
        raise OSError(errno.ENOSPC, "No space left on device (injected)")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.handle, name)

    def __enter__(self) -> HalfWrite:
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.close()


def test_registry_write_failing_midway_leaves_the_previous_registry(
    data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.apply(data)
    registry = render.repo_dir(data) / "data" / "registry.db"
    before = registry.read_bytes()
    views_before = sorted(v.name for v in store.open_store(data).list_feature_views())
    write_embeddings(data, seed=11)  # the next apply registers new views

    real_open = builtins.open

    def open_failing_registry_writes(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        handle = real_open(file, mode, *args, **kwargs)
        return HalfWrite(handle) if "registry.db" in str(file) and "w" in mode else handle

    monkeypatch.setattr(builtins, "open", open_failing_registry_writes)
    with pytest.raises(OSError, match="injected"):
        store.apply(data)
    monkeypatch.undo()

    assert registry.read_bytes() == before
    assert sorted(v.name for v in store.open_store(data).list_feature_views()) == views_before
    assert [p.name for p in registry.parent.iterdir() if p.name.startswith(".registry.db")] == []
    applied = store.apply(data)  # and the next apply goes through
    assert set(applied["feature_views"]) > set(views_before)
