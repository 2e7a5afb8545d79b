"""Beam's DirectRunner listens on every interface; the jobs bind its servers to loopback."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import apache_beam as beam
import pytest
from apache_beam.internal.cloudpickle import cloudpickle
from apache_beam.options.pipeline_options import PipelineOptions

from nlpctr.pipelines.loopback import on_loopback, servers_on_loopback, serves_this_machine_only

LOOPBACK_HEX = {"0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F"}
LINUX = Path("/proc/net/tcp").is_file()
# The worker subprocess cannot import this test module: ship its DoFn by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def listening_hosts(pid: int) -> list[str]:
    """Local addresses (hex, as /proc/net writes them) of the TCP sockets `pid` listens on."""
    fd_dir = Path(f"/proc/{pid}/fd")
    inodes = set()
    for fd in fd_dir.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    hosts = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                hosts.append(fields[1].split(":")[0])
    return hosts


class RunnerListening(beam.DoFn):
    """In a worker subprocess: writes the hosts the runner (this test's process) listens on."""

    def __init__(self, out: str, runner_pid: int) -> None:
        self.out, self.runner_pid = out, runner_pid

    def process(self, element: int):
        Path(self.out).write_text(json.dumps(listening_hosts(self.runner_pid)))
        yield element


def hosts_while_running(tmp_path: Path, loopback: bool) -> list[str]:
    """Runs a one-element job in a worker subprocess and returns what its runner listened on."""
    options = PipelineOptions(["--direct_running_mode=multi_processing", "--direct_num_workers=1"])
    out = tmp_path / f"hosts-{loopback}.json"
    binding = servers_on_loopback(options) if loopback else contextlib.nullcontext()
    with binding, beam.Pipeline(options=options) as pipeline:
        _ = pipeline | beam.Create([0]) | beam.ParDo(RunnerListening(str(out), os.getpid()))
    return json.loads(out.read_text())


def test_addresses_on_every_interface_become_loopback() -> None:
    assert on_loopback("[::]:0") == "127.0.0.1:0"
    assert on_loopback("0.0.0.0:8815") == "127.0.0.1:8815"
    assert on_loopback("10.0.0.5:8815") == "10.0.0.5:8815"


@pytest.mark.skipif(not LINUX, reason="reads /proc/net")
def test_a_multi_processing_job_listens_on_loopback_only(tmp_path: Path) -> None:
    """Without the binding the runner listens on every interface (so this check can fail); with
    it, every server the runner opens for its workers is on loopback, and the job still runs."""
    default = hosts_while_running(tmp_path, loopback=False)
    assert default and set(default) - LOOPBACK_HEX, default
    bound = hosts_while_running(tmp_path, loopback=True)
    assert bound and set(bound) <= LOOPBACK_HEX, bound


@pytest.mark.parametrize(
    ("flags", "loopback"),
    [
        ([], True),
        (["--runner=DirectRunner", "--direct_running_mode=multi_processing"], True),
        (["--runner=FnApiRunner"], True),
        (["--runner=PortableRunner", "--job_endpoint=embed", "--environment_type=EXTERNAL"], True),
        (["--runner=PortableRunner", "--job_endpoint=localhost:8099", "--environment_type=LOOPBACK"], True),
        (["--runner=PortableRunner", "--job_endpoint=flink:8099", "--environment_type=EXTERNAL"], False),
        (["--runner=FlinkRunner", "--flink_master=flink:8081", "--environment_type=DOCKER"], False),
    ],
)
def test_servers_for_this_machine_only_bind_loopback(flags: list[str], loopback: bool) -> None:
    """In-process runners, Beam's embedded job service and a LOOPBACK worker pool serve this
    machine; a remote runner's workers may need to reach what this process opens."""
    assert serves_this_machine_only(PipelineOptions(flags)) is loopback


def portable_hosts(tmp_path: Path, loopback: bool) -> list[str]:
    """What this process listens on while a one-element job runs through Beam's embedded job
    service, its bundles on a LOOPBACK worker (a thread of this process)."""
    options = PipelineOptions(
        ["--runner=PortableRunner", "--job_endpoint=embed", "--environment_type=LOOPBACK"]
    )
    out = tmp_path / f"portable-{loopback}.json"
    binding = servers_on_loopback(options) if loopback else contextlib.nullcontext()
    with binding, beam.Pipeline(options=options) as pipeline:
        _ = pipeline | beam.Create([0]) | beam.ParDo(RunnerListening(str(out), os.getpid()))
    return json.loads(out.read_text())


@pytest.mark.skipif(not LINUX, reason="reads /proc/net")
def test_the_embedded_job_service_and_its_workers_listen_on_loopback_only(tmp_path: Path) -> None:
    default = portable_hosts(tmp_path, loopback=False)
    assert default and set(default) - LOOPBACK_HEX, default  # Beam's own binding: every interface
    bound = portable_hosts(tmp_path, loopback=True)
    assert bound and set(bound) <= LOOPBACK_HEX, bound


def test_a_local_dask_cluster_serves_its_http_endpoints_on_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dask's LocalCluster binds its scheduler and workers to 127.0.0.1, but its HTTP server
    (health, metrics, dashboard) to every interface on :8787 unless told."""
    import dask.distributed

    from nlpctr.pipelines.dask_runner import DaskRunner

    given: list[dict] = []

    class Stop(Exception):
        pass

    def client(**kwargs: object) -> None:
        given.append(kwargs)
        raise Stop

    monkeypatch.setattr(dask.distributed, "Client", client)
    for flags in ([], ["--dask_client_address", "tcp://10.0.0.5:8786"]):
        with pytest.raises(Stop):
            DaskRunner().run_pipeline(beam.Pipeline(), PipelineOptions(flags))
    assert given[0] == {"dashboard_address": "127.0.0.1:0"}
    assert given[1] == {"address": "tcp://10.0.0.5:8786"}  # a remote cluster keeps its own settings
