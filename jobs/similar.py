"""Print one listing and its top-k neighbours from the published table, with their features.

    listing-similarity similar LISTING_ID [--run-date D] [--table PATH] [--root DIR]

The sanity check for a downstream engineer or a product manager: distance, score and the
features of both sides. The last line is the same as JSON.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from lib import delta_io, feature_spec
from lib.feature_spec import FeatureSpec
from lib.lookup import describe, neighbours_with_features
from lib.paths import Layout
from lib.session import build_session
from schemas import listing_neighbours


@dataclass(frozen=True)
class SimilarArgs:
    listing_id: str
    root: str = "demo"
    run_date: dt.date | None = None
    table: str | None = None
    listings: str | None = None
    k: int = 10


def parse_args(argv: Sequence[str] | None = None) -> SimilarArgs:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("listing_id")
    p.add_argument("--root", default="demo", help="deployment root (default ./demo)")
    p.add_argument("--run-date", type=dt.date.fromisoformat, help="default: the latest run")
    p.add_argument("--table", help="listing_neighbours table (default: ROOT/tables/...)")
    p.add_argument("--listings", help="listing snapshot for features (default: ROOT/inputs/...)")
    p.add_argument("--k", type=int, default=10, help="neighbours to show")
    return SimilarArgs(**vars(p.parse_args(argv)))


def shown_features(layout: Layout, run_date: dt.date) -> FeatureSpec:
    """The features that run was trained on (its shard manifest), else the inputs' spec."""
    manifest = Path(layout.shards(run_date)) / "manifest.json"
    if manifest.exists():
        return feature_spec.from_dict(json.loads(manifest.read_text())["feature_spec"])
    if Path(layout.feature_spec).exists():
        return feature_spec.read(layout.feature_spec)
    return feature_spec.NO_FEATURES


def run(spark: SparkSession, args: SimilarArgs) -> dict:
    layout = Layout(args.root)
    table = args.table or layout.table("listing_neighbours")
    published = delta_io.read_table(spark, table, listing_neighbours.SPEC)
    run_date = args.run_date or published.agg(F.max("run_date")).first()[0]
    mine = published.where(
        (F.col("run_date") == run_date) & (F.col("listing_id") == args.listing_id)
    ).where(F.col("rank") <= args.k)
    spec = shown_features(layout, run_date)
    snapshot = delta_io.read_input(
        spark, args.listings or layout.listings, feature_spec.listings_table_spec(spec)
    )
    rows = sorted(
        neighbours_with_features(mine, snapshot, spec.shown).collect(), key=lambda r: r["rank"]
    )
    if not rows:
        raise SystemExit(f"listing {args.listing_id!r} has no neighbours in {table} for {run_date}")
    return {
        "listing_id": args.listing_id,
        "run_date": run_date.isoformat(),
        "model_version": mine.select("model_version").first()[0],
        "listing": describe(rows[0], spec.shown),
        "neighbours": [
            {
                "rank": r["rank"],
                "neighbour_id": r.neighbour_id,
                "score": round(float(r.score), 4),
                "distance_km": None if r.distance_km is None else round(r.distance_km, 1),
                "listing": describe(r, spec.shown, "n_"),
            }
            for r in rows
        ],
    }


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    found = run(build_session("listing-similarity-similar", ui=False), args)
    print(f"{found['listing_id']} (run {found['run_date']}, model {found['model_version']})")
    print(f"  {found['listing']}")
    for n in found["neighbours"]:
        km = "" if n["distance_km"] is None else f"{n['distance_km']:7.1f} km"
        print(
            f"{n['rank']:3d}. {n['neighbour_id']:<14} score {n['score']:.3f} {km}  {n['listing']}"
        )
    print(json.dumps(found, default=str))


if __name__ == "__main__":
    main()
