"""The `profilerd attach` command's flow, once its flags are parsed (:mod:`profilerd.cli`).

Once (``--once``, no terminal, or with ``--inject``): a status line while observing, then the
verdict on stderr and in ``--json``. On a terminal: the TUI over rolling verdicts until `q` or
the target exits. Either way an attach without probes keeps its verdict as a recording.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from profilerd.analysis.rules import RuleSet
from profilerd.attach.inject import Injection
from profilerd.attach.recording import record_attach
from profilerd.attach.sampling import L0Summary
from profilerd.attach.target import AttachError, Target, inspect_target
from profilerd.attach.verdict import document as attach_document
from profilerd.attach.watch import LiveAttach, run_attach
from profilerd.config import DaemonConfig
from profilerd.session import UsageError, write_json


@dataclass(frozen=True)
class AttachOptions:
    """What the `attach` flags ask for, checked by the CLI."""

    pid: int
    duration_s: float
    rate_hz: int
    once: bool
    json_path: Path | None
    use_stacks: bool  # L1: py-spy stack samples
    inject: bool  # L2, through sys.remote_exec or (experimental) gdb
    inject_experimental: bool
    no_inject: bool
    no_tui: bool
    daemon_flags: tuple[str, ...]  # for the daemon an injection's probes report to


def run(options: AttachOptions, config: DaemonConfig, ruleset: RuleSet) -> int:
    """Attach to ``options.pid`` and tell its verdict; a target that cannot be attached to is a UsageError."""
    try:
        target = inspect_target(options.pid)
    except AttachError as exc:
        raise UsageError(str(exc)) from exc
    started_unix_s = time.time()
    run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-attach-{options.pid}"
    wants_inject = (options.inject or options.inject_experimental) and not options.no_inject
    if _on_a_terminal(options) and not options.once and not wants_inject:
        return _live_view(options, config, ruleset, target, run_id, started_unix_s)
    print(
        f"profilerd: attaching to pid {options.pid} (Python {target.python_version}) for {options.duration_s:.0f} s…",
        file=sys.stderr,
    )
    injection = None
    if wants_inject:
        injection = Injection(target, config, list(options.daemon_flags), run_id, ruleset, options.inject_experimental)
        injection.start()
    show_status = sys.stderr.isatty() and not options.once
    try:
        result = run_attach(
            options.pid,
            options.duration_s,
            ruleset,
            use_l1=options.use_stacks,
            rate_hz=options.rate_hz,
            on_tick=_status_line(options) if show_status else None,
        )
    except AttachError as exc:
        raise UsageError(str(exc)) from exc
    finally:
        if show_status:
            sys.stderr.write("\r\x1b[2K")
    if options.no_inject:
        result.l2_note = "forbidden by --no-inject"
    document = attach_document(result, run_id)
    if injection is not None:
        document = injection.finish(document, result)
    document = record_attach(document, config, target, started_unix_s)
    from profilerd.report import render_text

    print(render_text(document), file=sys.stderr)
    for note in document.get("notes", []):
        print(f"note: {note}", file=sys.stderr)
    layer = document["attach_layer"]
    why = {k: v.get("why") for k, v in document["layers"].items() if not v.get("available")}
    print(f"attach layer {layer}" + "".join(f"; {k} unavailable: {v}" for k, v in why.items()), file=sys.stderr)
    if options.json_path is not None:
        write_json(options.json_path, document)
    return 0


def _on_a_terminal(options: AttachOptions) -> bool:
    streams = (sys.stdin, sys.stdout, sys.stderr)
    return not options.no_tui and all(s is not None and s.isatty() for s in streams)


def _status_line(options: AttachOptions) -> Callable[[L0Summary], None]:
    """What the attach shows on stderr while it observes, redrawn in place each tick."""
    width = shutil.get_terminal_size((100, 20)).columns - 1

    def show(summary: L0Summary) -> None:
        line = (
            f"profilerd attach {options.pid} ▸ {summary.seconds:.0f}/{options.duration_s:.0f} s · training thread "
            f"{min(1.0, summary.main_thread_cores):.0%} busy · {summary.workers} workers"
        )
        sys.stderr.write("\r\x1b[2K" + line[:width])
        sys.stderr.flush()

    return show


def _live_view(
    options: AttachOptions, config: DaemonConfig, ruleset: RuleSet, target: Target, run_id: str, started_unix_s: float
) -> int:
    """On a terminal, attach shows the TUI over rolling L0/L1 verdicts until `q` or the target exits."""
    from profilerd_tui.app import make_app
    from profilerd_tui.sources import AttachSource

    try:
        live = LiveAttach(options.pid, ruleset, run_id, use_l1=options.use_stacks, rate_hz=options.rate_hz)
    except AttachError as exc:
        raise UsageError(str(exc)) from exc
    live.start()
    source = AttachSource(live)
    try:
        make_app(source, exit_when=lambda: live.exited and live.document is not None).run()
    finally:
        live.stop()
    if live.document is not None:
        from profilerd.report import render_text

        document = record_attach(live.document, config, target, started_unix_s)
        print(render_text(document), file=sys.stderr)
        if options.json_path is not None:
            write_json(options.json_path, document)
    return 0
