"""What a newcomer meets first: the README's first command in a fresh clone and a fresh venv on a
real terminal, and `profilerd tui` before any daemon runs."""

from __future__ import annotations

import os
import re
import select
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

INSTALL_AND_DEMO_S = 900  # a fresh venv installs torch and the dependencies from the package index


def readme_first_command(readme: Path) -> str:
    """The README's first ```sh block, its lines joined with `;` (as a newcomer pastes it)."""
    blocks = re.findall(r"^```(?:sh|bash|shell|console)\n(.*?)^```", readme.read_text(), re.MULTILINE | re.DOTALL)
    assert blocks, f"no ```sh block in {readme}"
    lines = [line.removeprefix("$ ").strip() for line in blocks[0].splitlines()]
    command = "; ".join(line for line in lines if line and not line.startswith("#"))
    assert "pip install" in command, f"the README's first shell block installs nothing: {command}"
    return command


def _clean_env(home: Path, runtime: Path) -> dict[str, str]:
    """The caller's environment (its pip index settings too) without anything of this checkout's venv."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PROFILERD_", "VIRTUAL_ENV", "PYTHON", "TORCHELASTIC_", "PYTEST_", "TMUX"))
    }
    venv_bin = str(Path(sys.prefix) / "bin")
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != venv_bin)
    env.update(HOME=str(home), XDG_RUNTIME_DIR=str(runtime), TERM="xterm-256color", PIP_DISABLE_PIP_VERSION_CHECK="1")
    # Only a free HTTP port, so that a daemon of someone else on this machine cannot collide with it.
    env["PROFILERD_HTTP_PORT"] = "0"
    return env


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux (.ci/run installs it)")
@pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(), reason="needs a git checkout")
def test_readme_first_command_in_a_fresh_clone_on_a_terminal(short_tmp: Path) -> None:
    """A clean clone of this checkout's HEAD, a fresh venv, the README's first command verbatim
    on a real terminal: it must exit 0, show no traceback, and end on the demo's verdict."""
    project, venv, home, runtime = (short_tmp / name for name in ("proj", "venv", "home", "run"))
    home.mkdir()
    runtime.mkdir(mode=0o700)
    subprocess.run(["git", "clone", "-q", str(REPO), str(project)], check=True, timeout=120)
    command = readme_first_command(project / "README.md")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    env = _clean_env(home, runtime)
    script = short_tmp / "newcomer.sh"
    script.write_text(
        f"cd {project} && . {venv}/bin/activate\n"
        "start=$(date +%s)\n"
        f"{command}\n"
        'echo "NEWCOMER-EXIT=$? after $(( $(date +%s) - start )) s"\n'
        "sleep 600\n"
    )
    tmux = ["tmux", "-S", str(short_tmp / "tmux.sock")]
    subprocess.run(
        [*tmux, "new-session", "-d", "-s", "nc", "-x", "120", "-y", "40", f"bash {script}"], env=env, check=True
    )
    subprocess.run([*tmux, "set-option", "-t", "nc", "history-limit", "10000"], env=env, capture_output=True)
    screen = live_view = ""
    try:
        deadline = time.monotonic() + INSTALL_AND_DEMO_S
        while time.monotonic() < deadline:
            time.sleep(1)
            alternate = subprocess.run(
                [*tmux, "display-message", "-p", "-t", "nc", "#{alternate_on}"], env=env, capture_output=True, text=True
            ).stdout.strip()
            screen = subprocess.run(
                [*tmux, "capture-pane", "-p", "-S", "-10000", "-t", "nc"], env=env, capture_output=True, text=True
            ).stdout
            if alternate == "1":  # the live view holds the alternate screen while the demo trains
                live_view = subprocess.run(
                    [*tmux, "capture-pane", "-p", "-t", "nc"], env=env, capture_output=True, text=True
                ).stdout
            if "NEWCOMER-EXIT=" in screen:
                break
    finally:
        subprocess.run([*tmux, "kill-server"], env=env, capture_output=True)
    shown = "\n".join(line for line in screen.splitlines() if not line.startswith("WARNING: Location"))
    print(f"$ {command}\n{shown[-6000:]}\n--- the live view, last seen ---\n{live_view}")  # for the log (pytest -s)
    exit_line = re.search(r"NEWCOMER-EXIT=(\d+) after (\d+) s", screen)
    assert exit_line, f"no exit after {INSTALL_AND_DEMO_S} s; the screen:\n{shown[-4000:]}"
    assert exit_line.group(1) == "0", f"`{command}` exited {exit_line.group(1)}; the screen:\n{shown[-4000:]}"
    assert "Traceback (most recent call last)" not in screen, f"a traceback on screen:\n{shown[-4000:]}"
    assert "DATA-BOUND" in screen, f"the demo's verdict is not on screen:\n{shown[-4000:]}"
    assert live_view.strip(), "the demo never showed its live view on the terminal"


def _on_a_terminal(args: list[str], env: dict[str, str], timeout: float = 60) -> tuple[int, str]:
    """`profilerd ARGS` with a pseudo-terminal as stdin, stdout and stderr: (exit code, what it wrote)."""
    controller, terminal = os.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "profilerd", *args], stdin=terminal, stdout=terminal, stderr=terminal, env=env, cwd=REPO
    )
    os.close(terminal)
    output = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([controller], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(controller, 65536)
                except OSError:  # the terminal is gone: every writer has exited
                    break
                if not chunk:
                    break
                output += chunk
            elif process.poll() is not None:
                break
        code = process.wait(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(controller)
    return code, output.decode(errors="replace")


def test_tui_without_a_daemon_says_where_it_looked_and_how_to_start_one(profilerd_env: dict[str, str]) -> None:
    code, output = _on_a_terminal(["tui"], profilerd_env)
    runtime = profilerd_env["XDG_RUNTIME_DIR"]
    assert code == 1, output
    assert "no profilerd daemon is running for this user" in output
    assert f"looked in {runtime}/profilerd" in output and "ingest.sock" in output
    assert "`profilerd serve`" in output and "`profilerd run -- python train.py`" in output
    assert "\x1b[?1049h" not in output  # the app never took over the screen
    assert "Traceback" not in output


def test_tui_with_a_url_nobody_answers_names_it(profilerd_env: dict[str, str]) -> None:
    with socket.socket() as closed:  # a port that was free a moment ago
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    code, output = _on_a_terminal(["tui", "--url", f"http://127.0.0.1:{port}"], profilerd_env)
    assert code == 1, output
    assert f"the profilerd daemon at http://127.0.0.1:{port} does not answer" in output
    assert "`profilerd serve`" in output and "\x1b[?1049h" not in output and "Traceback" not in output
