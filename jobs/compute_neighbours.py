"""Stage 4: top-k cosine neighbours of every active listing -> listing_neighbours (one commit)."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass

from pyspark.sql import SparkSession

from lib import delta_io, neighbours
from lib.session import build_session
from schemas import listing_embeddings, listing_neighbours


@dataclass(frozen=True)
class NeighbourArgs:
    embeddings: str
    table: str
    run_date: dt.date
    k: int = 20
    num_blocks: int | None = None
    run_id: str | None = None


def parse_args(argv: Sequence[str] | None = None) -> NeighbourArgs:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--embeddings", required=True, help="listing_embeddings Delta table path")
    p.add_argument("--table", required=True, help="listing_neighbours Delta table path")
    p.add_argument("--run-date", required=True, type=dt.date.fromisoformat)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--num-blocks", type=int, help="default: catalogue size / 4000")
    p.add_argument("--run-id")
    a = p.parse_args(argv)
    return NeighbourArgs(a.embeddings, a.table, a.run_date, a.k, a.num_blocks, a.run_id)


def run(spark: SparkSession, args: NeighbourArgs) -> dict:
    started = time.perf_counter()
    embeddings = delta_io.read_table(
        spark,
        args.embeddings,
        listing_embeddings.SPEC,
        partition={"run_date": args.run_date.isoformat()},
    ).persist()
    num_listings = embeddings.count()
    if num_listings <= args.k:
        raise ValueError(
            f"table '{listing_embeddings.SPEC.name}': {num_listings} listings for "
            f"{args.run_date}, need more than k={args.k} to publish neighbours"
        )
    model_version = embeddings.select("model_version").first()[0]
    num_blocks = args.num_blocks or neighbours.default_num_blocks(num_listings)
    top_k = neighbours.exact_top_k(embeddings, k=args.k, num_blocks=num_blocks)
    table = neighbours.to_neighbours_table(
        top_k, model_version=model_version, run_date=args.run_date
    )
    version = delta_io.write_table(
        table,
        args.table,
        listing_neighbours.SPEC,
        mode="overwrite",
        replace_partition={"run_date": args.run_date.isoformat()},
        commit_metadata={
            "run_id": args.run_id,
            "model_version": model_version,
            "method": "exact",
            "k": args.k,
            "num_blocks": num_blocks,
        },
        sort_within_files_by=("listing_id", "rank"),
    )
    embeddings.unpersist()
    return {
        "stage": "neighbours",
        "table": args.table,
        "table_version": version,
        "listings": num_listings,
        "k": args.k,
        "method": "exact",
        "seconds": round(time.perf_counter() - started, 2),
    }


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    print(json.dumps(run(build_session("listing-similarity-neighbours"), args), default=str))


if __name__ == "__main__":
    main()
