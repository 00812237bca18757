"""mypy passes on every package, strict on the probes and the analysis, as CI runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]


def test_mypy_passes() -> None:
    # One mypy run over all packages (about 20 s cold), the same command as .ci/run.
    done = subprocess.run([sys.executable, str(REPO / ".ci" / "typecheck")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Success: no issues found" in done.stdout


def test_probes_and_analysis_are_checked_strictly_for_python_3_10() -> None:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["mypy"]
    assert config["python_version"] == "3.10"  # the probes run inside training jobs on 3.10 too
    strict = [o for o in config["overrides"] if o.get("disallow_untyped_defs")]
    modules = {m for o in strict for m in o["module"]}
    assert {"profilerd_probes.*", "profilerd.analysis.*"} <= modules
    assert all(o.get("warn_return_any") and o.get("disallow_any_generics") for o in strict)


def test_every_package_ships_its_py_typed_marker() -> None:
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    for package, folder in setuptools["package-dir"].items():
        assert (REPO / folder / "py.typed").is_file(), folder
        assert "py.typed" in setuptools["package-data"][package], package
