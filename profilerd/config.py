"""Daemon configuration: defaults, then a TOML file, then environment, then command-line flags.

``load()`` never raises on bad user input: it returns the config and a list of problems, each
naming the key and where it came from, so the CLI can print them all at once and exit 2.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from profilerd_probes import paths as probe_paths

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

# 9100 is node_exporter and 9400 dcgm-exporter; 9466 collides with neither.
DEFAULT_HTTP_PORT = 9466
CONFIG_ENV = "PROFILERD_CONFIG"

# Stack samples per second for `profilerd attach` (L1). Enough that a short window resolves the
# 10 % threshold: at 10 Hz a 5 s window holds 50 samples, and a 5.5 % phase reads over 10 % one
# time in 18; at 50 Hz (250 samples) one time in 700. py-spy reads the target's memory without
# pausing it, so the cost stays in py-spy's own process.
ATTACH_RATE_HZ = 50


def default_data_dir() -> Path:
    override = os.environ.get("PROFILERD_DATA_DIR")
    if override:
        return Path(override)
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "share"
    return base / "profilerd"


@dataclass(frozen=True)
class DaemonConfig:
    socket_path: Path = dataclasses.field(default_factory=probe_paths.socket_path)
    http_host: str = "127.0.0.1"
    http_port: int = DEFAULT_HTTP_PORT
    data_dir: Path = dataclasses.field(default_factory=default_data_dir)
    record: bool = True
    host_interval_s: float = 1.0
    gpu_interval_s: float = 1.0
    gpu_backend: str = "auto"  # auto | nvml | none
    analysis_interval_s: float = 1.0
    # Steps kept per rank for live analysis: enough that even 400 steps/s fill min_seconds.
    window_steps: int = 4000
    window_s: float = 120.0  # and no older than this
    rules_file: Path | None = None
    max_jobs: int = 256
    retention_days: float | None = None  # prune recordings older than this at start
    # Uids besides the daemon's own whose probes may send (checked on every datagram with the
    # kernel's SCM_CREDENTIALS); with any, the socket is made reachable for them (0666 in 0711).
    allowed_uids: tuple[int, ...] = ()
    # Flags whose values may be shown besides profilerd.redaction.SAFE_VALUE_FLAGS; every other
    # value in a command line is shown as *** (API, TUI, recordings).
    argv_safe_flags: tuple[str, ...] = ()
    # Opt-in: recordings keep the full command line, values and all (the user's 0700 data
    # directory); the API never shows more than the redacted form.
    record_full_argv: bool = False

    @property
    def runtime_dir(self) -> Path:
        return self.socket_path.parent

    @property
    def runs_dir(self) -> Path:
        return self.data_dir / "runs"


_TYPES: dict[str, tuple[type, ...]] = {
    "socket_path": (str,),
    "http_host": (str,),
    "http_port": (int,),
    "data_dir": (str,),
    "record": (bool,),
    "host_interval_s": (int, float),
    "gpu_interval_s": (int, float),
    "gpu_backend": (str,),
    "analysis_interval_s": (int, float),
    "window_steps": (int,),
    "window_s": (int, float),
    "rules_file": (str,),
    "max_jobs": (int,),
    "retention_days": (int, float),
    "allowed_uids": (list, tuple),
    "argv_safe_flags": (list, tuple),
    "record_full_argv": (bool,),
}
# Every numeric setting has a finite range, checked at load: a value outside it (1e20 steps in a
# window, an infinite retention) would break the daemon later, far from the config that caused it.
# key: (lowest, highest, the range as the error message says it)
RANGES: dict[str, tuple[float, float, str]] = {
    "http_port": (0, 65535, "0 (any free port) and 65535"),
    "host_interval_s": (0.05, 60, "0.05 and 60 s"),
    "gpu_interval_s": (0.1, 60, "0.1 (10 Hz) and 60 s"),
    "analysis_interval_s": (0.05, 60, "0.05 and 60 s"),
    "window_steps": (20, 100_000, "20 and 100000 steps"),
    "window_s": (1, 86_400, "1 and 86400 s"),
    "max_jobs": (1, 10_000, "1 and 10000"),
    "retention_days": (0, 36_500, "0 and 36500 days"),
}
MAX_UID = 2**32 - 2  # uid_t; 2**32 - 1 is (uid_t) -1, "no user"
_FLAG_NAME = re.compile(r"-{0,2}[A-Za-z][A-Za-z0-9_.-]*")
_PATH_KEYS = {"socket_path", "data_dir", "rules_file"}
_ENV = {
    "PROFILERD_SOCKET": "socket_path",
    "PROFILERD_HTTP_HOST": "http_host",
    "PROFILERD_HTTP_PORT": "http_port",
    "PROFILERD_DATA_DIR": "data_dir",
    "PROFILERD_RULES": "rules_file",
    "PROFILERD_GPU_BACKEND": "gpu_backend",
    "PROFILERD_ALLOWED_UIDS": "allowed_uids",
    "PROFILERD_ARGV_SAFE_FLAGS": "argv_safe_flags",
}


# ---- checking a TOML file: shared by this configuration and the rules file --------------------
def read_toml(path: Path, what: str, problems: list[str]) -> dict[str, Any]:
    """A TOML file's tables; a file that is missing, unreadable or not TOML is a problem, never
    an exception, and reads as empty."""
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        problems.append(f"{path}: {what} not found")
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        problems.append(f"{path}: not valid TOML: {exc}")
    except OSError as exc:
        problems.append(f"{path}: cannot read: {exc.strerror}")
    return {}


def known_key(key: str, known: Any, where: str, problems: list[str]) -> bool:
    """Whether ``key`` is one of ``known``; an unknown one (a typo) is a problem naming it."""
    if key in known:
        return True
    problems.append(f"{where}: unknown key '{key}'")
    return False


def _coerce_env(key: str, raw: str) -> Any:
    kind = _TYPES[key][0]
    if kind is list:  # comma-separated integers, or names
        parts = raw.replace(",", " ").split()
        return parts if key == "argv_safe_flags" else [int(part) for part in parts]
    if kind is bool:
        return raw.lower() in ("1", "true", "yes", "on")
    if kind is int:
        return int(raw)
    if kind is float:
        return float(raw)
    return raw


def _check(key: str, value: Any, source: str, problems: list[str]) -> bool:
    if not known_key(key, _TYPES, source, problems):
        return False
    wanted = _TYPES[key]
    # bool is an int in Python; do not accept true for a port
    if (isinstance(value, bool) and bool not in wanted) or not isinstance(value, wanted):
        names = " or ".join(t.__name__ for t in wanted)
        within = f" between {_range_text(key)}" if key in RANGES else ""
        problems.append(f"{source}: '{key}' must be {names}{within}, got {type(value).__name__} {value!r}")
        return False
    items = cast("list[object] | tuple[object, ...]", value)  # for the two list keys: their type is checked above
    if key == "allowed_uids" and not all(
        isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_UID for v in items
    ):
        problems.append(f"{source}: 'allowed_uids' must be a list of user ids (integers 0 to {MAX_UID}), got {value!r}")
        return False
    if key == "argv_safe_flags" and not all(isinstance(v, str) and _FLAG_NAME.fullmatch(v) for v in items):
        problems.append(f"{source}: 'argv_safe_flags' must be a list of flag names (e.g. 'max-tokens'), got {value!r}")
        return False
    return True


def _range_text(key: str) -> str:
    return RANGES[key][2]


def _range_problems(config: DaemonConfig) -> list[tuple[str, str]]:
    """(key, problem) for every value out of its range."""
    problems = []
    for key in RANGES:
        value = getattr(config, key)
        low, high, _ = RANGES[key]
        if value is not None and not low <= value <= high:  # NaN fails too
            problems.append((key, f"{key} must be between {_range_text(key)}, got {value!r}"))
    if config.gpu_backend not in ("auto", "nvml", "none"):
        problems.append(("gpu_backend", f"gpu_backend must be auto, nvml or none, got {config.gpu_backend!r}"))
    if config.rules_file is not None and not config.rules_file.is_file():
        problems.append(("rules_file", f"rules_file {config.rules_file} does not exist"))
    return problems


def load(file: Path | None = None, overrides: dict[str, Any] | None = None) -> tuple[DaemonConfig, list[str]]:
    """Build the config; ``overrides`` come from flags and win over everything else."""
    problems: list[str] = []
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}  # where each value came from, for the problems that follow
    if file is None and os.environ.get(CONFIG_ENV):
        file = Path(os.environ[CONFIG_ENV])
    if file is not None:
        data = read_toml(file, "config file", problems)
        section = data.get("daemon", data)
        if "daemon" in data:
            for key, value in data.items():
                if key != "daemon":
                    what = f"section [{key}]" if isinstance(value, dict) else f"key '{key}' (outside [daemon])"
                    problems.append(f"{file}: unknown {what}")
        if not isinstance(section, dict):
            problems.append(f"{file}: [daemon] must be a table")
            section = {}
        for key, value in section.items():
            if _check(key, value, str(file), problems):
                values[key] = value
                sources[key] = str(file)
    for env, key in _ENV.items():
        raw = os.environ.get(env)
        if raw:
            try:
                values[key] = _coerce_env(key, raw)
                sources[key] = f"environment {env}"
            except ValueError:
                wanted = "comma-separated list of user ids" if key == "allowed_uids" else _TYPES[key][0].__name__
                problems.append(f"environment {env}={raw!r}: not a valid {wanted}")
    for key, value in (overrides or {}).items():
        if value is not None and _check(key, value, "command line", problems):
            values[key] = value
            sources[key] = "command line"
    for key in _PATH_KEYS:
        if key in values and values[key] is not None:
            try:
                values[key] = Path(values[key]).expanduser()
            except RuntimeError as exc:  # ~user that does not exist
                problems.append(f"{sources[key]}: '{key}': {exc}")
                del values[key]
    for key in ("host_interval_s", "gpu_interval_s", "analysis_interval_s", "window_s"):
        if key in values:
            values[key] = float(values[key])
    for key in ("allowed_uids", "argv_safe_flags"):
        if key in values:
            values[key] = tuple(values[key])
    config = DaemonConfig(**values)
    problems.extend(
        f"{sources[key]}: {problem}" if key in sources else problem for key, problem in _range_problems(config)
    )
    return config, problems
