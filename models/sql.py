"""DuckDB set-up and SQL literals, shared by the out-of-core join (features) and streamed reads.

Paths go into SQL as string literals, so each is quoted here (a `'` in a folder name is data,
not the end of the string).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def literal(value: str | Path) -> str:
    """A DuckDB string literal."""
    return "'" + str(value).replace("'", "''") + "'"


def identifier(name: str) -> str:
    """A DuckDB quoted identifier."""
    return '"' + name.replace('"', '""') + '"'


def file_list(paths: Sequence[str | Path]) -> str:
    """A DuckDB list of file paths, for `read_parquet`."""
    return "[" + ", ".join(literal(p) for p in paths) + "]"


def connect(temp_dir: str | Path, memory_limit: str) -> Any:
    """A DuckDB connection that reads naive timestamps as UTC (as Feast does), spills to
    `temp_dir` past `memory_limit`, keeps insertion order and shows no progress bar."""
    import duckdb

    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    con.execute("SET enable_progress_bar = false")
    con.execute(f"SET memory_limit = {literal(memory_limit)}")
    con.execute(f"SET temp_directory = {literal(temp_dir)}")
    con.execute("SET preserve_insertion_order = true")
    return con
