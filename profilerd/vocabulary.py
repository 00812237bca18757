"""The shared vocabulary of the daemon side: every module that names a category, a severity, a
phase, a fraction of step time or a clock event reason takes it from here.

The members are str-valued (``Term``), so the JSON documents (the verdict contract
``profilerd.verdict/v1`` among them), the recordings and the metric labels hold the same strings
as before. ``Phase`` is defined with the step record in ``profilerd_probes.schema``, which the
probes import without profilerd.
"""

from __future__ import annotations

from collections.abc import Mapping

from profilerd_probes.schema import Phase, Term

__all__ = [
    "COMPUTE_PHASES",
    "FRACTION_OF_CATEGORY",
    "POWER_REASONS",
    "PRIMARY_NONE",
    "PRIMARY_VALUES",
    "SLOWING_REASONS",
    "THERMAL_REASONS",
    "Category",
    "ClockEventReason",
    "Fraction",
    "Phase",
    "Severity",
    "Term",
    "fractions_from_phases",
]


class Category(Term):
    """What bounds a step: the verdict's ``primary`` and a finding's ``category``."""

    DATA = "data"
    COMPUTE = "compute"
    COMMUNICATION = "communication"
    ALGORITHM = "algorithm"


PRIMARY_NONE = "none"  # the verdict's primary when no category bounds the job
PRIMARY_VALUES: tuple[str, ...] = (*Category, PRIMARY_NONE)


class Severity(Term):
    """A finding's and a verdict's severity, in rising order."""

    OK = "ok"
    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"

    @property
    def rank(self) -> int:
        """0 for ok up to 3 for critical: the order severities compare and are exported in."""
        return _SEVERITY_RANK[self]


_SEVERITY_RANK = {severity: rank for rank, severity in enumerate(Severity)}


class Fraction(Term):
    """The four shares of step time that the verdict, the report and the views show."""

    DATA_WAIT = "data_wait"
    COMPUTE = "compute"
    COMMUNICATION = "communication"
    OTHER = "other"

    @property
    def column(self) -> str:
        """The seconds of this share in the analysis frame (``compute_s`` is forward + backward +
        optimizer, ``comm_s`` the step field)."""
        return "comm_s" if self is Fraction.COMMUNICATION else f"{self.value}_s"


COMPUTE_PHASES = (Phase.FORWARD, Phase.BACKWARD, Phase.OPTIMIZER)
_FRACTION_OF_PHASE = {
    Phase.DATA_WAIT: Fraction.DATA_WAIT,
    **dict.fromkeys(COMPUTE_PHASES, Fraction.COMPUTE),
    Phase.COMMUNICATION: Fraction.COMMUNICATION,
    Phase.OTHER: Fraction.OTHER,
}


def fractions_from_phases(phases: Mapping[str, float]) -> dict[str, float]:
    """The four shares from the six phases (compute = forward + backward + optimizer); a phase
    that is missing counts 0."""
    fractions = dict.fromkeys(Fraction, 0.0)
    for phase, fraction in _FRACTION_OF_PHASE.items():
        fractions[fraction] += phases.get(phase, 0.0)
    return {str(key): value for key, value in fractions.items()}


# The share of step time that a finding of each category costs (algorithm findings: the rest);
# keyed by str, as categories arrive from documents and rule files as plain strings.
FRACTION_OF_CATEGORY: dict[str, Fraction] = {
    Category.DATA: Fraction.DATA_WAIT,
    Category.COMPUTE: Fraction.COMPUTE,
    Category.COMMUNICATION: Fraction.COMMUNICATION,
    Category.ALGORITHM: Fraction.OTHER,
}


class ClockEventReason(Term):
    """Why a GPU runs below its clock (NVML's clock event, formerly throttle, reasons)."""

    IDLE = "idle"
    APPLICATIONS_CLOCKS = "applications_clocks"
    SW_POWER_CAP = "sw_power_cap"
    HW_SLOWDOWN = "hw_slowdown"
    SYNC_BOOST = "sync_boost"
    SW_THERMAL = "sw_thermal"
    HW_THERMAL = "hw_thermal"
    HW_POWER_BRAKE = "hw_power_brake"
    DISPLAY_CLOCKS = "display_clocks"


THERMAL_REASONS = frozenset({ClockEventReason.SW_THERMAL, ClockEventReason.HW_THERMAL})
POWER_REASONS = frozenset(
    {ClockEventReason.SW_POWER_CAP, ClockEventReason.HW_POWER_BRAKE, ClockEventReason.HW_SLOWDOWN}
)
# The reasons that slow a busy GPU (idle, application clocks, sync boost and display are not).
SLOWING_REASONS = THERMAL_REASONS | POWER_REASONS
