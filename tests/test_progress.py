"""nlpctr/progress.py: progress goes to stderr through one channel, and --no-progress silences it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from nlpctr.pipelines import simulate
from nlpctr.progress import bar, note


def test_notes_and_bars_go_to_stderr_only_when_shown(capsys: pytest.CaptureFixture[str]) -> None:
    note("hidden", show=False)
    assert bar(range(3), show=False).disable
    assert capsys.readouterr() == ("", "")
    note("epoch 1 step 2", show=True)
    out, err = capsys.readouterr()
    assert out == "" and err == "epoch 1 step 2\n"  # stdout is the command's result alone


def test_no_progress_silences_a_job(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)  # a terminal draws bars
    argv = ["--rows", "400", "--redundancy", "0.5", "--chunk-rows", "100"]
    simulate.run([*argv, "--out", str(tmp_path / "shown.parquet")])
    assert "simulate" in capsys.readouterr().err
    simulate.run([*argv, "--out", str(tmp_path / "quiet.parquet"), "--no-progress"])
    assert capsys.readouterr() == ("", "")
