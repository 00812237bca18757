"""Diagnosis rules as data: each has an id, a category, overridable thresholds and a pure check.

Thresholds and the assumptions behind speedup estimates come from ``default_rules.toml``,
overridden by a user's rules file. ``docs/rules.md`` is generated from ``REGISTRY``. Each
category's rules live in their own module; importing this package registers them all, in the
order of the categories below (the order the docs list them and ties between findings keep).
"""

from __future__ import annotations

# isort: off
from profilerd.analysis.rules import data  # noqa: F401  (importing a category registers its rules)
from profilerd.analysis.rules import compute  # noqa: F401
from profilerd.analysis.rules import communication  # noqa: F401
from profilerd.analysis.rules import algorithm  # noqa: F401

# isort: on
from profilerd.analysis.rules.base import DEFAULT_RULES_FILE, REGISTRY, Rule, RuleSet, load_rules
from profilerd.analysis.rules.rationale import RATIONALE

__all__ = ["DEFAULT_RULES_FILE", "RATIONALE", "REGISTRY", "Rule", "RuleSet", "load_rules"]
