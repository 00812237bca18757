"""Configuration errors name the key and where it came from."""

from __future__ import annotations

from pathlib import Path

import pytest

from profilerd.config import DEFAULT_HTTP_PORT, load


def test_defaults_are_private_and_local(profilerd_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROFILERD_HTTP_PORT")
    config, problems = load()
    assert problems == []
    assert config.http_host == "127.0.0.1"
    assert config.http_port == DEFAULT_HTTP_PORT not in (9100, 9400)
    assert config.socket_path == Path(profilerd_env["XDG_RUNTIME_DIR"]) / "profilerd" / "ingest.sock"


def test_file_env_and_flags_layer_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "profilerd.toml"
    path.write_text("[daemon]\nhttp_port = 9999\nhost_interval_s = 2\nwindow_steps = 100\n")
    monkeypatch.setenv("PROFILERD_HTTP_PORT", "9888")
    config, problems = load(path, {"window_steps": 50})
    assert problems == []
    assert config.http_port == 9888  # environment over file
    assert config.window_steps == 50  # flags over everything
    assert config.host_interval_s == 2.0


def test_wrong_types_and_unknown_keys_are_named_with_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[daemon]\nhttp_port = "ninety"\nrecord = 1\nsampel_rate = 3\ngpu_interval_s = 0.01\n')
    _, problems = load(path)
    text = "\n".join(problems)
    assert f"{path}: 'http_port' must be int" in text
    assert f"{path}: 'record' must be bool" in text
    assert f"{path}: unknown key 'sampel_rate'" in text
    assert "gpu_interval_s must be between 0.1 (10 Hz) and 60" in text


def test_unreadable_or_invalid_files_are_problems_not_crashes(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    assert "config file not found" in load(missing)[1][0]
    broken = tmp_path / "broken.toml"
    broken.write_text("[daemon\n")
    assert "not valid TOML" in load(broken)[1][0]
