"""Model versus baselines end to end, on Inside Airbnb or on the generated marketplace.

    .venv/bin/python bench/eval_baselines.py insideairbnb [--data ../shared/data/insideairbnb]
        [--root /tmp/eval-insideairbnb] [--epochs 10] [--feature-set common]
    .venv/bin/python bench/eval_baselines.py demo [--root /tmp/eval-demo]
        [--listings 1500 --users 1500 --events 60000] [--hide-share 0.05]

``insideairbnb`` imports the two Albany scrapes (``listing-similarity import-insideairbnb``):
training history is every review before the 2024-11 scrape, the holdout is the reviews the
2025-09 scrape adds after it, and listings first seen in 2025 are cold start. ``demo``
generates the sample marketplace; since its cold listings never get events, it also hides the
history of a share of the listings that have holdout events (``--hide-share``), so cold
pairs exist to measure. Both then run every pipeline stage (the same entry points and flags as
``listing-similarity run``) and the evaluate stage, and write the report. The last line printed
is one JSON object: for each method ``hit_rate_at_10``, ``hit_rate_at_10_warm``,
``hit_rate_at_10_cold`` and ``mrr_at_10``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import shutil
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import pyarrow.dataset as ds  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from jobs import evaluate, generate_sample_data, import_insideairbnb, pipeline  # noqa: E402
from lib import delta_io, report  # noqa: E402
from lib.parquet_io import read_parquet  # noqa: E402
from lib.paths import Layout  # noqa: E402
from lib.session import build_session  # noqa: E402
from schemas import listings  # noqa: E402
from schemas import training_examples as te  # noqa: E402

AIRBNB_LABELS = {
    "make": "room type",
    "model": "host",
    "body_type": "property type",
    "price_eur": "price ($)",
    "city": "ward",
    "mileage_km": "minimum nights",
    "power_kw": "guests",
}
AIRBNB_NOTE = (
    "Data: Inside Airbnb (insideairbnb.com), Albany NY, CC BY 4.0. Interactions are reviews; "
    "training history ends at the 2024-11 scrape, held-out reviews come from the 2025-09 scrape."
)


def load() -> str:
    return f"{os.getloadavg()[0]:.2f}"


def run_stages(spark, root: str, run_date: dt.date, a: argparse.Namespace, *, shard_flags=(),
               labels=None, title="Listing similarity", notes=()) -> dict:  # fmt: skip
    """Every pipeline stage for ``run_date`` (timed), then evaluate and the report."""
    layout, run_id = Layout(root), uuid.uuid4().hex
    model_version = f"{run_date:%Y%m%d}-{run_id[:8]}"
    args = pipeline.PipelineArgs(root=root, run_date=run_date, k=a.k, epochs=a.epochs,
                                 batch_size=a.batch_size, dim=a.dim, seed=a.seed)  # fmt: skip
    argv = pipeline.stage_argv(args, layout, run_id, model_version)
    argv["shards"] = [*argv["shards"], *shard_flags, *shlex.split(a.shard_args)]
    argv["train"] = [*argv["train"], *shlex.split(a.train_args)]
    seconds: dict[str, float] = {}
    for name, stage_args in argv.items():
        if name == "evaluate":
            continue
        started = time.perf_counter()
        module = pipeline.STAGES[name]
        module.run(spark, module.parse_args(stage_args))
        seconds[name] = round(time.perf_counter() - started, 2)
        print(f"[eval] stage {name} done in {seconds[name]:.1f}s (load {load()})", flush=True)
    started = time.perf_counter()
    day = run_date.isoformat()
    eval_argv = argv.get("evaluate") or [
        "--shards", layout.shards(run_date), "--listings", layout.listings,
        "--embeddings", layout.table("listing_embeddings"),
        "--neighbours", layout.table("listing_neighbours"),
        "--model", layout.model_dir(model_version), "--run-date", day,
        "--out", str(Path(layout.report(run_date)).parent), "--run-id", run_id, "--k", str(a.k),
    ]  # fmt: skip
    result = evaluate.run(spark, evaluate.parse_args([*eval_argv, "--no-report"]))
    seconds["evaluate"] = round(time.perf_counter() - started, 2)
    page = report.report_for_run(
        spark,
        embeddings_table=layout.table("listing_embeddings"),
        neighbours_table=layout.table("listing_neighbours"),
        model_dir=layout.model_dir(model_version),
        run_date=run_date,
        snapshot=delta_io.read_input(spark, layout.listings, listings.SPEC),
        listing_features=read_parquet(
            spark, f"{layout.shards(run_date)}/listing_features", te.LISTING_FEATURES_SPEC
        ),
        metrics=json.loads((Path(layout.report(run_date)).parent / "metrics.json").read_text())[
            "metrics"
        ],
        out_path=layout.report(run_date),
        run_id=run_id,
        stage_seconds=seconds,
        title=title,
        labels=labels,
        notes=notes,
    )
    print(f"[eval] evaluate done in {seconds['evaluate']:.1f}s; report: {page}", flush=True)
    return {**result, "report": page, "stage_seconds": seconds, "model_version": model_version}


def insideairbnb(spark, a: argparse.Namespace) -> dict:
    data = Path(a.data)
    scrapes = sorted(p for p in data.iterdir() if p.is_dir()) if data.is_dir() else []
    if len(scrapes) < 2:
        raise SystemExit(f"need two scrape folders of one city under {data}, found {scrapes}")
    imported = import_insideairbnb.run(spark, import_insideairbnb.parse_args(
        ["--scrape", str(scrapes[0]), "--later-scrape", str(scrapes[-1]),
         "--out", f"{a.root}/inputs", "--feature-set", a.feature_set]))  # fmt: skip
    print(f"[eval] imported: {json.dumps(imported)}", flush=True)
    window = imported["shard_args"]
    flags = ["--lookback-days", str(window["lookback_days"]),
             "--holdout-days", str(window["holdout_days"]),
             "--half-life-days", str(a.half_life_days)]  # fmt: skip
    title = f"Listing similarity: Inside Airbnb, {scrapes[0].name} → {scrapes[-1].name}"
    return run_stages(spark, a.root, dt.date.fromisoformat(window["run_date"]), a,
                      shard_flags=flags, labels=AIRBNB_LABELS, title=title,
                      notes=[AIRBNB_NOTE])  # fmt: skip


def hide_history(interactions: str, *, run_date: dt.date, holdout_days: int, share: float,
                 seed: int) -> int:  # fmt: skip
    """Drop all pre-holdout events of a random ``share`` of the listings seen in the holdout.

    Those listings become cold start (features only) yet have held-out pairs to score.
    """
    table = ds.dataset(interactions, format="parquet", partitioning="hive").to_table()
    first_holdout = run_date - dt.timedelta(days=holdout_days - 1)
    day = pc.cast(table["event_date"], pa.date32())
    in_holdout = pc.greater_equal(day, pa.scalar(first_holdout, pa.date32()))
    seen = np.unique(table.filter(in_holdout)["listing_id"].to_numpy(zero_copy_only=False))
    rng = np.random.default_rng(seed)
    hidden = rng.choice(seen, size=round(share * len(seen)), replace=False)
    drop = pc.and_(pc.is_in(table["listing_id"], pa.array(hidden)), pc.invert(in_holdout))
    kept = table.filter(pc.invert(drop)).drop_columns(["event_date"])
    kept = kept.append_column("event_date", day.filter(pc.invert(drop)))
    out = Path(interactions)
    out.rename(out.with_name("interactions.full"))
    out.mkdir()
    pq.write_table(kept, out / "part-00000.parquet")
    shutil.rmtree(out.with_name("interactions.full"))
    return len(hidden)


def demo(spark, a: argparse.Namespace) -> dict:
    run_date = dt.date.fromisoformat(a.run_date)
    generate_sample_data.run(None, generate_sample_data.parse_args(
        ["--out", f"{a.root}/inputs", "--listings", str(a.listings), "--users", str(a.users),
         "--events", str(a.events), "--end-date", (run_date + dt.timedelta(days=1)).isoformat(),
         "--seed", str(a.seed)]))  # fmt: skip
    hidden = hide_history(f"{a.root}/inputs/interactions", run_date=run_date, holdout_days=2,
                          share=a.hide_share, seed=a.seed)  # fmt: skip
    print(f"[eval] hid the training history of {hidden} listings (cold start)", flush=True)
    note = (f"Generated marketplace; the training history of {hidden} listings with held-out "
            "events was removed so that cold-start pairs exist.")  # fmt: skip
    return run_stages(spark, a.root, run_date, a, notes=[note])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("dataset", choices=("insideairbnb", "demo"))
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "insideairbnb"))
    p.add_argument("--root", help="working folder (replaced); default /tmp/eval-<dataset>")
    p.add_argument("--feature-set", default="common", choices=("common", "full"))
    p.add_argument("--half-life-days", type=float, default=365.0)
    p.add_argument("--run-date", default="2026-11-20", help="demo only")
    p.add_argument("--listings", type=int, default=1500)
    p.add_argument("--users", type=int, default=1500)
    p.add_argument("--events", type=int, default=60_000)
    p.add_argument("--hide-share", type=float, default=0.05)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--shard-args", default="", help="extra flags for the shards stage")
    p.add_argument("--train-args", default="", help="extra flags for the train stage")
    a = p.parse_args(argv)
    a.root = a.root or f"/tmp/eval-{a.dataset}"
    shutil.rmtree(a.root, ignore_errors=True)
    print(f"[eval] {a.dataset} under {a.root}; load {load()}", flush=True)
    spark = build_session(f"eval-{a.dataset}")
    started = time.perf_counter()
    result = insideairbnb(spark, a) if a.dataset == "insideairbnb" else demo(spark, a)
    print(f"[eval] total {time.perf_counter() - started:.0f}s; load {load()}", flush=True)
    print(json.dumps(result["headline"]))


if __name__ == "__main__":
    main()
