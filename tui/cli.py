"""`profilerd tui`: pick the source from the flags and run the app.

Imported lazily by ``profilerd.cli.cmd_tui`` only, so the daemon and the rest of the CLI never
load Textual.
"""

from __future__ import annotations

import argparse
import sys

from profilerd.config import DaemonConfig
from profilerd_tui.sources import DaemonSource, PrometheusSource, ReplaySource, Source, SourceError, local_daemon_url

THEMES = {"dark": "textual-dark", "light": "textual-light"}


class TuiUsageError(Exception):
    """Bad flags for `profilerd tui`; the CLI prints it and exits with 2."""


def build_source(args: argparse.Namespace, config: DaemonConfig) -> Source:
    if args.prometheus and args.replay:
        raise TuiUsageError("--prometheus and --replay cannot be combined")
    if args.prometheus:
        if not args.job:
            raise TuiUsageError("--prometheus needs --job: the job to show")
        return PrometheusSource(args.prometheus, args.job)
    if args.replay:
        from profilerd import runs

        try:
            path = runs.resolve(config.runs_dir, args.replay)
        except runs.RecordingError as exc:
            raise TuiUsageError(str(exc)) from None
        try:
            return ReplaySource(
                path,
                rules_file=config.rules_file,
                speed=args.speed,
                playing=not args.paused,
                position_s=None if args.paused else 0.0,
            )
        except SourceError as exc:
            raise TuiUsageError(str(exc)) from None
    if args.url:
        return DaemonSource(args.url, args.job)
    runtime_dir = config.runtime_dir
    return DaemonSource(lambda: local_daemon_url(runtime_dir), args.job)


def run_tui(args: argparse.Namespace, config: DaemonConfig) -> int:
    """Run the app in this terminal; 0 when the user quits, 2 for bad flags or no terminal."""
    from profilerd_tui.app import make_app

    if not (sys.stdin.isatty() and sys.stderr.isatty()):
        print("profilerd: error: `profilerd tui` needs a terminal (use the /api/v1 JSON or `report`)", file=sys.stderr)
        return 2
    try:
        source = build_source(args, config)
    except TuiUsageError as exc:
        print(f"profilerd: error: {exc}", file=sys.stderr)
        return 2
    app = make_app(source, refresh_s=args.refresh, theme=THEMES[args.theme])
    app.run()
    return app.return_code or 0
