"""The store under failure: a registry write that dies midway, and a corrected feature value
re-materialised at the same event time (Feast's Redis store skips those by default).

The Redis case starts its own redis-server on a free loopback port, and is skipped, with the
reason, when `redis-server` is not on PATH.
"""

from __future__ import annotations

import builtins
import errno
import io
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.dataset as ds
import pytest
from builders import make_dataset, write_ctr_history, write_embeddings

from nlpctr.features import store, store_config
from nlpctr.features.local_redis import LocalRedisServer
from nlpctr.features.store_config import StoreChoice


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
    registry = store_config.repo_dir(data) / "data" / "registry.db"
    before = registry.read_bytes()
    views_before = sorted(v.name for v in store.open_store(data).list_feature_views())
    write_embeddings(data, seed=11)  # the next apply registers new views

    real_open = builtins.open

    def open_failing_registry_writes(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        handle = real_open(file, mode, *args, **kwargs)
        return HalfWrite(handle) if "registry.db" in str(file) and "w" in mode else handle

    # Both ways a registry file gets opened: open() (Feast's own file store) and io.open, which
    # pathlib's Path.write_bytes goes through (nlpctr.atomic, the atomic registry store's writer).
    monkeypatch.setattr(builtins, "open", open_failing_registry_writes)
    monkeypatch.setattr(io, "open", open_failing_registry_writes)
    with pytest.raises(OSError, match="injected"):
        store.apply(data)
    monkeypatch.undo()

    assert registry.read_bytes() == before
    assert sorted(v.name for v in store.open_store(data).list_feature_views()) == views_before
    assert [p.name for p in registry.parent.iterdir() if p.name.startswith(".registry.db")] == []
    applied = store.apply(data)  # and the next apply goes through
    assert set(applied["feature_views"]) > set(views_before)


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not on PATH (apt-get install redis-server); CI installs it")
    server = LocalRedisServer(tmp_path)
    yield server.url
    server.stop()


@pytest.mark.parametrize("online", ["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def test_corrected_value_at_the_same_event_time_is_served_after_rematerialising(
    data: Path, online: str, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue("redis_url") if online == "redis" else None
    store.apply(data, StoreChoice(online=online, redis_url=url))
    store.materialize(data)
    row = {"ad_id": "ad000", "query_id": "q", "position": "1"}
    feature = "ctr_position__position_ctr"
    served = store.OnlineFeatures(data, "baseline").get([row]).columns[feature][0]

    # ctr-stats re-run with another prior: the same keys and snapshot time, other values.
    write_ctr_history(data, prior_strength=1000.0)
    levels = ds.dataset(data / "ctr_history" / "position").to_table().to_pandas().set_index("position")
    expected = float(levels.loc["1", "position_ctr"])
    assert expected != pytest.approx(served)
    store.materialize(data)
    assert store.OnlineFeatures(data, "baseline").get([row]).columns[feature][0] == pytest.approx(expected)
