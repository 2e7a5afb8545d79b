"""A job writes only into a folder it created or one holding its own earlier output.

Every other `--out` (the folder holding the user's log and spec, `.`, a file, a non-empty
folder the tool did not write, /proc, a read-only place) is refused with one line on stderr and
exit status 2, and nothing is moved, renamed or deleted. Staging and retired folders are
removed only when they are recognisably the tool's own (its name pattern and its marker).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as ds
import pytest
import yaml

from nlpctr.errors import UserError
from nlpctr.pipelines import cli, outputs, ownership, simulate, train
from nlpctr.pipelines.experiment import command
from nlpctr.pipelines.experiment import sweep as rho_sweep

LOG_CSV = """id,ad,title,ts,n,k,test
1,a1,Good headline one,2024-01-01T00:00:00Z,10,2,t1
2,a2,Good headline two,2024-01-02T00:00:00Z,5,0,t1
3,a3,Good headline three,2024-01-03T00:00:00Z,5,1,t2
4,a4,Good headline four,2024-01-04T00:00:00Z,7,1,t3
"""
SPEC = {
    "name": "tiny",
    "source": {"path": "log.csv", "format": "csv"},
    "columns": {"impression_id": "id", "ad_id": "ad", "ad_text": "title"},
    "context": {"test_id": "test"},
    "timestamp": {"column": "ts", "format": "iso8601"},
    "label": {"form": "aggregated", "impressions": "n", "clicks": "k"},
    "group": "test_id",
}


def write_user_files(folder: Path, spec: dict = SPEC) -> Path:
    """A user's working folder: the log, the spec and a note; returns the spec's path."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "log.csv").write_text(LOG_CSV)
    (folder / "notes.txt").write_text("my notes\n")
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every entry under `root` (hidden ones too) -> its bytes (None for a folder)."""
    return {
        str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))
    }


def nlpctr(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """`nlpctr ARGV` in this process: (exit status, stderr)."""
    code = cli.main(list(argv))
    return code, capsys.readouterr().err


def assert_one_line_refusal(code: int, err: str, *words: str) -> None:
    assert code == 2, err
    assert err.startswith("nlpctr: error: ") and err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for word in words:
        assert word in err, err


def prepare(capsys: pytest.CaptureFixture[str], spec: Path, out: Path | str) -> tuple[int, str]:
    return nlpctr(capsys, "data", "prepare", "--dataset", str(spec), "--out", str(out))


def dead_pid() -> int:
    """The id of a process that has ended."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# ------------------------------------------------------------------------------- data prepare


def test_out_is_the_folder_holding_the_log_and_spec(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = write_user_files(tmp_path / "work")
    before = snapshot(tmp_path)
    code, err = prepare(capsys, spec, tmp_path / "work")
    assert_one_line_refusal(code, err, str(tmp_path / "work"), "nothing was changed")
    assert snapshot(tmp_path) == before  # the log, the spec, the note: all there, nothing added


def test_out_is_the_current_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = write_user_files(tmp_path / "work")
    monkeypatch.chdir(tmp_path / "work")
    before = snapshot(tmp_path)
    for out in (".", str(tmp_path / "work"), str(tmp_path)):  # ., and a folder holding it
        code, err = prepare(capsys, spec, out)
        assert_one_line_refusal(code, err, "current folder")
    assert snapshot(tmp_path) == before


def test_out_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = write_user_files(tmp_path / "work")
    (tmp_path / "report.txt").write_text("a user's file\n")
    before = snapshot(tmp_path)
    code, err = prepare(capsys, spec, tmp_path / "report.txt")
    assert_one_line_refusal(code, err, "is a file")
    assert snapshot(tmp_path) == before  # untouched, and no hidden .report.txt.old-* copy
    code, err = prepare(capsys, spec, tmp_path / "report.txt" / "sub")
    assert_one_line_refusal(code, err, "a file, not a folder")
    assert snapshot(tmp_path) == before


def test_out_is_a_foreign_non_empty_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = write_user_files(tmp_path / "work")
    foreign = tmp_path / "results"
    (foreign / "deep").mkdir(parents=True)
    (foreign / "deep" / "thesis.tex").write_text("years of work\n")
    (foreign / "manifest.json").write_text(json.dumps({"name": "a web app manifest"}))  # not ours
    before = snapshot(tmp_path)
    code, err = prepare(capsys, spec, foreign)
    assert_one_line_refusal(code, err, "not empty", "nlpctr data prepare")
    assert snapshot(tmp_path) == before


def test_out_holds_the_spec_or_the_source(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = write_user_files(tmp_path / "work")
    out = tmp_path / "out"
    assert prepare(capsys, spec, out)[0] == 0
    # Even the tool's own output is refused when the spec (or only the source) lies inside it.
    inside = write_user_files(out / "copy")
    source_inside = {**SPEC, "source": {"path": str(out / "copy" / "log.csv"), "format": "csv"}}
    outside = write_user_files(tmp_path / "elsewhere", source_inside)
    before = snapshot(tmp_path)
    for spec_path in (inside, outside):
        code, err = prepare(capsys, spec_path, out)
        assert_one_line_refusal(code, err, "an input of this run")
        assert snapshot(tmp_path) == before


def test_empty_folder_then_own_output_is_replaced_with_the_same_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = write_user_files(tmp_path / "work")
    out = tmp_path / "out"
    out.mkdir()  # an existing empty folder is fine
    assert prepare(capsys, spec, out)[0] == 0
    first = json.loads((out / "manifest.json").read_text())
    rows = ds.dataset(out / "impressions", format="parquet").to_table().sort_by("impression_id")
    (out / "impressions" / "stale.parquet").write_bytes(b"from the first run")  # replaced whole

    assert prepare(capsys, spec, out)[0] == 0  # its own earlier output: replaced
    again = json.loads((out / "manifest.json").read_text())
    assert {k: v for k, v in again.items() if k != "wall_seconds"} == {
        k: v for k, v in first.items() if k != "wall_seconds"
    }
    assert ds.dataset(out / "impressions", format="parquet").to_table().sort_by("impression_id").equals(rows)
    assert not (out / "impressions" / "stale.parquet").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "work"]  # no .out.tmp-/.out.old-
    assert not (out / ownership.MARKER).exists()  # the published folder carries no marker


def test_under_proc_or_read_only_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = write_user_files(tmp_path / "work")
    for out in ("/proc/nlpctr-out", "/proc/self", "/sys/nlpctr-out"):
        code, err = prepare(capsys, spec, out)
        assert_one_line_refusal(code, err, "system folder")
    assert not Path("/proc/nlpctr-out").exists()


def test_read_only_location_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = write_user_files(tmp_path / "work")
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    # What access(2) answers on a read-only mount (EROFS), also when the tests run as root.
    monkeypatch.setattr(
        ownership.os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode)
    )
    code, err = prepare(capsys, spec, locked / "out")
    assert_one_line_refusal(code, err, "not writable")
    assert list(locked.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder")
def test_read_only_folder_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = write_user_files(tmp_path / "work")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        code, err = prepare(capsys, spec, locked / "out")
    finally:
        locked.chmod(0o755)
    assert_one_line_refusal(code, err, "not writable")


def test_a_failing_mkdir_is_one_line_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = write_user_files(tmp_path / "work")
    real_mkdir = Path.mkdir

    def read_only(self: Path, *args: object, **kwargs: object) -> None:
        if self.name.startswith(".out.tmp-"):
            raise OSError(30, "Read-only file system")
        real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    code, err = prepare(capsys, spec, tmp_path / "out")
    assert_one_line_refusal(code, err, "Read-only file system")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]


def test_refusal_from_a_real_process(tmp_path: Path) -> None:
    """As a user sees it: one line on stderr, exit status 2, the files still there."""
    spec = write_user_files(tmp_path)
    before = snapshot(tmp_path)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "nlpctr.pipelines.cli",
            "data",
            "prepare",
            "--dataset",
            str(spec),
            "--out",
            ".",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert_one_line_refusal(done.returncode, done.stderr, "current folder")
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------------------- DIR.failed


def test_dead_letter_folder_is_removed_only_when_it_is_the_tools(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = write_user_files(tmp_path / "work")
    failed = tmp_path / "out.failed"
    failed.mkdir()
    (failed / "mine.txt").write_text("a user's folder that happens to be called out.failed\n")
    before = snapshot(tmp_path)
    code, err = prepare(capsys, spec, tmp_path / "out")
    assert_one_line_refusal(code, err, "dead-letter folder", "not empty")
    assert snapshot(tmp_path) == before

    # The tool's own dead-letter folder (a failed run's) goes once a run succeeds.
    (failed / "mine.txt").unlink()
    bad = write_user_files(tmp_path / "bad", {**SPEC, "max_text_chars": 5})  # every row too long
    code, err = prepare(capsys, bad, tmp_path / "out")
    assert code == 2 and "rows were rejected" in err
    assert (failed / "manifest.json").is_file() and not (failed / ownership.MARKER).exists()
    assert prepare(capsys, spec, tmp_path / "out")[0] == 0
    assert not failed.exists()


# ------------------------------------------------------------------------------- leftovers


def test_killed_runs_leftovers_are_removed_only_when_marked(tmp_path: Path) -> None:
    out = tmp_path / "out"
    pid = dead_pid()
    ours = tmp_path / f".out.tmp-{pid}-0123abcd"
    ours.mkdir()
    ownership.write_marker(ours, ownership.STAGING)
    (ours / "part.parquet").write_bytes(b"half written")
    lookalike = tmp_path / f".out.tmp-{pid}-89abcdef"  # the name, but not the marker
    lookalike.mkdir()
    (lookalike / "keep.txt").write_text("not the tool's\n")
    a_file = tmp_path / f".out.old-{pid}-0123abcd"
    a_file.write_text("a file with a staging-like name\n")
    assert outputs.remove_abandoned(out) == [ours]
    assert not ours.exists() and (lookalike / "keep.txt").exists() and a_file.exists()


def test_a_run_killed_between_the_renames_gets_its_output_back(tmp_path: Path) -> None:
    out = tmp_path / "out"
    retired = tmp_path / f".out.old-{dead_pid()}-0123abcd"
    retired.mkdir()
    (retired / "manifest.json").write_text("{}")
    ownership.write_marker(retired, ownership.STAGING)
    outputs.remove_abandoned(out)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"]  # back, marker gone
    assert not retired.exists()


def test_publish_leaves_no_retired_copy_and_refuses_a_folder_that_stopped_being_its(tmp_path: Path) -> None:
    out = tmp_path / "out"
    for run in range(2):
        staging = outputs.staging_dir(out)
        (staging / "manifest.json").write_text(json.dumps({"run": run}))
        outputs.publish(staging, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"]

    staging = outputs.staging_dir(tmp_path / "results")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "thesis.tex").write_text("put there while the job ran\n")
    with pytest.raises(UserError, match="not empty"):
        outputs.publish(staging, tmp_path / "results", "score-batch")
    assert (tmp_path / "results" / "thesis.tex").exists()


# ------------------------------------------------------------------------------- other jobs


def test_each_job_recognises_only_its_own_output(tmp_path: Path) -> None:
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    manifest = dict.fromkeys(
        ("dataset", "rows_in", "rows_written", "rows_rejected", "split", "code_version"), 1
    )
    (prepared / "manifest.json").write_text(json.dumps(manifest))
    parts = tmp_path / "parts"
    parts.mkdir()
    (parts / "part-00000-of-00001.parquet").write_bytes(b"")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(
        json.dumps({"mode": "baseline", "fusion": None, "data_dir": "d", "config": {}})
    )
    marked = tmp_path / "marked"
    marked.mkdir()
    (marked / "report.md").write_text("")
    ownership.write_marker(marked, "experiment")
    owners = {prepared: "data prepare", parts: "score-batch", run: "train", marked: "experiment"}
    for folder, owner in owners.items():
        for job in ("data prepare", "embed", "score-batch", "train", "experiment"):
            if job == owner:
                assert ownership.claim_output_dir(folder, job) == folder
            else:
                with pytest.raises(UserError, match="not empty"):
                    ownership.claim_output_dir(folder, job)


def test_train_refuses_a_foreign_run_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    assert prepare(capsys, write_user_files(tmp_path / "work"), data)[0] == 0
    (tmp_path / "runs" / "mine").mkdir(parents=True)
    (tmp_path / "runs" / "mine" / "notes.txt").write_text("a user's notes\n")
    before = snapshot(tmp_path / "runs")
    code, err = nlpctr(
        capsys,
        "train",
        "--mode",
        "baseline",
        "--data",
        str(data),
        "--runs-dir",
        str(tmp_path / "runs"),
        "--run",
        "mine",
    )
    assert_one_line_refusal(code, err, "nlpctr train")
    assert snapshot(tmp_path / "runs") == before
    (tmp_path / "runs" / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        train.run(
            ["--mode", "baseline", "--data", str(data), "--runs-dir", str(tmp_path / "runs"), "--run", "file"]
        )
    assert (tmp_path / "runs" / "file").read_text() == "x"


def test_ctr_stats_refuses_a_foreign_output_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    assert prepare(capsys, write_user_files(tmp_path / "work"), data)[0] == 0
    (data / "ctr_history").write_text("a user's file where the job writes a folder\n")
    before = snapshot(data)
    code, err = nlpctr(capsys, "ctr-stats", "--data", str(data))
    assert_one_line_refusal(code, err, "ctr_history is a file")
    assert snapshot(data) == before


def test_simulate_refuses_files_and_folders_it_did_not_write(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "logs"
    folder.mkdir()
    (folder / "real.parquet").write_bytes(b"a user's real log")
    (folder / "real.spec.yaml").write_text("a user's spec\n")
    (tmp_path / "dataset.parquet").mkdir()  # a foreign non-empty folder (a parquet dataset)
    (tmp_path / "dataset.parquet" / "part-0.parquet").write_bytes(b"a user's data")
    before = snapshot(tmp_path)
    argv = ["data", "simulate", "--rows", "300", "--redundancy", "0.5", "--no-progress", "--out"]
    for out, words in (
        (folder, (".parquet",)),
        (tmp_path / "dataset.parquet", ("is a folder",)),
        (folder / "real.parquet", ("not an earlier output", "nlpctr data simulate")),
        (Path("/proc/nlpctr.parquet"), ("system folder",)),
    ):
        code, err = nlpctr(capsys, *argv, str(out))
        assert_one_line_refusal(code, err, *words)
    (folder / "other.spec.yaml").write_text("only the spec exists\n")
    before = snapshot(tmp_path)
    code, err = nlpctr(capsys, *argv, str(folder / "other.parquet"))
    assert_one_line_refusal(code, err, "other.spec.yaml")
    assert snapshot(tmp_path) == before


def test_simulate_replaces_its_own_files(tmp_path: Path) -> None:
    out = tmp_path / "sim" / "log.parquet"
    first = simulate.run(["--rows", "300", "--redundancy", "0.5", "--no-progress", "--out", str(out)])
    before = {key: Path(path).read_bytes() for key, path in first["paths"].items()}
    again = simulate.run(["--rows", "300", "--redundancy", "0.5", "--no-progress", "--out", str(out)])
    assert {key: Path(path).read_bytes() for key, path in again["paths"].items()} == before
    assert sorted(p.name for p in out.parent.iterdir()) == sorted(
        Path(p).name for p in first["paths"].values()
    )


def test_experiment_refuses_a_foreign_folder_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_work(*args: object, **kwargs: object) -> None:
        raise AssertionError("work started before --out was checked")

    monkeypatch.setattr(simulate, "simulate", no_work)
    monkeypatch.setattr(command, "run_protocol", no_work)
    monkeypatch.setattr(rho_sweep, "run_protocol", no_work)
    spec = write_user_files(tmp_path / "work")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work\n")
    before = snapshot(tmp_path)
    for dataset, out, words in (
        (str(spec), foreign, ("not empty", "nlpctr experiment")),
        ("simulated", foreign, ("not empty",)),
        (str(spec), tmp_path / "work", ("an input of this run",)),
        (str(spec), tmp_path / "work" / "notes.txt", ("is a file",)),
        (str(spec), Path("/proc/nlpctr-experiment"), ("system folder",)),
    ):
        code, err = nlpctr(capsys, "experiment", "--dataset", dataset, "--quick", "--out", str(out))
        assert_one_line_refusal(code, err, *words)
    assert snapshot(tmp_path) == before


def test_experiment_takes_an_empty_folder_or_its_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    started = []
    results = {
        "dataset": "tiny",
        "runs": {"baseline": {"auc": 0.5}, "joint_score": {"auc": 0.6, "delta_auc_vs_baseline": 0.1}},
        "redundancy": {},
        "claims": [],
        "wall_seconds": 0.0,
    }

    def protocol_stub(request: object, protocol: object, dataset: str, out: Path) -> dict:
        started.append(out)
        return results

    monkeypatch.setattr(command, "run_protocol", protocol_stub)
    spec = write_user_files(tmp_path / "work")
    (tmp_path / "empty").mkdir()
    command.run(["--dataset", str(spec), "--quick", "--out", str(tmp_path / "empty")])
    assert started == [tmp_path / "empty"]
    assert ownership.has_marker(tmp_path / "empty", "experiment")
    # An experiment folder from before the marker: recognised by its results.json.
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "results.json").write_text(json.dumps({"dataset": "x", "protocol": {}, "seed": 0}))
    (legacy / "report.md").write_text("")
    assert ownership.claim_output_dir(legacy, "experiment", create=True) == legacy
    assert ownership.has_marker(legacy, "experiment")
