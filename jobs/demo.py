"""One command, end to end on generated data: sample marketplace -> every stage -> examples.

Everything goes under ``--root`` (default ./demo). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass

from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from jobs import generate_sample_data, pipeline
from jobs.similar import shown_features
from lib import delta_io, feature_spec
from lib.lookup import describe, neighbours_with_features
from lib.paths import Layout
from lib.session import build_session
from schemas import listing_embeddings, listing_neighbours


@dataclass(frozen=True)
class DemoArgs:
    root: str = "demo"
    run_date: dt.date = dt.date(2026, 11, 20)
    listings: int = 20_000
    users: int = 50_000
    events: int = 2_000_000
    epochs: int = 4
    k: int = 20
    examples: int = 4
    seed: int = 7


def parse_args(argv: Sequence[str] | None = None) -> DemoArgs:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--root", default=DemoArgs.root)
    p.add_argument("--run-date", type=dt.date.fromisoformat, default=DemoArgs.run_date)
    for flag in ("listings", "users", "events", "epochs", "k", "examples", "seed"):
        p.add_argument(f"--{flag}", type=int, default=getattr(DemoArgs, flag))
    return DemoArgs(**vars(p.parse_args(argv)))


def print_examples(spark: SparkSession, layout: Layout, run_date: dt.date, count: int) -> None:
    """Print a few warm and cold listings with their top-5 neighbours."""
    day = {"run_date": run_date.isoformat()}
    emb = delta_io.read_table(
        spark, layout.table("listing_embeddings"), listing_embeddings.SPEC, partition=day
    )
    nbr = delta_io.read_table(
        spark, layout.table("listing_neighbours"), listing_neighbours.SPEC, partition=day
    )
    spec = shown_features(layout, run_date)
    snapshot = delta_io.read_input(spark, layout.listings, feature_spec.listings_table_spec(spec))
    picked = [
        r.listing_id
        for cold in (False, True)
        for r in emb.where(F.col("is_cold_start") == cold)
        .orderBy(F.xxhash64("listing_id"))
        .limit(count - count // 2 if not cold else count // 2)
        .collect()
    ]
    cold = {
        r.listing_id
        for r in emb.where("is_cold_start").where(F.col("listing_id").isin(picked)).collect()
    }
    rows = neighbours_with_features(
        nbr.where(F.col("listing_id").isin(picked) & (F.col("rank") <= 5)), snapshot, spec.shown
    ).collect()
    for listing_id in picked:
        mine = sorted((r for r in rows if r.listing_id == listing_id), key=lambda r: r["rank"])
        tag = "cold start, no interactions" if listing_id in cold else "warm"
        print(f"\n{listing_id} [{tag}]: {describe(mine[0], spec.shown)}")
        for r in mine:
            km = "" if r.distance_km is None else f"{r.distance_km:6.1f} km  "
            print(
                f"  {r['rank']}. {r.neighbour_id} {describe(r, spec.shown, 'n_')}  "
                f"{km}score {r.score:.3f}"
            )


def run(spark: SparkSession, args: DemoArgs) -> dict:
    layout, started = Layout(args.root), time.perf_counter()
    generate_sample_data.run(
        None,
        generate_sample_data.parse_args(
            [
                "--out",
                f"{args.root}/inputs",
                "--listings",
                str(args.listings),
                "--users",
                str(args.users),
                "--events",
                str(args.events),
                "--end-date",
                (args.run_date + dt.timedelta(days=1)).isoformat(),
                "--seed",
                str(args.seed),
            ]
        ),
    )
    generate_seconds = round(time.perf_counter() - started, 2)
    result = pipeline.run(
        spark,
        pipeline.parse_args(
            [
                "--root",
                args.root,
                "--run-date",
                args.run_date.isoformat(),
                "--k",
                str(args.k),
                "--epochs",
                str(args.epochs),
                "--seed",
                str(args.seed),
            ]
        ),
    )
    print_examples(spark, layout, args.run_date, args.examples)
    print(f"\ninputs:  {args.root}/inputs (generated in {generate_seconds:.1f}s)")
    for table in ("listing_embeddings", "listing_neighbours", "runs"):
        print(f"table:   {layout.table(table)}")
    print(f"model:   {layout.model_dir(result['model_version'])}")
    print(f"report:  {result['report']}  (model vs baselines, embedding maps; open in a browser)")
    headline = (result["stages"].get("evaluate") or {}).get("headline") or {}
    for line in comparison(headline):
        print(line)
    stage_seconds = {"generate": generate_seconds, **result["stage_seconds"]}
    print("stages:  " + ", ".join(f"{k} {v:.1f}s" for k, v in stage_seconds.items()))
    counts = result["counts"]
    return {
        "listings": counts.get("active_listings"),
        "cold_listings": counts.get("cold_listings"),
        "neighbour_rows": delta_io.read_table(
            spark,
            layout.table("listing_neighbours"),
            listing_neighbours.SPEC,
            partition={"run_date": args.run_date.isoformat()},
        ).count(),
        "k": args.k,
        "seconds": round(time.perf_counter() - started, 2),
        "stage_seconds": stage_seconds,
        "run_id": result["run_id"],
        "model_version": result["model_version"],
        "tables": {
            t: layout.table(t) for t in ("listing_embeddings", "listing_neighbours", "runs")
        },
        "report": result["report"],
    }


# The published lists and the learned embedding's own: not baselines to compare against.
OWN_LISTS = ("model", "embedding")


def comparison(headline: dict[str, dict[str, float | None]]) -> list[str]:
    """Published lists against the best baseline of each column (hit@10 on held-out pairs)."""
    if "model" not in headline:
        return []
    columns = (
        ("all", "hit_rate_at_10"),
        ("warm", "hit_rate_at_10_warm"),
        ("cold", "hit_rate_at_10_cold"),
    )

    def cell(value: float | None) -> str:
        return "    -" if value is None else f"{value:5.3f}"

    lines = ["\nhit@10 on held-out pairs      all   warm   cold"]
    lines.append(
        "published               " + "  ".join(cell(headline["model"][k]) for _, k in columns)
    )
    best = []
    for _, key in columns:
        found = [
            (v[key], m)
            for m, v in headline.items()
            if m not in OWN_LISTS and v.get(key) is not None
        ]
        best.append(max(found) if found else (None, "-"))
    lines.append("best baseline           " + "  ".join(cell(v) for v, _ in best))
    lines.append(
        "  ("
        + ", ".join(f"{name}: {m}" for (name, _), (_, m) in zip(columns, best, strict=True))
        + ")"
    )
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    print(json.dumps(run(build_session("listing-similarity-demo"), args), default=str))


if __name__ == "__main__":
    main()
