"""Recordings of one job from several nodes as one, each node's clock aligned to rank 0's."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd

from profilerd.recordings.reader import Recording, Source
from profilerd.recordings.salvage import RecordingError


def estimate_clock_offset(reference: pd.DataFrame, other: pd.DataFrame) -> tuple[float, float] | None:
    """Seconds to add to ``other``'s clock to match ``reference``'s, and the alignment's spread.

    Synchronous data-parallel ranks finish step N together (the gradient all-reduce is a
    barrier), so the median difference of per-step end times over the steps both recordings
    saw is the offset between the two nodes' clocks; the median absolute deviation around it
    says how well the steps lined up. None when they share fewer than 3 steps.
    """
    a = reference.groupby("step")["end_unix_s"].median()
    b = other.groupby("step")["end_unix_s"].median()
    common = a.index.intersection(b.index)
    if len(common) < 3:
        return None
    differences = a.loc[common].to_numpy() - b.loc[common].to_numpy()
    offset = float(np.median(differences))
    return offset, float(np.median(np.abs(differences - offset)))


def _shift(frame: pd.DataFrame, column: str, offset: float) -> pd.DataFrame:
    if offset == 0.0 or frame.empty:
        return frame
    return frame.assign(**{column: frame[column] + offset})


def merge(recordings: Sequence[Recording]) -> Recording:
    """Recordings of one job from several nodes as one, with every clock aligned to rank 0's node.

    Refuses recordings of different jobs or with ranks in common: those are not the nodes of
    one run, and aligning their clocks by step would produce a confident-looking fiction.
    """
    if len(recordings) == 1:
        return recordings[0]
    jobs = sorted({r.job for r in recordings})
    if len(jobs) > 1:
        raise RecordingError(
            f"these recordings belong to different jobs ({', '.join(jobs)}): `report` merges the nodes of one job "
            "(give every node the same PROFILERD_JOB_ID, as torchrun's TORCHELASTIC_RUN_ID does)"
        )
    seen: dict[int, str] = {}
    for recording in recordings:
        for rank in recording.sources[0].ranks if recording.sources else ():
            if rank in seen:
                raise RecordingError(
                    f"rank {rank} is in both {seen[rank]} and {recording.run_id}: these are not different nodes of "
                    "one run (a restarted job is reported one recording at a time)"
                )
            seen[rank] = recording.run_id
    ordered = sorted(recordings, key=lambda r: min(r.sources[0].ranks) if r.sources and r.sources[0].ranks else 1 << 30)
    reference = ordered[0]
    notes: list[str] = []
    sources: list[Source] = []
    parts: dict[str, list[pd.DataFrame]] = {
        k: [] for k in ("steps", "hosts", "processes", "sessions", "gpus", "events")
    }
    configs: list[dict[str, Any]] = []
    for index, recording in enumerate(ordered):
        source = recording.sources[0] if recording.sources else Source(recording.run_id, recording.path, "", "", ())
        offset, residual = 0.0, None
        if index > 0:
            estimate = estimate_clock_offset(reference.steps, recording.steps)
            if estimate is None:
                notes.append(
                    f"{recording.run_id}: no steps in common with {reference.run_id}, so its clock could not be "
                    "aligned; its timestamps are used as recorded"
                )
            else:
                offset, residual = estimate
        else:
            residual = 0.0
        sources.append(replace(source, clock_offset_s=offset, clock_residual_s=residual))
        notes.extend(type(note)(f"{recording.run_id}: {note}") for note in recording.notes)
        node = source.hostname or f"node{index}"
        parts["steps"].append(_shift(recording.steps, "end_unix_s", offset))
        parts["hosts"].append(_shift(recording.hosts, "ts_unix_s", offset))
        parts["processes"].append(_shift(recording.processes, "ts_unix_s", offset))
        parts["sessions"].append(_shift(recording.sessions, "started_unix_s", offset))
        parts["gpus"].append(_shift(recording.gpus, "ts_unix_s", offset).assign(node=node))
        parts["events"].append(_shift(recording.events, "ts_unix_s", offset).assign(node=node))
        configs.extend(recording.configs)

    def joined(name: str, sort_by: str | None) -> pd.DataFrame:
        frames = [f for f in parts[name] if not f.empty]
        if not frames:
            return parts[name][0]
        frame = pd.concat(frames, ignore_index=True)
        return frame.sort_values(sort_by, kind="stable", ignore_index=True) if sort_by else frame

    meta = dict(reference.meta)
    meta["merged_run_ids"] = ",".join(r.run_id for r in ordered)
    states = {r.state for r in ordered}
    meta["state"] = reference.state if len(states) == 1 else ",".join(sorted(states))
    return Recording(
        path=reference.path,
        meta=meta,
        steps=joined("steps", "end_unix_s"),
        configs=configs,
        hosts=joined("hosts", "ts_unix_s"),
        processes=joined("processes", "ts_unix_s"),
        sessions=joined("sessions", None),
        gpus=joined("gpus", "ts_unix_s"),
        events=joined("events", "ts_unix_s"),
        notes=tuple(notes),
        sources=tuple(sources),
    )
