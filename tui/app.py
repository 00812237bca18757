"""The Textual app: one main screen of panels over snapshots from any source.

The UI thread never waits on a source: a heartbeat timer starts ``source.fetch()`` in a thread
worker, and the worker answers with a ``SnapshotReady`` or ``FetchFailed`` message. A failed
fetch marks the screen "disconnected — retrying" and the heartbeat retries with backoff, so the
view recovers by itself when the daemon (or Prometheus) comes back.

``make_app(source)`` is the one way to build the app, for the CLI and the tests alike.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, ClassVar

from rich.console import Group, RenderableType
from rich.syntax import Syntax
from rich.table import Table
from rich.text import Text
from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Grid, Vertical
from textual.events import Resize
from textual.message import Message
from textual.screen import Screen
from textual.widgets import DataTable, Footer, OptionList

from profilerd.vocabulary import Fraction, Phase
from profilerd_tui.model import (
    GpuRow,
    ProcessRow,
    RankRow,
    RecommendationRow,
    Snapshot,
    fmt_bytes,
    fmt_duration,
    fmt_ratio,
)
from profilerd_tui.screens import DetailsScreen, HelpScreen, JobPicker, OutputScreen
from profilerd_tui.sources import DaemonSource, ReplaySource, Source, SourceError
from profilerd_tui.widgets import (
    Breakdown,
    GpuPanel,
    Panel,
    ProcessesTable,
    RanksTable,
    RecommendationList,
    SnapshotTable,
    StatusBar,
    VerdictBanner,
)

log = logging.getLogger(__name__)

HEARTBEAT_S = 0.25  # how often the app checks whether to fetch, retry, or exit
MAX_BACKOFF_S = 5.0
WIDE = (140, 40)  # at least this many columns and rows: the large-terminal layout


class SnapshotReady(Message):
    def __init__(self, snapshot: Snapshot) -> None:
        super().__init__()
        self.snapshot = snapshot


class FetchFailed(Message):
    def __init__(self, error: str) -> None:
        super().__init__()
        self.error = error


class MainScreen(Screen[None]):
    """Banner, breakdown and four panels; laid out by profilerd.tcss for small and large terminals."""

    AUTO_FOCUS = "#recommendations"  # enter and c act on the best recommendation straight away

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("tab", "app.focus_next", "Panels", show=True),
        Binding("shift+tab", "app.focus_previous", "Back", show=False),
    ]

    def compose(self) -> ComposeResult:
        yield StatusBar()
        with Vertical(id="main"):
            yield VerdictBanner(id="banner")
            yield Breakdown(id="breakdown")
            with Grid(id="panels"):
                yield GpuPanel(id="gpus")
                yield RanksTable()
                yield ProcessesTable()
                yield RecommendationList()
        yield Footer()

    def on_resize(self, event: Resize) -> None:
        wide = event.size.width >= WIDE[0] and event.size.height >= WIDE[1]
        self.set_class(wide, "-wide")
        snapshot = self.app.snapshot if isinstance(self.app, ProfilerdApp) else None
        if snapshot is not None:
            self.query_one(RecommendationList).show(snapshot, verbose=wide)

    def show(self, snapshot: Snapshot) -> None:
        self.query_one(VerdictBanner).show(snapshot)
        self.query_one(Breakdown).show(snapshot)
        self.query_one(GpuPanel).show(snapshot)
        self.query_one(RanksTable).show(snapshot)
        self.query_one(RecommendationList).show(snapshot, verbose=self.has_class("-wide"))
        self.query_one(ProcessesTable).show(snapshot)


class ProfilerdApp(App[None]):
    CSS_PATH = "profilerd.tcss"
    TITLE = "profilerd"
    ENABLE_COMMAND_PALETTE = False
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("q", "quit", "Quit"),
        Binding("p", "pause", "Pause"),
        Binding("c", "copy", "Copy"),
        Binding("question_mark", "help", "Help"),
        Binding("j", "pick_job", "Job", show=False),
        Binding("o", "output", "Output"),
        Binding("t", "toggle_theme", "Theme", show=False),
        Binding("ctrl+c", "interrupt", "Interrupt", show=False, priority=True),
        Binding("space", "replay_toggle", "Play", show=False),
        Binding("plus,equals_sign", "replay_speed(1)", "Faster", show=False),
        Binding("minus", "replay_speed(-1)", "Slower", show=False),
        Binding("full_stop", "replay_step(1)", "Step", show=False),
        Binding("comma", "replay_step(-1)", "Step back", show=False),
        Binding("right_square_bracket", "replay_step(10)", "+10 s", show=False),
        Binding("left_square_bracket", "replay_step(-10)", "-10 s", show=False),
        Binding("home,g", "replay_seek(0)", "Start", show=False),
        Binding("end,G", "replay_seek(-1)", "End", show=False),
    ]

    def __init__(
        self,
        source: Source,
        *,
        refresh_s: float | None = None,
        exit_when: Callable[[], bool] | None = None,
        on_interrupt: Callable[[], None] | None = None,
        output: Callable[[], list[str]] | None = None,
        theme: str | None = None,
    ) -> None:
        super().__init__()
        self.source = source
        self.refresh_s = max(0.1, refresh_s if refresh_s is not None else source.refresh_s)
        self.exit_when = exit_when
        self.on_interrupt = on_interrupt
        self.output = output
        if theme:
            self.theme = theme
        self.snapshot: Snapshot | None = None
        self.connection = "connecting"
        self.error = ""
        self.paused = False
        self.fetches = 0
        self.failures = 0  # consecutive
        self._in_flight = False
        self._next_fetch = 0.0

    # ---- lifecycle ----------------------------------------------------------------------------
    def on_mount(self) -> None:
        self.push_screen(MainScreen())
        self.set_interval(HEARTBEAT_S, self._heartbeat)
        self._heartbeat()

    def on_unmount(self) -> None:
        self.source.close()

    @property
    def main_screen(self) -> MainScreen:
        return self.get_screen_stack_main()

    def get_screen_stack_main(self) -> MainScreen:
        for screen in self.screen_stack:
            if isinstance(screen, MainScreen):
                return screen
        raise LookupError("the main screen is not mounted")

    def settled(self) -> bool:
        """A snapshot is on screen and every table has measured its columns: what tests and
        screenshots wait for, since tables finish their layout when idle."""
        if self.snapshot is None:
            return False
        try:
            tables = list(self.main_screen.query(SnapshotTable))
        except LookupError:
            return False
        return all(table.settled for table in tables)

    def _heartbeat(self) -> None:
        if self.exit_when is not None and self.exit_when():
            self.exit()
            return
        if self.paused and not isinstance(self.source, ReplaySource):
            return
        if not self._in_flight and time.monotonic() >= self._next_fetch:
            self._in_flight = True
            self._fetch()

    def fetch_now(self) -> None:
        """Fetch at the next heartbeat, e.g. after a replay key or a job change."""
        self._next_fetch = 0.0

    @work(thread=True, group="fetch", exit_on_error=False)
    def _fetch(self) -> None:
        try:
            snapshot = self.source.fetch()
        except SourceError as exc:
            self.post_message(FetchFailed(str(exc)))
        except Exception as exc:  # a bug in a source must not take the screen down: show it, log it
            log.exception("fetching a snapshot failed")
            self.post_message(FetchFailed(f"{type(exc).__name__}: {exc}"))
        else:
            self.post_message(SnapshotReady(snapshot))

    def on_snapshot_ready(self, message: SnapshotReady) -> None:
        self._in_flight = False
        self.fetches += 1
        self._next_fetch = time.monotonic() + self.refresh_s
        if self.failures:
            self.notify("reconnected", timeout=2)
        self.failures = 0
        self.error = ""
        if self.paused and not isinstance(self.source, ReplaySource):
            return
        self.connection = "live"
        self.snapshot = message.snapshot
        self._show()

    def on_fetch_failed(self, message: FetchFailed) -> None:
        self._in_flight = False
        self.failures += 1
        self.error = message.error
        self.connection = "disconnected"
        self._next_fetch = time.monotonic() + min(MAX_BACKOFF_S, 0.5 * 2**self.failures)
        self._show()

    def _show(self) -> None:
        try:
            main = self.main_screen
        except LookupError:
            return
        main.query_one("#main").set_class(self.connection == "disconnected", "-stale")
        connection = "paused" if self.paused and not isinstance(self.source, ReplaySource) else self.connection
        main.query_one(StatusBar).show(self.snapshot, connection, self.error or self.source.label)
        if self.snapshot is not None:
            main.show(self.snapshot)

    # ---- actions ------------------------------------------------------------------------------------
    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action.startswith("replay_") or action == "replay_toggle":
            return isinstance(self.source, ReplaySource)
        if action == "output":
            return self.output is not None
        if action == "pick_job":
            return isinstance(self.source, DaemonSource)
        return True

    def action_pause(self) -> None:
        if isinstance(self.source, ReplaySource):
            self.action_replay_toggle()
            return
        self.paused = not self.paused
        if not self.paused:
            self.fetch_now()
        self._show()

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def action_toggle_theme(self) -> None:
        self.theme = "textual-light" if self.current_theme.dark else "textual-dark"
        self._show()

    def action_interrupt(self) -> None:
        if self.on_interrupt is None:
            self.exit()
            return
        self.on_interrupt()
        self.notify("interrupt sent to the training command", timeout=3)

    def action_output(self) -> None:
        if self.output is not None:
            self.push_screen(OutputScreen(self.output))

    def action_pick_job(self) -> None:
        if not isinstance(self.source, DaemonSource):
            return
        jobs = self.snapshot.jobs if self.snapshot else ()
        current = self.snapshot.job if self.snapshot else None
        source = self.source

        def chosen(job: str | None) -> None:
            if job is not None:
                source.job = job or None
                self.fetch_now()

        self.push_screen(JobPicker(jobs, current), chosen)

    def action_copy(self) -> None:
        rec = self.main_screen.query_one(RecommendationList).current()
        if rec is None or not rec.how:
            self.notify("no snippet to copy", severity="warning", timeout=2)
            return
        self.copy_to_clipboard(rec.how)
        self.notify(f"copied: {rec.how.splitlines()[0][:60]}", timeout=2)

    def action_replay_toggle(self) -> None:
        if isinstance(self.source, ReplaySource):
            self.source.toggle()
            self.fetch_now()

    def action_replay_speed(self, direction: int) -> None:
        if isinstance(self.source, ReplaySource):
            speed = self.source.faster(direction)
            self.notify(f"replay at {speed:g}×", timeout=1)
            self.fetch_now()

    def action_replay_step(self, seconds: float) -> None:
        if isinstance(self.source, ReplaySource):
            self.source.step(seconds)
            self.fetch_now()

    def action_replay_seek(self, position: float) -> None:
        if isinstance(self.source, ReplaySource):
            self.source.seek(self.source.duration_s if position < 0 else position)
            self.fetch_now()

    # ---- details (enter) --------------------------------------------------------------------------
    @on(Panel.Details)
    def _panel_details(self, event: Panel.Details) -> None:
        snap = self.snapshot
        if snap is None:
            return
        if isinstance(event.panel, VerdictBanner):
            self.push_screen(DetailsScreen(f"{snap.headline} · findings", findings_body(snap)))
        elif isinstance(event.panel, Breakdown):
            self.push_screen(DetailsScreen("step time", breakdown_body(snap)))
        elif isinstance(event.panel, GpuPanel):
            self.push_screen(DetailsScreen("GPUs and host", gpus_body(snap)))

    @on(DataTable.RowSelected)
    def _row_details(self, event: DataTable.RowSelected) -> None:
        snap = self.snapshot
        if snap is None:
            return
        index = event.cursor_row
        if isinstance(event.data_table, RanksTable) and index < len(snap.ranks):
            rank = snap.ranks[index]
            self.push_screen(DetailsScreen(f"rank {rank.rank}", rank_body(rank)))
        elif isinstance(event.data_table, ProcessesTable) and index < len(snap.processes):
            process = snap.processes[index]
            self.push_screen(DetailsScreen(f"process {process.pid or ''}".strip(), process_body(process)))

    @on(OptionList.OptionSelected, "#recommendations")
    def _recommendation_details(self, event: OptionList.OptionSelected) -> None:
        snap = self.snapshot
        if snap is None or event.option_index >= len(snap.recommendations):
            return
        rec = snap.recommendations[event.option_index]
        self.push_screen(DetailsScreen(rec.title, recommendation_body(rec), snippet=rec.how or None))


# ---- detail bodies: plain functions of the snapshot, so they are easy to test -------------------------
def _table(*rows: tuple[str, Any]) -> Table:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold", justify="right")
    table.add_column()
    for key, value in rows:
        table.add_row(key, value if isinstance(value, Text) else Text(str(value)))
    return table


def findings_body(snap: Snapshot) -> RenderableType:
    parts: list[RenderableType] = [Text(snap.summary + "\n", style="bold")]
    if not snap.findings:
        parts.append(Text("No rule has fired." if snap.primary != "none" else "Not enough evidence yet."))
    for f in snap.findings:
        thresholds = ", ".join(f"{k} {v:g}" for k, v in f.thresholds.items())
        confidence = f" · confidence {f.confidence:.2f}" if f.confidence is not None else ""
        parts.append(Text(f"{f.rule}  ({f.category}, {f.severity}{confidence})", style="bold"))
        parts.append(Text(f"  {f.evidence}\n  thresholds: {thresholds or '–'}\n"))
    return Group(*parts)


def breakdown_body(snap: Snapshot) -> RenderableType:
    mean = snap.step_mean_s
    rows: list[tuple[str, Any]] = []
    phases = snap.phases or {}
    for key in Phase:
        share = phases.get(key)
        per_step = f"  {fmt_duration(share * mean)} per step" if share is not None and mean else ""
        rows.append((key.replace("_", " "), f"{fmt_ratio(share)}{per_step}"))
    rows += [
        ("step time p50", fmt_duration(snap.step_p50_s)),
        ("p95", fmt_duration(snap.step_p95_s)),
        ("mean", fmt_duration(snap.step_mean_s)),
        ("steps/s", f"{snap.steps_per_s:.2f}" if snap.steps_per_s else "–"),
        ("steps", f"{snap.steps_total:,}"),
    ]
    shares = ", ".join(f"{k} {fmt_ratio((snap.fractions or {}).get(k))}" for k in Fraction)
    return Group(_table(*rows), Text(f"\nshares of step time: {shares}"))


def gpus_body(snap: Snapshot) -> RenderableType:
    parts: list[RenderableType] = []
    for gpu in snap.gpus:
        parts.append(Text(f"GPU {gpu.node + '/' if gpu.node else ''}{gpu.index} · {gpu.name}", style="bold"))
        parts.append(gpu_table(gpu))
    if not snap.gpus:
        parts.append(Text(f"no GPU: {snap.gpu_note or 'none seen'}"))
    for host in snap.hosts:
        cores = " ".join(f"{c:.0%}" for c in host.cpu_per_core_ratio)
        parts.append(Text(f"\nhost {host.node or ''}".rstrip(), style="bold"))
        parts.append(
            _table(
                ("CPU", f"{fmt_ratio(host.cpu_ratio)} of {host.cpu_count or '?'} cores"),
                ("per core", cores or "–"),
                ("memory", f"{fmt_bytes(host.memory_used_bytes)} of {fmt_bytes(host.memory_total_bytes)}"),
            )
        )
    return Group(*parts)


def gpu_table(gpu: GpuRow) -> Table:
    reasons = (
        ", ".join(gpu.throttle_reasons) if gpu.throttle_reasons else ("none" if gpu.throttle_reasons == () else "–")
    )
    return _table(
        ("utilization", fmt_ratio(gpu.utilization_ratio)),
        ("SM active", fmt_ratio(gpu.sm_active_ratio)),
        ("tensor active", fmt_ratio(gpu.tensor_active_ratio)),
        ("memory", f"{fmt_bytes(gpu.memory_used_bytes)} of {fmt_bytes(gpu.memory_total_bytes)}"),
        (
            "power",
            f"{gpu.power_watts:.0f} W of {gpu.power_limit_watts or 0:.0f} W" if gpu.power_watts is not None else "–",
        ),
        ("temperature", f"{gpu.temperature_celsius:.0f} °C" if gpu.temperature_celsius is not None else "–"),
        ("throttle", reasons),
        ("uuid", gpu.uuid or "–"),
    )


def rank_body(rank: RankRow) -> RenderableType:
    recent = rank.recent_step_s
    return _table(
        ("host", rank.host or "–"),
        ("pid", rank.pid or "–"),
        ("state", "running" if rank.alive else "exited"),
        ("steps", f"{rank.steps_total:,}"),
        ("step time p50", fmt_duration(rank.step_p50_s)),
        ("p95", fmt_duration(rank.step_p95_s)),
        ("own work", f"{fmt_duration(rank.own_s)} (step time less communication)"),
        ("data wait", fmt_ratio(rank.data_wait_ratio)),
        ("communication", fmt_ratio(rank.comm_ratio)),
        ("straggler", "yes: the others wait for this rank" if rank.straggler else "no"),
        ("recent steps", f"{len(recent)}, slowest {fmt_duration(max(recent))}" if recent else "–"),
    )


def process_body(process: ProcessRow) -> RenderableType:
    role = {"trainer": "training process", "worker": "DataLoader worker", "workers": "DataLoader workers"}
    return _table(
        ("pid", process.pid or "– (not exported by this source)"),
        ("role", f"{role.get(process.role, process.role)} of rank {process.rank}"),
        ("count", process.count),
        ("CPU", f"{process.cpu_cores:.2f} cores" if process.cpu_cores is not None else "–"),
        ("RSS", fmt_bytes(process.rss_bytes)),
        ("node", process.node or "this host"),
        ("state", "running" if process.alive else "exited"),
    )


def recommendation_body(rec: RecommendationRow) -> RenderableType:
    parts: list[RenderableType] = [
        _table(
            ("estimated speedup", Text(f"~{rec.estimated_speedup:.2f}× whole step", style="bold")),
            ("id", rec.id),
            ("rule", rec.rule or "–"),
        ),
    ]
    if rec.why:
        parts.append(Text(f"\nwhy: {rec.why}"))
    if rec.evidence:
        parts.append(Text(f"evidence: {rec.evidence}"))
    if rec.how:
        parts.append(Text("\nchange (c copies it):", style="bold"))
        parts.append(Syntax(rec.how, "python", theme="ansi_dark", word_wrap=True, background_color="default"))
    return Group(*parts)


def make_app(
    source: Source,
    *,
    refresh_s: float | None = None,
    exit_when: Callable[[], bool] | None = None,
    on_interrupt: Callable[[], None] | None = None,
    output: Callable[[], list[str]] | None = None,
    theme: str | None = None,
) -> ProfilerdApp:
    """The app over ``source``; the CLI (`profilerd tui`, `profilerd run`) and the tests all use this.

    ``exit_when`` is polled on the UI thread a few times a second (``profilerd run`` passes
    "the training command has exited"); ``on_interrupt`` replaces ctrl+c's quit (``run`` forwards
    it to the command); ``output`` returns the command's recent output lines for the `o` screen.
    """
    return ProfilerdApp(
        source, refresh_s=refresh_s, exit_when=exit_when, on_interrupt=on_interrupt, output=output, theme=theme
    )
