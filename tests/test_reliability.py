"""Reliability: faulty clients, robust aggregation, crash-safe checkpoints and exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")

import fastfed
from fastfed import AdaptiveBound, CheckpointError, data, models, optimizers
from fastfed.aggregation import Accumulator
from fastfed.compression import UniformQuantizer
from fastfed.learning.aggregators import RoundTally


def _clients(count: int = 4) -> list[tuple[np.ndarray, np.ndarray]]:
    (x, y), _ = data.load_digits(seed=0)
    return data.partition_iid(x, y, count, seed=0).all()


def _process(**options: object) -> fastfed.FedAvg:
    settings: dict[str, object] = {
        "client_optimizer": lambda: keras.optimizers.SGD(learning_rate=0.1),
        "batch_size": 20,
        "seed": 1,
    }
    settings.update(options)
    return fastfed.FedAvg(lambda: models.mlp((64,), hidden=16), **settings)  # type: ignore[arg-type]


def _distance(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return float(np.sqrt(sum(np.sum((x.astype(np.float64) - y) ** 2) for x, y in zip(a, b))))


def test_failing_client_is_dropped_and_counted() -> None:
    clients = _clients()
    broken = (np.ones((5, 3), np.float32), np.zeros(5, np.int64))  # wrong feature count: training raises
    process = _process()
    state = process.initialize()
    new_state, metrics = process.next(state, [clients[0], clients[1], broken])
    assert metrics["clients_failed"] == 1 and metrics["num_clients"] == 3
    assert process.last_failures == [(2, "inputs have shape (3,) float32 per example; the model takes (64,)")]
    assert metrics["num_examples"] == len(clients[0][1]) + len(clients[1][1])
    # The same two good clients alone give the same model (seeds follow the client's position).
    reference, _ = _process().next(state, [clients[0], clients[1]])
    for a, b in zip(new_state.weights, reference.weights):
        np.testing.assert_array_equal(a, b)


def test_too_few_clients_raise_and_leave_the_state_usable() -> None:
    clients = _clients()
    broken = (np.ones((5, 3), np.float32), np.zeros(5, np.int64))
    poisoned = (np.full_like(clients[2][0], np.nan), clients[2][1])
    process = _process(min_clients=2)
    state = process.initialize()
    before = [w.copy() for w in state.weights]
    with pytest.raises(fastfed.RoundFailedError, match=r"1 of 3 client updates aggregated, fewer than min_clients=2"):
        process.next(state, [clients[0], broken, poisoned])
    assert state.round == 0 and all(np.array_equal(a, b) for a, b in zip(state.weights, before))
    state, metrics = process.next(state, clients[:2])  # still usable
    assert state.round == 1 and metrics["clients_failed"] == 0


def _attack_round(aggregator: fastfed.learning.MeanAggregator) -> tuple[list[np.ndarray], list[np.ndarray], dict]:
    """One round where client 0 sends a 1e6-scaled update (its inputs are scaled by 1e6)."""
    clients = _clients(5)
    attacker = (clients[0][0] * 1e6, clients[0][1])
    process = _process(aggregator=aggregator, server_optimizer=optimizers.SGD(learning_rate=1.0))
    state = process.initialize()
    new_state, metrics = process.next(state, [attacker, *clients[1:]])
    return state.weights, new_state.weights, metrics


def test_clipping_bounds_how_far_one_attacker_moves_the_model() -> None:
    start, unprotected, _ = _attack_round(fastfed.mean_aggregator())
    assert _distance(start, unprotected) > 100.0
    for compression in (None, UniformQuantizer(bits=8, min_size=100)):
        start, clipped, metrics = _attack_round(fastfed.mean_aggregator(clipping=0.5, codec=compression))
        # Every clipped update has norm <= 0.5, so their weighted mean moves the model by at most 0.5
        # (plus the 8-bit quantization error when compressed).
        assert _distance(start, clipped) <= 0.5 * (1.01 if compression else 1 + 1e-6)
        assert metrics["updates_clipped"] >= 1 and metrics["clipping_bound"] == 0.5


def test_zeroing_drops_the_attacker_but_keeps_its_weight() -> None:
    start, zeroed, metrics = _attack_round(fastfed.mean_aggregator(zeroing=50.0))
    assert metrics["updates_zeroed"] == 1
    assert _distance(start, zeroed) < 50.0


def test_contribute_semantics_on_synthetic_updates() -> None:
    aggregator = fastfed.mean_aggregator(clipping=1.0, zeroing=100.0)
    accumulator, tally = Accumulator(), RoundTally()
    honest = [np.full(4, 0.1, np.float32)]
    for delta in (
        honest,
        [np.full(4, 1e6, np.float32)],
        [np.full(4, 3.0, np.float32)],
        [np.full(4, np.inf, np.float32)],
    ):
        aggregator.contribute(accumulator, delta, 1.0, aggregator.bounds({}), 0, tally)
    assert (tally.aggregated, tally.zeroed, tally.clipped, tally.non_finite) == (3, 1, 1, 1)
    # (honest + zeros + the 6-norm update clipped to norm 1) / 3
    np.testing.assert_allclose(accumulator.result()[0], (0.1 + 0.0 + 0.5) / 3, rtol=1e-6)
    assert tally.norms == pytest.approx([0.2, 2e6, 6.0])


def test_clipping_scales_huge_updates_instead_of_zeroing_them() -> None:
    aggregator = fastfed.mean_aggregator(clipping=1.0)
    accumulator, tally = Accumulator(), RoundTally()
    # Squares of 1e20 overflow float32, of 3e38 (and of 1e200 below) float64: the norm must not.
    for value in (1e20, 3e38):
        aggregator.contribute(accumulator, [np.full(4, value, np.float32)], 1.0, aggregator.bounds({}), 0, tally)
    assert (tally.clipped, tally.zeroed) == (2, 0)
    np.testing.assert_allclose(accumulator.result()[0], 0.5, rtol=1e-6)  # each scaled to norm 1: 0.5 each
    assert tally.norms[:2] == pytest.approx([2e20, 6e38])
    from fastfed.learning.aggregators import l2_norm

    assert l2_norm([np.full(4, 1e200), np.array([-3e200])]) == pytest.approx(np.sqrt(13) * 1e200)


def test_adaptive_bound_tracks_the_target_quantile() -> None:
    bound = AdaptiveBound(initial=1.0, target_quantile=0.5, learning_rate=0.2)
    estimate = 1.0
    norms = list(np.linspace(5.0, 15.0, 11))  # median 10
    for _ in range(200):
        estimate = bound.updated(estimate, norms)
    assert 9.0 <= estimate <= 11.0
    aggregator = fastfed.mean_aggregator(clipping=bound)
    state = aggregator.initial_state()
    assert aggregator.bounds(state) == (1.0, None)
    assert aggregator.next_state(state, [5.0])["clipping_estimate"] > 1.0
    with pytest.raises(ValueError, match="target_quantile"):
        AdaptiveBound(target_quantile=1.5)
    with pytest.raises(ValueError, match="clipping must be a positive number"):
        fastfed.mean_aggregator(clipping=-1.0)


def test_checkpoint_round_trip_keeps_everything(tmp_path: Path) -> None:
    process = _process(
        server_optimizer=optimizers.Adam(0.01), aggregator=fastfed.mean_aggregator(clipping=AdaptiveBound())
    )
    state = process.initialize()
    history = []
    for _ in range(3):
        state, metrics = process.next(state, _clients())
        history.append(metrics)
        fastfed.save_checkpoint(tmp_path, state, seed=1, metrics_history=history, config={"note": "x"}, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["round-000002", "round-000003"]
    restored = fastfed.load_checkpoint(tmp_path)
    assert restored.round == 3 and restored.seed == 1 and restored.config == {"note": "x"}
    assert restored.metrics_history == history
    for a, b in zip(restored.weights, state.weights):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    for key in ("m", "v"):
        for a, b in zip(restored.state.optimizer_state[key], state.optimizer_state[key]):
            np.testing.assert_array_equal(a, b)
    assert restored.state.aggregator_state == state.aggregator_state
    # Continuing from the checkpoint equals continuing from the live state.
    from_checkpoint, _ = process.next(restored.state, _clients())
    live, _ = process.next(state, _clients())
    for a, b in zip(from_checkpoint.weights, live.weights):
        np.testing.assert_array_equal(a, b)


def test_corrupted_checkpoints_are_detected_and_skipped(tmp_path: Path) -> None:
    state = _process().initialize()
    for round_number in (1, 2, 3):
        state.round = round_number
        fastfed.save_checkpoint(tmp_path, state, keep=5)
    root = tmp_path / "checkpoints"
    arrays = root / "round-000003" / "arrays.npz"
    arrays.write_bytes(arrays.read_bytes()[:-100])  # truncated
    document = json.loads((root / "round-000002" / "state.json").read_text())
    document["content"]["round"] = 99  # tampered without updating the checksum
    (root / "round-000002" / "state.json").write_text(json.dumps(document))
    with pytest.warns(RuntimeWarning, match="skipped corrupted checkpoint.*round-000003.*using round-000001"):
        restored = fastfed.load_checkpoint(tmp_path)
    assert restored.round == 1 and [p.name for p, _ in restored.skipped] == ["round-000003", "round-000002"]
    assert "arrays.npz checksum mismatch" in restored.skipped[0][1]
    assert "state.json checksum mismatch" in restored.skipped[1][1]
    (root / "round-000001" / "state.json").write_text("{")
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        fastfed.load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="none was written"):
        fastfed.load_checkpoint(tmp_path / "empty")
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no staging leftovers


def test_fedavg_runs_are_bitwise_identical_across_backends() -> None:
    clients = _clients()
    results = {}
    for name in fastfed.available_backends():
        with fastfed.use_backend(name):
            process = _process(aggregator=fastfed.mean_aggregator(codec=UniformQuantizer(bits=4, min_size=100)))
            state = process.initialize()
            for _ in range(2):
                state, metrics = process.next(state, clients)
            results[name] = (state.weights, metrics["train_loss"], metrics["aggregate_bits"])
    first = next(iter(results.values()))
    for weights, loss, bits in results.values():
        assert (loss, bits) == first[1:]
        for a, b in zip(weights, first[0]):
            np.testing.assert_array_equal(a, b)
