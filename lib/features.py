"""Listing feature encoding shared by training and inference.

``fit_feature_encoding`` learns small statistics from the listing snapshot (runs two Spark
aggregations and returns a JSON-able dict, saved with the shards and inside the model artifact);
``encode_listing_features`` is the pure transform that applies them.
"""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from schemas import listings as listings_schema
from schemas import training_examples

ENCODING_VERSION = 1
# Bucketised numeric features: (code column, source column expression name).
_BUCKETISED = {
    "year_bucket": "year",
    "mileage_bucket": "mileage_km",
    "price_bucket": "price_eur",
    "power_bucket": "power_kw",
}


def _geo_cell_key(cell_degrees: float) -> Column:
    # Cells of equal degrees: ~55 km × 35 km at 0.5° in Germany, coarse enough that a cell has
    # many listings and fine enough that two listings in one cell are a short drive apart.
    row = F.floor(F.col("latitude") / cell_degrees).cast("long")
    col = F.floor(F.col("longitude") / cell_degrees).cast("long")
    return F.when(
        F.col("latitude").isNotNull() & F.col("longitude").isNotNull(),
        F.concat_ws(":", row.cast("string"), col.cast("string")),
    )


def _age_years(run_date: dt.date) -> Column:
    return F.lit(run_date.year) - F.col("year")


def fit_feature_encoding(
    listings: DataFrame,
    *,
    run_date: dt.date,
    num_buckets: int = 16,
    geo_cell_degrees: float = 0.5,
    max_vocabulary: int = 50_000,
) -> dict[str, Any]:
    """Learn categorical vocabularies, quantile buckets and normalisation statistics.

    Runs Spark jobs (two aggregations and an approximate quantile pass) and returns a small dict.
    Category codes start at 1 in descending frequency; 0 is the unknown / out-of-vocabulary bucket.
    """
    with_cell = listings.withColumn("_geo_cell", _geo_cell_key(geo_cell_degrees))
    categorical_columns = [*listings_schema.CATEGORICAL_FEATURES, "_geo_cell"]
    stacked = with_cell.select(
        F.explode(
            F.array(
                *[
                    F.struct(F.lit(c).alias("feature"), F.col(c).cast("string").alias("value"))
                    for c in categorical_columns
                ]
            )
        ).alias("kv")
    ).select("kv.feature", "kv.value")
    counts = stacked.where(F.col("value").isNotNull()).groupBy("feature", "value").count().collect()
    vocabularies: dict[str, list[str]] = {c: [] for c in categorical_columns}
    for row in sorted(counts, key=lambda r: (r["feature"], -r["count"], r["value"])):
        if len(vocabularies[row["feature"]]) < max_vocabulary:
            vocabularies[row["feature"]].append(row["value"])

    probabilities = [i / num_buckets for i in range(1, num_buckets)]
    boundaries = with_cell.approxQuantile(list(_BUCKETISED.values()), probabilities, 0.001)
    dense = with_cell.select(
        F.col("latitude"),
        F.col("longitude"),
        F.log1p(F.col("price_eur")).alias("log_price"),
        F.col("mileage_km").cast("double").alias("mileage"),
        _age_years(run_date).cast("double").alias("age"),
    )
    stats_row = dense.agg(
        *[F.mean(c).alias(f"{c}_mean") for c in dense.columns],
        *[F.stddev_pop(c).alias(f"{c}_std") for c in dense.columns],
    ).first()
    normalisation = {
        c: {
            "mean": float(stats_row[f"{c}_mean"] or 0.0),
            "std": float(stats_row[f"{c}_std"] or 1.0) or 1.0,
        }
        for c in dense.columns
    }
    return {
        "version": ENCODING_VERSION,
        "reference_year": run_date.year,
        "geo_cell_degrees": geo_cell_degrees,
        "vocabularies": {
            ("geo_cell" if c == "_geo_cell" else c): v for c, v in vocabularies.items()
        },
        # Distinct boundaries only: a quantile repeated (many listings at one price) is one cut.
        "buckets": {code: sorted(set(b)) for code, b in zip(_BUCKETISED, boundaries, strict=True)},
        "normalisation": normalisation,
    }


def cardinalities(encoding: dict[str, Any]) -> dict[str, int]:
    """Number of codes per categorical feature column, unknown bucket (0) included."""
    sizes = {
        f"{c}_code": len(v) + 1 for c, v in encoding["vocabularies"].items() if c != "geo_cell"
    }
    sizes["geo_cell"] = len(encoding["vocabularies"]["geo_cell"]) + 1
    for code, bounds in encoding["buckets"].items():
        sizes[code] = len(bounds) + 2  # 0 = missing, 1..len+1 = intervals
    return {c: sizes[c] for c in training_examples.CATEGORICAL_CODES}


def _lookup(column: Column, vocabulary: list[str]) -> Column:
    if not vocabulary:
        return F.lit(0)
    mapping = F.create_map(
        *[x for i, v in enumerate(vocabulary, start=1) for x in (F.lit(v), F.lit(i))]
    )
    return F.coalesce(mapping[column.cast("string")], F.lit(0))


def _bucket(column: Column, bounds: list[float]) -> Column:
    index = F.lit(1)
    for bound in bounds:
        index = index + F.when(column >= F.lit(bound), 1).otherwise(0)
    return F.when(column.isNull(), F.lit(0)).otherwise(index)


def _normalised(column: Column, stats: dict[str, float]) -> Column:
    std = stats["std"] if stats["std"] and math.isfinite(stats["std"]) else 1.0
    return F.coalesce((column - F.lit(stats["mean"])) / F.lit(std), F.lit(0.0))


def encode_listing_features(
    listings: DataFrame, listing_vocabulary: DataFrame, encoding: dict[str, Any]
) -> DataFrame:
    """Encode every listing of the snapshot into the ``listing_features`` contract.

    ``has_interactions`` is left False here; ``mark_listings_with_interactions`` sets it once the
    training examples exist.
    """
    vocabularies = encoding["vocabularies"]
    buckets = encoding["buckets"]
    norm = encoding["normalisation"]
    codes = {
        f"{c}_code": _lookup(F.col(c), vocabularies[c])
        for c in listings_schema.CATEGORICAL_FEATURES
    }
    codes["geo_cell"] = _lookup(
        _geo_cell_key(encoding["geo_cell_degrees"]), vocabularies["geo_cell"]
    )
    for code, source in _BUCKETISED.items():
        codes[code] = _bucket(F.col(source).cast("double"), buckets[code])
    age = F.lit(encoding["reference_year"]) - F.col("year")
    dense = {
        "lat_norm": _normalised(F.col("latitude"), norm["latitude"]),
        "lon_norm": _normalised(F.col("longitude"), norm["longitude"]),
        "log_price_norm": _normalised(F.log1p(F.col("price_eur")), norm["log_price"]),
        "mileage_norm": _normalised(F.col("mileage_km").cast("double"), norm["mileage"]),
        "age_norm": _normalised(age.cast("double"), norm["age"]),
    }
    vocab = listing_vocabulary.select(
        F.col("id").alias("listing_id"), F.col("idx").alias("listing_idx")
    )
    return listings.join(vocab, "listing_id").select(
        F.col("listing_idx").cast("int"),
        "listing_id",
        "is_active",
        F.lit(False).alias("has_interactions"),
        *[codes[c].cast("int").alias(c) for c in training_examples.CATEGORICAL_CODES],
        *[dense[c].cast("float").alias(c) for c in training_examples.DENSE_FEATURES],
    )
