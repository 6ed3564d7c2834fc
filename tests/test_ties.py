"""Listings with identical vectors: well-defined, deterministic neighbour lists, and recall that
counts a tie as a hit (``lib.ann``; the module is only exercised here, not changed)."""

import numpy as np
import pytest

from lib import ann, neighbours

K = 5
TWINS = 30  # identical vectors: each has 29 neighbours at score 1, any 5 of them are exact


def tied_vectors(seed: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    twin = rng.normal(size=8)
    return np.vstack([np.tile(twin, (TWINS, 1)), rng.normal(size=(30, 8))]).astype(np.float32)


def embeddings(spark, vectors: np.ndarray, partitions: int | None = None):
    rows = [(f"L{i:04d}", [float(v) for v in vec], None) for i, vec in enumerate(vectors)]
    df = spark.createDataFrame(rows, "listing_id string, embedding array<float>, market string")
    return df.repartition(partitions, "listing_id") if partitions else df


def lists(result) -> dict[str, list[tuple[str, float]]]:
    """Each listing's ranked (neighbour_id, score), collected."""
    out: dict[str, list] = {}
    rows = neighbours.ranked_rows(result.top_k).collect()
    for row in sorted(rows, key=lambda r: (r.listing_id, r["rank"])):
        out.setdefault(row.listing_id, []).append((row.neighbour_id, round(row.score, 6)))
    return out


def run(spark, method: str, partitions: int | None = None):
    df = embeddings(spark, tied_vectors(), partitions)
    # Every list probed: IVF is then exhaustive, so a recall below 1 can only be a tie
    # counted as a miss (with nprobe 3 of 6 the random vectors' true misses show: 0.94).
    params = ann.IvfParams(k=K, nlist=6, nprobe=6, seed=1)
    result = ann.search(df, method=method, params=params, num_listings=60, num_blocks=3)
    found = lists(result)
    recall = ann.measure_recall(df, result.top_k, k=K, sample_size=60)
    result.release()
    return found, recall


@pytest.mark.parametrize("method", ann.METHODS)
def test_identical_vectors_get_the_same_lists_every_run_and_full_recall(spark, method):
    first, recall = run(spark, method)
    again, _ = run(spark, method)
    assert first == again
    assert len(first) == 60 and all(len(found) == K for found in first.values())
    twins = {f"L{i:04d}" for i in range(TWINS)}
    for listing_id in twins:
        # A twin's best neighbours are other twins, all at cosine 1.
        assert {n for n, _ in first[listing_id]} <= twins - {listing_id}
        assert all(score == pytest.approx(1.0, abs=1e-5) for _, score in first[listing_id])
    assert recall == {"recall_at_k": 1.0, "recall_queries": 60}


@pytest.mark.xfail(
    strict=True,
    reason="ties are broken by neighbour_id only in the final merge (neighbours.merge_top_k); "
    "each score block's own top k (torch.topk, lexsort by score only) keeps whichever tied "
    "candidates come first, so which twins survive depends on the catalogue's partitioning",
)
@pytest.mark.parametrize("method", ann.METHODS)
def test_tie_order_does_not_depend_on_the_input_partitioning(spark, method):
    # Well-defined, not just repeatable: the same catalogue spread differently over the
    # partitions still ranks tied neighbours the same way.
    assert run(spark, method)[0] == run(spark, method, partitions=5)[0]
