"""Shared fixtures: float64 on request, small random problems."""

import jax
import pytest


@pytest.fixture
def x64():
    """Runs the test with float64 enabled (restored afterwards)."""
    with jax.enable_x64(True):
        yield
