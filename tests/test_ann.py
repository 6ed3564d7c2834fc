import numpy as np
import pyarrow as pa
import pytest

from lib import ann, block_scoring, ivf_index, ivf_plan, neighbours, packing, recall, task_stages


def clustered(n: int, dim: int = 8, clusters: int = 12, noise: float = 0.35, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    x = centres[rng.integers(0, clusters, n)] + noise * rng.normal(size=(n, dim))
    return x.astype(np.float32)


def embeddings_df(spark, vectors: np.ndarray, markets: list[str] | None = None):
    rows = [
        (f"L{i:04d}", [float(v) for v in vec], markets[i] if markets else None)
        for i, vec in enumerate(vectors)
    ]
    return spark.createDataFrame(rows, "listing_id string, embedding array<float>, market string")


def exact_scores(vectors: np.ndarray, k: int, parts: np.ndarray | None = None) -> dict:
    unit = packing.unit_rows(vectors)
    scores = unit @ unit.T
    np.fill_diagonal(scores, -np.inf)
    if parts is not None:
        scores[parts[:, None] != parts[None, :]] = -np.inf
    top = -np.sort(-scores, axis=1)[:, :k]
    return {f"L{i:04d}": [s for s in top[i] if np.isfinite(s)] for i in range(len(vectors))}


def collected(top_k) -> dict[str, list]:
    """Ranked lists as rows (listing_id, neighbour_id, rank, score) per listing, by rank."""
    by_listing: dict[str, list] = {}
    rows = neighbours.ranked_rows(top_k).collect()
    for row in sorted(rows, key=lambda r: (r.listing_id, r["rank"])):
        by_listing.setdefault(row.listing_id, []).append(row)
    return by_listing


def recall_against(truth: dict, by_listing: dict) -> float:
    return recall.recall_from_scores(
        truth, {q: [r.score for r in rs] for q, rs in by_listing.items()}
    )


def assert_well_formed(by_listing: dict, k: int) -> None:
    for listing_id, rows in by_listing.items():
        assert [r["rank"] for r in rows] == list(range(1, len(rows) + 1))
        assert len(rows) <= k
        assert all(r.neighbour_id != listing_id for r in rows)
        assert len({r.neighbour_id for r in rows}) == len(rows)
        scores = [r.score for r in rows]
        assert scores == sorted(scores, reverse=True)


# ---------------------------------------------------------------------------------------------
# Pieces without Spark
# ---------------------------------------------------------------------------------------------


def test_train_centroids_finds_separated_clusters_and_fills_empty_lists():
    rng = np.random.default_rng(1)
    centres = np.eye(4, dtype=np.float32) * 10
    sample = np.repeat(centres, 50, axis=0) + 0.01 * rng.normal(size=(200, 4)).astype(np.float32)

    found = ivf_index.train_centroids(sample, 4, iterations=10, seed=3)

    assert found.shape == (4, 4)
    np.testing.assert_allclose(np.linalg.norm(found, axis=1), 1.0, rtol=1e-5)
    # Every true cluster ends up with its own centroid, even if two starts fell in one cluster.
    assert sorted(np.argmax(found, axis=1).tolist()) == [0, 1, 2, 3]


def test_train_centroids_caps_lists_at_sample_size():
    assert ivf_index.train_centroids(np.ones((3, 2), np.float32), 10).shape == (3, 2)


def test_default_sizes_grow_with_the_catalogue_but_the_sample_is_bounded():
    assert ivf_index.default_nlist(1_000_000) == 1000
    assert ivf_index.default_nlist(10) == 3
    assert ivf_index.default_sample_size(ivf_index.default_nlist(10**9)) == ivf_index.MAX_SAMPLE


def test_plan_splits_a_giant_list_into_bounded_tasks():
    counts = [("", 0, 100_000, 50_000), ("", 1, 300, 900), ("", 2, 0, 40)]

    plans = {
        p.list: p for p in ivf_plan.plan_lists(counts, task_work=1_000_000, max_candidates=5_000)
    }

    giant = plans[0]
    assert giant.slices == 20 and giant.per_slice == 5_000
    assert giant.home_chunks == 500 and giant.home_task_scores <= 1_000_000
    # Its own members search slices 1.. in the search pass, next to the 50,000 routed listings.
    assert giant.search_queries == 150_000 and giant.search_task_scores <= 1_000_000
    small = plans[1]
    assert (small.slices, small.home_chunks, small.search_chunks) == (1, 1, 1)
    summary = ivf_plan.plan_summary(list(plans.values()))
    assert summary["largest_list"] == 100_000
    assert summary["max_task_scores"] <= 1_000_000
    assert summary["max_task_candidates"] == 5_000


def test_probe_counts_give_members_and_probing_listings_per_part_and_list():
    probes = [[3, 1], [3], [1, 3], [3, 1]]  # home list first
    offsets = np.cumsum([0] + [len(p) for p in probes])
    batch = pa.RecordBatch.from_arrays(
        [pa.array(["a", "a", "a", "b"]), packing.pack_ints(np.concatenate(probes), offsets)],
        names=["part", "probe_bytes"],
    )
    # As two batches of one partition: the counts add up across them.
    got = pa.Table.from_batches(
        list(ivf_plan._count_probes(iter([batch.slice(0, 2), batch.slice(2)])))
    )

    rows = sorted(zip(*(got.column(c).to_pylist() for c in got.column_names), strict=True))
    assert rows == [("a", 1, 1, 2), ("a", 3, 2, 3), ("b", 1, 0, 1), ("b", 3, 1, 1)]


def test_top_candidates_keeps_scores_reaching_the_threshold_at_most_k_and_never_self():
    queries = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    angles = np.linspace(0, np.pi / 2, 7)
    candidates = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    rids = np.arange(7, dtype=np.int64)

    qi, ci, scores = block_scoring.top_candidates(
        queries,
        candidates,
        k=2,
        thresholds=np.array([0.85, -np.inf], np.float32),
        query_rids=np.array([0, 99]),
        candidate_rids=rids,
    )

    got = sorted(zip(qi.tolist(), ci.tolist(), strict=True))
    # Query 0 is candidate 0 itself; candidates 1 and 2 (cos 15 and 30 degrees) reach 0.85.
    # Query 1 has no threshold and more than k candidates: its best two.
    assert got == [(0, 1), (0, 2), (1, 5), (1, 6)]
    assert np.all(scores <= 1.0 + 1e-6)


def test_top_candidates_match_a_brute_force_reference_across_score_blocks(monkeypatch):
    # Small score blocks: queries meet themselves in later blocks, and every path runs: queries
    # with none, a few (<= k), more than k of few (ranked among hits) and most candidates
    # reaching their threshold (ranked in full).
    monkeypatch.setattr(block_scoring, "_SCORE_BLOCK", 1_000)
    rng = np.random.default_rng(3)
    queries = packing.unit_rows(rng.normal(size=(60, 8)))
    candidates = np.concatenate([queries[::3], packing.unit_rows(rng.normal(size=(180, 8)))])
    query_rids = np.arange(60, dtype=np.int64)
    candidate_rids = np.concatenate([query_rids[::3], 1_000 + np.arange(180)])
    thresholds = rng.choice([0.99, 0.75, 0.6, 0.3, -np.inf, np.nan], size=60).astype(np.float32)
    k = 4

    qi, ci, scores = block_scoring.top_candidates(
        queries,
        candidates,
        k=k,
        thresholds=thresholds,
        query_rids=query_rids,
        candidate_rids=candidate_rids,
    )

    expected = set()
    all_scores = queries @ candidates.T
    for q in range(60):
        tau = -2.0 if np.isnan(thresholds[q]) or np.isneginf(thresholds[q]) else thresholds[q]
        hits = [
            c
            for c in range(len(candidates))
            if candidate_rids[c] != query_rids[q] and all_scores[q, c] >= tau
        ]
        expected |= {(q, c) for c in sorted(hits, key=lambda c: -all_scores[q, c])[:k]}
    assert set(zip(qi.tolist(), ci.tolist(), strict=True)) == expected
    assert len(qi) == len(expected)
    np.testing.assert_allclose(scores, all_scores[qi, ci], rtol=0, atol=1e-5)
    counts = np.bincount(qi, minlength=60)
    assert {0, k} <= set(counts.tolist()) and any(0 < c < k for c in counts)


@pytest.mark.parametrize("width", [30, 300, 1000, 5000])
def test_best_columns_match_a_full_ranking_also_with_masked_and_nan_scores(width):
    # Wide rows take the bound path (group maxima), narrow ones torch.topk: the same scores.
    rng = np.random.default_rng(width)
    block = rng.normal(size=(40, width)).astype(np.float32)
    block[3, :] = -np.inf  # a row with nothing to find
    block[4, rng.random(width) < 0.9] = -np.inf  # mostly masked lists
    block[5, : width // 2] = 7.0  # many ties above everything else

    cols, scores = block_scoring.best_columns(block, 9)

    expected = -np.sort(-block, axis=1)[:, :9]
    np.testing.assert_array_equal(scores, expected)
    assert ((cols >= 0) & (cols < width)).all()
    np.testing.assert_array_equal(np.take_along_axis(block, cols, axis=1), scores)
    assert len(set(cols[5].tolist())) == 9
    block[6, 0] = np.nan  # no bound holds: ranked in full instead
    assert block_scoring.best_columns(block, 9)[1].shape == (40, 9)


def test_best_k_reports_missing_entries_as_minus_infinity():
    vectors = np.eye(3, dtype=np.float32)
    index, best = block_scoring.best_k(
        vectors, vectors, k=5, query_rids=np.arange(3), candidate_rids=np.arange(3)
    )
    assert best.shape == (3, 3)
    assert np.isneginf(best[:, 2]).all()  # self, masked
    assert (index[:, 0] != np.arange(3)).all()


def test_packed_vectors_round_trip_also_when_sliced():
    vectors = np.arange(24, dtype=np.float32).reshape(6, 4)
    packed = packing.pack_matrix(vectors)
    np.testing.assert_array_equal(packing.vector_matrix(packed), vectors)
    np.testing.assert_array_equal(packing.vector_matrix(packed.slice(2, 3)), vectors[2:5])
    lists = pa.array([[1.0, 2.0], [3.0, 4.0]], pa.list_(pa.float32()))
    np.testing.assert_array_equal(packing.vector_matrix(lists), [[1, 2], [3, 4]])
    with pytest.raises(ValueError, match="same length"):
        packing.vector_matrix(pa.array([[1.0], [1.0, 2.0]], pa.list_(pa.float32())))


def test_packed_tables_round_trip_one_value_each():
    table = pa.table({"rid": [1, 2, 3], "vec": [b"ab", b"", b"cde"]})
    packed = packing.pack_tables([table.slice(0, 2), table.slice(2), table.slice(0, 0)])

    assert packed.type == pa.binary() and len(packed) == 3
    unpacked = packing.unpack_tables(pa.chunked_array([packed.slice(0, 1), packed.slice(1)]))
    assert [t.to_pylist() for t in unpacked] == [
        table.slice(0, 2).to_pylist(),
        table.slice(2).to_pylist(),
        [],
    ]


def test_recall_counts_ties_with_the_kth_exact_neighbour_as_hits():
    truth = {"a": [0.9, 0.8], "b": [0.5, 0.5]}
    # "b" found another neighbour with the same score as its exact 2nd: still a full match.
    assert recall.recall_from_scores(truth, {"a": [0.9, 0.8], "b": [0.5, 0.5]}) == 1.0
    assert recall.recall_from_scores(truth, {"a": [0.9, 0.1], "b": []}) == 0.25
    assert recall.recall_from_scores({}, {}) is None


# ---------------------------------------------------------------------------------------------
# Spark
# ---------------------------------------------------------------------------------------------

PARAMS = ann.IvfParams(k=5, nlist=10, nprobe=3, seed=1)


def test_ivf_recall_on_tiny_data_passes_the_threshold_and_matches_the_measurement(spark):
    vectors = clustered(300)
    df = embeddings_df(spark, vectors)

    result = ann.search(df, method="ivf", params=PARAMS, num_listings=300)
    by_listing = collected(result.top_k)
    measured = ann.measure_recall(df, result.top_k, k=5, sample_size=300)
    result.release()

    assert set(by_listing) == {f"L{i:04d}" for i in range(300)}
    assert_well_formed(by_listing, 5)
    true_recall = recall_against(exact_scores(vectors, 5), by_listing)
    assert true_recall >= 0.9
    assert measured == {"recall_at_k": pytest.approx(true_recall), "recall_queries": 300}
    assert result.info["nlist"] == 10 and result.info["nprobe"] == 3


def test_exact_mode_recall_is_one_and_ivf_probing_every_list_is_exact(spark):
    vectors = clustered(120, seed=4)
    df = embeddings_df(spark, vectors)

    exact = ann.search(df, method="exact", params=PARAMS, num_listings=120, num_blocks=3)
    everything = ann.search(
        df, method="ivf", params=ann.IvfParams(k=5, nlist=6, nprobe=6), num_listings=120
    )

    assert ann.measure_recall(df, exact.top_k, k=5, sample_size=50)["recall_at_k"] == 1.0
    assert recall_against(exact_scores(vectors, 5), collected(everything.top_k)) == 1.0
    everything.release()


def test_skewed_catalogue_completes_with_bounded_tasks(spark):
    rng = np.random.default_rng(5)
    # 70% of listings are near-copies of one vector (say, identical cold-start cars): k-means
    # cannot split them, so their list is far bigger than any task may be.
    giant = np.ones((280, 8), np.float32) + 1e-3 * rng.normal(size=(280, 8)).astype(np.float32)
    vectors = np.concatenate([giant, clustered(120, seed=6)])
    df = embeddings_df(spark, vectors)
    params = ann.IvfParams(k=5, nlist=8, nprobe=3, task_work=5_000, max_candidates=60)

    result = ann.search(df, method="ivf", params=params, num_listings=400)
    by_listing = collected(result.top_k)
    result.release()

    plan = {k[len("plan_") :]: v for k, v in result.info.items() if k.startswith("plan_")}
    assert plan["largest_list"] >= 280
    assert plan["max_task_candidates"] <= 60
    assert plan["max_task_scores"] <= 5_000
    assert plan["search_tasks"] + plan["home_tasks"] > 4 * plan["lists"]  # the giant list split
    assert len(by_listing) == 400 and all(len(rows) == 5 for rows in by_listing.values())
    assert_well_formed(by_listing, 5)
    assert recall_against(exact_scores(vectors, 5), by_listing) >= 0.9

    # Probing every list, the sliced and chunked lists must still give the exact answer.
    every = ann.search(
        df, method="ivf", params=ann.IvfParams(**{**params.__dict__, "nprobe": 8}), num_listings=400
    )
    assert recall_against(exact_scores(vectors, 5), collected(every.top_k)) == 1.0
    every.release()


def test_partition_key_keeps_neighbours_within_their_market(spark):
    vectors = clustered(240, seed=7)
    markets = ["de" if i % 3 else "fr" for i in range(240)]
    df = embeddings_df(spark, vectors, markets)

    result = ann.search(df, method="ivf", params=PARAMS, num_listings=240, partition_col="market")
    by_listing = collected(result.top_k)
    measured = ann.measure_recall(df, result.top_k, k=5, sample_size=100, partition_col="market")
    result.release()

    market = {f"L{i:04d}": m for i, m in enumerate(markets)}
    assert all(
        market[r.neighbour_id] == market[lid] for lid, rows in by_listing.items() for r in rows
    )
    truth = exact_scores(vectors, 5, np.array(markets))
    assert recall_against(truth, by_listing) >= 0.9
    assert measured["recall_at_k"] >= 0.9
    exact = neighbours.exact_top_k(df, k=5, num_blocks=2, partition_col="market")
    assert recall_against(truth, collected(exact)) == 1.0


def test_measured_recall_exposes_a_bad_result_and_coverage_counts_short_lists(spark):
    vectors = clustered(100, seed=8)
    df = embeddings_df(spark, vectors)
    # Every listing gets the same two (mostly wrong) neighbours, and only two of k=5.
    bad = spark.createDataFrame(
        [(f"L{i:04d}", ["L0098", "L0099"], [0.0, 0.0]) for i in range(100) if i not in (98, 99)],
        neighbours.RANKED_LISTS_SCHEMA,
    )

    recall = ann.measure_recall(df, bad, k=5, sample_size=50)["recall_at_k"]
    quality = ann.coverage(bad, k=5, num_listings=100)

    assert recall < 0.2
    assert quality == {
        "coverage": 0.0,
        "listings_with_neighbours": 98,
        "distinct_neighbour_share": 0.02,
    }


def test_merge_lists_ranks_across_rows_of_the_same_listing(spark):
    import pyarrow as pa

    rows = [
        ("a", ["b", "c"], [0.9, 0.5]),
        ("b", ["a"], [0.9]),  # home lists
        ("a", ["d", "e"], [0.7, 0.5]),
        ("b", ["c", "b"], [0.95, 1.0]),  # found elsewhere
        ("a", ["f"], [0.1]),
    ]
    lists = pa.Table.from_pylist(
        [{"rid": ord(r[0]), "listing_id": r[0], "top_ids": r[1], "top_scores": r[2]} for r in rows],
        schema=task_stages.LISTS_ARROW_SCHEMA,
    )
    # As two search partitions would pack them.
    packed = [
        task_stages.pack_lists(lists.slice(0, 2), 2),
        task_stages.pack_lists(lists.slice(2), 2),
    ]
    lists = spark.createDataFrame(
        [(b["bucket"], b["payload"]) for batch in packed for b in batch.to_pylist()],
        task_stages.PACKED_LISTS_SCHEMA,
    )

    got = neighbours.merge_lists(lists, k=3, num_partitions=2).collect()

    assert sorted(
        (r.listing_id, r.neighbour_ids, [round(s, 2) for s in r.scores]) for r in got
    ) == [
        ("a", ["b", "d", "c"], [0.9, 0.7, 0.5]),  # c and e tie: c first
        ("b", ["c", "a"], [0.95, 0.9]),  # never itself
    ]
