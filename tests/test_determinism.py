"""Same seed, same outputs: `seed_run` (called wherever a run seeds torch) makes the kernels
deterministic. The case that broke it: a batch gathers its texts' vectors by index, and the
gather's backward accumulates repeated indices with several threads in a varying order (two
identical joint runs differed by up to 2e-5 in p)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

from nlpctr.models.device import seed_run


@pytest.fixture
def restore_flags() -> Iterator[None]:
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


def gather_gradients(repeats: int) -> list[torch.Tensor]:
    """The gradient of a row gather with repeated indices (many impressions of one text)."""
    vectors = torch.randn(2000, 384, requires_grad=True)
    index = torch.randint(0, 2000, (20000,))
    upstream = torch.randn(20000, 384)
    grads = []
    for _ in range(repeats):
        vectors.grad = None
        vectors[index].backward(upstream)
        grads.append(vectors.grad.clone())
    return grads


def test_a_seeded_run_accumulates_repeated_indices_in_one_order(restore_flags: None) -> None:
    seed_run(0)
    assert torch.are_deterministic_algorithms_enabled()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"]  # set unless the user set it
    first, *others = gather_gradients(5)
    for other in others:
        assert torch.equal(first, other)


def test_the_same_seed_draws_the_same_weights(restore_flags: None) -> None:
    seed_run(3)
    a = torch.nn.Linear(8, 4).weight.detach().clone()
    seed_run(3)
    assert torch.equal(a, torch.nn.Linear(8, 4).weight)
