"""Inside Airbnb scrapes (``listings.csv[.gz]`` + ``reviews.csv[.gz]``) -> our input schemas.

A review is the interaction: reviewer ``reviewer_id`` stayed at ``listing_id`` on ``date``.
It becomes one ``contact`` event (a stay is the strongest signal the data has) at noon UTC of
that date. Listing columns keep their own names and are declared in the feature spec
(``feature_spec(feature_set)``, written beside the inputs):

=================  =====================================  ======================================
column             Inside Airbnb                          kind
=================  =====================================  ======================================
listing_id         id
room_type          room_type                              categorical
neighbourhood      neighbourhood_cleansed, else           categorical (Albany: the city wards)
                   neighbourhood
host_id            host_id                                categorical: a host's listings
price              price ("$1,234.00" parsed)             numeric, log
minimum_nights     minimum_nights                         numeric
name               name                                   text (the title)
latitude,          latitude, longitude                    geo
longitude
property_type      property_type                          categorical ("full" only)
accommodates       accommodates                           numeric ("full" only)
bedrooms           bedrooms                               numeric ("full" only)
amenities          amenities (a JSON list)                multi-valued ("full" only)
is_active          listed in the latest scrape
created_date       first_review (if not after the
                   scrape), else null
=================  =====================================  ======================================

Two scrapes of one city make a time split (``interactions_from_scrapes``): reviews written
before the earlier scrape's date are training history, reviews from the later scrape written on
or after it are the holdout; with ``run_date`` = the later scrape's last review date and
``holdout_days`` = the days from the earlier scrape to it, the shard stage's own time split puts
exactly those reviews in the holdout. Listings first seen in the later scrape have no review
before the split, so they are cold start. Feature set ``common`` (default) keeps only the
columns both scrape formats have (the later scrape is a 17-column summary), so warm and cold
listings are described alike; ``full`` also uses property type and guests where present.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from lib.feature_spec import FeatureSpec, from_dict, listings_table_spec
from schemas import TableSpec
from schemas import interactions as interactions_schema
from schemas import listings as listings_schema

FEATURE_SETS = ("common", "full")
_COMMON = [
    {"column": "room_type", "kind": "categorical"},
    {"column": "neighbourhood", "kind": "categorical"},
    {"column": "host_id", "kind": "categorical"},
    {"column": "price", "kind": "numeric", "log": True},
    {"column": "minimum_nights", "kind": "numeric"},
    {"column": "name", "kind": "text"},
    {"kind": "geo"},
]
# Columns a 17-column summary scrape lacks; declared only with feature set "full".
_DETAILED = [
    {"column": "property_type", "kind": "categorical"},
    {"column": "accommodates", "kind": "numeric"},
    {"column": "bedrooms", "kind": "numeric"},
    {"column": "amenities", "kind": "multi_categorical"},
]
_DISPLAY = {
    "common": ["room_type", "neighbourhood", "price", "name"],
    "full": ["room_type", "property_type", "neighbourhood", "price", "accommodates", "name"],
}
EVENT_TYPE = "contact"
SOURCE = "insideairbnb"


def find_file(directory: str, name: str) -> str:
    """``<directory>/<name>.csv.gz`` or ``.csv``; FileNotFoundError naming both otherwise."""
    for suffix in (".csv.gz", ".csv"):
        path = Path(directory) / f"{name}{suffix}"
        if path.exists():
            return str(path)
    raise FileNotFoundError(f"no {name}.csv.gz or {name}.csv in {directory}")


def read_csv(spark: SparkSession, path: str) -> DataFrame:
    """Read an Inside Airbnb CSV as strings (descriptions span lines and contain quotes)."""
    return (
        spark.read.option("header", True)
        .option("multiLine", True)
        .option("escape", '"')
        .option("mode", "PERMISSIVE")
        .csv(path)
    )


def read_scrape(spark: SparkSession, directory: str) -> tuple[DataFrame, DataFrame]:
    """(raw listings, raw reviews) of one scrape folder."""
    return (
        read_csv(spark, find_file(directory, "listings")),
        read_csv(spark, find_file(directory, "reviews")),
    )


def _col(raw: DataFrame, *names: str) -> Column:
    for name in names:
        if name in raw.columns:
            return F.col(name)
    return F.lit(None)


def _number(column: Column) -> Column:
    return F.regexp_replace(column.cast("string"), r"[$,\s]", "").cast("double")


def feature_spec(feature_set: str = "common") -> FeatureSpec:
    """What a rental listing declares; ``full`` adds what only detailed scrapes have."""
    if feature_set not in FEATURE_SETS:
        raise ValueError(f"feature_set must be one of {FEATURE_SETS}, got {feature_set!r}")
    features = _COMMON + (_DETAILED if feature_set == "full" else [])
    return from_dict(
        {"features": features, "display": _DISPLAY[feature_set]}, "Inside Airbnb feature spec"
    )


def listings_spec() -> TableSpec:
    """The listings contract of an import: every mapped column (a common import keeps the
    detailed ones null, so both feature sets write one table shape)."""
    return listings_table_spec(feature_spec("full"))


def _amenities(column: Column) -> Column:
    # '["Wifi", "Kitchen"]' in detailed scrapes; anything else reads as no amenities.
    return F.from_json(column.cast("string"), "array<string>")


def to_listings(raw: DataFrame, *, feature_set: str = "common") -> DataFrame:
    """One scrape's listings in the import's listings contract (``is_active`` True: set it
    afterwards). Rows without a numeric id are dropped (broken CSV lines)."""
    declared = feature_spec(feature_set)
    listing_id = F.regexp_extract(F.col("id").cast("string"), r"^\s*(\d+)\s*$", 1)
    first_review = F.to_date(_col(raw, "first_review"))
    scraped = F.to_date(_col(raw, "last_scraped"))
    columns = {
        "listing_id": listing_id,
        "is_active": F.lit(True),
        "latitude": _number(_col(raw, "latitude")),
        "longitude": _number(_col(raw, "longitude")),
        "created_date": F.when(scraped.isNull() | (first_review <= scraped), first_review),
        "room_type": _col(raw, "room_type"),
        "neighbourhood": _col(raw, "neighbourhood_cleansed", "neighbourhood"),
        "host_id": _col(raw, "host_id").cast("string"),
        "price": _number(_col(raw, "price")),
        "minimum_nights": _number(_col(raw, "minimum_nights")),
        "name": _col(raw, "name"),
        "property_type": _col(raw, "property_type"),
        "accommodates": _number(_col(raw, "accommodates")),
        "bedrooms": _number(_col(raw, "bedrooms")),
        "amenities": _amenities(_col(raw, "amenities")),
    }
    used = {f.column for f in declared.features}
    fields = listings_spec().schema.fields
    return (
        raw.select(
            *[
                (
                    columns[f.name]
                    if f.name in used or f.name in listings_schema.SCHEMA.fieldNames()
                    else F.lit(None)
                )
                .cast(f.dataType)
                .alias(f.name)
                for f in fields
            ]
        )
        .where(F.col("listing_id") != "")
        .dropDuplicates(["listing_id"])
    )


def combine_snapshots(earlier: DataFrame, later: DataFrame | None) -> DataFrame:
    """One listing snapshot from two scrapes of the same city.

    A listing in the earlier scrape keeps the features it had then (what training saw); one
    first seen in the later scrape brings its own. ``is_active`` means listed in the later
    scrape: listings that disappeared stay in the snapshot so their history still trains.
    """
    if later is None:
        return earlier
    names = earlier.columns
    later_ids = later.select("listing_id", F.lit(True).alias("_listed"))
    kept = (
        earlier.drop("is_active")
        .join(later_ids, "listing_id", "left")
        .select(
            *[
                F.coalesce(F.col("_listed"), F.lit(False)).alias("is_active")
                if c == "is_active"
                else F.col(c)
                for c in names
            ]
        )
    )
    new = later.join(earlier.select("listing_id"), "listing_id", "left_anti")
    return kept.unionByName(new.select(*names))


def to_interactions(reviews: DataFrame) -> DataFrame:
    """Reviews -> interaction events (one ``contact`` per review, at noon UTC of its date)."""
    day = F.to_date(F.col("date"))
    return (
        reviews.where(
            day.isNotNull() & F.col("reviewer_id").isNotNull() & F.col("listing_id").isNotNull()
        )
        .select(
            F.trim(F.col("reviewer_id").cast("string")).alias("user_id"),
            F.trim(F.col("listing_id").cast("string")).alias("listing_id"),
            F.lit(EVENT_TYPE).alias("event_type"),
            (F.to_timestamp(day) + F.expr("INTERVAL 12 HOURS")).alias("event_ts"),
            F.lit(None).cast("string").alias("session_id"),
            F.lit(SOURCE).alias("source"),
            day.alias("event_date"),
        )
        .select(*interactions_schema.SCHEMA.fieldNames())
    )


def interactions_from_scrapes(
    earlier_reviews: DataFrame, later_reviews: DataFrame | None, *, split_date: dt.date | None
) -> DataFrame:
    """Training history before ``split_date`` from the earlier scrape, holdout from the later.

    Only what was known at the earlier scrape trains: the later scrape's reviews dated before
    the split are ignored (some were deleted or added since; none may leak in). Without a later
    scrape (or split date) every review of the one scrape is history.
    """
    if later_reviews is None or split_date is None:
        return to_interactions(earlier_reviews)
    before = to_interactions(earlier_reviews).where(F.col("event_date") < F.lit(split_date))
    after = to_interactions(later_reviews).where(F.col("event_date") >= F.lit(split_date))
    return before.unionByName(after)


def split_date(reviews: DataFrame) -> dt.date:
    """The day after a scrape's last review: what the scrape knew ends there.

    Runs one small Spark aggregation. (``last_scraped`` spans several days in one scrape, and
    reviews published in between would then fall in neither training nor holdout.)
    """
    last_review = reviews.agg(F.max(F.to_date("date"))).first()[0]
    if last_review is None:
        raise ValueError("the scrape has no dated reviews")
    return last_review + dt.timedelta(days=1)


def shard_window(events: DataFrame, *, split_date: dt.date | None) -> dict[str, object]:
    """The shard-stage flags that train on everything before ``split_date`` and hold out the rest.

    Runs one Spark aggregation. ``run_date`` is the last event day; without a split the holdout
    is the last day only.
    """
    first, last = events.agg(F.min("event_date"), F.max("event_date")).first()
    if last is None:
        raise ValueError("no reviews to import")
    holdout_days = (last - split_date).days + 1 if split_date else 1
    return {
        "run_date": last.isoformat(),
        "lookback_days": (last - first).days + 1,
        "holdout_days": max(1, holdout_days),
    }
