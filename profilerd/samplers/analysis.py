"""Live analysis run as a sampler: one job per cycle, its verdict as a record for the fan-out."""

from __future__ import annotations

import time

from profilerd.analysis.live import LiveAnalyzer
from profilerd.samplers.sinks import VerdictRecord
from profilerd.store import Store

# Live analysis (pandas, holding the GIL) may take at most this share of the time: with many
# busy jobs its interval stretches, so that ingest and /metrics keep up (benchmarks/bench_soak.py:
# with 64 ranks at 100 steps/s, 0.1 gave a scrape p99 of 44-49 ms, 0.2 of 48-56 ms).
ANALYSIS_MAX_SHARE = 0.1


class AnalysisRounds:
    """Every job is analysed once per ``interval_s``, or less often under load.

    One job per cycle, so that no long burst of analysis holds up ingest or a scrape: a round
    of N jobs runs N cycles ``interval_s / N`` apart, stretched so that analysis takes no more
    than ANALYSIS_MAX_SHARE of the time (``pace()``).
    """

    def __init__(self, analyzer: LiveAnalyzer, store: Store, interval_s: float) -> None:
        self._analyzer = analyzer
        self._store = store
        self._interval_s = interval_s
        self._queue: list[str] = []  # the jobs still to analyse in this round
        self._round_size = 1
        self._next_interval_s = interval_s

    def sample(self, now_unix_s: float) -> list[VerdictRecord]:
        if not self._queue:
            self._queue.extend(sorted(self._store.job_names(), reverse=True))
            self._round_size = max(1, len(self._queue))
        started = time.monotonic()
        verdicts = self._analyzer.tick(now_unix_s, [self._queue.pop()] if self._queue else [])
        spent = time.monotonic() - started
        self._next_interval_s = max(self._interval_s / self._round_size, spent / ANALYSIS_MAX_SHARE)
        return [VerdictRecord(job, self._store.run_of(job), verdict) for job, verdict in verdicts.items()]

    def pace(self) -> float:
        """The interval until the next cycle."""
        return self._next_interval_s
