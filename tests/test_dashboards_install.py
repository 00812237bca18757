"""The operator files after a real, non-editable install: `profilerd dashboards --out DIR` writes
the Grafana dashboards, the Prometheus rules and alerts (absolute runbook links) and the systemd
unit from the installed package, not from a checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from profilerd_dashboards import DOCS_BASE_URL
from tests.conftest import REPO

SHIPPED = (
    "grafana/profilerd-jobs.json",
    "grafana/profilerd-node-gpus.json",
    "prometheus/profilerd-rules.yml",
    "prometheus/profilerd-alerts.yml",
    "prometheus/tests/profilerd-rules.test.yml",
    "prometheus/tests/profilerd-alerts.test.yml",
    "systemd/profilerd@.service",
)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """`pip install . --no-deps --target T` of a copy of the project (no editable finder, no .git)."""
    root = tmp_path_factory.mktemp("install")
    source = root / "src"
    tracked = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=False
    )
    if tracked.returncode != 0:
        pytest.skip("needs a git checkout to copy the project from")
    for name in tracked.stdout.splitlines():
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    target = root / "target"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(source)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    yield target


def _installed_profilerd(target: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The installed command, importing only from the install (the checkout is not on the path)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PROFILERD_", "PYTHON"))}
    env["PYTHONPATH"] = str(target)
    code = (
        "import sys, profilerd, profilerd_dashboards; "
        f"assert profilerd_dashboards.__file__.startswith({str(target)!r}), profilerd_dashboards.__file__; "
        "from profilerd.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_a_non_editable_install_writes_the_operator_files(installed: Path, tmp_path: Path) -> None:
    result = _installed_profilerd(installed, "dashboards", "--out", str(tmp_path / "ops"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "ops"
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == sorted(SHIPPED)
    assert set(result.stdout.split()) == {str(out / name) for name in SHIPPED}  # it lists what it wrote
    for name in SHIPPED:  # with the default base, exactly the repository's files
        assert (out / name).read_text() == (REPO / "dashboards" / name).read_text(), name
    alerts = yaml.safe_load((out / "prometheus/profilerd-alerts.yml").read_text())
    urls = [rule["annotations"]["runbook_url"] for group in alerts["groups"] for rule in group["rules"]]
    assert urls and all(url == f"{DOCS_BASE_URL}/alerts.md#{url.rsplit('#', 1)[1]}" for url in urls)
    assert all(url.startswith("https://") for url in urls)


def test_runbook_links_follow_a_configured_base(installed: Path, tmp_path: Path) -> None:
    base = "https://docs.internal.example/ml/profilerd/"
    out = tmp_path / "ops"
    result = _installed_profilerd(installed, "dashboards", "--out", str(out), "--runbook-base", base, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    alerts = yaml.safe_load((out / "prometheus/profilerd-alerts.yml").read_text())
    for group in alerts["groups"]:
        for rule in group["rules"]:
            assert rule["annotations"]["runbook_url"] == f"{base}alerts.md#{rule['alert'].lower()}"
    assert DOCS_BASE_URL not in (out / "prometheus/tests/profilerd-alerts.test.yml").read_text()
    if shutil.which("promtool"):  # the rewritten rules and their unit tests still agree
        checked = subprocess.run(
            ["promtool", "check", "rules", *sorted(str(p) for p in (out / "prometheus").glob("*.yml"))],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr
        tested = subprocess.run(
            ["promtool", "test", "rules", "profilerd-rules.test.yml", "profilerd-alerts.test.yml"],
            cwd=out / "prometheus" / "tests",
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert tested.returncode == 0, tested.stdout + tested.stderr
    bad = _installed_profilerd(installed, "dashboards", "--out", str(out), "--runbook-base", "docs/", cwd=tmp_path)
    assert bad.returncode == 2 and "absolute http(s) URL" in bad.stderr and "Traceback" not in bad.stderr
