"""Shared fixtures: the `device` parametrisation and the hypothesis profile.

``device`` runs every test that takes it on "cpu", and on "cuda" whenever
``torch.cuda.is_available()`` (CUDA cases are skipped only when CUDA is unavailable).
"""
import pytest
import torch
from hypothesis import HealthCheck, settings

import tokenkernels  # noqa: F401  (registers torch.ops.tokenkernels)

HAS_CUDA = torch.cuda.is_available()

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="CUDA is not available")),
]

# Deterministic hypothesis runs (a fixed seed per test), no deadline (the oracle is a Python loop).
settings.register_profile(
    "tokenkernels",
    deadline=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                           HealthCheck.data_too_large],
)
settings.load_profile("tokenkernels")


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture(autouse=True)
def _fixed_seed():
    """Every test starts from the same global RNG state (tests also seed their own generators)."""
    torch.manual_seed(0)
    yield
