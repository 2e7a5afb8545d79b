"""Beam opens gRPC servers for its workers on every interface (`[::]:0`) and has no option to
change that: the DirectRunner's worker pool (and, with `--direct_running_mode=multi_processing`,
its control, data, state and logging servers and a job service), Beam's embedded job service
(`--job_endpoint=embed`: the job service, its artifact staging and logging servers, and the
runner's own Fn API servers), and a LOOPBACK environment's worker pool. Each of those serves only
this machine: the workers are this process's threads or its child processes, the embedded job
service lives in this process, and Beam hands a LOOPBACK worker pool's address to the runner as
`localhost`. So the jobs bind them to loopback: a job on a shared host then listens on nothing the
network can reach. Servers a runner opens in its own process (Prism's Go binary, a Flink or Spark
job server) are not Beam's Python and keep their own binding (docs/SCALE.md); a remote runner's
workers keep Beam's.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import apache_beam as beam
import grpc
from apache_beam.options.pipeline_options import PipelineOptions, PortableOptions, StandardOptions
from apache_beam.runners.runner import PipelineResult

LOOPBACK = "127.0.0.1"
_EVERY_INTERFACE = ("[::]", "0.0.0.0", "")
# Runners whose workers are this process's threads or child processes.
_IN_PROCESS_RUNNERS = (
    None,
    "DirectRunner",
    "direct",
    "SwitchingDirectRunner",
    "BundleBasedDirectRunner",
    "FnApiRunner",
    "TestDirectRunner",
)


def on_loopback(address: str) -> str:
    """`[::]:PORT` (or 0.0.0.0, or a bare port) as 127.0.0.1:PORT; other hosts unchanged."""
    host, _, port = address.rpartition(":")
    return f"{LOOPBACK}:{port}" if host in _EVERY_INTERFACE else address


def runs_here(options: PipelineOptions) -> bool:
    """Whether the pipeline's workers all run in this process or its children (an in-process
    runner: the DirectRunner in any mode, the FnApiRunner), so that they see this machine's devices."""
    runner = options.view_as(StandardOptions).runner
    name = runner if runner is None or isinstance(runner, str) else type(runner).__name__
    return name is None or name.rsplit(".", 1)[-1] in _IN_PROCESS_RUNNERS


def serves_this_machine_only(options: PipelineOptions) -> bool:
    """Whether the servers this process opens for a job are reached from this machine only: an
    in-process runner's, Beam's embedded job service's, or a LOOPBACK environment's worker pool.
    Read when each server opens: a runner may set its default environment (PrismRunner: LOOPBACK)
    after the job started."""
    if runs_here(options):
        return True
    portable = options.view_as(PortableOptions)
    return portable.job_endpoint == "embed" or str(portable.environment_type or "").upper() == "LOOPBACK"


@contextmanager
def servers_on_loopback(options: PipelineOptions) -> Iterator[None]:
    """While the block runs, gRPC servers created in this process bind loopback when they ask for
    every interface and the job's servers serve this machine only (`serves_this_machine_only`);
    otherwise nothing changes."""
    make_server = grpc.server

    def loopback_server(*args: Any, **kwargs: Any) -> grpc.Server:
        server = make_server(*args, **kwargs)
        if serves_this_machine_only(options):
            add_port = server.add_insecure_port
            server.add_insecure_port = lambda address: add_port(on_loopback(address))  # type: ignore[method-assign]
        return server

    grpc.server = loopback_server
    try:
        yield
    finally:
        grpc.server = make_server


def run_to_completion(pipeline: beam.Pipeline) -> PipelineResult:
    """Run a job's pipeline (its own, or a test's `TestPipeline`) and wait for it to finish, with
    the servers Beam opens for it in this process on loopback; returns the result (for its metrics)."""
    with servers_on_loopback(pipeline.options):
        result = pipeline.run()
        result.wait_until_finish()
    return result
