"""Where the daemon listens, and whether a directory there can be trusted (standard library only).

The probes, `profilerd run`, `tui`, `attach` and the daemon all decide trust with
``trust_problem``: on a shared box another local user can pre-create ``/tmp/profilerd-<uid>``
and plant a lock, an address file or a socket there, to capture a run (issue 18).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path

SOCKET_ENV = "PROFILERD_SOCKET"
SOCKET_NAME = "ingest.sock"
# Uids besides the user's own and root's whose runtime directory the probes may send to: the
# other side of a daemon's ``allowed_uids`` (a colleague's or a node daemon's socket).
TRUSTED_UIDS_ENV = "PROFILERD_TRUSTED_UIDS"
# Set by `profilerd run`: a folder where each process leaves a mark before its first message,
# which is how the run knows, with no daemon yet, that the training has steps to record.
# Here, not in transport, so that `profilerd run` names it without importing the sender.
RUN_DIR_ENV = "PROFILERD_RUN_DIR"
SENDER_MARK_SUFFIX = ".sender"


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


def trusted_owners() -> frozenset[int]:
    """The user, root (who can read everything anyway), and the uids in PROFILERD_TRUSTED_UIDS."""
    extra = os.environ.get(TRUSTED_UIDS_ENV, "").replace(",", " ").split()
    return frozenset({os.getuid(), 0, *(int(uid) for uid in extra if uid.isdigit())})


def trust_problem(directory: Path, entries: Iterable[str] = (), owners: frozenset[int] | None = None) -> str | None:
    """Why ``directory`` and the ``entries`` in it that exist cannot be trusted; None if they can.

    Trusted: the directory is a real directory (not a symlink) of one of ``owners`` (default:
    this user only) that no group or other user can write to, so nobody else can have put or
    replaced anything in it since; each entry belongs to an owner too (one planted while the
    directory was still open to others is refused). Nothing is followed (lstat): the readers
    open entries with O_NOFOLLOW, the probes send only to a socket itself (socket_problem).
    """
    owners = frozenset({os.getuid()}) if owners is None else owners
    try:
        info = os.lstat(directory)
    except FileNotFoundError:
        return None  # nothing to trust yet: whoever creates it owns it (checked again then)
    except OSError as exc:
        return f"{directory} cannot be examined ({exc.strerror})"
    if stat.S_ISLNK(info.st_mode):
        return f"{directory} is a symbolic link"
    if not stat.S_ISDIR(info.st_mode):
        return f"{directory} is not a directory"
    if info.st_uid not in owners:
        return f"{directory} belongs to uid {info.st_uid}, not to you ({os.getuid()})"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{directory} is writable by other users (mode {stat.S_IMODE(info.st_mode):04o})"
    for name in entries:
        try:
            entry = os.lstat(directory / name)
        except FileNotFoundError:
            continue
        except OSError as exc:
            return f"{directory / name} cannot be examined ({exc.strerror})"
        if entry.st_uid not in owners:
            return f"{directory / name} belongs to uid {entry.st_uid}, not to you ({os.getuid()})"
    return None


def socket_problem(path: Path) -> str | None:
    """Why the probes must not send to ``path``; None when it is a socket of a trusted owner in
    a directory of one (see trust_problem), or does not exist yet (then nothing is sent)."""
    owners = trusted_owners()
    problem = trust_problem(path.parent, (path.name,), owners)
    if problem is not None:
        return problem
    try:
        info = os.lstat(path)
    except OSError:
        return None
    return None if stat.S_ISSOCK(info.st_mode) else f"{path} is not a socket"
