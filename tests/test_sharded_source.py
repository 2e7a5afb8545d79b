"""Sharded sources: a spec's `source.folder`, `source.glob` or `source.shards`, read by Beam's IO;
counts add up across shards, and a wrong source is one line."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from nlpctr.errors import UserError
from nlpctr.pipelines import ingest
from nlpctr.pipelines.ingest_source import source_files
from nlpctr.pipelines.specs import load_spec


def rows(shard: int, n: int = 6) -> list[dict[str, Any]]:
    return [
        {
            "id": f"s{shard}-{i}",
            "ad": f"ad{i % 3}",
            "title": f"ad number {i % 3} of shard {shard}",
            "ts": f"2024-01-0{1 + shard}T00:0{i}:00",
            "clicked": i % 2,
            "bid": 0.5 + i,
        }
        for i in range(n)
    ]


def spec(folder: Path, source: dict[str, Any]) -> Path:
    path = folder / "spec.yaml"
    content = {
        "name": "sharded",
        "source": source,
        "columns": {"impression_id": "id", "ad_id": "ad", "ad_text": "title"},
        "numeric": {"bid": {"column": "bid", "log1p": True}},
        "timestamp": {"column": "ts", "format": "iso8601"},
        "label": {"form": "binary", "clicked": "clicked"},
        "group": "ad_id",
        "max_reject_rate": 0.2,
    }
    path.write_text(yaml.safe_dump(content))
    return path


def bad_row() -> dict[str, Any]:
    return {**rows(0, 1)[0], "id": "bad", "bid": -3.0}  # negative under log1p


def check_counts(manifest: dict[str, Any], rows_in: int) -> None:
    assert manifest["rows_in"] == rows_in
    assert manifest["rows_written"] == rows_in - 1
    assert manifest["rejected_by_reason"] == {"bad_numeric": 1}
    assert manifest["rows_in"] == manifest["rows_written"] + manifest["rows_rejected"]


def test_a_folder_of_parquet_shards(tmp_path: Path) -> None:
    shards = tmp_path / "log"
    (shards / "day=2").mkdir(parents=True)
    pd.DataFrame(rows(0)).to_parquet(shards / "part-0.parquet")
    pd.DataFrame(rows(1)).to_parquet(shards / "part-1.parquet")
    pd.DataFrame([*rows(2), bad_row()]).to_parquet(shards / "day=2" / "part-2.parquet")
    (shards / "_SUCCESS").write_text("")  # a writer's marker, not a shard
    (shards / ".part-0.parquet.crc").write_bytes(b"\0\1")
    path = spec(tmp_path, {"folder": "log", "format": "parquet"})
    assert [p.name for p in source_files(load_spec(str(path)))] == [
        "part-2.parquet",
        "part-0.parquet",
        "part-1.parquet",
    ]
    manifest = ingest.run(["--dataset", str(path), "--out", str(tmp_path / "out")])
    check_counts(manifest, 19)
    assert manifest["source_layout"] == "folder" and manifest["source"] == str(shards)


def test_a_list_of_csv_shards_one_gzipped(tmp_path: Path) -> None:
    for shard in range(3):
        frame = pd.DataFrame(rows(shard) + ([bad_row()] if shard == 1 else []))
        text = frame.to_csv(index=False).encode()
        name = f"part-{shard}.csv" + (".gz" if shard == 2 else "")
        (tmp_path / name).write_bytes(gzip.compress(text) if shard == 2 else text)
    path = spec(tmp_path, {"shards": ["part-0.csv", "part-1.csv", "part-2.csv.gz"], "format": "csv"})
    check_counts(ingest.run(["--dataset", str(path), "--out", str(tmp_path / "out")]), 19)


def test_a_glob_of_jsonl_shards(tmp_path: Path) -> None:
    (tmp_path / "logs").mkdir()
    for shard in range(3):
        lines = [json.dumps(r) for r in rows(shard) + ([bad_row()] if shard == 0 else [])]
        data = ("\n".join(lines) + "\n").encode()
        path = tmp_path / "logs" / f"events-{shard}.jsonl"
        path.write_bytes(gzip.compress(data) if shard == 1 else data)  # gzipped by content
    (tmp_path / "logs" / "notes.txt").write_text("not matched")
    path = spec(tmp_path, {"glob": "logs/events-*.jsonl", "format": "jsonl"})
    check_counts(ingest.run(["--dataset", str(path), "--out", str(tmp_path / "out")]), 19)


@pytest.mark.parametrize(
    ("layout", "files", "message"),
    [
        ({"glob": "logs/none-*.parquet"}, {}, "matches no file"),
        ({"folder": "missing"}, {}, "source.folder .*missing does not exist"),
        ({"folder": "logs"}, {"logs/_SUCCESS": b""}, "holds no files"),
        ({"folder": "logs"}, {"logs/a.parquet": "parquet", "logs/b.csv": b"id\n1\n"}, "mixed formats"),
        ({"shards": ["a.parquet", "a.parquet"]}, {"a.parquet": "parquet"}, "listed twice"),
        ({"shards": ["a.parquet", "gone.parquet"]}, {"a.parquet": "parquet"}, "gone.parquet does not exist"),
        ({"glob": "plain.parquet"}, {}, "expected a pattern"),
        ({"path": "a.parquet", "folder": "logs"}, {}, "give exactly one of path"),
    ],
)
def test_a_wrong_source_is_one_line(tmp_path: Path, layout: dict, files: dict, message: str) -> None:
    for name, content in files.items():
        target = tmp_path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if content == "parquet":
            pd.DataFrame(rows(0)).to_parquet(target)
        else:
            target.write_bytes(content)
    path = spec(tmp_path, {**layout, "format": "parquet"})
    with pytest.raises(UserError, match=message) as error:
        ingest.run(["--dataset", str(path), "--out", str(tmp_path / "out")])
    assert "\n" not in str(error.value)


def test_text_shards_of_two_file_types_are_mixed_formats(tmp_path: Path) -> None:
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "a.csv").write_text("id\n1\n")
    (tmp_path / "logs" / "b.jsonl").write_text('{"id": 1}\n')
    path = spec(tmp_path, {"folder": "logs", "format": "csv"})
    with pytest.raises(UserError, match=r"mixed formats \(\.csv and \.jsonl files\)"):
        source_files(load_spec(str(path)))


def test_glob_characters_in_a_literal_path_stay_literal(tmp_path: Path) -> None:
    pd.DataFrame(rows(0)).to_parquet(tmp_path / "log[1].parquet")
    pd.DataFrame(rows(1)).to_parquet(tmp_path / "log1.parquet")  # what the name would match as a glob
    path = spec(tmp_path, {"path": "log[1].parquet", "format": "parquet"})
    assert source_files(load_spec(str(path))) == [tmp_path / "log[1].parquet"]
