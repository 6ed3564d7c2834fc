"""A catalogue of ids only (a click log): the whole nightly job still runs and publishes."""

import datetime as dt
import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from pyspark.sql import functions as F

from jobs import generate_sample_data, pipeline
from lib import delta_io
from lib.paths import Layout
from schemas import listing_neighbours

RUN_DATE = dt.date(2026, 11, 20)
K = 5

pytestmark = pytest.mark.slow


def test_a_catalogue_without_features_runs_end_to_end(spark, tmp_path):
    root = str(tmp_path)
    generate_sample_data.run(
        None,
        generate_sample_data.parse_args(
            [
                *("--out", f"{root}/inputs", "--listings", "300", "--users", "300"),
                *("--events", "10000", "--days", "30", "--end-date", "2026-11-21", "--seed", "5"),
            ]
        ),
    )
    layout = Layout(root)
    os.remove(layout.feature_spec)
    listings_file = f"{layout.listings}/part-00000.parquet"
    pq.write_table(pq.read_table(listings_file, columns=["listing_id", "is_active"]), listings_file)

    result = pipeline.run(
        spark,
        pipeline.parse_args(
            [
                "--root",
                root,
                "--run-date",
                RUN_DATE.isoformat(),
                "--k",
                str(K),
                "--epochs",
                "1",
                "--min-steps",
                "0",
            ]
        ),
    )

    assert result["status"] in ("succeeded", "insufficient")
    assert result["stages"]["evaluate"]["report_error"] is None
    assert os.path.exists(result["report"])
    # metrics.json carries the same verdict as the runs row.
    written = json.loads(Path(result["report"]).with_name("metrics.json").read_text())
    expected = "insufficient" if result["status"] == "insufficient" else "sufficient"
    assert written["evaluation"]["status"] == expected
    nbr = delta_io.read_table(spark, layout.table("listing_neighbours"), listing_neighbours.SPEC)
    active = pq.read_table(listings_file).to_pandas().query("is_active")["listing_id"]
    published = {r.listing_id for r in nbr.select("listing_id").distinct().collect()}
    assert published == set(active)
    assert nbr.groupBy("listing_id").count().where(F.col("count") != K).count() == 0
    metrics = result["stages"]["evaluate"]["metrics"]
    assert not any(key.startswith(("same_", "median_distance")) for key in metrics)
