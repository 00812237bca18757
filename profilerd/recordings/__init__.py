"""Run recordings: one SQLite file per run, one writer, and one reading API.

The daemon's recorder (:mod:`.writer`) is the only code that writes a recording; everything
else reads it through the names below, which this package imports on first use, so that
`profilerd runs` (listing, pruning: sqlite3 only) never pays for pandas and the analysis:

- :mod:`.schema`: the tables, the schema version, where a run's file lives;
- :mod:`.salvage`: opening a file defensively, reading rows up to the damage (``RecordingError``);
- :mod:`.catalog`: listing and resolving runs; :mod:`.retention`: pruning them;
- :mod:`.reader`: loading one into frames (``load``, ``Recording``), its rows as typed records
  (``read_sample_rows``, ``read_verdicts``); :mod:`.multinode`: ``merge``;
- :mod:`.timeline`: time series and data quality; :mod:`.offline`: the whole-run verdict (``analyse``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from profilerd.recordings.catalog import RunSummary, list_runs, resolve, summarize
    from profilerd.recordings.multinode import estimate_clock_offset, merge
    from profilerd.recordings.offline import RunVerdict, analyse
    from profilerd.recordings.reader import (
        Recording,
        SampleRows,
        Source,
        gpu_samples,
        load,
        read_gpu_samples,
        read_sample_rows,
        read_verdicts,
    )
    from profilerd.recordings.retention import prune, select_for_pruning
    from profilerd.recordings.salvage import Damage, RecordingError, connect_readonly, schema_problem

__all__ = [
    "Damage",
    "Recording",
    "RecordingError",
    "RunSummary",
    "RunVerdict",
    "SampleRows",
    "Source",
    "analyse",
    "connect_readonly",
    "estimate_clock_offset",
    "gpu_samples",
    "list_runs",
    "load",
    "merge",
    "prune",
    "read_gpu_samples",
    "read_sample_rows",
    "read_verdicts",
    "resolve",
    "schema_problem",
    "select_for_pruning",
    "summarize",
]


_HOME = {
    **dict.fromkeys(("Damage", "RecordingError", "connect_readonly", "schema_problem"), "salvage"),
    **dict.fromkeys(("RunSummary", "list_runs", "resolve", "summarize"), "catalog"),
    **dict.fromkeys(("prune", "select_for_pruning"), "retention"),
    **dict.fromkeys(
        (
            "Recording",
            "SampleRows",
            "Source",
            "gpu_samples",
            "load",
            "read_gpu_samples",
            "read_sample_rows",
            "read_verdicts",
        ),
        "reader",
    ),
    **dict.fromkeys(("estimate_clock_offset", "merge"), "multinode"),
    **dict.fromkeys(("RunVerdict", "analyse"), "offline"),
}


def __getattr__(name: str) -> Any:
    """The reading API's names, each from its module, imported when first asked for."""
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{home}"), name)
