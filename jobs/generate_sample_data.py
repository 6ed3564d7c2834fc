"""Generate the synthetic used-car marketplace (listings, interactions, ground truth) as Parquet."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass

from pyspark.sql import SparkSession

from lib.sample_data import MarketplaceSize, generate_marketplace, write_marketplace


@dataclass(frozen=True)
class GenerateArgs:
    out: str
    listings: int = 20_000
    users: int = 50_000
    events: int = 2_000_000
    days: int = 60
    end_date: dt.date | None = None  # exclusive; None: today (UTC)
    seed: int = 7
    cold_share: float = 0.05


def parse_args(argv: Sequence[str] | None = None) -> GenerateArgs:
    d = GenerateArgs(out="")
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True, help="directory for listings/, interactions/, truth/")
    p.add_argument("--listings", type=int, default=d.listings)
    p.add_argument("--users", type=int, default=d.users)
    p.add_argument("--events", type=int, default=d.events, help="approximate event count")
    p.add_argument("--days", type=int, default=d.days)
    p.add_argument("--end-date", type=dt.date.fromisoformat, help="exclusive; default today UTC")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--cold-share",
        type=float,
        default=d.cold_share,
        help="share of active listings that are new: online (and viewed) in the last 4 days only",
    )
    a = p.parse_args(argv)
    return GenerateArgs(
        a.out, a.listings, a.users, a.events, a.days, a.end_date, a.seed, a.cold_share
    )


def run(spark: SparkSession | None, args: GenerateArgs) -> dict:
    """Generate and write the marketplace; needs no Spark (``spark`` is ignored)."""
    end_date = args.end_date or dt.datetime.now(dt.UTC).date()
    size = MarketplaceSize(args.listings, args.users, args.events, args.days)
    t0 = time.perf_counter()
    market = generate_marketplace(size, end_date, seed=args.seed, cold_share=args.cold_share)
    t1 = time.perf_counter()
    paths = write_marketplace(market, args.out)
    t2 = time.perf_counter()
    return {
        "stage": "sample_data",
        "end_date": end_date.isoformat(),
        "seed": args.seed,
        **market.stats,
        "generate_s": round(t1 - t0, 2),
        "write_s": round(t2 - t1, 2),
        "paths": paths,
    }


def main(argv: Sequence[str] | None = None) -> None:
    print(json.dumps(run(None, parse_args(argv))))


if __name__ == "__main__":
    main()
