"""Stage 1 as a job: bad input stops it before anything is written; ids stay stable."""

import datetime as dt
import json
from pathlib import Path

import pytest

from jobs import build_training_shards
from lib import car_marketplace, feature_spec, features
from lib.parquet_io import read_parquet
from lib.schema_check import SchemaError
from schemas import training_examples

RUN_DATE = "2026-11-20"
EVENTS_DDL = (
    "user_id string, listing_id string, event_type string, event_ts string, "
    "session_id string, source string, event_date string"
)
LISTINGS_DDL = (
    "listing_id string, make string, model string, body_type string, fuel_type string, "
    "transmission string, colour string, year int, mileage_km int, price_eur double, "
    "power_kw int, latitude double, longitude double, city string, dealer_id string, "
    "is_active boolean"
)


def listing(listing_id, make="VW", price=10_000.0, active=True):
    return (
        *(listing_id, make, f"{make}-x", "hatchback", "petrol", "manual", "red"),
        *(2019, 60_000, price, 80, 52.5, 13.4, "Berlin", "d1", active),
    )


def event(user, listing_id, day=19, kind="view", when=None):
    stamp = when or f"2026-11-{day:02d} 10:00:00"
    return (user, listing_id, kind, stamp, f"{user}-{day}", "web", stamp[:10])


def good_events():
    return [
        event(u, f"L{i}", day) for u in ("u1", "u2", "u3") for i in (1, 2, 3) for day in (17, 20)
    ]


def good_listings():
    return [listing("L1"), listing("L2", "BMW", 30_000.0), listing("L3"), listing("L4")]


def write_inputs(
    spark, root: Path, events, listings_rows, *, events_ddl=EVENTS_DDL, listings_ddl=LISTINGS_DDL
) -> tuple[str, str]:
    """The two input tables under ``root``, and beside them the car marketplace's spec."""
    events_path, listings_path = str(root / "interactions"), str(root / "listings")
    root.mkdir(parents=True, exist_ok=True)
    feature_spec.write(car_marketplace.FEATURE_SPEC, root / "feature_spec.json")
    spark.createDataFrame(events, events_ddl).write.mode("overwrite").partitionBy(
        "event_date"
    ).parquet(events_path)
    spark.createDataFrame(listings_rows, listings_ddl).write.mode("overwrite").parquet(
        listings_path
    )
    return events_path, listings_path


def run_stage(spark, events_path, listings_path, out, *extra):
    spec = Path(listings_path).parent / "feature_spec.json"
    args = build_training_shards.parse_args(
        [
            *("--interactions", events_path, "--listings", listings_path, "--out", str(out)),
            *("--run-date", RUN_DATE, "--holdout-days", "1", "--num-files", "2"),
            *("--feature-spec", str(spec), *extra),
        ]
    )
    return build_training_shards.run(spark, args)


@pytest.fixture
def existing_output(tmp_path):
    out = tmp_path / "shards"
    out.mkdir()
    (out / "previous-run.txt").write_text("yesterday's shards")
    return out


def assert_untouched(out: Path):
    assert [p.name for p in out.iterdir()] == ["previous-run.txt"]
    assert not [p for p in out.parent.iterdir() if ".staging" in p.name]


BAD_INPUTS = {
    "missing column": (
        lambda: good_events(),
        lambda: [r[:-1] for r in good_listings()],
        LISTINGS_DDL.rsplit(",", 1)[0],
        ("listings", "is_active", "missing column"),
    ),
    "mistyped column": (
        lambda: good_events(),
        lambda: [(*r[:9], "cheap", *r[10:]) for r in good_listings()],
        LISTINGS_DDL.replace("price_eur double", "price_eur string"),
        ("listings", "price_eur", "type string"),
    ),
    "duplicate listing ids": (
        lambda: good_events(),
        lambda: [*good_listings(), listing("L1", "Opel")],
        LISTINGS_DDL,
        ("listings", "listing_id", "duplicate"),
    ),
    "null keys": (
        lambda: [
            *good_events(),
            (None, "L1", "view", "2026-11-19 10:00:00", "s", "web", "2026-11-19"),
        ],
        good_listings,
        LISTINGS_DDL,
        ("interactions", "user_id", "null"),
    ),
    "unparseable timestamp": (
        lambda: [*good_events(), event("u9", "L1", when="2026-11-19 25:61:00")],
        good_listings,
        LISTINGS_DDL,
        ("interactions", "event_ts", "unparseable"),
    ),
    "empty window": (
        lambda: [event("u1", "L1", when="2026-01-05 10:00:00")],
        good_listings,
        LISTINGS_DDL,
        ("interactions", None, "no rows in the window"),
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_stops_before_anything_is_written(spark, tmp_path, existing_output, case):
    events, listings_rows, listings_ddl, (table, column, problem) = BAD_INPUTS[case]
    paths = write_inputs(
        spark, tmp_path / "in", events(), listings_rows(), listings_ddl=listings_ddl
    )
    with pytest.raises(SchemaError) as raised:
        run_stage(spark, *paths, existing_output)
    error = raised.value
    assert (error.table, error.column) == (table, column)
    assert problem in str(error)
    if case in ("null keys", "duplicate listing ids", "unparseable timestamp"):
        assert error.examples, "the error shows example rows"
    assert_untouched(existing_output)


def test_shards_manifest_counts_and_files(spark, tmp_path):
    events = [
        *good_events(),
        event("u1", "L1", 17),  # exact duplicate of a good event
        event("u1", "L9", 18),  # unknown listing
        event("u1", "L1", 18, kind="share"),  # unknown type
        event("u1", "L1", when="2026-11-25 10:00:00"),  # future
    ]
    paths = write_inputs(spark, tmp_path / "in", events, good_listings())
    run_stage(spark, *paths, tmp_path / "shards")
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    counts = manifest["counts"]
    assert counts["events_read"] == len(events)
    assert counts["dropped_duplicate"] == 1
    assert counts["dropped_unknown_listing"] == 1
    assert counts["dropped_unknown_event_type"] == 1
    assert counts["dropped_future_event"] == 1
    assert counts["events_kept"] == len(good_events())
    assert counts["holdout_events"] == 9  # day 20 is the held-out day
    assert counts["training_examples"] == 9  # 3 users × 3 listings from day 17
    assert counts["cold_listings"] == 1  # L4: active, never interacted with
    assert len(manifest["train_files"]) <= 2
    # The car spec's single codes in the tower's order: categoricals, buckets, the geo cell.
    assert [name for name, _ in manifest["cardinalities"]] == [
        *("make", "model", "body_type", "fuel_type", "transmission", "colour"),
        *("year_bucket", "mileage_km_bucket", "price_eur_bucket", "power_kw_bucket", "geo_cell"),
    ]
    assert dict(manifest["cardinalities"]) == features.cardinalities(manifest["encodings"])
    assert dict(manifest["cardinalities"])["make"] == 3  # VW, BMW and the unknown code
    assert manifest["dense_features"] == features.dense_names(manifest["encodings"])
    assert manifest["token_fields"] == []
    assert feature_spec.from_dict(manifest["feature_spec"]) == car_marketplace.FEATURE_SPEC
    assert manifest["listing_features_version"] == training_examples.LISTING_FEATURES_SPEC.version
    steps = manifest["step_seconds"]
    assert set(steps) == {
        "tag_events",
        "vocabularies",
        "fit_encoding",
        "training_examples",
        "listing_features",
        "holdout",
        "cointeraction_fit",
        "cointeraction_full",
        "train_pairs",
        "counts",
    }
    assert all(v >= 0 for v in steps.values()) and sum(steps.values()) <= manifest["seconds"]
    holdout = read_parquet(spark, tmp_path / "shards" / "holdout", training_examples.HOLDOUT_SPEC)
    assert {r.event_ts.date() for r in holdout.collect()} == {dt.date(2026, 11, 20)}


def test_validation_days_sit_between_training_and_holdout_and_never_overlap(spark, tmp_path):
    # Days 16-17 fit, 18-19 validation (two days, as --validation-days says), 20 holdout.
    events = [
        event(u, f"L{i}", day)
        for u in ("u1", "u2", "u3")
        for i in (1, 2, 3)
        for day in (16, 17, 18, 19, 20)
        if (i + day) % 2 or day in (16, 20)
    ]
    paths = write_inputs(spark, tmp_path / "in", events, good_listings())
    run_stage(spark, *paths, tmp_path / "shards", "--validation-days", "2")
    shards = tmp_path / "shards"
    manifest = json.loads((shards / "manifest.json").read_text())
    spec = training_examples.HOLDOUT_SPEC

    def days(name):
        return {r.event_ts.day for r in read_parquet(spark, shards / name, spec).collect()}

    assert days("validation") == {18, 19} and days("holdout") == {20}
    assert manifest["validation_days"] == 2
    counts = manifest["counts"]
    assert counts["validation_events"] == sum(1 for e in events if e[3][8:10] in ("18", "19"))
    # The model's examples end before validation; the full window's include it.
    train = read_parquet(spark, shards / "train", training_examples.SPEC).collect()
    full = read_parquet(spark, shards / "train_full", training_examples.SPEC).collect()
    assert counts["training_examples"] == len(train) == 9
    assert counts["training_examples_full"] == len(full) == 9
    assert sum(r.weight for r in full) > sum(r.weight for r in train)
    # Co-interactions for validation are built from the model's examples only, for the
    # validation queries; the published ones from the full window, for every listing.
    fit = read_parquet(spark, shards / "cointeraction_fit", training_examples.COINTERACTION_SPEC)
    full_pairs = read_parquet(
        spark, shards / "cointeraction_full", training_examples.COINTERACTION_SPEC
    )
    assert {r.common for r in fit.collect()} == {3}  # day 16: each user saw L1, L2, L3
    assert {r.listing_id for r in full_pairs.collect()} == {"L1", "L2", "L3"}


def test_an_empty_fit_window_is_refused_before_publishing(spark, tmp_path):
    events = [event(u, "L1", day) for u in ("u1", "u2") for day in (19, 20)]
    paths = write_inputs(spark, tmp_path / "in", events, good_listings())
    with pytest.raises(SchemaError, match="before the validation window"):
        run_stage(spark, *paths, tmp_path / "shards")
    assert not (tmp_path / "shards").exists()


def test_ids_are_stable_across_runs_with_new_listings_and_users(spark, tmp_path):
    first_paths = write_inputs(spark, tmp_path / "in1", good_events(), good_listings())
    run_stage(spark, *first_paths, tmp_path / "day1")
    second_events = [*good_events(), event("u0", "L0", 18), event("u4", "L5", 18)]
    second_listings = [listing("L0"), *good_listings(), listing("L5")]
    second_paths = write_inputs(spark, tmp_path / "in2", second_events, second_listings)
    run_stage(spark, *second_paths, tmp_path / "day2", "--previous-shards", str(tmp_path / "day1"))

    def vocab(day, name):
        spec = training_examples.LISTING_VOCABULARY_SPEC
        return {
            r.id: r.idx
            for r in read_parquet(spark, tmp_path / day / "vocab" / name, spec).collect()
        }

    for name in ("listings", "users"):
        before, after = vocab("day1", name), vocab("day2", name)
        assert {k: after[k] for k in before} == before  # old ids keep their index
        assert sorted(after.values()) == list(range(len(after)))  # dense, no gaps
    listings_after = vocab("day2", "listings")
    assert listings_after["L0"] == 4 and listings_after["L5"] == 5  # appended in id order
    assert vocab("day2", "users")["u0"] == 3 and vocab("day2", "users")["u4"] == 4
