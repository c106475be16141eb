"""FedAvg rounds of one scenario in a process of their own, as a user's script runs them.

``python -m benchmarks.fastfed_rounds CLIENTS.npz --scenario NAME --rounds 6``, from the repository
root, on clients saved by benchmarks/test_fedavg_bench.py. fastfed is the first to start TensorFlow
here, so the local executor gives each client thread its share of the cores (see
``fastfed.executors.LocalExecutor``), which it cannot do inside the benchmark's own process, where
the baselines run with TensorFlow's defaults. Prints one JSON line per round (training accuracy,
seconds) and a summary, in the format of benchmarks/tff_rounds.py.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from .workloads import FEDAVG_SCENARIOS, fedavg_process


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("clients")
    parser.add_argument("--scenario", choices=list(FEDAVG_SCENARIOS), required=True)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    with np.load(args.clients) as saved:
        clients = [(saved[f"x{k}"], saved[f"y{k}"]) for k in range(len(saved.files) // 2)]
    process = fedavg_process(*FEDAVG_SCENARIOS[args.scenario])
    state = process.initialize()
    seconds = []
    for round_number in range(1, args.rounds + 1):
        started = time.perf_counter()
        state, metrics = process.next(state, clients)
        seconds.append(time.perf_counter() - started)
        print(json.dumps({"round": round_number, "accuracy": metrics["train_accuracy"], "seconds": seconds[-1]}))
    print(json.dumps({"median_round_seconds": float(np.median(seconds[1:])), "first_round_seconds": seconds[0]}))


if __name__ == "__main__":
    main()
