"""The quality of a search result, measured every run: recall against exact search on a
sample of queries, and coverage.

``measure_recall`` brute-forces the exact top k of a bounded, deterministic sample of queries in
the executors (the catalogue streams past the broadcast queries) and compares scores: a found
neighbour is a hit when it scores at least the exact k-th score, so among identical vectors any
of the tied neighbours counts (``recall_from_scores``). ``coverage`` says how many listings got
full lists.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa
from pyspark import Broadcast
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from lib import block_scoring, neighbours, task_stages
from lib.neighbours import base_rows
from lib.packing import unit_rows, vector_matrix


def _exact_for_sample(queries: Broadcast, k: int, device: str):
    """mapInArrow over (part, rid, listing_id, vec): each sampled query's top k in the partition.

    A running top k per query is kept across the partition's batches, and its k-th score is the
    threshold for the next batch, so later batches add few rows.
    """

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        import torch

        torch.set_num_threads(1)
        resolved = block_scoring.resolve_device(device)
        q_ids, q_parts, q_rids, q_vectors = queries.value
        best = np.full((len(q_ids), k), -np.inf, np.float32)
        best_ids = np.full((len(q_ids), k), None, dtype=object)
        for batch in batches:
            if batch.num_rows == 0:
                continue
            vectors = unit_rows(vector_matrix(batch.column("vec")))
            parts = batch.column("part").to_numpy(zero_copy_only=False)
            rids = batch.column("rid").to_numpy(zero_copy_only=False)
            listing_ids = batch.column("listing_id")
            ids = np.asarray(listing_ids.to_pylist(), dtype=object)
            for part in set(parts):
                cand = np.flatnonzero(parts == part)
                mine = np.flatnonzero(q_parts == part)
                if len(mine) == 0:
                    continue
                qi, ci, scores = block_scoring.top_candidates(
                    q_vectors[mine],
                    vectors[cand],
                    k=k,
                    thresholds=best[mine].min(axis=1),
                    query_rids=q_rids[mine],
                    candidate_rids=rids[cand],
                    device=resolved,
                    candidate_order=task_stages.id_order(listing_ids, cand),
                )
                _keep_best(best, best_ids, mine[qi], ids[cand[ci]], scores)
        rows, cols = np.nonzero(np.isfinite(best))
        if len(rows):
            yield pa.RecordBatch.from_arrays(
                [
                    pa.array(q_ids[rows].tolist(), pa.string()),
                    pa.array(best_ids[rows, cols].tolist(), pa.string()),
                    pa.array(best[rows, cols], pa.float32()),
                ],
                names=["listing_id", "neighbour_id", "score"],
            )

    return run


def _keep_best(best, best_ids, queries, ids, scores) -> None:
    """Merge (query, id, score) rows (at most k per query) into the running top k in place."""
    if len(queries) == 0:
        return
    k = best.shape[1]
    order = np.lexsort((-scores, queries))
    queries, ids, scores = queries[order], ids[order], scores[order]
    slot = block_scoring.positions_in_runs(queries)
    fresh = np.full_like(best, -np.inf)
    fresh_ids = np.full(best_ids.shape, None, dtype=object)
    fresh[queries, slot] = scores
    fresh_ids[queries, slot] = ids
    merged = np.concatenate([best, fresh], axis=1)
    merged_ids = np.concatenate([best_ids, fresh_ids], axis=1)
    top = np.argsort(-merged, axis=1, kind="stable")
    ranked = np.take_along_axis(merged, top, axis=1)
    tied = np.flatnonzero((ranked[:, k - 1] == ranked[:, k]) & np.isfinite(ranked[:, k - 1]))
    if len(tied):
        # A tie at the k-th score: equal scores by neighbour id, as the merge ranks them.
        scores, width = merged[tied], merged.shape[1]
        names = np.where(np.isfinite(scores), merged_ids[tied], "").astype(str)
        codes = np.unique(names, return_inverse=True)[1].reshape(names.shape)
        rows = np.repeat(np.arange(len(tied)), width)
        order = np.lexsort((codes.ravel(), -scores.ravel(), rows)).reshape(len(tied), width)
        top[tied] = order - width * np.arange(len(tied))[:, None]
    top = top[:, :k]
    best[:] = np.take_along_axis(merged, top, axis=1)
    best_ids[:] = np.take_along_axis(merged_ids, top, axis=1)


def measure_recall(
    embeddings: DataFrame,
    top_k: DataFrame,
    *,
    k: int,
    sample_size: int = 2_000,
    seed: int = 7,
    partition_col: str | None = None,
    device: str = "cpu",
) -> dict:
    """Recall@k of ``top_k`` (ranked lists) against exact search for a deterministic sample of
    queries.

    Runs Spark jobs and collects only the sample (queries, their exact and found neighbours).
    A found neighbour counts as a hit when it scores at least the exact k-th neighbour's score
    (less 1e-5), so ties among equal vectors do not count as misses. Returns ``recall_at_k`` and
    ``recall_queries``.
    """
    base = base_rows(embeddings, partition_col)
    sample = (
        base.withColumn("h", F.xxhash64(F.lit(seed + 1), "listing_id"))
        .orderBy("h")
        .limit(sample_size)
        .drop("h")
    )
    table = sample.toArrow()
    if table.num_rows == 0:
        return {"recall_at_k": None, "recall_queries": 0}
    q_ids = np.asarray(table.column("listing_id").to_pylist(), dtype=object)
    queries = (
        q_ids,
        np.asarray(table.column("part").to_pylist(), dtype=object),
        table.column("rid").to_numpy(),
        unit_rows(vector_matrix(table.column("vec"))),
    )
    spark = embeddings.sparkSession
    queries_bc = spark.sparkContext.broadcast(queries)
    exact = neighbours.merge_top_k(
        base.mapInArrow(_exact_for_sample(queries_bc, k, device), neighbours.EMITTED_SCHEMA),
        k=k,
        dedupe=False,
    )
    truth: dict[str, list[float]] = {}
    for row in exact.select("listing_id", "score").collect():
        truth.setdefault(row.listing_id, []).append(row.score)
    found = found_scores(top_k, [str(i) for i in q_ids])
    queries_bc.destroy()
    return {"recall_at_k": recall_from_scores(truth, found), "recall_queries": len(q_ids)}


def found_scores(top_k: DataFrame, listing_ids: Sequence[str]) -> dict[str, list[float]]:
    """The neighbour scores ``top_k`` (ranked lists) holds for a few listings, collected."""
    wanted = top_k.sparkSession.createDataFrame([(i,) for i in listing_ids], "listing_id string")
    rows = top_k.join(F.broadcast(wanted), "listing_id").select("listing_id", "scores").collect()
    return {row.listing_id: list(row.scores) for row in rows}


def recall_from_scores(
    truth: dict[str, list[float]], found: dict[str, list[float]], tolerance: float = 1e-5
) -> float | None:
    """Share of exact neighbours matched: per query, found scores >= the exact k-th score
    (less ``tolerance``), capped at the number of exact neighbours. None without any."""
    wanted = sum(len(scores) for scores in truth.values())
    if wanted == 0:
        return None
    hits = 0
    for query, exact_scores in truth.items():
        kth = min(exact_scores) - tolerance
        hits += min(len(exact_scores), sum(s >= kth for s in found.get(query, [])))
    return hits / wanted


def quality(
    embeddings: DataFrame,
    top_k: DataFrame,
    *,
    k: int,
    num_listings: int,
    recall_sample: int = 2_000,
    partition_col: str | None = None,
    device: str = "cpu",
) -> dict:
    """``coverage`` and ``measure_recall`` of one search result (runs Spark jobs)."""
    found = coverage(top_k, k=k, num_listings=num_listings)
    return found | measure_recall(
        embeddings,
        top_k,
        k=k,
        sample_size=recall_sample,
        partition_col=partition_col,
        device=device,
    )


def coverage(top_k: DataFrame, *, k: int, num_listings: int) -> dict:
    """Runs one Spark job over ranked lists: share of listings with all ``k`` neighbours,
    listings with at least one, and distinct neighbours as a share of the catalogue."""
    # One row per neighbour; a listing's first one (pos 0) stands for the listing.
    first = F.col("pos") == 0
    row = (
        top_k.select(
            F.size("neighbour_ids").alias("found"),
            F.posexplode("neighbour_ids").alias("pos", "neighbour_id"),
        )
        .agg(
            F.sum(F.when(first & (F.col("found") >= k), 1).otherwise(0)).alias("full"),
            F.sum(F.when(first, 1).otherwise(0)).alias("with_any"),
            F.countDistinct("neighbour_id").alias("distinct_neighbours"),
        )
        .first()
    )
    n = max(1, num_listings)
    return {
        "coverage": (row.full or 0) / n,
        "listings_with_neighbours": int(row.with_any or 0),
        "distinct_neighbour_share": (row.distinct_neighbours or 0) / n,
    }
