"""Thread scaling of fastfed.weighted_mean against the machine's read floor.

Usage: ``python scripts/thread_scaling.py [--threads 1,2,4,8,16] [--repeats 7] [--json OUT]``.

For each workload (K=100 FedAvg-CNN updates, its largest layer alone, and K=20 updates of 25M
parameters) and thread count, it times native and Numba ``weighted_mean``, returning fresh arrays
and writing straight into reused ones (``out=`` with ``non_finite="propagate"``). It reports GB/s of
client data read, as a fraction of the machine's read floor at that thread count: 2 GB reduced by
NumPy from as many Python threads in 8 MB pieces (NumPy's reductions release the GIL;
``np.maximum.reduce`` is the fastest of them). No kernel can read its input faster.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

CNN_SHAPES = [(5, 5, 1, 32), (32,), (5, 5, 32, 64), (64,), (3136, 512), (512,), (512, 10), (10,)]
WORKLOADS = {
    "cnn K=100": (100, CNN_SHAPES),
    "cnn dense K=100": (100, [(3136, 512)]),  # the CNN's largest layer alone: the kernel without per-layer costs
    "K=20 x 25M": (20, [(25_000_000,)]),
}


def _updates(k: int, shapes: list[tuple[int, ...]]) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(0)
    return [[rng.standard_normal(shape, dtype=np.float32) for shape in shapes] for _ in range(k)]


def _best(function: Any, repeats: int) -> float:
    function()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return min(times)


def _read_floor(buffer: np.ndarray, threads: int, repeats: int) -> float:
    """GB/s at which ``threads`` Python threads read ``buffer`` once, in 8 MB pieces."""
    pieces = np.array_split(buffer, max(1, buffer.size // 2**21))
    with ThreadPoolExecutor(threads) as pool:
        return buffer.nbytes / _best(lambda: list(pool.map(np.maximum.reduce, pieces)), repeats) / 1e9


def _measure(
    name: str, updates: list[list[np.ndarray]], floors: dict[int, float], repeats: int
) -> list[dict[str, Any]]:
    import numba

    import fastfed
    from fastfed import _core

    weights = np.random.default_rng(1).integers(100, 1000, len(updates))
    nbytes = sum(layer.nbytes for update in updates for layer in update)
    out = [np.empty_like(layer) for layer in updates[0]]
    rows = []
    for threads, floor_gbps in floors.items():
        _core.set_num_threads(threads)
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        floor = nbytes / floor_gbps / 1e9  # seconds to read this workload's bytes at the floor
        row: dict[str, Any] = {"workload": name, "threads": threads, "floor_gbps": floor_gbps}
        line = f"{name:12s} {threads:3d} threads  floor {row['floor_gbps']:6.1f} GB/s"
        for backend in ("native", "numba"):
            with fastfed.use_backend(backend):
                # A fresh result, as weighted_mean returns by default, then into reused arrays.
                fresh = _best(lambda: fastfed.weighted_mean(updates, weights), repeats)
                # out= with non_finite="propagate" writes straight into the reused arrays.
                reused = _best(
                    lambda: fastfed.weighted_mean(updates, weights, out=out, non_finite="propagate"), repeats
                )
            for label, seconds in (("", fresh), ("_out", reused)):
                row[f"{backend}{label}_gbps"] = nbytes / seconds / 1e9
                row[f"{backend}{label}_vs_floor"] = floor / seconds
            line += (
                f"  {backend} {row[f'{backend}_gbps']:6.1f} ({row[f'{backend}_vs_floor']:.2f})"
                f" out= {row[f'{backend}_out_gbps']:6.1f} ({row[f'{backend}_out_vs_floor']:.2f})"
            )
        rows.append(row)
        print(line, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default=f"1,2,4,8,{os.cpu_count()}")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    thread_counts = [int(t) for t in args.threads.split(",")]
    buffer = np.random.default_rng(2).standard_normal(2**29, dtype=np.float32)  # 2 GiB
    floors = {threads: _read_floor(buffer, threads, args.repeats) for threads in thread_counts}
    rows = []
    for name, (k, shapes) in WORKLOADS.items():
        rows += _measure(name, _updates(k, shapes), floors, args.repeats)
    # The floor again at the end: a machine that slowed down meanwhile must not flatter the kernels.
    after = {threads: _read_floor(buffer, threads, args.repeats) for threads in thread_counts}
    print("read floor GB/s before / after:", {t: (round(floors[t], 1), round(after[t], 1)) for t in thread_counts})
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"cpus": os.cpu_count(), "rows": rows}, handle, indent=1)
    assert all(math.isfinite(row["native_gbps"]) for row in rows)


if __name__ == "__main__":
    main()
