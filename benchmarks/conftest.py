"""Benchmark helpers: a ratio table at the end of the run, and peak-memory measurement.

Each benchmark sets ``benchmark.extra_info["label"]``; benchmarks in one group are compared with the
group's baselines (labels listed in ``BASELINES``) and the table is printed after pytest-benchmark's.
"""

from __future__ import annotations

import tracemalloc
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import pytest

BASELINES = (
    "memory floor",
    "flower aggregate",
    "flower aggregate (inplace, default)",
    "flower aggregate (FedAvg)",
    "flower aggregate (FedMedian)",
    "flower aggregate (FedTrimmedAvg)",
    "numpy reference",
    "plain Keras per-step loop",
    "compiled-epoch floor",
    "float32 aggregation",
    "fused 8-bit native",
    "TF-MOT tensor_encoding",
)


def peak_memory_bytes(function: Callable[[], Any]) -> int:
    """Peak bytes allocated through Python and NumPy while ``function`` runs (NumPy reports to tracemalloc)."""
    tracemalloc.start()
    try:
        function()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def timing(config: pytest.Config) -> bool:
    """Whether pytest-benchmark times this run; when it does not (CI, ``--benchmark-disable``, xdist),
    benchmarks with costly workloads run a smaller one, still asserting their results."""
    session = getattr(config, "_benchmarksession", None)
    return session is not None and not session.disabled


@pytest.fixture(scope="session", autouse=True)
def tensorflow_started_with_its_defaults(request: pytest.FixtureRequest) -> None:
    """When timing, TensorFlow starts here with its default thread pools, whatever benchmark runs
    first, so that baselines such as a plain Keras loop run as a user would run them (fastfed's
    local executor would otherwise set them for its client threads: see benchmarks/fastfed_rounds.py)."""
    if timing(request.config):
        try:
            import tensorflow as tf
        except ImportError:
            return
        tf.constant(0.0)


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    session = getattr(config, "_benchmarksession", None)
    if not timing(config):
        return
    groups: dict[str, dict[str, Any]] = defaultdict(dict)
    for bench in session.benchmarks:
        if bench.stats is None:
            continue
        label = bench.extra_info.get("label", bench.name)
        groups[bench.group or ""][label] = bench
    for group, benches in sorted(groups.items()):
        baselines = [label for label in BASELINES if label in benches]
        header = (
            f"{'':34s}{'median ms':>11s}"
            + "".join(f"{'x ' + b:>22s}" for b in baselines)
            + f"{'peak MiB':>10s}{'first/steady':>14s}"
        )
        terminalreporter.write_line("")
        terminalreporter.write_line(f"fastfed ratios: {group}")
        terminalreporter.write_line(header)
        for label, bench in sorted(benches.items(), key=lambda item: item[1].stats.median):
            median = bench.stats.median
            ratios = "".join(f"{median / benches[b].stats.median:>22.2f}" for b in baselines)
            peak = bench.extra_info.get("peak_mib")
            peak_text = f"{peak:>10.1f}" if peak is not None else f"{'':>10s}"
            first = bench.extra_info.get("first_round_ratio")
            first_text = f"{first:>14.2f}" if first is not None else ""
            moved = bench.extra_info.get("bytes_per_element")
            moved_text = f"  {moved:.1f} bytes moved per element (cache simulator)" if moved is not None else ""
            others = [(key, value) for key, value in bench.extra_info.items() if key.startswith("vs ")]
            alone = bench.extra_info.get("own process: median ms")
            if alone is not None:  # the same rounds in a process of their own, against the same baselines
                for b in baselines:
                    others.append((f"own process {alone:.1f} ms, x {b}", alone / 1e3 / benches[b].stats.median))
                others.append(("own process first/steady", bench.extra_info["own process: first/steady"]))
            external = "".join(f"  {key}: {value:.2f}" for key, value in others)
            processed = bench.extra_info.get("input_bytes")
            rate_text = f"  {processed / median / 1e9:.2f} GB/s of input" if processed is not None else ""
            line = f"{label:34s}{median * 1e3:>11.2f}{ratios}{peak_text}{first_text}{moved_text}{external}{rate_text}"
            terminalreporter.write_line(line)
