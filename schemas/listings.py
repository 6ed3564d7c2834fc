"""Listing feature snapshot: one row per listing, active or not, as of the run date.

The columns are a used-car marketplace's, but the model only needs: an id, categorical
columns, numeric columns and coordinates. Another marketplace maps its own fields onto these
(an unused categorical can be null everywhere; it then falls into the unknown bucket).
"""

from pyspark.sql.types import (
    BooleanType,
    DateType,
    DoubleType,
    IntegerType,
    StringType,
    StructField,
    StructType,
)

from schemas._spec import TableSpec

CATEGORICAL_FEATURES = ("make", "model", "body_type", "fuel_type", "transmission", "colour")
NUMERIC_FEATURES = ("year", "mileage_km", "price_eur", "power_kw")
GEO_FEATURES = ("latitude", "longitude")

SCHEMA = StructType(
    [
        StructField("listing_id", StringType(), nullable=False),
        StructField("make", StringType(), nullable=True),
        StructField("model", StringType(), nullable=True),
        StructField("body_type", StringType(), nullable=True),
        StructField("fuel_type", StringType(), nullable=True),
        StructField("transmission", StringType(), nullable=True),
        StructField("colour", StringType(), nullable=True),
        StructField("year", IntegerType(), nullable=True),
        StructField("mileage_km", IntegerType(), nullable=True),
        StructField("price_eur", DoubleType(), nullable=True),
        StructField("power_kw", IntegerType(), nullable=True),
        StructField("latitude", DoubleType(), nullable=True),
        StructField("longitude", DoubleType(), nullable=True),
        StructField("city", StringType(), nullable=True),
        StructField("dealer_id", StringType(), nullable=True),
        StructField("is_active", BooleanType(), nullable=False),
        StructField("created_date", DateType(), nullable=True),
    ]
)

SPEC = TableSpec(
    name="listings",
    schema=SCHEMA,
    key=("listing_id",),
    required=("listing_id", "is_active"),
)
