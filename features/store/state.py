"""The store's own record beside Feast's registry: which views are materialised, from which
inputs, and which a killed run left half-written (`feature_repo/data/nlpctr_state.json`)."""

from __future__ import annotations

import json
from pathlib import Path

from nlpctr.atomic import JsonObject, write_json
from nlpctr.features.store_config import repo_dir

STATE_FILE = "nlpctr_state.json"


def fix_command(verb: str, data_dir: Path) -> str:
    """The command that fixes a store problem, for error messages."""
    return f"`nlpctr features {verb} --data {Path(data_dir).resolve()}`"


def state_path(data_dir: Path) -> Path:
    """Where the state file of DIR's store lives."""
    return repo_dir(data_dir) / "data" / STATE_FILE


def read_state(data_dir: Path) -> JsonObject:
    """The state file of DIR's store; an empty record before the first apply."""
    path = state_path(data_dir)
    return json.loads(path.read_text()) if path.is_file() else {"materialized": {}}


def write_state(data_dir: Path, state: JsonObject) -> None:
    """Write the state file whole or not at all (a process killed mid-write leaves the old one)."""
    path = state_path(data_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, state)
