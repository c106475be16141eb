"""fastfed inside Flower: real simulations of both Flower APIs on Flower's own engine.

Each simulation runs in a subprocess (tests/flower_simulations.py) with a timeout. Flower's own
strategies are simulated once; fastfed's once per backend, through ``FASTFED_BACKEND``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr")
pytest.importorskip("ray")

from fastfed.data import load_digits

SCRIPT = Path(__file__).with_name("flower_simulations.py")
ROUNDS, LAYERS = 3, 3
_cache: dict[tuple[str, str], list[list[np.ndarray]]] = {}


def simulate(scenario: str, backend: str, tmp_path_factory: pytest.TempPathFactory) -> list[list[np.ndarray]]:
    """The global model after each round of a scenario (cached; Flower-only scenarios are backend-free)."""
    key = (scenario, backend if "-fast-" in scenario else "")
    if key not in _cache:
        output = tmp_path_factory.mktemp("flower") / f"{scenario}.npz"
        environment = {**os.environ, "FASTFED_BACKEND": backend, "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}
        completed = subprocess.run(
            [sys.executable, str(SCRIPT), scenario, str(output)],
            capture_output=True, text=True, timeout=300, env=environment, check=False,
        )  # fmt: skip
        assert completed.returncode == 0, completed.stderr[-3000:]
        with np.load(output) as saved:
            _cache[key] = [[saved[f"round{r}_{j}"] for j in range(LAYERS)] for r in range(ROUNDS)]
    return _cache[key]


def accuracy(model: list[np.ndarray]) -> float:
    _, (x, y) = load_digits(seed=0)
    return float(np.mean(np.argmax(x @ model[0] + model[1], axis=1) == y))


def assert_models_agree(
    actual: list[list[np.ndarray]], expected: list[list[np.ndarray]], rtol: float, atol: float
) -> None:
    for round_actual, round_expected in zip(actual, expected):
        for a, b in zip(round_actual[:2], round_expected[:2]):
            np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("api", ["legacy", "message"])
@pytest.mark.parametrize("strategy", ["fedavg", "fedadam"])
def test_fastfed_strategies_match_flower_each_round(
    api: str, strategy: str, backend: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    expected = simulate(f"{api}-flower-{strategy}", backend, tmp_path_factory)
    actual = simulate(f"{api}-fast-{strategy}", backend, tmp_path_factory)
    # Flower averages in float32, fastfed in float64: they differ by ~1e-7 relative. Adam divides the
    # mean delta by sqrt(v), which amplifies that difference for parameters whose delta is tiny.
    tolerance = {"fedavg": (1e-5, 1e-6), "fedadam": (1e-4, 1e-5)}[strategy]
    assert_models_agree(actual, expected, *tolerance)
    assert accuracy(actual[-1]) > 0.75


@pytest.mark.parametrize("api", ["legacy", "message"])
def test_integer_tensors_are_averaged_and_keep_their_dtype(
    api: str, backend: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    fast = simulate(f"{api}-fast-fedavg", backend, tmp_path_factory)
    # Round 1: counters 10, 11, 12, 13 over near-equal shards average to 11.5 -> rounds to 11 or 12.
    counters = [model[2] for model in fast]
    assert all(counter.dtype == np.int64 for counter in counters)
    assert 11 <= counters[0] <= 12 and list(counters) == sorted(counters)


def test_flower_inplace_zeroes_the_integer_tensor_fastfed_averages(
    backend: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    flower = simulate("legacy-flower-fedavg-inplace", backend, tmp_path_factory)
    fast = simulate("legacy-fast-fedavg", backend, tmp_path_factory)
    assert flower[0][2] == 0  # fractional weights cast to int64: every client's counter times 0
    assert fast[0][2] >= 11


@pytest.mark.parametrize("api", ["legacy", "message"])
def test_compressed_updates_converge_within_a_point_of_uncompressed(
    api: str, backend: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    plain = simulate(f"{api}-fast-fedavg", backend, tmp_path_factory)
    compressed = simulate(f"{api}-fast-fedavg-compressed", backend, tmp_path_factory)
    assert abs(accuracy(compressed[-1]) - accuracy(plain[-1])) <= 0.01
    assert compressed[-1][2].dtype == np.int64 and compressed[-1][2] == plain[-1][2]


# Units without a simulation ----------------------------------------------------------------------


def test_npy_views_are_zero_copy_and_refuse_pickled_objects() -> None:
    import io

    from fastfed.integrations.flower._averaging import npy_view

    for array in (np.arange(12, dtype=np.float32).reshape(3, 4), np.asfortranarray(np.ones((2, 3))), np.array(7)):
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        data = buffer.getvalue()
        view = npy_view(data)
        np.testing.assert_array_equal(view, array)
        assert not view.flags.writeable and np.shares_memory(view, np.frombuffer(data, np.uint8))
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="object arrays are refused"):
        npy_view(buffer.getvalue())
    with pytest.raises(ValueError, match="not a .npy array"):
        npy_view(b"\x93NUMPX garbage")
    with pytest.raises(ValueError, match="expected 48"):
        npy_view(_npy(np.zeros(12, np.float32))[:-2])


def _npy(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def test_mixed_compressed_and_plain_results_in_one_round() -> None:
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

    from fastfed.compression import UniformQuantizer
    from fastfed.integrations import flower as fast_legacy

    rng = np.random.default_rng(0)
    global_weights = [rng.standard_normal((20, 30)).astype(np.float32), np.array(5, np.int64)]
    updated = [[g + rng.standard_normal(g.shape).astype(g.dtype) * 0.01 if g.ndim else g + k for g in global_weights]
               for k in range(4)]  # fmt: skip
    codec = UniformQuantizer(bits=16, min_size=0)
    parameters = [
        fast_legacy.compress_parameters(updated[0], global_weights, codec, seed=0),
        ndarrays_to_parameters(updated[1]),
        fast_legacy.compress_parameters(updated[2], global_weights, codec, seed=2),
        ndarrays_to_parameters(updated[3]),
    ]
    results = [(None, FitRes(Status(Code.OK, ""), p, n, {})) for p, n in zip(parameters, [10, 20, 30, 40])]
    strategy = fast_legacy.FastFedAvg()
    with pytest.raises(ValueError, match="need the round's global weights"):
        strategy.aggregate_fit(1, results, [])
    strategy._fastfed_global = ndarrays_to_parameters(global_weights)  # what configure_fit records
    aggregated, _ = strategy.aggregate_fit(1, results, [])
    mean = parameters_to_ndarrays(aggregated)
    expected = [sum(n * u[j].astype(np.float64) for n, u in zip([10, 20, 30, 40], updated)) / 100 for j in range(2)]
    np.testing.assert_allclose(mean[0], expected[0], atol=1e-5)
    assert mean[1].dtype == np.int64 and mean[1] == np.rint(expected[1])


def test_compressed_scalar_tensors_come_back_as_arrays() -> None:
    from fastfed.compression import UniformQuantizer
    from fastfed.integrations.flower._averaging import average_results, encode_delta

    global_weights = [np.ones(3, np.float32), np.array(4, np.int64)]
    updated = [np.full(3, 2.0, np.float32), np.array(6, np.int64)]
    payload = encode_delta(updated, global_weights, UniformQuantizer(bits=8, min_size=0), seed=0)
    mean = average_results([], [(payload, 1.0)], global_weights)
    assert all(isinstance(array, np.ndarray) for array in mean)
    assert mean[1].shape == () and mean[1].dtype == np.int64 and mean[1] == 6
