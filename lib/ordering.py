"""Positions in a global sort order, computed in parallel (no single-partition step).

``Window.orderBy(...)`` without ``partitionBy`` makes Spark move every row into one partition
and sort it in one task. ``sorted_positions`` gives the same numbers with the work spread over
many partitions:

1. split the rows into ordered buckets by the leading sort column, with boundaries taken from a
   bounded, seeded sample (the one small action: at most ``sample_size`` values reach the
   driver). Equal leading values always share a bucket, and every row of bucket i sorts before
   every row of bucket i + 1;
2. count the rows per bucket: a tiny table from which a broadcast non-equi self-join gives each
   bucket's offset (rows in all earlier buckets);
3. position = offset of its bucket + its row number (or rank) within the bucket, a window
   partitioned by the bucket.

Positions depend only on the sorted order of the rows, never on where the boundaries fall, so
the result is the same for any sample and any number of buckets. A leading value shared by a
large share of the rows puts them in one bucket: the work is then skewed, not wrong.
"""

from __future__ import annotations

from collections.abc import Sequence

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

_BUCKET, _LOCAL, _N, _OFFSET = "_sp_bucket", "_sp_local", "_sp_n", "_sp_offset"


def _boundaries(df: DataFrame, column: str, buckets: int, sample_size: int, seed: int) -> list:
    """Up to ``buckets - 1`` distinct ascending cut values of ``column`` from a hashed sample."""
    sample = (
        df.select(column)
        .where(F.col(column).isNotNull())
        .orderBy(F.xxhash64(F.col(column), F.lit(seed)))
        .limit(sample_size)
        .collect()
    )
    values = sorted({row[0] for row in sample})
    if len(values) < 2 or buckets < 2:
        return []
    cuts = [values[len(values) * i // buckets] for i in range(1, buckets)]
    return sorted(set(cuts))


def _bucket(column: str, cuts: list, ascending: bool) -> Column:
    above = sum((F.col(column) > F.lit(cut)).cast("int") for cut in cuts) if cuts else F.lit(0)
    ordered = above if ascending else F.lit(len(cuts)) - above
    # Nulls first when ascending, last when descending, as DataFrame.sort puts them.
    nulls = F.lit(-1) if ascending else F.lit(len(cuts) + 1)
    return F.when(F.col(column).isNull(), nulls).otherwise(ordered)


def sorted_positions(
    df: DataFrame,
    order_cols: Sequence[str],
    position_col: str = "position",
    *,
    ascending: bool | Sequence[bool] = True,
    ties: Sequence[str] = (),
    num_partitions: int | None = None,
    sample_size: int = 20_000,
    seed: int = 7,
) -> DataFrame:
    """``df``'s ``order_cols`` plus ``position_col`` (long): 0-based position in the sort order.

    Without ``ties`` the order must be total (``order_cols`` unique per row, e.g. end with an
    id): positions are 0, 1, ..., n - 1 like ``row_number() - 1``. With ``ties`` (a prefix of
    ``order_cols``), rows equal on the tie columns share the position of the first of them and
    the next distinct value skips ahead, like SQL ``RANK() - 1``. ``ascending`` is one flag or
    one per column, as in ``DataFrame.sort`` (nulls first when ascending, last when
    descending). Only the order columns come out: join anything else back by a key.
    ``num_partitions`` (default ``spark.sql.shuffle.partitions``) is the number of buckets; it
    only spreads the work and never changes the result. Runs one small Spark job for the
    bucket boundaries.
    """
    order_cols = list(order_cols)
    ties = list(ties)
    if ties != order_cols[: len(ties)]:
        raise ValueError(f"ties {ties} must be a prefix of the order columns {order_cols}")
    flags = [ascending] * len(order_cols) if isinstance(ascending, bool) else list(ascending)
    spark = df.sparkSession
    buckets = num_partitions or int(spark.conf.get("spark.sql.shuffle.partitions"))
    sort_by = [
        (F.col(c).asc_nulls_first() if up else F.col(c).desc_nulls_last())
        for c, up in zip(order_cols, flags, strict=True)
    ]
    lead = order_cols[0]
    cuts = _boundaries(df, lead, buckets, sample_size, seed)
    rows = df.select(*order_cols).withColumn(_BUCKET, _bucket(lead, cuts, flags[0]))
    in_bucket = Window.partitionBy(_BUCKET)
    if ties:
        local = F.rank().over(in_bucket.orderBy(*sort_by[: len(ties)])) - 1
    else:
        local = F.row_number().over(in_bucket.orderBy(*sort_by)) - 1
    rows = rows.withColumn(_LOCAL, local)
    counts = rows.groupBy(_BUCKET).agg(F.count(F.lit(1)).alias(_N))
    earlier = counts.select(F.col(_BUCKET).alias("_q"), F.col(_N).alias("_qn"))
    offsets = (
        counts.join(F.broadcast(earlier), F.col("_q") < F.col(_BUCKET), "left")
        .groupBy(_BUCKET)
        .agg(F.coalesce(F.sum("_qn"), F.lit(0)).alias(_OFFSET))
    )
    return rows.join(F.broadcast(offsets), _BUCKET).select(
        *order_cols, (F.col(_OFFSET) + F.col(_LOCAL)).cast("long").alias(position_col)
    )
