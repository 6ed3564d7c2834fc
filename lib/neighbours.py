"""Exact top-k cosine neighbours in Spark, the ranked lists both search methods return, and
their published shape.

``exact_top_k`` is blockwise brute force on the task stages of ``lib.task_stages``: listings
are hashed into blocks and every (candidate block, query block) pair is one task. It is the
reference the IVF search (``lib.ann``) is measured against. ``merge_lists`` ranks the per-task
candidate lists of either search into one row per listing (``RANKED_LISTS_SCHEMA``: its best
``k``, ties by neighbour_id), ``ranked_rows`` and ``to_neighbours_table`` turn those into one
row per neighbour, the published ``listing_neighbours`` contract.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from lib.block_scoring import positions_in_runs
from lib.packing import pack_matrix, unit_rows, unpack_tables, vector_matrix
from lib.task_stages import BOTH, CANDIDATE, QUERY, search_tasks
from schemas import listing_neighbours

# No partition key: every listing is in the same (empty-named) part.
NO_PART = ""
# One row per (listing, candidate): what the exact reference of ``lib.recall`` emits.
EMITTED_SCHEMA = "listing_id string, neighbour_id string, score float"
# A listing's top k as one row, best first (rank = position + 1): the search result's shape, a
# twentieth of the rows that one row per neighbour takes (``ranked_rows``).
RANKED_LISTS_SCHEMA = "listing_id string, neighbour_ids array<string>, scores array<float>"
PACKED_SCHEMA = "part string, rid long, listing_id string, vec binary"


def default_num_blocks(num_listings: int, block_size: int = 4_000) -> int:
    """Blocks of a few thousand vectors: a block pair's score matrix stays ~64 MB."""
    return max(1, -(-num_listings // block_size))


# --------------------------------------------------------------------------------------------
# Rows and exact search
# --------------------------------------------------------------------------------------------


def part_column(partition_col: str | None) -> Column:
    """The partition key as the ``part`` string column (nulls form their own part)."""
    if partition_col is None:
        return F.lit(NO_PART).alias("part")
    return F.coalesce(F.col(partition_col).cast("string"), F.lit(NO_PART)).alias("part")


def base_rows(embeddings: DataFrame, partition_col: str | None = None) -> DataFrame:
    """(part, rid, listing_id, vec array<float>) from (listing_id, embedding[, partition_col])."""
    return embeddings.select(
        part_column(partition_col),
        F.xxhash64("listing_id").alias("rid"),
        "listing_id",
        F.col("embedding").cast("array<float>").alias("vec"),
    )


def _pack(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    for batch in batches:
        if batch.num_rows:
            vectors = pack_matrix(unit_rows(vector_matrix(batch.column("vec"))))
            yield batch.set_column(batch.schema.get_field_index("vec"), "vec", vectors)


def packed_rows(embeddings: DataFrame, partition_col: str | None = None) -> DataFrame:
    """``base_rows`` with unit vectors packed as binary (``pack_matrix``)."""
    return base_rows(embeddings, partition_col).mapInArrow(_pack, PACKED_SCHEMA)


def task_rows(
    rows: DataFrame, *, role: int | Column, list_: Column, qchunk: Column, cslice: Column
) -> DataFrame:
    """Rows with (part, rid, listing_id, vec[, tau, probe_bytes]) shaped as ``TASK_SCHEMA``
    rows."""
    # Candidates never need a query's threshold or probes.
    names = set(rows.columns) if isinstance(role, Column) or role != CANDIDATE else set()
    role_col = role if isinstance(role, Column) else F.lit(role)
    return rows.select(
        "part",
        list_.cast("int").alias("list"),
        qchunk.cast("int").alias("qchunk"),
        cslice.cast("int").alias("cslice"),
        role_col.cast("tinyint").alias("role"),
        "rid",
        "listing_id",
        "vec",
        (F.col("tau") if "tau" in names else F.lit(None)).cast("float").alias("tau"),
        (F.col("probe_bytes") if "probe_bytes" in names else F.lit(None))
        .cast("binary")
        .alias("probe_bytes"),
        F.lit(bytearray()).alias("payload"),
    )


def exact_top_k(
    embeddings: DataFrame,
    *,
    k: int,
    num_blocks: int,
    partition_col: str | None = None,
    device: str = "cpu",
) -> DataFrame:
    """Exact top-``k`` cosine neighbours of every row of ``embeddings`` (listing_id, embedding),
    within the same ``partition_col`` value when given.

    Returns ``RANKED_LISTS_SCHEMA`` rows (``ranked_rows`` gives one row per neighbour); ties
    broken by neighbour_id so reruns give identical tables.
    """
    base = packed_rows(embeddings, partition_col).withColumn(
        "block", F.pmod(F.col("rid"), F.lit(num_blocks))
    )
    every_block = base.withColumn("target", F.explode(F.sequence(F.lit(0), F.lit(num_blocks - 1))))
    # Task (candidate block c, query block q): a listing is a query of (target, own block) and a
    # candidate of (own block, target); on the diagonal it is both.
    diagonal = F.col("target") == F.col("block")
    queries = task_rows(
        every_block.where(~diagonal),
        role=QUERY,
        list_=F.col("target"),
        qchunk=F.col("block"),
        cslice=F.lit(0),
    )
    candidates = task_rows(
        every_block,
        role=F.when(diagonal, BOTH).otherwise(CANDIDATE),
        list_=F.col("block"),
        qchunk=F.col("target"),
        cslice=F.lit(0),
    )
    # One block pair per partition spreads the scoring over every core; past a few thousand
    # pairs, pairs share partitions. The merge holds about as many list elements per partition.
    partitions = min(num_blocks * num_blocks, 8192)
    found = search_tasks(
        queries.unionByName(candidates),
        k=k,
        num_partitions=partitions,
        merge_partitions=partitions,
        device=device,
    )
    return merge_lists(found, k=k, num_partitions=partitions)


# --------------------------------------------------------------------------------------------
# Merging per-task results; the published shape
# --------------------------------------------------------------------------------------------


def _rank_lists(table: pa.Table, k: int) -> pa.Table:
    """``LISTS_ARROW_SCHEMA`` rows -> one ``RANKED_LISTS_SCHEMA`` row per listing: its best k,
    ties broken by neighbour_id, self-pairs dropped."""
    encoded = pc.dictionary_encode(table["listing_id"].combine_chunks())
    top_ids = table["top_ids"].combine_chunks()
    lengths = pc.list_value_length(top_ids).to_numpy(zero_copy_only=False)
    # Listings as integer codes: the sort compares strings only between equal scores.
    codes = pa.array(np.repeat(encoded.indices.to_numpy(zero_copy_only=False), lengths))
    flat = pa.table(
        {
            "code": codes,
            "score": pc.list_flatten(table["top_scores"].combine_chunks()),
            "neighbour_id": pc.list_flatten(top_ids),
        }
    )
    flat = flat.filter(pc.not_equal(encoded.dictionary.take(codes), flat["neighbour_id"]))
    flat = flat.sort_by(
        [("code", "ascending"), ("score", "descending"), ("neighbour_id", "ascending")]
    )
    code = flat["code"].to_numpy()
    rank = positions_in_runs(code) + 1
    starts = rank == 1
    keep = rank <= k
    # A listing's first row (rank 1) is always kept, so its list starts there among kept rows.
    offsets = pa.array(np.append(np.flatnonzero(starts[keep]), keep.sum()).astype(np.int32))
    kept = pa.array(keep)
    return pa.table(
        {
            "listing_id": encoded.dictionary.take(pa.array(code[starts])),
            "neighbour_ids": pa.ListArray.from_arrays(
                offsets, flat["neighbour_id"].filter(kept).combine_chunks()
            ),
            "scores": pa.ListArray.from_arrays(
                offsets, flat["score"].filter(kept).combine_chunks()
            ),
        }
    )


def _merge_partition(k: int) -> Callable[[Iterator[pa.RecordBatch]], Iterator]:
    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        lists = [table for batch in batches for table in unpack_tables(batch.column("payload"))]
        if lists:
            yield from _rank_lists(pa.concat_tables(lists), k).to_batches()

    return run


def merge_lists(packed: DataFrame, *, k: int, num_partitions: int) -> DataFrame:
    """The best ``k`` per listing of its candidate lists (``search_tasks`` output, packed for
    ``num_partitions``; any number of lists per listing), best first (ties by neighbour_id),
    as ``RANKED_LISTS_SCHEMA``. Pairs must not repeat. One shuffle of the packed values; the
    ranking runs in Arrow inside the partitions."""
    return packed.repartition(num_partitions, "bucket").mapInArrow(
        _merge_partition(k), RANKED_LISTS_SCHEMA
    )


def ranked_rows(lists: DataFrame) -> DataFrame:
    """``RANKED_LISTS_SCHEMA`` rows as one row per (listing, neighbour): listing_id,
    neighbour_id, rank (from 1), score."""
    return lists.select(
        "listing_id", "scores", F.posexplode("neighbour_ids").alias("pos", "neighbour_id")
    ).select(
        "listing_id",
        "neighbour_id",
        (F.col("pos") + 1).cast("int").alias("rank"),
        F.col("scores")[F.col("pos")].cast("float").alias("score"),
    )


def merge_top_k(candidates: DataFrame, *, k: int, dedupe: bool = True) -> DataFrame:
    """Keep the best ``k`` (listing_id, neighbour_id, score) rows per listing, ranked from 1.

    ``dedupe=False`` skips a shuffle when each pair can appear only once.
    """
    order = Window.partitionBy("listing_id").orderBy(F.desc("score"), F.asc("neighbour_id"))
    rows = candidates.where(F.col("listing_id") != F.col("neighbour_id"))
    if dedupe:
        rows = rows.dropDuplicates(["listing_id", "neighbour_id"])
    return (
        rows.withColumn("rank", F.row_number().over(order))
        .where(F.col("rank") <= k)
        .select("listing_id", "neighbour_id", F.col("rank").cast("int"), "score")
    )


def to_neighbours_table(top_k: DataFrame, *, model_version: str, run_date: dt.date) -> DataFrame:
    """Shape ranked neighbour lists (``RANKED_LISTS_SCHEMA``) into the published
    ``listing_neighbours`` contract, one row per neighbour."""
    return (
        ranked_rows(top_k)
        .select(
            F.lit(model_version).alias("model_version"),
            "listing_id",
            "neighbour_id",
            "rank",
            F.col("score").cast("float").alias("score"),
            F.lit(run_date).alias("run_date"),
        )
        .select(*listing_neighbours.SCHEMA.fieldNames())
    )
