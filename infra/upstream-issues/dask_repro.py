"""Reproduces, on Beam 2.77's DaskRunner, the defects listed in infra/dask_runner_fixes.md, and
runs the same pipelines on nlpctr's DaskRunner for comparison.

    python infra/upstream-issues/dask_repro.py upstream|nlpctr [CASE ...]

Each pipeline records what reaches its sinks in files (workers run in other processes), and the
script prints them. Two worker processes, `--dask_npartitions=2`.
"""

import os
import sys
import tempfile

import apache_beam as beam
import distributed
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.windowed_value import WindowedValue

OUT = tempfile.mkdtemp()
RUNNERS = {
    "upstream": "apache_beam.runners.dask.dask_runner.DaskRunner",
    "nlpctr": "nlpctr.pipelines.dask_runner.DaskRunner",
}


def record(tag):
    """A Map function that appends each element to the file OUT/tag."""

    def write(x):
        with open(os.path.join(OUT, tag), "a") as f:
            f.write(f"{x}\n")
        return x

    return write


def seen(tag):
    path = os.path.join(OUT, tag)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        values = sorted(f.read().split())
    os.remove(path)
    return values


class CountPerBundle(beam.DoFn):
    """Emits one element per bundle, from finish_bundle (as Beam's file sinks do)."""

    def start_bundle(self):
        self.n = 0

    def process(self, x):
        self.n += 1

    def finish_bundle(self):
        yield WindowedValue(self.n, 0, (GlobalWindow(),))


def read(p, src):  # 01
    p | beam.io.ReadFromText(src) | beam.Map(record("read"))
    return lambda: seen("read")


def impulse(p, src):  # 01
    p | beam.Impulse() | beam.Map(len) | beam.Map(record("impulse"))
    return lambda: seen("impulse")


def tagged(p, src):  # 02: only the "odd" output is consumed
    split = (
        p
        | beam.Create(range(6))
        | beam.FlatMap(lambda x: [beam.pvalue.TaggedOutput("odd", x)] if x % 2 else [x]).with_outputs(
            "odd", main="even"
        )
    )
    split.odd | beam.Map(record("odd"))
    return lambda: seen("odd")


def finish_bundle(p, src):  # 03
    p | beam.Create(range(6)) | beam.ParDo(CountPerBundle()) | beam.Map(record("fb"))
    return lambda: seen("fb")


def write_text(p, src):  # 03: a file sink, whose writers report their files from finish_bundle
    folder = tempfile.mkdtemp(dir=OUT)
    p | "Lines" >> beam.Create(range(6)) | beam.Map(str) | beam.io.WriteToText(os.path.join(folder, "out"))

    def listing():
        found = {}
        for root, _, files in os.walk(folder):
            for name in files:
                with open(os.path.join(root, name)) as f:
                    found[os.path.relpath(os.path.join(root, name), folder)] = f.read().split()
        return found

    return listing


def two_sinks(p, src):  # 04
    numbers = p | beam.Create(range(3))
    numbers | "A" >> beam.Map(record("A"))
    numbers | "B" >> beam.Map(record("B"))
    return lambda: {"A": seen("A"), "B": seen("B")}


def side_input(p, src):  # 05: how often is the side input computed?
    side = p | "Side" >> beam.Create([10]) | "Computed" >> beam.Map(record("computed"))
    (
        p
        | beam.Create(range(4))
        | beam.Map(lambda x, s: x + s, s=beam.pvalue.AsSingleton(side))
        | "Out" >> beam.Map(record("si"))
    )
    return lambda: {"out": seen("si"), "side input computed": len(seen("computed"))}


def string_keys(p, src):  # apache/beam#29365
    (
        p
        | beam.Create([("a", 1), ("a", 2), ("b", 3), ("b", 4)] * 3)
        | beam.GroupByKey()
        | beam.MapTuple(lambda k, v: f"{k}:{len(list(v))}")
        | beam.Map(record("gbk"))
    )
    return lambda: seen("gbk")


def client_closed(p, src):  # 06
    p | beam.Create([1, 2]) | beam.Map(record("c"))
    return lambda: seen("c")


CASES = [read, impulse, tagged, finish_bundle, write_text, two_sinks, side_input, string_keys, client_closed]

if __name__ == "__main__":
    which, wanted = sys.argv[1], sys.argv[2:]
    src = os.path.join(OUT, "in.txt")
    with open(src, "w") as f:
        f.write("l1\nl2\nl3\n")
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0")
    for case in [c for c in CASES if not wanted or c.__name__ in wanted]:
        options = PipelineOptions(
            [
                f"--runner={RUNNERS[which]}",
                f"--dask_client_address={cluster.scheduler_address}",
                "--dask_npartitions=2",
            ]
        )
        try:
            pipeline = beam.Pipeline(options=options)
            check = case(pipeline, src)
            result = pipeline.run()
            result.wait_until_finish()
            extra = f" (client {result.client.status})" if case is client_closed else ""
            print(f"{which} {case.__name__}: {check()}{extra}")
        except Exception as e:
            print(f"{which} {case.__name__}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:160]}")
    cluster.close()
