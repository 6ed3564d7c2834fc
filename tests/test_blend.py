"""The blend: its grid, its per-listing arithmetic, the choice on validation, the Spark path."""

import numpy as np
import pyarrow as pa
import pytest
from pyspark.sql.types import (
    ArrayType,
    FloatType,
    IntegerType,
    StringType,
    StructField,
    StructType,
)

from lib import blend
from lib.cointeraction import RP3_ALPHAS, PairColumns, Variant
from schemas import training_examples as te

ITEMKNN = Variant("itemknn")


def pair_columns(common):
    common = np.asarray(common, dtype=float)
    n = len(common)
    return PairColumns(
        common=common,
        dot=common,
        rp3=np.ones((n, len(RP3_ALPHAS))),
        listing_users=4.0,
        listing_norm=2.0,
        partner_users=np.full(n, 4.0),
        partner_norm=np.full(n, 2.0),
    )


def query(query_id, *, cf=(), content=(), model=(), targets=(), support=5.0):
    cf_ids = np.array([i for i, _ in cf], dtype=object)
    return blend.ValidationQuery(
        query_id=query_id,
        support=support,
        cf_ids=cf_ids,
        cf_columns=pair_columns([c for _, c in cf]),
        content_ids=np.array([i for i, _ in content], dtype=object),
        content_scores=np.array([s for _, s in content], dtype=float),
        model_ids=np.array([i for i, _ in model], dtype=object),
        model_scores=np.array([s for _, s in model], dtype=float),
        targets=list(targets),
    )


def test_the_grid_holds_each_pure_component_first_and_sums_to_one():
    grid = blend.weight_grid()
    np.testing.assert_array_equal(grid[: len(blend.COMPONENTS)], np.eye(len(blend.COMPONENTS)))
    np.testing.assert_allclose(grid.sum(axis=1), 1.0)
    assert (grid >= 0).all()
    assert len({tuple(row) for row in grid}) == len(grid) == 66


def test_support_groups_follow_the_edges():
    np.testing.assert_array_equal(
        blend.support_group([0, 1, 2, 3, 9, 10, 500]), [0, 1, 1, 2, 2, 3, 3]
    )
    assert blend.group_names() == ["cold", "users_1-2", "users_3-9", "users_10+"]


def test_absent_scores_take_the_lowest_present_one_before_standardising():
    raw = np.array([[3.0, np.nan, 0.5], [1.0, 0.9, np.nan], [np.nan, 0.1, 0.5]])
    z = blend.standardise(raw)
    filled = np.array([[3.0, 0.1, 0.5], [1.0, 0.9, 0.5], [1.0, 0.1, 0.5]])
    expected = (filled - filled.mean(0)) / np.where(filled.std(0) > 0, filled.std(0), 1)
    expected[:, 2] = 0.0  # no spread
    np.testing.assert_allclose(z, expected)
    assert (blend.standardise(np.full((3, 1), np.nan)) == 0).all()


def test_the_union_excludes_the_listing_itself_and_cuts_co_interaction():
    found = blend.candidate_union(
        np.array(["b", "c", "d", "q"], dtype=object),
        np.array([3.0, 2.0, 1.0, 9.0]),
        ["e", "b"],
        [0.9, 0.8],
        ["q", "f"],
        [1.0, 0.7],
        query_id="q",
        cf_limit=3,
    )
    assert list(found.ids) == ["b", "c", "e", "f"]
    np.testing.assert_allclose(found.raw[0], [3.0, 0.8, np.nan])
    np.testing.assert_allclose(found.raw[2], [np.nan, 0.9, np.nan])


def test_target_rank_breaks_ties_by_the_smaller_id_like_published_lists():
    ids = np.array(["a", "b", "c"], dtype=object)
    scores = np.array([[1.0], [1.0], [2.0]])
    assert blend.target_ranks(scores, ids, "b")[0] == 3
    assert blend.target_ranks(scores, ids, "a")[0] == 2
    assert blend.target_ranks(scores, ids, "zz") is None
    ranked_ids, _ = blend.ranked(ids, scores[:, 0], 3)
    assert list(ranked_ids) == ["c", "a", "b"]


def validation_set(rng, n_queries=120):
    """Queries where co-interaction finds the targets of well-supported listings and content
    those of cold ones; the model's list is noise."""
    found = []
    for q in range(n_queries):
        cold = q % 2 == 0
        ids = [f"x{q}_{j}" for j in range(15)]
        target = ids[int(rng.integers(15))]
        content = [
            (i, 0.5 + 0.01 * rng.random() + (0.3 if i == target and cold else 0)) for i in ids
        ]
        cf = (
            [] if cold else [(i, 1 + int(rng.integers(3)) + (5 if i == target else 0)) for i in ids]
        )
        model = [(i, rng.random()) for i in ids]
        found.append(
            query(
                f"q{q}",
                cf=cf,
                content=content,
                model=model,
                targets=[target],
                support=0.0 if cold else 20.0,
            )
        )
    return found


def test_validation_picks_content_for_cold_and_co_interaction_for_supported_listings():
    choice = blend.choose_weights(
        validation_set(np.random.default_rng(0)), ITEMKNN, cf_limit=50, min_group_pairs=30
    )
    assert choice["weights"]["cold"]["content"] > choice["weights"]["cold"]["model"]
    supported = choice["weights"]["users_10+"]
    assert supported["cointeraction"] > supported["model"]
    assert choice["hit_rate_at_10"]["blend"] == pytest.approx(1.0)
    assert choice["pairs_by_group"] == {"cold": 60, "users_1-2": 0, "users_3-9": 0, "users_10+": 60}


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_on_validation_the_blend_is_never_below_a_pure_component(seed):
    rng = np.random.default_rng(seed)
    queries = []
    for q in range(200):
        ids = [f"c{j}" for j in range(20)]
        queries.append(
            query(
                f"q{q}",
                cf=[(i, int(rng.integers(1, 4))) for i in ids[: int(rng.integers(0, 20))]],
                content=[(i, rng.random()) for i in ids[5:]],
                model=[(i, rng.random()) for i in ids[:15]],
                targets=[ids[int(rng.integers(20))]],
                support=float(rng.integers(0, 30)),
            )
        )
    choice = blend.choose_weights(queries, ITEMKNN, cf_limit=50, min_group_pairs=1)
    rates = choice["hit_rate_at_10"]
    # Content always meets the cold bar, so the blend never falls below it; the others it
    # beats unless they miss the bar (here they never do: no target is cold).
    assert all(rates["blend"] >= rates[c] - 1e-12 for c in blend.COMPONENTS)


def test_the_choice_keeps_cold_pairs_at_least_as_good_as_content():
    rng = np.random.default_rng(4)
    queries = []
    for q in range(200):
        ids = [f"c{j}" for j in range(30)]
        cold = q % 4 == 0  # a quarter of the targets are new listings only content finds
        target = ids[int(rng.integers(30))]
        cf = [(i, 1 + (8 if i == target and not cold else int(rng.integers(3)))) for i in ids[:25]]
        cf = [(i, c) for i, c in cf if not (cold and i == target)]
        content = [(i, rng.random() + (2.0 if i == target and cold else 0.0)) for i in ids]
        found = query(f"q{q}", cf=cf, content=content, model=[], targets=[target], support=20.0)
        found.cold_targets = frozenset([target] if cold else [])
        found.content_new = np.array([cold and i == target for i in ids])
        queries.append(found)
    choice = blend.choose_weights(queries, ITEMKNN, cf_limit=50, min_group_pairs=1)
    grid = blend.weight_grid()
    # Pure co-interaction would win overall (3/4 of the pairs) and miss every cold one.
    assert choice["hit_rate_at_10"]["cointeraction"] >= 0.6
    weights = choice["weights"]["users_10+"]
    assert weights["content"] > 0
    rows = [q for q in queries if q.cold_targets]
    fill = weights["new_listing_cointeraction"]
    w = np.array([weights[c] for c in blend.COMPONENTS])
    cold_hits = []
    for q in rows:
        found = q.candidates(ITEMKNN, 50)
        ranks = blend.target_ranks(
            (blend.standardise(found.raw, found.new, fill) @ w)[:, None], found.ids, q.targets[0]
        )
        cold_hits.append(ranks is not None and ranks[0] <= 10)
    assert np.mean(cold_hits) >= 0.99
    assert len(grid) == 66


@pytest.mark.parametrize(
    ("pairs", "runs"),
    [
        # a shop: few new and sparsely bought items, most pairs among the popular ones
        ((110, 120, 497, 36261), [(0, 1), (1, 2), (2, 2), (3, 3)]),
        # the generated marketplace's split: the cold group reaches 200 only with 3-9
        ((154, 3, 164, 2344), [(0, 2), (1, 3), (2, 3), (3, 3)]),
        # not enough anywhere: every group is judged on all pairs
        ((10, 20, 30, 40), [(0, 3)] * 4),
    ],
)
def test_a_small_group_borrows_the_pairs_of_its_neighbours_in_support(pairs, runs):
    counts = np.array(pairs)
    assert [blend.pooled_groups(counts, g, 200) for g in range(4)] == runs


def test_the_cold_group_is_chosen_with_the_sparsely_supported_not_the_popular():
    rng = np.random.default_rng(5)
    queries = []
    for q in range(600):
        support = 0.0 if q < 60 else 1.0 if q < 260 else 20.0
        ids = [f"c{j}" for j in range(30)]
        target = ids[int(rng.integers(30))]
        sparse = support < 10
        # Popular listings: co-interaction finds the target. The others: only content does,
        # and the model points at a decoy.
        cf = (
            [] if support == 0 else [(i, 1 + (8 if i == target and not sparse else 0)) for i in ids]
        )
        content = [(i, rng.random() + (2.0 if i == target and sparse else 0.0)) for i in ids]
        model = [(i, rng.random() + (2.0 if i == ids[0] and sparse else 0.0)) for i in ids]
        found = query(
            f"q{q}", cf=cf, content=content, model=model, targets=[target], support=support
        )
        queries.append(found)
    choice = blend.choose_weights(queries, ITEMKNN, cf_limit=50)
    assert choice["pairs_by_group"] == {
        "cold": 60,
        "users_1-2": 200,
        "users_3-9": 0,
        "users_10+": 340,
    }
    assert choice["chosen_on_groups"]["cold"] == ["cold", "users_1-2"]
    assert choice["chosen_on_groups"]["users_10+"] == ["users_10+"]
    assert choice["weights"]["cold"]["content"] >= 0.9
    assert choice["hit_rate_at_10_by_group"]["cold"]["blend"] == pytest.approx(1.0)


def test_too_little_validation_weighs_the_components_about_equally():
    choice = blend.choose_weights(
        [query("q", content=[("a", 1.0)], targets=["a"])], ITEMKNN, cf_limit=5
    )
    for weights in choice["weights"].values():
        shares = [weights[c] for c in blend.COMPONENTS]
        assert max(shares) - min(shares) <= 0.1 + 1e-9
        assert weights["new_listing_cointeraction"] == 0.0


def test_variant_scores_rank_the_targets():
    queries = [
        query("q1", cf=[("a", 5), ("b", 1)], targets=["a"]),
        query("q2", cf=[("c", 1), ("d", 2)], targets=["d"]),
        query("q3", cf=[], targets=["e"]),
    ]
    scores = blend.score_variants(queries, [ITEMKNN])
    assert scores[ITEMKNN.name]["hit_rate_at_10"] == pytest.approx(2 / 3)
    assert scores[ITEMKNN.name]["pairs"] == 3


COINTERACTION = te.COINTERACTION_SCHEMA
LISTS = StructType(
    [
        StructField("listing_id", StringType(), False),
        StructField("neighbour_ids", ArrayType(StringType(), False), False),
        StructField("scores", ArrayType(FloatType(), False), False),
    ]
)


def test_blended_lists_in_spark_equal_the_per_listing_numpy(spark):
    listings = spark.createDataFrame([(f"L{i}",) for i in range(4)], "listing_id string")
    support = spark.createDataFrame(
        [("L0", 12), ("L1", 2), ("L2", 12)],
        StructType([StructField("listing_id", StringType()), StructField("users", IntegerType())]),
    )
    cf_rows = [
        ("L0", "L1", 3, 3.0, 12, 2, 2.0, 1.0, [1.0, 1.0, 1.0]),
        ("L0", "L2", 1, 1.0, 12, 12, 2.0, 2.0, [0.5, 0.5, 0.5]),
        ("L2", "L0", 1, 1.0, 12, 12, 2.0, 2.0, [0.5, 0.5, 0.5]),
    ]
    cointeraction = spark.createDataFrame(cf_rows, COINTERACTION)
    content = spark.createDataFrame(
        [(f"L{i}", [f"L{j}" for j in range(4) if j != i], [0.9, 0.5, 0.1]) for i in range(4)],
        LISTS,
    )
    model = spark.createDataFrame(
        [(f"L{i}", [f"L{j}" for j in range(4) if j != i][::-1], [0.8, 0.6, 0.2]) for i in range(4)],
        LISTS,
    )
    weights = np.array(
        [[0.0, 1.0, 0.0, 0.0], [0.2, 0.4, 0.4, 0.0], [0.5, 0.3, 0.2, 1.0], [0.8, 0.1, 0.1, -1.0]]
    )
    inputs = blend.blend_inputs(listings, support, cointeraction, content, model)
    got = {
        r.listing_id: (list(r.neighbour_ids), list(r.scores))
        for r in blend.blended_lists(
            inputs, variant=ITEMKNN, weights=weights, k=2, cf_limit=5
        ).collect()
    }
    rows = blend.validation_queries(inputs.toArrow(), {})
    assert {q.query_id for q in rows} == set(got) == {f"L{i}" for i in range(4)}
    for q in rows:
        found = q.candidates(ITEMKNN, 5)
        w = weights[int(blend.support_group(q.support))]
        ids, scores = blend.ranked(
            found.ids, blend.standardise(found.raw, found.new, w[3]) @ w[:3], 2
        )
        assert got[q.query_id][0] == list(ids)
        np.testing.assert_allclose(got[q.query_id][1], scores, rtol=1e-5)
    # L3 has no history: group "cold" weighs content only, so its content list leads.
    assert got["L3"][0] == ["L0", "L1"]
    # L3 is the only candidate without history, as the model and content lists say.
    assert {
        i for q in rows for i, new in zip(q.content_ids, q.content_new, strict=True) if new
    } == {"L3"}


def test_a_new_candidate_scores_as_chosen_on_co_interaction_not_as_the_lowest():
    raw = np.array([[3.0, 0.5, 0.1], [1.0, 0.4, 0.1], [np.nan, 0.9, 0.1], [np.nan, 0.2, 0.1]])
    new = np.array([False, False, True, False])
    z = blend.standardise(raw, new, 1.0)
    assert z[2, 0] == 1.0  # new: scored as chosen
    assert z[3, 0] == pytest.approx(z[1, 0])  # has history, no co-interaction: the lowest
    found = blend.candidate_union(
        np.array(["a"], dtype=object),
        np.array([1.0]),
        ["b", "c"],
        [0.9, 0.8],
        [],
        [],
        query_id="q",
        cf_limit=5,
        content_new=[True, False],
    )
    assert list(found.ids) == ["a", "b", "c"] and list(found.new) == [False, True, False]


def test_validation_queries_read_absent_lists_as_empty():
    table = pa.table(
        {
            "listing_id": ["a"],
            "support": pa.array([0], pa.int64()),
            "cf": pa.array([None], pa.list_(pa.struct([("neighbour_id", pa.string())]))),
            "content_ids": pa.array([None], pa.list_(pa.string())),
            "content_scores": pa.array([None], pa.list_(pa.float32())),
            "model_ids": pa.array([["b"]], pa.list_(pa.string())),
            "model_scores": pa.array([[0.5]], pa.list_(pa.float32())),
        }
    )
    (q,) = blend.validation_queries(table, {"a": ["b"]})
    assert len(q.cf_ids) == 0 and len(q.content_ids) == 0 and list(q.model_ids) == ["b"]
    assert q.targets == ["b"]
