"""Co-interaction statistics and the ItemKNN / RP3beta variants against brute-force numpy."""

import numpy as np
import pytest
from pyspark.sql.types import FloatType, IntegerType, StringType, StructField, StructType

from lib import cointeraction
from lib.cointeraction import RP3_ALPHAS, Variant
from lib.neighbours import ranked_rows

EXAMPLES = StructType(
    [
        StructField("user_idx", IntegerType(), False),
        StructField("listing_idx", IntegerType(), False),
        StructField("weight", FloatType(), False),
    ]
)
IDS = StructType(
    [
        StructField("listing_idx", IntegerType(), False),
        StructField("listing_id", StringType(), False),
    ]
)

# users x listings weights (0 = no interaction)
WEIGHTS = np.array(
    [
        [1.0, 2.0, 0.0, 0.0, 1.0],
        [0.0, 1.0, 3.0, 0.0, 0.0],
        [1.0, 0.0, 1.0, 1.0, 0.0],
        [0.0, 5.0, 1.0, 0.0, 2.0],
        [2.0, 1.0, 0.0, 1.0, 0.0],
    ]
)


def examples_df(spark, weights=WEIGHTS):
    rows = [
        (u, i, float(weights[u, i]))
        for u in range(weights.shape[0])
        for i in range(weights.shape[1])
        if weights[u, i] > 0
    ]
    return spark.createDataFrame(rows, EXAMPLES)


def ids_df(spark, n=WEIGHTS.shape[1]):
    return spark.createDataFrame([(i, f"L{i}") for i in range(n)], IDS)


def reference(weights, variant):
    """Dense similarity matrix of one variant, straight from the definitions."""
    binary = (weights > 0).astype(float)
    users = binary.sum(axis=0)
    if variant.family == "itemknn":
        x = weights if variant.weighted else binary
        norms = np.sqrt((x**2).sum(axis=0))
        sim = (x.T @ x) / (np.outer(norms, norms) + variant.shrink)
    else:
        user_deg = binary.sum(axis=1)
        p_iu = (binary / np.maximum(users, 1)).T ** variant.alpha  # listing -> user
        p_uj = (binary / user_deg[:, None]) ** variant.alpha  # user -> listing
        sim = (p_iu @ p_uj) / np.maximum(users, 1)[None, :] ** variant.beta
    np.fill_diagonal(sim, 0.0)
    sim[(binary.T @ binary) == 0] = 0.0
    return sim


def test_table_holds_every_co_interacted_pair_with_exact_statistics(spark):
    table = cointeraction.cointeraction_table(
        examples_df(spark), ids_df(spark), per_variant=10
    ).toPandas()
    binary = (WEIGHTS > 0).astype(float)
    common = binary.T @ binary
    dots = WEIGHTS.T @ WEIGHTS
    user_deg = binary.sum(axis=1)
    expected_pairs = {(a, b) for a in range(5) for b in range(5) if a != b and common[a, b] > 0}
    got = {(int(r.listing_id[1:]), int(r.neighbour_id[1:])): r for r in table.itertuples()}
    assert set(got) == expected_pairs
    for (a, b), row in got.items():
        assert row.common == common[a, b]
        assert row.dot == pytest.approx(dots[a, b], rel=1e-6)
        assert row.listing_users == binary[:, a].sum()
        assert row.neighbour_norm == pytest.approx(np.sqrt((WEIGHTS[:, b] ** 2).sum()), rel=1e-6)
        both = (binary[:, a] > 0) & (binary[:, b] > 0)
        for i, alpha in enumerate(RP3_ALPHAS):
            assert row.rp3[i] == pytest.approx((user_deg[both] ** -alpha).sum(), rel=1e-5)


@pytest.mark.parametrize(
    "variant",
    [
        Variant("itemknn", shrink=0.0),
        Variant("itemknn", shrink=10.0),
        Variant("itemknn", weighted=True, shrink=1.0),
        Variant("rp3beta", alpha=0.5, beta=0.0),
        Variant("rp3beta", alpha=1.1, beta=0.6),
    ],
    ids=lambda v: v.name,
)
def test_variant_lists_equal_the_numpy_reference(spark, variant):
    table = cointeraction.cointeraction_table(examples_df(spark), ids_df(spark), per_variant=10)
    lists = ranked_rows(cointeraction.variant_lists(table, variant, k=3)).toPandas()
    sim = reference(WEIGHTS, variant)
    for a in range(5):
        scores = sim[a]
        candidates = [b for b in range(5) if b != a and scores[b] > 0]
        expected = sorted(candidates, key=lambda b: (-scores[b], f"L{b}"))[:3]
        mine = lists[lists.listing_id == f"L{a}"].sort_values("rank")
        assert list(mine.neighbour_id) == [f"L{b}" for b in expected]
        np.testing.assert_allclose(mine.score, [scores[b] for b in expected], rtol=1e-5)


def test_each_listing_keeps_every_variants_best_partners_only(spark):
    rng = np.random.default_rng(3)
    weights = (rng.random((40, 30)) < 0.3) * rng.integers(1, 4, (40, 30)).astype(float)
    table = cointeraction.cointeraction_table(
        examples_df(spark, weights), ids_df(spark, 30), per_variant=2
    ).toPandas()
    kept = table.groupby("listing_id").size()
    assert kept.max() <= 2 * len(cointeraction.VARIANTS)
    for variant in (Variant("itemknn"), Variant("rp3beta", alpha=0.8, beta=0.45)):
        sim = reference(weights, variant)
        for a in range(30):
            best = np.lexsort((np.array([f"L{b}" for b in range(30)]), -sim[a]))[:2]
            stored = set(table[table.listing_id == f"L{a}"].neighbour_id)
            assert {f"L{b}" for b in best if sim[a, b] > 0} <= stored


def test_a_heavy_user_contributes_only_their_strongest_listings(spark):
    weights = np.array([[5.0, 4.0, 1.0], [0.0, 1.0, 1.0]])
    table = cointeraction.cointeraction_table(
        examples_df(spark, weights), ids_df(spark, 3), max_items_per_user=2
    ).toPandas()
    pairs = {(r.listing_id, r.neighbour_id): r.common for r in table.itertuples()}
    # user 0 keeps L0 and L1 only; user 1 links L1 and L2.
    assert pairs == {("L0", "L1"): 1, ("L1", "L0"): 1, ("L1", "L2"): 1, ("L2", "L1"): 1}


def test_variant_settings_are_checked():
    with pytest.raises(ValueError, match="family"):
        Variant("svd")
    with pytest.raises(ValueError, match="alpha"):
        Variant("rp3beta", alpha=0.7)
    with pytest.raises(ValueError, match="shrink"):
        Variant("itemknn", shrink=-1)
    variant = Variant("rp3beta", alpha=0.8, beta=0.3)
    assert Variant.from_dict(variant.to_dict()) == variant
