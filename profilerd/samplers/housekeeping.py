"""The daemon's periodic chores, run as a sampler: runs left without a run_end are ended, and a
tuned daemon collects its garbage in full once a minute."""

from __future__ import annotations

import gc
import time
from pathlib import Path

from profilerd.runtime import leased_run_ids
from profilerd.samplers.sinks import EndedRun
from profilerd.store import Store

# A run whose processes are all gone is closed after this long without a run_end message.
ORPHAN_GRACE_S = 3.0
# With the daemon's raised collection thresholds (profilerd.daemon.GC_THRESHOLDS) full
# collections are left to this loop, so that none lands in a scrape.
FULL_GC_INTERVAL_S = 60.0


class Housekeeping:
    def __init__(self, store: Store, runtime_dir: Path) -> None:
        self._store = store
        self._runtime_dir = runtime_dir
        self.full_collections = False  # set by a daemon that raised the gc thresholds
        self._next_full_gc = time.monotonic() + FULL_GC_INTERVAL_S

    def sample(self, now_unix_s: float) -> list[EndedRun]:
        """The runs ended now because their processes are all gone (killed, or not under `run`)."""
        if self.full_collections and time.monotonic() >= self._next_full_gc:
            self._next_full_gc = time.monotonic() + FULL_GC_INTERVAL_S
            gc.collect()
        store = self._store
        announced = leased_run_ids(self._runtime_dir)  # their `profilerd run` sends run_end
        ended = []
        for run_id, clean in store.orphaned_runs(announced, time.time(), ORPHAN_GRACE_S):
            run = store.end_run(run_id, None if clean else -1, aborted=not clean)
            ended.append(EndedRun(run, run.exit_code))
        return ended
