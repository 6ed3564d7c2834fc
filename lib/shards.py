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

from lib.ordering import sorted_positions
from schemas import training_examples

# Drop reasons, in the order they are checked: an event gets the first that applies.
# Exact duplicates are collapsed before any of these and counted separately (`copies`).
DROP_REASONS = (
    "null_key",
    "unknown_event_type",
    "future_event",
    "outside_window",
    "unknown_listing",
    "bot_user",
)
# user_id and event_date lead: min(session_id) makes the deduplication a sort aggregate, and
# sorted by this key its output already has the (user_id, event_date) order the bot windows
# need, so the 10M events are sorted once instead of twice.
EVENT_KEY = ("user_id", "event_date", "listing_id", "event_type", "event_ts")


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
    broadcast_listings: bool = True,
) -> DataFrame:
    """Collapse exact duplicates and add ``drop_reason`` (null when the event is kept).

    Returns one row per distinct event with ``copies`` (how many times it was logged). The
    window is the ``lookback_days`` days ending with ``run_date`` (inclusive). Bots are users
    with more than ``max_events_per_user_day`` distinct events on any day of the window; all
    their events go. Events are shuffled once, by user: deduplication, the bot count and the
    later per-(user, listing) weighting all reuse that partitioning.
    """
    window_start = run_date - dt.timedelta(days=lookback_days - 1)
    in_window = (F.col("event_date") >= F.lit(window_start)) & (F.col("event_date") <= run_date)
    # Only the columns later steps read cross the shuffle (``source`` is not one of them).
    distinct_events = (
        events.select(*EVENT_KEY, "session_id")
        .repartition("user_id")
        .groupBy(*EVENT_KEY)
        .agg(F.count(F.lit(1)).alias("copies"), F.min("session_id").alias("session_id"))
    )
    # Window functions partitioned by user reuse the events' user partitioning: one sort,
    # no second scan or shuffle (a join with a per-day aggregate re-reads the events).
    events_that_day = F.count(F.lit(1)).over(Window.partitionBy("user_id", "event_date"))
    busiest_day = F.max(F.when(in_window, F.col("_day_events"))).over(Window.partitionBy("user_id"))
    known = listings.select("listing_id", F.lit(True).alias("_known")).distinct()
    tagged = (
        distinct_events.withColumn("_day_events", events_that_day)
        .withColumn("_bot", busiest_day > max_events_per_user_day)
        .join(F.broadcast(known) if broadcast_listings else known, "listing_id", "left")
    )
    null_key = F.lit(False)
    for column in ("user_id", "listing_id", "event_type", "event_ts"):
        null_key = null_key | F.col(column).isNull()
    reason = (
        F.when(null_key, "null_key")
        .when(~F.col("event_type").isin(*event_types), "unknown_event_type")
        .when(F.col("event_ts") >= _end_of_day(run_date), "future_event")
        .when(~in_window, "outside_window")
        .when(F.col("_known").isNull(), "unknown_listing")
        .when(F.col("_bot"), "bot_user")
    )
    return tagged.withColumn("drop_reason", reason).drop("_known", "_bot", "_day_events")


def drop_counts(tagged: DataFrame) -> DataFrame:
    """Per drop reason (null = kept): distinct events, and the duplicate copies collapsed."""
    return tagged.groupBy("drop_reason").agg(
        F.count(F.lit(1)).alias("events"),
        F.sum(F.col("copies") - 1).alias("duplicates"),
    )


def split_holdout(
    events: DataFrame, *, run_date: dt.date, holdout_days: int
) -> tuple[DataFrame, DataFrame]:
    """Split kept events by time: the last ``holdout_days`` days of the window are held out."""
    first_holdout_day = run_date - dt.timedelta(days=holdout_days - 1)
    is_holdout = F.col("event_date") >= F.lit(first_holdout_day)
    return events.where(~is_holdout), events.where(is_holdout)


# The smallest decay factor an event gets. Unfloored, 0.5 ** (age / half-life) falls below
# float32's smallest value (the weight's type) after 149 half-lives (8.6 years at 21 days): an
# imported history's old events then became weight 0 and vanished from the examples with no
# drop reason. 1e-6 is reached after about 20 half-lives (420 days at 21 days), so a default
# 90-day lookback (factor >= 0.05) never meets it. Far above float32's limits, its square (a
# cosine norm term) is still a normal float; and the model weighs examples by log1p(weight),
# so a pair this old adds nothing to the loss either way: the floor keeps it (its listing has
# interactions, its user stays known) without giving it weight.
MIN_DECAY = 1e-6


def pair_weights(
    events: DataFrame,
    *,
    run_date: dt.date,
    event_weights: Mapping[str, float],
    half_life_days: float,
) -> DataFrame:
    """Aggregate events per (user_id, listing_id) into one weight, zero or negative ones kept.

    weight = sum over events of type_weight × max(0.5 ** (age_days / half_life_days),
    ``MIN_DECAY``), where age is measured from the end of ``run_date``, so yesterday's contact
    outweighs last month's view. Only event types weighted 0 (or less) give a weight <= 0; the
    shard stage counts those pairs before it drops them.
    """
    type_weight = F.coalesce(
        F.create_map(*[F.lit(x) for kv in event_weights.items() for x in kv])[F.col("event_type")],
        F.lit(0.0),
    )
    age_days = (_end_of_day(run_date).cast("double") - F.col("event_ts").cast("double")) / 86_400.0
    decay = F.greatest(F.pow(F.lit(0.5), age_days / F.lit(float(half_life_days))), F.lit(MIN_DECAY))
    return events.groupBy("user_id", "listing_id").agg(
        F.sum(type_weight * decay).cast("float").alias("weight")
    )


def weight_interactions(
    events: DataFrame,
    *,
    run_date: dt.date,
    event_weights: Mapping[str, float],
    half_life_days: float,
) -> DataFrame:
    """``pair_weights`` without the pairs whose weight is zero or less (nothing to learn)."""
    return pair_weights(
        events, run_date=run_date, event_weights=event_weights, half_life_days=half_life_days
    ).where(F.col("weight") > 0)


def extend_vocabulary(ids: DataFrame, previous: DataFrame | None = None) -> DataFrame:
    """Map every distinct ``id`` to a dense int index, keeping the indices of ``previous``.

    Ids already in ``previous`` (columns id, idx) keep their index; new ids are appended after the
    largest existing index in id order, so the same inputs always give the same vocabulary and
    embeddings of consecutive runs stay comparable.

    The new ids are numbered in parallel (``lib.ordering.sorted_positions``: range-partitioned,
    sorted per partition, offset by the rows of earlier partitions), never in one partition: a
    first night's 100M user ids are sorted by all cores, not by one task. Lazy: no action.
    """
    distinct_ids = ids.select(F.col("id").cast("string")).where(F.col("id").isNotNull()).distinct()
    if previous is None:
        return sorted_positions(distinct_ids, ["id"], "_pos").select(
            "id", F.col("_pos").cast("int").alias("idx")
        )
    new_ids = distinct_ids.join(previous.select("id"), "id", "left_anti")
    # The largest index is a global max: partial maxima per partition, one row each, meet.
    offset = previous.agg(F.coalesce(F.max("idx") + 1, F.lit(0)).alias("_offset"))
    appended = sorted_positions(new_ids, ["id"], "_pos").crossJoin(F.broadcast(offset))
    return previous.select("id", "idx").unionByName(
        appended.select("id", (F.col("_offset") + F.col("_pos")).cast("int").alias("idx"))
    )


def listing_log_q(weighted: DataFrame) -> DataFrame:
    """``log_q`` per listing: log of its share of (user, listing) pairs (log-Q correction)."""
    per_listing = weighted.groupBy("listing_id").agg(F.count(F.lit(1)).alias("_n"))
    total = per_listing.agg(F.sum("_n").alias("_total"))
    return per_listing.crossJoin(total).select(
        "listing_id", F.log(F.col("_n") / F.col("_total")).cast("float").alias("log_q")
    )


def assemble_training_examples(
    weighted: DataFrame,
    user_vocabulary: DataFrame,
    listing_vocabulary: DataFrame,
    *,
    broadcast_listings: bool = True,
    num_files: int | None = None,
    seed: int = 0,
) -> DataFrame:
    """Turn weighted (user_id, listing_id) pairs into indexed training examples with log-Q.

    Returns rows in the ``training_examples`` contract, spread over ``num_files`` partitions in
    random order (``shuffle_into_files``) when it is given. Pairs whose listing is not in the
    vocabulary cannot occur after cleaning (unknown listings are dropped), so the inner join
    loses nothing. ``broadcast_listings`` keeps the pairs where they are (partitioned by user)
    instead of shuffling them by listing; turn it off for catalogues too big to broadcast.
    """
    users = user_vocabulary.select(F.col("id").alias("user_id"), F.col("idx").alias("user_idx"))
    per_listing = listing_vocabulary.select(
        F.col("id").alias("listing_id"), F.col("idx").alias("listing_idx")
    ).join(listing_log_q(weighted), "listing_id")
    pairs = weighted.join(users, "user_id")
    if broadcast_listings and num_files:
        # Shuffle the pairs into their files first and attach the per-listing columns afterwards
        # with a map-side join. The in-file order is drawn after the join, because Spark drops
        # a sort that sits below a join.
        spread = pairs.repartition(num_files, F.rand(seed)).join(
            F.broadcast(per_listing), "listing_id"
        )
        examples = spread.sortWithinPartitions(F.rand(seed + 1))
    else:
        examples = pairs.join(
            F.broadcast(per_listing) if broadcast_listings else per_listing, "listing_id"
        )
        if num_files:
            examples = shuffle_into_files(examples, num_files=num_files, seed=seed)
    return examples.select(*training_examples.SCHEMA.fieldNames())


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


def pair_examples(
    examples: DataFrame, *, max_items_per_user: int, num_files: int, seed: int
) -> DataFrame:
    """Listing-listing training pairs from the training examples: each user's listings in a
    seeded random order, every consecutive two as a pair in both directions (item2vec's "any
    two listings of one user", at a cost linear in the examples instead of quadratic), weight
    the smaller of the two interaction weights, and the partner's log-Q over the pairs.

    A user contributes at most ``max_items_per_user`` listings, the strongest. Rows in the
    ``pair_examples`` contract, spread randomly over ``num_files`` partitions.
    """
    strongest = Window.partitionBy("user_idx").orderBy(F.desc("weight"), "listing_idx")
    shuffled = Window.partitionBy("user_idx").orderBy(
        F.xxhash64("user_idx", "listing_idx", F.lit(seed)), "listing_idx"
    )
    ordered = (
        examples.select("user_idx", "listing_idx", "weight")
        .withColumn("_n", F.row_number().over(strongest))
        .where(F.col("_n") <= max_items_per_user)
        .withColumn("_previous", F.lag("listing_idx").over(shuffled))
        .withColumn("_previous_weight", F.lag("weight").over(shuffled))
        .where(F.col("_previous").isNotNull())
    )
    weight = F.least("weight", "_previous_weight").cast("float").alias("weight")
    forward = ordered.select(
        F.col("_previous").cast("int").alias("context_idx"),
        F.col("listing_idx").cast("int"),
        weight,
    )
    backward = ordered.select(
        F.col("listing_idx").cast("int").alias("context_idx"),
        F.col("_previous").cast("int").alias("listing_idx"),
        weight,
    )
    pairs = forward.unionByName(backward)
    per_listing = pairs.groupBy("listing_idx").agg(F.count(F.lit(1)).alias("_n"))
    total = per_listing.agg(F.sum("_n").alias("_total"))
    log_q = per_listing.crossJoin(total).select(
        "listing_idx", F.log(F.col("_n") / F.col("_total")).cast("float").alias("log_q")
    )
    return shuffle_into_files(
        pairs.join(log_q, "listing_idx"), num_files=num_files, seed=seed
    ).select(*training_examples.PAIR_EXAMPLES_SCHEMA.fieldNames())
