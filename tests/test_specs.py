"""Dataset specs: bundled ones load, and a wrong spec fails with one line naming the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from nlpctr.errors import UserError
from nlpctr.pipelines.specs import bundled_names, load_spec

GOOD = {
    "name": "mylog",
    "source": {"path": "log.csv", "format": "csv"},
    "columns": {"ad_id": "ad", "ad_text": "title", "query_id": {"text_id_of": "q"}, "query_text": "q"},
    "context": {"position": "pos"},
    "timestamp": {"column": "ts", "format": "iso8601"},
    "label": {"form": "binary", "clicked": "click"},
    "group": "query_id",
    "entities": ["ad_id", "position"],
}


def write_spec(tmp_path: Path, spec: dict) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_bundled_specs_load_and_point_at_real_files() -> None:
    assert set(bundled_names()) >= {"upworthy", "trec2013", "esci_ubi"}
    for name in bundled_names():
        spec = load_spec(name)
        assert spec.source.path.is_file(), spec.source.path
        assert spec.group in {"ad_id", "query_id", *spec.context_columns}


def test_upworthy_spec_never_reads_leakage_columns() -> None:
    spec = load_spec("upworthy")
    assert not spec.source_columns() & {
        "significance",
        "winner",
        "first_place",
        "ctr",
        "winner_count_anomaly",
    }
    assert spec.label.form == "aggregated"


def test_user_spec_path_resolves_source_relative_to_spec(tmp_path: Path) -> None:
    spec = load_spec(str(write_spec(tmp_path, GOOD)))
    assert spec.source.path == (tmp_path / "log.csv").resolve()
    assert spec.context_columns == ("position",)
    assert len(spec.spec_hash) == 16


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"label": {"form": "ratio", "clicked": "click"}}, "label.form"),
        ({"label": {"form": "binary"}}, "label"),
        ({"timestamp": {"column": "ts", "format": "unix"}}, "timestamp.format"),
        ({"source": {"path": "log.csv", "format": "xlsx"}}, "source.format"),
        ({"group": "nowhere"}, "group"),
        ({"entities": ["ad_id", "colour"]}, "entities"),
        ({"columns": {"ad_text": "title"}}, "columns.ad_id"),
        ({"colour": "blue"}, "unknown key 'colour'"),
        ({"split": {"mode": "random"}}, "split.mode"),
        ({"split": {"fractions": [0.5, 0.5, 0.5]}}, "split.fractions"),
        ({"forbidden": ["title"]}, "label leakage"),
        ({"context": {"clicks": "pos"}}, "reserved"),
    ],
)
def test_wrong_spec_names_the_field(tmp_path: Path, change: dict, expected: str) -> None:
    with pytest.raises(UserError) as info:
        load_spec(str(write_spec(tmp_path, {**GOOD, **change})))
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


def test_unknown_source_column_is_named_with_what_exists(tmp_path: Path) -> None:
    spec = load_spec(str(write_spec(tmp_path, GOOD)))
    with pytest.raises(UserError, match=r"source column 'click' is not in log\.csv .*fix the column name"):
        spec.check_source_columns(["ad", "title", "q", "pos", "ts"])


def test_unknown_dataset_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="neither a bundled dataset"):
        load_spec("no_such_dataset")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_spec(str(bad))
