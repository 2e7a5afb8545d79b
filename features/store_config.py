"""A dataset's Feast configuration, `DIR/feature_repo/feature_store.yaml`: rendered by `nlpctr
features apply` from this folder's templates (`feature_store.yaml`, the embedded default;
`feature_store.redis.yaml`, the Redis online store; `feature_store.spark.yaml`, the Spark offline
side) with the dataset's project name and ABSOLUTE paths: Beam's Feast enrichment handler
copies the file to a temporary folder, where relative paths point nowhere. Configuration only:
the definitions beside it are `render.render_module`'s.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

from nlpctr.atomic import JsonObject
from nlpctr.errors import UserError
from nlpctr.features.job_outputs import JobOutputs
from nlpctr.layout import FEATURE_REPO

CONFIG_FILE = "feature_store.yaml"
ONLINE_STORES = ("sqlite", "redis")
# Feast offline stores a dataset's retrievals (and, for Spark, its materialisation) can run on:
# its DuckDB store (the default), its Spark store with the Spark compute engine (the scale-out
# path, infra/SPARK.md), and its file store (pandas/Dask; a reference the tests compare against).
OFFLINE_STORES = ("duckdb", "spark", "file")
SPARK_TEMPLATE = "feature_store.spark.yaml"
LOCAL_SPARK = "local[*]"
DEFAULT_REDIS_URL = "localhost:6379"
# A Redis that accepts the connection and then stops answering must fail a call, not hang it:
# Feast passes these connection-string parameters to redis-py (seconds).
REDIS_TIMEOUTS = {"socket_connect_timeout": 3, "socket_timeout": 5}


def with_redis_timeouts(url: str) -> str:
    """`url` with the socket timeouts it does not already set."""
    given = {part.split("=", 1)[0] for part in url.split(",")[1:] if "=" in part}
    return ",".join([url, *(f"{k}={v}" for k, v in REDIS_TIMEOUTS.items() if k not in given)])


# ------------------------------------------------------------------------------- the stores chosen

_REDIS_URL = re.compile(r"^[^:,\s]+:\d+(,.*)?$")
_SPARK_MASTER = re.compile(r"^(local(\[(\*|\d+)\])?|(spark|k8s|yarn)(://\S+)?)$")


@dataclass(frozen=True)
class StoreChoice:
    """The stores a dataset's Feast repository uses: what `nlpctr features apply` and `nlpctr
    experiment` take as `--online`, `--redis-url`, `--offline` and `--spark-master`. Checked when
    made, so a wrong choice is one line before any work.

    Attributes:
        online: one of ONLINE_STORES (SQLite in the dataset folder, or Redis).
        redis_url: HOST:PORT[,redis-py options] of the Redis (None: DEFAULT_REDIS_URL); Redis only.
        offline: one of OFFLINE_STORES.
        spark_master: the Spark master URL (None: `local[*]`); Spark only.
    """

    online: str = "sqlite"
    redis_url: str | None = None
    offline: str = "duckdb"
    spark_master: str | None = None

    def __post_init__(self) -> None:
        if self.online not in ONLINE_STORES:
            raise UserError(f"--online must be one of {', '.join(ONLINE_STORES)}, got {self.online!r}")
        if self.redis_url is not None and self.online != "redis":
            raise UserError("--redis-url goes with --online redis")
        if self.redis_url is not None and not _REDIS_URL.match(self.redis_url):
            raise UserError(f"--redis-url must be HOST:PORT (e.g. 127.0.0.1:6379), got {self.redis_url!r}")
        if self.offline not in OFFLINE_STORES:
            raise UserError(
                f"the offline store must be one of {', '.join(OFFLINE_STORES)}, got {self.offline!r}"
            )
        if self.spark_master is not None and self.offline != "spark":
            raise UserError("--spark-master goes with --offline spark")
        if self.spark_master is not None and not _SPARK_MASTER.match(self.spark_master):
            raise UserError(
                "--spark-master must be a Spark master URL (spark://HOST:PORT, ...), "
                f"got {self.spark_master!r}"
            )

    @classmethod
    def of_config(cls, config: JsonObject) -> StoreChoice:
        """The choice a rendered feature_store.yaml (as parsed) was applied with."""
        online = config.get("online_store", {}).get("type", "sqlite")
        redis_url = config["online_store"].get("connection_string") if online == "redis" else None
        offline = config.get("offline_store", {}).get("type", "duckdb")
        conf = config["offline_store"].get("spark_conf", {}) if offline == "spark" else {}
        spark = conf.get("spark.master")
        spark_master = None if spark == LOCAL_SPARK else spark
        return cls(online=online, redis_url=redis_url, offline=offline, spark_master=spark_master)


# ------------------------------------------------------------------------------- configuration


def repo_dir(data_dir: Path) -> Path:
    """Where `apply` renders the dataset's Feast repository."""
    return Path(data_dir).resolve() / FEATURE_REPO


def config_path(data_dir: Path) -> Path:
    """The rendered feature_store.yaml (absolute paths; give this to Beam's Feast handler)."""
    return repo_dir(data_dir) / CONFIG_FILE


def project_name(layout: JobOutputs) -> str:
    """Feast project of a dataset folder: the dataset name plus a hash of the folder, so two
    prepared copies never share Redis keys."""
    stem = re.sub(r"[^a-z0-9_]", "_", layout.dataset.lower()).strip("_") or "dataset"
    digest = hashlib.sha1(str(layout.data_dir).encode()).hexdigest()[:8]
    return f"nlpctr_{stem}_{digest}"


def _template(online: str) -> str:
    return "feature_store.yaml" if online == "sqlite" else "feature_store.redis.yaml"


def require_spark(java: bool = True) -> None:
    """One line, not a Py4J traceback, when Spark cannot start: no pyspark, or (`java`) no Java.
    Feast cannot even read a Spark store's configuration without pyspark; an online lookup
    needs no Java."""
    try:
        import pyspark  # noqa: F401
    except ImportError:
        raise UserError("the Spark offline store needs pyspark: pip install 'nlpctr[spark]'") from None
    # PySpark starts its Python workers with `python3` from PATH unless told: use this one, which
    # has Feast (a cluster's workers need their own, set in the cluster's environment).
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    # Feast's Spark modules warn at every use that they are "experimental" (said once, in
    # infra/SPARK.md), and their import puts a filter showing RuntimeWarnings first: import them,
    # then put ours before it.
    import feast.infra.offline_stores.contrib.spark_offline_store.spark  # noqa: F401

    warnings.filterwarnings("ignore", r"The spark .* is an experimental feature", RuntimeWarning)
    if not java:
        return
    java_home = os.environ.get("JAVA_HOME")
    if not (java_home and Path(java_home, "bin", "java").is_file()) and shutil.which("java") is None:
        raise UserError(
            "the Spark offline store needs a Java 17+ runtime (e.g. apt-get install openjdk-17-jre-headless)"
        )


def offline_config(offline: str, spark_master: str | None = None) -> JsonObject:
    """The `offline_store` (and, for Spark, `batch_engine`) sections of feature_store.yaml for
    `offline`, one of OFFLINE_STORES; `spark_master` is the Spark cluster's master URL (None:
    `local[*]`, Spark in this process's JVM)."""
    if offline not in OFFLINE_STORES:
        raise UserError(f"the offline store must be one of {', '.join(OFFLINE_STORES)}, got {offline!r}")
    if spark_master is not None and offline != "spark":
        raise UserError("--spark-master goes with --offline spark")
    if offline != "spark":
        return {"offline_store": {"type": offline}}
    master = spark_master or LOCAL_SPARK
    if not _SPARK_MASTER.match(master):
        raise UserError(f"--spark-master must be a Spark master URL (spark://HOST:PORT, ...), got {master!r}")
    sections = yaml.safe_load(resources.files("nlpctr.features").joinpath(SPARK_TEMPLATE).read_text())
    conf = {**sections.pop("spark_conf"), "spark.master": master}
    if master.startswith("local"):
        # The driver's ports serve only this process: bind them to loopback, not every interface.
        conf.update({"spark.driver.bindAddress": "127.0.0.1", "spark.driver.host": "127.0.0.1"})
    for section in sections.values():
        # A copy each: one shared dict would be dumped as a YAML anchor and alias, which the
        # project's own reader (config_files) refuses.
        section["spark_conf"] = dict(conf)
    return sections


def render_config(layout: JobOutputs, store: StoreChoice) -> JsonObject:
    """The embedded default (or Redis variant) config with absolute paths for this dataset,
    its offline side from `offline_config`."""
    config = yaml.safe_load(resources.files("nlpctr.features").joinpath(_template(store.online)).read_text())
    data = repo_dir(layout.data_dir) / "data"
    config["project"] = project_name(layout)
    config["registry"]["path"] = str(data / "registry.db")
    if store.online == "sqlite":
        config["online_store"]["path"] = str(data / "online_store.db")
    else:
        config["online_store"]["connection_string"] = with_redis_timeouts(
            store.redis_url or DEFAULT_REDIS_URL
        )
    sections = offline_config(store.offline, store.spark_master)
    config["offline_store"] = sections.pop("offline_store")  # in the template's place
    return {**config, **sections}


def config_text(config: JsonObject, store: StoreChoice) -> str:
    """feature_store.yaml as apply writes it (`config` from `render_config(..., store)`)."""
    return (
        f"# Rendered by `nlpctr features apply` from nlpctr/features/{_template(store.online)}; "
        "re-run apply rather than edit.\n" + yaml.safe_dump(config, sort_keys=False)
    )
