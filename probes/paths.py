"""Where the daemon listens, shared by the probes and the daemon (standard library only)."""

from __future__ import annotations

import os
from pathlib import Path

SOCKET_ENV = "PROFILERD_SOCKET"
SOCKET_NAME = "ingest.sock"


def runtime_dir() -> Path:
    """The per-user directory for the socket: $XDG_RUNTIME_DIR/profilerd or /tmp/profilerd-<uid>."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg):
        return Path(xdg) / "profilerd"
    return Path(f"/tmp/profilerd-{os.getuid()}")


def socket_path() -> Path:
    override = os.environ.get(SOCKET_ENV)
    if override:
        return Path(override)
    return runtime_dir() / SOCKET_NAME
