"""Published table: one embedding per active listing per run."""

from pyspark.sql.types import (
    ArrayType,
    BooleanType,
    DateType,
    FloatType,
    StringType,
    StructField,
    StructType,
)

from schemas._spec import TableSpec

SCHEMA = StructType(
    [
        StructField("listing_id", StringType(), nullable=False),
        StructField("embedding", ArrayType(FloatType(), containsNull=False), nullable=False),
        StructField("model_version", StringType(), nullable=False),
        StructField("is_cold_start", BooleanType(), nullable=False),
        StructField("run_date", DateType(), nullable=False),
    ]
)

SPEC = TableSpec(
    name="listing_embeddings",
    schema=SCHEMA,
    partition_by=("run_date",),
    key=("run_date", "listing_id"),
    required=("listing_id", "embedding", "model_version", "run_date"),
)
