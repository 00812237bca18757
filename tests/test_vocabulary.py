"""The shared vocabulary: str-valued Enums that documents, frames and metric labels see as the
plain strings they were, defined once."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from profilerd import vocabulary
from profilerd.analysis.features import steps_frame, with_phases
from profilerd.model import StepRecord
from profilerd.vocabulary import Category, ClockEventReason, Fraction, Phase, Severity, Term, fractions_from_phases
from profilerd_probes import schema

REPO = Path(__file__).resolve().parents[1]
TERMS: tuple[type[Term], ...] = (Category, Severity, Phase, Fraction, ClockEventReason)
DEFINING_MODULES = {REPO / "probes" / "schema.py", REPO / "profilerd" / "vocabulary.py"}


@pytest.mark.parametrize("member", [m for term in TERMS for m in term], ids=str)
def test_a_term_is_its_string_in_json_text_and_lookups(member: Term) -> None:
    value = member.value
    assert json.dumps({member: [member]}) == json.dumps({value: [value]})  # the verdict document
    assert (str(member), f"{member}", f"{member:>20}", " ".join([member])) == (value, value, f"{value:>20}", value)
    assert member == value and {value: 1}[member] == 1 and {member: 1}[value] == 1


def test_phase_and_fraction_columns_are_the_frames_columns() -> None:
    step = StepRecord("job", 0, 1, 1, 10.0, 1.0, 0.1, 0.2, 0.3, 0.1, 0.05)
    frame = with_phases(steps_frame([step]))
    assert {p.column for p in Phase} - {"other_s"} <= set(schema.STEP_COLUMNS)
    assert frame[[p.column for p in Phase]].sum(axis=1).iloc[0] == pytest.approx(1.0)
    assert frame[[f.column for f in Fraction]].sum(axis=1).iloc[0] == pytest.approx(1.0)


def test_fractions_from_phases_folds_the_compute_phases() -> None:
    shares = fractions_from_phases({"data_wait": 0.1, "forward": 0.2, "backward": 0.3, "optimizer": 0.1, "other": 0.3})
    assert shares == pytest.approx({"data_wait": 0.1, "compute": 0.6, "communication": 0.0, "other": 0.3})
    assert all(type(key) is str for key in shares)
    assert set(vocabulary.FRACTION_OF_CATEGORY) == set(Category)


def test_severities_rank_in_rising_order() -> None:
    assert [s.rank for s in (Severity.OK, Severity.INFO, Severity.WARNING, Severity.CRITICAL)] == [0, 1, 2, 3]


def _string_collections(tree: ast.AST) -> list[tuple[int, set[str]]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Tuple | ast.List | ast.Set):
            strings = {e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
            found.append((node.lineno, strings))
    return found


def test_no_module_spells_out_a_vocabulary_again() -> None:
    """A tuple, list or set literal of three or more terms of one Enum, and nothing else, is a
    second definition that can drift from the first (tables keyed by term, such as colours, and
    lists of labels are fine)."""
    spelled = []
    for folder in ("probes", "profilerd", "tui"):
        for path in sorted((REPO / folder).rglob("*.py")):
            if path in DEFINING_MODULES:
                continue
            for line, strings in _string_collections(ast.parse(path.read_text())):
                for term in TERMS:
                    if len(strings) >= 3 and strings <= {m.value for m in term}:
                        spelled.append(f"{path.relative_to(REPO)}:{line}: {term.__name__} {sorted(strings)}")
    assert not spelled, "\n".join(spelled)
