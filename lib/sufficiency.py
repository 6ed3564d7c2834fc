"""Whether an offline evaluation holds enough held-out pairs to mean anything.

A 1-day holdout, or a window that leaves out almost all the data, still "succeeds" with a
handful of scored pairs: every hit-rate is then a coin toss over 4-7 pairs, and a rule such as
"model >= popularity" passes or fails by chance. Below ``MIN_PAIRS`` held-out (query, target)
pairs of the model the evaluation is marked ``insufficient``: the gate's verdict and the
``runs`` row say so instead of ``succeeded``. Spark-free, so the gate can use it on the
orchestrator.
"""

from __future__ import annotations

from collections.abc import Mapping

# At 100 pairs a hit-rate of 0.3 carries a binomial standard error of about 0.046: coarse, but
# big differences between methods show. Below that a single pair moves it by a percent or more.
MIN_PAIRS = 100
SUFFICIENT, INSUFFICIENT = "sufficient", "insufficient"


def assess(pairs: float | None, min_pairs: int = MIN_PAIRS) -> dict:
    """``{"status", "reason", "pairs", "min_pairs"}`` for the model's held-out pair count.

    ``pairs`` is ``metrics["model"]["pairs"]`` of the evaluation; None (missing) counts as
    insufficient, since nothing shows the evaluation scored anything.
    """
    if pairs is None:
        reason = "the evaluation has no model.pairs: nothing shows it scored any held-out pair"
    elif pairs < min_pairs:
        reason = (
            f"{int(pairs)} held-out pairs of the model, fewer than {min_pairs}: too few to tell "
            "methods apart; widen --holdout-days or --lookback-days, or lower --min-pairs"
        )
    else:
        reason = None
    return {
        "status": SUFFICIENT if reason is None else INSUFFICIENT,
        "reason": reason,
        "pairs": None if pairs is None else int(pairs),
        "min_pairs": min_pairs,
    }


def model_pairs(metrics: Mapping) -> float | None:
    """The model's held-out pair count from nested (``{"model": {"pairs": n}}``, metrics.json)
    or flat (``{"model.pairs": n}``, the evaluate stage's result) metrics."""
    nested = metrics.get("model")
    if isinstance(nested, Mapping):
        return nested.get("pairs")
    return metrics.get("model.pairs")
