"""A missing optional dependency names the extra that installs it, at the first call that needs it."""

from __future__ import annotations

import importlib
import sys

import pytest

from fastfed._extras import require


def _hide(monkeypatch: pytest.MonkeyPatch, *modules: str) -> None:
    """Makes ``import module`` fail as if it were not installed (None in sys.modules), for this test."""
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)


def test_require_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    _hide(monkeypatch, "matplotlib")
    with pytest.raises(ModuleNotFoundError, match=r'fastfed plot needs matplotlib: pip install "fastfed\[plot\]"'):
        require("matplotlib", "plot", "fastfed plot")


def test_require_passes_through_a_missing_module_inside_the_dependency(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    # The dependency is installed but something it imports is not: that is no missing extra.
    (tmp_path / "dependency_with_broken_import.py").write_text("import module_installed_nowhere\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError) as raised:
        require("dependency_with_broken_import", "plot", "a feature")
    assert raised.value.name == "module_installed_nowhere"
    assert "pip install" not in str(raised.value)


def test_flower_integration_without_flwr(monkeypatch: pytest.MonkeyPatch) -> None:
    _hide(monkeypatch, "flwr")
    for cached in [name for name in sys.modules if name.startswith("fastfed.integrations.flower")]:
        monkeypatch.delitem(sys.modules, cached)
    for module in ("fastfed.integrations.flower", "fastfed.integrations.flower.serverapp"):
        with pytest.raises(ModuleNotFoundError, match=r'needs flwr: pip install "fastfed\[flower\]"'):
            importlib.import_module(module)


def test_ray_executor_without_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    from fastfed.executors import RayExecutor

    _hide(monkeypatch, "ray")
    with pytest.raises(ModuleNotFoundError, match=r'RayExecutor needs ray: pip install "fastfed\[ray\]"'):
        RayExecutor(num_actors=1)


def test_fedavg_and_evaluate_without_tensorflow(monkeypatch: pytest.MonkeyPatch) -> None:
    import fastfed

    _hide(monkeypatch, "keras")
    with pytest.raises(ModuleNotFoundError, match=r'fastfed.FedAvg needs keras: pip install "fastfed\[tensorflow\]"'):
        fastfed.FedAvg(lambda: None, client_optimizer=lambda: None)
    with pytest.raises(ModuleNotFoundError, match=r"evaluation needs keras"):
        fastfed.evaluate(lambda: None, [], [])


def test_plot_without_matplotlib(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    from fastfed import plot

    _hide(monkeypatch, "matplotlib")
    with pytest.raises(ModuleNotFoundError, match=r'pip install "fastfed\[plot\]"'):
        plot.plot_runs([tmp_path], tmp_path / "out.png")
