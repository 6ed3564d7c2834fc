"""bench/quality.py's scoring: pair ranks, hit/MRR and the paired user bootstrap, by hand."""

import importlib.util
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

_PATH = Path(__file__).resolve().parents[1] / "bench" / "quality.py"
_SPEC = importlib.util.spec_from_file_location("quality_bench", _PATH)
quality = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(quality)


def lists(rows):
    return pd.DataFrame(rows, columns=["listing_id", "neighbour_id", "rank", "score"])


PAIRS = pd.DataFrame(
    [
        # user, query, target, cold
        ("u1", "A", "B", False),  # rank 1
        ("u1", "B", "C", False),  # rank 4
        ("u2", "A", "D", True),  # rank 12: beyond 10, a miss at 10
        ("u2", "C", "A", False),  # C has no list: miss
        ("u3", "B", "E", True),  # E not in B's list: miss
    ],
    columns=["user_id", "query_id", "target_id", "is_cold"],
)
LISTS = lists(
    [
        ("A", "B", 1, 0.9),
        ("A", "E", 2, 0.8),
        ("A", "D", 12, 0.1),
        ("B", "A", 1, 0.9),
        ("B", "C", 4, 0.5),
        ("B", "C", 7, 0.4),  # a duplicate row: the better rank counts
    ]
)


def test_pair_ranks_hits_and_mrr_match_hand_computation():
    ranks = quality.pair_ranks(PAIRS, LISTS)
    assert ranks.tolist() == [1.0, 4.0, 12.0, math.inf, math.inf]
    m = quality.ranking_metrics(ranks, PAIRS["is_cold"].to_numpy())
    assert m["hit_rate_at_10"] == pytest.approx(2 / 5)
    assert m["hit_rate_at_10_warm"] == pytest.approx(2 / 3)  # pairs 1, 2 hit; 4 misses
    assert m["hit_rate_at_10_cold"] == 0.0
    assert m["mrr_at_10"] == pytest.approx((1 + 1 / 4) / 5)
    assert (m["pairs"], m["pairs_warm"], m["pairs_cold"]) == (5, 3, 2)


def test_empty_segment_gives_none():
    warm_only = PAIRS[~PAIRS["is_cold"]]
    m = quality.ranking_metrics(quality.pair_ranks(warm_only, LISTS), np.zeros(3, bool))
    assert m["hit_rate_at_10_cold"] is None
    assert m["pairs_cold"] == 0
    assert quality.paired_bootstrap(np.array([]), np.array([]), np.array([])) is None


def test_bootstrap_of_a_method_against_itself_is_exactly_zero():
    scores = quality.score_methods(PAIRS, {"model": LISTS, "same": LISTS.copy()}, resamples=200)
    for name in ("model", "same"):
        for segment in ("all", "warm", "cold"):
            assert scores[name]["delta_vs_model"][segment] == (0.0, 0.0, 0.0)


def test_method_better_on_every_user_has_an_interval_above_zero():
    rng = np.random.default_rng(1)
    users = np.repeat(np.arange(50), 3)
    model = rng.integers(0, 2, users.size).astype(float)
    better = model.copy()
    better[::3] = 1.0  # one more hit per user than the model had at that pair...
    model[::3] = 0.0  # ...which the model misses
    mean, lo, hi = quality.paired_bootstrap(users, better, model, resamples=1000, seed=0)
    assert 0 < lo <= mean <= hi
    assert mean == pytest.approx(1 / 3)


def test_score_methods_reports_deltas_against_model_per_segment():
    worse = LISTS[LISTS["listing_id"] != "A"]  # loses the hit of pair 1
    scores = quality.score_methods(PAIRS, {"model": LISTS, "worse": worse}, resamples=300)
    mean, lo, hi = scores["worse"]["delta_vs_model"]["all"]
    assert mean == pytest.approx(-1 / 5)
    assert lo <= mean <= hi <= 0.0
    assert scores["worse"]["delta_vs_model"]["cold"] == (0.0, 0.0, 0.0)
    assert scores["worse"]["hit_rate_at_10"] == pytest.approx(1 / 5)
    table = quality.format_table(scores)
    assert table.splitlines()[2].startswith("model")
