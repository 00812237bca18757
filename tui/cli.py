"""`profilerd tui`: pick the source from the flags and run the app.

Imported lazily by ``profilerd.cli.cmd_tui`` only, so the daemon and the rest of the CLI never
load Textual.
"""

from __future__ import annotations

import argparse
import sys

from profilerd.client import ClientError, UntrustedRuntimeDir, get_json, local_daemon_url, untrusted_line
from profilerd.config import DaemonConfig
from profilerd.runtime import runtime_dir_problem
from profilerd_tui.sources import DaemonSource, PrometheusSource, ReplaySource, Source

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
        from profilerd import recordings

        try:
            path = recordings.resolve(config.runs_dir, args.replay)
        except recordings.RecordingError as exc:
            raise TuiUsageError(str(exc)) from None
        try:
            return ReplaySource(
                path,
                rules_file=config.rules_file,
                speed=args.speed,
                playing=not args.paused,
                position_s=None if args.paused else 0.0,
            )
        except ClientError as exc:
            raise TuiUsageError(str(exc)) from None
    if args.url:
        return DaemonSource(args.url, args.job)
    runtime_dir = config.runtime_dir
    problem = runtime_dir_problem(runtime_dir)
    if problem is not None:  # refused before anything is read from it
        raise TuiUsageError(untrusted_line(runtime_dir, problem))
    return DaemonSource(lambda: local_daemon_url(runtime_dir), args.job)


HOW_TO_START = (
    "  start one with `profilerd serve` (in another terminal), or train under `profilerd run -- python train.py`,\n"
    "  which starts one for the run; a daemon elsewhere: `profilerd tui --url http://HOST:9466`"
)


def daemon_problem(source: DaemonSource, config: DaemonConfig, url_flag: str | None) -> str | None:
    """Why the live view would have nothing to show: where it looked and what failed; None if a daemon answers.

    Checked once before the app starts, so a user without a daemon gets directions instead of an
    empty screen (once running, the app rides out a daemon restart by itself).
    """
    runtime_dir = config.runtime_dir
    looked = (
        f"--url {url_flag}"
        if url_flag
        else f"{runtime_dir} (daemon.lock and daemon.json of this user's daemon; its probe socket {config.socket_path})"
    )
    try:
        base = source.base_url()
    except UntrustedRuntimeDir as exc:
        return f"{exc}\n{HOW_TO_START}"
    except ClientError:
        return f"no profilerd daemon is running for this user: looked in {looked}\n{HOW_TO_START}"
    try:
        get_json(f"{base}/api/v1/jobs", source.timeout_s)
    except ClientError as exc:
        where = "" if url_flag else f", registered in {runtime_dir},"
        return f"the profilerd daemon at {base}{where} does not answer ({exc})\n{HOW_TO_START}"
    return None


def run_tui(args: argparse.Namespace, config: DaemonConfig) -> int:
    """Run the app in this terminal; 0 when the user quits, 2 for bad flags or no terminal, 1 without a daemon."""
    from profilerd_tui.app import make_app

    try:
        source = build_source(args, config)
    except TuiUsageError as exc:
        print(f"profilerd: error: {exc}", file=sys.stderr)
        return 2
    if not (sys.stdin.isatty() and sys.stderr.isatty()):
        print("profilerd: error: `profilerd tui` needs a terminal (use the /api/v1 JSON or `report`)", file=sys.stderr)
        return 2
    if isinstance(source, DaemonSource):
        problem = daemon_problem(source, config, args.url)
        if problem:
            print(f"profilerd: error: {problem}", file=sys.stderr)
            return 1
    app = make_app(source, refresh_s=args.refresh, theme=THEMES[args.theme])
    app.run()
    return app.return_code or 0
