"""Stage 5: the published neighbours and every baseline (tuned on validation) scored on the
holdout -> metrics.json, report."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pyspark.sql import SparkSession

from lib import (
    baselines,
    delta_io,
    evaluation,
    feature_spec,
    report,
    scorecard,
    similarity,
    sufficiency,
)
from lib.parquet_io import read_parquet, write_json, write_parquet
from lib.session import build_session
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
    baselines: tuple[str, ...] = scorecard.METHODS
    coverage_sample: int = 2000
    seed: int = 7
    run_id: str | None = None
    stage_seconds: dict[str, float] | None = None
    report: bool = True
    min_pairs: int = sufficiency.MIN_PAIRS


def parse_args(argv: Sequence[str] | None = None) -> EvaluateArgs:
    p = argparse.ArgumentParser(description=__doc__)
    for flag in ("shards", "listings", "embeddings", "neighbours", "model", "out"):
        p.add_argument(f"--{flag}", required=True, help="see jobs/pipeline.py stage_argv")
    p.add_argument("--run-date", required=True, type=dt.date.fromisoformat)
    p.add_argument("--k", type=int, default=20, help="list length of the baselines")
    p.add_argument(
        "--baselines",
        type=lambda s: tuple(s.split(",")),
        default=scorecard.METHODS,
        help=f"comma-separated, of {','.join(scorecard.METHODS)}",
    )
    p.add_argument(
        "--coverage-sample",
        type=int,
        default=2000,
        help="listings sampled beside the held-out queries for coverage",
    )
    p.add_argument("--seed", type=int, default=7)
    p.add_argument(
        "--min-pairs",
        type=int,
        default=sufficiency.MIN_PAIRS,
        help="fewer held-out pairs of the model: the evaluation is marked insufficient",
    )
    p.add_argument("--run-id")
    p.add_argument("--stage-seconds", type=json.loads, help='{"stage": seconds} for the report')
    p.add_argument("--report", action=argparse.BooleanOptionalAction, default=True)
    return EvaluateArgs(**vars(p.parse_args(argv)))


def run(spark: SparkSession, args: EvaluateArgs) -> dict:
    started, shards, out = time.perf_counter(), Path(args.shards), Path(args.out)
    inputs = similarity.ShardInputs.read(spark, args.shards)
    features = inputs.listing_features
    snapshot = delta_io.read_input(
        spark, args.listings, feature_spec.listings_table_spec(inputs.spec)
    )
    choice = similarity.read_validation(args.shards)
    if choice is None:
        raise FileNotFoundError(
            f"no {similarity.VALIDATION_FILE} beside {shards}: the "
            "neighbours stage chooses the blend and runs before evaluate"
        )
    holdout = read_parquet(spark, shards / "holdout", te.HOLDOUT_SPEC)
    work = shards.parent / "evaluation"
    pairs = evaluation.label_pairs(
        evaluation.holdout_pairs(holdout), features, history=inputs.full_examples
    )
    write_parquet(pairs, work / "holdout_pairs", te.PAIRS_SPEC)
    pairs = read_parquet(spark, work / "holdout_pairs", te.PAIRS_SPEC)
    validation_pairs = evaluation.label_pairs(
        evaluation.holdout_pairs(inputs.validation_events), features
    )
    queries = scorecard.evaluation_queries(
        pairs, features, sample=args.coverage_sample, seed=args.seed
    ).persist()
    current, previous, before = evaluation.published_lists(spark, args.neighbours, args.run_date)
    lists, tuned = scorecard.build_lists(
        inputs,
        choice,
        current,
        queries=queries,
        validation_pairs=validation_pairs,
        components=similarity.components_path(args.shards),
        k=args.k,
        seed=args.seed,
        methods=args.baselines,
    )
    _progress(f"ALS and EASE tuned on validation in {time.perf_counter() - started:.1f}s")
    stored = {}
    for name, df in lists.items():
        mark = time.perf_counter()
        write_parquet(df, work / name, baselines.RANKED_SPEC)
        stored[name] = read_parquet(spark, work / name, baselines.RANKED_SPEC)
        _progress(f"{name} lists in {time.perf_counter() - mark:.1f}s")
    mark = time.perf_counter()
    metrics = evaluation.collect_metrics(
        evaluation.evaluate_lists(
            stored,
            pairs=pairs,
            listing_features=features,
            popularity=baselines.listing_popularity(inputs.full_examples, features),
            snapshot=snapshot,
            spec=inputs.spec,
            previous=previous,
            queries=queries,
        )
    )
    queries.unpersist()
    _progress(f"metrics in {time.perf_counter() - mark:.1f}s")
    validation = {"blend": choice, **tuned}
    # Metrics over a handful of pairs are coin tosses: say so wherever they are read.
    verdict = sufficiency.assess(sufficiency.model_pairs(metrics), args.min_pairs)
    if verdict["status"] == sufficiency.INSUFFICIENT:
        _progress(f"WARNING evaluation insufficient: {verdict['reason']}")
    out.mkdir(parents=True, exist_ok=True)
    write_json(
        out / "metrics.json",
        {
            "run_date": args.run_date,
            "run_id": args.run_id,
            "previous_run_date": before,
            "metrics": metrics,
            "validation": validation,
            "evaluation": verdict,
        },
    )
    page = report_error = None
    if args.report:
        # The tables are published by now: a page that cannot be drawn is a warning, not a
        # failed run.
        try:
            page = report.report_for_run(
                spark,
                embeddings_table=args.embeddings,
                neighbours_table=args.neighbours,
                model_dir=args.model,
                run_date=args.run_date,
                snapshot=snapshot,
                spec=inputs.spec,
                encoding=inputs.encoding,
                listing_features=features,
                metrics=metrics,
                out_path=str(out / "report.html"),
                run_id=args.run_id,
                stage_seconds=args.stage_seconds,
                validation=validation,
                notes=(
                    [f"Evaluation insufficient: {verdict['reason']}"]
                    if verdict["status"] == sufficiency.INSUFFICIENT
                    else []
                ),
            )
        except Exception as error:
            report_error = f"{type(error).__name__}: {error}"
            _progress(f"WARNING report not written: {report_error}")
    return {
        "stage": "evaluate",
        "report": page or None,
        "report_error": report_error,
        "evaluation": verdict,
        "headline": evaluation.headline(metrics),
        "metrics": {**evaluation.flatten(metrics), **scorecard.flatten_validation(validation)},
        "validation": scorecard.validation_summary(validation),
        "seconds": round(time.perf_counter() - started, 2),
    }


def _progress(message: str) -> None:
    # stderr: stdout carries the stage's JSON result.
    print(f"[evaluate] {message}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    print(json.dumps(run(build_session("listing-similarity-evaluate"), args), default=str))


if __name__ == "__main__":
    main()
