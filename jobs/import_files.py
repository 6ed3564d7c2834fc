"""Import plain files (CSV or Parquet) as the pipeline's inputs: interactions, listings, spec.

    listing-similarity import --interactions events.csv --items items.csv --out ROOT/inputs \
        --user customer_id --item stock_code --timestamp invoice_date \
        --event-type event_type --event-types purchase=contact \
        --text description --numeric unit_price:log

Writes ``interactions/``, ``listings/`` and ``feature_spec.json`` under --out, and prints the
shard window that holds out the last --holdout-share of the events (run it with those flags).
Parquet written by pandas (nanosecond timestamps) is read as such.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow.dataset as pads
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from lib import feature_spec, plain_import, validation
from lib.feature_spec import FeatureSpec
from lib.parquet_io import read_parquet, write_parquet
from lib.plain_import import InteractionColumns, ItemColumns
from lib.session import build_session
from schemas import interactions


@dataclass(frozen=True)
class ImportArgs:
    interactions: str
    items: str
    out: str
    events: InteractionColumns
    items_columns: ItemColumns
    spec: FeatureSpec
    holdout_share: float = 0.1


def parse_args(argv: Sequence[str] | None = None) -> ImportArgs:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--interactions", required=True, help="CSV (.csv, .csv.gz) or Parquet")
    p.add_argument("--items", required=True, help="CSV or Parquet: one row per item")
    p.add_argument("--out", required=True, help="inputs folder to write")
    p.add_argument("--user", required=True, help="interactions: the user column")
    p.add_argument("--item", required=True, help="interactions: the item column")
    p.add_argument("--timestamp", required=True, help="interactions: when (text, date, epoch)")
    p.add_argument("--event-type", help="interactions: the event type column")
    p.add_argument(
        "--event-types",
        type=plain_import.parse_mapping,
        default=(),
        help="source=ours,... onto view, save, contact (others are dropped and counted)",
    )
    p.add_argument("--default-event-type", default="view", help="without --event-type")
    p.add_argument("--session", help="interactions: a session column")
    p.add_argument("--item-id", help="items: the id column (default: --item)")
    p.add_argument("--active", help="items: a boolean column, listed now (default: all)")
    p.add_argument("--latitude", help="items: latitude column")
    p.add_argument("--longitude", help="items: longitude column")
    p.add_argument("--created", help="items: creation date column")
    p.add_argument("--holdout-share", type=float, default=0.1, help="latest events held out")
    feature_spec.add_arguments(p)
    a = p.parse_args(argv)
    if not 0 < a.holdout_share < 1:
        p.error("--holdout-share must be between 0 and 1")
    try:
        spec = feature_spec.from_arguments(a)
    except ValueError as error:
        p.error(str(error))
    if (a.latitude or a.longitude) and not spec.geo:
        spec = FeatureSpec(
            features=(*spec.features, feature_spec.from_flags(geo=True).features[0]),
            display=spec.display,
        )
    events = InteractionColumns(
        user=a.user,
        item=a.item,
        timestamp=a.timestamp,
        event_type=a.event_type,
        session=a.session,
        event_types=a.event_types,
        default_event_type=a.default_event_type,
    )
    items = ItemColumns(
        item=a.item_id or a.item,
        active=a.active,
        latitude=a.latitude,
        longitude=a.longitude,
        created=a.created,
    )
    return ImportArgs(a.interactions, a.items, a.out, events, items, spec, a.holdout_share)


def _nanosecond_columns(path: str) -> list[str]:
    """Timestamp columns stored in nanoseconds (pandas' default), which Spark cannot read."""
    schema = pads.dataset(path, format="parquet").schema
    return [f.name for f in schema if str(f.type).startswith("timestamp[ns")]


def read_file(spark: SparkSession, path: str) -> DataFrame:
    """A CSV (header row; gzip fine) or Parquet file or folder, types inferred."""
    name = Path(path).name.lower()
    if ".csv" in name or name.endswith(".tsv"):
        return (
            spark.read.option("header", True)
            .option("inferSchema", True)
            .option("multiLine", True)
            .option("escape", '"')
            .option("sep", "\t" if name.endswith(".tsv") else ",")
            .csv(path)
        )
    nanos = _nanosecond_columns(path)
    if not nanos:
        return spark.read.parquet(path)
    # Spark reads INT64 TIMESTAMP(NANOS) only as longs; microseconds are what it keeps.
    spark.conf.set("spark.sql.legacy.parquet.nanosAsLong", "true")
    df = spark.read.parquet(path)
    return df.select(
        *[
            F.timestamp_micros(F.floor(F.col(c) / 1000)).alias(c) if c in nanos else F.col(c)
            for c in df.columns
        ]
    )


def run(spark: SparkSession, args: ImportArgs) -> dict:
    with validation.input_errors():
        return _import(spark, args)


def _import(spark: SparkSession, args: ImportArgs) -> dict:
    events = plain_import.to_interactions(read_file(spark, args.interactions), args.events)
    # Rows without a user, an item or a time cannot be an interaction (a shop's guest
    # checkouts): left out here, counted by reason in the result.
    missing = plain_import.missing_key_counts(events)
    events = events.where(plain_import.has_keys())
    contract = feature_spec.listings_table_spec(args.spec)
    snapshot = plain_import.to_listings(read_file(spark, args.items), args.items_columns, args.spec)
    validation.require_unique_key(snapshot, contract)
    validation.require_not_null(snapshot, contract)
    write_parquet(
        snapshot.select(*contract.columns).repartition(4), f"{args.out}/listings", contract
    )
    write_parquet(
        events.repartition(8, "event_date"), f"{args.out}/interactions", interactions.SPEC
    )
    feature_spec.write(args.spec, Path(args.out) / "feature_spec.json")
    written = read_parquet(spark, f"{args.out}/interactions", interactions.SPEC)
    listings = read_parquet(spark, f"{args.out}/listings", contract)
    counts = listings.agg(F.count(F.lit(1)), F.sum(F.col("is_active").cast("long"))).first()
    return {
        "stage": "import_files",
        "out": args.out,
        "interactions": written.count(),
        "interactions_dropped": missing,
        "listings": counts[0],
        "active_listings": counts[1] or 0,
        "feature_spec": args.spec.to_dict(),
        "shard_args": plain_import.shard_window(written, holdout_share=args.holdout_share),
    }


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    print(json.dumps(run(build_session("listing-similarity-import"), args), default=str))


if __name__ == "__main__":
    main()
