"""Stage 4: every active listing's top-k similar listings, blended from its model neighbours
(IVF or exact search, recall measured on a sample), content neighbours and co-interaction
partners with weights chosen on the validation split; quality gate, then one Delta commit
replacing the run_date partition; old runs retired."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from pyspark import StorageLevel
from pyspark.sql import SparkSession
from pyspark.sql.types import StringType

from lib import ann, delta_io, neighbours, quality_gate, similarity
from lib.session import build_session
from schemas import listing_embeddings, listing_neighbours, listings


@dataclass(frozen=True)
class NeighbourArgs:
    embeddings: str
    table: str
    run_date: dt.date
    shards: str | None = None
    method: str = "ivf"
    k: int = 20
    candidates: int = 50
    validation_queries: int = 4000
    nlist: int | None = None
    nprobe: int = 16
    num_blocks: int | None = None
    recall_sample: int = 2000
    min_recall: float = 0.90
    max_coverage_drop: float = 0.05
    retain_runs: int = 30
    vacuum_hours: float = 168.0
    partition_key: str | None = None
    listings: str | None = None
    device: str = "cpu"
    run_id: str | None = None


def parse_args(argv: Sequence[str] | None = None) -> NeighbourArgs:
    d = NeighbourArgs("", "", dt.date.min)
    p = argparse.ArgumentParser(description=__doc__)
    add = p.add_argument
    add("--embeddings", required=True, help="listing_embeddings Delta table path")
    add("--table", required=True, help="listing_neighbours Delta table path")
    add("--run-date", required=True, type=dt.date.fromisoformat)
    add(
        "--shards",
        help="the run's shards: blend the model's neighbours with co-interaction "
        "and content ones, chosen on their validation split (without: the model's alone)",
    )
    add("--method", choices=ann.METHODS, default=d.method, help="exact: blockwise brute force")
    add("--k", type=int, default=d.k)
    add("--candidates", type=int, default=d.candidates, help="per component, blended into k")
    add(
        "--validation-queries",
        type=int,
        default=d.validation_queries,
        help="validation query listings sampled to choose the blend",
    )
    add("--nlist", type=int, help="IVF lists (default: about sqrt(listings))")
    add("--nprobe", type=int, default=d.nprobe, help="IVF lists searched per listing")
    add("--num-blocks", type=int, help="exact: blocks (default: listings / 4000)")
    add("--recall-sample", type=int, default=d.recall_sample, help="queries checked vs exact")
    add("--min-recall", type=float, default=d.min_recall, help="gate: lowest recall@k")
    add(
        "--max-coverage-drop",
        type=float,
        default=d.max_coverage_drop,
        help="gate: largest fall in the share of listings with k neighbours vs the last run",
    )
    add("--retain-runs", type=int, default=d.retain_runs, help="run dates kept (0: all)")
    add("--vacuum-hours", type=float, default=d.vacuum_hours, help="vacuum retention window")
    add("--partition-key", help="listings column: neighbours share its value (needs --listings)")
    add("--listings", help="listings snapshot (Delta or Parquet)")
    add("--device", default=d.device, help="scoring device inside tasks: cpu, cuda or auto")
    add("--run-id")
    args = NeighbourArgs(**vars(p.parse_args(argv)))
    if args.partition_key and not args.listings:
        p.error("--partition-key needs --listings")
    return args


def run(spark: SparkSession, args: NeighbourArgs) -> dict:
    started = time.perf_counter()
    day = {"run_date": args.run_date.isoformat()}
    embeddings = delta_io.read_table(spark, args.embeddings, listing_embeddings.SPEC, partition=day)
    snapshot = None
    if args.partition_key:
        contract = listings.spec_with({args.partition_key: StringType()})
        snapshot = delta_io.read_input(spark, args.listings, contract)
        embeddings = ann.with_partition_key(embeddings, snapshot, args.partition_key)
    embeddings = embeddings.persist()
    n = embeddings.count()
    if n <= args.k:
        raise ValueError(
            f"table '{listing_embeddings.SPEC.name}': {n} listings for {args.run_date}, "
            f"need more than k={args.k} to publish neighbours"
        )
    model_version = embeddings.select("model_version").first()[0]
    # Without shards there is nothing to blend: the model's own neighbours are published.
    width = max(args.candidates, args.k) if args.shards else args.k
    params = ann.IvfParams(k=width, nlist=args.nlist, nprobe=args.nprobe, device=args.device)
    found = ann.search(
        embeddings,
        method=args.method,
        params=params,
        num_listings=n,
        partition_col=args.partition_key,
        num_blocks=args.num_blocks,
    )
    model_lists = found.top_k.persist(StorageLevel.MEMORY_AND_DISK)
    blended = None
    try:
        if args.shards:
            blended = similarity.blend_for_run(
                spark,
                args.shards,
                embeddings,
                model_lists,
                params=params,
                method=args.method,
                num_listings=n,
                k=args.k,
                validation_queries=args.validation_queries,
                partition_key=args.partition_key,
                snapshot=snapshot,
            )
        published_lists = blended.lists if blended else model_lists
        quality = ann.coverage(published_lists, k=args.k, num_listings=n) | ann.measure_recall(
            embeddings,
            model_lists,
            k=width,
            sample_size=args.recall_sample,
            partition_col=args.partition_key,
            device=args.device,
        )
        validation = similarity.summary(blended.choice) if blended else None
        published = quality_gate.publish(
            neighbours.to_neighbours_table(
                published_lists, model_version=model_version, run_date=args.run_date
            ),
            args.table,
            listing_neighbours.SPEC,
            metrics=quality,
            config=quality_gate.GateConfig(args.min_recall, args.max_coverage_drop),
            replace_partition=day,
            sort_within_files_by=("listing_id", "rank"),
            keep_last=args.retain_runs,
            vacuum_hours=args.vacuum_hours,
            commit_metadata={
                "run_id": args.run_id,
                "model_version": model_version,
                "method": f"blend+{found.method}" if blended else found.method,
                "k": args.k,
                "listings": n,
                **found.info,
                "blend": validation,
                "parameters": {k: str(v) for k, v in asdict(args).items()},
            },
        )
    finally:
        for cached in (model_lists, embeddings):
            cached.unpersist()
        found.release()
        if blended:
            blended.release()
    return {
        "stage": "neighbours",
        "table": args.table,
        "model_version": model_version,
        "listings": n,
        "k": args.k,
        "method": found.method,
        "nlist": found.info.get("nlist"),
        "nprobe": found.info.get("nprobe"),
        **quality,
        **published,
        "validation": validation,
        "seconds": round(time.perf_counter() - started, 2),
    }


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    print(json.dumps(run(build_session("listing-similarity-neighbours"), args), default=str))


if __name__ == "__main__":
    main()
