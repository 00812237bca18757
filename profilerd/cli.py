"""The `profilerd` command line: serve, run, demo, report, diff, runs, doctor, attach, tui, dashboards.

Exit codes: 0 success, 2 usage or configuration errors (with a message naming the problem),
1 other failures, 3 `report`/`diff` of a damaged recording (what could be read is still shown),
141 when stdout is a pipe closed early; `run` and `demo` exit with the training command's own exit
code, or die by the signal that killed it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

# Only what every command needs: `--help`, `runs`, `doctor` and the `run` wrapper must start fast,
# so the analysis (pandas), the TUI (textual) and the exporters are imported by the commands
# that use them (issue 17; tests/test_launch.py checks `--help`).
from profilerd import __version__, session
from profilerd.config import ATTACH_RATE_HZ, DaemonConfig, load
from profilerd.demo import DEMO_SECONDS
from profilerd.runtime import import_yielding_the_cpu
from profilerd.session import UsageError, check_output_path

if TYPE_CHECKING:
    from profilerd.analysis.rules import RuleSet
    from profilerd.recordings.reader import Recording

log = logging.getLogger("profilerd")

EXIT_USAGE = 2
EXIT_CLOSED_PIPE = 128 + 13  # SIGPIPE


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"profilerd: error: {message}\n")


def _daemon_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("daemon")
    group.add_argument("--config", type=Path, help="TOML config file (default: $PROFILERD_CONFIG)")
    group.add_argument("--host", dest="http_host", help="HTTP address (default 127.0.0.1)")
    group.add_argument("--port", dest="http_port", type=int, help="HTTP port (default 9466; 0 = any free port)")
    group.add_argument("--socket", dest="socket_path", help="probe socket path")
    group.add_argument("--data-dir", dest="data_dir", help="where recordings go (default ~/.local/share/profilerd)")
    group.add_argument("--rules", dest="rules_file", help="rules file overriding thresholds")
    group.add_argument("--gpu", dest="gpu_backend", choices=["auto", "nvml", "none"], help="GPU backend")
    group.add_argument("--no-record", dest="record", action="store_false", default=None, help="do not write recordings")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="profilerd", description="GPU telemetry and bottleneck profiler for PyTorch training.")
    parser.add_argument("--version", action="version", version=f"profilerd {__version__}")
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    serve = sub.add_parser("serve", help="run the daemon in the foreground")
    _daemon_flags(serve)
    serve.add_argument("--for-runs", action="store_true", help=argparse.SUPPRESS)  # started by `run`

    run = sub.add_parser(
        "run", help="run a training command under profilerd", usage="profilerd run [options] -- CMD [ARGS...]"
    )
    _daemon_flags(run)
    run.add_argument("--json", dest="json_path", type=Path, help="also write the verdict JSON here")
    run.add_argument("--no-status", action="store_true", help="no live status line")
    run.add_argument("--no-tui", action="store_true", help="on a terminal, the plain status line instead of the TUI")
    run.add_argument("cmd", nargs=argparse.REMAINDER, help="the training command, after --")

    demo = sub.add_parser("demo", help="run a bundled CPU job with a starved input pipeline")
    _daemon_flags(demo)
    demo.add_argument("--seconds", type=float, default=DEMO_SECONDS, help="how long the demo trains")
    demo.add_argument("--json", dest="json_path", type=Path)
    demo.add_argument("--no-status", action="store_true")
    demo.add_argument("--no-tui", action="store_true", help="the plain status line instead of the TUI")

    report = sub.add_parser("report", help="the diagnostic report of a recorded run (text, HTML, Markdown, JSON)")
    report.add_argument(
        "run", nargs="+", help="run id (or a unique prefix, 'latest', or a .sqlite path); several: nodes of one job"
    )
    report.add_argument("--format", choices=["text", "html", "md", "json"], help="default: from -o's suffix, else text")
    report.add_argument("-o", "--output", type=Path, help="write to this file instead of stdout")
    report.add_argument("--data-dir", dest="data_dir")
    report.add_argument("--rules", dest="rules_file")

    diff = sub.add_parser("diff", help="compare two runs: speedup with a confidence interval, shifts, verdicts")
    diff.add_argument("run_a", help="the run before the change (id, prefix, 'latest' or .sqlite path)")
    diff.add_argument("run_b", help="the run after the change")
    diff.add_argument("--format", choices=["text", "html", "md", "json"], help="default: from -o's suffix, else text")
    diff.add_argument("-o", "--output", type=Path, help="write to this file instead of stdout")
    diff.add_argument(
        "--applied",
        action="append",
        default=[],
        metavar="ID",
        help="the recommendation applied between the runs (default: read from the config changes)",
    )
    diff.add_argument(
        "--force", action="store_true", help="state a speedup even when A and B are different jobs (other model, ...)"
    )
    diff.add_argument("--data-dir", dest="data_dir")
    diff.add_argument("--rules", dest="rules_file")

    runs = sub.add_parser("runs", help="list recordings, or prune them")
    runs.add_argument("--json", action="store_true", help="machine-readable list")
    runs.add_argument("--data-dir", dest="data_dir")
    runs.add_argument("--older-than", help="prune runs older than this (e.g. 7d, 12h, 30m)")
    runs.add_argument("--keep", type=int, help="prune all but the newest N runs")
    runs.add_argument("--dry-run", action="store_true", help="with --older-than/--keep: list, do not delete")

    sub.add_parser("doctor", help="what profilerd can see on this machine (GPUs, capabilities)")

    dashboards = sub.add_parser(
        "dashboards", help="write the Grafana dashboards, Prometheus rules and alerts, and the systemd unit"
    )
    dashboards.add_argument("--out", type=Path, required=True, help="the folder to write them into")
    dashboards.add_argument(
        "--runbook-base",
        metavar="URL",
        help="where docs/alerts.md is published, for the alerts' runbook_url (default: the project's repository)",
    )

    attach = sub.add_parser("attach", help="diagnose a training process that is already running")
    _daemon_flags(attach)
    attach.add_argument("pid", type=int, help="the training process")
    attach.add_argument("--duration", type=float, default=8.0, help="seconds to observe (default 8)")
    attach.add_argument("--once", action="store_true", help="one verdict after --duration, then exit")
    attach.add_argument("--json", dest="json_path", type=Path, help="write the verdict JSON here")
    attach.add_argument(
        "--rate", type=int, default=ATTACH_RATE_HZ, help=f"stack samples per second for L1 (default {ATTACH_RATE_HZ})"
    )
    attach.add_argument("--no-stacks", action="store_true", help="L0 only: no py-spy stack sampling")
    attach.add_argument("--inject", action="store_true", help="L2: install the probes in the target (Python >= 3.14)")
    attach.add_argument(
        "--inject-experimental",
        action="store_true",
        help="L2 on older Pythons through gdb: EXPERIMENTAL, may stall the target",
    )
    attach.add_argument("--no-inject", action="store_true", help="never inject, whatever else is asked")
    attach.add_argument("--no-tui", action="store_true", help="a status line instead of the live view")

    tui = sub.add_parser("tui", help="live terminal UI: a job on the local daemon, a recording, or Prometheus")
    tui.add_argument("--job", help="the job to watch (default: the newest running job)")
    tui.add_argument("--url", help="daemon URL (default: this user's running daemon)")
    tui.add_argument("--replay", metavar="RUN", help="play a recording (id, prefix, 'latest' or a .sqlite path)")
    tui.add_argument("--speed", type=float, choices=[1.0, 4.0, 16.0], default=1.0, help="replay speed")
    tui.add_argument("--paused", action="store_true", help="replay: start paused at the end of the run")
    tui.add_argument("--prometheus", metavar="URL", help="read the job from this Prometheus server (needs --job)")
    tui.add_argument("--refresh", type=float, help="seconds between updates (default 1; replay 0.5; Prometheus 5)")
    tui.add_argument("--theme", choices=["dark", "light"], default="dark")
    tui.add_argument("--config", type=Path, help="TOML config file (default: $PROFILERD_CONFIG)")
    tui.add_argument("--data-dir", dest="data_dir", help="where recordings are")
    tui.add_argument("--rules", dest="rules_file", help="rules file for replayed verdicts")
    return parser


# ---- shared helpers ------------------------------------------------------------------------
def _config(args: argparse.Namespace) -> DaemonConfig:
    keys = ("http_host", "http_port", "socket_path", "data_dir", "rules_file", "gpu_backend", "record")
    overrides = {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}
    config, problems = load(getattr(args, "config", None), overrides)
    if problems:
        raise UsageError("invalid configuration:\n  " + "\n  ".join(problems))
    return config


def _rules(config: DaemonConfig) -> RuleSet:
    from profilerd.analysis.rules import load_rules

    ruleset, problems = load_rules(config.rules_file)
    if problems:
        raise UsageError("invalid rules:\n  " + "\n  ".join(problems))
    return ruleset


def _rules_loader(config: DaemonConfig) -> Callable[[], RuleSet]:
    """For `run`: a rules file is read (and refused) before the training starts; the default
    rules, which need the analysis (pandas), are loaded while it runs."""
    if config.rules_file is not None:
        ruleset = _rules(config)
        return lambda: ruleset
    return lambda: _rules(config)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="profilerd: %(levelname)s %(message)s",
        stream=sys.stderr,
    )


def _duration_s(text: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhdw]?)", text.strip())
    if not match:
        raise UsageError(f"cannot read duration {text!r}: use e.g. 30m, 12h, 7d")
    scale = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[match.group(2)]
    return float(match.group(1)) * scale


# ---- serve -------------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    """A daemon for runs ingests first, with light imports only, then imports the rest at low
    priority: the probes' first records land while it does (profilerd.daemon)."""
    from profilerd.daemon import SERVING_MODULES, Daemon, DaemonError

    config = _config(args)
    ruleset = None if args.for_runs else _rules(config)  # a bad rules file: refused before anything starts
    daemon = Daemon(config, ruleset)
    daemon.catch_signals()  # a SIGTERM from here on still flushes and exits 0
    try:
        daemon.start_ingest()
        if args.for_runs:
            import_yielding_the_cpu(*SERVING_MODULES)
            try:
                daemon.ruleset = _rules(config)
            except UsageError:
                daemon.stop()
                raise
        daemon.start_serving(any_port_fallback=args.for_runs)
    except DaemonError as exc:
        print(f"profilerd: {exc}", file=sys.stderr)
        return 1
    host, port = daemon.http_address
    gpu_note = "" if daemon.store.gpu_available else f" (no-GPU mode: {daemon.store.gpu_unavailable_reason})"
    print(
        f"profilerd {__version__} serving http://{host}:{port}/metrics, probes on {config.socket_path}{gpu_note}",
        file=sys.stderr,
        flush=True,
    )
    return daemon.serve_until_signal(for_runs=args.for_runs)


# ---- run / demo ----------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    """`run` and `demo` return the training's exit code, or -N when it died by signal N."""
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise UsageError("no command to run: use `profilerd run -- python train.py`")
    config = _config(args)
    return session.run_command(cmd, args, config, _rules_loader(config))


def cmd_demo(args: argparse.Namespace) -> int:
    config = _config(args)
    print(
        f"profilerd demo: training a small model whose input pipeline is too slow ({args.seconds:.0f} s)…",
        file=sys.stderr,
    )
    cmd = [sys.executable, "-m", "profilerd.demo.starved", "--seconds", str(args.seconds)]
    return session.run_command(cmd, args, config, _rules_loader(config))


# ---- report / runs / doctor ----------------------------------------------------------------
def _write_output(output: str, path: Path | None) -> None:
    if path is None:
        sys.stdout.write(output)
        return
    try:
        path.write_text(output)
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror}") from exc


def cmd_report(args: argparse.Namespace) -> int:
    from profilerd import recordings as runs
    from profilerd import report

    config = _config(args)
    ruleset = _rules(config)
    try:
        paths = [runs.resolve(config.runs_dir, reference) for reference in args.run]
        recording = report.load_merged(paths)
        output = report.render_report(recording, ruleset, report.output_format(args.format, args.output))
    except runs.RecordingError as exc:
        raise UsageError(str(exc)) from exc
    _write_output(output, args.output)
    return _damage_status(recording)


def _damage_status(*recordings: Recording) -> int:
    """Exit 3, with one line on stderr, when a recording read is damaged (docs/reports.md)."""
    from profilerd import report

    for recording in recordings:
        for damage in recording.damage:
            print(f"profilerd: warning: {recording.path} is damaged: {damage}", file=sys.stderr)
    return report.exit_status(*recordings)


def cmd_diff(args: argparse.Namespace) -> int:
    from profilerd import recordings as runs
    from profilerd import report

    config = _config(args)
    ruleset = _rules(config)
    try:
        a = runs.load(runs.resolve(config.runs_dir, args.run_a))
        b = runs.load(runs.resolve(config.runs_dir, args.run_b))
        fmt = report.output_format(args.format, args.output)
        output = report.render_diff(a, b, ruleset, fmt, args.applied, args.force)
    except runs.RecordingError as exc:
        raise UsageError(str(exc)) from exc
    _write_output(output, args.output)
    return _damage_status(a, b)


def cmd_runs(args: argparse.Namespace) -> int:
    from profilerd import recordings as runs  # the listing only: no pandas

    config = _config(args)
    if args.older_than is not None or args.keep is not None:
        if args.keep is not None and args.keep < 0:
            raise UsageError("--keep must be 0 or more")
        older = _duration_s(args.older_than) if args.older_than else None
        removed = runs.prune(config.runs_dir, older_than_s=older, keep=args.keep, dry_run=args.dry_run)
        if args.dry_run:
            print(f"would remove {len(removed)} recording(s)" + "".join(f"\n  {p}" for p in removed))
        else:
            print(f"removed {len(removed)} recording(s)")
        return 0
    if args.dry_run:
        raise UsageError("--dry-run goes with --older-than or --keep")
    listing = runs.list_runs(config.runs_dir)
    if args.json:
        print(json.dumps([r.to_json() for r in listing], indent=2))
        return 0
    if not listing:
        print(f"no recordings in {config.runs_dir}")
        return 0
    print(f"{'RUN':40} {'JOB':24} {'STARTED':19} {'DURATION':>9} {'STEPS':>8} {'STATE':10} VERDICT")
    for r in listing:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.started_unix_s)) if r.started_unix_s else "-"
        duration = f"{r.duration_s:.0f}s" if r.duration_s is not None else "-"
        job = "=" if r.job == r.run_id else r.job[:24]
        verdict = f"- ({r.problem})" if r.problem else r.primary or "-"
        print(f"{r.run_id[:40]:40} {job:24} {started:19} {duration:>9} {r.steps:>8} {r.state:10} {verdict}")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from profilerd.gpu import open_backend

    backend = open_backend("auto")
    try:
        try:
            from profilerd.doctor import render_doctor
        except ImportError:
            print(f"GPU: {'available' if backend.available else backend.unavailable_reason}")
            return 0
        print(render_doctor(backend))
    finally:
        backend.close()
    return 0


def cmd_tui(args: argparse.Namespace) -> int:
    try:
        from profilerd_tui.cli import run_tui
    except ImportError as exc:
        raise UsageError(f"the terminal UI needs textual: pip install textual ({exc})") from None
    return run_tui(args, _config(args))


def cmd_dashboards(args: argparse.Namespace) -> int:
    import profilerd_dashboards

    base = args.runbook_base or profilerd_dashboards.DOCS_BASE_URL
    if not re.fullmatch(r"https?://[^\s/]+(/\S*)?", base):
        raise UsageError(f"--runbook-base must be an absolute http(s) URL, not {base!r}")
    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out} is not a folder")
    try:
        written = profilerd_dashboards.export(args.out, base)
    except OSError as exc:
        raise UsageError(f"cannot write into {args.out}: {exc.strerror or exc}") from exc
    for path in written:
        print(path)
    print(
        f"wrote {len(written)} files; runbook links under {base.rstrip('/')}/alerts.md (set up: docs/deployment.md)",
        file=sys.stderr,
    )
    return 0


def cmd_attach(args: argparse.Namespace) -> int:
    from profilerd.attach import command

    config = _config(args)
    ruleset = _rules(config)
    check_output_path(args.json_path)
    if args.duration <= 0:
        raise UsageError("--duration must be positive")
    if not 1 <= args.rate <= 100:
        raise UsageError("--rate must be between 1 and 100 samples per second")
    options = command.AttachOptions(
        pid=args.pid,
        duration_s=args.duration,
        rate_hz=args.rate,
        once=args.once,
        json_path=args.json_path,
        use_stacks=not args.no_stacks,
        inject=args.inject,
        inject_experimental=args.inject_experimental,
        no_inject=args.no_inject,
        no_tui=args.no_tui,
        daemon_flags=tuple(session.daemon_flags(args)),
    )
    return command.run(options, config, ruleset)


COMMANDS = {
    "serve": cmd_serve,
    "run": cmd_run,
    "demo": cmd_demo,
    "report": cmd_report,
    "diff": cmd_diff,
    "runs": cmd_runs,
    "doctor": cmd_doctor,
    "dashboards": cmd_dashboards,
    "attach": cmd_attach,
    "tui": cmd_tui,
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)  # --help writes to stdout too
    except BrokenPipeError:
        return _closed_pipe()
    _setup_logging(args.log_level)
    try:
        code = COMMANDS[args.command](args)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's last flush
    except UsageError as exc:
        print(f"profilerd: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return _closed_pipe()
    return session.exit_status(code)


def _closed_pipe() -> int:
    """The reader went away (`profilerd runs | head -1`): stop quietly, with 128+SIGPIPE as a
    tool killed by SIGPIPE would; stdout goes to /dev/null so the final flush cannot fail."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    return EXIT_CLOSED_PIPE


if __name__ == "__main__":
    sys.exit(main())
