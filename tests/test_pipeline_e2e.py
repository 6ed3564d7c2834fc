"""The whole nightly job on a tiny generated marketplace, checked through the published tables."""

import datetime as dt
import json
from pathlib import Path

import deltalake
import pytest
from pyspark.sql import functions as F

from jobs import generate_sample_data, pipeline
from lib import car_marketplace, delta_io, feature_spec
from lib.paths import Layout
from schemas import listing_embeddings, listing_neighbours, listings, runs

RUN_DATE = dt.date(2026, 11, 20)
K = 5

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished_run(spark, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("e2e"))
    generate_sample_data.run(
        None,
        generate_sample_data.parse_args(
            [
                "--out",
                f"{root}/inputs",
                "--listings",
                "400",
                "--users",
                "300",
                "--events",
                "12000",
                "--days",
                "30",
                "--end-date",
                "2026-11-21",
                "--seed",
                "3",
            ]
        ),
    )
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
                "2",
                "--min-steps",
                "0",
            ]
        ),
    )
    return root, result


def test_neighbours_table_is_complete_and_well_formed(spark, finished_run):
    root, result = finished_run
    layout = Layout(root)
    day = {"run_date": RUN_DATE.isoformat()}
    nbr = delta_io.read_table(
        spark, layout.table("listing_neighbours"), listing_neighbours.SPEC, partition=day
    )
    active = (
        delta_io.read_input(spark, layout.listings, listings.SPEC)
        .where("is_active")
        .select("listing_id")
    )
    rows = nbr.collect()
    active_ids = {r.listing_id for r in active.collect()}
    by_listing: dict[str, list] = {}
    for r in rows:
        by_listing.setdefault(r.listing_id, []).append(r)

    assert set(by_listing) == active_ids  # every active listing, nothing else
    for listing_id, mine in by_listing.items():
        mine.sort(key=lambda r: r["rank"])
        assert [r["rank"] for r in mine] == list(range(1, K + 1))
        scores = [r.score for r in mine]
        assert scores == sorted(scores, reverse=True)
        assert all(r.neighbour_id != listing_id for r in mine)
        assert {r.neighbour_id for r in mine} <= active_ids
    assert {r.model_version for r in rows} == {result["model_version"]}


def test_embeddings_cover_cold_listings_and_read_independently(spark, finished_run):
    root, result = finished_run
    path = Layout(root).table("listing_embeddings")
    independent = deltalake.DeltaTable(path).to_pyarrow_table().to_pylist()
    assert {r["run_date"] for r in independent} == {RUN_DATE}
    cold = [r for r in independent if r["is_cold_start"]]
    assert cold, "the generated marketplace has listings with no interactions"
    assert result["counts"]["cold_listings"] == len(cold)
    assert all(len(r["embedding"]) == 32 for r in independent)
    via_spark = delta_io.read_table(spark, path, listing_embeddings.SPEC)
    assert via_spark.count() == len(independent)
    assert via_spark.where(F.col("is_cold_start")).count() == len(cold)


def test_runs_table_records_the_run(spark, finished_run):
    root, result = finished_run
    recorded = delta_io.read_table(spark, Layout(root).table("runs"), runs.SPEC).collect()
    assert [r.run_id for r in recorded] == [result["run_id"]]
    row = recorded[0]
    assert row.status == "succeeded"
    assert set(row.stage_seconds) == {"shards", "train", "embeddings", "neighbours", "evaluate"}
    # The neighbour search's measured quality, as committed, and the evaluation's numbers.
    commit_metadata = delta_io.history(Layout(root).table("listing_neighbours"))[0]["metadata"]
    assert row.metrics["neighbours.recall_at_k"] == pytest.approx(commit_metadata["recall_at_k"])
    assert row.metrics["neighbours.recall_at_k"] >= 0.9
    assert row.metrics["neighbours.coverage"] == pytest.approx(1.0)
    assert 0.0 <= row.metrics["model.hit_rate_at_10"] <= 1.0
    assert row.counts["training_examples"] > 0
    assert row.counts["dropped_duplicate"] > 0  # the generator injects duplicate events
    commit = delta_io.history(Layout(root).table("listing_neighbours"))[0]
    assert commit["metadata"]["run_id"] == result["run_id"]


def test_the_run_trains_on_the_generated_spec_and_writes_its_report(finished_run):
    root, result = finished_run
    # No spec given: the run reads the one the generator wrote beside its inputs.
    manifest = Path(Layout(root).shards(RUN_DATE)) / "manifest.json"
    declared = json.loads(manifest.read_text())["feature_spec"]
    assert feature_spec.from_dict(declared) == car_marketplace.FEATURE_SPEC
    assert result["stages"]["evaluate"]["report_error"] is None
    page = Path(result["report"]).read_text()
    assert "Map of listing embeddings" in page
    # The spec's coherence columns: its first two categorical and its first numeric feature.
    assert "same make" in page and "same model" in page and "year ratio" in page
