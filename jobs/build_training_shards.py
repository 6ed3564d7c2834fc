"""Stage 1: interaction logs + listing snapshot -> training shards, vocabularies, holdout."""

from __future__ import annotations

import argparse
import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import dataclass

from pyspark.sql import SparkSession

from lib import delta_io, feature_spec, validation
from lib.feature_spec import NO_FEATURES, FeatureSpec
from lib.session import build_session
from lib.shard_writer import ShardParams, write_shards
from schemas import interactions


@dataclass(frozen=True)
class ShardArgs:
    interactions: str
    listings: str
    out: str
    params: ShardParams
    spec: FeatureSpec = NO_FEATURES
    previous_shards: str | None = None


def _weights(text: str) -> tuple[tuple[str, float], ...]:
    return tuple((k.strip(), float(v)) for k, v in (kv.split("=") for kv in text.split(",")))


def parse_args(argv: Sequence[str] | None = None) -> ShardArgs:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--interactions", required=True, help="interaction log (Parquet or Delta)")
    p.add_argument("--listings", required=True, help="listing snapshot (Parquet or Delta)")
    p.add_argument("--out", required=True, help="shards directory to (re)build")
    p.add_argument("--run-date", required=True, type=dt.date.fromisoformat)
    p.add_argument("--lookback-days", type=int, default=90)
    p.add_argument("--holdout-days", type=int, default=2)
    p.add_argument(
        "--validation-days",
        type=int,
        help="days before the holdout that choices are made on "
        "(default: as many as --holdout-days)",
    )
    p.add_argument("--event-weights", type=_weights, default=_weights("view=1,save=3,contact=5"))
    p.add_argument("--half-life-days", type=float, default=21.0)
    p.add_argument("--max-events-per-user-day", type=int, default=300, help="bot ceiling")
    p.add_argument("--num-files", type=int, default=8, help="a multiple of ranks x loader workers")
    p.add_argument("--previous-shards", help="last run's shards: keeps user/listing indices stable")
    p.add_argument("--seed", type=int, default=7)
    feature_spec.add_arguments(p)
    a = p.parse_args(argv)
    try:
        spec = feature_spec.from_arguments(a)
    except ValueError as error:
        p.error(str(error))
    params = ShardParams(
        run_date=a.run_date,
        lookback_days=a.lookback_days,
        holdout_days=a.holdout_days,
        validation_days=a.validation_days,
        event_weights=a.event_weights,
        half_life_days=a.half_life_days,
        max_events_per_user_day=a.max_events_per_user_day,
        num_files=a.num_files,
        seed=a.seed,
    )
    return ShardArgs(a.interactions, a.listings, a.out, params, spec, a.previous_shards)


def run(spark: SparkSession, args: ShardArgs) -> dict:
    events = delta_io.read_input(spark, args.interactions, interactions.SPEC)
    # Small next to the events, and read by the validation, the vocabulary and three encoding
    # passes: read the files once.
    contract = feature_spec.listings_table_spec(args.spec)
    snapshot = delta_io.read_input(spark, args.listings, contract).persist()
    try:
        with validation.input_errors():
            validation.require_unique_key(snapshot, contract)
            validation.require_not_null(snapshot, contract)
            manifest = write_shards(
                spark,
                events,
                snapshot,
                args.out,
                args.params,
                spec=args.spec,
                previous_shards=args.previous_shards,
                input_versions={
                    "interactions": delta_io.input_version(args.interactions),
                    "listings": delta_io.input_version(args.listings),
                },
            )
    finally:
        snapshot.unpersist()
    return {
        "stage": "shards",
        "out": args.out,
        "counts": manifest["counts"],
        "seconds": manifest["seconds"],
        "step_seconds": manifest["step_seconds"],
    }


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    print(json.dumps(run(build_session("listing-similarity-shards"), args), default=str))


if __name__ == "__main__":
    main()
