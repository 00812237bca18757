"""Opening a recording defensively: a read-only connection to a file that may be cut short, have
damaged pages, an unreadable write-ahead log or a newer schema, and reading its rows up to the
damage, with a note that says what is missing. Standard library only (sqlite3)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from profilerd.recordings.schema import SCHEMA_VERSION

SQLITE_MAGIC = b"SQLite format 3\x00"
CHUNK_ROWS = 65_536


class RecordingError(Exception):
    """A recording that cannot be found or read; the message is for the user."""


class Damage(str):
    """A note that says the file itself is damaged (cut short, corrupt pages), as opposed to
    parts an older schema or a killed run never had: reports flag these and exit 3."""


def _check_header(path: Path) -> None:
    if not path.is_file():
        raise RecordingError(f"no recording at {path}")
    try:
        with path.open("rb") as fh:
            head = fh.read(len(SQLITE_MAGIC))
    except OSError as exc:
        raise RecordingError(f"cannot read {path}: {exc.strerror}") from None
    if not head:
        raise RecordingError(f"{path} is empty: the run was stopped before anything was recorded")
    if head != SQLITE_MAGIC:
        raise RecordingError(f"{path} is not a profilerd recording (not an SQLite database)")


def truncation_damage(path: Path) -> Damage | None:
    """Whether the file is shorter than its own header says: a copy or a disk cut it short.

    The header's page count is only trusted when its "valid-for" counter matches the change
    counter (SQLite's rule); the write-ahead log never shrinks the main file.
    """
    try:
        with path.open("rb") as fh:
            header = fh.read(100)
        size = path.stat().st_size
    except OSError:
        return None
    if len(header) < 100:
        return Damage(f"the file is cut short: {size} bytes, less than an SQLite header")
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages = int.from_bytes(header[28:32], "big")
    if header[24:28] != header[92:96] or not pages or not page_size:
        return None
    if size < pages * page_size:
        return Damage(f"the file is cut short: {size:,} of the {pages * page_size:,} bytes its header promises")
    return None


def schema_problem(path: Path, meta: dict[str, str]) -> str | None:
    """Why this profilerd must not read a recording's schema, or None when it can."""
    version = meta.get("schema_version")
    if version is None or not version.strip().isdigit() or int(version) <= SCHEMA_VERSION:
        return None
    return (
        f"{path} was written by a newer profilerd (recording schema {version}, profilerd "
        f"{meta.get('profilerd_version', '?')}); this one reads schema {SCHEMA_VERSION} and older: "
        "upgrade profilerd (pip install -U profilerd) to read it"
    )


def open_readonly(path: Path) -> tuple[sqlite3.Connection, str | None]:
    """A read-only connection, and a note when the write-ahead log had to be ignored.

    ``mode=ro`` reads the WAL of a live or killed daemon (the last quarter second of rows);
    where that is impossible (a read-only copy without its -shm file), ``immutable=1`` still
    reads what was checkpointed.
    """
    _check_header(path)
    uri = path.resolve().as_uri()
    try:
        conn = _connect(f"{uri}?mode=ro")
        return conn, None
    except sqlite3.OperationalError as first:
        try:
            conn = _connect(f"{uri}?immutable=1")
        except sqlite3.DatabaseError:
            raise RecordingError(f"{path} is not a readable profilerd recording: {first}") from None
        return conn, f"the write-ahead log could not be read ({first}); rows of the last moments may be missing"
    except sqlite3.DatabaseError as exc:
        raise RecordingError(f"{path} is not a readable profilerd recording: {exc}") from None


def _connect(uri: str) -> sqlite3.Connection:
    """Open and read the schema. ``writable_schema`` (harmless on a read-only connection) lets
    SQLite open a file shorter than its header says, a truncated copy, instead of refusing it
    whole; the missing pages then surface as errors in the tables that used them."""
    conn = sqlite3.connect(uri, uri=True)
    try:
        conn.execute("PRAGMA writable_schema = ON")
        conn.execute("SELECT name FROM sqlite_master").fetchall()
    except sqlite3.DatabaseError:
        conn.close()
        raise
    return conn


def table_names(conn: sqlite3.Connection) -> set[str]:
    return {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def connect_readonly(path: Path) -> sqlite3.Connection:
    """A read-only connection to a file that has a profilerd table; RecordingError otherwise."""
    conn, _ = open_readonly(path)
    try:
        tables = table_names(conn)
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise RecordingError(f"{path} is not a readable profilerd recording: {exc}") from None
    if not tables & {"meta", "steps"}:
        conn.close()
        raise RecordingError(f"{path} is not a profilerd recording (no meta or steps table)")
    return conn


def read_chunks(conn: sqlite3.Connection, sql: str, table: str, notes: list[str]) -> Iterator[list[tuple[Any, ...]]]:
    """Rows in chunks; a damaged page ends the table with a note instead of an exception."""
    read = 0
    try:
        cursor = conn.execute(sql)
        while rows := cursor.fetchmany(CHUNK_ROWS):
            read += len(rows)
            yield rows
    except sqlite3.DatabaseError as exc:
        # The failed chunk is lost with the cursor: read it again one row at a time, up to the
        # damaged page (the scan order of the same query is the same).
        salvaged: list[tuple[Any, ...]] = []
        try:
            cursor = conn.execute(f"{sql} LIMIT -1 OFFSET {read}")
            while (row := cursor.fetchone()) is not None:
                salvaged.append(row)
        except sqlite3.DatabaseError:
            pass  # the damaged page again: everything before it is salvaged
        if salvaged:
            read += len(salvaged)
            yield salvaged
        notes.append(Damage(f"table {table} is damaged: read {read:,} rows, then '{exc}'; later rows are missing"))


def read_meta(conn: sqlite3.Connection, notes: list[str]) -> dict[str, str]:
    meta: dict[str, str] = {}
    for rows in read_chunks(conn, "SELECT key, value FROM meta", "meta", notes):
        meta.update({str(k): str(v) for k, v in rows})
    return meta
