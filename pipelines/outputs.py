"""How a Beam job publishes its output: counts computed inside the pipeline (not runner
metrics, which not every runner commits), and a hidden staging folder swapped into place
only when the run succeeded, so a crash never leaves a half-written output."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import apache_beam as beam


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


def staging_dir(out: Path) -> Path:
    """A new hidden folder beside `out`: dataset readers and globs never pick up a partial run."""
    staging = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    return staging


def publish(staging: Path, out: Path) -> None:
    """Swap a finished staging folder into place; a previous output is replaced whole."""
    out.parent.mkdir(parents=True, exist_ok=True)
    retired = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    if out.exists():
        out.rename(retired)
    staging.rename(out)  # one rename: readers see the old folder or the new one, never a mix
    shutil.rmtree(retired, ignore_errors=True)
