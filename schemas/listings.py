"""Listing feature snapshot: one row per listing, active or not, as of the run date.

The contract fixes only what every marketplace has: an id, whether the listing is live, and
optionally its coordinates and creation date. Feature columns are the marketplace's own,
declared in a feature spec (``lib.feature_spec``); ``spec_with`` adds them to the contract.
"""

from collections.abc import Mapping

from pyspark.sql.types import (
    BooleanType,
    DataType,
    DateType,
    DoubleType,
    StringType,
    StructField,
    StructType,
)

from schemas._spec import TableSpec

SCHEMA = StructType(
    [
        StructField("listing_id", StringType(), nullable=False),
        StructField("is_active", BooleanType(), nullable=False),
        StructField("latitude", DoubleType(), nullable=True),
        StructField("longitude", DoubleType(), nullable=True),
        StructField("created_date", DateType(), nullable=True),
    ]
)

SPEC = TableSpec(
    name="listings",
    schema=SCHEMA,
    key=("listing_id",),
    required=("listing_id", "is_active"),
)


def spec_with(feature_columns: Mapping[str, DataType]) -> TableSpec:
    """The contract plus a marketplace's declared feature columns (nullable: a missing value
    falls into the feature's unknown code)."""
    extra = [
        StructField(name, data_type, nullable=True)
        for name, data_type in feature_columns.items()
        if name not in SCHEMA.fieldNames()
    ]
    return TableSpec(
        name=SPEC.name,
        schema=StructType([*SCHEMA.fields, *extra]),
        key=SPEC.key,
        required=SPEC.required,
    )
