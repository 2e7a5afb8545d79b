"""The Beam jobs on a distributed engine: Dask, two worker processes, outputs identical to
the DirectRunner's (same rows and values, same manifest counts, no temp folders left)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import distributed
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from nlpctr.pipelines import ctr_stats, ingest, simulate

pytestmark = pytest.mark.slow
RUNNER = "nlpctr.pipelines.dask_runner.DaskRunner"


@pytest.fixture(scope="module")
def cluster() -> Iterator[distributed.LocalCluster]:
    local = distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
    )
    try:
        yield local
    finally:
        local.close()


@pytest.fixture(scope="module")
def spec(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A simulated log (time split, four entities) plus rows ingest must reject or dedup:
    exact and conflicting duplicates of an impression_id, and rows without ad text."""
    folder = tmp_path_factory.mktemp("dist")
    log = folder / "log.parquet"
    argv = ["--rows", "1000", "--rho", "0.5", "--seed", "0", "--chunk-rows", "250", "--no-progress"]
    simulate.run([*argv, "--out", str(log)])
    table = pq.read_table(log)
    duplicates = table.slice(0, 10)
    conflicting = table.slice(10, 10).set_column(
        table.schema.get_field_index("clicked"), table.schema.field("clicked"), pa.array([1] * 10, pa.int8())
    )
    no_text = table.slice(20, 5).set_column(
        table.schema.get_field_index("ad_text"), table.schema.field("ad_text"), pa.array([""] * 5)
    )
    pq.write_table(pa.concat_tables([table, duplicates, conflicting, no_text]), log, row_group_size=250)
    spec = folder / "log.spec.yaml"
    spec.write_text(spec.read_text().replace("max_reject_rate: 0.0", "max_reject_rate: 0.05"))
    return spec


def prepare_and_stats(spec: Path, out: Path, beam_args: list[str]) -> dict:
    manifest = ingest.run(["--dataset", str(spec), "--out", str(out), *beam_args])
    ctr_stats.run(["--data", str(out), *beam_args])
    return manifest


def sorted_table(path: Path, key: str) -> pa.Table:
    return ds.dataset(path, format="parquet").to_table().sort_by([(key, "ascending")])


def test_ingest_and_ctr_stats_on_dask_match_the_direct_runner(
    cluster: distributed.LocalCluster, spec: Path, tmp_path: Path
) -> None:
    direct = prepare_and_stats(spec, tmp_path / "direct", [])
    dask_args = ["--runner", RUNNER, "--dask_client_address", cluster.scheduler_address,
                 "--dask_npartitions", "2"]  # fmt: skip
    on_dask = prepare_and_stats(spec, tmp_path / "dask", dask_args)

    assert direct["rows_in"] == 1025 and direct["rejected_by_reason"] == {
        "duplicate_impression_id": 20,
        "missing_text": 5,
    }
    for manifest in (direct, on_dask):
        manifest.pop("wall_seconds"), manifest.pop("summary")
    assert on_dask == direct
    manifests = [json.loads((tmp_path / run / "manifest.json").read_text()) for run in ("direct", "dask")]
    assert {k: v for k, v in manifests[0].items() if k != "wall_seconds"} == {
        k: v for k, v in manifests[1].items() if k != "wall_seconds"
    }

    entities = direct["entities"]
    outputs = {"impressions": "impression_id", "ctr_history_rows": "impression_id"}
    outputs.update({f"ctr_history/{entity}": entity for entity in entities})
    for folder, key in outputs.items():
        expected = sorted_table(tmp_path / "direct" / folder, key)
        got = sorted_table(tmp_path / "dask" / folder, key)
        assert expected.num_rows > 0
        assert got.equals(expected), folder
    rejected = {
        run: sorted(
            line for p in (tmp_path / run / "rejected").glob("*.jsonl") for line in p.read_text().splitlines()
        )
        for run in ("direct", "dask")
    }
    assert len(rejected["dask"]) == 25 and rejected["dask"] == rejected["direct"]
    assert (tmp_path / "dask" / "ctr_history" / "_meta.json").read_text() == (
        tmp_path / "direct" / "ctr_history" / "_meta.json"
    ).read_text()

    # Nothing half-written or temporary is left: no Beam temp folders, no staging folders.
    leftovers = [p for p in tmp_path.rglob("*") if "temp" in p.name or p.name.startswith(".")]
    assert leftovers == []
    # Both worker processes did part of the work.
    with distributed.Client(cluster) as client:
        executed = client.run(lambda dask_worker: dask_worker.state.executed_count)
    assert len(executed) == 2 and min(executed.values()) > 0
