"""The suite runs on the CPU wherever it runs: outside tests marked `gpu`, torch sees no CUDA
device, so `--device auto` is the CPU and every number a test compares is the CPU's (bitwise
goldens and reruns included). Tests marked `gpu` see the machine's GPUs (tests/test_device.py;
those that need one are skipped, with the reason, where there is none).

Under pytest-xdist (`make test`) each worker runs torch on one thread, its subprocesses too: the
workers fill the cores between them. The longest files are handed out first (`LONGEST_FIRST`)."""

from __future__ import annotations

import os

import pytest
import torch

# Serial seconds on an idle 2-core machine, longest first; `make test` hands files out in
# collection order (--no-loadscope-reorder), so these start first and the workers end together.
LONGEST_FIRST = (
    "test_experiment.py",
    "test_experiment_sweep.py",
    "test_gpu_bench.py",
    "test_spark_store.py",
)

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers with torch's default threads each (one per core) would oversubscribe the cores.
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _the_cpu_unless_marked_gpu(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if request.node.get_closest_marker("gpu") is None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "gpu: sees the machine's CUDA devices (every other test sees none: tests/conftest.py)"
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The files of `LONGEST_FIRST` first, in its order; every other file after them, as collected."""
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file keeps its order
