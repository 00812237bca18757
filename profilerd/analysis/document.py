"""Reading a ``profilerd.verdict/v1`` document: its headline, its evidence sentence, its straggler.

The document is written once: by ``Verdict.to_json``, or by ``no_steps`` for a run with no step
to judge, both starting with ``head``; the report, the TUI and `diff` read what
it says through these functions instead of each re-deriving it. Standard library only, so the
TUI can read a daemon's verdict without loading pandas.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypedDict

SCHEMA = "profilerd.verdict/v1"
STRAGGLER_RULE = "communication.straggler"
HEADLINES = {
    "data": "DATA-BOUND",
    "compute": "COMPUTE-BOUND",
    "communication": "COMMUNICATION-BOUND",
    "algorithm": "ALGORITHM",
    "none": "NO VERDICT YET",
}


NO_STEPS_ERROR = "no training steps were recorded"


class Head(TypedDict):
    """The fields every verdict document starts with, in this order."""

    schema: str
    run_id: str
    job: str
    primary: str


class NoStepsDocument(Head):
    """The whole document of a run that recorded no step."""

    steps: int
    error: str
    exit_code: int


def head(run_id: str, job: str | None, primary: str) -> Head:
    """The head of a verdict document (``job`` defaults to the run)."""
    return {"schema": SCHEMA, "run_id": run_id, "job": job or run_id, "primary": primary}


def no_steps(run_id: str, job: str, exit_code: int) -> NoStepsDocument:
    """The document of a run that recorded no step: nothing was judged, and it says why. Built
    here, without the analysis, so that `run` writes it without importing pandas."""
    return {**head(run_id, job, "none"), "steps": 0, "error": NO_STEPS_ERROR, "exit_code": exit_code}


def headline(primary: str) -> str:
    return HEADLINES.get(primary, primary.upper())


def headline_of(document: Mapping[str, Any]) -> str:
    """The headline a verdict document's summary starts with."""
    return headline(str(document.get("primary", "none")))


def statement_of(document: Mapping[str, Any]) -> str:
    """The summary's evidence sentence, without the headline the verdict put in front of it."""
    return without_headline(str(document.get("summary", "")), headline_of(document))


def without_headline(summary: str, headline_text: str) -> str:
    prefix = f"{headline_text}: "  # as the verdict writes its summary; "not enough evidence" has none
    return summary[len(prefix) :] if summary.startswith(prefix) else summary


def straggler_of(document: Mapping[str, Any]) -> int | None:
    """The rank the verdict's straggler finding names, or None."""
    for finding in document.get("findings") or ():
        if finding.get("rule") == STRAGGLER_RULE:
            return int(finding["metrics"]["straggler_rank"])
    return None
