import datetime as dt

import numpy as np
import pytest
from chispa import assert_df_equality

from lib import neighbours, task_stages
from lib.schema_check import check_matches
from schemas import listing_neighbours


def embeddings_df(spark, vectors: np.ndarray):
    rows = [(f"L{i:03d}", [float(x) for x in v]) for i, v in enumerate(vectors)]
    return spark.createDataFrame(rows, "listing_id string, embedding array<float>")


def brute_force(vectors: np.ndarray, k: int) -> dict[str, list[str]]:
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    scores = unit @ unit.T
    np.fill_diagonal(scores, -np.inf)
    return {
        f"L{i:03d}": [f"L{j:03d}" for j in np.argsort(-scores[i], kind="stable")[:k]]
        for i in range(len(vectors))
    }


@pytest.mark.parametrize("num_blocks", [1, 3])
def test_exact_top_k_matches_brute_force(spark, num_blocks):
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(60, 8)).astype(np.float32)
    got = neighbours.exact_top_k(embeddings_df(spark, vectors), k=5, num_blocks=num_blocks)
    rows = neighbours.ranked_rows(got).collect()
    by_listing: dict[str, list] = {}
    for r in sorted(rows, key=lambda r: (r.listing_id, r.rank)):
        by_listing.setdefault(r.listing_id, []).append(r)
    assert {lid: [r.neighbour_id for r in rs] for lid, rs in by_listing.items()} == brute_force(
        vectors, 5
    )
    for lid, rs in by_listing.items():
        assert [r.rank for r in rs] == [1, 2, 3, 4, 5]
        assert all(r.neighbour_id != lid for r in rs)
        scores = [r.score for r in rs]
        assert scores == sorted(scores, reverse=True)
        assert all(-1.0 - 1e-5 <= s <= 1.0 + 1e-5 for s in scores)


def test_exact_top_k_returns_fewer_when_catalogue_is_smaller_than_k(spark):
    vectors = np.eye(3, dtype=np.float32) + 0.1
    got = neighbours.exact_top_k(embeddings_df(spark, vectors), k=5, num_blocks=2)
    counts = {r.listing_id: len(r.neighbour_ids) for r in got.collect()}
    assert counts == {"L000": 2, "L001": 2, "L002": 2}


def test_merge_top_k_breaks_ties_by_neighbour_id_and_dedupes(spark):
    candidates = spark.createDataFrame(
        [("a", "c", 0.5), ("a", "b", 0.5), ("a", "b", 0.5), ("a", "d", 0.9), ("a", "e", 0.1)],
        "listing_id string, neighbour_id string, score float",
    )
    got = neighbours.merge_top_k(candidates, k=3)
    expected = spark.createDataFrame(
        [("a", "d", 1, 0.9), ("a", "b", 2, 0.5), ("a", "c", 3, 0.5)],
        "listing_id string, neighbour_id string, rank int, score float",
    )
    assert_df_equality(got, expected, ignore_row_order=True, ignore_nullable=True)


def test_to_neighbours_table_matches_contract(spark):
    top = spark.createDataFrame(
        [("a", ["b", "c"], [0.9, 0.5]), ("b", ["a"], [0.9])], neighbours.RANKED_LISTS_SCHEMA
    )
    table = neighbours.to_neighbours_table(top, model_version="m1", run_date=dt.date(2026, 11, 20))
    check_matches(table, listing_neighbours.SPEC)
    got = sorted(
        (r.listing_id, r.rank, r.neighbour_id, round(r.score, 2), r.model_version, r.run_date)
        for r in table.collect()
    )
    day = dt.date(2026, 11, 20)
    assert got == [
        ("a", 1, "b", 0.9, "m1", day),
        ("a", 2, "c", 0.5, "m1", day),
        ("b", 1, "a", 0.9, "m1", day),
    ]


def test_task_groups_split_rows_by_part_list_chunk_and_slice_each_by_rid():
    import pyarrow as pa

    keys = [
        ("", 1, 0, 0),
        ("m2", 1, 0, 0),
        ("", 1, 0, 0),
        ("", 1, 1, 0),
        ("", 2, 0, 0),
        ("", 1, 0, 1),
        ("m2", 1, 0, 0),
        ("", 2, 0, 0),
    ]
    rids = [5, 7, 2, 1, 3, 4, 6, 9]
    table = pa.table(
        {name: [key[i] for key in keys] for i, name in enumerate(task_stages.TASK_COLUMNS[:4])}
        | {"rid": rids}
    )

    groups = task_stages._task_groups(table)

    # Within a task, rows come by rid whatever order they arrived in: the same matrices.
    assert sorted(g.tolist() for g in groups) == [[2, 0], [3], [4, 7], [5], [6, 1]]


def test_partitions_come_in_whole_waves_of_the_cores():
    per = task_stages.ROWS_PER_PARTITION
    assert task_stages.partitions_for(0, 2) == 2
    assert task_stages.partitions_for(2 * per, 2) == 2
    # 5 partitions' worth of rows on 2 cores: 6, not 5 (the fifth would run alone).
    assert task_stages.partitions_for(5 * per, 2) == 6
    assert task_stages.partitions_for(5 * per, 8) == 8
