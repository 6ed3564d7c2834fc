"""All stages for one run date: shards -> train -> embeddings -> neighbours -> evaluate, plus a
`runs` row.

Each stage is called exactly as spark-submit would call it (its own argument parser), so the
pipeline and the Airflow DAG run the same code with the same flags.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import sys
import time
import traceback
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from pyspark.sql import SparkSession

from jobs import (
    build_training_shards,
    compute_embeddings,
    compute_neighbours,
    evaluate,
    train_embeddings,
)
from lib import delta_io, feature_spec, sufficiency
from lib.feature_spec import FeatureSpec
from lib.paths import Layout
from lib.quality_gate import QualityGateError
from lib.runs import RunRecord, neighbour_quality, run_row
from lib.session import build_session
from schemas import runs

STAGES = {
    "shards": build_training_shards,
    "train": train_embeddings,
    "embeddings": compute_embeddings,
    "neighbours": compute_neighbours,
    "evaluate": evaluate,
}


@dataclass(frozen=True)
class PipelineArgs:
    root: str
    run_date: dt.date
    k: int = 20
    epochs: int = 4
    num_processes: int = 2
    batch_size: int = 1024
    dim: int = 32
    seed: int = 7
    # The shard stage's time window (its own defaults); an imported history (Inside Airbnb)
    # needs years of lookback and a holdout of months: `import-insideairbnb` prints both.
    lookback_days: int = 90
    holdout_days: int = 2
    half_life_days: float = 21.0
    # The days before the holdout that the blend and the baselines are chosen on (0: as many
    # as holdout_days).
    validation_days: int = 0
    # More shard flags, defaults taken from the stage so the two cannot drift apart. The bot
    # ceiling is the one real data needs most: on a ratings data set people rate hundreds of
    # items in one sitting, and the default dropped 13-29 % of two such sets' events.
    max_events_per_user_day: int = build_training_shards.ShardParams.max_events_per_user_day
    event_weights: str = ",".join(
        f"{name}={weight:g}" for name, weight in build_training_shards.ShardParams.event_weights
    )
    num_files: int = build_training_shards.ShardParams.num_files
    # The neighbour search and its recall gate (the neighbours stage's defaults).
    nprobe: int = compute_neighbours.NeighbourArgs.nprobe
    candidates: int = compute_neighbours.NeighbourArgs.candidates
    min_recall: float = compute_neighbours.NeighbourArgs.min_recall
    # Fewer held-out pairs of the model than this and the run is recorded insufficient.
    min_pairs: int = sufficiency.MIN_PAIRS
    # Small data sets train more epochs than --epochs (at least this many steps per rank).
    min_steps: int = train_embeddings.TrainArgs.min_steps
    # The listings' features: a spec file (default: inputs/feature_spec.json when there is one)
    # or the per-kind flags, which the run writes down as a spec for the shard stage.
    feature_spec: str | None = None
    features: FeatureSpec | None = None
    # Any other flag of a stage, as (stage, its flags): `--train-args "--lr 0.02"`. Checked
    # against the stage's own parser before anything runs.
    stage_args: tuple[tuple[str, tuple[str, ...]], ...] = ()


def parse_args(argv: Sequence[str] | None = None) -> PipelineArgs:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--root", required=True, help="deployment root: inputs/, work/, tables/ ...")
    p.add_argument("--run-date", required=True, type=dt.date.fromisoformat)
    for flag, default in (
        ("k", 20),
        ("epochs", 4),
        ("num-processes", 2),
        ("batch-size", 1024),
        ("dim", 32),
        ("seed", 7),
        ("lookback-days", 90),
        ("holdout-days", 2),
        ("validation-days", 0),
    ):
        p.add_argument(f"--{flag}", type=int, default=default)
    p.add_argument("--half-life-days", type=float, default=21.0)
    d = PipelineArgs
    p.add_argument(
        "--max-events-per-user-day",
        type=int,
        default=d.max_events_per_user_day,
        help="bot ceiling: users above it on any day are dropped (raise it for ratings data)",
    )
    p.add_argument(
        "--event-weights", type=_event_weights, default=d.event_weights, help="type=weight,..."
    )
    p.add_argument("--num-files", type=int, default=d.num_files, help="training shard files")
    p.add_argument("--nprobe", type=int, default=d.nprobe, help="IVF lists searched per listing")
    p.add_argument(
        "--candidates", type=int, default=d.candidates, help="per component, blended into k"
    )
    p.add_argument(
        "--min-recall", type=float, default=d.min_recall, help="neighbours gate: recall@k"
    )
    p.add_argument(
        "--min-steps", type=int, default=d.min_steps, help="training: at least this many steps"
    )
    p.add_argument(
        "--min-pairs",
        type=int,
        default=d.min_pairs,
        help="fewer held-out pairs of the model: the run is recorded insufficient",
    )
    feature_spec.add_arguments(p)
    more = p.add_argument_group("any other flag of a stage (see `listing-similarity STAGE --help`)")
    for stage in STAGES:
        more.add_argument(
            f"--{stage}-args",
            default="",
            metavar='"--flag value ..."',
            help=f"more flags for the {stage} stage (one flag alone: --{stage}-args=--flag)",
        )
    a = p.parse_args(argv)
    try:
        declared = feature_spec.from_arguments(a)
    except ValueError as error:
        p.error(str(error))
    stage_args = tuple(
        (stage, tuple(shlex.split(getattr(a, f"{stage}_args"))))
        for stage in STAGES
        if getattr(a, f"{stage}_args").strip()
    )
    names = {f.name for f in fields(PipelineArgs)} - {"features", "stage_args"}
    flagged = not a.feature_spec and declared != feature_spec.NO_FEATURES
    args = PipelineArgs(
        **{k: v for k, v in vars(a).items() if k in names},
        features=declared if flagged else None,
        stage_args=stage_args,
    )
    try:
        check_stage_args(args)
    except ValueError as error:
        p.error(str(error))
    return args


def check_stage_args(args: PipelineArgs) -> None:
    """Each stage's extra flags parse with its own parser and leave what the run sets alone."""
    if not args.stage_args:
        return  # nothing to check: no stage command line (nor the spec it may write) is built
    base = stage_argv(replace(args, stage_args=()), Layout(args.root), "run-id", "version")
    for stage, extra in args.stage_args:
        owned = {token.split("=")[0] for token in base[stage] if token.startswith("--")}
        clash = sorted(owned & {token.split("=")[0] for token in extra if token.startswith("--")})
        if clash:
            raise ValueError(
                f"--{stage}-args: {', '.join(clash)} is set by the run itself; "
                "use run's own flag (listing-similarity run --help)"
            )
        try:
            STAGES[stage].parse_args([*base[stage], *extra])
        except SystemExit:
            raise ValueError(f"--{stage}-args {shlex.join(extra)!r}: see the error above") from None


def spec_path(args: PipelineArgs, layout: Layout) -> str | None:
    """The spec file the shard stage reads: given, written from the flags, or the inputs'."""
    if args.feature_spec:
        return args.feature_spec
    if args.features is not None:
        path = Path(layout.shards(args.run_date)).parent / "feature_spec.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        feature_spec.write(args.features, path)
        return str(path)
    return layout.feature_spec if Path(layout.feature_spec).exists() else None


def _event_weights(text: str) -> str:
    """``view=1,save=3`` checked here, so a typo fails before any stage runs."""
    try:
        pairs = [kv.split("=") for kv in text.split(",")]
        return ",".join(f"{k.strip()}={float(v):g}" for k, v in pairs)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected type=weight,..., got {text!r}") from None


def stage_argv(args: PipelineArgs, layout: Layout, run_id: str, model_version: str) -> dict:
    """Each stage's command line for this run (also what deploy/ submits)."""
    day = args.run_date.isoformat()
    shards, model_dir = layout.shards(args.run_date), layout.model_dir(model_version)
    previous = layout.previous_shards(args.run_date)
    spec = spec_path(args, layout)
    argvs = {
        "shards": [
            "--interactions",
            layout.interactions,
            "--listings",
            layout.listings,
            "--out",
            shards,
            "--run-date",
            day,
            "--seed",
            str(args.seed),
            "--lookback-days",
            str(args.lookback_days),
            "--holdout-days",
            str(args.holdout_days),
            *(["--validation-days", str(args.validation_days)] if args.validation_days else []),
            "--half-life-days",
            str(args.half_life_days),
            "--max-events-per-user-day",
            str(args.max_events_per_user_day),
            "--event-weights",
            args.event_weights,
            "--num-files",
            str(args.num_files),
            *(["--previous-shards", previous] if previous else []),
            *(["--feature-spec", spec] if spec else []),
        ],
        "train": [
            "--shards",
            shards,
            "--out",
            model_dir,
            "--epochs",
            str(args.epochs),
            "--min-steps",
            str(args.min_steps),
            "--num-processes",
            str(args.num_processes),
            "--batch-size",
            str(args.batch_size),
            "--dim",
            str(args.dim),
            "--seed",
            str(args.seed),
        ],
        "embeddings": [
            "--shards",
            shards,
            "--model",
            f"{model_dir}/model.pt",
            "--table",
            layout.table("listing_embeddings"),
            "--run-date",
            day,
            "--model-version",
            model_version,
            "--run-id",
            run_id,
        ],
        "neighbours": [
            "--embeddings",
            layout.table("listing_embeddings"),
            "--shards",
            shards,
            "--table",
            layout.table("listing_neighbours"),
            "--run-date",
            day,
            "--k",
            str(args.k),
            "--candidates",
            str(args.candidates),
            "--nprobe",
            str(args.nprobe),
            "--min-recall",
            str(args.min_recall),
            "--run-id",
            run_id,
        ],
        "evaluate": [
            "--shards",
            shards,
            "--listings",
            layout.listings,
            "--embeddings",
            layout.table("listing_embeddings"),
            "--neighbours",
            layout.table("listing_neighbours"),
            "--model",
            model_dir,
            "--run-date",
            day,
            "--out",
            str(Path(layout.report(args.run_date)).parent),
            "--k",
            str(args.k),
            "--seed",
            str(args.seed),
            "--run-id",
            run_id,
            "--min-pairs",
            str(args.min_pairs),
        ],
    }
    for stage, extra in args.stage_args:
        argvs[stage] = [*argvs[stage], *extra]
    return argvs


def run(spark: SparkSession, args: PipelineArgs) -> dict:
    layout = Layout(args.root)
    run_id = uuid.uuid4().hex
    model_version = f"{args.run_date:%Y%m%d}-{run_id[:8]}"
    record = RunRecord(
        run_id=run_id,
        run_date=args.run_date,
        started_at=dt.datetime.now(dt.UTC).replace(tzinfo=None),
        model_version=model_version,
        parameters={k: str(v) for k, v in asdict(args).items()},
    )
    results: dict[str, dict] = {}
    refused_search: dict = {}
    evaluation: dict = {}
    try:
        for name, argv in stage_argv(args, layout, run_id, model_version).items():
            started = time.perf_counter()
            print(f"[pipeline] stage {name} started", flush=True)
            module = STAGES[name]
            if name == "evaluate":  # the report shows the timings of the stages before it
                argv = [*argv, "--stage-seconds", json.dumps(record.stage_seconds)]
            results[name] = module.run(spark, module.parse_args(argv))
            record.stage_seconds[name] = round(time.perf_counter() - started, 2)
            print(f"[pipeline] stage {name} done in {record.stage_seconds[name]:.1f}s", flush=True)
        # A handful of held-out pairs "succeeds" with coin-toss metrics: say so in the runs row
        # (consumers read only succeeded days) instead of recording it good.
        evaluation = sufficiency.assess(
            sufficiency.model_pairs(results["evaluate"].get("metrics", {})), args.min_pairs
        )
        if evaluation["status"] == sufficiency.INSUFFICIENT:
            print(
                f"[pipeline] WARNING evaluation insufficient: {evaluation['reason']}",
                file=sys.stderr,
                flush=True,
            )
            record.status, record.error = sufficiency.INSUFFICIENT, evaluation["reason"]
        else:
            record.status = "succeeded"
    except Exception as error:
        if isinstance(error, QualityGateError):
            refused_search = error.metrics
        record.status = "failed"
        record.error = "".join(traceback.format_exception_only(error)).strip()
        raise
    finally:
        manifest_counts = results.get("shards", {}).get("counts", {})
        record.counts = {k: v for k, v in manifest_counts.items() if isinstance(v, int)}
        if "neighbours" in results:
            record.counts["neighbour_listings"] = results["neighbours"]["listings"]
        record.metrics = {
            k: v for k, v in results.get("train", {}).items() if isinstance(v, int | float)
        }
        # Recall and coverage also when the quality gate refused to publish: that is the day
        # someone will look for them.
        record.metrics.update(neighbour_quality(results.get("neighbours") or refused_search))
        # Held-out hit-rates etc. of the model and every baseline, as "<method>.<metric>".
        record.metrics.update(results.get("evaluate", {}).get("metrics", {}))
        # What validation chose (co-interaction variant, tuned baselines), as text.
        for name, chosen in (results.get("evaluate", {}).get("validation") or {}).items():
            record.parameters[f"validation.{name}"] = json.dumps(chosen, sort_keys=True)
        record.finished_at = dt.datetime.now(dt.UTC).replace(tzinfo=None)
        delta_io.write_table(run_row(spark, record), layout.table("runs"), runs.SPEC)
    return {
        "run_id": run_id,
        "run_date": args.run_date.isoformat(),
        "model_version": model_version,
        "status": record.status,
        "evaluation": evaluation,
        "counts": record.counts,
        "stage_seconds": record.stage_seconds,
        "report": results.get("evaluate", {}).get("report"),
        "stages": results,
    }


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    print(json.dumps(run(build_session("listing-similarity-pipeline"), args), default=str))


if __name__ == "__main__":
    main()
