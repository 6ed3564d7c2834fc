"""Any marketplace's plain files (CSV or Parquet) -> the pipeline's inputs.

An interactions file with a user, an item and a timestamp column (optionally an event type and
a session), and an items file with an item id and whatever feature columns the spec declares.
The transforms here rename and type the columns into the ``interactions`` and ``listings``
contracts; ``jobs/import_files.py`` reads and writes.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from lib.feature_spec import FeatureSpec
from lib.schema_check import UNPARSEABLE, SchemaError
from schemas import interactions as interactions_schema
from schemas import listings as listings_schema

SOURCE = "import"


@dataclass(frozen=True)
class InteractionColumns:
    """Which columns of the interactions file hold what."""

    user: str
    item: str
    timestamp: str
    event_type: str | None = None
    session: str | None = None
    # Source event type -> one of the pipeline's (view, save, contact); others pass unchanged
    # and the shard stage drops and counts them.
    event_types: tuple[tuple[str, str], ...] = ()
    default_event_type: str = "view"


@dataclass(frozen=True)
class ItemColumns:
    item: str
    active: str | None = None
    latitude: str | None = None
    longitude: str | None = None
    created: str | None = None


def require_columns(df: DataFrame, table: str, wanted: Sequence[str | None]) -> None:
    missing = [c for c in wanted if c and c not in df.columns]
    if missing:
        raise SchemaError(
            table, ", ".join(missing), f"no such column (have: {', '.join(df.columns)})"
        )


def _timestamp(df: DataFrame, table: str, column: str) -> Column:
    data_type = df.schema[column].dataType.simpleString()
    raw = F.col(column)
    if data_type.startswith("timestamp"):
        return raw.cast("timestamp")
    if data_type == "date":
        return raw.cast("timestamp")
    if data_type in ("bigint", "int", "double"):
        # Epoch seconds, or milliseconds when the values are that large.
        seconds = F.when(F.abs(raw) > 100_000_000_000, raw / 1000).otherwise(raw)
        return F.timestamp_seconds(seconds.cast("double"))
    if data_type != "string":
        raise SchemaError(table, column, f"type {data_type} is not a timestamp")
    parsed = F.try_to_timestamp(raw)
    message = F.concat(
        F.lit(f"table '{table}', column '{column}': {UNPARSEABLE} '"), raw, F.lit("'")
    )
    return F.when(raw.isNotNull() & parsed.isNull(), F.raise_error(message)).otherwise(parsed)


def to_interactions(raw: DataFrame, columns: InteractionColumns) -> DataFrame:
    """The interactions contract: ids as text, the event type mapped, the event date derived.

    Rows without a user, an item or a time are kept: the shard stage drops and counts them.
    """
    table = interactions_schema.SPEC.name
    require_columns(
        raw,
        table,
        [columns.user, columns.item, columns.timestamp, columns.event_type, columns.session],
    )
    ts = _timestamp(raw, table, columns.timestamp)
    if columns.event_type:
        event = F.col(columns.event_type).cast("string")
        for source, target in columns.event_types:
            event = F.when(
                F.col(columns.event_type).cast("string") == source, F.lit(target)
            ).otherwise(event)
    else:
        event = F.lit(columns.default_event_type)
    session = F.col(columns.session).cast("string") if columns.session else F.lit(None)
    return raw.select(
        F.trim(F.col(columns.user).cast("string")).alias("user_id"),
        F.trim(F.col(columns.item).cast("string")).alias("listing_id"),
        event.alias("event_type"),
        ts.alias("event_ts"),
        session.cast("string").alias("session_id"),
        F.lit(SOURCE).alias("source"),
        F.to_date(ts).alias("event_date"),
    ).select(*interactions_schema.SCHEMA.fieldNames())


_KEYS = {"user": "user_id", "item": "listing_id", "timestamp": "event_ts"}


def has_keys() -> Column:
    return (
        F.col("user_id").isNotNull()
        & F.col("listing_id").isNotNull()
        & F.col("event_ts").isNotNull()
    )


def missing_key_counts(events: DataFrame) -> dict[str, int]:
    """Rows without a user, an item or a time, per missing key (one Spark aggregation)."""
    row = events.agg(
        *[F.sum(F.col(c).isNull().cast("long")).alias(name) for name, c in _KEYS.items()]
    ).first()
    return {f"missing_{name}": int(row[name] or 0) for name in _KEYS}


def to_listings(raw: DataFrame, columns: ItemColumns, spec: FeatureSpec) -> DataFrame:
    """The listings contract plus the spec's columns (typed as their kinds need)."""
    table = listings_schema.SPEC.name
    declared = spec.snapshot_columns()
    require_columns(
        raw,
        table,
        [
            columns.item,
            columns.active,
            columns.latitude,
            columns.longitude,
            columns.created,
            *declared,
        ],
    )
    if spec.geo and not (columns.latitude and columns.longitude):
        raise SchemaError(
            table, "latitude, longitude", "geo declared: give --latitude and --longitude"
        )

    def optional(name: str | None, data_type: str) -> Column:
        return F.col(name).cast(data_type) if name else F.lit(None).cast(data_type)

    active = (
        F.coalesce(F.col(columns.active).cast("boolean"), F.lit(False))
        if columns.active
        else F.lit(True)
    )
    features = []
    for name, data_type in declared.items():
        have = raw.schema[name].dataType.simpleString()
        want = data_type.simpleString()
        if want == "double" and have == "string":
            # CSV numbers read as text: parse them, refusing values that are not numbers.
            parsed = F.col(name).try_cast("double")
            message = F.concat(
                F.lit(f"table '{table}', column '{name}': {UNPARSEABLE} '"), F.col(name), F.lit("'")
            )
            value = F.when(
                F.col(name).isNotNull() & (F.trim(F.col(name)) != "") & parsed.isNull(),
                F.raise_error(message),
            ).otherwise(parsed)
        else:
            value = F.col(name).cast(data_type)
        features.append(value.alias(name))
    return raw.select(
        F.trim(F.col(columns.item).cast("string")).alias("listing_id"),
        active.alias("is_active"),
        optional(columns.latitude, "double").alias("latitude"),
        optional(columns.longitude, "double").alias("longitude"),
        optional(columns.created, "date").alias("created_date"),
        *features,
    )


def shard_window(
    events: DataFrame, *, holdout_share: float, min_holdout_days: int = 1
) -> dict[str, object]:
    """Shard flags for an imported history: the last ``holdout_share`` of the events (by time)
    held out, as many days before it for validation, everything before that for training, and
    a bot ceiling above what the people of this log do in a day.

    Runs two Spark aggregations.
    """
    epoch = F.unix_timestamp("event_ts").cast("double")
    first, last = events.agg(F.min("event_date"), F.max("event_date")).first()
    if last is None:
        raise ValueError("no interactions to import")
    cut = events.select(epoch.alias("t")).approxQuantile("t", [1.0 - holdout_share], 0.001)[0]
    cut_day = dt.datetime.fromtimestamp(cut, dt.UTC).date()
    holdout_days = max(min_holdout_days, (last - cut_day).days + 1)
    per_day = events.where(F.col("user_id").isNotNull()).groupBy("user_id", "event_date").count()
    busiest = per_day.approxQuantile("count", [0.999], 0.001)[0]
    return {
        "run_date": last.isoformat(),
        "lookback_days": (last - first).days + 1,
        "holdout_days": holdout_days,
        "validation_days": holdout_days,
        # Twice the 99.9th percentile of events per user-day: a ceiling for bots, not buyers.
        "max_events_per_user_day": max(300, int(2 * busiest)),
    }


def parse_mapping(text: str) -> tuple[tuple[str, str], ...]:
    """``purchase=contact,cart=save`` -> pairs; targets must be the pipeline's event types."""
    pairs = []
    for item in filter(None, (p.strip() for p in text.split(","))):
        source, _, target = item.partition("=")
        if target not in interactions_schema.EVENT_TYPES:
            raise ValueError(
                f"event type mapping {item!r}: the target must be one of "
                f"{', '.join(interactions_schema.EVENT_TYPES)}"
            )
        pairs.append((source, target))
    return tuple(pairs)
