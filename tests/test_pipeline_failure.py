"""A run that fails leaves the published tables as they were and records the failure."""

import datetime as dt

import pytest

from jobs import pipeline
from lib import delta_io
from lib.paths import Layout
from lib.schema_check import SchemaError
from schemas import listing_neighbours, runs


def test_failed_run_is_recorded_and_publishes_nothing(spark, tmp_path):
    layout = Layout(str(tmp_path))
    # Yesterday's published neighbours, which a failed run must not touch.
    published = spark.createDataFrame(
        [("m0", "L1", "L2", 1, 0.9, dt.date(2026, 11, 19))], listing_neighbours.SCHEMA
    )
    delta_io.write_table(published, layout.table("listing_neighbours"), listing_neighbours.SPEC)
    # Tonight's listing snapshot lacks a required column.
    spark.createDataFrame([("L1",)], "listing_id string").write.parquet(layout.listings)
    spark.createDataFrame(
        [("u1", "L1", "view", dt.datetime(2026, 11, 20, 9), "s", "web", dt.date(2026, 11, 20))],
        "user_id string, listing_id string, event_type string, event_ts timestamp, "
        "session_id string, source string, event_date date",
    ).write.partitionBy("event_date").parquet(layout.interactions)

    with pytest.raises(SchemaError, match=r"listings.*is_active"):
        pipeline.run(
            spark, pipeline.parse_args(["--root", str(tmp_path), "--run-date", "2026-11-20"])
        )

    assert delta_io.latest_version(layout.table("listing_neighbours")) == 0
    recorded = delta_io.read_table(spark, layout.table("runs"), runs.SPEC).collect()
    assert len(recorded) == 1
    assert recorded[0].status == "failed"
    assert "is_active" in recorded[0].error
    assert not delta_io.table_exists(layout.table("listing_embeddings"))
