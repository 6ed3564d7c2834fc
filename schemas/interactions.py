"""Raw interaction log: one row per user event on a listing, partitioned by event_date."""

from pyspark.sql.types import DateType, StringType, StructField, StructType, TimestampType

from schemas._spec import TableSpec

# Event types the pipeline knows how to weight; anything else is dropped and counted.
EVENT_TYPES = ("view", "save", "contact")

SCHEMA = StructType(
    [
        StructField("user_id", StringType(), nullable=False),
        StructField("listing_id", StringType(), nullable=False),
        StructField("event_type", StringType(), nullable=False),
        StructField("event_ts", TimestampType(), nullable=False),
        StructField("session_id", StringType(), nullable=True),
        # Free-form origin of the event (web, app, ...); kept for debugging, unused by the model.
        StructField("source", StringType(), nullable=True),
        StructField("event_date", DateType(), nullable=False),
    ]
)

SPEC = TableSpec(
    name="interactions",
    schema=SCHEMA,
    partition_by=("event_date",),
    key=("user_id", "listing_id", "event_type", "event_ts"),
    required=("user_id", "listing_id", "event_type", "event_ts"),
)
