"""Pruning: which recordings are old enough to delete, and deleting them (never one still written)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from profilerd.recordings.catalog import RunSummary, list_runs, seconds_untouched

# A 'running' recording untouched this long lost its daemon and may be pruned like any other.
STALE_RUNNING_S = 3600.0


def _abandoned(run: RunSummary, now: float) -> bool:
    """A 'running' recording nobody has written for an hour: its daemon was killed."""
    return seconds_untouched(run.path, now) > STALE_RUNNING_S


def select_for_pruning(
    runs: Sequence[RunSummary], older_than_s: float | None = None, keep: int | None = None, now: float | None = None
) -> list[RunSummary]:
    """Runs older than ``older_than_s`` or beyond the newest ``keep``.

    A recording marked 'running' is kept while it may still be written (the daemon commits
    every quarter second and samples the host every second); one untouched for an hour was
    left behind by a killed daemon and is pruned like any other.
    """
    now = time.time() if now is None else now
    # A file this profilerd cannot read (empty, garbage, a newer schema) is never pruned: it may
    # be a recording just being created, or one a newer profilerd still reads.
    readable = [r for r in runs if r.problem is None]
    finished = [r for r in readable if (r.state != "running" and not r.writer_gone) or _abandoned(r, now)]
    doomed = []
    for index, run in enumerate(finished):
        when = run.ended_unix_s or run.last_step_unix_s or run.started_unix_s or now
        too_old = older_than_s is not None and when < now - older_than_s
        beyond = keep is not None and index >= keep
        if too_old or beyond:
            doomed.append(run)
    return doomed


def prune(
    runs_dir: Path, older_than_s: float | None = None, keep: int | None = None, dry_run: bool = False
) -> list[Path]:
    """Delete recordings older than ``older_than_s`` and beyond the newest ``keep``.

    A recording still being written is never deleted (see :func:`select_for_pruning`).
    """
    doomed = select_for_pruning(list_runs(runs_dir), older_than_s, keep)
    removed = []
    for run in doomed:
        if not dry_run:
            for path in (run.path, Path(f"{run.path}-wal"), Path(f"{run.path}-shm")):
                if path.exists():
                    path.unlink()
        removed.append(run.path)
    return removed
