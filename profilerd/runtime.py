"""The per-user runtime directory: the daemon's lock and address, and the leases of runs.

Standard library only: `profilerd run` reads and prepares these before the training starts, and
must not pay for the daemon's imports (pandas, prometheus_client, its store) to do so.

A daemon started for runs (`profilerd serve --for-runs`) lives as long as some run needs it.
Each `profilerd run` holds a lease: a file in ``leases/`` it keeps locked (flock) while it
lives. The kernel drops the lock when the process ends however it ends (SIGKILL included), so
the daemon counts live leases by trying to lock each file. A lease also names the training it
covers (pid and start time): a run killed with SIGKILL leaves its training running, and that
keeps the lease alive until the training ends too. ``leases.lock`` orders the two sides:
a run holds it while it takes its lease and finds (or starts) the daemon, and a daemon holds it
while it decides to exit and shuts down, so that no run ever picks a daemon that is leaving.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from profilerd_probes.paths import SOCKET_NAME, trust_problem

LOCK_NAME = "daemon.lock"
INFO_NAME = "daemon.json"
LEASES_DIR = "leases"
LEASES_LOCK = "leases.lock"
DAEMON_LOG_NAME = "daemon-for-runs.log"
# In a private runtime directory that one `profilerd run` made (its usual one was another
# user's): the directory is removed with the run's daemon (remove_private_runtime_dir).
PRIVATE_MARK = "private-to-one-run"
# What a daemon keeps in its runtime directory: each must be the user's before anyone reads it.
RUNTIME_ENTRIES = (LOCK_NAME, INFO_NAME, LEASES_DIR, LEASES_LOCK, DAEMON_LOG_NAME, SOCKET_NAME, PRIVATE_MARK)


def import_yielding_the_cpu(*modules: str) -> None:
    """Import ``modules`` in a thread at low priority (nice 10), waiting for them.

    A daemon started for runs comes up beside a training that is starting too: its imports
    (its own modules, then pandas and prometheus-client: most of its start) should not take the
    CPU from the training's own (on a small or busy box they did: bench_launch.py). A thread,
    because an unprivileged process cannot raise its priority back: the threads the daemon
    starts afterwards (ingest, HTTP, samplers) are made by the main thread, at the normal
    priority. An ImportError is left for the caller's own import to raise, with its traceback.
    """
    import importlib
    import threading

    def load() -> None:
        with contextlib.suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        for module in modules:
            with contextlib.suppress(ImportError):
                importlib.import_module(module)

    thread = threading.Thread(target=load, name="profilerd-imports")
    thread.start()
    thread.join()


def runtime_dir_problem(runtime_dir: Path) -> str | None:
    """Why this user must not use ``runtime_dir`` (someone else's, open to others, or holding
    someone else's files); None when it is the user's own, or does not exist yet."""
    return trust_problem(runtime_dir, RUNTIME_ENTRIES)


class IngestError(RuntimeError):
    """The socket (or its directory) cannot be used safely; the message says what to do."""


def make_private_runtime_dir() -> Path:
    """A fresh runtime directory for one run (mode 0700), marked to go with its daemon."""
    directory = Path(tempfile.mkdtemp(prefix=f"profilerd-{os.getuid()}-"))
    (directory / PRIVATE_MARK).touch(mode=0o600)
    return directory


def remove_private_runtime_dir(runtime_dir: Path) -> None:
    """Remove ``runtime_dir`` if make_private_runtime_dir made it: nothing else uses it once its
    run's daemon has stopped (or never started). A shared runtime directory is left alone."""
    if (runtime_dir / PRIVATE_MARK).is_file():
        shutil.rmtree(runtime_dir, ignore_errors=True)


def prepare_runtime_dir(directory: Path, shared: bool = False) -> None:
    """Create the directory, or refuse one this user must not trust (runtime_dir_problem).

    The mode is 0700; 0711 when other uids are allowed to send (``shared``), so that they can
    reach the socket without being able to list or create anything in the directory.
    """
    with contextlib.suppress(FileExistsError):  # checked below, without following a symlink
        directory.mkdir(parents=True, mode=0o700)
    info = os.lstat(directory)
    wanted = 0o711 if shared else 0o700
    if stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() and stat.S_IMODE(info.st_mode) != wanted:
        os.chmod(directory, wanted)  # closed before its entries are checked: none can be added since
    problem = runtime_dir_problem(directory)
    if problem is not None:
        raise IngestError(f"{problem}; refusing to use it (remove it, or choose another socket)")


def read_running_daemon(runtime_dir: Path) -> dict[str, Any] | None:
    """The running daemon's address, or None if no daemon of this user holds the lock (a lock,
    address or socket that is not the user's own is no daemon of the user's: see
    runtime_dir_problem)."""
    if runtime_dir_problem(runtime_dir) is not None:
        return None
    try:
        fd = os.open(runtime_dir / LOCK_NAME, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                return None
            return _read_info(runtime_dir)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _read_info(runtime_dir: Path) -> dict[str, Any] | None:
    try:
        with open(os.open(runtime_dir / INFO_NAME, os.O_RDONLY | os.O_NOFOLLOW), "rb") as file:
            info = json.loads(file.read())
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict):
        return None
    socket = Path(str(info.get("socket") or runtime_dir / SOCKET_NAME))
    if trust_problem(socket.parent, (socket.name,)) is not None:
        return None  # an address that sends the user's probes elsewhere
    return info


def ensure_runtime_dir(runtime_dir: Path) -> None:
    """Create the runtime directory private to this user, as the daemon expects it."""
    runtime_dir.mkdir(mode=0o700, parents=True, exist_ok=True)


@contextlib.contextmanager
def leases_locked(runtime_dir: Path, wait_s: float | None) -> Iterator[bool]:
    """Hold ``leases.lock``; yields False when it could not be had within ``wait_s`` (None: wait)."""
    fd = os.open(runtime_dir / LEASES_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = None if wait_s is None else time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
            if deadline is not None and time.monotonic() >= deadline:
                yield False
                return
            time.sleep(0.02)
        yield True
    finally:
        os.close(fd)  # closing the only descriptor releases the lock


class Lease:
    """One run's claim on the shared daemon, held until release() or the process's end."""

    def __init__(self, runtime_dir: Path) -> None:
        directory = runtime_dir / LEASES_DIR
        directory.mkdir(mode=0o700, exist_ok=True)
        self.path = directory / f"{os.getpid()}-{os.urandom(4).hex()}"
        # Not inheritable (Python's default): the training must not hold our lease, nor see the fd.
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def cover(self, pid: int, run_id: str) -> None:
        """The training this lease is for: it keeps the lease alive should this process die first,
        and tells the daemon that the run's end will be announced (no orphan closing meanwhile)."""
        started = _start_time(pid)
        if self._fd is not None and started is not None:
            os.pwrite(self._fd, f"{pid} {started} {run_id}".encode(), 0)

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(self._fd)
        self._fd = None


def live_leases(runtime_dir: Path) -> int:
    """How many runs hold a lease; the files of runs that died are removed on the way."""
    return len(_live_lease_contents(runtime_dir))


def leased_run_ids(runtime_dir: Path) -> set[str]:
    """The runs whose `profilerd run` (or training, should that have died) is still alive."""
    return {parts[2] for parts in (c.split() for c in _live_lease_contents(runtime_dir)) if len(parts) >= 3}


def _live_lease_contents(runtime_dir: Path) -> list[str]:
    directory = runtime_dir / LEASES_DIR
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    alive = []
    for name in names:
        path = directory / name
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue  # released meanwhile
        try:
            content = os.pread(fd, 256, 0).decode(errors="replace")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                alive.append(content)  # its run holds it
            else:
                if _training_alive(content):
                    alive.append(content)
                else:
                    with contextlib.suppress(OSError):
                        path.unlink()
        finally:
            os.close(fd)
    return alive


def _start_time(pid: int) -> str | None:
    """The process's start time (clock ticks since boot): a pid reused later has another."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _training_alive(content: str) -> bool:
    parts = content.split()
    if len(parts) < 2 or not parts[0].isdigit():
        return False
    return _start_time(int(parts[0])) == parts[1]
