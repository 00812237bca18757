"""The package boundaries of the architecture, enforced."""

from __future__ import annotations

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
        "import profilerd.cli, profilerd.daemon, profilerd.runs, profilerd.report, profilerd.analysis.live"
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
