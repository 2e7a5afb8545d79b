"""Counts computed inside a pipeline (not runner metrics, which not every runner commits)."""

from __future__ import annotations

import json

import apache_beam as beam


class WriteCounts(beam.PTransform):
    """(name, number) pairs from every branch -> one JSON object of their sums, in one file
    that the driver reads after the pipeline finishes."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def expand(self, pairs: beam.pvalue.PCollection) -> beam.pvalue.PDone:
        return (
            pairs
            | "Sum" >> beam.CombinePerKey(sum)
            | "ToDict" >> beam.combiners.ToDict()
            | "Json" >> beam.Map(lambda counts: json.dumps(counts, sort_keys=True))
            | "Write" >> beam.io.WriteToText(self.path, shard_name_template="")
        )
