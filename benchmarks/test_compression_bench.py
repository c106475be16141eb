"""Encode/decode throughput per backend, and fused decode-and-accumulate vs float32 aggregation.

Run: ``pytest benchmarks/test_compression_bench.py --benchmark-enable``. The encode floor is one
read of the float32 input plus one write of the packed output.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import fastfed
from fastfed.compression import UniformQuantizer, decode, encode

from .workloads import CNN_SHAPES, example_counts, random_updates

# Module-scoped fixtures build large workloads (or a Ray cluster) once: one xdist worker runs them all.
pytestmark = pytest.mark.xdist_group("compression-bench")


KERNEL = "dense 3136x512"
TARGETS = {KERNEL: lambda: random_updates(1, [(3136, 512)])[0], "cnn update": lambda: random_updates(1, CNN_SHAPES)[0]}
CODECS = [(8, False), (8, True), (2, False), (2, True)]


@pytest.fixture(scope="module", params=list(TARGETS))
def target(request: pytest.FixtureRequest) -> tuple[str, list[np.ndarray]]:
    return request.param, TARGETS[request.param]()


def _label(name: str, bits: int, stochastic: bool) -> str:
    return f"{name} {bits}-bit {'stochastic' if stochastic else 'nearest'}"


@pytest.mark.parametrize(("bits", "stochastic"), CODECS)
@pytest.mark.parametrize("name", fastfed.available_backends())
def test_encode(benchmark: Any, target: tuple[str, list[np.ndarray]], name: str, bits: int, stochastic: bool) -> None:
    label, update = target
    codec = UniformQuantizer(bits=bits, stochastic=stochastic)
    benchmark.group = f"encode {label} {bits}-bit {'stochastic' if stochastic else 'nearest'}"
    benchmark.extra_info["label"] = _label(name if name != "numpy" else "numpy reference", bits, stochastic).replace(
        f" {bits}-bit {'stochastic' if stochastic else 'nearest'}", ""
    )

    def run() -> bytes:
        with fastfed.use_backend(name):
            return encode(update, codec, seed=0)

    payload = benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    step = max(float(u.max() - u.min()) for u in update) / (2**bits - 1)
    for original, restored in zip(update, decode(payload)):
        assert np.max(np.abs(restored - original)) <= step * (1.0 if stochastic else 0.5) + 1e-6


@pytest.mark.parametrize(("bits", "stochastic"), [(8, False), (8, True)])
def test_encode_memory_floor(benchmark: Any, target: tuple[str, list[np.ndarray]], bits: int, stochastic: bool) -> None:
    label, update = target
    benchmark.group = f"encode {label} {bits}-bit {'stochastic' if stochastic else 'nearest'}"
    benchmark.extra_info["label"] = "memory floor"
    sources = [u.reshape(-1).view(np.uint64) if u.size % 2 == 0 else u.reshape(-1).view(np.uint32) for u in update]
    outputs = [np.empty((u.size * bits + 7) // 8, np.uint8) for u in update]

    def floor() -> int:
        # One read of every input byte (a vectorized integer max) and one write of the packed size.
        checksum = 0
        for source, out in zip(sources, outputs):
            checksum ^= int(source.max())
            out.fill(0x5A)
        return checksum

    assert benchmark.pedantic(floor, rounds=20, iterations=1, warmup_rounds=2) == floor()
    assert all(int(out[-1]) == 0x5A for out in outputs)


@pytest.mark.parametrize(("bits", "stochastic"), CODECS)
@pytest.mark.parametrize("name", fastfed.available_backends())
def test_decode(benchmark: Any, target: tuple[str, list[np.ndarray]], name: str, bits: int, stochastic: bool) -> None:
    label, update = target
    payload = encode(update, UniformQuantizer(bits=bits, stochastic=stochastic), seed=0)
    benchmark.group = f"decode {label} {bits}-bit {'stochastic' if stochastic else 'nearest'}"
    benchmark.extra_info["label"] = name if name != "numpy" else "numpy reference"

    def run() -> list[np.ndarray]:
        with fastfed.use_backend(name):
            return decode(payload)

    decoded = benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    assert [d.shape for d in decoded] == [u.shape for u in update]


@pytest.fixture(scope="module")
def cnn_round() -> tuple[list[list[np.ndarray]], list[bytes], np.ndarray]:
    updates = random_updates(100, CNN_SHAPES)
    payloads = [encode(u, UniformQuantizer(bits=8), seed=k) for k, u in enumerate(updates)]
    return updates, payloads, example_counts(100)


def test_float32_aggregation(benchmark: Any, cnn_round: Any) -> None:
    updates, _, weights = cnn_round
    benchmark.group = "aggregate K=100 cnn: compressed vs float32"
    benchmark.extra_info["label"] = "float32 aggregation"
    result = benchmark.pedantic(
        lambda: fastfed.weighted_mean(updates, weights), rounds=5, iterations=1, warmup_rounds=1
    )
    assert result[4].shape == (3136, 512)


@pytest.mark.parametrize("name", fastfed.available_backends())
def test_fused_decode_accumulate(benchmark: Any, cnn_round: Any, name: str) -> None:
    updates, payloads, weights = cnn_round
    benchmark.group = "aggregate K=100 cnn: compressed vs float32"
    benchmark.extra_info["label"] = f"fused 8-bit {name}"

    def run() -> list[np.ndarray]:
        with fastfed.use_backend(name):
            return fastfed.weighted_mean_encoded(payloads, weights)

    result = benchmark.pedantic(run, rounds=5 if name != "numpy" else 2, iterations=1, warmup_rounds=1)
    exact = fastfed.weighted_mean(updates, weights)
    step = max(float(u[4].max() - u[4].min()) for u in updates) / 255
    assert np.max(np.abs(result[4] - exact[4])) <= step
