"""Reports of recordings: `profilerd report` and `diff` in every format (text, JSON, HTML, Markdown).

The renderers live in this package (:mod:`.text`, :mod:`.html`, :mod:`.markdown`, :mod:`.diff`,
drawing with :mod:`.charts`); the functions here choose among them, so the CLI only parses
flags and prints. Reports only read: recordings through :mod:`profilerd.recordings`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from profilerd import recordings
from profilerd.report.text import (
    render_device,
    render_findings,
    render_quality,
    render_text,
    render_timeline,
)

if TYPE_CHECKING:
    from profilerd.analysis.rules import RuleSet
    from profilerd.recordings.reader import Recording

# `report` and `diff` exit with this when a recording is damaged (cut short, corrupt pages):
# the output shows what could be read, and scripts can tell it from a clean report (0) and
# from a file that is no recording at all, or a newer schema (2).
EXIT_DAMAGED = 3


FORMATS = ("text", "html", "md", "json")
_SUFFIX_FORMATS = {".html": "html", ".htm": "html", ".md": "md", ".markdown": "md", ".json": "json", ".txt": "text"}


def output_format(requested: str | None, output: Path | None) -> str:
    """--format if given, else what the output file's suffix says, else text."""
    if requested:
        return requested
    if output is not None:
        return _SUFFIX_FORMATS.get(output.suffix.lower(), "text")
    return "text"


def verdict_document(recording: Recording, ruleset: RuleSet) -> dict[str, Any]:
    """The verdict JSON of a recording, exactly as `profilerd run --json` writes it for that run."""
    attached = recording.meta.get("attach_verdict")
    if attached and recording.steps.empty:  # `attach` without probes: its verdict rests on samples, not steps
        return json.loads(attached)
    verdict = recordings.analyse(recording, ruleset)
    exit_code = recording.meta.get("exit_code")
    damaged = (
        {"damaged": list(recording.damage)} if recording.damage else {}
    )  # only then: clean documents keep their shape
    return verdict.to_json(
        recording.run_id,
        recording.job,
        recording=str(recording.path),
        exit_code=int(exit_code) if exit_code not in (None, "None", "") and exit_code.lstrip("-").isdigit() else None,
        **damaged,
    )


def exit_status(*read: Recording) -> int:
    """0, or EXIT_DAMAGED when any recording a report or diff read is damaged."""
    return EXIT_DAMAGED if any(recording.damage for recording in read) else 0


def load_merged(paths: Sequence[Path]) -> Recording:
    """One recording, or several nodes of one job merged with aligned clocks (RecordingError if not)."""
    loaded = [recordings.load(path) for path in paths]
    return recordings.merge(loaded) if len(loaded) > 1 else loaded[0]


def build_report(paths: Sequence[Path], ruleset: RuleSet, fmt: str) -> str:
    """`profilerd report` in any format; raises RecordingError for what is not a recording."""
    return render_report(load_merged(paths), ruleset, fmt)


def render_report(recording: Recording, ruleset: RuleSet, fmt: str) -> str:
    """The report of a loaded recording in any format."""
    from profilerd.recordings import timeline

    document = verdict_document(recording, ruleset)
    if fmt == "json":
        return json.dumps(document, indent=2) + "\n"
    if fmt == "text":
        return (
            render_text(document)
            + render_device(document)
            + render_findings(document)
            + render_timeline(document)
            + render_quality(document)
            + "\n"
        )
    data = timeline.report_data(recording, document, ruleset.warmup_steps)
    if fmt == "md":
        from profilerd.report.markdown import render_markdown

        return render_markdown(data)
    from profilerd.report.html import render_html

    return render_html(data)


def build_diff(
    path_a: Path, path_b: Path, ruleset: RuleSet, fmt: str, applied: Sequence[str] = (), force: bool = False
) -> str:
    """`profilerd diff` in any format; raises RecordingError for what is not a recording."""
    return render_diff(recordings.load(path_a), recordings.load(path_b), ruleset, fmt, applied, force)


def render_diff(
    a: Recording, b: Recording, ruleset: RuleSet, fmt: str, applied: Sequence[str] = (), force: bool = False
) -> str:
    """The diff of two loaded recordings in any format."""
    from profilerd.report import diff

    document = diff.compare(
        a,
        verdict_document(a, ruleset),
        b,
        verdict_document(b, ruleset),
        ruleset.warmup_steps,
        list(applied) or None,
        force,
    )
    if fmt == "json":
        return json.dumps(document, indent=2) + "\n"
    if fmt == "md":
        return diff.render_markdown(document)
    if fmt == "html":
        return diff.render_html(document)
    return diff.render_text(document)
