"""Keeping an attach's verdict: without probes (L0/L1) no daemon records the attach, so its
verdict is written as a recording of its own that `report` and `runs` find."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

from profilerd import __version__
from profilerd.attach.target import Target
from profilerd.config import DaemonConfig
from profilerd.model import VERDICT_TABLE, RecordedVerdict
from profilerd.recordings.writer import open_recording, recording_file


def save_recording(doc: dict[str, Any], target: Target, runs_dir: Path, started_unix_s: float) -> Path:
    """Keep an attach verdict (L0/L1: no steps) as a recording under its run id, so that
    `profilerd report ID` and `profilerd runs` find it; the verdict is stored in the meta table."""

    runs_dir.mkdir(parents=True, exist_ok=True)
    path = recording_file(runs_dir, doc["run_id"])
    ended = time.time()
    meta = {
        "schema_version": "1",
        "run_id": doc["run_id"],
        "job": doc["job"],
        "profilerd_version": __version__,
        "state": "closed",
        "started_unix_s": repr(started_unix_s),
        "ended_unix_s": repr(ended),
        "attach_layer": doc["attach_layer"],
        "attach_verdict": json.dumps({**doc, "recording": str(path)}),
    }
    conn = open_recording(path)
    try:
        with conn:
            conn.execute("BEGIN")
            conn.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", sorted(meta.items()))
            conn.execute(
                "INSERT INTO sessions VALUES (?,?,?,?,?,?,?,?)",
                (target.pid, 0, 0, 1, os.uname().nodename, json.dumps(list(target.cmdline)), started_unix_s, None),
            )
            verdict = RecordedVerdict(ended, doc["job"], doc["primary"], doc["severity"], doc)
            conn.execute(VERDICT_TABLE.insert(), VERDICT_TABLE.row(verdict))
    finally:
        conn.close()
    return path


def record_attach(document: dict[str, Any], config: DaemonConfig, target: Target, started_s: float) -> dict[str, Any]:
    """An attach without probes leaves a recording of its verdict (L2's steps are recorded by the daemon)."""
    if document.get("recording") or not config.record:
        return document
    try:
        path = save_recording(document, target, config.runs_dir, started_s)
    except (OSError, sqlite3.Error) as exc:
        return {**document, "notes": [*document["notes"], f"could not record the verdict: {exc}"]}
    return {**document, "recording": str(path)}
