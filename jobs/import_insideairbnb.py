"""Import Inside Airbnb scrapes (listings.csv.gz + reviews.csv.gz) as our pipeline inputs.

With one scrape every review is history. With --later-scrape the reviews written after the
first scrape's date come from the later one and fall in the shard stage's holdout window; the
printed stats carry the --run-date/--lookback-days/--holdout-days that make it so, and listings
first seen in the later scrape are the cold start. Column mapping: lib/insideairbnb.py.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import dataclass

from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from lib import feature_spec
from lib import insideairbnb as airbnb
from lib.parquet_io import read_parquet, write_parquet
from lib.session import build_session
from schemas import interactions


@dataclass(frozen=True)
class ImportArgs:
    scrape: str
    out: str
    later_scrape: str | None = None
    feature_set: str = "common"


def parse_args(argv: Sequence[str] | None = None) -> ImportArgs:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument(
        "--scrape", required=True, help="folder with listings.csv[.gz], reviews.csv[.gz]"
    )
    p.add_argument(
        "--later-scrape", help="a later scrape of the same city: its new reviews are the holdout"
    )
    p.add_argument(
        "--out",
        required=True,
        help="inputs folder: writes interactions/, listings/ and feature_spec.json",
    )
    p.add_argument("--feature-set", choices=airbnb.FEATURE_SETS, default="common")
    a = p.parse_args(argv)
    return ImportArgs(a.scrape, a.out, a.later_scrape, a.feature_set)


def run(spark: SparkSession, args: ImportArgs) -> dict:
    raw, reviews = airbnb.read_scrape(spark, args.scrape)
    later_raw, later_reviews = (
        airbnb.read_scrape(spark, args.later_scrape) if args.later_scrape else (None, None)
    )
    split = airbnb.split_date(reviews) if args.later_scrape else None
    snapshot = airbnb.combine_snapshots(
        airbnb.to_listings(raw, feature_set=args.feature_set),
        airbnb.to_listings(later_raw, feature_set=args.feature_set) if later_raw else None,
    )
    events = airbnb.interactions_from_scrapes(reviews, later_reviews, split_date=split)
    contract = airbnb.listings_spec()
    write_parquet(snapshot.coalesce(1), f"{args.out}/listings", contract)
    feature_spec.write(airbnb.feature_spec(args.feature_set), f"{args.out}/feature_spec.json")
    write_parquet(
        events.repartition(4, "event_date"), f"{args.out}/interactions", interactions.SPEC
    )
    written = read_parquet(spark, f"{args.out}/interactions", interactions.SPEC)
    held_out = F.col("event_date") >= F.lit(split or dt.date.max)
    counts = written.agg(F.count(F.lit(1)), F.sum(held_out.cast("long"))).first()
    active = read_parquet(spark, f"{args.out}/listings", contract).groupBy("is_active").count()
    by_state = {r.is_active: r["count"] for r in active.collect()}
    return {
        "stage": "import_insideairbnb",
        "out": args.out,
        "feature_set": args.feature_set,
        "split_date": split and split.isoformat(),
        "listings": sum(by_state.values()),
        "active_listings": by_state.get(True, 0),
        "interactions": counts[0],
        "holdout_interactions": counts[1] or 0,
        "shard_args": airbnb.shard_window(written, split_date=split),
    }


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    print(
        json.dumps(run(build_session("listing-similarity-import-insideairbnb"), args), default=str)
    )


if __name__ == "__main__":
    main()
