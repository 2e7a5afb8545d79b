"""The generated feature repo module, `DIR/feature_repo/repo_definitions.py`: plain Feast
declarations that, executed, yield exactly the objects `build_definitions` returns.

Golden file: `tests/golden/repo_definitions.py.golden` is the module rendered for the small
fixed dataset built by `golden_data` (tiny parquet files, no Beam, no Feast apply), with the
dataset folder replaced by `<DATA_DIR>`. A change to the definitions or to the renderer shows
up as a diff against it. When the change is intended, regenerate it and review the diff:

    NLPCTR_UPDATE_GOLDEN=1 .venv/bin/python -m pytest -q tests/test_feature_repo.py
    git diff tests/golden/

The stock `feast` CLI reads the written module: `feast plan` on a freshly applied repo finds
no change, and `feast feature-views list` lists every view (`feast serve` is tested in
tests/test_features.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from builders import make_dataset, write_ctr_history, write_embeddings

from nlpctr.features import render, store
from nlpctr.features.definitions import Definitions, build_definitions
from nlpctr.features.job_outputs import JobOutputs

GOLDEN = Path(__file__).parent / "golden" / "repo_definitions.py.golden"
UPDATE_GOLDEN = os.environ.get("NLPCTR_UPDATE_GOLDEN") == "1"


def write_lm_features(data: Path, run: str = "e2_small", kind: str = "cascade_finetuned") -> None:
    """One LM run's output in the trainer's layout: a composite (query, ad) text key."""
    folder = data / "lm_features" / run / "epoch-2"
    folder.mkdir(parents=True)
    table = pa.table(
        {
            "query_text_id": pa.array(["q1", ""], pa.string()),
            "ad_text_id": pa.array(["a1", "a2"], pa.string()),
            "event_timestamp": pa.array([0, 0], pa.timestamp("us", tz="UTC")),
            "lm_score": pa.array([0.25, 0.75], pa.float32()),
            "lm_embedding": pa.array([[0.1, 0.2], [0.3, 0.4]], pa.list_(pa.float32())),
            "model_version": pa.array([f"{run}@epoch-2/test"] * 2, pa.string()),
        }
    )
    pq.write_table(table, folder / "part-0.parquet")
    meta = {
        "run": run,
        "kind": kind,
        "chosen": "epoch-2",
        "keys": ["query_text_id", "ad_text_id"],
        "model_version": f"{run}@epoch-2/test",
    }
    (folder.parent / "_meta.json").write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def golden_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every kind of view: entity CTR, leave-one-out rows, one encoder (8-d), one LM run."""
    data = make_dataset(tmp_path_factory.mktemp("golden") / "ds", rows=40)
    write_ctr_history(data)
    write_embeddings(data, dim=8)
    write_lm_features(data)
    return data


def rendered(data: Path, **options: Any) -> tuple[str, Path, Definitions]:
    """The module text, the repo folder it belongs in, and the definitions it renders."""
    layout = JobOutputs.discover(data)
    definitions = build_definitions(layout, **options)
    return render.render_module(definitions, data, layout.dataset), data / "feature_repo", definitions


def normalised(text: str, data: Path) -> str:
    """The module with the dataset folder as `<DATA_DIR>` (it should name none)."""
    return text.replace(str(Path(data).resolve()), "<DATA_DIR>")


def test_rendered_module_matches_the_golden_file(golden_data: Path) -> None:
    text, _, _ = rendered(golden_data)
    got = normalised(text, golden_data)
    if UPDATE_GOLDEN:
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(got)
    assert GOLDEN.is_file(), f"no {GOLDEN.name}: run with NLPCTR_UPDATE_GOLDEN=1 to write it"
    assert got == GOLDEN.read_text(), (
        f"the rendered repo_definitions.py drifted from {GOLDEN}; if intended, regenerate it with "
        "NLPCTR_UPDATE_GOLDEN=1 (see this file's docstring) and review the diff"
    )
    assert "<DATA_DIR>" not in got  # sources are under DATA_DIR, found from the module's own path


def test_module_yields_the_objects_build_definitions_returns(golden_data: Path) -> None:
    text, repo, definitions = rendered(golden_data)
    assert render.differences(text, repo / render.REPO_MODULE, definitions) == []
    found = render.execute_module(text, repo / render.REPO_MODULE)
    built = definitions.objects()
    assert len(found) == len(built)
    for obj in built:
        kind = {"Entity": "entity", "FileSource": "source", "FeatureView": "view"}
        twin = found[(kind.get(type(obj).__name__, "service"), obj.name)]
        assert twin == obj
        assert render.same_object(twin, obj)  # the protos, but for creation times
    # Absolute source paths at run time, as Beam's Feast enrichment handler needs.
    source = found[("source", "ctr_ad_id_source")]
    assert source.path == str(golden_data.resolve() / "ctr_history" / "ad_id")


def test_a_changed_definition_is_a_difference(golden_data: Path) -> None:
    text, repo, _ = rendered(golden_data)
    _, _, other = rendered(golden_data, ttl=timedelta(days=30))
    problems = render.differences(text, repo / render.REPO_MODULE, other)
    assert "view ctr_ad_id differs" in problems
    with pytest.raises(RuntimeError, match="does not reproduce"):
        render.check_module(text, repo / render.REPO_MODULE, other)


@pytest.mark.parametrize(
    "ttl", [timedelta(days=30), timedelta(hours=1, minutes=30, seconds=5), timedelta(microseconds=7)]
)
def test_a_non_zero_ttl_round_trips(golden_data: Path, ttl: timedelta) -> None:
    text, repo, definitions = rendered(golden_data, ttl=ttl)
    assert render.differences(text, repo / render.REPO_MODULE, definitions) == []


def test_the_encoder_apply_chose_is_read_back(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "two", rows=30)
    write_ctr_history(data)
    write_embeddings(data, slug="enc_a", version="encoder-a", dim=4)
    write_embeddings(data, slug="enc_b", version="encoder-b", dim=4)
    text, repo, definitions = rendered(data, encoder="enc_b")
    assert render.read_encoder(text) == "enc_b"
    assert render.differences(text, repo / render.REPO_MODULE, definitions) == []
    # Modules rendered by earlier versions named it in a build_definitions call.
    legacy = "_DEFINITIONS = build_definitions(Layout.discover(Path(__file__)), encoder='enc_a')\n"
    assert render.read_encoder(legacy) == "enc_a"
    assert render.read_encoder(legacy.replace("'enc_a'", "None")) is None


@pytest.mark.slow
def test_stock_feast_cli_plans_no_change_and_lists_the_views(golden_data: Path) -> None:
    # Before any materialisation: afterwards Feast's plan reports the views' batch sources as
    # updated, their creation times being all that differs (its diff compares whole protos
    # once materialisation intervals make two views unequal).
    applied = store.apply(golden_data)
    repo = applied["repo"]
    feast = Path(sys.executable).with_name("feast")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # Side by side: each start of the CLI costs ~10 s of imports.
    runs = [
        subprocess.Popen(
            [str(feast), "-c", repo, *command],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for command in (["plan"], ["feature-views", "list"])
    ]
    try:
        (planned, _), (listed, _) = (run.communicate(timeout=300) for run in runs)
    finally:
        for run in runs:
            if run.poll() is None:
                run.kill()
                run.wait()
    assert runs[0].returncode == 0 and "No changes to registry" in planned, planned
    assert runs[1].returncode == 0, listed
    assert all(view in listed for view in applied["feature_views"]), listed
