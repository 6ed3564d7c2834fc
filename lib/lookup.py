"""Reading neighbours back with the listings' features: what a person checks a result with."""

from __future__ import annotations

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

_EARTH_RADIUS_KM = 6371.0
_SHOWN = ("make", "model", "body_type", "price_eur", "year", "mileage_km", "city")


def haversine_km(lat1: Column, lon1: Column, lat2: Column, lon2: Column) -> Column:
    """Great-circle distance in km between two coordinate columns."""
    dlat = F.radians(lat2 - lat1)
    dlon = F.radians(lon2 - lon1)
    a = (
        F.sin(dlat / 2) ** 2
        + F.cos(F.radians(lat1)) * F.cos(F.radians(lat2)) * F.sin(dlon / 2) ** 2
    )
    return F.lit(2 * _EARTH_RADIUS_KM) * F.asin(F.sqrt(a))


def neighbours_with_features(neighbours: DataFrame, listings: DataFrame) -> DataFrame:
    """Attach both sides' features and the distance between them to neighbour rows.

    Columns: listing_id, rank, neighbour_id, score, distance_km, then ``<feature>`` for the
    query listing and ``n_<feature>`` for the neighbour.
    """
    query = listings.select(
        "listing_id", *_SHOWN, F.col("latitude").alias("_lat"), F.col("longitude").alias("_lon")
    )
    neighbour = listings.select(
        F.col("listing_id").alias("neighbour_id"),
        *[F.col(c).alias(f"n_{c}") for c in _SHOWN],
        F.col("latitude").alias("_n_lat"),
        F.col("longitude").alias("_n_lon"),
    )
    joined = neighbours.join(query, "listing_id", "left").join(neighbour, "neighbour_id", "left")
    return joined.select(
        "listing_id",
        "rank",
        "neighbour_id",
        "score",
        haversine_km(F.col("_lat"), F.col("_lon"), F.col("_n_lat"), F.col("_n_lon")).alias(
            "distance_km"
        ),
        *_SHOWN,
        *[f"n_{c}" for c in _SHOWN],
    )


def describe(row, prefix: str = "") -> str:
    """One line for a listing: make model, year, km, price, city."""

    def get(name):
        return row[f"{prefix}{name}"]

    price = f"{get('price_eur'):,.0f} EUR" if get("price_eur") is not None else "price n/a"
    km = f"{get('mileage_km'):,} km" if get("mileage_km") is not None else ""
    return (
        f"{get('make') or '?'} {get('model') or ''} ({get('body_type') or '?'}, {get('year') or '?'}"
        f", {km}) {price}, {get('city') or '?'}"
    )
