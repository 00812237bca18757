"""Config files with any keys and values of any type: never an exception, and every problem
names the key and the file (tests/test_config.py has the hand-written cases)."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any
from unittest import mock

from hypothesis import given, settings
from hypothesis import strategies as st

from profilerd.config import _TYPES, load

KNOWN = sorted(_TYPES)
scalars = (
    st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False)
    | st.booleans()
    | st.text(alphabet=st.characters(exclude_categories=("Cs", "Cc")), max_size=20)
)
values = scalars | st.lists(scalars, max_size=3)
keys = st.sampled_from(KNOWN) | st.from_regex(r"[a-z][a-z0-9_]{0,15}", fullmatch=True)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return repr(value)


def well_typed(key: str, value: Any) -> bool:
    wanted = _TYPES[key]
    if isinstance(value, bool) and bool not in wanted:
        return False
    if key == "allowed_uids":
        return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
    return isinstance(value, wanted)


@settings(max_examples=200, deadline=None)
@given(table=st.dictionaries(keys, values, max_size=6), sectioned=st.booleans())
def test_every_bad_key_or_type_is_named_with_the_file(table: dict[str, Any], sectioned: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "profilerd.toml"
        lines = ["[daemon]"] if sectioned else []
        lines += [f"{key} = {toml_value(value)}" for key, value in table.items()]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        clean = {k: v for k, v in os.environ.items() if not k.startswith("PROFILERD_")}
        with mock.patch.dict(os.environ, clean, clear=True):
            _, problems = load(path)
    text = "\n".join(problems)
    for key, value in table.items():
        if key not in _TYPES:
            assert f"{path}: unknown key '{key}'" in text
        elif not well_typed(key, value):
            assert f"{path}: '{key}' must be" in text, (key, value, problems)
    for problem in problems:  # every value came from the file, so every problem names it
        assert problem.startswith(f"{path}: "), problem


def test_unknown_sections_and_stray_keys_are_named(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text("http_port = 1\n[daemon]\nhttp_port = 9000\n[deamon]\nrecord = false\n")
    _, problems = load(path)
    assert f"{path}: unknown key 'http_port' (outside [daemon])" in problems
    assert f"{path}: unknown section [deamon]" in problems


def test_bad_environment_values_are_named(monkeypatch: Any) -> None:
    monkeypatch.setenv("PROFILERD_HTTP_PORT", "ninety")
    monkeypatch.setenv("PROFILERD_ALLOWED_UIDS", "1000,bob")
    _, problems = load()
    assert "environment PROFILERD_HTTP_PORT='ninety': not a valid int" in problems
    assert "environment PROFILERD_ALLOWED_UIDS='1000,bob': not a valid comma-separated list of user ids" in problems


def test_allowed_uids_from_file_and_environment(tmp_path: Path, monkeypatch: Any) -> None:
    path = tmp_path / "p.toml"
    path.write_text("[daemon]\nallowed_uids = [1000, 1001]\n")
    config, problems = load(path)
    assert problems == [] and config.allowed_uids == (1000, 1001)
    monkeypatch.setenv("PROFILERD_ALLOWED_UIDS", "2000, 2001")
    assert load(path)[0].allowed_uids == (2000, 2001)
    path.write_text('[daemon]\nallowed_uids = [1000, "bob", -1]\n')
    assert f"{path}: 'allowed_uids' must be a list of user ids" in "\n".join(load(path)[1])
