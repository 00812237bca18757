"""The panels of the main screen. Each one shows a ``Snapshot`` and knows nothing of sources.

Widgets render from the last snapshot they were given and redraw only when it changes, which is
what keeps the screen free of flicker and the process cheap. Colours come from the theme's
variables (warning, success, primary, ...), so the same code reads well on dark and light themes.
"""

from __future__ import annotations

from typing import Any, ClassVar

from rich.cells import cell_len
from rich.console import RenderableType
from rich.table import Table
from rich.text import Text
from textual.binding import Binding, BindingType
from textual.color import Color
from textual.message import Message
from textual.widget import Widget
from textual.widgets import DataTable, OptionList
from textual.widgets.option_list import Option

from profilerd.vocabulary import COMPUTE_PHASES, PRIMARY_NONE, Fraction, Severity
from profilerd_tui.model import (
    GpuRow,
    HostView,
    RecommendationRow,
    Snapshot,
    fmt_bytes,
    fmt_clock,
    fmt_duration,
    fmt_ratio,
)

BLOCKS = " ▁▂▃▄▅▆▇█"
EIGHTHS = " ▏▎▍▌▋▊▉█"
PHASE_COLOURS = {"data_wait": "warning", "compute": "success", "communication": "primary", "other": "grey"}
PHASE_NAMES = {"data_wait": "data wait", "compute": "compute", "communication": "comm", "other": "other"}


_PALETTES: dict[str, dict[str, str]] = {}


def palette(widget: Widget) -> dict[str, str]:
    """The theme's colours as Rich colour strings, plus blends the themes lack: "muted" text,
    a "track" for empty bar cells and a grey for "other", all between foreground and background
    so they read on dark and light themes alike. Cached per theme: the lookup is not free."""
    theme = widget.app.theme
    cached = _PALETTES.get(theme)
    if cached is not None:
        return cached
    variables = widget.app.get_css_variables()
    colours = {
        name: Color.parse(variables[name]).hex
        for name in ("primary", "secondary", "warning", "error", "success", "accent", "foreground", "background")
    }
    foreground = Color.parse(variables["foreground"])
    background = Color.parse(variables["background"])
    colours["muted"] = background.blend(foreground, 0.6).hex
    colours["grey"] = background.blend(foreground, 0.45).hex
    colours["track"] = background.blend(foreground, 0.12).hex
    for name in ("error", "warning", "primary", "success"):
        colours[f"on-{name}"] = "#000000" if Color.parse(variables[name]).brightness > 0.55 else "#ffffff"
    colours["on-muted"] = "#000000" if Color.parse(colours["muted"]).brightness > 0.55 else "#ffffff"
    _PALETTES[theme] = colours
    return colours


def hbar(ratio: float | None, width: int, colour: str, track: str) -> Text:
    """A horizontal bar with eighth-cell resolution, on a dim track so empty reads as empty."""
    text = Text()
    if width <= 0:
        return text
    if ratio is None:
        return Text("·" * width, style=track)
    cells = max(0.0, min(1.0, ratio)) * width
    full = int(cells)
    part = EIGHTHS[int((cells - full) * 8)] if full < width else ""
    text.append("█" * full, style=colour)
    if part.strip():
        text.append(part, style=f"{colour} on {track}")
    elif part:
        text.append(" ", style=f"on {track}")
    text.append(" " * (width - full - len(part)), style=f"on {track}")
    return text


def sparkline(
    values: list[float], width: int, height: int, colour: str, hot: str, hot_above: float | None
) -> list[Text]:
    """Rows of a bar sparkline, newest on the right; bars above ``hot_above`` in ``hot``."""
    if width <= 0 or height <= 0:
        return []
    data = values[-width:]
    top = max(data) if data else 0.0
    if hot_above is not None and data:
        top = min(top, hot_above * 1.5)  # one outlier must not flatten every other bar
    rows = [Text() for _ in range(height)]
    pad = width - len(data)
    for row in rows:
        row.append(" " * pad)
    for value in data:
        level = min(value, top) / top * height * 8 if top > 0 else 0.0
        style = hot if hot_above is not None and value > hot_above else colour
        for index, row in enumerate(rows):
            floor = (height - 1 - index) * 8
            cell = min(8, max(0, round(level - floor)))
            row.append(BLOCKS[cell] if cell else (" " if index < height - 1 else "▁"), style=style)
    return rows


class Panel(Widget):
    """A bordered, focusable panel that redraws from the latest snapshot."""

    can_focus = True
    PANEL_TITLE: ClassVar[str] = ""

    class Details(Message):
        """The user asked for details (enter) on a panel."""

        def __init__(self, panel: Widget, item: Any = None) -> None:
            super().__init__()
            self.panel = panel
            self.item = item

    BINDINGS: ClassVar[list[BindingType]] = [Binding("enter", "details", "Details")]

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.snapshot: Snapshot | None = None
        self.border_title = self.PANEL_TITLE

    def show(self, snapshot: Snapshot) -> None:
        if snapshot != self.snapshot:
            self.snapshot = snapshot
            self.refresh()

    def action_details(self) -> None:
        self.post_message(self.Details(self))


class StatusBar(Widget):
    """The top line: what is watched, from where, and whether the data is fresh."""

    def __init__(self) -> None:
        super().__init__(id="status")
        self.snapshot: Snapshot | None = None
        self.connection = "connecting"  # connecting | live | disconnected | paused
        self.detail = ""

    def show(self, snapshot: Snapshot | None, connection: str, detail: str = "") -> None:
        if (snapshot, connection, detail) != (self.snapshot, self.connection, self.detail):
            self.snapshot, self.connection, self.detail = snapshot, connection, detail
            self.refresh()

    def render(self) -> RenderableType:
        left, right = self.parts()
        grid = Table.grid(expand=True)
        grid.add_column(ratio=1, no_wrap=True, overflow="ellipsis")
        grid.add_column(justify="right", no_wrap=True)
        grid.add_row(left, right)
        return grid

    @property
    def plain(self) -> str:
        left, right = self.parts()
        return f"{left.plain} {right.plain}"

    def parts(self) -> tuple[Text, Text]:
        colours = palette(self)
        snap = self.snapshot
        left = Text(no_wrap=True, overflow="ellipsis")
        left.append(" profilerd ", style=f"bold {colours['on-primary']} on {colours['primary']}")
        left.append(" ")
        if snap and snap.state == "running":
            left.append("● ", style=colours["success"])
        elif snap and snap.state == "finished":
            left.append("■ ", style=colours["muted"])
        left.append(snap.job if snap and snap.job else "no job yet", style="bold")
        if snap and snap.steps_total:
            rate = f" · {snap.steps_per_s:.1f} steps/s" if snap.steps_per_s else ""
            left.append(f"  {snap.steps_total:,} steps{rate}", style=colours["muted"])
        right = Text(no_wrap=True)
        if snap and snap.replay is not None:
            r = snap.replay
            right.append(
                "▶ " if r.playing else "‖ ", style=f"bold {colours['success'] if r.playing else colours['warning']}"
            )
            right.append(f"{r.speed:g}× ", style="bold")
            right.append(f"{fmt_clock(r.position_s)}/{fmt_clock(r.duration_s)} ")
        if self.connection == "disconnected":
            right.append(" disconnected — retrying ", style=f"bold {colours['on-error']} on {colours['error']}")
        elif self.connection == "paused":
            right.append(" ‖ paused ", style=f"bold {colours['on-warning']} on {colours['warning']}")
        elif self.connection == "connecting":
            right.append("connecting…", style=colours["muted"])
        elif snap is not None and snap.replay is None:
            right.append(snap.source, style=colours["muted"])
        right.append(" ")
        return left, right


class VerdictBanner(Panel):
    """The category and severity, and the one sentence of evidence behind them."""

    TONES: ClassVar[dict[str, str]] = {"critical": "error", "warning": "warning", "info": "primary", "ok": "success"}

    def show(self, snapshot: Snapshot) -> None:
        level = snapshot.severity if snapshot.primary != "none" else "none"
        for severity in (*Severity, PRIMARY_NONE):
            self.set_class(severity == level, f"-{severity}")
        super().show(snapshot)

    def render(self) -> RenderableType:
        snap = self.snapshot
        colours = palette(self)
        if snap is None:
            return Text("waiting for data…", style=colours["muted"])
        tone = self.TONES.get(snap.severity, "muted") if snap.primary != "none" else "muted"
        text = Text()
        text.append(f" {snap.headline} ", style=f"bold {colours['on-' + tone]} on {colours[tone]}")
        if snap.primary != "none":
            text.append(f" {snap.severity}", style=f"bold {colours[tone]}")
        text.append("  ")
        text.append(snap.evidence, style="bold" if snap.primary != "none" else colours["muted"])
        return text


class Breakdown(Panel):
    """Where step time goes: a stacked bar of data / compute / comm / other and a step-time sparkline."""

    PANEL_TITLE = "Step time"

    def show(self, snapshot: Snapshot) -> None:
        # One row taller with device timing: its line, and the sparkline keeps its row.
        self.set_class(snapshot.device is not None, "-device")
        super().show(snapshot)

    def render(self) -> RenderableType:
        snap = self.snapshot
        colours = palette(self)
        width = max(10, self.content_size.width)
        height = max(1, self.content_size.height)
        if snap is None or not snap.fractions:
            note = snap.summary if snap else "waiting for data…"
            return Text(note, style=colours["muted"])
        lines: list[Text] = [self._bar(snap.fractions, width, colours), self._legend(snap, width, colours)]
        if snap.device is not None:  # the shares are the device's: say what it did
            lines.append(Text(snap.device.line(), style=colours["muted"], no_wrap=True, overflow="ellipsis"))
        stats = Text()
        stats.append("p50 ", style=colours["muted"])
        stats.append(fmt_duration(snap.step_p50_s), style="bold")
        stats.append("  p95 ", style=colours["muted"])
        stats.append(fmt_duration(snap.step_p95_s), style=f"bold {colours['warning']}")
        spark_rows = max(1, height - len(lines))
        spark_width = max(0, width - len(stats.plain) - 2)
        values = list(snap.step_times_s)
        rows = sparkline(values, spark_width, spark_rows, colours["primary"], colours["warning"], snap.step_p95_s)
        for index, row in enumerate(rows):
            row.append("  ")
            if index == len(rows) - 1:
                row.append_text(stats)
            elif index == 0 and spark_rows > 2 and values:
                row.append(f"max {fmt_duration(max(values))}", style=colours["muted"])
            elif index == 1 and spark_rows > 2 and snap.steps_per_s:
                row.append(f"{snap.steps_per_s:.1f} steps/s", style=colours["muted"])
            lines.append(row)
        return Text("\n").join(lines[:height])

    @staticmethod
    def _bar(fractions: dict[str, float], width: int, colours: dict[str, str]) -> Text:
        text = Text()
        used = 0
        keys = [k for k in Fraction if fractions.get(k, 0.0) > 0.0005]
        for index, key in enumerate(keys):
            cells = width - used if index == len(keys) - 1 else round(fractions[key] * width)
            cells = max(0, min(cells, width - used))
            text.append("█" * cells, style=colours[PHASE_COLOURS[key]])
            used += cells
        return text

    @staticmethod
    def _legend(snap: Snapshot, width: int, colours: dict[str, str]) -> Text:
        fractions = snap.fractions or {}
        parts = []
        for key in Fraction:
            part = Text()
            part.append("■ ", style=colours[PHASE_COLOURS[key]])
            part.append(f"{PHASE_NAMES[key]} ")
            part.append(f"{fractions.get(key, 0.0):.0%}", style="bold")
            parts.append(part)
        text = Text("  ").join(parts)
        if snap.phases:
            p = snap.phases
            split = tuple(p.get(phase, 0) for phase in COMPUTE_PHASES)
            detail = "   compute = fwd {:.0%} · bwd {:.0%} · opt {:.0%}".format(*split)
            if len(text.plain) + len(detail) <= width:
                text.append(detail, style=colours["muted"])
        return text


class GpuPanel(Panel):
    """GPUs (utilization, SM and tensor activity, memory, power against the limit, temperature,
    throttle reasons) and the host's CPU, which is what a data-bound job runs short of."""

    PANEL_TITLE = "GPUs · host"

    def render(self) -> RenderableType:
        snap = self.snapshot
        colours = palette(self)
        width = max(20, self.content_size.width)
        if snap is None:
            return Text("waiting for data…", style=colours["muted"])
        lines: list[Text] = []
        for gpu in snap.gpus:
            lines.extend(self._gpu(gpu, width, colours))
        if not snap.gpus:
            lines.append(Text(f"no GPU: {snap.gpu_note or 'none seen'}", style=colours["muted"], overflow="ellipsis"))
        for host in snap.hosts:
            lines.extend(self._host(host, width, colours))
        return Text("\n", no_wrap=True, overflow="ellipsis").join(lines)

    @staticmethod
    def _gpu(gpu: GpuRow, width: int, colours: dict[str, str]) -> list[Text]:
        head = Text(no_wrap=True, overflow="ellipsis")
        node = f"{gpu.node}/" if gpu.node else ""
        head.append(f"{node}{gpu.index} ", style="bold")
        if gpu.lost:
            head.append(f"{gpu.name}: LOST", style=f"bold {colours['error']}")
            return [head]
        util = gpu.utilization_ratio
        bar_width = max(4, min(24, width - len(head.plain) - 30))
        head.append_text(hbar(util, bar_width, colours["success"], colours["track"]))
        head.append(f" {fmt_ratio(util):>4}", style="bold")
        if gpu.sm_active_ratio is not None:
            head.append(f" sm {fmt_ratio(gpu.sm_active_ratio)}")
        if gpu.tensor_active_ratio is not None:
            head.append(f" tc {fmt_ratio(gpu.tensor_active_ratio)}")
        if gpu.temperature_celsius is not None:
            hot = gpu.temperature_celsius >= 85
            head.append(f" {gpu.temperature_celsius:.0f}°C", style=f"bold {colours['error']}" if hot else "")
        detail = Text(" ", no_wrap=True, overflow="ellipsis")
        reasons = [r for r in gpu.throttle_reasons or () if r != "idle"]
        if gpu.memory_used_bytes is not None:
            detail.append(f"mem {fmt_bytes(gpu.memory_used_bytes)}/{fmt_bytes(gpu.memory_total_bytes)} ")
        if gpu.power_watts is not None:
            limit = f"/{gpu.power_limit_watts:.0f}" if gpu.power_limit_watts else ""
            hot = bool(gpu.power_limit_watts) and gpu.power_watts >= 0.95 * (gpu.power_limit_watts or 0)
            detail.append(f"{gpu.power_watts:.0f}{limit}W", style=f"bold {colours['warning']}" if hot else "")
            detail.append(" ")
        if reasons:
            detail.append(f"⚠ {', '.join(reasons)} ", style=f"bold {colours['warning']}")
        detail.append(f" {gpu.name}", style=colours["muted"])
        return [head, detail]

    @staticmethod
    def _host(host: HostView, width: int, colours: dict[str, str]) -> list[Text]:
        node = f"{host.node} " if host.node else ""
        cpu = Text(no_wrap=True, overflow="ellipsis")
        cpu.append(f"{node}CPU ", style="bold")
        busy = host.cpu_ratio
        bar_width = max(4, min(24, width - len(cpu.plain) - 18))
        tone = colours["error"] if busy is not None and busy >= 0.9 else colours["success"]
        cpu.append_text(hbar(busy, bar_width, tone, colours["track"]))
        cpu.append(f" {fmt_ratio(busy):>4}", style="bold")
        cpu.append(f" of {host.cpu_count or '?'} cores", style=colours["muted"])
        lines = [cpu]
        cores = host.cpu_per_core_ratio
        if cores and len(cores) <= width - 8:
            per_core = Text("cores ", style=colours["muted"], no_wrap=True)
            for value in cores:
                level = round(max(0.0, min(1.0, value)) * 8)
                style = colours["error"] if value >= 0.9 else colours["success"]
                per_core.append(BLOCKS[level] if level else "▁", style=style if level else colours["track"])
            lines.append(per_core)
        if host.memory_used_bytes is not None and host.memory_total_bytes:
            mem = Text("mem ", style="bold", no_wrap=True)
            ratio = host.memory_used_bytes / host.memory_total_bytes
            mem.append_text(hbar(ratio, bar_width + len(node) + 0, colours["primary"], colours["track"]))
            mem.append(
                f" {fmt_bytes(host.memory_used_bytes)}/{fmt_bytes(host.memory_total_bytes)}", style=colours["muted"]
            )
            lines.append(mem)
        return lines


class SnapshotTable(DataTable[Any]):
    """A table panel whose columns depend on its width: fewer, tighter columns when narrow."""

    PANEL_TITLE = ""
    NARROW_BELOW = 46

    def __init__(self, id: str) -> None:
        super().__init__(id=id, cursor_type="row", zebra_stripes=True, cell_padding=1, show_cursor=False)
        self.border_title = self.PANEL_TITLE
        self.snapshot: Snapshot | None = None
        self._columns: tuple[str, ...] = ()
        self._widths: tuple[int, ...] = ()

    def columns_for(self, narrow: bool) -> tuple[str, ...]:
        raise NotImplementedError

    def rows_for(self, snapshot: Snapshot, columns: tuple[str, ...]) -> list[tuple[str, tuple[Any, ...]]]:
        raise NotImplementedError

    def show(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        if not self.content_size.width:
            return  # not laid out yet: the columns depend on the width, on_resize shows it
        columns = self.columns_for(self.content_size.width < self.NARROW_BELOW)
        rows = self.rows_for(snapshot, columns)
        # Widths are set, not measured: DataTable measures when idle, and a row drawn before
        # that shows cut-off cells for a frame. They change rarely (a value gains a digit).
        widths = tuple(
            max([len(label), *(cell_len(cells[i].plain) for _, cells in rows)]) for i, label in enumerate(columns)
        )
        if (columns, widths) != (self._columns, self._widths):
            self.clear(columns=True)
            for column, width in zip(columns, widths, strict=True):
                self.add_column(column, key=column or "flag", width=width)
            self._columns, self._widths = columns, widths
        update_rows(self, rows)

    def on_resize(self) -> None:
        if self.snapshot is not None:
            self.show(self.snapshot)

    @property
    def settled(self) -> bool:
        """Laid out, filled, and the column widths measured (DataTable measures when idle)."""
        return bool(self._columns)

    def on_focus(self) -> None:
        self.show_cursor = True

    def on_blur(self) -> None:
        # A blurred cursor row would repaint its cells' colours (the CPU bars) in one colour.
        self.show_cursor = False


class RanksTable(SnapshotTable):
    """Per-rank step time and wait; the straggler's row stands out."""

    PANEL_TITLE = "Ranks"

    def __init__(self) -> None:
        super().__init__(id="ranks")

    def columns_for(self, narrow: bool) -> tuple[str, ...]:
        if narrow:
            return ("rank", "p50", "p95", "wait", "comm")
        if self.content_size.width < 76:
            return ("rank", "host", "p50", "p95", "wait", "comm", "steps")
        return ("rank", "host", "pid", "p50", "p95", "wait", "comm", "steps", "")

    def rows_for(self, snapshot: Snapshot, columns: tuple[str, ...]) -> list[tuple[str, tuple[Any, ...]]]:
        colours = palette(self)
        narrow = "host" not in columns
        wide = "pid" in columns
        rows = []
        for r in snapshot.ranks:
            style = f"bold {colours['error']}" if r.straggler else ("" if r.alive else colours["muted"])
            flag = "◀ straggler" if r.straggler else ("" if r.alive else "exited")

            def cell(value: str, right: bool = True, style: str = style) -> Text:
                return Text(value, style=style, justify="right" if right else "left", no_wrap=True)

            p50, p95 = fmt_duration(r.step_p50_s), fmt_duration(r.step_p95_s)
            if narrow:
                p50, p95 = p50.replace(" ", ""), p95.replace(" ", "")
            cells = [cell(f"{r.rank}{' ◀' if narrow and r.straggler else ''}", right=False)]
            if not narrow:
                cells.append(cell(r.host or "–", right=False))
            if wide:
                cells.append(cell(str(r.pid or "–")))
            cells += [cell(p50), cell(p95), cell(fmt_ratio(r.data_wait_ratio)), cell(fmt_ratio(r.comm_ratio))]
            if not narrow:
                cells.append(cell(f"{r.steps_total:,}"))
            if wide:
                cells.append(cell(flag, right=False))
            elif not narrow and r.straggler:
                cells[0] = cell(f"{r.rank} ◀", right=False)
            rows.append((str(r.rank), tuple(cells)))
        return rows


class ProcessesTable(SnapshotTable):
    """The training processes and their DataLoader workers, with CPU use in cores."""

    PANEL_TITLE = "Processes"

    def __init__(self) -> None:
        super().__init__(id="processes")

    def columns_for(self, narrow: bool) -> tuple[str, ...]:
        if narrow:
            return ("pid", "role", "cpu", "rss")
        nodes = self.snapshot is not None and any(p.node for p in self.snapshot.processes)
        return ("pid", "node", "role", "cpu (cores)", "rss") if nodes else ("pid", "role", "cpu (cores)", "rss")

    def rows_for(self, snapshot: Snapshot, columns: tuple[str, ...]) -> list[tuple[str, tuple[Any, ...]]]:
        colours = palette(self)
        narrow = "cpu" in columns
        rows = []
        for index, p in enumerate(snapshot.processes):
            muted = "" if p.alive else colours["muted"]
            if p.role == "trainer":
                role = Text(f"rank {p.rank}", style=muted or "bold", no_wrap=True)
            else:
                count = f"{p.count} " if p.role == "workers" else ""
                plural = "s" if p.role == "workers" and p.count != 1 else ""
                role = Text(f"└ {count}worker{plural}", style=muted or colours["muted"], no_wrap=True)
            cpu = Text(no_wrap=True)
            if p.cpu_cores is not None:
                per_process = p.cpu_cores / max(1, p.count)
                tone = colours["error"] if per_process >= 0.9 else colours["success"]
                cpu.append_text(hbar(min(1.0, per_process), 4 if narrow else 10, tone, colours["track"]))
                cpu.append(f" {p.cpu_cores:.2f}", style=muted)
            else:
                cpu.append("–", style=colours["muted"])
            cells = [Text(str(p.pid) if p.pid is not None else "", style=muted, no_wrap=True)]
            if "node" in columns:
                cells.append(Text(p.node or "local", style=colours["muted"], no_wrap=True))
            cells += [role, cpu, Text(fmt_bytes(p.rss_bytes) if p.rss_bytes else "", style=muted, justify="right")]
            key = str(p.pid) if p.pid is not None else f"{p.node}-{p.rank}-{p.role}-{index}"
            rows.append((key, tuple(cells)))
        return rows


def update_rows(table: DataTable[Any], rows: list[tuple[str, tuple[Any, ...]]]) -> None:
    """Update a table in place when its rows are the same keys, else rebuild it keeping the
    cursor on the same key: clearing every second would flicker and lose the selection."""
    keys = [key for key, _ in rows]
    current = [str(row.value) for row in table.rows]
    columns = list(table.columns)
    if keys == current:
        for key, cells in rows:
            for column, cell in zip(columns, cells, strict=False):
                if table.get_cell(key, column) != cell:
                    table.update_cell(key, column, cell, update_width=True)
        return
    selected = current[table.cursor_row] if current and 0 <= table.cursor_row < len(current) else None
    table.clear()
    for key, cells in rows:
        table.add_row(*cells, key=key)
    if selected in keys:
        table.move_cursor(row=keys.index(selected), animate=False)


class RecommendationList(OptionList):
    """Recommendations, best estimated speedup first; enter for details, c to copy the snippet."""

    PANEL_TITLE = "Recommendations"

    def __init__(self) -> None:
        super().__init__(id="recommendations")
        self.border_title = self.PANEL_TITLE
        self.snapshot: Snapshot | None = None
        self.verbose = False
        self._shown: tuple[Any, ...] | None = None

    def show(self, snapshot: Snapshot, verbose: bool | None = None) -> None:
        self.snapshot = snapshot
        if verbose is not None:
            self.verbose = verbose
        key = (snapshot.recommendations, snapshot.primary, self.verbose, self.app.theme)
        if key == self._shown:
            return
        self._shown = key
        colours = palette(self)
        highlighted = self.highlighted
        self.clear_options()
        if not snapshot.recommendations:
            note = (
                "none yet: waiting for evidence"
                if snapshot.primary == "none"
                else "none: nothing points to a cheaper way"
            )
            self.add_option(Option(Text(note, style=colours["muted"]), disabled=True))
            return
        self.add_options([self._option(n, rec, colours) for n, rec in enumerate(snapshot.recommendations, 1)])
        keep = highlighted is not None and highlighted < len(snapshot.recommendations)
        self.highlighted = highlighted if keep else 0  # enter and c always have a recommendation

    def _option(self, number: int, rec: RecommendationRow, colours: dict[str, str]) -> Option:
        text = Text(no_wrap=not self.verbose, overflow="ellipsis")
        text.append(f"~{rec.estimated_speedup:.2f}× ", style=f"bold {colours['success']}")
        text.append(rec.title, style="bold")
        if self.verbose:
            if rec.why:
                text.append(f"\n   {rec.why}", style=colours["muted"])
            for line in rec.how.splitlines()[:3]:
                text.append(f"\n   │ {line}", style=colours["primary"])
        return Option(text, id=rec.id)

    def current(self) -> RecommendationRow | None:
        if self.snapshot is None or self.highlighted is None:
            return self.snapshot.recommendations[0] if self.snapshot and self.snapshot.recommendations else None
        recs = self.snapshot.recommendations
        return recs[self.highlighted] if self.highlighted < len(recs) else None
