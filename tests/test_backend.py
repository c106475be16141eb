"""Backend selection: default order, FASTFED_BACKEND, set_backend, use_backend."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import fastfed
from fastfed.compression import RotatedQuantizer, UniformQuantizer, encode


def _run(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env}, check=False
    )


def test_set_backend_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="Unsupported backend 'cuda'"):
        fastfed.set_backend("cuda")


def test_use_backend_is_scoped_and_thread_local(backend: str) -> None:
    seen: list[str] = []
    with fastfed.use_backend("numpy"):
        assert fastfed.backend() == "numpy"
        worker = threading.Thread(target=lambda: seen.append(fastfed.backend()))
        worker.start()
        worker.join()
    assert fastfed.backend() == backend
    assert seen == [backend]


def test_every_backend_gives_identical_means() -> None:
    rng = np.random.default_rng(0)
    updates = [[rng.standard_normal(50_000).astype(np.float32), rng.integers(0, 9, 10)] for _ in range(7)]
    results = {}
    for name in fastfed.available_backends():
        with fastfed.use_backend(name):
            results[name] = fastfed.weighted_mean(updates, np.arange(1, 8))
    first = next(iter(results.values()))
    for result in results.values():
        for layer, expected in zip(result, first):
            np.testing.assert_array_equal(layer, expected)


def _random_update(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = [(5, 5, 1, 32), (32,), (300, 100), (10,)]
    return [(rng.standard_normal(shape) * 0.05).astype(np.float32) for shape in shapes]


def test_backends_produce_identical_bytes() -> None:
    update = _random_update(3)
    codecs = [
        UniformQuantizer(bits=8),
        UniformQuantizer(bits=3, stochastic=False, rotate=True, min_size=500),
        RotatedQuantizer(2, min_size=500),
        RotatedQuantizer(1, shared_rotation=True, min_size=500),
        RotatedQuantizer(6, shared_rotation=True, min_size=500),
    ]
    for codec in codecs:
        payloads = {}
        for name in fastfed.available_backends():
            with fastfed.use_backend(name):
                payloads[name] = encode(update, codec, seed=9, rotation_seed=4)
        assert len(set(payloads.values())) == 1, sorted(payloads)


def test_batched_mean_is_identical_on_every_backend() -> None:
    updates = [_random_update(seed) for seed in range(10)]
    payloads = [encode(u, UniformQuantizer(bits=5, min_size=1000), seed=s) for s, u in enumerate(updates)]
    payloads[3] = encode(updates[3], UniformQuantizer(bits=5, rotate=True, min_size=1000), seed=3)  # a mixed layer
    results = []
    for name in fastfed.available_backends():
        with fastfed.use_backend(name):
            results.append(fastfed.weighted_mean_encoded(payloads, np.arange(1, 11)))
    for result in results[1:]:
        for a, b in zip(result, results[0]):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", fastfed.available_backends())
def test_environment_variable_forces_a_backend(name: str) -> None:
    completed = _run("import fastfed; print(fastfed.backend())", FASTFED_BACKEND=name)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == name


def test_forcing_a_missing_backend_says_how_to_install_it() -> None:
    # Block numba's import to simulate an environment without it.
    code = "import sys; sys.modules['numba'] = None\nimport fastfed\nfastfed.weighted_mean([[[1.0]]])"
    completed = _run(code, FASTFED_BACKEND="numba")
    assert completed.returncode != 0
    assert "pip install fastfed[numba]" in completed.stderr


def test_default_falls_back_to_numpy_without_native_or_numba() -> None:
    code = (
        "import sys; sys.modules['numba'] = None; sys.modules['fastfed._core'] = None\n"
        "import fastfed; print(fastfed.backend(), fastfed.available_backends())"
    )
    completed = _run(code)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "numpy ['numpy']"
