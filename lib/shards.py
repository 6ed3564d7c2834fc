"""Spark transforms that turn raw interaction logs into training examples.

All functions here are lazy ``DataFrame -> DataFrame`` transforms; the job decides what to cache
and when to run actions.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from schemas import training_examples

# Drop reasons, in the order they are checked: an event gets the first that applies.
DROP_REASONS = (
    "unknown_event_type",
    "future_event",
    "outside_window",
    "duplicate",
    "unknown_listing",
    "bot_user",
)


def _end_of_day(run_date: dt.date) -> F.Column:
    return F.lit(dt.datetime.combine(run_date + dt.timedelta(days=1), dt.time())).cast(
        T.TimestampType()
    )


def tag_drop_reasons(
    events: DataFrame,
    listings: DataFrame,
    *,
    run_date: dt.date,
    lookback_days: int,
    event_types: tuple[str, ...],
    max_events_per_user_day: int,
) -> DataFrame:
    """Add ``drop_reason`` (null when the event is kept) to every interaction.

    The window is the ``lookback_days`` days ending with ``run_date`` (inclusive). Bots are users
    with more than ``max_events_per_user_day`` events on any day of the window; all their events go.
    """
    window_start = run_date - dt.timedelta(days=lookback_days - 1)
    known_listings = listings.select("listing_id", F.lit(True).alias("_known")).distinct()
    in_window = (F.col("event_date") >= F.lit(window_start)) & (F.col("event_date") <= run_date)
    daily = (
        events.where(in_window)
        .groupBy("user_id", "event_date")
        .count()
        .where(F.col("count") > max_events_per_user_day)
        .select("user_id", F.lit(True).alias("_bot"))
        .distinct()
    )
    duplicate_rank = F.row_number().over(
        Window.partitionBy("user_id", "listing_id", "event_type", "event_ts").orderBy(
            F.col("session_id").asc_nulls_last(), F.col("source").asc_nulls_last()
        )
    )
    tagged = (
        events.join(known_listings, "listing_id", "left")
        .join(daily, "user_id", "left")
        .withColumn("_dup", duplicate_rank > 1)
    )
    reason = (
        F.when(~F.col("event_type").isin(*event_types), "unknown_event_type")
        .when(F.col("event_ts") >= _end_of_day(run_date), "future_event")
        .when(~in_window, "outside_window")
        .when(F.col("_dup"), "duplicate")
        .when(F.col("_known").isNull(), "unknown_listing")
        .when(F.col("_bot").isNotNull(), "bot_user")
    )
    return tagged.withColumn("drop_reason", reason).drop("_known", "_bot", "_dup")


def split_holdout(
    events: DataFrame, *, run_date: dt.date, holdout_days: int
) -> tuple[DataFrame, DataFrame]:
    """Split kept events by time: the last ``holdout_days`` days of the window are held out."""
    first_holdout_day = run_date - dt.timedelta(days=holdout_days - 1)
    is_holdout = F.col("event_date") >= F.lit(first_holdout_day)
    return events.where(~is_holdout), events.where(is_holdout)


def weight_interactions(
    events: DataFrame,
    *,
    run_date: dt.date,
    event_weights: Mapping[str, float],
    half_life_days: float,
) -> DataFrame:
    """Aggregate events per (user_id, listing_id) into one weight.

    weight = sum over events of type_weight × 0.5 ** (age_days / half_life_days), where age is
    measured from the end of ``run_date``, so yesterday's contact outweighs last month's view.
    """
    type_weight = F.coalesce(
        F.create_map(*[F.lit(x) for kv in event_weights.items() for x in kv])[F.col("event_type")],
        F.lit(0.0),
    )
    age_days = (_end_of_day(run_date).cast("double") - F.col("event_ts").cast("double")) / 86_400.0
    decayed = type_weight * F.pow(F.lit(0.5), age_days / F.lit(float(half_life_days)))
    return (
        events.groupBy("user_id", "listing_id")
        .agg(F.sum(decayed).cast("float").alias("weight"))
        .where(F.col("weight") > 0)
    )


def extend_vocabulary(ids: DataFrame, previous: DataFrame | None = None) -> DataFrame:
    """Map every distinct ``id`` to a dense int index, keeping the indices of ``previous``.

    Ids already in ``previous`` (columns id, idx) keep their index; new ids are appended after the
    largest existing index in id order, so the same inputs always give the same vocabulary and
    embeddings of consecutive runs stay comparable.
    """
    distinct_ids = ids.select(F.col("id").cast("string")).where(F.col("id").isNotNull()).distinct()
    if previous is None:
        previous = distinct_ids.sparkSession.createDataFrame(
            [], training_examples.VOCABULARY_SCHEMA
        )
    new_ids = distinct_ids.join(previous.select("id"), "id", "left_anti")
    offset = previous.agg(F.coalesce(F.max("idx") + 1, F.lit(0)).alias("_offset"))
    # One ordered window over the new ids only: a night adds few ids, so the single
    # partition this needs stays small; the first run of a huge catalogue pays it once.
    appended = new_ids.crossJoin(offset).select(
        "id",
        (F.col("_offset") + F.row_number().over(Window.orderBy("id")) - 1).cast("int").alias("idx"),
    )
    return previous.select("id", "idx").unionByName(appended)


def attach_log_q(examples: DataFrame) -> DataFrame:
    """Add ``log_q``: log of each listing's share of training examples (log-Q correction)."""
    per_listing = examples.groupBy("listing_idx").agg(F.count(F.lit(1)).alias("_n"))
    total = examples.agg(F.count(F.lit(1)).alias("_total"))
    share = per_listing.crossJoin(total).select(
        "listing_idx", F.log(F.col("_n") / F.col("_total")).cast("float").alias("log_q")
    )
    return examples.join(share, "listing_idx")


def assemble_training_examples(
    weighted: DataFrame,
    user_vocabulary: DataFrame,
    listing_features: DataFrame,
) -> DataFrame:
    """Join weighted (user_id, listing_id) pairs with ids and listing features.

    Returns rows in the ``training_examples`` contract. Pairs whose listing has no features row
    cannot occur after cleaning (unknown listings are dropped), so the inner join loses nothing.
    """
    users = user_vocabulary.select(F.col("id").alias("user_id"), F.col("idx").alias("user_idx"))
    feature_columns = [
        c
        for c in training_examples.SCHEMA.fieldNames()
        if c not in ("user_idx", "listing_idx", "weight", "log_q")
    ]
    features = listing_features.select("listing_id", "listing_idx", *feature_columns)
    examples = weighted.join(users, "user_id").join(features, "listing_id")
    return attach_log_q(examples).select(*training_examples.SCHEMA.fieldNames())


def mark_listings_with_interactions(listing_features: DataFrame, examples: DataFrame) -> DataFrame:
    """Set ``has_interactions`` from the training examples (False means cold start)."""
    seen = examples.select("listing_idx").distinct().withColumn("_seen", F.lit(True))
    return (
        listing_features.drop("has_interactions")
        .join(seen, "listing_idx", "left")
        .withColumn("has_interactions", F.coalesce(F.col("_seen"), F.lit(False)))
        .select(*training_examples.LISTING_FEATURES_SCHEMA.fieldNames())
    )


def shuffle_into_files(examples: DataFrame, *, num_files: int, seed: int) -> DataFrame:
    """Spread rows randomly over exactly ``num_files`` partitions, shuffled within each."""
    return examples.repartition(num_files, F.rand(seed)).sortWithinPartitions(F.rand(seed + 1))
