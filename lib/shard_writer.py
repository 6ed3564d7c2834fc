"""Writes one run's training shards directory: vocabularies, examples, features, holdout, manifest.

This is the shard stage's IO: it wires the pure transforms of ``lib.shards`` and
``lib.features`` together, writes each output once, and swaps the directory in only when
everything is written, so a failed run leaves the previous shards untouched.
"""

from __future__ import annotations

import datetime as dt
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from lib import cointeraction, evaluation, features, shards, validation
from lib.feature_spec import NO_FEATURES, FeatureSpec
from lib.parquet_io import StagedDirectory, parquet_files, read_parquet, write_json, write_parquet
from lib.session import uncompressed_cache
from schemas import interactions, training_examples

MANIFEST = "manifest.json"
# Above this share of the events read, the bot ceiling more likely misfits the data than it
# catches bots: on two ratings data sets (people rate many items in one sitting) the default
# ceiling silently dropped 13-29 % of the events.
BOT_WARNING_SHARE = 0.05


@dataclass(frozen=True)
class ShardParams:
    run_date: dt.date
    lookback_days: int = 90
    holdout_days: int = 2
    # The days before the holdout that every choice is made on (None: as many as holdout_days).
    validation_days: int | None = None
    event_weights: tuple[tuple[str, float], ...] = (("view", 1.0), ("save", 3.0), ("contact", 5.0))
    half_life_days: float = 21.0
    max_events_per_user_day: int = 300
    num_files: int = 8
    seed: int = 7
    # Above this many listings, listing-side lookups are shuffle joins instead of broadcasts.
    broadcast_max_listings: int = 2_000_000
    # Co-interaction statistics: the strongest listings per user (a user of n listings makes n²
    # pairs: 50 halves the self-join of the demo against 200), best partners per variant.
    max_items_per_user: int = 50
    partners_per_variant: int = 50

    @property
    def validation_window(self) -> int:
        return self.holdout_days if self.validation_days is None else self.validation_days


def _write_vocabulary(
    spark: SparkSession, ids: DataFrame, name: str, out: Path, previous_shards: str | None
) -> DataFrame:
    spec = (
        training_examples.LISTING_VOCABULARY_SPEC
        if name == "listings"
        else training_examples.USER_VOCABULARY_SPEC
    )
    prior = (
        read_parquet(spark, f"{previous_shards}/vocab/{name}", spec) if previous_shards else None
    )
    write_parquet(shards.extend_vocabulary(ids, prior), out / "vocab" / name, spec)
    # Read back what was written: later steps use the stored indices, never a recomputation.
    return read_parquet(spark, out / "vocab" / name, spec)


class _StepClock:
    """Seconds per step of the stage, for the manifest: where a slow night spent its time."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def done(self, step: str) -> None:
        now = time.perf_counter()
        self.seconds[step] = round(now - self._last, 2)
        self._last = now


def _drop_counts(tagged: DataFrame) -> dict[str, int]:
    counts: dict[str, int] = {"dropped_duplicate": 0}
    for row in shards.drop_counts(tagged).collect():
        counts[f"dropped_{row.drop_reason or 'none'}"] = row.events
        counts["dropped_duplicate"] += row.duplicates
    counts["events_kept"] = counts.pop("dropped_none", 0)
    counts["events_read"] = sum(counts.values())
    return counts


def drop_shares(counts: Mapping[str, int]) -> dict[str, float]:
    """Per reason, the share of the events read that it dropped (duplicates: the extra copies)."""
    total = counts["events_read"]
    return {
        reason: round(counts.get(f"dropped_{reason}", 0) / total, 6) if total else 0.0
        for reason in ("duplicate", *shards.DROP_REASONS)
    }


def _print_drops(counts: Mapping[str, Any], params: ShardParams) -> None:
    # stderr: the stage's stdout ends with its JSON result, which callers parse.
    shares = counts["share_dropped"]
    dropped = ", ".join(f"{r} {s:.2%}" for r, s in shares.items() if s) or "nothing"
    print(
        f"[shards] {counts['events_read']:,} events read, {counts['events_kept']:,} kept; "
        f"dropped: {dropped}",
        file=sys.stderr,
        flush=True,
    )
    if shares["bot_user"] > BOT_WARNING_SHARE:
        print(
            f"[shards] WARNING the bot ceiling dropped {shares['bot_user']:.1%} of the events "
            f"({counts['dropped_bot_user']:,}): all events of every user with more than "
            f"{params.max_events_per_user_day} events on one day. If those users are people "
            "(e.g. ratings data, many ratings in one sitting), raise the ceiling with "
            "--max-events-per-user-day (shards and run).",
            file=sys.stderr,
            flush=True,
        )


def write_shards(
    spark: SparkSession,
    events: DataFrame,
    snapshot: DataFrame,
    out_dir: str,
    params: ShardParams,
    *,
    spec: FeatureSpec = NO_FEATURES,
    previous_shards: str | None = None,
    input_versions: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Clean, weight, index and encode; write everything under ``out_dir``; return the manifest."""
    started, clock = time.perf_counter(), _StepClock()
    broadcast = snapshot.count() <= params.broadcast_max_listings
    with uncompressed_cache(spark):
        tagged = shards.tag_drop_reasons(
            events,
            snapshot,
            run_date=params.run_date,
            lookback_days=params.lookback_days,
            event_types=tuple(name for name, _ in params.event_weights),
            max_events_per_user_day=params.max_events_per_user_day,
            broadcast_listings=broadcast,
        ).persist()
    counts: dict[str, Any] = _drop_counts(tagged)
    counts["share_dropped"] = drop_shares(counts)
    _print_drops(counts, params)
    if counts.get("dropped_null_key"):
        validation.require_not_null(events, interactions.SPEC)  # names the column, with examples
    validation.require_rows(counts["events_kept"], interactions.SPEC.name, "in the window")
    kept = tagged.where(F.col("drop_reason").isNull()).drop("drop_reason", "copies")
    train_events, holdout = shards.split_holdout(
        kept, run_date=params.run_date, holdout_days=params.holdout_days
    )
    # The model and every choice see only the events before the validation days; the
    # published co-interactions and the baselines scored on the holdout see them all.
    last_fit_day = params.run_date - dt.timedelta(days=params.holdout_days)
    fit_events, validation_events = shards.split_holdout(
        train_events, run_date=last_fit_day, holdout_days=params.validation_window
    )
    clock.done("tag_events")

    with StagedDirectory(out_dir) as out:
        listing_ids = snapshot.select(F.col("listing_id").alias("id"))
        user_ids = train_events.select(F.col("user_id").alias("id"))
        listing_vocab = _write_vocabulary(spark, listing_ids, "listings", out, previous_shards)
        user_vocab = _write_vocabulary(spark, user_ids, "users", out, previous_shards)
        clock.done("vocabularies")

        encoding = features.fit_feature_encoding(snapshot, spec)
        encoded = features.encode_listing_features(snapshot, listing_vocab, encoding)
        clock.done("fit_encoding")
        weighted, written = {}, {}
        for name, window_events in (("train", fit_events), ("train_full", train_events)):
            with uncompressed_cache(spark):
                weighted[name] = shards.pair_weights(
                    window_events,
                    run_date=params.run_date,
                    event_weights=dict(params.event_weights),
                    half_life_days=params.half_life_days,
                ).persist()
            # Decay cannot reach 0 (shards.MIN_DECAY): only event types weighted 0 or less give
            # such pairs. They teach nothing and go, but counted (this count fills the cache).
            suffix = "" if name == "train" else "_full"
            counts[f"examples_dropped_zero_weight{suffix}"] = (
                weighted[name].where(F.col("weight") <= 0).count()
            )
            examples = shards.assemble_training_examples(
                weighted[name].where(F.col("weight") > 0),
                user_vocab,
                listing_vocab,
                broadcast_listings=broadcast,
                num_files=params.num_files,
                seed=params.seed,
            )
            write_parquet(examples, out / name, training_examples.SPEC, row_group_bytes=8 << 20)
            written[name] = read_parquet(spark, out / name, training_examples.SPEC)
        clock.done("training_examples")
        write_parquet(
            shards.mark_listings_with_interactions(encoded, written["train"]).coalesce(1),
            out / "listing_features",
            training_examples.LISTING_FEATURES_SPEC,
        )
        clock.done("listing_features")
        write_parquet(
            holdout.select(*training_examples.HOLDOUT_SCHEMA.fieldNames()),
            out / "holdout",
            training_examples.HOLDOUT_SPEC,
        )
        write_parquet(
            validation_events.select(*training_examples.HOLDOUT_SCHEMA.fieldNames()),
            out / "validation",
            training_examples.HOLDOUT_SPEC,
        )
        clock.done("holdout")
        for cached in (tagged, *weighted.values()):
            cached.unpersist()

        listing_features = read_parquet(
            spark, out / "listing_features", training_examples.LISTING_FEATURES_SPEC
        )
        validation_pairs = evaluation.holdout_pairs(
            read_parquet(spark, out / "validation", training_examples.HOLDOUT_SPEC)
        )
        ids = listing_features.where(F.col("is_active")).select("listing_id", "listing_idx")
        write_parquet(
            validation_pairs.join(
                ids.select(
                    F.col("listing_id").alias("query_id"), F.col("listing_idx").alias("query_idx")
                ),
                "query_id",
            )
            .join(
                ids.select(
                    F.col("listing_id").alias("target_id"), F.col("listing_idx").alias("target_idx")
                ),
                "target_id",
            )
            .select("query_idx", "target_idx"),
            out / "validation_pairs",
            training_examples.VALIDATION_PAIRS_SPEC,
        )
        # Validation scores the co-interaction variants on its own queries, from the examples
        # before it; publication uses every listing's, from the whole window.
        validation_queries = validation_pairs.select(F.col("query_id").alias("listing_id"))
        for name, source, queries in (
            ("cointeraction_fit", "train", validation_queries),
            ("cointeraction_full", "train_full", None),
        ):
            table = cointeraction.cointeraction_table(
                written[source],
                listing_features,
                max_items_per_user=params.max_items_per_user,
                per_variant=params.partners_per_variant,
                queries=queries,
            )
            write_parquet(table, out / name, training_examples.COINTERACTION_SPEC)
            clock.done(name)
        write_parquet(
            shards.pair_examples(
                written["train"],
                max_items_per_user=params.max_items_per_user,
                num_files=params.num_files,
                seed=params.seed,
            ),
            out / "train_pairs",
            training_examples.PAIR_EXAMPLES_SPEC,
            row_group_bytes=8 << 20,
        )
        clock.done("train_pairs")
        counts.update(
            listing_features.agg(
                F.count(F.lit(1)).alias("listings"),
                F.sum(F.col("is_active").cast("long")).alias("active_listings"),
                F.sum((F.col("is_active") & ~F.col("has_interactions")).cast("long")).alias(
                    "cold_listings"
                ),
            )
            .first()
            .asDict()
        )
        counts["training_examples"] = written["train"].count()
        counts["training_examples_full"] = written["train_full"].count()
        for name in ("holdout", "validation"):
            counts[f"{name}_events"] = read_parquet(
                spark, out / name, training_examples.HOLDOUT_SPEC
            ).count()
        validation.require_rows(
            counts["training_examples"],
            interactions.SPEC.name,
            f"before the validation window (the {params.validation_window} days before the "
            "holdout); lower --validation-days or widen --lookback-days",
        )
        clock.done("counts")
        manifest = {
            "schema_version": training_examples.SPEC.version,
            "run_date": params.run_date.isoformat(),
            "num_users": user_vocab.agg(F.max("idx")).first()[0] + 1,
            "num_listings": listing_vocab.agg(F.max("idx")).first()[0] + 1,
            "listing_features_version": training_examples.LISTING_FEATURES_SPEC.version,
            "feature_spec": spec.to_dict(),
            # Pairs, not a map: the order is the tower's and JSON here is written key-sorted.
            "cardinalities": [[n, size] for n, size in features.cardinalities(encoding).items()],
            "dense_features": features.dense_names(encoding),
            "token_fields": features.token_fields(encoding),
            "train_files": [f"train/{f}" for f in parquet_files(out / "train")],
            "pair_files": [f"train_pairs/{f}" for f in parquet_files(out / "train_pairs")],
            "validation_days": params.validation_window,
            "rp3_alphas": list(cointeraction.RP3_ALPHAS),
            "counts": counts,
            "encodings": encoding,
            "parameters": asdict(params),
            "previous_shards": previous_shards,
            "input_versions": input_versions or {},
            "seconds": round(time.perf_counter() - started, 2),
            "step_seconds": clock.seconds,
        }
        write_json(out / MANIFEST, manifest)
    return manifest
