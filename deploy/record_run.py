"""The DAG's last task: write this run's row in the ``runs`` table from what its stages left.

``listing-similarity run`` writes the row itself; under Airflow each stage is its own Spark
application, so this entry point (submitted as ``deploy/submit.py … stage record``) collects the
run's facts from its outputs: the shard manifest (counts, input versions), the model's
metrics.json, the neighbours commit carrying this run id, the evaluation and the evaluation gate's
verdict. ``succeeded`` means the neighbours are committed *and* the gate passed: that row is
the signal that today's ``run_date`` partition is good to read. ``insufficient`` means all ran
but the evaluation scored too few held-out pairs to judge the day (the gate's reason is in
``error``); consumers stay on the last succeeded day. It runs also when an upstream
task failed (trigger rule all_done), records ``failed`` with the reason, and then exits 1 so the
DAG run fails too.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pyspark.sql import SparkSession

from lib import delta_io, sufficiency
from lib.evaluation import flatten
from lib.paths import Layout
from lib.runs import RunRecord, neighbour_quality, run_row
from lib.session import build_session
from schemas import runs

GATE_VERDICT = "evaluation_gate.json"


@dataclass(frozen=True)
class RecordArgs:
    root: str
    run_date: dt.date
    run_id: str
    model_version: str
    parameters: dict[str, str] = field(default_factory=dict)


def parse_args(argv: Sequence[str] | None = None) -> RecordArgs:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", required=True)
    p.add_argument("--run-date", required=True, type=dt.date.fromisoformat)
    p.add_argument("--run-id", required=True)
    p.add_argument("--model-version", required=True)
    p.add_argument("--parameters", type=json.loads, default={}, help="JSON object")
    a = p.parse_args(argv)
    return RecordArgs(a.root, a.run_date, a.run_id, a.model_version, a.parameters)


def _json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def collect(args: RecordArgs) -> RunRecord:
    """The run's ``RunRecord`` from the files and commits its stages left (no Spark)."""
    layout = Layout(args.root)
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    record = RunRecord(
        args.run_id,
        args.run_date,
        now,
        model_version=args.model_version,
        parameters={k: str(v) for k, v in args.parameters.items()},
    )
    problems = []
    shards = Path(layout.shards(args.run_date))
    manifest = _json(shards / "manifest.json")
    if manifest is None:
        problems.append("shards: no manifest.json")
    else:
        record.counts = {k: v for k, v in manifest["counts"].items() if isinstance(v, int)}
        record.input_versions = {k: str(v) for k, v in manifest["input_versions"].items()}
        record.stage_seconds["shards"] = float(manifest["seconds"])
        written = (shards / "manifest.json").stat().st_mtime
        record.started_at = dt.datetime.fromtimestamp(written, dt.UTC).replace(tzinfo=None)
    model = _json(Path(layout.model_dir(args.model_version)) / "metrics.json")
    if model is None:
        problems.append("train: no metrics.json")
    else:
        record.metrics = {k: v for k, v in model.items() if isinstance(v, int | float)}
        if model.get("loss_per_epoch"):
            record.metrics["final_loss"] = model["loss_per_epoch"][-1]
        record.stage_seconds["train"] = sum(e["seconds"] for e in model.get("epochs", []))
    committed = [
        h["metadata"]
        for h in _history(layout.table("listing_neighbours"))
        if h["metadata"].get("run_id") == args.run_id
    ]
    if not committed:
        problems.append("neighbours: no commit with this run id")
    else:
        record.metrics.update(neighbour_quality(committed[0]))
    reports = Path(layout.report(args.run_date)).parent
    evaluation = _json(reports / "metrics.json")
    if evaluation is not None:
        record.metrics.update(flatten(evaluation["metrics"]))
    verdict = _json(reports / GATE_VERDICT)
    insufficient = None
    if verdict is None:
        problems.append("evaluation gate: no verdict")
    elif verdict.get("status") == sufficiency.INSUFFICIENT:
        # Not a failure of the run, but not a good day either: its rules compared noise.
        insufficient = f"evaluation insufficient: {verdict['reason']}"
    elif not verdict["passed"]:
        problems.append("evaluation gate: " + "; ".join(verdict["failures"]))
    if problems:
        record.status = "failed"
    else:
        record.status = sufficiency.INSUFFICIENT if insufficient else "succeeded"
    record.error = " | ".join([*problems, *([insufficient] if insufficient else [])]) or None
    return record


def _history(path: str) -> list[dict]:
    return delta_io.history(path, limit=50) if delta_io.table_exists(path) else []


def run(spark: SparkSession, args: RecordArgs) -> dict:
    record = collect(args)
    version = delta_io.write_table(
        run_row(spark, record), Layout(args.root).table("runs"), runs.SPEC
    )
    return {
        "stage": "record",
        "run_id": args.run_id,
        "status": record.status,
        "error": record.error,
        "table_version": version,
    }


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    stats = run(build_session("listing-similarity-record-run"), args)
    print(json.dumps(stats, default=str))
    sys.exit(0 if stats["status"] == "succeeded" else 1)


if __name__ == "__main__":
    main()
