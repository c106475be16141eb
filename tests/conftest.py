"""The ``backend`` fixture: a test that takes it runs once per available kernel backend (native,
Numba, NumPy). Kernel, aggregation and compression tests take it; what sits above the kernels runs once."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

import fastfed

AVAILABLE = fastfed.available_backends()

# CI sets FASTFED_REQUIRE_BACKENDS so that a backend that silently fails to import fails the run
# instead of quietly shrinking the test matrix.
_required = [name for name in os.environ.get("FASTFED_REQUIRE_BACKENDS", "").split(",") if name]
_missing = sorted(set(_required) - set(AVAILABLE))
if _missing:
    raise RuntimeError(f"required fastfed backends are not available: {_missing}; available: {AVAILABLE}")


@pytest.fixture(params=AVAILABLE)
def backend(request: pytest.FixtureRequest) -> Iterator[str]:
    """The backend this run of the test uses; restored afterwards."""
    previous = fastfed.backend()
    fastfed.set_backend(request.param)
    yield request.param
    fastfed.set_backend(previous)
