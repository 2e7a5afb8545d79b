"""Killed mid-run: `nlpctr embed` and `nlpctr features materialize` are started as processes,
SIGKILLed once there is evidence they are half-way (files being written), and rerun.

The rerun completes; the offline parquet and the online store hold exactly one row per key;
nothing partial or temporary is left in the output folders; the values equal those of a run
that was never killed.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import yaml
from builders import write_ctr_history

from nlpctr.errors import UserError
from nlpctr.features import store, store_config
from nlpctr.features.names import embedding_view_name
from nlpctr.layout import EMBEDDINGS_MANIFEST, embeddings_dir
from nlpctr.models.encoder import EncoderConfig
from nlpctr.models.schema import impression_schema, text_id
from nlpctr.pipelines import cli, embed_reuse, embed_text

pytestmark = pytest.mark.slow

CONFIG = EncoderConfig(layers=1)
# Unique ad texts: more than one parquet write batch (1024), so the job is seen writing its
# first file while it still encodes the rest.
ADS = 1500
WORDS = ("why", "how", "ten", "dogs", "cats", "money", "health", "secret", "city", "water", "video",
         "school", "never", "believe", "what", "happened", "next", "tiny", "giant", "trick")  # fmt: skip


def write_dataset(root: Path) -> Path:
    """A prepared dataset: manifest + impressions, one row per ad, 40 queries, 5 positions."""
    rng = random.Random(7)
    base = datetime(2024, 1, 1, tzinfo=UTC)
    queries = [" ".join(rng.choices(WORDS, k=3)) + f" q{i}" for i in range(40)]
    rows = []
    for i in range(ADS):
        ad = " ".join(rng.choices(WORDS, k=rng.randint(3, 20))) + f" number {i}"
        query = rng.choice(queries)
        rows.append(
            {
                "impression_id": f"i{i}",
                "event_timestamp": base + timedelta(minutes=i),
                "query_id": text_id(query),
                "query_text": query,
                "ad_id": f"ad{i}",
                "ad_text": ad,
                "position": str(1 + i % 5),
                "impressions": 1,
                "clicks": int(rng.random() < 0.1),
                "query_text_id": text_id(query),
                "ad_text_id": text_id(ad),
                "split": rng.choice(["train"] * 8 + ["valid", "test"]),
            }
        )
    (root / "impressions").mkdir(parents=True)
    table = pa.Table.from_pylist(rows, schema=impression_schema(["position"]))
    pq.write_table(table, root / "impressions" / "part-00000-of-00001.parquet")
    manifest = {"dataset": "crash", "context_columns": ["position"], "group": "query_id",
                "entities": ["ad_id", "query_id", "position"], "rows_written": len(rows)}  # fmt: skip
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def copy_dataset(source: Path, target: Path) -> Path:
    """The job inputs of a dataset, in a fresh folder (no store, no embeddings)."""
    target.mkdir(parents=True)
    shutil.copytree(source / "impressions", target / "impressions")
    shutil.copy(source / "manifest.json", target / "manifest.json")
    return target


def start(log: Path, *argv: str) -> subprocess.Popen[bytes]:
    """`nlpctr ARGV` as its own process, as a user (or a scheduler) starts it; output to `log`
    (a file, not a pipe: a full pipe would stall the job)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "nlpctr.pipelines.cli", *argv], env=env, stdout=out, stderr=out
        )


def kill_when(
    process: subprocess.Popen[bytes], halfway: Callable[[], bool], log: Path, timeout_s: float = 120
) -> None:
    """SIGKILL `process` as soon as `halfway()` holds; fail if it ends or times out first."""
    deadline = time.monotonic() + timeout_s
    while not halfway():
        if process.poll() is not None:
            pytest.fail(f"the job ended (exit {process.returncode}) before it could be killed half-way:\n"
                        f"{log.read_text(errors='replace')[-3000:]}")  # fmt: skip
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("no sign of progress to kill on")
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL


def rerun(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """The rerun, through the same CLI entry point (in this process: no second import cost)."""
    assert cli.main(list(argv)) == 0
    return capsys.readouterr().out


def hidden_entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.startswith(".") or "tmp" in p.name)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("crash")
    killed = write_dataset(root / "killed")
    clean = copy_dataset(killed, root / "clean")
    return {"killed": killed, "clean": clean}


@pytest.fixture(scope="module")
def clean_embeddings(datasets: dict[str, Path]) -> pa.Table:
    """The never-killed run (in this process), whose output the recovered one must equal."""
    summary = embed_text.run(["--data", str(datasets["clean"]), "--layers", str(CONFIG.layers)])
    assert summary["rows_written"] == summary["unique_texts"] > ADS
    return ds.dataset(summary["out"], format="parquet").to_table().sort_by("text_id")


def test_embed_killed_mid_run_reruns_to_the_clean_output(
    datasets: dict[str, Path], clean_embeddings: pa.Table, capsys: pytest.CaptureFixture[str]
) -> None:
    data = datasets["killed"]
    folder = embeddings_dir(data, CONFIG.slug)
    args = ("embed", "--data", str(data), "--layers", str(CONFIG.layers))

    def writing_parquet() -> bool:
        # Beam's file sink has opened its first temporary parquet inside the staging folder:
        # texts are encoded and being written, and the job has not published yet.
        return any(folder.parent.glob(f".{folder.name}.tmp-*/**/*.parquet"))

    log = data.parent / "embed.log"
    kill_when(start(log, *args), writing_parquet, log)
    assert not folder.exists()  # nothing was published
    assert hidden_entries(data / "embeddings")  # the killed run's staging folder is still there

    rerun(capsys, *args)
    assert sorted(p.name for p in (data / "embeddings").iterdir()) == [CONFIG.slug]
    assert hidden_entries(data / "embeddings") == []
    metadata = sorted(p.name for p in folder.iterdir() if not p.name.endswith(".parquet"))
    assert [m for m in metadata if not m.startswith(embed_reuse.SPELLINGS_PREFIX)] == [EMBEDDINGS_MANIFEST]
    recovered = ds.dataset(folder, format="parquet").to_table().sort_by("text_id")
    ids = recovered.column("text_id").to_pylist()
    assert len(ids) == len(set(ids))  # one row per text id
    assert recovered.equals(clean_embeddings)


def online_rows(data: Path) -> dict[tuple[str, bytes, str], tuple[bytes, Any]]:
    """Every row of the SQLite online store: (view, entity key, feature) -> (value, event time)."""
    config = yaml.safe_load(store_config.config_path(data).read_text())
    project = config["project"]
    rows: dict[tuple[str, bytes, str], tuple[bytes, Any]] = {}
    with sqlite3.connect(config["online_store"]["path"]) as conn:
        tables = [r[0] for r in conn.execute("select name from sqlite_master where type='table'")]
        for table in tables:
            view = table.removeprefix(f"{project}_")
            for key, feature, value, event_ts in conn.execute(
                f'select entity_key, feature_name, value, event_ts from "{table}"'
            ):
                assert (view, key, feature) not in rows  # one row per key and feature
                rows[(view, key, feature)] = (value, event_ts)
    return rows


def count_rows(database: Path, table: str) -> int:
    """Rows committed so far by the materialising process (0 until its table exists)."""
    try:
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=0.05) as conn:
            return int(conn.execute(f'select count(distinct entity_key) from "{table}"').fetchone()[0])
    except sqlite3.OperationalError:  # not created yet, or locked by the writer's commit
        return 0


def test_materialize_killed_mid_run_reruns_to_one_row_per_key(
    datasets: dict[str, Path], clean_embeddings: pa.Table, capsys: pytest.CaptureFixture[str]
) -> None:
    data, clean = datasets["killed"], datasets["clean"]
    if not embeddings_dir(data, CONFIG.slug).exists():
        pytest.skip("needs the recovered embeddings of the embed test")
    for folder in (data, clean):
        write_ctr_history(folder)
        store.apply(folder)
    store.materialize(clean)  # the never-killed store
    expected = online_rows(clean)

    # Small online write batches: many commits, so the store is seen half-written.
    config_file = store_config.config_path(data)
    config = yaml.safe_load(config_file.read_text())
    config["materialization"]["online_write_batch_size"] = 25
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    database = Path(config["online_store"]["path"])
    table = f"{config['project']}_{embedding_view_name(CONFIG.slug)}"
    texts = clean_embeddings.num_rows

    log = data.parent / "materialize.log"
    started = start(log, "features", "materialize", "--data", str(data))
    kill_when(started, lambda: count_rows(database, table) > 0, log)
    partial = count_rows(database, table)
    assert 0 < partial < texts, partial
    with pytest.raises(UserError, match=r"did not finish .* half-written: run `nlpctr features materialize"):
        store.OnlineFeatures(data, "cascade_frozen")  # a half-written store is never served

    out = rerun(capsys, "features", "materialize", "--data", str(data))
    assert "materialized" in out.splitlines()[-1]
    got = online_rows(data)
    assert count_rows(database, table) == texts
    assert sorted(got.items()) == sorted(expected.items())  # same keys, values and times
    assert sorted(p.name for p in database.parent.iterdir()) == [
        "nlpctr_state.json", "online_store.db", "registry.db"
    ]  # fmt: skip
    lookup = store.OnlineFeatures(data, "cascade_frozen")
    first = clean_embeddings.slice(0, 3).to_pylist()
    rows = [dict.fromkeys(lookup.keys, "x") | {"ad_text_id": r["text_id"]} for r in first]
    column = f"ad_text_{CONFIG.slug}__embedding"
    assert lookup.get(rows).columns[column] == [pytest.approx(r["embedding"]) for r in first]
