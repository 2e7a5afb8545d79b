"""nlpctr.layout: the manifest, the LM-feature metadata and the text-pair key, as files on disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nlpctr.errors import UserError
from nlpctr.layout import (
    EMBEDDINGS_MANIFEST,
    LM_META,
    MANIFEST,
    DatasetIdentity,
    EmbeddingsManifest,
    LmFeatureMeta,
    Manifest,
    lm_features_dir,
    pair_key_columns,
    read_manifest,
    write_manifest,
)


def old_meta_file(meta: dict) -> str:
    """How `nlpctr train` wrote _meta.json before LmFeatureMeta (publish_lm_features)."""
    return json.dumps(meta, indent=2, sort_keys=True) + "\n"


E2_META = {
    "run": "e2_small",
    "kind": "cascade_finetuned",
    "chosen": "step-20",
    "checkpoints": ["step-0", "step-10", "step-20", "step-30"],
    "keys": ["query_text_id", "ad_text_id"],
    "model_version": "e2_small@step-20/minilm-l6/nlpctr==0.1.0",
    "valid_auc": {"step-0": 0.6, "step-10": 0.61, "step-20": 0.6375, "step-30": 0.629},
}
E3_META = {
    "run": "joint_gate",
    "kind": "joint",
    "chosen": "step-40",
    "checkpoints": ["step-40"],
    "keys": ["ad_text_id"],
    "model_version": "joint_gate@step-40/joint-gate/minilm-l6/nlpctr==0.1.0",
    "fusion": "gate",
}
# What the trainer wrote before E2 checkpointed within epochs: the folders were `epochs`.
OLD_E2_META = {**{k: v for k, v in E2_META.items() if k != "checkpoints"}, "chosen": "epoch-2"}
OLD_E2_META["epochs"] = ["epoch-1", "epoch-2", "epoch-3"]


def test_manifest_round_trip(tmp_path: Path) -> None:
    manifest = {"dataset": "trec", "rows_written": 3, "entities": ["ad_id", "query_id"], "split": {"seed": 0}}
    path = write_manifest(tmp_path, manifest)
    assert path == tmp_path / MANIFEST
    # The format ingest has always written: sorted keys, two-space indent, a final newline.
    assert path.read_text() == json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    assert read_manifest(tmp_path) == manifest


def test_missing_manifest_is_one_line_naming_the_fix(tmp_path: Path) -> None:
    with pytest.raises(UserError) as error:
        read_manifest(tmp_path / "nowhere")
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"{(tmp_path / 'nowhere').resolve()} has no manifest.json")
    assert "nlpctr data prepare --dataset NAME --out" in message


@pytest.mark.parametrize("meta", [E2_META, E3_META], ids=["cascade_finetuned", "joint"])
def test_lm_feature_meta_writes_the_old_bytes_and_reads_them_back(tmp_path: Path, meta: dict) -> None:
    folder = lm_features_dir(tmp_path, meta["run"])
    folder.mkdir(parents=True)
    record = LmFeatureMeta(
        run=meta["run"],
        kind=meta["kind"],
        chosen=meta["chosen"],
        checkpoints=tuple(meta["checkpoints"]),
        keys=tuple(meta["keys"]),
        model_version=meta["model_version"],
        valid_auc=meta.get("valid_auc"),
        fusion=meta.get("fusion"),
    )
    assert record.write(folder) == folder / LM_META
    assert (folder / LM_META).read_text() == old_meta_file(meta)  # existing data folders still read
    assert LmFeatureMeta.exists(folder)
    assert LmFeatureMeta.read(folder) == record


def test_lm_feature_meta_reads_a_file_the_old_trainer_wrote(tmp_path: Path) -> None:
    (tmp_path / LM_META).write_text(old_meta_file(E2_META))
    record = LmFeatureMeta.read(tmp_path)
    assert (record.kind, record.chosen) == ("cascade_finetuned", "step-20")
    assert record.keys == ("query_text_id", "ad_text_id")
    assert record.checkpoints == tuple(E2_META["checkpoints"]) and record.fusion is None
    assert record.to_json() == E2_META
    (tmp_path / LM_META).write_text(old_meta_file(OLD_E2_META))  # epoch folders, named `epochs`
    assert LmFeatureMeta.read(tmp_path).checkpoints == ("epoch-1", "epoch-2", "epoch-3")


def test_incomplete_lm_feature_meta_is_a_user_error(tmp_path: Path) -> None:
    assert not LmFeatureMeta.exists(tmp_path)
    (tmp_path / LM_META).write_text(json.dumps({"run": "x", "kind": "joint"}))
    with pytest.raises(UserError, match="not a complete LM feature record"):
        LmFeatureMeta.read(tmp_path)


def test_pair_key_columns() -> None:
    assert pair_key_columns() == ["query_text_id", "ad_text_id"]
    assert pair_key_columns(with_query=True) == pair_key_columns()
    assert pair_key_columns(with_query=False) == ["ad_text_id"]
    columns = pair_key_columns()
    columns.append("column")  # callers get their own list
    assert pair_key_columns() == ["query_text_id", "ad_text_id"]


FULL_MANIFEST = {
    "dataset": "trec", "description": "d", "spec_path": "/s.yaml", "spec_hash": "abc",
    "spec": {"columns": {"query_id": "qid", "ad_id": "doc"}, "label": {"form": "binary"}},
    "source": "/log.csv", "source_layout": "path", "rows_in": 5, "rows_written": 4, "rows_rejected": 1,
    "rejected_by_reason": {"missing_text": 1}, "rows_truncated": {}, "id_hash_collisions": {},
    "source_stats": {"lines": 5},
    "split": {"mode": "within_group", "seed": 0, "fractions": [0.8, 0.1, 0.1], "group": "query_id",
              "rows": {"train": 2, "valid": 1, "test": 1}, "impressions": {"train": 2, "valid": 1, "test": 1},
              "clicks": {"train": 1, "valid": 0, "test": 1}},
    "context_columns": ["position"], "numeric_columns": [], "entities": ["ad_id", "query_id"],
    "group": "query_id", "label_form": "binary",
    "limits": {"max_text_chars": 1000, "truncate_long_text": False}, "code_version": "0.1.0",
    "wall_seconds": 1.25, "max_reject_rate": 0.5,
}  # fmt: skip


def test_manifest_record_writes_the_bytes_the_dict_wrote(tmp_path: Path) -> None:
    manifest = Manifest.from_json(FULL_MANIFEST)
    assert manifest.split.rows["train"] == 2 and manifest.entities == ("ad_id", "query_id")
    assert manifest.spec_column("query_id") == "qid" and manifest.spec_column("query_text") is None
    assert manifest.to_json() == FULL_MANIFEST
    manifest.write(tmp_path)
    assert (tmp_path / MANIFEST).read_text() == json.dumps(FULL_MANIFEST, indent=2, sort_keys=True) + "\n"
    assert Manifest.read(tmp_path) == manifest


def test_embeddings_manifest_has_one_reader(tmp_path: Path) -> None:
    assert EmbeddingsManifest.read(tmp_path) is None  # missing
    (tmp_path / EMBEDDINGS_MANIFEST).write_text("[1]")
    assert EmbeddingsManifest.read(tmp_path) is None  # not an object
    (tmp_path / EMBEDDINGS_MANIFEST).write_text(json.dumps({"encoder_version": "v", "dim": 8, "rows": "x"}))
    read = EmbeddingsManifest.read(tmp_path)
    assert read is not None and (read.encoder_version, read.dim, read.rows, read.slug) == ("v", 8, None, None)


def test_the_compat_shims_read_older_files_into_todays_records() -> None:
    from nlpctr.compat import as_manifest, encoder_fields_of_version, lm_meta_checkpoints

    record = Manifest.from_json(FULL_MANIFEST)
    assert as_manifest(record) is record and as_manifest(FULL_MANIFEST) == record
    assert encoder_fields_of_version("minilm@1/layers=2/pooling=mean/max_length=32", "minilm") == {
        "name": "minilm", "layers": 2, "pooling": "mean", "max_length": 32,
    }  # fmt: skip
    assert encoder_fields_of_version("minilm@1", "minilm") is None
    assert lm_meta_checkpoints({"chosen": "epoch-1", "epochs": ["epoch-0", "epoch-1"]}) == (
        "epoch-0",
        "epoch-1",
    )
    assert lm_meta_checkpoints({"chosen": "step-9"}) == ("step-9",)


def test_a_run_applies_to_its_dataset_by_name_and_spec_hash(tmp_path: Path) -> None:
    """A run that recorded its spec hash needs it to match; one written before (name only, or
    older still: its results.json's name) keeps the name check."""
    folder = DatasetIdentity.of_manifest(
        Manifest.from_json({"dataset": "log", "spec_hash": "aaaa", "rows_in": 3})
    )
    run = DatasetIdentity.of_run(tmp_path, {"dataset": "log", "spec_hash": "aaaa"})
    assert run.admits(folder) and run.to_json() == {"dataset": "log", "spec_hash": "aaaa"}
    assert not DatasetIdentity.of_run(tmp_path, {"dataset": "log", "spec_hash": "bbbb"}).admits(folder)
    assert not DatasetIdentity.of_run(tmp_path, {"dataset": "other", "spec_hash": "aaaa"}).admits(folder)
    assert DatasetIdentity.of_run(tmp_path, {"dataset": "log"}).admits(folder)  # before spec_hash
    assert DatasetIdentity.of_run(tmp_path, {}) == DatasetIdentity(None)  # neither file says
    (tmp_path / "results.json").write_text(json.dumps({"dataset": "log"}))
    assert DatasetIdentity.of_run(tmp_path, {}).admits(folder)  # before run.json's `dataset`
    assert folder.describe("/d") == "'log' (spec aaaa, /d)" and DatasetIdentity("x").describe() == "'x'"
