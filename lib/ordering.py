"""Positions in a global sort order, computed in parallel (no single-partition step).

``Window.orderBy(...)`` without ``partitionBy`` makes Spark move every row into one partition
and sort it in one task. ``sorted_positions`` gives the same numbers with the work spread over
all partitions:

1. range-partition the rows by the sort key (``repartitionByRange``: partition i holds the i-th
   range of keys, so every row of partition i sorts before every row of partition i + 1);
2. count the rows per partition: a tiny table, one row per partition, from which a
   non-equi self-join (broadcast) gives each partition's offset (rows in all earlier ones);
3. position = offset of its partition + its position within the sorted partition.

Positions depend only on the sorted order of the rows, never on where the range boundaries
fall, so the result is the same for any number of partitions.

Everything stays lazy. The counts and the rows must see the same range partitioning, and
Spark's range partitioner draws its boundaries from a sample when the shuffle runs, so the
counts are taken from the very shuffle the rows are read from: both branches contain the same
range exchange, which Spark runs once and reuses (``spark.sql.exchange.reuse``, on by default;
``sorted_positions`` refuses to build the plan when it is off). The partition count is always
explicit, so adaptive execution never coalesces the shuffle's partitions differently for the
two readers.
"""

from __future__ import annotations

from collections.abc import Sequence

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

_PID, _LOCAL, _N, _OFFSET = "_sp_pid", "_sp_local", "_sp_n", "_sp_offset"
# monotonically_increasing_id() puts the partition id in the upper 31 bits and the record
# number within the partition in the lower 33: the record number is the row's position in its
# (sorted) partition, contiguous from 0.
_RECORD_MASK = (1 << 33) - 1


def sorted_positions(
    df: DataFrame,
    order_cols: Sequence[str],
    position_col: str = "position",
    *,
    ascending: bool | Sequence[bool] = True,
    ties: Sequence[str] = (),
    num_partitions: int | None = None,
) -> DataFrame:
    """``df``'s ``order_cols`` plus ``position_col`` (long): 0-based position in the sort order.

    Without ``ties`` the order must be total (``order_cols`` unique per row, e.g. end with an
    id): positions are 0, 1, ..., n - 1 like ``row_number() - 1``. With ``ties`` (a prefix of
    ``order_cols``), rows equal on the tie columns share the position of the first of them and
    the next distinct value skips ahead, like SQL ``RANK() - 1``; this costs one more shuffle
    (a window per range partition). ``ascending`` is one flag or one per column, as in
    ``DataFrame.sort`` (nulls first when ascending, last when descending). Only the order
    columns come out: join anything else back by a key. ``num_partitions`` (default
    ``spark.sql.shuffle.partitions``) only spreads the work; it never changes the result.
    """
    order_cols = list(order_cols)
    ties = list(ties)
    if ties != order_cols[: len(ties)]:
        raise ValueError(f"ties {ties} must be a prefix of the order columns {order_cols}")
    flags = [ascending] * len(order_cols) if isinstance(ascending, bool) else list(ascending)
    spark = df.sparkSession
    if spark.conf.get("spark.sql.exchange.reuse", "true").lower() == "false":
        raise ValueError("sorted_positions needs spark.sql.exchange.reuse (see lib.ordering)")
    n = num_partitions or int(spark.conf.get("spark.sql.shuffle.partitions"))
    sort_by = [
        F.col(c).asc() if up else F.col(c).desc() for c, up in zip(order_cols, flags, strict=True)
    ]

    ranged = df.select(*order_cols).repartitionByRange(n, *sort_by)
    if ties:
        return _tied_positions(ranged, order_cols, sort_by[: len(ties)], ties, position_col)
    counts = ranged.groupBy(F.spark_partition_id().alias(_PID)).agg(F.count(F.lit(1)).alias(_N))
    # Rows up to and including each partition, less its own: both sides of the join read the
    # same counts, so Spark counts once (a side that pruned the count would count again).
    upto = counts.select(F.col(_PID).alias("_q"), F.col(_N).alias("_qn"))
    offsets = (
        counts.join(F.broadcast(upto), F.col("_q") <= F.col(_PID))
        .groupBy(_PID, _N)
        .agg(F.sum("_qn").alias("_upto"))
        .select(_PID, (F.col("_upto") - F.col(_N)).alias(_OFFSET))
    )
    local = ranged.sortWithinPartitions(*sort_by).select(
        *order_cols,
        F.spark_partition_id().alias(_PID),
        F.monotonically_increasing_id().bitwiseAND(F.lit(_RECORD_MASK)).alias(_LOCAL),
    )
    return local.join(F.broadcast(offsets), _PID).select(
        *order_cols, (F.col(_OFFSET) + F.col(_LOCAL)).alias(position_col)
    )


def _tied_positions(
    ranged: DataFrame,
    order_cols: list[str],
    tie_sort: list[Column],
    ties: list[str],
    position_col: str,
) -> DataFrame:
    """RANK-style positions: each range partition ranks its rows with a window of its own.

    A tie group can run over a boundary into the next partitions; only the first group of a
    partition can have started earlier, so each partition subtracts the rows of its first tie
    value that lie in earlier partitions (their tails), read from the per-partition summary.
    """
    per_partition = Window.partitionBy(_PID).orderBy(*tie_sort)
    local = ranged.withColumn(_PID, F.spark_partition_id()).withColumn(
        _LOCAL, F.rank().over(per_partition) - 1
    )
    tie_value = F.struct(*ties)
    summary = local.groupBy(_PID).agg(
        F.count(F.lit(1)).alias(_N),
        F.min_by(tie_value, F.col(_LOCAL)).alias("_first"),
        F.max_by(tie_value, F.col(_LOCAL)).alias("_qlast"),
        (F.count(F.lit(1)) - F.max(_LOCAL)).alias("_qtail"),
    )
    earlier = summary.select(F.col(_PID).alias("_q"), F.col(_N).alias("_qn"), "_qlast", "_qtail")
    # Rows in earlier partitions, and those of them that tie with this partition's first value.
    offsets = (
        summary.select(_PID, "_first")
        .join(F.broadcast(earlier), F.col("_q") < F.col(_PID), "left")
        .groupBy(_PID)
        .agg(
            F.coalesce(F.sum("_qn"), F.lit(0)).alias(_OFFSET),
            F.coalesce(
                F.sum(F.when(F.col("_qlast").eqNullSafe(F.col("_first")), F.col("_qtail"))),
                F.lit(0),
            ).alias("_carried"),
        )
    )
    carried = F.when(F.col(_LOCAL) == 0, F.col("_carried")).otherwise(F.lit(0))
    return local.join(F.broadcast(offsets), _PID).select(
        *order_cols, (F.col(_OFFSET) + F.col(_LOCAL) - carried).alias(position_col)
    )
