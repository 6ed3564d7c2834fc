"""Stage 5: the run's neighbours and five baselines scored on the holdout -> metrics.json, report."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pyspark.sql import SparkSession

from lib import baselines, delta_io, evaluation, report
from lib.parquet_io import read_json, read_parquet, write_json
from lib.session import build_session
from schemas import listings
from schemas import training_examples as te


@dataclass(frozen=True)
class EvaluateArgs:
    shards: str
    listings: str
    embeddings: str
    neighbours: str
    model: str
    run_date: dt.date
    out: str
    k: int = 20
    baselines: tuple[str, ...] = baselines.BASELINES
    seed: int = 7
    run_id: str | None = None
    stage_seconds: dict[str, float] | None = None
    report: bool = True


def parse_args(argv: Sequence[str] | None = None) -> EvaluateArgs:
    p = argparse.ArgumentParser(description=__doc__)
    for flag in ("shards", "listings", "embeddings", "neighbours", "model", "out"):
        p.add_argument(f"--{flag}", required=True, help="see jobs/pipeline.py stage_argv")
    p.add_argument("--run-date", required=True, type=dt.date.fromisoformat)
    p.add_argument("--k", type=int, default=20, help="list length of the baselines")
    p.add_argument("--baselines", type=lambda s: tuple(s.split(",")), default=baselines.BASELINES)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--run-id")
    p.add_argument("--stage-seconds", type=json.loads, help='{"stage": seconds} for the report')
    p.add_argument("--report", action=argparse.BooleanOptionalAction, default=True)
    return EvaluateArgs(**vars(p.parse_args(argv)))


def run(spark: SparkSession, args: EvaluateArgs) -> dict:
    started, shards, out = time.perf_counter(), Path(args.shards), Path(args.out)
    features = read_parquet(spark, shards / "listing_features", te.LISTING_FEATURES_SPEC)
    examples = read_parquet(spark, shards / "train", te.SPEC)
    snapshot = delta_io.read_input(spark, args.listings, listings.SPEC)
    current, previous, before = evaluation.published_lists(spark, args.neighbours, args.run_date)
    lists = baselines.write_baselines(
        spark, examples, features, read_json(shards / "manifest.json")["cardinalities"],
        shards.parent / "evaluation", k=args.k, seed=args.seed, methods=args.baselines,
    )  # fmt: skip
    lists["model"] = current
    metrics = evaluation.collect_metrics(evaluation.evaluate_lists(
        lists, holdout=read_parquet(spark, shards / "holdout", te.HOLDOUT_SPEC),
        listing_features=features, popularity=baselines.listing_popularity(examples, features),
        snapshot=snapshot, previous=previous))  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "metrics.json", {"run_date": args.run_date, "run_id": args.run_id,
                                      "previous_run_date": before, "metrics": metrics})  # fmt: skip
    page = args.report and report.report_for_run(
        spark, embeddings_table=args.embeddings, neighbours_table=args.neighbours,
        model_dir=args.model, run_date=args.run_date, snapshot=snapshot,
        listing_features=features, metrics=metrics, out_path=str(out / "report.html"),
        run_id=args.run_id, stage_seconds=args.stage_seconds,
    )  # fmt: skip
    return {
        "stage": "evaluate",
        "report": page or None,
        "headline": evaluation.headline(metrics),
        "metrics": evaluation.flatten(metrics),
        "seconds": round(time.perf_counter() - started, 2),
    }


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    print(json.dumps(run(build_session("listing-similarity-evaluate"), args), default=str))


if __name__ == "__main__":
    main()
