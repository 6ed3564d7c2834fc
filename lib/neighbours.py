"""Top-k cosine neighbours inside Spark.

``exact_top_k`` is blockwise brute force: listings are hashed into blocks, every (query block,
candidate block) pair becomes one task that scores a dense matrix product and keeps each query's
top k, and a final merge keeps the best k per query. Nothing proportional to the catalogue
reaches the driver; memory per task is two blocks.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from schemas import listing_neighbours

_PARTIAL_SCHEMA = "listing_id string, neighbour_id string, score float"


def default_num_blocks(num_listings: int, block_size: int = 4_000) -> int:
    """Blocks of a few thousand vectors: a block pair's score matrix stays ~64 MB."""
    return max(1, -(-num_listings // block_size))


def _unit_rows(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms == 0, 1.0, norms)


def _stack(cells) -> tuple[list[str], np.ndarray]:
    ids = [cell["listing_id"] for cell in cells]
    vectors = np.stack([np.asarray(cell["embedding"], dtype=np.float32) for cell in cells])
    return ids, _unit_rows(vectors)


def _score_block_pairs(k: int):
    def score(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for pdf in batches:
            for query_cells, candidate_cells in zip(pdf["queries"], pdf["candidates"], strict=True):
                query_ids, queries = _stack(query_cells)
                candidate_ids, candidates = _stack(candidate_cells)
                scores = queries @ candidates.T
                position = {listing_id: j for j, listing_id in enumerate(candidate_ids)}
                for i, listing_id in enumerate(query_ids):
                    if listing_id in position:  # never one's own neighbour
                        scores[i, position[listing_id]] = -np.inf
                keep = min(k, scores.shape[1])
                top = np.argpartition(-scores, keep - 1, axis=1)[:, :keep]
                top_scores = np.take_along_axis(scores, top, axis=1)
                valid = np.isfinite(top_scores)
                rows, cols = np.nonzero(valid)
                yield pd.DataFrame(
                    {
                        "listing_id": np.asarray(query_ids, dtype=object)[rows],
                        "neighbour_id": np.asarray(candidate_ids, dtype=object)[top[rows, cols]],
                        "score": top_scores[rows, cols].astype(np.float32),
                    }
                )

    return score


def exact_top_k(embeddings: DataFrame, *, k: int, num_blocks: int) -> DataFrame:
    """Exact top-``k`` cosine neighbours of every row of ``embeddings`` (listing_id, embedding).

    Returns listing_id, neighbour_id, rank (1..k), score; ties broken by neighbour_id so reruns
    give identical tables.
    """
    blocks = (
        embeddings.select(
            F.pmod(F.xxhash64("listing_id"), F.lit(num_blocks)).alias("block"),
            F.struct("listing_id", "embedding").alias("cell"),
        )
        .groupBy("block")
        .agg(F.collect_list("cell").alias("cells"))
    )
    pairs = (
        blocks.select(F.col("block").alias("q_block"), F.col("cells").alias("queries"))
        .crossJoin(
            blocks.select(F.col("block").alias("c_block"), F.col("cells").alias("candidates"))
        )
        # One block pair per task, so the scoring spreads over every core.
        .repartition(num_blocks * num_blocks, "q_block", "c_block")
    )
    partial = pairs.mapInPandas(_score_block_pairs(k), _PARTIAL_SCHEMA)
    return merge_top_k(partial, k=k)


def merge_top_k(candidates: DataFrame, *, k: int) -> DataFrame:
    """Keep the best ``k`` (listing_id, neighbour_id, score) rows per listing, ranked from 1."""
    order = Window.partitionBy("listing_id").orderBy(F.desc("score"), F.asc("neighbour_id"))
    return (
        candidates.dropDuplicates(["listing_id", "neighbour_id"])
        .withColumn("rank", F.row_number().over(order))
        .where(F.col("rank") <= k)
        .select("listing_id", "neighbour_id", F.col("rank").cast("int"), "score")
    )


def to_neighbours_table(top_k: DataFrame, *, model_version: str, run_date: dt.date) -> DataFrame:
    """Shape ranked neighbours into the published ``listing_neighbours`` contract."""
    return top_k.select(
        F.lit(model_version).alias("model_version"),
        "listing_id",
        "neighbour_id",
        "rank",
        F.col("score").cast("float").alias("score"),
        F.lit(run_date).alias("run_date"),
    ).select(*listing_neighbours.SCHEMA.fieldNames())
