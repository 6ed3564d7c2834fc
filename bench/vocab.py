"""Time a first night's vocabulary: numbering millions of new ids without one big partition.

    .venv/bin/python bench/vocab.py [--sizes 2000000,20000000] [--partitions N]

For each size n, builds n distinct synthetic string ids (in scrambled order), runs
``lib.shards.extend_vocabulary`` with no previous vocabulary and writes it to Parquet under a
temporary directory, in the bench's own local[2] session. Prints seconds and seconds per million
ids per size, and ``growth`` = seconds per id at the largest size / at the smallest (goal <= 1.5:
the per-id cost must not climb with the catalogue, as it did when one task sorted every id).
The last line is one JSON object with those numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pyspark.sql import SparkSession  # noqa: E402
from pyspark.sql import functions as F  # noqa: E402

from lib import shards  # noqa: E402
from lib.session import build_session  # noqa: E402

GOAL_GROWTH = 1.5
# A prime: id * _SCRAMBLE mod n is a permutation of 0..n-1 for every n it does not divide.
_SCRAMBLE = 2_654_435_761


def synthetic_ids(spark: SparkSession, n: int):
    """n distinct ids like ``user-0000012345``, not generated in sorted order."""
    scrambled = (F.col("id") * F.lit(_SCRAMBLE)) % F.lit(n)
    return spark.range(n).select(F.format_string("user-%010d", scrambled).alias("id"))


def time_vocabulary(spark: SparkSession, n: int, out: Path) -> float:
    started = time.perf_counter()
    shards.extend_vocabulary(synthetic_ids(spark, n)).write.mode("overwrite").parquet(str(out))
    seconds = time.perf_counter() - started
    check = spark.read.parquet(str(out)).agg(
        F.count(F.lit(1)).alias("rows"), F.max("idx").alias("top"), F.min("idx").alias("bottom")
    )
    row = check.first()
    if (row.rows, row.bottom, row.top) != (n, 0, n - 1):
        raise SystemExit(f"vocabulary of {n:,} ids is not dense 0..n-1: {row}")
    return seconds


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2000000,20000000", help="comma-separated id counts")
    parser.add_argument(
        "--partitions", type=int, default=None, help="spark.sql.shuffle.partitions (session's)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
    spark = build_session("bench-vocab", "local[2]", shuffle_partitions=args.partitions, ui=False)
    seconds: dict[str, float] = {}
    per_million: dict[str, float] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="bench-vocab-") as tmp:
            time_vocabulary(spark, 10_000, Path(tmp) / "warmup")  # JVM and Python workers warm
            for n in sizes:
                took = time_vocabulary(spark, n, Path(tmp) / f"vocab-{n}")
                seconds[str(n)] = round(took, 2)
                per_million[str(n)] = round(took / (n / 1e6), 3)
                print(f"{n:>12,} ids: {took:8.2f} s  {per_million[str(n)]:.3f} s per million ids")
        partitions = int(spark.conf.get("spark.sql.shuffle.partitions"))
    finally:
        spark.stop()
    smallest, largest = str(sizes[0]), str(sizes[-1])
    growth = round(per_million[largest] / per_million[smallest], 3)
    print(f"growth (s per id at {int(largest):,} / at {int(smallest):,}): {growth} (goal <= 1.5)")
    result = {
        "sizes": sizes,
        "seconds": seconds,
        "seconds_per_million": per_million,
        "growth": growth,
        "goal_growth_max": GOAL_GROWTH,
        "shuffle_partitions": partitions,
        "master": "local[2]",
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
