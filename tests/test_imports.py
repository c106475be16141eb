"""The package's shape: no import cycles, a light ``import fastfed``, subpackages reachable from it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import fastfed

PACKAGE = Path(fastfed.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """Module -> fastfed modules it imports, anywhere in its body (function-level imports included)."""
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    modules |= {_module_name(stub): stub for stub in PACKAGE.rglob("*.pyi")}  # compiled modules: fastfed._core
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        if path.suffix == ".pyi":
            continue
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, *([base] if base else [])])
                # `from package import module` imports the module; `from module import name`, the module.
                candidates = [f"{base}.{alias.name}" for alias in node.names]
                targets = [candidate if candidate in modules else base for candidate in candidates]
            else:
                continue
            graph[name] |= {target for target in targets if target in modules and target != name}
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_module_imports_itself_through_others() -> None:
    graph = _import_graph()
    assert len(graph) > 30 and "fastfed.learning.fedavg" in graph["fastfed.learning"]
    assert _find_cycle(graph) is None, " -> ".join(_find_cycle(graph) or [])


def test_import_fastfed_is_light_and_reaches_every_subpackage() -> None:
    code = (
        "import sys, fastfed\n"
        "heavy = [m for m in ('tensorflow', 'keras', 'ray', 'flwr', 'matplotlib') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert fastfed.data.partition_iid and fastfed.models.mlp and fastfed.executors.RayExecutor\n"
        "assert fastfed.learning.executors.LocalExecutor and fastfed.compression.UniformQuantizer\n"
        "assert 'ray' not in sys.modules and 'tensorflow' not in sys.modules\n"
        "import fastfed.integrations\n"
        "print(fastfed.__version__)\n"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert completed.returncode == 0, completed.stderr
    from importlib.metadata import version

    assert completed.stdout.strip() == version("fastfed") == fastfed.__version__
