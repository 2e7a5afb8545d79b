"""A throwaway redis-server on a free loopback port (tests and benchmarks start their own)."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalRedisServer:
    """redis-server bound to 127.0.0.1 on a free port, no persistence; `stop()` ends it.

    `stop(save=True)` writes a snapshot to `workdir` first, and a new server started on the same
    `workdir` and `port` loads it: a Redis that went away and came back with its data.
    """

    def __init__(self, workdir: Path, start_timeout_s: float = 20, port: int | None = None) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.url = f"127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(workdir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.client = redis.Redis(host="127.0.0.1", port=self.port)
        deadline = time.monotonic() + start_timeout_s
        while True:
            try:
                if self.client.ping():
                    return
            except redis.exceptions.ConnectionError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not start on {self.url}")
            time.sleep(0.05)

    def dump(self) -> dict[bytes, dict[bytes, bytes]]:
        """Every hash in the server, as raw bytes."""
        return {key: self.client.hgetall(key) for key in self.client.scan_iter(count=1000)}

    def stop(self, save: bool = False) -> None:
        if save and self.process.poll() is None:
            self.client.shutdown(save=True)  # snapshot to workdir/dump.rdb, then exit
            self.process.wait(timeout=20)
        self.client.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
