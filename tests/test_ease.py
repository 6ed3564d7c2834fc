"""EASE against a brute-force numpy reference, on catalogues small enough to check by hand."""

import math

import numpy as np
import pytest

from lib import baselines, ease
from schemas import training_examples

EXAMPLES_SCHEMA = "user_idx int, listing_idx int, weight float"


def reference_b(gram, lam):
    """Steck's closed form written out literally: B = I - P diag(1/diag(P)), zero diagonal."""
    p = np.linalg.inv(gram + lam * np.eye(len(gram)))
    b = np.eye(len(gram)) - p / np.diag(p)[None, :]
    np.fill_diagonal(b, 0.0)
    return b


def with_self_excluded(b, queries):
    out = b[queries].copy()
    out[np.arange(len(queries)), queries] = -np.inf
    return out


@pytest.fixture(scope="module")
def random_gram():
    x = (np.random.default_rng(11).random((30, 8)) < 0.35).astype(np.float64)
    return x.T @ x


def test_ease_scores_single_lambda_matches_inverse(random_gram):
    queries = np.array([0, 3, 7, 3])
    got = ease.ease_scores(random_gram, 2.5, queries)
    assert list(got) == [2.5]
    assert got[2.5].shape == (4, 8)
    np.testing.assert_allclose(
        got[2.5], with_self_excluded(reference_b(random_gram, 2.5), queries), rtol=0, atol=1e-8
    )


def test_ease_scores_several_lambdas_match_inverse(random_gram):
    queries = np.arange(8)
    lams = [0.1, 1.0, 30.0]
    got = ease.ease_scores(random_gram, lams, queries)
    assert list(got) == lams
    for lam in lams:
        want = with_self_excluded(reference_b(random_gram, lam), queries)
        np.testing.assert_allclose(got[lam], want, rtol=0, atol=1e-8)
        # The eigen path agrees with the single-λ direct solve too.
        np.testing.assert_allclose(
            got[lam], ease.ease_scores(random_gram, lam, queries)[lam], rtol=0, atol=1e-8
        )


@pytest.mark.parametrize("lam", [0.0, -1.0, math.nan, math.inf, [1.0, 0.0], []])
def test_lambda_must_be_positive(random_gram, lam):
    with pytest.raises(ValueError, match="λ"):
        ease.ease_scores(random_gram, lam, np.array([0]))


def test_ease_neighbours_rejects_lambda_before_running(spark):
    empty = spark.createDataFrame([], EXAMPLES_SCHEMA)
    with pytest.raises(ValueError, match="λ"):
        ease.ease_neighbours(spark, empty, empty, queries=empty, k=3, lambdas=[-0.5])


def test_dense_gram_sums_repeated_pairs_and_checks_indices():
    got = ease.dense_gram(np.array([0, 1, 0]), np.array([1, 1, 1]), np.array([2, 3, 4]), 3)
    want = np.zeros((3, 3))
    want[0, 1], want[1, 1] = 6.0, 3.0
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="indices"):
        ease.dense_gram([0], [3], [1], 3)


def test_top_k_rows_orders_breaks_ties_by_index_and_pads():
    scores = np.array(
        [
            [0.5, -np.inf, 0.9, 0.5, 0.1],
            [-np.inf, -np.inf, 0.3, np.nan, -np.inf],
            [-1.0, -2.0, -1.0, -np.inf, -3.0],
        ]
    )
    idx, best = ease.top_k_rows(scores, 3)
    assert idx.dtype == np.int64 and best.dtype == np.float32
    np.testing.assert_array_equal(idx, [[2, 0, 3], [2, -1, -1], [0, 2, 1]])
    np.testing.assert_array_equal(
        best, np.array([[0.9, 0.5, 0.5], [0.3, np.nan, np.nan], [-1, -1, -2]], np.float32)
    )
    idx, best = ease.top_k_rows(scores, 7)
    np.testing.assert_array_equal(idx[0], [2, 0, 3, 4, -1, -1, -1])


def test_gram_entries_is_xtx_of_each_users_strongest_listings(spark):
    rows = [
        (1, 0, 3.0), (1, 1, 2.0), (1, 2, 1.0),  # capped: 2 is its weakest
        (2, 3, 1.0), (2, 2, 1.0), (2, 1, 1.0),  # a tie: the two smaller listing_idx stay
        (3, 3, 0.5),
        (4, 0, 0.2), (4, 3, 5.0),
    ]  # fmt: skip
    got = ease.gram_entries(spark.createDataFrame(rows, EXAMPLES_SCHEMA), max_items_per_user=2)
    assert got.dtypes == [("a", "int"), ("b", "int"), ("count", "bigint")]

    kept = {1: [0, 1], 2: [1, 2], 3: [3], 4: [0, 3]}
    by_user = {}
    for user, listing, weight in rows:
        by_user.setdefault(user, []).append((-weight, listing))
    assert {u: sorted(listing for _, listing in sorted(v)[:2]) for u, v in by_user.items()} == kept
    x = np.zeros((5, 4))
    for user, listings in kept.items():
        x[user, listings] = 1.0
    gram = x.T @ x
    want = {(a, b): int(gram[a, b]) for a, b in zip(*np.nonzero(gram), strict=True)}
    assert {(r.a, r.b): r["count"] for r in got.collect()} == want


# A tiny catalogue: OLD is inactive but has interactions, NEW is active without any.
CATALOGUE = [
    (0, "A", True, True),
    (1, "B", True, True),
    (2, "C", True, True),
    (3, "D", True, True),
    (4, "E", True, True),
    (5, "OLD", False, True),
    (6, "NEW", True, False),
]
USERS = {
    1: [0, 1],
    2: [0, 1, 2],
    3: [2, 3],
    4: [3, 4, 5],
    5: [0, 4],
    6: [1, 2, 3],
    7: [0],
    8: [4, 5],
    9: [1, 3, 4],
}
WARM = 5  # A..E: the active listings with interactions, listing_idx = dense index


@pytest.fixture(scope="module")
def catalogue(spark):
    # A catalogue without features: EASE reads only ids and activity.
    return spark.createDataFrame(
        [(*row, [], [], []) for row in CATALOGUE], training_examples.LISTING_FEATURES_SCHEMA
    )


@pytest.fixture(scope="module")
def examples(spark):
    rows = [(u, i, 1.0 + 0.1 * i) for u, items in USERS.items() for i in items]
    return spark.createDataFrame(rows, EXAMPLES_SCHEMA)


@pytest.fixture(scope="module")
def all_queries(spark):
    return spark.createDataFrame([(lid,) for _, lid, _, _ in CATALOGUE], "listing_id string")


def reference_lists(lam, k):
    """Each warm listing's neighbours by the reference B: score descending, then index."""
    x = np.zeros((len(USERS) + 1, WARM))
    for user, items in USERS.items():
        x[user, [i for i in items if i < WARM]] = 1.0
    b = reference_b(x.T @ x, lam)
    ids = [lid for _, lid, _, _ in CATALOGUE]
    lists = {}
    for i in range(WARM):
        others = [j for j in range(WARM) if j != i]
        ranked = sorted(others, key=lambda j, i=i: (-b[i, j], j))
        gaps = np.abs(np.diff([b[i, j] for j in ranked]))
        assert gaps.min() > 1e-6, "the catalogue must not have near-ties"
        lists[ids[i]] = [(ids[j], b[i, j]) for j in ranked[:k]]
    return lists


def lists_of(df):
    out = {}
    for r in df.orderBy("listing_id", "rank").collect():
        out.setdefault(r.listing_id, []).append((r.neighbour_id, r.rank, r.score))
    return out


def test_ease_neighbours_match_reference_without_self_or_inactive(
    spark, catalogue, examples, all_queries
):
    got = ease.ease_neighbours(
        spark, examples, catalogue, queries=all_queries, k=3, lambdas=[0.5, 2.0]
    )
    assert list(got) == [0.5, 2.0]
    for lam, df in got.items():
        assert df.schema == baselines.RANKED_SCHEMA
        found = lists_of(df)
        want = reference_lists(lam, 3)
        # OLD is inactive and NEW has no interactions: neither gets a list nor appears in one.
        assert set(found) == set(want) == {"A", "B", "C", "D", "E"}
        for lid, ranked in found.items():
            assert [n for n, _, _ in ranked] == [n for n, _ in want[lid]]
            assert [r for _, r, _ in ranked] == [1, 2, 3]
            np.testing.assert_allclose(
                [s for _, _, s in ranked], [s for _, s in want[lid]], rtol=0, atol=1e-6
            )
            assert lid not in [n for n, _, _ in ranked]


def test_ease_neighbours_one_lambda_returns_every_other_listing_below_k(spark, catalogue, examples):
    queries = spark.createDataFrame([("B",), ("OLD",), ("B",)], "listing_id string")
    got = ease.ease_neighbours(spark, examples, catalogue, queries=queries, k=10, lambdas=[2.0])
    found = lists_of(got[2.0])
    assert list(found) == ["B"]
    assert [n for n, _, _ in found["B"]] == [n for n, _ in reference_lists(2.0, 10)["B"]]
    assert [r for _, r, _ in found["B"]] == [1, 2, 3, 4]


def test_ease_neighbours_skips_catalogue_above_max_items(spark, catalogue, examples, all_queries):
    got = ease.ease_neighbours(
        spark, examples, catalogue, queries=all_queries, k=3, lambdas=[1.0], max_items=4
    )
    assert (
        got
        == "EASE skipped: 5 listings with interactions > max_items=4 (an 5×5 matrix on the driver)"
    )


def test_lists_reach_spark_from_a_broadcast_in_slices(spark):
    import pyarrow as pa

    from lib.schema_check import arrow_schema

    n = 6_000
    table = pa.table(
        {
            "listing_id": [f"L{i:07d}" for i in range(n)],
            "neighbour_id": [f"N{i:07d}" for i in range(n)],
            "rank": pa.array(np.arange(n) % 20 + 1, pa.int32()),
            "score": pa.array(np.linspace(1, 0, n), pa.float32()),
        },
        schema=arrow_schema(ease.RANKED_SCHEMA),
    )
    df = ease.from_driver(spark, table, ease.RANKED_SCHEMA, max_bytes=32 << 10)

    got = df.toArrow().sort_by("listing_id")
    assert got.num_rows == n
    assert got.cast(table.schema).equals(table)
    # Every slice of the broadcast table is one task's work: none is lost or read twice.
    assert math.ceil(table.nbytes / (32 << 10)) > 2
    assert ease.from_driver(spark, table.slice(0, 0), ease.RANKED_SCHEMA).count() == 0
