"""The suite runs on the CPU wherever it runs: outside tests marked `gpu`, torch sees no CUDA
device, so `--device auto` is the CPU and every number a test compares is the CPU's (bitwise
goldens and reruns included). Tests marked `gpu` see the machine's GPUs (tests/test_device.py;
those that need one are skipped, with the reason, where there is none)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _the_cpu_unless_marked_gpu(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if request.node.get_closest_marker("gpu") is None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "gpu: sees the machine's CUDA devices (every other test sees none: tests/conftest.py)"
    )
