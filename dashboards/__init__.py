"""The operator files: Grafana dashboards, Prometheus recording and alert rules (with their
promtool tests) and the systemd unit.

Installed as the package ``profilerd_dashboards`` so that `profilerd dashboards --out DIR`
finds them after any install, editable or not, wheel or checkout.
"""

from __future__ import annotations

import sys
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING

from profilerd_dashboards.generate import DOCS_BASE_URL, with_runbook_base

if TYPE_CHECKING:
    if sys.version_info >= (3, 11):
        from importlib.resources.abc import Traversable
    else:  # Python 3.10
        from importlib.abc import Traversable

__all__ = ["DOCS_BASE_URL", "export"]

FOLDERS = ("grafana", "prometheus", "prometheus/tests", "systemd")
SUFFIXES = (".json", ".yml", ".service")


def _shipped() -> list[tuple[str, Traversable]]:
    root = files(__name__)
    found = []
    for folder in FOLDERS:
        directory = root.joinpath(*folder.split("/"))
        found += [
            (f"{folder}/{entry.name}", entry)
            for entry in sorted(directory.iterdir(), key=lambda e: e.name)
            if entry.is_file() and entry.name.endswith(SUFFIXES)
        ]
    return found


def export(out_dir: Path, runbook_base: str = DOCS_BASE_URL) -> list[Path]:
    """Write every operator file under ``out_dir`` (its folders kept), the alerts' runbook
    links under ``runbook_base``; returns the paths written."""
    written = []
    for relative, entry in _shipped():
        text = entry.read_text(encoding="utf-8")
        if relative.startswith("prometheus/"):
            text = with_runbook_base(text, runbook_base)
        path = out_dir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written
