"""Published table: the top-k most similar active listings of every active listing, per run."""

from pyspark.sql.types import (
    DateType,
    FloatType,
    IntegerType,
    StringType,
    StructField,
    StructType,
)

from schemas._spec import TableSpec

SCHEMA = StructType(
    [
        StructField("model_version", StringType(), nullable=False),
        StructField("listing_id", StringType(), nullable=False),
        StructField("neighbour_id", StringType(), nullable=False),
        StructField("rank", IntegerType(), nullable=False),
        StructField("score", FloatType(), nullable=False),
        StructField("run_date", DateType(), nullable=False),
    ]
)

SPEC = TableSpec(
    name="listing_neighbours",
    schema=SCHEMA,
    partition_by=("run_date",),
    key=("run_date", "listing_id", "rank"),
    required=("listing_id", "neighbour_id", "rank", "score", "run_date"),
)
