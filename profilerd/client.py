"""The one client of a profilerd daemon's HTTP API, for the CLI (`run`, `attach`) and the TUI.

Standard library only: `profilerd run` and `profilerd tui` use it before (or without) the
daemon's imports. A local daemon is found through the runtime directory only when that
directory is the user's own (profilerd.runtime.runtime_dir_problem): a lock and address file
planted by another local user lead nowhere (issue 18).
"""

from __future__ import annotations

import json
import urllib.parse
from pathlib import Path
from typing import Any

from profilerd.runtime import read_running_daemon, runtime_dir_problem


class ClientError(Exception):
    """The daemon cannot be read right now (gone, down, untrusted); the message is for the user."""


class NotFound(ClientError):
    """A 404 from a daemon that is up: the thing asked for does not exist (yet)."""


class UntrustedRuntimeDir(ClientError):
    """The runtime directory is not the user's own: no daemon of the user's can be there."""


def origin(url: str) -> str:
    """host:port of a URL, for messages."""
    return urllib.parse.urlsplit(url).netloc or url


def get_json(url: str, timeout_s: float) -> Any:
    """GET a JSON document; every network or decoding failure becomes a ClientError."""
    # Here, not at the top: `profilerd run` starts the training before it needs HTTP (~60 ms).
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            raise NotFound(f"{url}: not found") from None
        raise ClientError(f"{url}: HTTP {exc.code}") from None
    except urllib.error.URLError as exc:
        raise ClientError(f"cannot reach {origin(url)}: {exc.reason}") from None
    except (OSError, ValueError) as exc:
        raise ClientError(f"cannot read {origin(url)}: {exc}") from None


def untrusted_line(runtime_dir: Path, problem: str) -> str:
    """The one line that says a runtime directory is not used, and why (without a prefix)."""
    return f"not using {runtime_dir}: {problem} (another user may have created it)"


def local_daemon_url(runtime_dir: Path | None = None) -> str | None:
    """The URL of this user's running daemon registered in ``runtime_dir`` (default: the
    configured one), read afresh on each call (a daemon that came back on another port is
    found); None when none runs there. UntrustedRuntimeDir when the directory is not the user's own."""
    if runtime_dir is None:
        from profilerd.config import load

        runtime_dir = load(None, {})[0].runtime_dir
    problem = runtime_dir_problem(runtime_dir)
    if problem is not None:
        raise UntrustedRuntimeDir(untrusted_line(runtime_dir, problem))
    running = read_running_daemon(runtime_dir)
    if not running:
        return None
    return f"http://{running['http_host']}:{running['http_port']}"


class DaemonClient:
    """A daemon at ``base_url`` ("" until known); ``get`` answers None instead of raising, for
    callers that poll (the run's status line, the wait for its recording)."""

    def __init__(self, base_url: str = "") -> None:
        self.base_url = base_url

    def get(self, path: str, timeout_s: float = 1.0) -> dict[str, Any] | None:
        if not self.base_url:
            return None
        try:
            return get_json(self.base_url + path, timeout_s)
        except ClientError:
            return None

    def run_verdict(self, run_id: str, exit_code: int, wait_s: float, timeout_s: float) -> dict[str, Any] | None:
        """The daemon's end-of-run verdict of a run, ``{"verdict": ..., "rules_file": ...}``, once
        its recording has closed (the daemon waits up to ``wait_s`` for that); None when it
        cannot give one (an older daemon, no closed recording, an error, no answer)."""
        query = urllib.parse.urlencode({"exit_code": exit_code, "wait_ms": round(wait_s * 1000)})
        answer = self.get(f"/api/v1/runs/{urllib.parse.quote(run_id, safe='')}/verdict?{query}", timeout_s)
        if answer is None or not isinstance(answer.get("verdict"), dict):
            return None
        return answer
