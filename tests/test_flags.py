"""pipelines/flags.py: every job's flags become its typed request by one helper, field by name."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import pytest

from nlpctr.models.config import Mode
from nlpctr.models.ctr_net import Fusion
from nlpctr.models.encoder import EncoderConfig
from nlpctr.pipelines import ctr_stats, embed_text, ingest, score_batch, simulate, train
from nlpctr.pipelines.flags import request_from_args


@dataclass(frozen=True)
class _Request:
    data: Path
    seed: int = 0
    beam: tuple[str, ...] = ()


def test_fields_come_from_flags_of_their_name_and_given_values_win() -> None:
    args = argparse.Namespace(data=Path("d"), seed=3, unrelated=1, beam=("ignored",))
    assert request_from_args(_Request, args, beam=("--runner", "x")) == _Request(
        Path("d"), 3, ("--runner", "x")
    )
    assert request_from_args(_Request, argparse.Namespace(data=Path("d"))) == _Request(Path("d"))
    with pytest.raises(TypeError):  # a required field without a flag is the job's bug
        request_from_args(_Request, argparse.Namespace(seed=1))


def test_each_job_builds_the_request_its_flags_say() -> None:
    args, beam = ingest.parse_args(["--dataset", "trec", "--out", "o", "--seed", "2", "--truncate-long-text"])
    assert ingest.PrepareRequest.from_args(args, beam) == ingest.PrepareRequest(
        dataset="trec", out=Path("o"), seed=2, truncate_long_text=True
    )
    args, beam = ctr_stats.parse_args(["--data", "d", "--prior-strength", "5", "--runner", "DirectRunner"])
    assert ctr_stats.CtrStatsRequest(Path("d"), 5.0, ("--runner", "DirectRunner")) == request_from_args(
        ctr_stats.CtrStatsRequest, args, beam=tuple(beam)
    )
    args, beam = embed_text.parse_args(["--data", "d", "--layers", "2", "--no-length-grouping", "--full"])
    assert embed_text.EmbedRequest.from_args(args, beam) == embed_text.EmbedRequest(
        data=Path("d"),
        encoder=EncoderConfig(layers=2, pooling=args.pooling, max_length=args.max_length, name=args.encoder),
        group_by_length=False,
        reuse=False,
    )
    args, beam = score_batch.parse_args(["--data", "d", "--splits", "test", "--run", "r"])
    assert score_batch.ScoreBatchRequest.from_args(args, beam) == score_batch.ScoreBatchRequest(
        data=Path("d"), splits=("test",), run="r", batch_size=args.batch_size
    )
    args = simulate.parse_args(["--rows", "100", "--rho", "0.5", "--out", "o.parquet", "--no-progress"])
    assert simulate.SimulateRequest.from_args(args) == simulate.SimulateRequest(
        rows=100, rho=0.5, out=Path("o.parquet"), progress=False
    )
    argv = ["--mode", "joint", "--data", "d", "--run", "r", "--fusion", "gate", "--config", "c.yaml"]
    request = train.TrainRequest.from_args(train.parse_args([*argv, "--no-progress", "--in-memory"]))
    assert request == train.TrainRequest(
        mode=Mode.JOINT,
        data_dir=Path("d"),
        run="r",
        runs_dir=request.runs_dir,
        fusion=Fusion.GATE,
        config_file=Path("c.yaml"),
        streaming=False,
        progress=False,
    )
