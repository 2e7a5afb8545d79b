"""The one reader of a prepared data folder's parquet files (and of a parquet source log): it
tells a damaged file from a bug, and names the file and the command that rebuilds it.

Every command that reads DIR's parquet runs its reads inside `reading(DIR, folders)`
(`reading_source` for `data prepare`'s log): footers checked on entry, a failure inside the
block checked against the files read. Imports nothing from nlpctr but its errors and the
layout. Details: docs/DESIGN.md, "Modules in detail", prepared.py.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from nlpctr.errors import UserError
from nlpctr.layout import (
    CTR_HISTORY,
    CTR_HISTORY_ROWS,
    EMBEDDINGS,
    IMPRESSIONS,
    LM_FEATURES,
    TRAINING,
    EmbeddingsManifest,
    Manifest,
)

# Every folder of DIR that holds parquet a command reads (not `scored/`, `enriched/`: outputs).
ALL_FOLDERS = (IMPRESSIONS, CTR_HISTORY, CTR_HISTORY_ROWS, EMBEDDINGS, LM_FEATURES, TRAINING)
# What the feature store reads (apply, materialize, lookups): all but train's own shards.
STORE_FOLDERS = (IMPRESSIONS, CTR_HISTORY, CTR_HISTORY_ROWS, EMBEDDINGS, LM_FEATURES)


def parquet_files(path: Path) -> list[Path]:
    """Data files of a parquet folder, skipping what dataset readers skip (`_meta`, `.tmp`)."""
    if not path.is_dir():
        return []
    return sorted(
        p
        for p in path.rglob("*.parquet")
        if not any(part.startswith((".", "_")) for part in p.relative_to(path).parts)
    )


def damage(file: Path, whole: bool = False) -> str | None:
    """Why `file` cannot be read as parquet (None when it can): its footer, or with `whole`
    every page of it too."""
    try:
        parquet = pq.ParquetFile(file)
        for group in range(parquet.num_row_groups) if whole else ():
            parquet.read_row_group(group)
    except (pa.ArrowException, OSError, ValueError, EOFError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return first[:160]
    return None


def rebuild_hint(data_dir: Path, file: Path) -> str:
    """The command that rebuilds a file of DIR, from the folder it lies in."""
    data_dir = Path(data_dir)
    top, *rest = file.relative_to(data_dir).parts
    if top == IMPRESSIONS:
        spec = _spec_path(data_dir)
        return f"rerun `nlpctr data prepare --dataset {spec} --out {data_dir}`"
    if top in (CTR_HISTORY, CTR_HISTORY_ROWS):
        return f"rerun `nlpctr ctr-stats --data {data_dir}`"
    if top == EMBEDDINGS and rest:
        return f"rerun `nlpctr embed --data {data_dir}{_embed_flags(data_dir / EMBEDDINGS / rest[0])}`"
    if top == LM_FEATURES and rest:
        return (
            f"delete the run that wrote it and retrain it (`nlpctr train ... --run {rest[0]}`), "
            f"or delete {data_dir / LM_FEATURES / rest[0]} and re-apply"
        )
    if top == TRAINING and rest:
        return f"delete {data_dir / TRAINING / rest[0]} (the next `nlpctr train` rebuilds it)"
    return "rebuild it with the command that wrote it"


def _spec_path(data_dir: Path) -> str:
    """The spec DIR was prepared from, as its manifest records it ("SPEC" when it cannot say)."""
    manifest = Manifest.find(data_dir)
    return (manifest.spec_path if manifest else "") or "SPEC"


def _embed_flags(folder: Path) -> str:
    """`--layers K --pooling P --max-length L` from the encoder version an embedding folder records."""
    manifest = EmbeddingsManifest.read(folder)
    version = (manifest.encoder_version if manifest else None) or ""
    found = dict(re.findall(r"(layers|pooling|max_length)=([\w.]+)", version))
    return "".join(f" --{k.replace('_', '-')} {v}" for k, v in found.items())


def prepared_files(data_dir: Path, folders: Sequence[str] = ALL_FOLDERS) -> list[tuple[Path, str]]:
    """(file, fix) for every parquet file under these folders of DIR."""
    data_dir = Path(data_dir).resolve()
    return [
        (file, rebuild_hint(data_dir, file))
        for folder in folders
        for file in parquet_files(data_dir / folder)
    ]


def check_files(files: Sequence[tuple[Path, str]], whole: bool = False) -> None:
    """Raise a UserError for the first file whose footer (or, `whole`, any page) is damaged."""
    for file, fix in files:
        reason = damage(file, whole)
        if reason is not None:
            raise UserError(f"{file} is damaged ({reason}); {fix}")


@contextlib.contextmanager
def _checked(files: Callable[[], Sequence[tuple[Path, str]]]) -> Iterator[None]:
    check_files(files())
    try:
        yield
    except UserError:
        raise
    except Exception:
        check_files(files(), whole=True)  # raises the one line when a file is damaged
        raise


def reading(data_dir: Path, folders: Sequence[str] = ALL_FOLDERS) -> contextlib.AbstractContextManager[None]:
    """Run a command's reads of DIR's parquet (`folders` of it) with damage named: see the module
    docstring.

    Args:
        data_dir: the prepared folder.
        folders: its folders the block reads (default: every one that holds parquet).

    Returns:
        A context manager.

    Raises:
        UserError: on entry, a file whose footer is damaged; on a failure in the block, a file
            damaged anywhere. Each names the file and the command that rebuilds it.
    """
    return _checked(lambda: prepared_files(data_dir, folders))


def reading_source(paths: Sequence[Path], fix: str) -> contextlib.AbstractContextManager[None]:
    """`reading` for a parquet source log, its one file or its shards (`data prepare`): `fix`
    says what to do about a damaged one.

    Args:
        paths: the source log's file or its shards.
        fix: what the error message says to do about a damaged file.

    Returns:
        A context manager: footers are checked on entry; a failure inside it that a damaged
        file explains becomes a UserError naming the file and `fix`, any other is re-raised.

    Raises:
        UserError: on entry or exit, a damaged file (as above).
    """
    return _checked(lambda: [(Path(path), fix) for path in paths])
