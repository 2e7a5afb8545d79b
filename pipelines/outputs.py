"""How a Beam job publishes its output: counts computed inside the pipeline (not runner
metrics, which not every runner commits), and a hidden staging folder swapped into place
only when the run succeeded, so a crash never leaves a half-written output, and the next run
removes what a killed one left behind (`remove_abandoned`). Which folders a job may replace at
all is `ownership.claim_output_dir`'s to say."""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import apache_beam as beam

from nlpctr.errors import UserError
from nlpctr.pipelines.ownership import (
    MARKER,
    STAGING,
    claim_output_dir,
    has_marker,
    refuse_glob_characters,
    write_marker,
)


class WriteCounts(beam.PTransform):
    """(name, number) pairs from every branch -> one JSON object of their sums, in one file
    that the driver reads after the pipeline finishes (`read_counts`).

    Takes the branches' PCollections as a tuple and sums each before flattening them: a
    runner may materialise a Flatten's inputs (Beam's FnApiRunner does), so only the
    per-bundle partial sums, never one pair per row, cross it.
    """

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def expand(self, branches: tuple[beam.pvalue.PCollection, ...]) -> beam.pvalue.PDone:
        partial_sums = tuple(pairs | f"Sum{i}" >> beam.CombinePerKey(sum) for i, pairs in enumerate(branches))
        return (
            partial_sums
            | "Flatten" >> beam.Flatten()
            | "Sum" >> beam.CombinePerKey(sum)
            | "ToDict" >> beam.combiners.ToDict()
            | "Json" >> beam.Map(lambda counts: json.dumps(counts, sort_keys=True))
            | "Write" >> beam.io.WriteToText(self.path, shard_name_template="")
        )


def read_counts(path: Path) -> dict[str, int]:
    """The totals `WriteCounts` wrote; the file is removed so it never ships with the output."""
    counts = json.loads(path.read_text())
    path.unlink()
    return counts


def staging_dir(out: Path, flag: str = "--out") -> Path:
    """A new hidden folder beside `out`: dataset readers and globs never pick up a partial run.
    A path Beam's sinks cannot write under (glob characters) is refused, naming `flag`.

    Its name carries this process's id, so that a later run can tell the staging folder of a
    run that was killed (its process is gone) from one still being written, and remove it; it
    holds the tool's marker, so that only the tool's own folders are ever removed. The caller
    has claimed `out` first (`ownership.claim_output_dir`).
    """
    refuse_glob_characters(out, flag)
    remove_abandoned(out)
    staging = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        staging.mkdir(parents=True)
        write_marker(staging, STAGING)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise UserError(f"cannot write beside {out} ({exc.strerror}); choose another location") from None
    return staging


def remove_abandoned(out: Path) -> list[Path]:
    """Remove what killed runs left beside `out` (staging folders of dead processes, and a
    retired output whose run died between its two renames); returns what was removed.

    Only the tool's own leftovers are touched: a name of the form `.NAME.tmp-PID-HEX` or
    `.NAME.old-PID-HEX` whose process is gone, holding the tool's staging marker."""
    removed = []
    for path in out.parent.glob(glob.escape(f".{out.name}.") + "*"):
        found = _LEFTOVER.fullmatch(path.name[len(out.name) + 1 :])
        if found is None or (found["pid"] is not None and _alive(int(found["pid"]))):
            continue
        if path.is_symlink() or not path.is_dir() or not has_marker(path, STAGING):
            continue  # not recognisably ours: never removed
        if found["kind"] == "old" and not out.exists():
            path.rename(out)  # killed between publish's renames: the previous output comes back
            (out / MARKER).unlink(missing_ok=True)
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


_LEFTOVER = re.compile(r"\.(?P<kind>tmp|old)-(?:(?P<pid>\d+)-)?[0-9a-f]{8}")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True  # this process's own run (a failed one removes its staging itself)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def publish(staging: Path, out: Path, job: str | None = None) -> None:
    """Swap a finished staging folder into place; a previous output is replaced whole.

    With `job`, `out` is claimed again just before the swap (`ownership.claim_output_dir`): a
    folder that stopped being the job's output while it ran (a user's files put there) is
    refused, not replaced. The previous output is renamed to a marked `.NAME.old-PID-HEX` and
    removed once the new one is in place.
    """
    if job is not None:
        claim_output_dir(out, job)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned(out)
    retired = out.parent / f".{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    if out.exists():
        write_marker(out, STAGING)  # so that a run killed right after the rename is recognisable
        out.rename(retired)
    (staging / MARKER).unlink(missing_ok=True)  # the published folder carries no marker
    staging.rename(out)  # one rename: readers see the old folder or the new one, never a mix
    shutil.rmtree(retired, ignore_errors=True)


@contextmanager
def staged_output(
    out: Path,
    job: str,
    *,
    flag: str = "--out",
    claim_flag: str | None = None,
    inputs: Iterable[Path | str] = (),
    parts: Sequence[str] = (),
) -> Iterator[Path]:
    """Every Beam job's skeleton: claim `out`, stage beside it, publish on success, clean up.

    `out` is claimed for `job` (`ownership.claim_output_dir`, naming `claim_flag`, else `flag`);
    the block writes into the staging folder it is given (`staging_dir`), which replaces `out`
    whole when the block ends without an error and is removed in every case. With `parts`, `out`
    is a folder holding several outputs: each `out/<part>` is claimed, and the block's
    `staging/<part>` replaces it (all of them after the block, so a crash leaves the old ones).

    Raises:
        UserError: `out` (or a part) is not the job's to write, or nothing can be written beside it.
    """
    out = Path(out).expanduser().resolve()
    targets = [out / part for part in parts] if parts else [out]
    for target in targets:
        claim_output_dir(target, job, inputs=inputs, flag=claim_flag or flag)
    # Several parts stage together beside `out/<job>` (e.g. DIR/.ctr_stats.tmp-PID-HEX).
    staging = staging_dir(out / job.replace("-", "_").replace(" ", "_") if parts else out, flag)
    try:
        yield staging
        if parts:
            for part in parts:
                publish(staging / part, out / part, job)
        else:
            publish(staging, out, job)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
