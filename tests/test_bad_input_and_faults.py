"""Bad configs and flags, odd source values, a full disk, a read-only folder, over-long names,
glob characters, a backslash, empty splits and Ctrl-C: one line and exit 2 (`nlpctr: error: ...`,
naming the fix) or exit 130 for an interrupt, never a traceback, and nothing half-written; values
out of range are dead letters with their reason, and rows in = rows written + rows rejected.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from builders import make_dataset, write_ctr_history
from test_damaged_files import QUICK, one_line, prepare_folder, train_args
from test_hostile_input import SPEC, csv_bytes, rows, write_source

from nlpctr.errors import UserError, machine_fault
from nlpctr.features import store
from nlpctr.features.store_config import StoreChoice
from nlpctr.models import checkpoints
from nlpctr.models.config import load_config
from nlpctr.pipelines import cli, ctr_stats, ingest, ingest_validate, records, source_files
from nlpctr.pipelines.experiment.config import load_protocol
from nlpctr.pipelines.specs import load_spec


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("faults")
    config = root / "quick.yaml"
    config.write_text(yaml.safe_dump(QUICK))
    return {"data": prepare_folder(root, ctr_job=False), "runs": root / "runs", "config": config}


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------- 4: configs


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (b"- 1\n- 2\n", r"holds a list, not a mapping of settings"),
        (b"net: 5\n", r"`net` is a section of settings, got an int \(5\)"),
        (b"\x00\x01\xff\xfe", r"is not a YAML text file \(not UTF-8 at byte 2\)"),
        (b"loop: {lr: [\n", r"is not valid YAML \(.* at line 2, column 1\)"),
        (b"net: {embedding_dim: -4}\n", r"net\.embedding_dim must be an integer >= 1, got -4"),
        (b"net: {dropout: 7}\n", r"net\.dropout must be a probability in \[0, 1\), got 7"),
        (b"net: {hidden: [0]}\n", r"net\.hidden must be a list of layer widths >= 1"),
        (b"lopo: {lr: 0.5}\n", r"unknown key `lopo`; did you mean `loop`\?"),
        (b"loop: {epochz: 5}\n", r"unknown key `loop\.epochz`; did you mean `loop\.epochs`\?"),
        (b"modes: {jiont: {}}\n", r"unknown key `modes\.jiont`; did you mean `modes\.joint`\?"),
        (b"evaluation: {bootstrap_rounds: 0}\n", r"evaluation\.bootstrap_rounds must be an integer >= 1"),
    ],
)
def test_a_bad_training_config_is_one_line(tmp_path: Path, text: bytes, message: str) -> None:
    config = tmp_path / "c.yaml"
    config.write_bytes(text)
    with pytest.raises(UserError, match=message):
        load_config("joint", config)


def test_a_misspelt_section_is_refused_before_the_run_folder(
    folder: dict[str, Any], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    config = tmp_path / "typo.yaml"
    config.write_text(yaml.safe_dump({"lopo": {"lr": 0.5}}))
    err = one_line(capsys, *train_args(folder["data"], tmp_path / "runs", config, "typo"))
    assert "unknown key `lopo`; did you mean `loop`?" in err
    assert not (tmp_path / "runs").exists()


def test_an_experiment_config_names_the_nearest_known_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "c.yaml"
    for content, message in (
        ({"fusion": ["score"]}, "unknown key `fusion`; did you mean `fusions`?"),
        (
            {"train_config": {"lopo": {}}},
            "unknown key `train_config.lopo`; did you mean `train_config.loop`?",
        ),
        ({"distill": {"loop": {"epochz": 1}}}, "did you mean `distill.loop.epochs`?"),
        ({"quick": {"lm_layers": 1}}, "unknown key `quick`"),  # --quick applies it; a user's is ignored
        ({"train_config": {"net": {"dropout": 7}}}, "net.dropout must be a probability"),
    ):
        config.write_text(yaml.safe_dump(content))
        with pytest.raises(UserError, match=message.replace(".", r"\.").replace("?", r"\?")):
            load_protocol(False, config)
    config.write_text("- a list\n")
    argv = ["experiment", "--dataset", "trec2013", "--config", str(config), "--out", str(tmp_path / "out")]
    assert "holds a list, not a mapping of settings" in one_line(capsys, *argv)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------- 5, 10: flags


@pytest.mark.parametrize("rho", ["a", "", "a,b", "2", "nan", "0.5,0.5"])
def test_a_bad_rho_is_refused_before_anything_is_made(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], rho: str
) -> None:
    out = tmp_path / "sweep"
    err = one_line(capsys, "experiment", "--dataset", "simulated", "--rho", rho, "--out", str(out))
    assert "--rho" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("strength", ["nan", "inf", "-inf", "0"])
def test_a_prior_strength_that_is_not_a_positive_number_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], strength: str
) -> None:
    data = make_dataset(tmp_path / "data", rows=20)
    before = snapshot(tmp_path)
    err = one_line(capsys, "ctr-stats", "--data", str(data), f"--prior-strength={strength}")
    assert "--prior-strength must be a positive finite number" in err
    assert snapshot(tmp_path) == before


def test_a_materialize_window_ending_before_it_starts_changes_nothing(
    folder: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    data = folder["data"]
    state = data / "feature_repo" / "data" / "nlpctr_state.json"
    before = state.read_bytes()
    argv = ["features", "materialize", "--data", str(data), "--start", "2030-01-01", "--end", "2020-01-01"]
    assert "is not before --end" in one_line(capsys, *argv)
    assert state.read_bytes() == before  # no view marked unfinished
    store.OnlineFeatures(data, "baseline")  # lookups are still served


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--start", "yesterday"], "--start: 'yesterday'"),
        (["--start", "2024-03-01", "--end", "2024-13-01"], "--end: '2024-13-01'"),
    ],
)
def test_a_materialize_time_that_is_not_iso_is_one_line(
    folder: dict[str, Any], capsys: pytest.CaptureFixture[str], flags: list[str], named: str
) -> None:
    """The project's one line, not argparse's usage and error (3 lines)."""
    data = folder["data"]
    state = data / "feature_repo" / "data" / "nlpctr_state.json"
    before = state.read_bytes()
    err = one_line(capsys, "features", "materialize", "--data", str(data), *flags)
    assert named in err and "is not an ISO-8601 time" in err and "usage:" not in err
    assert state.read_bytes() == before


# ------------------------------------------------------------------------------- 6: source values

AGGREGATED = {**SPEC, "label": {"form": "aggregated", "impressions": "n", "clicks": "k"}}
BIG = "9" * 5000


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"n": BIG}, "n has 5,000 digits: it does not fit the int64 count column"),
        ({"n": "1" + "0" * 400 + ".0"}, "n has 401 digits"),  # float() of it is infinite
        ({"k": BIG}, "k has 5,000 digits"),
        ({"n": float("inf")}, "n='inf' is not an integer count"),
    ],
)
def test_a_count_out_of_range_is_a_dead_letter(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    spec = load_spec(str(write_source(tmp_path, "log.csv", b"", AGGREGATED)))
    row = {"id": "1", "ad": "a", "title": "t", "ts": "2024-01-01T00:00:00Z", "n": "3", "k": "1", **change}
    rejected = records.map_record(spec, row, records.Limits(100))
    assert isinstance(rejected, records.Rejection) and rejected.reason == records.BAD_COUNT
    assert message in rejected.message
    json.loads(rejected.to_json())  # its dead letter can be written


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"n": ' + BIG + "}", "a number in it has more than 4,300 digits"),
        ('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested deeper than 32 levels"),
        ('{"a": ' + "[" * 40 + "]" * 40 + "}", "nested deeper than 32 levels"),
    ],
)
def test_a_json_value_out_of_range_is_malformed(line: str, message: str) -> None:
    record = source_files.parse_json_line(line)
    assert record is not None and record[records.MALFORMED_KEY].startswith(message)


def test_values_out_of_range_end_to_end_count_up(tmp_path: Path) -> None:
    lines = [json.dumps(r | {"n": "3", "k": "1"}) for r in rows(6)]
    lines += ['{"id": "x1", "n": ' + BIG + "}", '{"id": "x2", "a": ' + "[" * 5000 + "]" * 5000 + "}"]
    lines += [json.dumps(rows(1, "y")[0] | {"n": BIG, "k": "1"})]
    lines += [json.dumps(rows(1, "z")[0] | {"n": "1" + "0" * 400 + ".0", "k": "1"})]
    spec = write_source(tmp_path, "log.jsonl", ("\n".join(lines) + "\n").encode(), AGGREGATED, format="jsonl")
    argv = ["--dataset", str(spec), "--out", str(tmp_path / "out"), "--max-reject-rate", "1"]
    manifest = ingest.run(argv)
    assert manifest["rows_in"] == 10 == manifest["rows_written"] + manifest["rows_rejected"]
    assert manifest["rejected_by_reason"] == {"bad_count": 2, "malformed_record": 2}


def test_a_source_that_is_a_symlink_loop_is_one_line(tmp_path: Path) -> None:
    os.symlink(tmp_path / "b.csv", tmp_path / "a.csv")
    os.symlink(tmp_path / "a.csv", tmp_path / "b.csv")
    spec = write_source(tmp_path, "log.csv", csv_bytes(rows(2)))
    spec.write_text(spec.read_text().replace("path: log.csv", "path: a.csv"))
    with pytest.raises(UserError, match=r"source\.path: 'a\.csv' is a symlink loop; point it at the log"):
        load_spec(str(spec))


def test_a_data_root_that_is_not_a_folder_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NLPCTR_DATA_ROOT", str(tmp_path / "missing"))
    with pytest.raises(UserError, match=r"NLPCTR_DATA_ROOT=.*missing' is not a folder; .* or unset it"):
        load_spec("upworthy")
    monkeypatch.setenv("NLPCTR_DATA_ROOT", str(tmp_path))  # a folder, without the files
    with pytest.raises(UserError, match="NLPCTR_DATA_ROOT points at a folder without the bundled upworthy"):
        ingest.run(["--dataset", "upworthy", "--out", str(tmp_path / "out")])


# ------------------------------------------------------------------------------- 7: the machine


def test_an_output_name_over_the_filesystem_limit_is_one_line(
    folder: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = write_source(tmp_path, "log.csv", csv_bytes(rows(4)))
    long = "n" * 300
    err = one_line(capsys, "data", "prepare", "--dataset", str(spec), "--out", str(tmp_path / long))
    assert "is 300 bytes; an output's name is at most" in err
    err = one_line(capsys, *train_args(folder["data"], tmp_path / "runs", folder["config"], "r" * 240))
    assert "--runs-dir/--run: the name" in err and "is 240 bytes" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.csv", "log.yaml"]


def test_a_read_only_data_folder_is_refused_before_anything_is_written(
    folder: dict[str, Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Simulated (root writes anywhere): access(2) answers as on a read-only filesystem."""
    data = folder["data"]
    real_access = os.access
    inside = lambda p: Path(p) == data or data in Path(p).parents  # noqa: E731
    monkeypatch.setattr(os, "access", lambda p, mode: real_access(p, mode) and not inside(p))
    before = snapshot(data)
    err = one_line(capsys, *train_args(data, tmp_path / "runs", folder["config"], "ro"), "--streaming")
    assert f"{data / 'training'} is not writable" in err and "pass --in-memory" in err
    err = one_line(capsys, "features", "materialize", "--data", str(data))
    assert "feature_repo/data is not writable" in err and "materialize writes" in err
    assert snapshot(data) == before and not (tmp_path / "runs").exists()


def test_a_full_disk_during_prepare_leaves_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from apache_beam.io import parquetio

    def disk_full(self: Any, writer: Any, table: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", "part-00000.parquet")

    monkeypatch.setattr(parquetio._ParquetSink, "write_record", disk_full)
    spec = write_source(tmp_path, "log.csv", csv_bytes(rows(20)))
    err = one_line(capsys, "data", "prepare", "--dataset", str(spec), "--out", str(tmp_path / "out"))
    assert "No space left on device (part-00000.parquet); free space on that disk" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.csv", "log.yaml"]  # no staging folder


def test_a_full_disk_during_train_leaves_no_half_written_checkpoint(
    folder: dict[str, Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    saved = []
    real_write = checkpoints._write

    def fills_the_disk(staging: Path, data: memoryview) -> None:
        if saved:  # the first checkpoint is written; the second meets a full disk half-way
            Path(staging).write_bytes(b"PK\x03\x04 half")
            raise OSError(errno.ENOSPC, "No space left on device")
        saved.append(staging)
        real_write(staging, data)

    monkeypatch.setattr(checkpoints, "_write", fills_the_disk)
    err = one_line(capsys, *train_args(folder["data"], tmp_path / "runs", folder["config"], "full"))
    assert "could not be written (No space left on device); nothing half-written was kept" in err
    written = sorted((tmp_path / "runs" / "full" / "checkpoints" / "ctr").iterdir())
    assert [p.name for p in written] == ["epoch-0.pt"]  # whole, and nothing else
    monkeypatch.undo()
    assert "model" in checkpoints.load_checkpoint(written[0])


def test_a_checkpoint_write_the_filesystem_refuses_is_one_line(tmp_path: Path) -> None:
    """A real failed write, not a patched one: torch's own file writer reports it as a
    RuntimeError without an errno ("unexpected pos"), so the checkpoint is serialised first and
    written by Python, whose OSError names the cause. RLIMIT_FSIZE stands in for a full disk."""
    import resource
    import signal

    import torch

    state = {"w": torch.zeros(20_000)}  # about 80 KB
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of the signal
    resource.setrlimit(resource.RLIMIT_FSIZE, (16_384, limits[1]))
    try:
        with pytest.raises(UserError, match=r"could not be written \(File too large\); nothing half"):
            checkpoints.save_checkpoint(state, tmp_path / "ckpt.pt")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    assert list(tmp_path.iterdir()) == []  # no staging file, no half checkpoint


def test_a_machine_fault_beam_wrapped_is_recognised() -> None:
    wrapped = RuntimeError("OSError: [Errno 30] Read-only file system: '/d/x' [while running 'Write']")
    fault = machine_fault(wrapped)
    assert fault is not None and str(fault).startswith("Read-only file system (/d/x); it is on a read-only")
    pyarrow = RuntimeError(  # pyarrow's own OSError, as a worker process reports it
        "OSError: [Errno 28] Error writing bytes to file. Detail: [errno 28] No space left on device "
        "[while running 'WriteImpressions/Write']"
    )
    assert str(machine_fault(pyarrow)).startswith("Error writing bytes to file. Detail: [errno 28] No space")
    assert machine_fault(RuntimeError("ValueError: a bug [while running 'Map']")) is None


# ------------------------------------------------------------------------------- 8: empty splits


def test_spec_fractions_that_leave_a_split_empty_are_refused(tmp_path: Path) -> None:
    spec = write_source(tmp_path, "log.csv", csv_bytes(rows(4)), {**SPEC, "split": {"fractions": [1, 0, 0]}})
    with pytest.raises(UserError, match=r"\[1, 0, 0\] leaves the valid and test splits empty"):
        load_spec(str(spec))


def test_train_refuses_an_empty_split_before_the_run_folder(
    folder: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = folder["data"] / "manifest.json"
    original = path.read_text()
    manifest = json.loads(original)
    manifest["split"]["rows"]["test"] = 0
    try:
        path.write_text(json.dumps(manifest))
        err = one_line(capsys, *train_args(folder["data"], tmp_path / "runs", folder["config"], "e0"))
    finally:
        path.write_text(original)
    assert "has no test rows (train " in err and "prepare a longer log" in err
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------- 9: paths, signals


def test_glob_characters_in_out_are_refused_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = write_source(tmp_path, "log.csv", csv_bytes(rows(4)))
    out = tmp_path / "out" / "gl[1]"
    err = one_line(capsys, "data", "prepare", "--dataset", str(spec), "--out", str(out))
    assert "'gl[1]' holds a glob character" in err
    err = one_line(capsys, "experiment", "--dataset", str(spec), "--quick", "--out", str(out))
    assert "'gl[1]' holds a glob character" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.csv", "log.yaml"]


def test_a_backslash_in_the_data_path(tmp_path: Path) -> None:
    """DuckDB reads `\\` in a path as an escape: its store is refused with the way out, and Feast's
    file store reads the folder."""
    data = make_dataset(tmp_path / "a\\b" / "data", rows=40)
    write_ctr_history(data)
    with pytest.raises(
        UserError, match=r"holds a backslash, .* apply with `nlpctr features apply .* --offline file`"
    ):
        store.apply(data)
    store.apply(data, StoreChoice(offline="file"))
    frame = store.training_frame(data, "baseline")
    assert len(frame) == 40 and frame["ctr_ad_id__ad_id_ctr"].notna().all()


@pytest.mark.parametrize("job", ["data prepare", "ctr-stats"])
def test_ctrl_c_inside_a_beam_step_is_interrupted_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, job: str
) -> None:
    def pressed(*args):  # type: ignore[no-untyped-def]  # no hints: Beam would check them
        raise KeyboardInterrupt

    if job == "data prepare":
        monkeypatch.setattr(ingest_validate, "map_record", pressed)
        spec = write_source(tmp_path, "log.csv", csv_bytes(rows(4)))
        argv = ["data", "prepare", "--dataset", str(spec), "--out", str(tmp_path / "out")]
    else:
        monkeypatch.setattr(ctr_stats, "_row_history", pressed)
        argv = ["ctr-stats", "--data", str(make_dataset(tmp_path / "data", rows=20))]
    before = snapshot(tmp_path)
    capsys.readouterr()
    assert cli.main(argv) == 130
    err = capsys.readouterr().err
    assert err == "nlpctr: interrupted\n"
    assert snapshot(tmp_path) == before  # the staging folder was removed, nothing published


def test_a_command_group_lists_its_commands(capsys: pytest.CaptureFixture[str]) -> None:
    """`nlpctr data --help` lists data's commands (it was an 'unknown command'); `nlpctr data`
    alone lists them too, and exits 2 because no command was named."""
    assert cli.main(["data", "--help"]) == 0
    out = capsys.readouterr().out
    assert "data prepare" in out and "data simulate" in out and "train" not in out
    assert cli.main(["data"]) == 2
    assert "data prepare" in capsys.readouterr().out
    assert cli.main(["nope"]) == 2
    assert "unknown command 'nope'" in capsys.readouterr().err
