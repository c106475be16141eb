"""The README's "Bring your own model and data" example runs as it stands."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("tensorflow")

README = Path(__file__).resolve().parents[1] / "README.md"


def _section_code(heading: str) -> str:
    text = README.read_text()
    section = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert blocks, f"no Python block under {heading!r}"
    return "\n".join(blocks)


def test_bring_your_own_model_and_data_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "readme_example"}
    exec(compile(_section_code("Bring your own model and data"), str(README), "exec"), namespace)
    history, scores, metrics = namespace["result"].history, namespace["scores"], namespace["metrics"]  # type: ignore[attr-defined]
    assert [row["round"] for row in history] == [1, 2, 3, 4]
    assert "eval_accuracy" in history[1] and "eval_accuracy" in history[3] and "eval_accuracy" not in history[0]
    assert scores["num_examples"] == 350 and len(scores.per_client) == 2  # type: ignore[index,attr-defined]
    assert metrics["num_clients"] == 4 and metrics["clients_failed"] == 0  # type: ignore[index]
    assert (tmp_path / "runs" / "own" / "metrics.csv").is_file()
