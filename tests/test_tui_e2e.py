"""The TUI as a user sees it: a real terminal (tmux) and a real pseudo-terminal, a real daemon,
a CPU workload under `profilerd run`, keys sent, the screen read back."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


class Tmux:
    """A private tmux server (its own socket), so a user's own sessions are never touched."""

    def __init__(self, env: dict[str, str], socket_dir: Path) -> None:
        self.socket = str(socket_dir / "tmux.sock")
        self.env = env

    def __call__(self, *args: str) -> str:
        result = subprocess.run(
            ["tmux", "-S", self.socket, *args], env=self.env, capture_output=True, text=True, timeout=10
        )
        return result.stdout

    def screen(self) -> str:
        return self("capture-pane", "-p", "-t", "pd")

    def wait_for(self, *needles: str, timeout: float = 45.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen()
            if all(n in screen for n in needles):
                return screen
            if time.monotonic() > deadline:
                raise AssertionError(f"{needles} never appeared; the screen was:\n{screen}")
            time.sleep(0.25)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux (.ci/run installs it)")
def test_live_view_under_run_in_tmux(profilerd_env: dict[str, str], fast_rules: Path, short_tmp: Path) -> None:
    env = dict(profilerd_env, TERM="xterm-256color", COLORTERM="truecolor")
    tmux = Tmux(env, short_tmp)
    command = (
        f"{sys.executable} -m profilerd run --rules {fast_rules} -- "
        f"{sys.executable} {EXAMPLES / 'data_starved.py'} --seconds 14; echo EXIT=$?; sleep 60"
    )
    tmux("new-session", "-d", "-s", "pd", "-x", "100", "-y", "30", "-c", str(REPO), command)
    try:
        screen = tmux.wait_for("DATA-BOUND", "data wait", "Recommendations", "● ")
        lines = screen.splitlines()
        assert lines[0].lstrip().startswith("profilerd") and "steps" in lines[0]
        banner = next(line for line in lines if "DATA-BOUND" in line)
        assert "critical" in banner or "warning" in banner
        assert "waiting for batches" in screen  # the evidence sentence
        assert any("█" in line for line in lines)  # the stacked bar
        assert "p50" in screen and "p95" in screen
        tmux("send-keys", "-t", "pd", "?")
        tmux.wait_for("profilerd · keys", "move between panels")
        tmux("send-keys", "-t", "pd", "Escape")
        time.sleep(0.5)  # a key right after ESC would read as alt+key
        tmux("send-keys", "-t", "pd", "o")
        tmux.wait_for("training command output")
        tmux("send-keys", "-t", "pd", "Escape")
        time.sleep(0.5)
        tmux("send-keys", "-t", "pd", "q")  # leave the view; the job keeps running, then reports
        left = tmux.wait_for("profilerd ▸")  # the plain status line takes over until the job ends
        assert "steps/s" in left
        final = tmux.wait_for("EXIT=0", timeout=60)
        assert "Recommendations (estimated whole-step speedup)" in final
        assert "Traceback" not in final
    finally:
        tmux("kill-server")


@pytest.mark.slow
def test_tui_is_the_default_live_view_on_a_tty(profilerd_env: dict[str, str], fast_rules: Path) -> None:
    """All three standard streams on a terminal: `run` shows the TUI (the alternate screen),
    the TUI closes when the command exits, the command's output and the verdict follow."""
    import pty

    leader, follower = pty.openpty()
    env = dict(profilerd_env, TERM="xterm-256color")
    code = (
        "import runpy, sys; print('hello from training', flush=True); "
        "sys.argv = ['x', '--seconds', '4']; "
        f"runpy.run_path({str(EXAMPLES / 'data_starved.py')!r}, run_name='__main__')"
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "profilerd", "run", "--rules", str(fast_rules), "--", sys.executable, "-c", code],
        env=env,
        stdin=follower,
        stdout=follower,
        stderr=follower,
        cwd=REPO,
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    assert process.wait(timeout=60) == 0
    os.close(leader)
    screen = b"".join(chunks).decode(errors="replace")
    assert "\x1b[?1049h" in screen  # the TUI took the alternate screen...
    after = screen.rsplit("\x1b[?1049l", 1)[-1]  # ...and gave it back when the command exited
    assert "hello from training" in after  # the command's output, held back while the TUI ran
    assert "DATA-BOUND" in after and "Recommendations" in after
    assert "profilerd ▸" not in screen  # no status line under the TUI


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux (.ci/run installs it)")
def test_attach_shows_the_live_view_in_tmux(profilerd_env: dict[str, str], short_tmp: Path) -> None:
    """`profilerd attach PID` on a terminal: the TUI over rolling verdicts; `q` exits cleanly."""
    env = dict(profilerd_env, TERM="xterm-256color", COLORTERM="truecolor")
    target = subprocess.Popen(
        [sys.executable, "-m", "profilerd.demo.starved", "--seconds", "60"],
        env={k: v for k, v in env.items() if k != "PYTHONPATH"},
        stdout=subprocess.DEVNULL,
    )
    tmux = Tmux(env, short_tmp)
    try:
        deadline = time.monotonic() + 30
        while "libtorch" not in Path(f"/proc/{target.pid}/maps").read_text():
            assert time.monotonic() < deadline, "the target never loaded torch"
            time.sleep(0.2)
        time.sleep(1.5)
        command = f"{sys.executable} -m profilerd attach {target.pid}; echo EXIT=$?; sleep 60"
        tmux("new-session", "-d", "-s", "pd", "-x", "100", "-y", "30", "-c", str(REPO), command)
        screen = tmux.wait_for(f"attach pid {target.pid}", "DATA-BOUND", "waiting for batches")
        assert "layer L" in screen
        tmux("send-keys", "-t", "pd", "q")
        final = tmux.wait_for("EXIT=0", timeout=30)
        assert "Traceback" not in final
        assert target.poll() is None  # detaching leaves the target running
    finally:
        tmux("kill-server")
        target.kill()
        target.wait(timeout=10)
