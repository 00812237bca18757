"""profilerd probes: step timing hooks that run inside a PyTorch training process.

Importing this package imports only the standard library (and not the hooks, until they are
used); torch is imported by ``install()``.

    import profilerd_probes as probes
    probes.install()            # or: with probes.profile(): train()
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import itertools
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# The hooks (core) are imported by the functions that use them: `profilerd run` imports this
# package for paths and wire only, before the training starts, and need not pay for them.

__all__ = ["install", "installed", "profile", "uninstall"]

log = logging.getLogger("profilerd_probes")
_registered_atexit = False


def installed() -> bool:
    from profilerd_probes import core

    return core.active() is not None


def install(socket_path: str | os.PathLike[str] | None = None) -> bool:
    """Install the probes in this process; returns False (with one ``profilerd:`` line on
    stderr) if it cannot.

    Safe to call twice. The daemon's socket defaults to $PROFILERD_SOCKET or the per-user
    runtime directory.
    """
    global _registered_atexit
    from profilerd_probes import core, paths
    from profilerd_probes.transport import DatagramSender

    if core.active() is not None:
        return True
    try:
        _share_identity_with_children()
        sender = DatagramSender(Path(socket_path) if socket_path else paths.socket_path())
        probe = core.StepProbe(sender)
        core.set_active(probe)
        probe.install()
        # os._exit() skips atexit: what is batched is sent first (multiprocessing children,
        # and programs that leave that way, keep their last steps). Undone by uninstall.
        probe._patch(os, "_exit", _flushing_exit(os._exit))
    except Exception as exc:  # never let profiling break the training script
        core.disable(exc)
        return False
    if not _registered_atexit:
        _registered_atexit = True
        atexit.register(_flush_at_exit)
        import multiprocessing.util

        multiprocessing.util.register_after_fork(probe, _after_multiprocessing_fork)
        os.register_at_fork(after_in_child=_after_fork_in_child)
    return True


def uninstall() -> None:
    """Remove every hook and patch; sends the step in progress first."""
    from profilerd_probes import core

    probe = core.active()
    if probe is None:
        return
    try:
        probe.flush()
    except Exception as exc:
        log.debug("flush on uninstall failed: %r", exc)
    core.set_active(None)
    try:
        probe.uninstall()
    finally:
        probe.sender.finish()
        probe.sender.close()


@contextlib.contextmanager
def profile(socket_path: str | os.PathLike[str] | None = None) -> Iterator[None]:
    """Probe the training inside the ``with`` block only."""
    install(socket_path)
    try:
        yield
    finally:
        uninstall()


def _register_exit_flush() -> None:
    """Flush at interpreter exit, and also in multiprocessing children, which leave through
    os._exit() after running multiprocessing's finalizers but not atexit."""
    import multiprocessing.util

    multiprocessing.util.Finalize(None, _flush_at_exit, exitpriority=100)


def _after_multiprocessing_fork(probe: object) -> None:
    # multiprocessing clears its finalizers in a new child, then runs after-fork callbacks.
    _register_exit_flush()


def _flush_at_exit() -> None:
    from profilerd_probes import core

    probe = core.active()
    if probe is not None:
        try:
            probe.flush()
            probe.say_goodbye()
            probe.sender.finish()  # what a daemon that is still starting has not taken yet
        except Exception as exc:
            log.debug("flush at exit failed: %r", exc)


def _flushing_exit(original: Any) -> Any:
    @functools.wraps(original)
    def _exit(*args: Any, **kwargs: Any) -> Any:
        _flush_at_exit()
        return original(*args, **kwargs)

    return _exit


def _after_fork_in_child() -> None:
    from profilerd_probes import core

    probe = core.active()
    if probe is not None:
        try:
            probe.after_fork_in_child()
        except Exception as exc:
            core.disable(exc)


LAUNCHER_MODULES = ("torch.distributed.run", "torch.distributed.launch")


def is_launcher_process() -> bool:
    """True in torchrun's agent, which starts the ranks but trains nothing itself."""
    main = sys.modules.get("__main__")
    spec_name = getattr(getattr(main, "__spec__", None), "name", "") or ""
    argv0 = os.path.basename(sys.argv[0]) if sys.argv else ""
    if argv0 == "torchrun" or spec_name in LAUNCHER_MODULES:
        return True
    # While `python -m torch.distributed.run` imports torch, sys.argv[0] is "-m" and
    # __main__ has no spec yet; the interpreter's original arguments still say it.
    original = list(getattr(sys, "orig_argv", []))
    return any(a == "-m" and b in LAUNCHER_MODULES for a, b in itertools.pairwise(original))


def _share_identity_with_children() -> None:
    """Processes this one starts (torch.multiprocessing ranks) join its job, not one of their own."""
    from profilerd_probes import core

    if not os.environ.get("PROFILERD_JOB_ID"):
        ident = core.identity()
        os.environ["PROFILERD_JOB_ID"] = ident["job"]
        os.environ.setdefault("PROFILERD_RUN_ID", ident["run_id"])
