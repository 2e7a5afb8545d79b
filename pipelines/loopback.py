"""Beam's DirectRunner serves its workers over gRPC (a worker pool in every mode; control, data,
state and logging servers, and a job service, with `--direct_running_mode=multi_processing`)
on every interface (`[::]:0`), and has no option to change that. Its workers all run on this
machine, so the jobs bind those servers to loopback: a job on a shared host then listens on
nothing the network can reach. Other runners keep Beam's binding (their workers may be remote).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import apache_beam as beam
import grpc
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.runners.runner import PipelineResult

LOOPBACK = "127.0.0.1"
_EVERY_INTERFACE = ("[::]", "0.0.0.0", "")
_DIRECT_RUNNERS = (None, "DirectRunner", "direct", "SwitchingDirectRunner", "BundleBasedDirectRunner")


def on_loopback(address: str) -> str:
    """`[::]:PORT` (or 0.0.0.0, or a bare port) as 127.0.0.1:PORT; other hosts unchanged."""
    host, _, port = address.rpartition(":")
    return f"{LOOPBACK}:{port}" if host in _EVERY_INTERFACE else address


def runs_here(options: PipelineOptions) -> bool:
    """Whether the pipeline's workers all run on this machine (the DirectRunner, in any mode)."""
    return options.view_as(StandardOptions).runner in _DIRECT_RUNNERS


@contextmanager
def direct_runner_on_loopback(options: PipelineOptions) -> Iterator[None]:
    """While the block runs, gRPC servers created in this process bind loopback when they ask
    for every interface, if the pipeline runs on the DirectRunner; otherwise nothing changes."""
    if not runs_here(options):
        yield
        return
    make_server = grpc.server

    def loopback_server(*args: Any, **kwargs: Any) -> grpc.Server:
        server = make_server(*args, **kwargs)
        add_port = server.add_insecure_port
        server.add_insecure_port = lambda address: add_port(on_loopback(address))  # type: ignore[method-assign]
        return server

    grpc.server = loopback_server
    try:
        yield
    finally:
        grpc.server = make_server


def run_to_completion(pipeline: beam.Pipeline) -> PipelineResult:
    """Run a job's pipeline (its own, or a test's `TestPipeline`) and wait for it to finish,
    with the DirectRunner's servers on loopback; returns the result (for its metrics)."""
    with direct_runner_on_loopback(pipeline.options):
        result = pipeline.run()
        result.wait_until_finish()
    return result
