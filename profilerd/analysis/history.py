"""Run-wide loss evidence: what a window cannot show, kept from the first step of the run.

A non-finite loss, a loss that rose far above its early values, and a loss that never moved
are decisive whenever in the run they happened, so they must not depend on which steps the
current window holds. ``LossHistory`` folds loss readings in batches (vectorised, in step
order) into a few numbers: the live analysis feeds it each tick's new steps, the offline
analysis feeds it the whole recording at once, and both read the same ``LossSummary``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from profilerd_probes.wire import FLAG_HAS_LOSS, FLAG_HAS_LR

# The loss at the start is the first finite reading: it is taken before any update, and with
# the loss read every early step a median of the next few would already include a blow-up.
BASELINE_READINGS = 1
SUSTAINED_READINGS = 5  # a rise counts when this many consecutive readings agree (a median)


@dataclass(frozen=True)
class LossSummary:
    """The loss over the whole run so far; None where nothing was measured."""

    readings: int = 0
    nonfinite: int = 0
    first_nonfinite_step: int | None = None
    first_nonfinite_rank: int | None = None
    first_nonfinite_value: float | None = None
    baseline: float | None = None  # the first finite reading
    peak: float | None = None  # highest median of SUSTAINED_READINGS consecutive readings
    peak_step: int | None = None
    low: float | None = None  # smallest and largest finite reading
    high: float | None = None
    lr_max: float | None = None  # largest |learning rate| seen, None if never measured
    steps_seen: int = 0  # step records seen, with or without a loss
    first_step: int | None = None  # the steps of the first and the latest reading
    last_step: int | None = None

    @property
    def steps_spanned(self) -> int:
        """How many steps the readings cover (readings may be spaced out in time)."""
        if self.first_step is None or self.last_step is None:
            return 0
        return self.last_step - self.first_step + 1

    @property
    def rise_ratio(self) -> float | None:
        if self.baseline is None or self.peak is None or self.baseline <= 0:
            return None
        return self.peak / self.baseline

    @property
    def relative_range(self) -> float | None:
        """(largest - smallest) finite reading over |baseline|: 0 when the loss never moved."""
        if self.low is None or self.high is None or not self.baseline:
            return None
        return (self.high - self.low) / abs(self.baseline)


def loss_readings(steps: pd.DataFrame) -> pd.DataFrame:
    """The measured losses of a step frame, unscaled from GradScaler's scale, in time order."""
    flags = steps["flags"].astype(int)
    # Only the columns needed: a recording's frame has millions of rows and twenty columns.
    measured = steps.loc[(flags & FLAG_HAS_LOSS) > 0, ["end_unix_s", "rank", "step", "loss", "scaler_scale"]]
    loss = measured["loss"].astype(float)
    scale = measured["scaler_scale"].astype(float)
    # The probe reads the loss passed to backward(): under GradScaler that is the scaled loss.
    readings = measured.drop(columns="scaler_scale").assign(loss=loss.where(~(scale > 0), loss / scale))
    if readings["end_unix_s"].is_monotonic_increasing:  # as recorded
        return readings
    return readings.sort_values(["end_unix_s", "rank"], kind="stable")


class LossHistory:
    """Accumulates ``LossSummary`` over batches of steps; each batch must follow the previous."""

    def __init__(self) -> None:
        self._readings = 0
        self._nonfinite = 0
        self._first_bad: tuple[int, int, float] | None = None
        self._early: list[float] = []
        self._tail = np.empty(0)  # the last finite readings, to continue the rolling median
        self._peak: tuple[float, int] | None = None
        self._low: float | None = None
        self._high: float | None = None
        self._lr_max: float | None = None
        self._steps_seen = 0
        self._first_step: int | None = None
        self._last_step: int | None = None

    def update(self, steps: pd.DataFrame) -> None:
        if steps.empty:
            return
        self._steps_seen += len(steps)
        flags = steps["flags"].astype(int)
        lrs = steps.loc[(flags & FLAG_HAS_LR) > 0, "lr"].astype(float).abs().dropna()
        if not lrs.empty:
            self._lr_max = max(self._lr_max or 0.0, float(lrs.max()))
        readings = loss_readings(steps)
        if readings.empty:
            return
        values = readings["loss"].to_numpy(np.float64)
        finite = np.isfinite(values)
        numbers = readings["step"].to_numpy()
        if self._first_step is None:
            self._first_step = int(numbers[0])
        self._last_step = max(self._last_step or 0, int(numbers.max()))
        self._readings += len(values)
        self._nonfinite += int((~finite).sum())
        if self._first_bad is None and not finite.all():
            at = int(np.argmax(~finite))
            row = readings.iloc[at]
            self._first_bad = (int(row["step"]), int(row["rank"]), float(values[at]))
        good = values[finite]
        good_steps = readings["step"].to_numpy()[finite]
        if good.size == 0:
            return
        if len(self._early) < BASELINE_READINGS:
            self._early.extend(good[: BASELINE_READINGS - len(self._early)].tolist())
        low, high = float(good.min()), float(good.max())
        self._low = low if self._low is None else min(self._low, low)
        self._high = high if self._high is None else max(self._high, high)
        # A rolling median over the carried tail and this batch: single spikes do not count.
        carried = self._tail.size
        joined = np.concatenate([self._tail, good])
        medians = pd.Series(joined).rolling(SUSTAINED_READINGS).median().to_numpy()[carried:]
        if np.isfinite(medians).any():
            at = int(np.nanargmax(medians))
            if self._peak is None or medians[at] > self._peak[0]:
                self._peak = (float(medians[at]), int(good_steps[at]))
        self._tail = joined[-(SUSTAINED_READINGS - 1) :]

    def summary(self) -> LossSummary:
        first = self._first_bad
        return LossSummary(
            readings=self._readings,
            nonfinite=self._nonfinite,
            first_nonfinite_step=first[0] if first else None,
            first_nonfinite_rank=first[1] if first else None,
            first_nonfinite_value=first[2] if first else None,
            baseline=float(np.median(self._early)) if self._early else None,
            peak=self._peak[0] if self._peak else None,
            peak_step=self._peak[1] if self._peak else None,
            low=self._low,
            high=self._high,
            lr_max=self._lr_max,
            steps_seen=self._steps_seen,
            first_step=self._first_step,
            last_step=self._last_step,
        )


def summarize_losses(steps: pd.DataFrame) -> LossSummary:
    """The run-wide summary of a whole step frame (a recording, or a replay up to a moment)."""
    history = LossHistory()
    history.update(steps)
    return history.summary()
