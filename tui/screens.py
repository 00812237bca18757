"""Modal screens: details of a panel's item, help, the training command's output, the job picker."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

from rich.console import RenderableType
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Footer, OptionList, RichLog, Static
from textual.widgets.option_list import Option

KEYS_HELP = (
    ("q", "quit (under `profilerd run`: leave the view, the job keeps running)"),
    ("tab / shift+tab", "move between panels"),
    ("enter", "details of the focused panel or row"),
    ("p", "pause / resume updates (replay: play / pause)"),
    ("c", "copy the highlighted recommendation's snippet to the clipboard (OSC 52)"),
    ("j", "choose the job to watch (live)"),
    ("o", "the training command's output (under `profilerd run`)"),
    ("ctrl+c", "under `profilerd run`: interrupt the training command; otherwise quit"),
    ("t", "toggle dark / light theme"),
    ("space", "replay: play / pause"),
    ("+ / -", "replay: speed 1× · 4× · 16×"),
    (". / ,", "replay: step one second forward / back"),
    ("] / [", "replay: ten seconds forward / back"),
    ("g / G", "replay: jump to the start / end (also home / end)"),
    ("?", "this help"),
)


class DetailsScreen(ModalScreen[None]):
    """Details of one item; ``snippet`` is what `c` copies."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,q,enter", "dismiss", "Close"),
        Binding("c", "copy", "Copy snippet", show=True),
    ]

    def __init__(self, title: str, body: RenderableType, snippet: str | None = None) -> None:
        super().__init__(classes="details")
        self.title_text = title
        self.body = body
        self.snippet = snippet

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog") as dialog:
            dialog.border_title = self.title_text
            dialog.border_subtitle = "esc close" + (" · c copy" if self.snippet else "")
            with VerticalScroll():
                yield Static(self.body, id="details-body")
        yield Footer()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        return bool(self.snippet) if action == "copy" else True

    def action_dismiss(self) -> None:  # type: ignore[override]
        self.dismiss(None)

    def action_copy(self) -> None:
        if self.snippet:
            self.app.copy_to_clipboard(self.snippet)
            self.app.notify("snippet copied to the clipboard", timeout=2)


class HelpScreen(DetailsScreen):
    def __init__(self) -> None:
        text = Text()
        for key, what in KEYS_HELP:
            text.append(f"{key:>16}  ", style="bold")
            text.append(f"{what}\n")
        text.append(
            "\nThe banner is the verdict: the bottleneck category, its severity, and the evidence.\n"
            "The bar splits step time into data wait, compute, communication and other;\n"
            "the sparkline is recent step times, with steps slower than p95 highlighted.\n"
            "A rank marked straggler does clearly more work per step than the others."
        )
        super().__init__("profilerd · keys", text)


class OutputScreen(ModalScreen[None]):
    """The training command's output, which the live view keeps off the screen while it runs."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,q,o", "dismiss", "Close")]

    def __init__(self, lines: Callable[[], list[str]]) -> None:
        super().__init__(classes="details")
        self._lines = lines
        self._shown = 0

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog") as dialog:
            dialog.border_title = "training command output"
            dialog.border_subtitle = "esc close"
            yield RichLog(id="output-log", max_lines=2000, wrap=False, markup=False, highlight=False)
        yield Footer()

    def on_mount(self) -> None:
        self._pull()
        self.set_interval(0.5, self._pull)

    def _pull(self) -> None:
        lines = self._lines()
        log = self.query_one(RichLog)
        if len(lines) < self._shown:  # the buffer rolled over
            log.clear()
            self._shown = 0
        for line in lines[self._shown :]:
            log.write(Text.from_ansi(line))
        self._shown = len(lines)

    def action_dismiss(self) -> None:  # type: ignore[override]
        self.dismiss(None)


class JobPicker(ModalScreen[str | None]):
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,q", "dismiss_none", "Close")]

    def __init__(self, jobs: tuple[str, ...], current: str | None) -> None:
        super().__init__(classes="details")
        self.jobs = jobs
        self.current = current

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog") as dialog:
            dialog.border_title = "watch which job?"
            options = [Option("follow the newest running job", id="")]
            options += [Option(("● " if job == self.current else "  ") + job, id=job) for job in self.jobs]
            yield OptionList(*options, id="job-list")
        yield Footer()

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option.id or "")

    def action_dismiss_none(self) -> None:
        self.dismiss(None)
