"""Register a dataset's Feast objects (`apply`), and open the applied store, refusing one that no
longer matches what the jobs wrote."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from feast import FeatureStore
from feast.data_source import DataSource
from feast.repo_config import RepoConfig

from nlpctr.atomic import JsonObject
from nlpctr.config_files import read_mapping
from nlpctr.errors import UserError
from nlpctr.features.definitions import Definitions, build_definitions
from nlpctr.features.job_outputs import JobOutputs
from nlpctr.features.names import embedding_view_name
from nlpctr.features.registry_store import write_atomically
from nlpctr.features.render import REPO_MODULE, check_module, read_encoder, render_module
from nlpctr.features.store.connection import online_store_errors, ping_redis
from nlpctr.features.store.state import fix_command, read_state, write_state
from nlpctr.features.store_config import (
    CONFIG_FILE,
    StoreChoice,
    config_path,
    config_text,
    offline_config,
    render_config,
    repo_dir,
    require_spark,
)


def _kind(obj: Any) -> str:
    """A registry object's kind; a source stays the same object when it changes class (a
    FileSource re-declared as a SparkSource by `apply --offline spark`)."""
    return "DataSource" if isinstance(obj, DataSource) else type(obj).__name__


def _write_repo(layout: JobOutputs, config: JsonObject, store: StoreChoice, definitions: Definitions) -> Path:
    """Write DIR/feature_repo/ (its feature_store.yaml for `store` and the rendered
    definitions module); a registry kept for another online store or project is emptied first.
    Returns the folder."""
    repo = repo_dir(layout.data_dir)
    data = repo / "data"
    try:
        old_config = read_store_config(layout.data_dir) if (repo / CONFIG_FILE).is_file() else None
    except UserError:  # a damaged config: which store it named is unknown, so the registry starts afresh
        old_config = {}
    if old_config is not None and (
        old_config.get("online_store") != config["online_store"]
        or old_config.get("project") != config["project"]
    ):
        shutil.rmtree(data, ignore_errors=True)
    data.mkdir(parents=True, exist_ok=True)
    write_atomically(repo / CONFIG_FILE, config_text(config, store).encode())
    module = render_module(definitions, layout.data_dir, layout.dataset)
    check_module(module, repo / REPO_MODULE, definitions)  # what `feast plan` reads is what we apply
    write_atomically(repo / REPO_MODULE, module.encode())
    return repo


def _register(repo: Path, definitions: Definitions, data_dir: Path) -> list[Any]:
    """Apply `definitions` to the registry, deleting what they no longer hold (returned), and
    forget the materialisation of views that are gone."""
    feast = FeatureStore(repo_path=str(repo))
    wanted = {_kind(o) + ":" + o.name for o in definitions.objects()}
    existing = [
        *feast.list_feature_services(),
        *feast.list_feature_views(),
        *feast.list_data_sources(),
        *feast.list_entities(),
    ]
    stale = [o for o in existing if _kind(o) + ":" + o.name not in wanted]
    with online_store_errors(feast):
        feast.apply(definitions.objects(), objects_to_delete=stale, partial=False)
    state = read_state(data_dir)
    state["materialized"] = {k: v for k, v in state.get("materialized", {}).items() if k in definitions.views}
    write_state(data_dir, state)
    return stale


def apply(data_dir: Path, store: StoreChoice | None = None, encoder: str | None = None) -> JsonObject:
    """Render DIR/feature_repo/ and register DIR's entities, views and services with Feast.

    Objects from an earlier apply that the jobs' outputs no longer back are deleted. If the
    online store changed (SQLite <-> Redis, another Redis), the registry starts afresh, since
    its materialisation records would describe the old store.

    Args:
        data_dir: a prepared dataset folder.
        store: the online and offline stores (default: SQLite and DuckDB). Spark also
            materialises through Feast's Spark compute engine and declares SparkSources.
        encoder: the embedding slug `cascade_frozen` serves when there are several.

    Returns:
        What was applied (project, stores, views, services, deleted objects) and a `summary` line.

    Raises:
        UserError: nothing to register, a store unreachable or missing its prerequisites.
    """
    store = store or StoreChoice()
    online, offline = store.online, store.offline
    check_duckdb_path(data_dir, offline)
    layout = JobOutputs.discover(data_dir)
    if not layout.ctr and not layout.embeddings:
        raise UserError(
            f"nothing to register in {layout.data_dir}: run `nlpctr ctr-stats --data {layout.data_dir}` "
            f"and/or `nlpctr embed --data {layout.data_dir}` first"
        )
    layout.check_unique_keys()
    config = render_config(layout, store)
    if offline == "spark":
        require_spark()
    definitions = build_definitions(layout, encoder=encoder, offline=offline)
    if online == "redis":
        ping_redis(config["online_store"]["connection_string"])  # before touching the old store
    repo = _write_repo(layout, config, store, definitions)
    stale = _register(repo, definitions, layout.data_dir)
    views = sorted(definitions.views)
    services = sorted(definitions.services)
    summary = (
        f"applied {config['project']}: {len(definitions.entities)} entities, {len(views)} feature views "
        f"({', '.join(views)}), {len(services)} services ({', '.join(services)}); "
        f"online store {online}"
        + (f" at {config['online_store']['connection_string']}" if online == "redis" else "")
        + f"; offline store {offline}"
        + (f" on {config['offline_store']['spark_conf']['spark.master']}" if offline == "spark" else "")
        + f"; deleted {len(stale)} stale object(s) -> {repo}"
    )
    return {
        "project": config["project"],
        "repo": str(repo),
        "online_store": online,
        "offline_store": offline,
        "entities": sorted(definitions.entities),
        "feature_views": views,
        "feature_services": services,
        "default_encoder": definitions.default_encoder,
        "deleted": sorted(o.name for o in stale),
        "summary": summary,
    }


def reapply(data_dir: Path) -> JsonObject:
    """`apply` again with the stores and encoder the last apply chose (after a job, such as a
    trainer, adds a view); a fresh dataset gets the defaults."""
    repo = repo_dir(data_dir)
    store, encoder = StoreChoice(), None
    if (repo / CONFIG_FILE).is_file():
        store = StoreChoice.of_config(read_store_config(data_dir))
    if (repo / REPO_MODULE).is_file():
        encoder = read_encoder((repo / REPO_MODULE).read_text())
    return apply(data_dir, store, encoder=encoder)


def open_store(data_dir: Path, offline: str | None = None) -> FeatureStore:
    """The applied store of DIR, or a UserError that says to run apply.

    `offline` swaps the rendered config's offline store for DuckDB's or the file store's, in
    this process only: how the benchmark and the tests run one retrieval through each; None
    keeps what feature_store.yaml says. Spark is chosen at apply, since its sources differ.

    Args:
        data_dir: a prepared dataset folder on which `apply` has run.
        offline: "duckdb" or "file" to swap the offline store for this process; None keeps the
            applied one.

    Returns:
        The Feast `FeatureStore` of DIR/feature_repo/.

    Raises:
        UserError: DIR has no feature store yet (no feature_store.yaml or registry), Spark is
            applied but not installed, or `offline` asks to switch to or from Spark.
    """
    path = config_path(data_dir)
    registry = repo_dir(data_dir) / "data" / "registry.db"
    if not path.is_file() or not registry.is_file():
        raise UserError(
            f"{Path(data_dir).resolve()} has no feature store yet: run {fix_command('apply', data_dir)}"
        )
    config = read_store_config(data_dir)
    applied = StoreChoice.of_config(config).offline
    if applied == "spark":
        require_spark(java=False)  # Java is checked where Spark starts (`spark_errors`)
    if offline is None or offline == applied:
        return _feature_store(data_dir, lambda: FeatureStore(repo_path=str(repo_dir(data_dir))))
    if "spark" in (offline, applied):
        raise UserError(
            f"{Path(data_dir).resolve()} is applied for the {applied} offline store: run "
            f"`nlpctr features apply --data {Path(data_dir).resolve()} --offline {offline}`"
        )
    config["offline_store"] = offline_config(offline)["offline_store"]
    return _feature_store(
        data_dir, lambda: FeatureStore(config=RepoConfig(repo_path=repo_dir(data_dir), **config))
    )


def check_duckdb_path(data_dir: Path, offline: str) -> None:
    """Refuse Feast's DuckDB offline store on a folder whose path holds a backslash: DuckDB reads
    a source path as a pattern in which `\\` escapes the next character, so it finds none of the
    files (Feast's file store reads them, and the streamed join lists its files one by one)."""
    if offline == "duckdb" and "\\" in str(Path(data_dir).resolve()):
        raise UserError(
            f"{Path(data_dir).resolve()} holds a backslash, which Feast's DuckDB offline store reads as an "
            f"escape (it would find none of its files); apply with {fix_command('apply', data_dir)[:-1]} "
            "--offline file` (Feast's file store reads them), or move the folder to a path without one"
        )


def _reapply_hint(data_dir: Path) -> str:
    return f"re-apply: {fix_command('apply', data_dir)} (with the --online/--offline it was applied with)"


def read_store_config(data_dir: Path) -> JsonObject:
    """DIR's feature_store.yaml, read by the project's YAML reader.

    Raises:
        UserError: damaged (not YAML, not a mapping, binary): names it and says to re-apply.
    """
    path = config_path(data_dir)
    return read_mapping(path, str(path), _reapply_hint(data_dir))


def _feature_store(data_dir: Path, build: Callable[[], FeatureStore]) -> FeatureStore:
    """Feast's store from DIR's config; a config Feast refuses (a damaged file that still reads
    as YAML) is one line saying to re-apply."""
    try:
        return build()
    except UserError:
        raise
    except Exception as exc:  # pydantic's ValidationError, Feast's own config errors
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"{config_path(data_dir)} is not a store config Feast accepts ({first[:100]}); "
            f"{_reapply_hint(data_dir)}"
        ) from None


@contextlib.contextmanager
def spark_errors(store: FeatureStore) -> Iterator[None]:
    """Around Feast's offline calls: Spark's prerequisites checked first (an online lookup needs
    none), and a Spark job's failure as one line (the JVM's first line), not a Py4J traceback.
    Feast's SparkSource raises DataSourceNotFoundException when Spark cannot read a source; the
    Spark error under it is the reason given."""
    if store.config.offline_store.type != "spark":
        yield
        return
    require_spark()
    if store.config.offline_store.spark_conf.get("spark.master", "").startswith("local"):
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")  # as the driver binds: no warning
    from feast.errors import DataSourceNotFoundException
    from pyspark.errors import PySparkException
    from pyspark.logger import PySparkLogger

    # Feast's SparkSource logs a traceback before raising, PySpark a JSON record with the JVM's
    # stack for a failed DataFrame or SQL query: the one line below says it.
    quiet = [
        logging.getLogger("feast.infra.offline_stores.contrib.spark_offline_store.spark_source"),
        # PySpark's own logger class (its `exception` takes extra fields a plain Logger refuses).
        PySparkLogger.getLogger("DataFrameQueryContextLogger"),
        PySparkLogger.getLogger("SQLQueryContextLogger"),
    ]
    levels = [log.level for log in quiet]
    for log in quiet:
        log.setLevel(logging.CRITICAL)
    try:
        yield
    except PySparkException as error:
        raise UserError(f"Feast's Spark store failed: {_first_line(error)}") from None
    except DataSourceNotFoundException as error:
        cause = error.__context__
        reason = _first_line(cause) if isinstance(cause, PySparkException) else str(error)
        raise UserError(f"Feast's Spark store could not read a source: {reason}") from None
    finally:
        for log, level in zip(quiet, levels, strict=True):
            log.setLevel(level)


def _first_line(error: BaseException) -> str:
    return next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)


def check_current(store: FeatureStore, data_dir: Path) -> JobOutputs:
    """Refuse a registry that no longer matches what the jobs wrote (views added, removed, or
    an encoder folder now holding another encoder)."""
    layout = JobOutputs.discover(data_dir)
    registered = {v.name: v for v in store.list_feature_views(allow_cache=False)}
    expected = layout.sources()
    added, gone = sorted(set(expected) - set(registered)), sorted(set(registered) - set(expected))
    changed = sorted(
        e.slug
        for e in layout.embeddings
        if (view := registered.get(embedding_view_name(e.slug))) is not None
        and view.tags.get("encoder_version") != e.encoder_version
    )
    # Registered before sources declared their format: Feast's DuckDB store cannot read them.
    unformatted = sorted(
        v.name for v in registered.values() if getattr(v.batch_source, "file_format", True) is None
    )
    if added or gone or changed or unformatted:
        parts = [f"new: {', '.join(added)}"] * bool(added) + [f"gone: {', '.join(gone)}"] * bool(gone)
        parts += [f"encoder changed: {', '.join(changed)}"] * bool(changed)
        parts += [f"no source format: {', '.join(unformatted)}"] * bool(unformatted)
        raise UserError(
            f"the feature store of {layout.data_dir} is out of date ({'; '.join(parts)}): "
            f"run {fix_command('apply', data_dir)} then {fix_command('materialize', data_dir)}"
        )
    return layout
