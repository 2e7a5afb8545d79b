"""A damaged prepared folder, checkpoint or store config: every command that reads one prints one
line naming the file and the command that rebuilds it (exit 2, no traceback), and changes nothing.

One module fixture builds a small prepared folder (the builders of tests/test_features.py, 300
rows), applies and materialises its store and trains a tiny E0; each test damages one file, runs
commands through the CLI, and puts the file back.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from builders import (
    SLUG,
    impressions,
    make_dataset,
    run_ctr_stats,
    write_ctr_history,
    write_embeddings,
)

from nlpctr import prepared
from nlpctr.errors import UserError
from nlpctr.features import store
from nlpctr.models import checkpoints
from nlpctr.models.schema import SPLITS
from nlpctr.pipelines import cli

QUICK = {"loop": {"epochs": 2, "max_batches_per_epoch": 2}, "evaluation": {"bootstrap_rounds": 10}}


def prepare_folder(root: Path, ctr_job: bool = True) -> Path:
    """make_dataset's folder, with the manifest fields `train` reads, CTR history (the ctr-stats
    job's own, or with `ctr_job=False` the same values from pandas), 8-d vectors and a
    materialised store."""
    data = make_dataset(root / "data")
    manifest = json.loads((data / "manifest.json").read_text())
    rows = impressions(data)
    manifest |= {
        "spec": {"columns": {"query_id": "q", "query_text": "q"}},
        "spec_path": str(root / "spec.yaml"),
        "split": {
            "mode": "within_group",
            "seed": 0,
            "rows": {s: int((rows.split == s).sum()) for s in SPLITS},
        },
    }
    (data / "manifest.json").write_text(json.dumps(manifest))
    if ctr_job:
        run_ctr_stats(data)  # the job's own output, which a rerun may replace
    else:
        write_ctr_history(data)
    write_embeddings(data, dim=8)
    store.apply(data)
    store.materialize(data)
    return data


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("damage")
    data = prepare_folder(root)
    config = root / "quick.yaml"
    config.write_text(yaml.safe_dump(QUICK))
    runs = root / "runs"
    assert cli.main([*train_args(data, runs, config, "e0")]) == 0
    return {"data": data, "runs": runs, "config": config, "impression": impressions(data).impression_id[0]}


def train_args(data: Path, runs: Path, config: Path, run: str, mode: str = "baseline") -> list[str]:
    flags = ["--run", run, "--runs-dir", str(runs), "--config", str(config), "--no-progress"]
    return ["train", "--mode", mode, "--data", str(data), *flags]


def one_line(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Run `nlpctr ARGV`: exit 2 and one line on stderr, `nlpctr: error: ...`; returns the line."""
    capsys.readouterr()
    code = cli.main(list(argv))
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("nlpctr: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@contextlib.contextmanager
def damaged(path: Path, how: str) -> Iterator[Path]:
    """`path` truncated, zeroed, overwritten with random bytes, damaged early (behind a sound
    footer) or deleted while the block runs; put back afterwards."""
    original = path.read_bytes()
    size = len(original)
    if how == "truncated":
        path.write_bytes(original[: size // 2])
    elif how == "zeroed":
        path.write_bytes(bytes(size))
    elif how == "random":
        path.write_bytes(os.urandom(size))
    elif how == "early":  # the first column chunk's pages; the footer stays sound
        path.write_bytes(original[:200] + bytes(300) + original[500:])
    elif how == "deleted":
        path.unlink()
    try:
        yield path
    finally:
        path.write_bytes(original)


def parquet(data: Path, folder: str) -> Path:
    return prepared.parquet_files(data / folder)[0]


# ------------------------------------------------------------------------------- a prepared folder


CASES = {
    "ctr-stats": ("impressions", "truncated", "rerun `nlpctr data prepare --dataset"),
    "embed": ("impressions", "zeroed", "rerun `nlpctr data prepare --dataset"),
    "features materialize": ("ctr_history/ad_id", "zeroed", "rerun `nlpctr ctr-stats --data"),
    "features get": ("impressions", "truncated", "rerun `nlpctr data prepare --dataset"),
    "train baseline": ("ctr_history_rows", "random", "rerun `nlpctr ctr-stats --data"),
    "train cascade-frozen": (f"embeddings/{SLUG}", "truncated", "rerun `nlpctr embed --data"),
}


@pytest.mark.parametrize("command", list(CASES))
def test_a_damaged_file_is_named_with_the_command_that_rebuilds_it(
    folder: dict[str, Any], capsys: pytest.CaptureFixture[str], command: str
) -> None:
    data, runs, config = folder["data"], folder["runs"], folder["config"]
    where, how, fix = CASES[command]
    get = ["features", "get", "--data", str(data), "--service", "baseline"]
    argv = {
        "ctr-stats": ["ctr-stats", "--data", str(data)],
        "embed": ["embed", "--data", str(data), "--layers", "1"],
        "features materialize": ["features", "materialize", "--data", str(data)],
        "features get": [*get, "--impression", folder["impression"]],
        "train baseline": train_args(data, runs, config, "new"),
        "train cascade-frozen": train_args(data, runs, config, "new", "cascade-frozen"),
    }[command]
    state = (data / "feature_repo" / "data" / "nlpctr_state.json").read_text()
    with damaged(parquet(data, where), how) as file:
        err = one_line(capsys, *argv)
    assert f"{file} is damaged (" in err and fix in err
    assert not (runs / "new").exists()  # refused before the run folder was made
    assert (data / "feature_repo" / "data" / "nlpctr_state.json").read_text() == state
    assert not [p for p in data.rglob(".*tmp*")]


def test_a_page_damaged_behind_a_sound_footer_is_found_when_the_job_fails(
    folder: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """The footer check passes; Beam's read fails inside the job; the file is then read whole."""
    data = folder["data"]
    history = sorted(p.name for p in (data / "ctr_history").iterdir())
    with damaged(parquet(data, "impressions"), "early") as file:
        assert prepared.damage(file) is None and prepared.damage(file, whole=True) is not None
        err = one_line(capsys, "ctr-stats", "--data", str(data))
    assert f"{file} is damaged (" in err and "rerun `nlpctr data prepare --dataset" in err
    assert sorted(p.name for p in (data / "ctr_history").iterdir()) == history  # nothing published
    assert not [p for p in data.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_a_damaged_parquet_source_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A source log whose pages are corrupt (a snappy page of garbage) behind a sound footer."""
    source = make_dataset(tmp_path / "src") / "impressions" / "part-00000-of-00001.parquet"
    spec = {
        "name": "broken",
        "source": {"path": str(source), "format": "parquet"},
        "columns": {"impression_id": "impression_id", "ad_id": "ad_id", "ad_text": "ad_text"},
        "timestamp": {"column": "event_timestamp", "format": "iso8601"},
        "label": {"form": "binary", "clicked": "clicks"},
        "group": "ad_id",
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    with damaged(source, "early"):
        err = one_line(
            capsys,
            "data",
            "prepare",
            "--dataset",
            str(tmp_path / "spec.yaml"),
            "--out",
            str(tmp_path / "out"),
        )
    assert f"{source} is damaged (" in err and "replace it with a sound copy" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.yaml", "src"]  # no output, no staging


def test_rebuild_hints_name_each_folders_command(folder: dict[str, Any]) -> None:
    data = folder["data"]
    hint = prepared.rebuild_hint(data, parquet(data, f"embeddings/{SLUG}"))
    assert hint == f"rerun `nlpctr embed --data {data} --layers 6 --pooling mean --max-length 32`"
    shards = data / "training" / "baseline" / "train" / "part-0.parquet"
    expected = f"delete {data / 'training' / 'baseline'} (the next `nlpctr train` rebuilds it)"
    assert prepared.rebuild_hint(data, shards) == expected


# ------------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("how", ["truncated", "random"])
def test_a_damaged_resume_point_is_one_line(
    folder: dict[str, Any], capsys: pytest.CaptureFixture[str], how: str
) -> None:
    last = folder["runs"] / "e0" / "checkpoints" / "ctr" / "last.pt"
    with damaged(last, how):
        err = one_line(capsys, *train_args(folder["data"], folder["runs"], folder["config"], "e0"))
    assert f"checkpoint {last} is damaged (not a whole checkpoint" in err
    assert f"delete {last} to train this run from its start" in err


@pytest.mark.parametrize("how", ["truncated", "random", "deleted"])
def test_a_damaged_or_missing_best_checkpoint_is_one_line(
    folder: dict[str, Any], capsys: pytest.CaptureFixture[str], how: str
) -> None:
    runs, data = folder["runs"], folder["data"]
    run = runs / "e0"
    best = run / json.loads((run / "run.json").read_text())["checkpoint"]
    with damaged(best, how):
        for argv in (
            ["evaluate", "--run", "e0", "--runs-dir", str(runs)],
            ["score-batch", "--data", str(data), "--run", "e0", "--runs-dir", str(runs)],
        ):
            err = one_line(capsys, *argv)
            state = "is missing" if how == "deleted" else "is damaged"
            assert f"checkpoint {best} {state}" in err
            assert f"delete the run and retrain it (`rm -r {run}`" in err
    assert not (data / "scored").exists()


def test_the_checkpoint_loader_maps_tensors_where_asked(tmp_path: Path) -> None:
    path = tmp_path / "run" / "checkpoints" / "ctr" / "epoch-0.pt"
    path.parent.mkdir(parents=True)
    checkpoints.save_checkpoint({"model": {"w": torch.ones(2)}}, path)
    assert torch.equal(checkpoints.load_checkpoint(path)["model"]["w"], torch.ones(2))
    moved = checkpoints.load_checkpoint(path, map_location="meta")["model"]["w"]
    assert moved.device.type == "meta"
    assert checkpoints.run_of(path) == tmp_path / "run"
    assert sorted(p.name for p in path.parent.iterdir()) == ["epoch-0.pt"]  # no staging file left


# ------------------------------------------------------------------------------- the store's config


def test_a_damaged_store_config_says_to_reapply(
    folder: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    data = folder["data"]
    config = data / "feature_repo" / "feature_store.yaml"
    original = config.read_text()
    get = [
        "features",
        "get",
        "--data",
        str(data),
        "--service",
        "baseline",
        "--impression",
        folder["impression"],
    ]
    try:
        config.write_text(original + "project: [unclosed\n")
        for argv in (get, ["features", "materialize", "--data", str(data)]):
            err = one_line(capsys, *argv)
            assert f"{config} is not valid YAML (" in err and "at line" in err
            assert f"re-apply: `nlpctr features apply --data {data}`" in err
        config.write_text("project: {a: 1}\n")  # YAML, but not a store config
        assert "is not a store config Feast accepts" in one_line(capsys, *get)
        assert cli.main(["features", "apply", "--data", str(data)]) == 0  # re-applying repairs it
        assert cli.main(["features", "materialize", "--data", str(data)]) == 0
        assert cli.main(get) == 0
    finally:
        config.write_text(original)


# ------------------------------------------------------------------------------- another dataset


def test_score_batch_refuses_a_run_trained_on_another_dataset(
    folder: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    runs, data = folder["runs"], folder["data"]
    other = runs / "e0_other"
    shutil.copytree(runs / "e0", other, dirs_exist_ok=True)
    spec = json.loads((other / "run.json").read_text())
    assert spec["dataset"] == "synthetic"  # train records it
    (other / "run.json").write_text(json.dumps({**spec, "dataset": "trec2013"}))
    argv = ["score-batch", "--data", str(data), "--run", "e0_other", "--runs-dir", str(runs)]
    err = one_line(capsys, *argv)
    assert "was trained on dataset 'trec2013'" in err and "not on 'synthetic'" in err
    assert "--allow-other-dataset" in err and not (data / "scored").exists()
    capsys.readouterr()
    assert cli.main([*argv, "--allow-other-dataset", "--direct_num_workers", "1"]) == 0
    assert prepared.parquet_files(data / "scored" / "e0_other")
    shutil.rmtree(data / "scored")


def test_a_load_failure_that_is_not_damage_is_raised_as_it_was(folder: dict[str, Any]) -> None:
    """The check reads every file whole and finds them sound: the job's own error stands."""
    with pytest.raises(ZeroDivisionError), prepared.reading(folder["data"]):
        _ = 1 / 0
    with pytest.raises(UserError, match="no such thing"), prepared.reading(folder["data"]):
        raise UserError("no such thing")
