"""The package boundaries of the architecture, enforced."""

from __future__ import annotations

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


def test_the_import_contracts_hold() -> None:
    """The boundaries in pyproject.toml's [tool.importlinter]: probes import nothing of profilerd,
    the daemon no torch or textual, only the NVML backend pynvml, the daemon's layers, readers
    that only read, and no circles (imports deferred into functions included)."""
    code = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(no_cache=True))"
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_only_the_store_takes_its_lock() -> None:
    """Samplers write through the fan-out and readers copy through ``Store.read``."""
    pattern = re.compile(r"\bstore\.(_?lock)\b")
    offenders = []
    for folder in ("profilerd", "tui", "probes", "tests", "benchmarks"):
        for path in (REPO / folder).rglob("*.py"):
            if path != REPO / "profilerd" / "store.py" and pattern.search(path.read_text()):
                offenders.append(str(path.relative_to(REPO)))
    assert offenders == []
