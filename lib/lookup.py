"""Reading neighbours back with the listings' features: what a person checks a result with."""

from __future__ import annotations

from collections.abc import Sequence

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

_EARTH_RADIUS_KM = 6371.0


def haversine_km(lat1: Column, lon1: Column, lat2: Column, lon2: Column) -> Column:
    """Great-circle distance in km between two coordinate columns."""
    dlat = F.radians(lat2 - lat1)
    dlon = F.radians(lon2 - lon1)
    a = (
        F.sin(dlat / 2) ** 2
        + F.cos(F.radians(lat1)) * F.cos(F.radians(lat2)) * F.sin(dlon / 2) ** 2
    )
    return F.lit(2 * _EARTH_RADIUS_KM) * F.asin(F.sqrt(a))


def neighbours_with_features(
    neighbours: DataFrame, listings: DataFrame, shown: Sequence[str]
) -> DataFrame:
    """Attach both sides' ``shown`` columns and the distance between them to neighbour rows.

    Columns: listing_id, rank, neighbour_id, score, distance_km (null without coordinates),
    then ``<column>`` for the query listing and ``n_<column>`` for the neighbour.
    """
    shown = [c for c in shown if c in listings.columns]
    query = listings.select(
        "listing_id", *shown, F.col("latitude").alias("_lat"), F.col("longitude").alias("_lon")
    )
    neighbour = listings.select(
        F.col("listing_id").alias("neighbour_id"),
        *[F.col(c).alias(f"n_{c}") for c in shown],
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
        *shown,
        *[f"n_{c}" for c in shown],
    )


def format_value(value) -> str:
    if value is None:
        return "?"
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # a year or a count read as a double: shown as the whole number
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}" if abs(value) >= 10_000 else str(value)
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value[:5]) + (" …" if len(value) > 5 else "")
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "…"


def describe(row, shown: Sequence[str], prefix: str = "") -> str:
    """One line for a listing: its shown columns, ``name value`` separated by `` · ``."""
    fields = row.asDict() if hasattr(row, "asDict") else dict(row)
    parts = [
        f"{name} {format_value(fields[prefix + name])}" for name in shown if prefix + name in fields
    ]
    return " · ".join(parts) or "(no features)"
