"""Inside Airbnb scrapes (``listings.csv[.gz]`` + ``reviews.csv[.gz]``) -> our input schemas.

A review is the interaction: reviewer ``reviewer_id`` stayed at ``listing_id`` on ``date``.
It becomes one ``contact`` event (a stay is the strongest signal the data has) at noon UTC of
that date. Listing columns map onto the general listing schema (``schemas/listings.py``):

=================  =====================================  ======================================
ours               Inside Airbnb                          notes
=================  =====================================  ======================================
listing_id         id
make               room_type                              Entire home/apt, Private room, ...
model              host_id                                "host:<id>"; a host's listings are
                                                          its product line
body_type          property_type                          detailed scrapes only ("full" set)
fuel_type,         (none)                                 null: the unknown bucket
transmission,
colour, year
mileage_km         minimum_nights                         short stays vs monthly lets
price_eur          price                                  the scrape's currency ($ for the US),
                                                          "$1,234.00" parsed
power_kw           accommodates                           guests; detailed scrapes only ("full")
latitude,          latitude, longitude
longitude
city               neighbourhood_cleansed, else           Albany: the city wards
                   neighbourhood
dealer_id          host_id
is_active          listed in the latest scrape
created_date       first_review (if not after the
                   scrape), else null
=================  =====================================  ======================================

``bedrooms``, ``beds``, ``bathrooms`` and amenities have no column of their own in the schema.

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

from schemas import interactions as interactions_schema
from schemas import listings as listings_schema

FEATURE_SETS = ("common", "full")
# Columns a 17-column summary scrape lacks; used only with feature set "full".
_DETAILED_ONLY = ("body_type", "power_kw")
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


def to_listings(raw: DataFrame, *, feature_set: str = "common") -> DataFrame:
    """One scrape's listings in our listing schema (``is_active`` True: set it afterwards).

    Rows without a numeric id are dropped (broken CSV lines).
    """
    if feature_set not in FEATURE_SETS:
        raise ValueError(f"feature_set must be one of {FEATURE_SETS}, got {feature_set!r}")
    listing_id = F.regexp_extract(F.col("id").cast("string"), r"^\s*(\d+)\s*$", 1)
    host = _col(raw, "host_id").cast("string")
    first_review = F.to_date(_col(raw, "first_review"))
    scraped = F.to_date(_col(raw, "last_scraped"))
    columns = {
        "listing_id": listing_id,
        "make": _col(raw, "room_type"),
        "model": F.when(host.isNotNull(), F.concat(F.lit("host:"), host)),
        "body_type": _col(raw, "property_type"),
        "fuel_type": F.lit(None),
        "transmission": F.lit(None),
        "colour": F.lit(None),
        "year": F.lit(None),
        "mileage_km": _number(_col(raw, "minimum_nights")),
        "price_eur": _number(_col(raw, "price")),
        "power_kw": _number(_col(raw, "accommodates")),
        "latitude": _number(_col(raw, "latitude")),
        "longitude": _number(_col(raw, "longitude")),
        "city": _col(raw, "neighbourhood_cleansed", "neighbourhood"),
        "dealer_id": host,
        "is_active": F.lit(True),
        "created_date": F.when(scraped.isNull() | (first_review <= scraped), first_review),
    }
    if feature_set == "common":
        columns.update({c: F.lit(None) for c in _DETAILED_ONLY})
    fields = listings_schema.SCHEMA.fields
    return (
        raw.select(*[columns[f.name].cast(f.dataType).alias(f.name) for f in fields])
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
    later_ids = later.select("listing_id", F.lit(True).alias("_listed"))
    kept = (
        earlier.drop("is_active")
        .join(later_ids, "listing_id", "left")
        .select(
            *[
                F.coalesce(F.col("_listed"), F.lit(False)).alias("is_active")
                if c == "is_active"
                else F.col(c)
                for c in listings_schema.SCHEMA.fieldNames()
            ]
        )
    )
    new = later.join(earlier.select("listing_id"), "listing_id", "left_anti")
    return kept.unionByName(new.select(*listings_schema.SCHEMA.fieldNames()))


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
