"""Stage 3: embed every active listing (cold ones from features alone) -> listing_embeddings."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pyspark.sql import SparkSession

from lib import delta_io
from lib.inference import embed_listings
from lib.parquet_io import read_parquet
from lib.session import build_session
from schemas import listing_embeddings, training_examples


@dataclass(frozen=True)
class EmbeddingArgs:
    shards: str
    model: str
    table: str
    run_date: dt.date
    model_version: str | None = None
    run_id: str | None = None


def parse_args(argv: Sequence[str] | None = None) -> EmbeddingArgs:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shards", required=True, help="shards directory (for listing_features)")
    p.add_argument("--model", required=True, help="model artifact (model.pt)")
    p.add_argument("--table", required=True, help="listing_embeddings Delta table path")
    p.add_argument("--run-date", required=True, type=dt.date.fromisoformat)
    p.add_argument("--model-version", help="default: the artifact's directory name")
    p.add_argument("--run-id")
    a = p.parse_args(argv)
    return EmbeddingArgs(a.shards, a.model, a.table, a.run_date, a.model_version, a.run_id)


def run(spark: SparkSession, args: EmbeddingArgs) -> dict:
    started = time.perf_counter()
    model_version = args.model_version or Path(args.model).parent.name
    features = read_parquet(
        spark, f"{args.shards}/listing_features", training_examples.LISTING_FEATURES_SPEC
    )
    artifact = spark.sparkContext.broadcast(Path(args.model).read_bytes())
    embeddings = embed_listings(
        features, artifact, model_version=model_version, run_date=args.run_date
    )
    version = delta_io.write_table(
        embeddings,
        args.table,
        listing_embeddings.SPEC,
        mode="overwrite",
        replace_partition={"run_date": args.run_date.isoformat()},
        commit_metadata={"run_id": args.run_id, "model_version": model_version},
        sort_within_files_by=("listing_id",),
    )
    artifact.destroy()
    return {
        "stage": "embeddings",
        "table": args.table,
        "table_version": version,
        "model_version": model_version,
        "seconds": round(time.perf_counter() - started, 2),
    }


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    print(json.dumps(run(build_session("listing-similarity-embeddings"), args), default=str))


if __name__ == "__main__":
    main()
