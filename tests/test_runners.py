"""The Beam jobs through Beam's portable job API, on the one portable runner that needs no
download here: `--runner=PortableRunner --job_endpoint=embed --environment_type=LOOPBACK`
(Beam's in-process Python job service; the pipeline goes to it as a runner-API proto and its
bundles to an SDK worker over the Fn API, as they would to a Flink or Spark job server).
Outputs must equal the DirectRunner's. `pipelines/loopback.py` binds its gRPC servers to loopback
(tests/test_loopback.py). See infra/RUNNERS.md."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from nlpctr.pipelines import ctr_stats, ingest, simulate

pytestmark = pytest.mark.slow
PORTABLE = ["--runner=PortableRunner", "--job_endpoint=embed", "--environment_type=LOOPBACK"]


@pytest.fixture(scope="module")
def spec(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """300 simulated rows plus 5 exact duplicates and 3 rows without ad text (dead letters)."""
    folder = tmp_path_factory.mktemp("runners")
    log = folder / "log.parquet"
    argv = ["--rows", "300", "--rho", "0.5", "--seed", "0", "--chunk-rows", "100", "--no-progress"]
    simulate.run([*argv, "--out", str(log)])
    table = pq.read_table(log)
    no_text = table.slice(10, 3).set_column(
        table.schema.get_field_index("ad_text"), table.schema.field("ad_text"), pa.array([""] * 3)
    )
    pq.write_table(pa.concat_tables([table, table.slice(0, 5), no_text]), log, row_group_size=100)
    spec = folder / "log.spec.yaml"
    spec.write_text(spec.read_text().replace("max_reject_rate: 0.0", "max_reject_rate: 0.05"))
    return spec


def prepare_and_stats(spec: Path, out: Path, beam_args: list[str]) -> dict[str, Any]:
    manifest = ingest.run(["--dataset", str(spec), "--out", str(out), *beam_args])
    ctr_stats.run(["--data", str(out), *beam_args])
    manifest.pop("wall_seconds"), manifest.pop("summary")
    return manifest


def table(path: Path, key: str) -> pa.Table:
    return ds.dataset(path, format="parquet").to_table().sort_by([(key, "ascending")])


def test_prepare_and_ctr_stats_on_the_portable_runner_match_the_direct_runner(
    spec: Path, tmp_path: Path
) -> None:
    direct = prepare_and_stats(spec, tmp_path / "direct", [])
    portable = prepare_and_stats(spec, tmp_path / "portable", PORTABLE)

    assert direct["rows_in"] == 308
    assert direct["rejected_by_reason"] == {"duplicate_impression_id": 5, "missing_text": 3}
    assert portable == direct
    manifests = [json.loads((tmp_path / run / "manifest.json").read_text()) for run in ("direct", "portable")]
    for manifest in manifests:
        manifest.pop("wall_seconds")
    assert manifests[0] == manifests[1]

    outputs = {"impressions": "impression_id", "ctr_history_rows": "impression_id"}
    outputs.update({f"ctr_history/{entity}": entity for entity in direct["entities"]})
    for folder, key in outputs.items():
        expected = table(tmp_path / "direct" / folder, key)
        assert expected.num_rows > 0
        assert table(tmp_path / "portable" / folder, key).equals(expected), folder
    rejected = {
        run: sorted(
            line for p in (tmp_path / run / "rejected").glob("*.jsonl") for line in p.read_text().splitlines()
        )
        for run in ("direct", "portable")
    }
    assert len(rejected["portable"]) == 8 and rejected["portable"] == rejected["direct"]
    assert (tmp_path / "portable" / "ctr_history" / "_meta.json").read_text() == (
        tmp_path / "direct" / "ctr_history" / "_meta.json"
    ).read_text()
    assert [p for p in tmp_path.rglob("*") if "temp" in p.name or p.name.startswith(".")] == []
