"""Which folders and files a job may write: its own, never a user's.

A job writes only an output it creates or one holding its own earlier output (`RECOGNISED`
files, or the `MARKER` file); anything else is a `UserError` before anything is written.
Beam-free on purpose: `nlpctr data simulate` checks its output files without importing Beam.
The refused cases: docs/DESIGN.md, "Modules in detail", ownership.py.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from nlpctr.atomic import JsonObject
from nlpctr.errors import UserError
from nlpctr.layout import CTR_META, EMBEDDINGS_MANIFEST, EXPERIMENT_RESULTS, MANIFEST, RunLayout

TOOL = "nlpctr"
# Hidden (readers of parquet folders skip names starting with "." or "_"), JSON: {"tool", "job"}.
MARKER = ".nlpctr-output"
# Pseudo filesystems: never a place for data (/dev/shm is a plain tmpfs, allowed).
SYSTEM_FOLDERS = (Path("/proc"), Path("/sys"), Path("/dev"))
ALLOWED_SYSTEM_FOLDERS = (Path("/dev/shm"),)

STAGING = "staging"  # the job name in the marker of a staging or retired folder (outputs.py)
# Bytes a job adds to an output's name for the folders beside it: `.NAME.tmp-PID-HEX` (outputs.py)
# and `NAME.failed` (data prepare's dead letters).
SIBLING_NAME_BYTES = 32
# What Beam's file sinks read as a glob in the path they write under (FileSystem.translate_pattern);
# Beam offers no quoting, so a sink writing there cannot find its own temporary files.
GLOB_CHARACTERS = "*?["


# ------------------------------------------------------------------------------- markers


def write_marker(folder: Path, job: str) -> None:
    (folder / MARKER).write_text(json.dumps({"tool": TOOL, "job": job}, sort_keys=True) + "\n")


def read_marker(folder: Path) -> JsonObject | None:
    """The marker's content when `folder` holds this tool's marker, else None."""
    content = _read_json(folder / MARKER)
    return content if content is not None and content.get("tool") == TOOL else None


def has_marker(folder: Path, job: str | None = None) -> bool:
    marker = read_marker(folder)
    return marker is not None and (job is None or marker.get("job") == job)


def _read_json(path: Path) -> JsonObject | None:
    try:
        if not path.is_file() or path.stat().st_size > 64 * 2**20:
            return None
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return content if isinstance(content, dict) else None


# ------------------------------------------------------------------------------- recognisers


def _has_keys(path: Path, keys: Iterable[str]) -> bool:
    content = _read_json(path)
    return content is not None and all(k in content for k in keys)


# Beam's file sinks name their shards part-00000-of-00001.parquet (WriteToParquet "part" prefix).
_BEAM_PART = re.compile(r"part-\d{5}-of-\d{5}\.parquet")


def _only_beam_parts(folder: Path) -> bool:
    """A folder holding nothing but Beam parquet shards (an output with no manifest)."""
    entries = list(folder.iterdir())
    return bool(entries) and all(p.is_file() and _BEAM_PART.fullmatch(p.name) for p in entries)


def is_prepared_dataset(folder: Path) -> bool:
    """`nlpctr data prepare`'s output (or its DIR.failed): the manifest it writes."""
    keys = ("dataset", "rows_in", "rows_written", "rows_rejected", "split", "code_version")
    return _has_keys(folder / MANIFEST, keys)


def is_embeddings(folder: Path) -> bool:
    return _has_keys(folder / EMBEDDINGS_MANIFEST, ("encoder_version", "slug"))


def is_ctr_history(folder: Path) -> bool:
    """ctr-stats' DIR/ctr_history (its _meta.json) or DIR/ctr_history_rows (Beam shards only)."""
    meta = ("entities", "prior_strength", "global_ctr", "snapshot_timestamp")
    return _has_keys(folder / CTR_META, meta) or _only_beam_parts(folder)


def is_train_run(folder: Path) -> bool:
    """A `nlpctr train` run folder: the config.json it writes before anything else."""
    return _has_keys(RunLayout(folder).config, ("mode", "fusion", "data_dir", "config"))


def is_experiment(folder: Path) -> bool:
    """`nlpctr experiment`'s folder from before it wrote a marker: its results.json."""
    return _has_keys(folder / EXPERIMENT_RESULTS, ("dataset", "protocol", "seed"))


def is_simulated_log(log: Path) -> bool:
    """`nlpctr data simulate`'s files: the <stem>.truth.json beside the log names them."""
    truth = _read_json(log.with_name(f"{log.name.removesuffix('.parquet')}.truth.json"))
    return (
        truth is not None
        and truth.get("generator") == "nlpctr data simulate"
        and isinstance(truth.get("files"), dict)
        and truth["files"].get("log") == log.name
    )


def is_export(folder: Path) -> bool:
    """`nlpctr export`'s folder: the nlpctr_export.json it writes beside the model."""
    return _has_keys(folder / "nlpctr_export.json", ("run", "kind", "encoder_version", "checks"))


def is_bench_work(folder: Path) -> bool:
    """bench/bench_scaling.py's OUT/work/<rows>/ from before it wrote a marker."""
    return (folder / "logs").is_dir() and (folder / "train.yaml").is_file()


# The jobs that publish a folder -> how an earlier output of theirs is recognised (besides the
# marker). A job missing here recognises its outputs by the marker only.
RECOGNISED: dict[str, Callable[[Path], bool]] = {
    "data prepare": is_prepared_dataset,
    "embed": is_embeddings,
    "ctr-stats": is_ctr_history,
    "score-batch": _only_beam_parts,
    "train": is_train_run,
    "experiment": is_experiment,
    "export": is_export,
    "bench scaling": is_bench_work,
}


def is_output_of(folder: Path, job: str) -> bool:
    """Whether `folder` holds `job`'s own earlier output (its marker or its manifest)."""
    if has_marker(folder, job):
        return True
    recognise = RECOGNISED.get(job)
    try:
        return recognise is not None and recognise(folder)
    except OSError:
        return False


# ------------------------------------------------------------------------------- claims


def claim_output_dir(
    out: Path,
    job: str,
    *,
    inputs: Iterable[Path | str] = (),
    flag: str = "--out",
    create: bool = False,
) -> Path:
    """Check that `job` may write (or replace) the folder `out`; raise UserError if not.

    Allowed: a folder that does not exist yet, an empty folder, or `job`'s own earlier output
    (`is_output_of`). Refused, before anything is changed: a file, a non-empty folder that is
    not `job`'s output, the current folder or one holding it, a folder holding one of `inputs`
    (the spec, the source log: replacing the folder would delete them), a system folder, a
    location that cannot be written. With `create`, the folder is made and marked as `job`'s
    (for jobs that write into their folder rather than swap a finished one into place).
    Returns `out`, resolved.
    """
    out = Path(out).expanduser().resolve()
    _check_location(out, flag)
    for given in inputs:
        path = Path(given).expanduser().resolve()
        if path == out or out in path.parents:
            what = "is" if path == out else f"holds {path},"
            raise UserError(
                f"{flag} {out} {what} an input of this run (the spec or the source), which writing the "
                f"output there would destroy; nothing was changed; choose another folder"
            )
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise UserError(
                f"{flag} {out} is a file, not a folder; nothing was changed; name a new or empty folder"
            )
        try:
            empty = next(out.iterdir(), None) is None
        except OSError as exc:
            raise UserError(f"{flag} {out} cannot be read ({exc.strerror}); choose another folder") from None
        if not empty and not is_output_of(out, job):
            raise UserError(
                f"{flag} {out} is not empty and holds no earlier output of `nlpctr {job}`; nothing was "
                f"changed; choose a new or empty folder (nlpctr only replaces a folder it wrote)"
            )
        _check_writable(out, flag, out)
    if create:
        try:
            out.mkdir(parents=True, exist_ok=True)
            if not has_marker(out, job):
                write_marker(out, job)
        except OSError as exc:
            raise UserError(
                f"{flag} {out} cannot be created ({exc.strerror}); choose another folder"
            ) from None
    return out


def claim_output_files(
    paths: Sequence[Path], job: str, recognise: Callable[[Path], bool], flag: str = "--out"
) -> None:
    """Check that `job` may write the files `paths` (replacing them): each is absent, or they
    are the job's own earlier output (`recognise(paths[0])`); raise UserError if not."""
    out = Path(paths[0]).expanduser().resolve()
    _check_location(out, flag)
    existing = [p for p in paths if p.exists() or p.is_symlink()]
    for path in existing:
        if path.is_dir():
            raise UserError(f"{flag} {out}: {path} is a folder; nothing was changed; name a new file")
    if existing and not recognise(out):
        names = ", ".join(p.name for p in existing)
        raise UserError(
            f"{flag} {out}: {names} already exist(s) in {out.parent} and are not an earlier output of "
            f"`nlpctr {job}`; nothing was changed; name a new file (nlpctr only replaces files it wrote)"
        )


def _check_location(out: Path, flag: str) -> None:
    """Refusals that do not depend on what `out` holds: where it is."""
    for system in SYSTEM_FOLDERS:
        allowed = any(a == out or a in out.parents for a in ALLOWED_SYSTEM_FOLDERS)
        if (out == system or system in out.parents) and not allowed:
            raise UserError(f"{flag} {out} is under {system}, a system folder; choose a folder of your own")
    if out.parent == out:
        raise UserError(f"{flag} {out} is the root folder; choose a new folder")
    _check_name_length(out, flag)
    try:
        cwd = Path.cwd().resolve()
    except OSError:
        cwd = None
    if cwd is not None and (out == cwd or out in cwd.parents):
        here = "the current folder" if out == cwd else f"a folder holding the current folder {cwd}"
        raise UserError(f"{flag} {out} is {here}; nothing was changed; name a new folder, e.g. {flag} out")
    parent = out.parent
    while not parent.exists() and not parent.is_symlink():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(
            f"{flag} {out} lies under {parent}, which is a file, not a folder; choose another path"
        )
    _check_writable(parent, flag, out)


def _check_writable(folder: Path, flag: str, out: Path) -> None:
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(
            f"{flag} {out}: {folder} is not writable (read-only, or not yours); choose another location"
        )


def _name_max(folder: Path) -> int:
    """The longest file name the filesystem holding `folder` (or its nearest existing parent) takes."""
    try:
        while not folder.exists() and folder.parent != folder:
            folder = folder.parent
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):  # a part of the path is itself too long: the usual limit
        return 255


def _check_name_length(out: Path, flag: str) -> None:
    """Refuse a name the filesystem would refuse (Errno 36) when the job writes it, or the
    staging folder beside it: before any work, naming the limit."""
    name_max = _name_max(out.parent)
    for part in out.parts[1:-1]:
        if len(os.fsencode(part)) > name_max:
            raise UserError(
                f"{flag}: the folder name {part[:40]}… is {len(os.fsencode(part))} bytes; this filesystem "
                f"takes at most {name_max}; choose a shorter path"
            )
    size, limit = len(os.fsencode(out.name)), name_max - SIBLING_NAME_BYTES
    if size > limit:
        raise UserError(
            f"{flag}: the name {out.name[:40]}… is {size} bytes; an output's name is at most {limit} bytes "
            f"here (the filesystem takes {name_max}, and the staging folder beside it adds "
            f"{SIBLING_NAME_BYTES}); choose a shorter name"
        )


def refuse_glob_characters(path: Path, flag: str) -> None:
    """Refuse an output path that Beam's file sinks cannot write under: one holding a glob
    character (`GLOB_CHARACTERS`) in any folder name. Raises UserError before any work."""
    absolute = Path(os.path.abspath(Path(path).expanduser()))
    for part in absolute.parts:
        if any(c in part for c in GLOB_CHARACTERS):
            raise UserError(
                f"{flag} {absolute}: the name {part[:60]!r} holds a glob character "
                f"({', '.join(GLOB_CHARACTERS)}), which Beam's file sinks read as a pattern (it offers no "
                "quoting), so the job could not find its own files; choose a name without them"
            )
