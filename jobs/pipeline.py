"""All stages for one run date: shards -> train -> embeddings -> neighbours -> evaluate, plus a
`runs` row.

Each stage is called exactly as spark-submit would call it (its own argument parser), so the
pipeline and the Airflow DAG run the same code with the same flags.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time
import traceback
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from pyspark.sql import SparkSession

from jobs import (
    build_training_shards,
    compute_embeddings,
    compute_neighbours,
    evaluate,
    train_embeddings,
)
from lib import delta_io
from lib.paths import Layout
from lib.quality_gate import QualityGateError
from lib.runs import RunRecord, neighbour_quality, run_row
from lib.session import build_session
from schemas import runs


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
    return PipelineArgs(**{k: v for k, v in vars(p.parse_args(argv)).items()})


def stage_argv(args: PipelineArgs, layout: Layout, run_id: str, model_version: str) -> dict:
    """Each stage's command line for this run (also what deploy/ submits)."""
    day = args.run_date.isoformat()
    shards, model_dir = layout.shards(args.run_date), layout.model_dir(model_version)
    previous = layout.previous_shards(args.run_date)
    return {
        "shards": ["--interactions", layout.interactions, "--listings", layout.listings,
                   "--out", shards, "--run-date", day, "--seed", str(args.seed),
                   "--lookback-days", str(args.lookback_days),
                   "--holdout-days", str(args.holdout_days),
                   *(["--validation-days", str(args.validation_days)]
                     if args.validation_days else []),
                   "--half-life-days", str(args.half_life_days),
                   *(["--previous-shards", previous] if previous else [])],
        "train": ["--shards", shards, "--out", model_dir, "--epochs", str(args.epochs),
                  "--num-processes", str(args.num_processes), "--batch-size", str(args.batch_size),
                  "--dim", str(args.dim), "--seed", str(args.seed)],
        "embeddings": ["--shards", shards, "--model", f"{model_dir}/model.pt",
                       "--table", layout.table("listing_embeddings"), "--run-date", day,
                       "--model-version", model_version, "--run-id", run_id],
        "neighbours": ["--embeddings", layout.table("listing_embeddings"), "--shards", shards,
                       "--table", layout.table("listing_neighbours"), "--run-date", day,
                       "--k", str(args.k), "--run-id", run_id],
        "evaluate": ["--shards", shards, "--listings", layout.listings,
                     "--embeddings", layout.table("listing_embeddings"),
                     "--neighbours", layout.table("listing_neighbours"), "--model", model_dir,
                     "--run-date", day, "--out", str(Path(layout.report(args.run_date)).parent),
                     "--k", str(args.k), "--seed", str(args.seed), "--run-id", run_id],
    }  # fmt: skip


STAGES = {
    "shards": build_training_shards,
    "train": train_embeddings,
    "embeddings": compute_embeddings,
    "neighbours": compute_neighbours,
    "evaluate": evaluate,
}


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
        record.finished_at = dt.datetime.now(dt.UTC).replace(tzinfo=None)
        delta_io.write_table(run_row(spark, record), layout.table("runs"), runs.SPEC)
    return {
        "run_id": run_id,
        "run_date": args.run_date.isoformat(),
        "model_version": model_version,
        "status": record.status,
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
