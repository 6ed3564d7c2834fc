"""Quality of the published lists and of every baseline, per data set, with paired intervals.

    .venv/bin/python bench/quality.py [--sets generated,albany,barossa,online-retail]
        [--data-root ../shared/data] [--root /tmp/quality] [--run-date 2026-11-20]
        [--listings 3000 --users 3000 --events 150000 --days 60] [--hide-share 0.1]
        [--resamples 1000] [--seed 7]

Each set runs the real pipeline (``jobs.pipeline.run``, as ``listing-similarity run`` does)
under ``<root>/<set>`` (replaced), with only the set's time window passed; every other choice is
the pipeline's own (made on its validation split). Sets whose data is missing are skipped with
the reason.

- ``generated``: the sample marketplace; the pre-holdout history of ``--hide-share`` of the
  listings with holdout events is removed, so cold pairs exist.
- ``albany``: Inside Airbnb Albany, ``albany-2024-11`` then ``albany-2025-09``.
- ``barossa``: Inside Airbnb Barossa Valley, trained on ``barossa-valley-2022-07``, holding out
  what ``barossa-valley-2024-07`` adds.
- ``online-retail``: UCI Online Retail, through ``listing-similarity import`` (the README's example).

Then, from the run's files only (no Spark, except to derive the held-out pairs when the
evaluate stage did not store them): every method's pair ranks on the held-out pairs
(``<root>/<set>/work/<date>/evaluation/holdout_pairs``), hit-rate@10 over all / warm / cold pairs,
MRR@10, and a paired 95 % bootstrap interval of (method - model) hit-rate@10 that resamples
held-out users. Methods are the sub-folders of ``work/<date>/evaluation/`` holding ranked lists;
``model`` is the published ``listing_neighbours`` partition of the run date.

Printed per set: a table, what the pipeline chose on validation (``metrics.json`` key
``validation``, if any) and the seconds. The last line is one JSON object
``{set: {method: {hit_rate_at_10, ..., delta_vs_model: {all: [mean, lo, hi], ...}}}}``, or
``{set: {"skipped": reason}}`` / ``{set: {"failed": error}}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import pyarrow.dataset as ds  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from lib.paths import Layout  # noqa: E402

SETS = ("generated", "albany", "barossa", "online-retail")
K = 10
SEGMENTS = ("all", "warm", "cold")
LIST_COLUMNS = ("listing_id", "neighbour_id", "rank", "score")
PAIR_COLUMNS = ("user_id", "query_id", "target_id", "is_cold")
# Reviews are months apart: a 21-day half-life would weigh away nearly all of the history.
AIRBNB_HALF_LIFE_DAYS = 365.0
# (data folder under --data-root, first scrape, later scrape)
AIRBNB = {
    "albany": ("insideairbnb", "albany-2024-11", "albany-2025-09"),
    "barossa": ("insideairbnb-barossa-valley", "barossa-valley-2022-07", "barossa-valley-2024-07"),
}
RETAIL_DATA = "online-retail"


class Skip(Exception):
    """The set cannot run here (data or importer missing); the message is the reason."""


# ---------------------------------------------------------------------------------------------
# Pure scoring: pair ranks, metrics, paired bootstrap (numpy/pandas only; tested directly).


def pair_ranks(pairs: pd.DataFrame, lists: pd.DataFrame) -> np.ndarray:
    """The rank of each pair's target in its query's list, aligned with ``pairs``' rows.

    ``pairs`` has ``query_id, target_id``; ``lists`` has ``listing_id, neighbour_id, rank``.
    A target that is not in the list (or a query without a list) gets ``inf``: a miss at any k.
    """
    best = (
        lists[["listing_id", "neighbour_id", "rank"]]
        .groupby(["listing_id", "neighbour_id"], as_index=False)["rank"]
        .min()
        .rename(columns={"listing_id": "query_id", "neighbour_id": "target_id"})
    )
    keys = pairs[["query_id", "target_id"]].reset_index(drop=True)
    merged = keys.merge(best, on=["query_id", "target_id"], how="left", validate="many_to_one")
    return merged["rank"].to_numpy(dtype=float, na_value=np.inf)


def segment_masks(is_cold: np.ndarray) -> dict[str, np.ndarray]:
    cold = np.asarray(is_cold, dtype=bool)
    return {"all": np.ones_like(cold), "warm": ~cold, "cold": cold}


def hits_at(ranks: np.ndarray, k: int = K) -> np.ndarray:
    return (np.asarray(ranks, dtype=float) <= k).astype(float)


def ranking_metrics(ranks: np.ndarray, is_cold: np.ndarray, *, k: int = K) -> dict:
    """hit-rate@k (all / warm / cold), MRR@k and the pair counts; None where a segment is empty."""
    ranks = np.asarray(ranks, dtype=float)
    hit = hits_at(ranks, k)
    reciprocal = np.where(hit > 0, 1.0 / ranks, 0.0)
    masks = segment_masks(is_cold)

    def mean(values: np.ndarray, mask: np.ndarray) -> float | None:
        return float(values[mask].mean()) if mask.any() else None

    return {
        f"hit_rate_at_{k}": mean(hit, masks["all"]),
        f"hit_rate_at_{k}_warm": mean(hit, masks["warm"]),
        f"hit_rate_at_{k}_cold": mean(hit, masks["cold"]),
        f"mrr_at_{k}": mean(reciprocal, masks["all"]),
        "pairs": int(masks["all"].sum()),
        "pairs_warm": int(masks["warm"].sum()),
        "pairs_cold": int(masks["cold"].sum()),
    }


def paired_bootstrap(
    users: np.ndarray,
    values: np.ndarray,
    baseline: np.ndarray,
    *,
    resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float, float] | None:
    """Mean of (values - baseline) over pairs and its percentile interval, resampling users.

    All pairs of a user are drawn together: per user the sum of differences and the pair count,
    then ``resamples`` multinomial draws of the users (with replacement, as many as there are)
    weight both sums. The same ``seed`` gives every method the same draws. None without pairs.
    """
    users = np.asarray(users)
    if users.size == 0:
        return None
    codes, uniques = pd.factorize(users)
    n_users = len(uniques)
    diff = np.asarray(values, dtype=float) - np.asarray(baseline, dtype=float)
    sums = np.bincount(codes, weights=diff, minlength=n_users)
    counts = np.bincount(codes, minlength=n_users).astype(float)
    rng = np.random.default_rng(seed)
    deltas = np.empty(resamples)
    chunk = max(1, min(resamples, 20_000_000 // max(n_users, 1)))
    for start in range(0, resamples, chunk):
        size = min(chunk, resamples - start)
        weights = rng.multinomial(n_users, np.full(n_users, 1.0 / n_users), size=size)
        deltas[start : start + size] = (weights @ sums) / (weights @ counts)
    tail = (1.0 - level) / 2.0 * 100.0
    lo, hi = np.percentile(deltas, [tail, 100.0 - tail])
    return float(sums.sum() / counts.sum()), float(lo), float(hi)


def score_methods(
    pairs: pd.DataFrame,
    lists: Mapping[str, pd.DataFrame],
    *,
    reference: str = "model",
    k: int = K,
    resamples: int = 1000,
    seed: int = 0,
) -> dict[str, dict]:
    """Every method's metrics on the same pairs, and its paired interval against ``reference``."""
    is_cold = pairs["is_cold"].to_numpy(dtype=bool)
    users = pairs["user_id"].to_numpy()
    masks = segment_masks(is_cold)
    ranks = {name: pair_ranks(pairs, df) for name, df in lists.items()}
    hits = {name: hits_at(r, k) for name, r in ranks.items()}
    out = {}
    for name in lists:
        row = ranking_metrics(ranks[name], is_cold, k=k)
        if reference in hits:
            row["delta_vs_model"] = {
                segment: paired_bootstrap(
                    users[mask],
                    hits[name][mask],
                    hits[reference][mask],
                    resamples=resamples,
                    seed=seed,
                )
                for segment, mask in masks.items()
            }
        out[name] = row
    return out


def method_order(names) -> list[str]:
    from lib.evaluation import METHOD_ORDER

    names = list(names)
    return [m for m in METHOD_ORDER if m in names] + sorted(set(names) - set(METHOD_ORDER))


def rounded(value, digits: int = 4):
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [rounded(v, digits) for v in value]
    return value


def format_table(scores: Mapping[str, Mapping]) -> str:
    def num(value) -> str:
        return "-" if value is None else f"{value:.3f}"

    def delta(value) -> str:
        if value is None:
            return "-"
        mean, lo, hi = value
        return f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}]"

    header = (
        "method",
        "hit@10",
        "warm",
        "cold",
        "MRR@10",
        "pairs (warm/cold)",
        "Δhit@10 vs model",
        "Δ warm",
        "Δ cold",
    )
    rows = [header]
    for name in method_order(scores):
        s = scores[name]
        d = s.get("delta_vs_model", {})
        rows.append(
            (
                name,
                num(s["hit_rate_at_10"]),
                num(s["hit_rate_at_10_warm"]),
                num(s["hit_rate_at_10_cold"]),
                num(s["mrr_at_10"]),
                f"{s['pairs']} ({s['pairs_warm']}/{s['pairs_cold']})",
                delta(d.get("all")),
                delta(d.get("warm")),
                delta(d.get("cold")),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Reading a finished run's files.


def evaluation_dir(layout: Layout, run_date: dt.date) -> Path:
    return Path(layout.shards(run_date)).parent / "evaluation"


def read_parquet_folder(path: Path, columns=None) -> pd.DataFrame | None:
    """A folder of Parquet files (Spark's ``_SUCCESS`` and ``.crc`` ignored), or None."""
    try:
        dataset = ds.dataset(str(path), format="parquet")
    except (OSError, pa.ArrowInvalid):
        return None
    if not dataset.files or (columns and not set(columns) <= set(dataset.schema.names)):
        return None
    return dataset.to_table(columns=list(columns) if columns else None).to_pandas()


def read_method_lists(layout: Layout, run_date: dt.date, *, k: int = K) -> dict[str, pd.DataFrame]:
    """Every method's ranked lists (rank <= k): the sub-folders of ``work/<date>/evaluation/``
    with ranked-list columns, and ``model`` = ``evaluation/model/`` or else the published
    ``listing_neighbours`` partition of ``run_date``."""
    lists: dict[str, pd.DataFrame] = {}
    folder = evaluation_dir(layout, run_date)
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []:
        df = read_parquet_folder(sub, LIST_COLUMNS)
        if df is not None:
            lists[sub.name] = df[df["rank"] <= k]
    if "model" not in lists:
        from deltalake import DeltaTable

        dataset = DeltaTable(layout.table("listing_neighbours")).to_pyarrow_dataset()
        day = ds.field("run_date") == pa.scalar(run_date, pa.date32())
        table = dataset.to_table(columns=list(LIST_COLUMNS), filter=day & (ds.field("rank") <= k))
        lists["model"] = table.to_pandas()
    return lists


def read_pairs(spark, layout: Layout, run_date: dt.date) -> pd.DataFrame:
    """The labelled held-out pairs the evaluate stage scored (or the same, derived with Spark)."""
    stored = read_parquet_folder(evaluation_dir(layout, run_date) / "holdout_pairs", PAIR_COLUMNS)
    if stored is not None:
        return stored
    from lib import evaluation
    from lib.parquet_io import read_parquet
    from schemas import training_examples as te

    shards = layout.shards(run_date)
    holdout = read_parquet(spark, f"{shards}/holdout", te.HOLDOUT_SPEC)
    features = read_parquet(spark, f"{shards}/listing_features", te.LISTING_FEATURES_SPEC)
    pairs = evaluation.label_pairs(evaluation.holdout_pairs(holdout), features)
    return pairs.select(*PAIR_COLUMNS).toPandas()


def validation_choices(layout: Layout, run_date: dt.date):
    path = Path(layout.report(run_date)).parent / "metrics.json"
    if not path.exists():
        return None
    return json.loads(path.read_text()).get("validation")


# ---------------------------------------------------------------------------------------------
# Preparing each set's inputs; each returns the window to run: run_date (+ window flags).


def hide_history(
    interactions: str, *, run_date: dt.date, holdout_days: int, share: float, seed: int
) -> int:
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


def prepare_generated(spark, a: argparse.Namespace, root: str) -> dict:
    from jobs import generate_sample_data, pipeline

    run_date = dt.date.fromisoformat(a.run_date)
    holdout_days = field_default(pipeline.PipelineArgs, "holdout_days")
    generate_sample_data.run(
        None,
        generate_sample_data.parse_args(
            [
                "--out",
                f"{root}/inputs",
                "--listings",
                str(a.listings),
                "--users",
                str(a.users),
                "--events",
                str(a.events),
                "--days",
                str(a.days),
                "--end-date",
                (run_date + dt.timedelta(days=1)).isoformat(),
                "--seed",
                str(a.seed),
            ]
        ),
    )
    hidden = hide_history(
        f"{root}/inputs/interactions",
        run_date=run_date,
        holdout_days=holdout_days,
        share=a.hide_share,
        seed=a.seed,
    )
    say(f"generated: hid the training history of {hidden} listings (cold start)")
    return {"run_date": run_date}


def prepare_airbnb(name: str) -> Callable:
    folder, first, later = AIRBNB[name]

    def prepare(spark, a: argparse.Namespace, root: str) -> dict:
        from jobs import import_insideairbnb

        data = Path(a.data_root) / folder
        missing = [str(data / s) for s in (first, later) if not (data / s).is_dir()]
        if missing:
            raise Skip(f"missing scrape folder(s): {', '.join(missing)}")
        imported = import_insideairbnb.run(
            spark,
            import_insideairbnb.parse_args(
                [
                    "--scrape",
                    str(data / first),
                    "--later-scrape",
                    str(data / later),
                    "--out",
                    f"{root}/inputs",
                ]
            ),
        )
        say(f"{name}: imported {json.dumps(imported, default=str)}")
        return {**window(imported["shard_args"]), "half_life_days": AIRBNB_HALF_LIFE_DAYS}

    return prepare


# The README's worked example: a purchase is the strongest event there is, an invoice a
# session, the description words and the median price the item's features.
RETAIL_IMPORT_FLAGS = [
    "--user",
    "customer_id",
    "--item",
    "stock_code",
    "--timestamp",
    "invoice_date",
    "--event-type",
    "event_type",
    "--event-types",
    "purchase=contact",
    "--session",
    "invoice_no",
    "--active",
    "is_product",
    "--text",
    "description",
    "--numeric",
    "unit_price_median:log",
]


def prepare_retail(spark, a: argparse.Namespace, root: str) -> dict:
    from jobs import import_files

    data = Path(a.data_root) / RETAIL_DATA
    if not data.is_dir():
        raise Skip(f"missing data folder {data}")
    imported = import_files.run(
        spark,
        import_files.parse_args(
            [
                "--interactions",
                str(data / "transactions.csv.gz"),
                "--items",
                str(data / "items.csv.gz"),
                "--out",
                f"{root}/inputs",
                *RETAIL_IMPORT_FLAGS,
            ]
        ),
    )
    say(f"online-retail: imported {json.dumps(imported, default=str)}")
    return window(imported["shard_args"])


PREPARE: dict[str, Callable] = {
    "generated": prepare_generated,
    "albany": prepare_airbnb("albany"),
    "barossa": prepare_airbnb("barossa"),
    "online-retail": prepare_retail,
}


def window(shard_args: Mapping) -> dict:
    out = {"run_date": dt.date.fromisoformat(str(shard_args["run_date"]))}
    for key in (
        "lookback_days",
        "holdout_days",
        "validation_days",
        "half_life_days",
        "max_events_per_user_day",
    ):
        if key in shard_args:
            out[key] = shard_args[key]
    return out


def field_default(cls, name: str):
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


# ---------------------------------------------------------------------------------------------


def say(text: str) -> None:
    print(f"[quality] {text}", flush=True)


def run_set(spark, name: str, a: argparse.Namespace) -> dict:
    from jobs import pipeline

    root = f"{a.root}/{name}"
    shutil.rmtree(root, ignore_errors=True)
    Path(root).mkdir(parents=True)
    started = time.perf_counter()
    win = PREPARE[name](spark, a, root)
    prepared = time.perf_counter()
    # Only the data's time window: everything else is the pipeline's default or its own choice.
    args = pipeline.PipelineArgs(root=root, **win)
    say(f"{name}: pipeline.run({args})")
    result = pipeline.run(spark, args)
    ran = time.perf_counter()
    layout = Layout(root)
    pairs = read_pairs(spark, layout, args.run_date)
    lists = read_method_lists(layout, args.run_date)
    scores = score_methods(pairs, lists, resamples=a.resamples, seed=a.bootstrap_seed)
    scored = time.perf_counter()
    scores = {m: rounded(scores[m]) for m in method_order(scores)}
    print(
        f"\n=== {name}: run date {args.run_date}, {len(pairs)} held-out pairs, "
        f"{pairs['user_id'].nunique()} users, root {root}",
        flush=True,
    )
    print(format_table(scores), flush=True)
    validation = validation_choices(layout, args.run_date)
    if validation is not None:
        print(f"validation: {json.dumps(validation, default=str)}", flush=True)
    print(
        f"seconds: prepare {prepared - started:.1f}, pipeline {ran - prepared:.1f} "
        f"(stages {json.dumps(result['stage_seconds'])}), scoring {scored - ran:.1f}, "
        f"total {scored - started:.1f}\n",
        flush=True,
    )
    return scores


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sets", default=",".join(SETS), help="comma-separated; default all")
    p.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument(
        "--root", default="/tmp/quality", help="each set runs under ROOT/<set> (replaced)"
    )
    p.add_argument("--run-date", default="2026-11-20", help="generated: last event day")
    p.add_argument("--listings", type=int, default=3000, help="generated")
    p.add_argument("--users", type=int, default=3000, help="generated")
    p.add_argument("--events", type=int, default=150_000, help="generated")
    p.add_argument("--days", type=int, default=60, help="generated")
    p.add_argument(
        "--hide-share",
        type=float,
        default=0.1,
        help="generated: share of holdout listings whose history is hidden",
    )
    p.add_argument("--seed", type=int, default=7, help="generated data and hidden listings")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
    p.add_argument("--bootstrap-seed", type=int, default=0)
    a = p.parse_args(argv)
    chosen = [s.strip() for s in a.sets.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(SETS))
    if unknown:
        p.error(f"unknown set(s) {', '.join(unknown)}; sets are {', '.join(SETS)}")

    from lib.session import build_session

    spark = build_session("quality-bench")
    results: dict[str, dict] = {}
    failed = False
    for name in chosen:
        say(f"{name}: started")
        try:
            results[name] = run_set(spark, name, a)
        except Skip as reason:
            say(f"{name}: skipped: {reason}")
            results[name] = {"skipped": str(reason)}
        except Exception as error:  # one set failing must not hide the others' numbers
            traceback.print_exc()
            say(f"{name}: failed: {error!r}")
            results[name] = {"failed": "".join(traceback.format_exception_only(error)).strip()}
            failed = True
    print(json.dumps(results))
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
