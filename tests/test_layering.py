"""The package boundaries of the architecture, enforced."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _loaded_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    return set(out.stdout.split())


def test_probes_import_only_the_standard_library() -> None:
    loaded = _loaded_after("import profilerd_probes.core, profilerd_probes.wire, profilerd_probes.transport")
    for heavy in ("torch", "pandas", "numpy", "prometheus_client", "textual", "psutil", "pynvml", "profilerd"):
        assert heavy not in loaded, f"importing probes loaded {heavy}"


def test_daemon_never_imports_torch_or_textual() -> None:
    loaded = _loaded_after(
        "import profilerd.cli, profilerd.daemon, profilerd.recordings.offline, profilerd.report, "
        "profilerd.analysis.live"
    )
    assert "torch" not in loaded
    assert "textual" not in loaded


def test_only_the_nvml_module_imports_pynvml() -> None:
    offenders = []
    for path in list((REPO / "profilerd").rglob("*.py")) + list((REPO / "probes").rglob("*.py")):
        text = path.read_text()
        if ("import pynvml" in text or "from pynvml" in text) and path.name != "nvml.py":
            offenders.append(str(path.relative_to(REPO)))
    assert offenders == []


def _module_imports(path: Path, package_root: Path) -> set[str]:
    """The profilerd modules ``path`` imports when it is loaded: imports at module level, not
    those deferred into functions or kept for the type checker (``if TYPE_CHECKING:``)."""
    module = ".".join(path.relative_to(package_root.parent).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {name.removesuffix(".__init__") for name in found if name.split(".")[0] == "profilerd"}


def test_the_daemon_package_has_no_import_circles() -> None:
    root = REPO / "profilerd"
    modules = {
        ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): path
        for path in root.rglob("*.py")
    }
    graph = {name: _module_imports(path, root) & modules.keys() - {name} for name, path in modules.items()}
    # A module imports its parent packages too: an edge to ``a.b`` is one to ``a`` as well.
    for name in graph:
        graph[name] |= {parent for child in graph[name] for parent in _parents(child)} - {name, *_parents(name)}
    circles = []
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        path.append(name)
        for target in sorted(graph[name]):
            if state.get(target) == 1:
                circles.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in state:
                visit(target)
        path.pop()
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)
    assert circles == []


def _parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def test_only_the_store_takes_its_lock() -> None:
    """Samplers write through the fan-out and readers copy through ``Store.read``."""
    pattern = re.compile(r"\bstore\.(_?lock)\b")
    offenders = []
    for folder in ("profilerd", "tui", "probes", "tests", "benchmarks"):
        for path in (REPO / folder).rglob("*.py"):
            if path != REPO / "profilerd" / "store.py" and pattern.search(path.read_text()):
                offenders.append(str(path.relative_to(REPO)))
    assert offenders == []
