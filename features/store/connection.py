"""Reaching the online store: a Redis that does not answer fails with the fix in one line, and a
Redis that lost its data (restarted without persistence, or flushed) is told from an empty one."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from feast import FeatureStore

from nlpctr.errors import UserError
from nlpctr.features.store.state import fix_command
from nlpctr.features.store_config import REDIS_TIMEOUTS


def first_node(connection_string: str) -> str:
    """HOST:PORT of a Redis connection string's first node (not its client parameters)."""
    return connection_string.split(",")[0]


def unreachable(connection_string: str, exc: BaseException) -> UserError:
    """The error for a Redis online store that does not answer, naming the fix."""
    reason = str(exc).splitlines()[0]
    return UserError(
        f"the Redis online store at {first_node(connection_string)} is unreachable ({reason}); "
        "start redis-server there, or re-apply with `--online redis --redis-url HOST:PORT` "
        "(or `--online sqlite`)"
    )


@contextlib.contextmanager
def online_store_errors(store: FeatureStore) -> Iterator[None]:
    """Turn an online store that stops answering mid-call into a UserError that names the fix."""
    import redis.exceptions

    try:
        yield
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
        raise unreachable(getattr(store.config.online_store, "connection_string", "?"), exc) from None


@contextlib.contextmanager
def redis_client(connection_string: str) -> Iterator[Any]:
    """A client of the (first) Redis node, without retries: redis-py retries a refused
    connection with backoff for several seconds per call, one try gives the same verdict."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    host, _, port = first_node(connection_string).partition(":")
    client = redis.Redis(
        host=host,
        port=int(port or 6379),
        socket_connect_timeout=REDIS_TIMEOUTS["socket_connect_timeout"],
        socket_timeout=REDIS_TIMEOUTS["socket_timeout"],
        retry=Retry(NoBackoff(), 0),
    )
    try:
        yield client
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
        raise unreachable(connection_string, exc) from None
    finally:
        client.close()


def ping_redis(connection_string: str) -> None:
    """Fail fast, with the fix, when a Redis server does not answer a PING."""
    with redis_client(connection_string) as client:
        client.ping()


def single_redis(store: FeatureStore) -> str | None:
    """The connection string of a single-node Redis online store; None for SQLite (or a cluster)."""
    config = store.config.online_store
    kind = getattr(config, "redis_type", None)
    return (
        config.connection_string
        if config.type == "redis" and getattr(kind, "value", kind) == "redis"
        else None
    )


def probe_online_store(store: FeatureStore) -> None:
    """Ping a (single-node) Redis online store before using it; SQLite needs no probe."""
    if (url := single_redis(store)) is not None:
        ping_redis(url)


# A Redis that restarts without persistence (or is flushed) comes back empty, and every lookup
# would then read as "unknown key". materialize leaves this hash in Redis (under the project,
# so each dataset has its own); serving checks that it is still there.
def materialized_mark(store: FeatureStore) -> str:
    return f"nlpctr:{store.config.project}:materialized"


def write_materialized_mark(store: FeatureStore) -> None:
    if (url := single_redis(store)) is not None:
        with redis_client(url) as client:
            client.hset(materialized_mark(store), "by", "nlpctr features materialize")


def check_materialized_mark(store: FeatureStore, data_dir: Path) -> None:
    if (url := single_redis(store)) is None:
        return
    with redis_client(url) as client:
        found = client.exists(materialized_mark(store))
    if not found:
        raise UserError(
            f"the Redis online store at {first_node(url)} holds none of the materialised features of "
            f"{Path(data_dir).resolve()} (restarted without persistence, or flushed?): "
            f"run {fix_command('materialize', data_dir)}"
        )
