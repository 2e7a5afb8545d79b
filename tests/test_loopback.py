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

from nlpctr.pipelines.loopback import direct_runner_on_loopback, on_loopback

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
    binding = direct_runner_on_loopback(options) if loopback else contextlib.nullcontext()
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
