"""Bytes of memory traffic per output element of the native aggregation kernel, counted by a cache
simulator, so that the figure is the same on a 2-core laptop and a 16-core server.

Run: ``pytest benchmarks/test_memory_traffic_bench.py --benchmark-enable -s``. The kernel behind
``fastfed.weighted_mean`` is compiled into benchmarks/traffic_driver.cpp and run under valgrind's
cachegrind with an 8 MiB last-level cache, once with and once without the aggregation; the
difference in last-level misses, times 64 bytes, is what the kernel moves between cache and memory.
Reading every client once is K x 4 bytes per element for float32; writing the result allocates its
line, 4 bytes more. An accumulator that went back to memory between sweeps of eight clients would
add 16 bytes per element per sweep.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import fastfed

# The module-scoped measurement runs once: one xdist worker runs the module.
pytestmark = pytest.mark.xdist_group("memory-traffic-bench")

CLIENTS, N = 20, 1_000_000
REPOSITORY = Path(__file__).resolve().parents[1]
VALGRIND = shutil.which("valgrind")
COMPILER = shutil.which("c++") or shutil.which("g++")


def _last_level_misses(driver: Path, mode: str) -> int:
    completed = subprocess.run(
        [VALGRIND or "valgrind", "--tool=cachegrind", "--cache-sim=yes", "--D1=49152,12,64", "--LL=8388608,16,64",
         "--cachegrind-out-file=/dev/null", str(driver), str(CLIENTS), str(N), mode],
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    found = re.search(r"LLd misses:\s+([\d,]+)", completed.stderr)
    assert found, completed.stderr[-2000:]
    return int(found.group(1).replace(",", ""))


@pytest.fixture(scope="module")
def bytes_per_element(tmp_path_factory: pytest.TempPathFactory) -> float:
    if VALGRIND is None or COMPILER is None or not (REPOSITORY / "cpp").is_dir():
        pytest.skip("needs valgrind, a C++ compiler and the cpp/ sources")
    driver = tmp_path_factory.mktemp("traffic") / "traffic_driver"
    sources = ["benchmarks/traffic_driver.cpp", "cpp/common/parallel.cpp", "cpp/common/cpu.cpp"]
    subprocess.run(
        [COMPILER, "-O3", "-std=c++17", "-ffp-contract=off", "-pthread", "-Icpp", *sources, "-o", str(driver)],
        cwd=REPOSITORY, check=True, timeout=300,
    )  # fmt: skip
    moved = 64 * (_last_level_misses(driver, "mean") - _last_level_misses(driver, "base"))
    print(f"\nnative kernel, K={CLIENTS} float32 clients: {moved / N:.1f} bytes per output element")
    return moved / N


def test_native_kernel_reads_every_client_byte_once(bytes_per_element: float) -> None:
    # One read of every client byte, the result's line, and no accumulator traffic.
    assert CLIENTS * 4 <= bytes_per_element <= CLIENTS * 4 + 16


@pytest.mark.parametrize("name", ["native", "numba"])
def test_weighted_mean_time(benchmark: Any, bytes_per_element: float, name: str) -> None:
    """The same workload timed, with the simulated traffic beside the native row of the table."""
    if name not in fastfed.available_backends():
        pytest.skip(f"the {name} backend is not available")
    updates = [[np.random.default_rng(k).standard_normal(N, dtype=np.float32)] for k in range(CLIENTS)]
    out = [np.empty(N, np.float32)]

    def aggregate() -> list[np.ndarray]:
        with fastfed.use_backend(name):
            return fastfed.weighted_mean(updates, np.arange(1, CLIENTS + 1), out=out, non_finite="propagate")

    benchmark.group = f"memory traffic: K={CLIENTS} x {N:,} float32"
    benchmark.extra_info["label"] = f"fastfed {name}"
    if name == "native":
        benchmark.extra_info["bytes_per_element"] = bytes_per_element
    (mean,) = benchmark.pedantic(aggregate, rounds=5, iterations=1, warmup_rounds=1)
    reference = np.arange(1, CLIENTS + 1) @ np.stack([u[0][:1000] for u in updates]).astype(np.float64)
    np.testing.assert_allclose(mean[:1000], reference / np.arange(1, CLIENTS + 1).sum(), rtol=1e-6)
