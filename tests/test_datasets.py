"""The project stands alone: its bundled data resolve inside its own tree, unchanged.

A clone with nothing beside it must install, run and test from its own files, so the data root
(without $NLPCTR_DATA_ROOT) must lie inside the project or the installed package, every bundled
spec's source must be there, and no tracked file may name a path outside the tree.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from nlpctr.pipelines.specs import BUNDLED_SPEC_DIR, data_root, load_spec

PROJECT = Path(__file__).resolve().parent.parent
CHECKSUMS = {
    "upworthy/upworthy_exploratory.parquet": (
        "91d1d583e267dbd9b4bb3641eb764245e61013deea99a651bdd129376df24782"
    ),
    "trec2013/trec2013_impressions.tsv": "0286fe26bb4e54767e49c4ec93f766694cf3259d4e6e1679e7fd5fa7d225dbb4",
    "esci_ubi/ubi_queries_events.ndjson": "78da401534ab9cf9d8d6df687e1ca6e398e7231470e14fc68ed27f44edbe06a3",
}


@pytest.fixture
def default_root(monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("NLPCTR_DATA_ROOT", raising=False)
    return data_root()


def test_data_root_is_inside_the_project(default_root: Path) -> None:
    assert default_root.is_relative_to(PROJECT), f"{default_root} lies outside {PROJECT}"


@pytest.mark.parametrize("spec", sorted(p.stem for p in BUNDLED_SPEC_DIR.glob("*.yaml")))
def test_every_bundled_spec_reads_a_file_inside_the_project(default_root: Path, spec: str) -> None:
    source = load_spec(spec).source.path
    assert source.is_file(), f"{spec}: {source} is missing"
    assert source.resolve().is_relative_to(default_root)


@pytest.mark.parametrize(("relative", "sha256"), sorted(CHECKSUMS.items()))
def test_bundled_files_are_the_published_ones(default_root: Path, relative: str, sha256: str) -> None:
    assert hashlib.sha256((default_root / relative).read_bytes()).hexdigest() == sha256


def test_the_environment_variable_still_overrides(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NLPCTR_DATA_ROOT", str(tmp_path))
    assert data_root() == tmp_path.resolve()


def test_no_tracked_file_names_a_path_outside_the_tree() -> None:
    if not (PROJECT / ".git").exists():
        pytest.skip("not a git checkout")
    tracked = subprocess.run(
        ["git", "ls-files", "-z"], cwd=PROJECT, check=True, capture_output=True
    ).stdout.split(b"\0")
    outside = re.compile(rb"\.\./shared|/work/(?:shared|main|runs)\b")
    offenders = []
    for name in filter(None, tracked):
        path = PROJECT / os.fsdecode(name)
        if path.suffix in {".parquet", ".png", ".tsv", ".ndjson"} or not path.is_file():
            continue
        if outside.search(path.read_bytes()):
            offenders.append(os.fsdecode(name))
    assert offenders == []


@pytest.mark.slow
def test_a_built_wheel_carries_the_datasets(tmp_path: Path) -> None:
    """`pip install .` must give a package that finds its data with nothing beside it."""
    # Built from a copy: setuptools writes build/ and *.egg-info into the tree it builds.
    source = tmp_path / "src"
    shutil.copytree(
        PROJECT, source, ignore=shutil.ignore_patterns(".git", ".venv", "build", "data", "runs", "*.egg-info")
    )
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(source)],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = tmp_path.glob("nlpctr-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for relative in CHECKSUMS:
        assert f"nlpctr/datasets/{relative}" in names
    assert {f"nlpctr/pipelines/specs/{p.name}" for p in BUNDLED_SPEC_DIR.glob("*.yaml")} <= names
