"""Published table: one row per pipeline run (what the on-call engineer reads each morning)."""

from pyspark.sql.types import (
    DateType,
    DoubleType,
    LongType,
    MapType,
    StringType,
    StructField,
    StructType,
    TimestampType,
)

from schemas._spec import TableSpec

SCHEMA = StructType(
    [
        StructField("run_id", StringType(), nullable=False),
        StructField("run_date", DateType(), nullable=False),
        StructField("model_version", StringType(), nullable=True),
        StructField("status", StringType(), nullable=False),
        StructField("started_at", TimestampType(), nullable=False),
        StructField("finished_at", TimestampType(), nullable=False),
        # Versions of the inputs this run read (Delta version or file fingerprint).
        StructField("input_versions", MapType(StringType(), StringType()), nullable=True),
        StructField("counts", MapType(StringType(), LongType()), nullable=True),
        StructField("stage_seconds", MapType(StringType(), DoubleType()), nullable=True),
        StructField("metrics", MapType(StringType(), DoubleType()), nullable=True),
        StructField("parameters", MapType(StringType(), StringType()), nullable=True),
        StructField("error", StringType(), nullable=True),
    ]
)

SPEC = TableSpec(name="runs", schema=SCHEMA, key=("run_id",), required=("run_id", "run_date"))
