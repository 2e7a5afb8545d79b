"""`nlpctr experiment` on the user's infrastructure: Beam pipeline options and the store choice
(`--online redis --redis-url`, `--offline spark --spark-master`) reach every job it runs."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from builders import write_embeddings

from nlpctr.errors import UserError
from nlpctr.features import store
from nlpctr.features.local_redis import LocalRedisServer
from nlpctr.features.store_config import StoreChoice, config_path
from nlpctr.pipelines import ctr_stats, embed_text, ingest
from nlpctr.pipelines.experiment import command, protocol
from nlpctr.pipelines.experiment.config import load_protocol
from nlpctr.pipelines.job_options import JobOptions, beam_flags

BEAM = ["--direct_num_workers=1", "--direct_running_mode", "in_memory"]


def test_beam_options_are_checked_by_beams_own_parser() -> None:
    assert beam_flags(BEAM, "nlpctr experiment") == tuple(BEAM)
    with pytest.raises(UserError, match="'--quik' is neither one of its flags nor a Beam pipeline option"):
        beam_flags(["--quik"], "nlpctr experiment")
    with pytest.raises(UserError, match="Beam pipeline option: argument --direct_num_workers: invalid int"):
        beam_flags(["--direct_num_workers=many"], "nlpctr experiment")


def test_experiment_flags_become_one_typed_choice(tmp_path: Path) -> None:
    argv = ["--dataset", "trec2013", "--out", str(tmp_path / "x"), "--online", "redis"]
    args = command.parse_args([*argv, "--redis-url", "127.0.0.1:7000", *BEAM])
    assert args.job_options == JobOptions(
        beam=tuple(BEAM), store=StoreChoice(online="redis", redis_url="127.0.0.1:7000")
    )
    spark = command.parse_args([*argv[:4], "--offline", "spark", "--spark-master", "spark://h:7077"])
    assert spark.job_options.store == StoreChoice(offline="spark", spark_master="spark://h:7077")
    for wrong, message in (
        (["--redis-url", "h:1"], "--redis-url goes with --online redis"),
        (["--spark-master", "local[2]"], "--spark-master goes with --offline spark"),
        (["--online", "redis", "--redis-url", "nohost"], "--redis-url must be HOST:PORT"),
        (["--seeed", "1"], "'--seeed' is neither"),
    ):
        with pytest.raises(UserError, match=message):
            command.parse_args([*argv[:4], *wrong])


def small_spec(root: Path) -> Path:
    rows = [
        {"id": f"i{i}", "ad": f"ad{i % 4}", "title": f"ad {i % 4}", "q": f"query {i % 3}",
         "ts": f"2024-01-01T00:{i:02d}:00", "clicked": int(i % 3 == 0), "bid": i / 10}
        for i in range(40)
    ]  # fmt: skip
    pd.DataFrame(rows).to_csv(root / "log.csv", index=False)
    spec = {
        "name": "infra",
        "source": {"path": "log.csv", "format": "csv"},
        "columns": {
            "impression_id": "id",
            "query_id": {"text_id_of": "q"},
            "query_text": "q",
            "ad_id": "ad",
            "ad_text": "title",
        },
        "numeric": {"bid": "bid"},
        "timestamp": {"column": "ts", "format": "iso8601"},
        "label": {"form": "binary", "clicked": "clicked"},
        "group": "ad_id",
        "entities": ["ad_id"],
    }
    (root / "spec.yaml").write_text(yaml.safe_dump(spec))
    return root / "spec.yaml"


@pytest.mark.redis
@pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="redis-server is not on PATH; CI installs it"
)
def test_the_protocol_runs_every_job_on_the_chosen_infrastructure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The prepare stage of the protocol with Beam options and a Redis online store: each Beam
    job receives the options as its Beam arguments, and the store is rendered, materialised and
    served from that Redis (the embedding job is replaced by random vectors: it has its own tests)."""
    beam_args: dict[str, tuple[str, ...]] = {}

    def recorded(name: str, job: Any, entry: str) -> Any:
        original = getattr(job, entry)

        def run(request: Any) -> Any:
            beam_args[name] = request.beam
            if name == "embed":
                return write_embeddings(Path(request.data))
            return original(request)

        return run

    for name, job, entry in (
        ("prepare", ingest, "prepare"),
        ("ctr_stats", ctr_stats, "ctr_stats"),
        ("embed", embed_text, "embed"),
    ):
        monkeypatch.setattr(job, entry, recorded(name, job, entry))
    server = LocalRedisServer(tmp_path / "redis")
    try:
        options = JobOptions(beam=tuple(BEAM), store=StoreChoice(online="redis", redis_url=server.url))
        out = tmp_path / "out"
        request = protocol.ExperimentRequest("x", out, quick=True, progress=False, options=options)
        protocol_sizes = dataclasses.replace(load_protocol(True, None), embed_layers=1)
        exp = protocol.Experiment(request, protocol_sizes, out)
        exp.prepare(str(small_spec(tmp_path)))
        assert beam_args == {"prepare": tuple(BEAM), "ctr_stats": tuple(BEAM), "embed": tuple(BEAM)}
        config = yaml.safe_load(config_path(exp.data_dir).read_text())
        assert config["online_store"]["type"] == "redis"
        assert config["online_store"]["connection_string"].startswith(server.url)
        assert server.dump()  # materialised into this Redis
        lookup = store.OnlineFeatures(exp.data_dir, "baseline")
        result = lookup.get([{"ad_id": "ad1", "impression_id": "i5"}])
        assert result.columns["numeric__bid"] == [0.5]
        assert store.reapply(exp.data_dir)["online_store"] == "redis"  # a trainer's re-apply keeps it
    finally:
        server.stop()
