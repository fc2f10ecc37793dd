"""Reporting the samples that losses left out for non-finite values.

A loss that meets a non-finite sample (a generator output, a teacher or fake-score prediction) leaves it out
of its mean and counts it in the metric ``<update>/nonfinite_rows`` (``methods/distribution.py``). The trainer
averages metrics over each log window; at a log step, ``warn_nonfinite_rows`` turns the non-zero counts into
one warning line, so that a run that keeps going on fewer samples says so. An update whose loss or gradients
are not finite is a different matter: the trainer skips it and stops after ``max_nonfinite_streak`` in a row.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

log = logging.getLogger("jdistill")

NONFINITE_SUFFIX = "nonfinite_rows"  # ``<update>/nonfinite_rows``, or ``<update>/<loss>_nonfinite_rows``


def is_count(key: str) -> bool:
    """Whether the metric ``key`` counts samples left out (summed over micro-batches, not averaged)."""
    return key.rsplit("/", 1)[-1].endswith(NONFINITE_SUFFIX)


def nonfinite_rows(values: Mapping[str, float]) -> dict[str, float]:
    """{update (or update/loss): mean non-finite rows per step} for the counts of a logged window that left
    samples out."""
    return {
        key.removesuffix(NONFINITE_SUFFIX).rstrip("/_"): float(v)
        for key, v in values.items()
        if is_count(key) and float(v) > 0
    }


def warn_nonfinite_rows(values: Mapping[str, float], step: int, logger: logging.Logger = log) -> str | None:
    """Log one warning when the window's metrics ``values`` (as written to metrics.jsonl at ``step``) count
    samples left out for non-finite values; returns the line, or None when there were none."""
    counts = nonfinite_rows(values)
    if not counts:
        return None
    each = ", ".join(f"{update} {count:.3g}" for update, count in sorted(counts.items()))
    line = (
        f"step {step}: non-finite samples left out of the losses (mean per step over the log window): {each}; "
        "the updates ran on the finite ones. Recurring counts point at the inputs, the precision or the "
        "learning rate"
    )
    logger.warning("%s", line)
    return line
