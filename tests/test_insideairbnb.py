"""The Inside Airbnb adapter on two tiny hand-made scrapes, and once on the real Albany data."""

import datetime as dt
import gzip
import json
import uuid
from pathlib import Path

import pytest

from jobs import evaluate, import_insideairbnb, pipeline
from lib import insideairbnb as airbnb
from lib import shards
from lib.paths import Layout

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "insideairbnb"

DETAILED = """id,last_scraped,name,description,host_id,neighbourhood_cleansed,latitude,longitude,property_type,room_type,accommodates,bedrooms,price,minimum_nights,first_review
1,2024-11-05,Loft,"Big ""sunny"" loft,
two lines",10,SIXTH WARD,42.65,-73.75,Entire rental unit,Entire home/apt,4,2.0,"$1,234.00",2,2024-01-01
2,2024-11-05,Room,plain,11,TENTH WARD,42.66,-73.78,Private room in home,Private room,1,1.0,$55.00,30,2024-06-01
"""
SUMMARY = """id,name,host_id,neighbourhood_group,neighbourhood,latitude,longitude,room_type,price,minimum_nights
1,Loft,10,,SIXTH WARD,42.65,-73.75,Entire home/apt,99.0,2
3,New flat,10,,SECOND WARD,42.64,-73.76,Entire home/apt,120.0,3
"""
EARLIER_REVIEWS = """listing_id,id,date,reviewer_id
1,101,2024-01-01,7
2,102,2024-06-01,7
1,103,2024-11-04,8
"""
LATER_REVIEWS = """listing_id,id,date,reviewer_id
1,101,2024-01-01,7
1,103,2024-11-04,8
1,106,2024-10-01,9
1,104,2025-01-01,8
3,105,2025-02-01,8
"""


def scrape(folder: Path, listings_csv: str, reviews_csv: str) -> str:
    folder.mkdir(parents=True)
    with gzip.open(folder / "listings.csv.gz", "wt") as f:
        f.write(listings_csv)
    (folder / "reviews.csv").write_text(reviews_csv)  # plain .csv is accepted too
    return str(folder)


@pytest.fixture(scope="module")
def scrapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("airbnb")
    return (
        scrape(root / "city-2024-11", DETAILED, EARLIER_REVIEWS),
        scrape(root / "city-2025-09", SUMMARY, LATER_REVIEWS),
    )


def read(spark, folder, name):
    return airbnb.read_csv(spark, airbnb.find_file(folder, name))


def test_listing_columns_map_onto_our_schema(spark, scrapes):
    full = {
        r.listing_id: r
        for r in airbnb.to_listings(
            read(spark, scrapes[0], "listings"), feature_set="full"
        ).collect()
    }
    assert set(full) == {"1", "2"}  # the quoted two-line description did not break a row
    loft = full["1"]
    assert (loft.room_type, loft.host_id, loft.property_type, loft.neighbourhood) == (
        "Entire home/apt",
        "10",
        "Entire rental unit",
        "SIXTH WARD",
    )
    assert (loft.price, loft.accommodates, loft.minimum_nights) == (1234.0, 4, 2)
    assert loft.created_date == dt.date(2024, 1, 1)
    common = airbnb.to_listings(read(spark, scrapes[0], "listings")).first()
    # The summary scrape lacks them: a common import keeps them null, undeclared.
    assert common.property_type is None and common.accommodates is None
    declared = {f.column for f in airbnb.feature_spec("common").features}
    assert "property_type" not in declared and "room_type" in declared
    summary = {
        r.listing_id: r for r in airbnb.to_listings(read(spark, scrapes[1], "listings")).collect()
    }
    assert summary["3"].neighbourhood == "SECOND WARD" and summary["3"].price == 120.0
    with pytest.raises(ValueError, match="feature_set"):
        airbnb.to_listings(read(spark, scrapes[0], "listings"), feature_set="everything")
    with pytest.raises(FileNotFoundError, match="calendar"):
        airbnb.find_file(scrapes[0], "calendar")


def test_snapshot_keeps_history_listings_inactive_and_adds_new_ones(spark, scrapes):
    earlier = airbnb.to_listings(read(spark, scrapes[0], "listings"))
    later = airbnb.to_listings(read(spark, scrapes[1], "listings"))
    rows = {r.listing_id: r for r in airbnb.combine_snapshots(earlier, later).collect()}
    assert {k: r.is_active for k, r in rows.items()} == {"1": True, "2": False, "3": True}
    assert rows["1"].price == 1234.0  # features as training saw them


def test_reviews_split_at_the_earlier_scrape_and_land_in_the_shard_holdout(spark, scrapes):
    earlier, later = read(spark, scrapes[0], "reviews"), read(spark, scrapes[1], "reviews")
    split = airbnb.split_date(earlier)
    assert split == dt.date(2024, 11, 5)
    events = airbnb.interactions_from_scrapes(earlier, later, split_date=split)
    got = sorted((r.user_id, r.listing_id, r.event_date.isoformat()) for r in events.collect())
    # Review 106 (dated before the split, but only in the later scrape) must not leak in.
    assert got == [
        ("7", "1", "2024-01-01"),
        ("7", "2", "2024-06-01"),
        ("8", "1", "2024-11-04"),
        ("8", "1", "2025-01-01"),
        ("8", "3", "2025-02-01"),
    ]
    first = events.orderBy("event_ts").first()
    assert first.event_type == "contact" and first.event_ts == dt.datetime(2024, 1, 1, 12)

    window = airbnb.shard_window(events, split_date=split)
    assert window == {"run_date": "2025-02-01", "lookback_days": 398, "holdout_days": 89}
    train, holdout = shards.split_holdout(
        events, run_date=dt.date(2025, 2, 1), holdout_days=window["holdout_days"]
    )
    assert train.count() == 3
    assert sorted(r.listing_id for r in holdout.collect()) == ["1", "3"]


def test_import_job_writes_inputs_and_the_shard_flags(spark, scrapes, tmp_path):
    stats = import_insideairbnb.run(
        spark,
        import_insideairbnb.parse_args(
            ["--scrape", scrapes[0], "--later-scrape", scrapes[1], "--out", str(tmp_path)]
        ),
    )
    assert stats["listings"] == 3 and stats["active_listings"] == 2
    assert stats["interactions"] == 5 and stats["holdout_interactions"] == 2
    assert stats["shard_args"]["holdout_days"] == 89
    json.dumps(stats)  # the job prints it


@pytest.mark.slow
@pytest.mark.skipif(not SHARED.is_dir(), reason=f"Inside Airbnb data not present at {SHARED}")
def test_albany_pipeline_and_evaluation_end_to_end(spark, tmp_path):
    """The real data through every stage on a subsample: the last two years of history."""
    root, layout = str(tmp_path), Layout(str(tmp_path))
    scrapes = sorted(p for p in SHARED.iterdir() if p.is_dir())
    stats = import_insideairbnb.run(
        spark,
        import_insideairbnb.parse_args(
            [
                "--scrape",
                str(scrapes[0]),
                "--later-scrape",
                str(scrapes[-1]),
                "--out",
                f"{root}/inputs",
            ]
        ),
    )
    window = stats["shard_args"]
    run_date = dt.date.fromisoformat(window["run_date"])
    args = pipeline.PipelineArgs(root=root, run_date=run_date, k=20, epochs=2, batch_size=256)
    run_id = uuid.uuid4().hex
    argv = pipeline.stage_argv(args, layout, run_id, f"albany-{run_id[:8]}")
    argv["shards"] += [
        "--lookback-days",
        str(window["holdout_days"] + 730),
        "--holdout-days",
        str(window["holdout_days"]),
        "--half-life-days",
        "365",
    ]
    for name in ("shards", "train", "embeddings", "neighbours"):
        module = pipeline.STAGES[name]
        module.run(spark, module.parse_args(argv[name]))
    result = evaluate.run(
        spark,
        evaluate.parse_args(
            [
                "--shards",
                layout.shards(run_date),
                "--listings",
                layout.listings,
                "--embeddings",
                layout.table("listing_embeddings"),
                "--neighbours",
                layout.table("listing_neighbours"),
                "--model",
                layout.model_dir(f"albany-{run_id[:8]}"),
                "--run-date",
                run_date.isoformat(),
                "--out",
                f"{root}/report",
                "--run-id",
                run_id,
            ]
        ),
    )

    metrics = json.loads(Path(f"{root}/report/metrics.json").read_text())["metrics"]
    assert set(metrics) == {
        "model",
        "itemknn",
        "rp3beta",
        "ease",
        "als",
        "content",
        "embedding",
        "popularity",
        "random",
    }
    model = metrics["model"]
    assert model["pairs_cold"] > 0 and model["pairs_warm"] > 0  # new 2025 listings are cold
    for values in metrics.values():
        assert 0.0 <= values["hit_rate_at_10"] <= values["hit_rate_at_20"] <= 1.0
    assert metrics["itemknn"]["hit_rate_at_10_cold"] == 0.0  # no history, no neighbours
    assert metrics["content"]["hit_rate_at_10_cold"] > metrics["random"]["hit_rate_at_10_cold"]
    assert Path(result["report"]).stat().st_size > 50_000
    assert result["metrics"]["model.hit_rate_at_10"] == model["hit_rate_at_10"]
