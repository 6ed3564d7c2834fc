"""``listing-similarity import``: plain CSV/Parquet files and a column mapping -> our inputs."""

import datetime as dt
import json

import pandas as pd
import pytest

from jobs import import_files
from lib import feature_spec
from lib.parquet_io import read_parquet
from lib.schema_check import SchemaError
from schemas import interactions

EVENTS = pd.DataFrame(
    {
        "customer": pd.array([1, 1, 2, 2, 3, None], dtype="Int64"),
        "sku": ["A", "B", "A", "C", "B", "A"],
        "when": [
            "2024-01-01 10:00:00",
            "2024-01-01 10:05:00",
            "2024-01-02 09:00:00",
            "2024-01-03 12:00:00",
            "2024-01-10 08:00:00",
            "2024-01-10 09:00:00",
        ],
        "kind": ["purchase", "purchase", "basket", "purchase", "return", "purchase"],
    }
)
ITEMS = pd.DataFrame(
    {
        "sku": ["A", "B", "C"],
        "title": ["Red mug", "Blue mug", "Red plate"],
        "price": ["2.50", "3.00", ""],
        "sold": [True, True, False],
    }
)
FLAGS = [
    "--user",
    "customer",
    "--item",
    "sku",
    "--timestamp",
    "when",
    "--event-type",
    "kind",
    "--event-types",
    "purchase=contact,basket=save",
    "--active",
    "sold",
    "--text",
    "title",
    "--numeric",
    "price:log",
]


def write_csv(tmp_path, events=EVENTS, items=ITEMS):
    events.to_csv(tmp_path / "events.csv", index=False)
    items.to_csv(tmp_path / "items.csv", index=False)
    return [
        "--interactions",
        str(tmp_path / "events.csv"),
        "--items",
        str(tmp_path / "items.csv"),
        "--out",
        str(tmp_path / "inputs"),
    ]


def test_csv_files_become_inputs_with_a_spec_and_a_window(spark, tmp_path):
    result = import_files.run(spark, import_files.parse_args([*write_csv(tmp_path), *FLAGS]))

    events = read_parquet(spark, tmp_path / "inputs" / "interactions", interactions.SPEC)
    got = {(r.user_id, r.listing_id, r.event_type) for r in events.collect()}
    # Ids read as numbers come back as text; the unmapped "return" stays, for the shard stage
    # to drop and count; the guest's row keeps a null user (also dropped and counted there).
    assert (
        ("1", "A", "contact") in got and ("2", "A", "save") in got and ("3", "B", "return") in got
    )
    assert not any(user is None for user, _, _ in got)  # the guest row: dropped, counted
    spec = feature_spec.read(tmp_path / "inputs" / "feature_spec.json")
    assert [(f.column, f.kind) for f in spec.features] == [("price", "numeric"), ("title", "text")]
    listings = read_parquet(
        spark, tmp_path / "inputs" / "listings", feature_spec.listings_table_spec(spec)
    )
    rows = {r.listing_id: r for r in listings.collect()}
    assert rows["A"].price == 2.5 and rows["C"].price is None  # "" is missing, not an error
    assert rows["C"].is_active is False and rows["A"].title == "Red mug"
    assert result["listings"] == 3 and result["active_listings"] == 2
    assert result["interactions_dropped"] == {
        "missing_user": 1,
        "missing_item": 0,
        "missing_timestamp": 0,
    }
    window = result["shard_args"]
    assert window["run_date"] == "2024-01-10"
    assert window["lookback_days"] == 10
    assert window["holdout_days"] >= 1 and window["validation_days"] == window["holdout_days"]


def test_a_missing_column_names_table_and_column(spark, tmp_path):
    argv = [*write_csv(tmp_path), *FLAGS[:-2], "--numeric", "weight"]
    with pytest.raises(SchemaError, match=r"table 'listings', column 'weight': no such column"):
        import_files.run(spark, import_files.parse_args(argv))


def test_a_price_that_is_not_a_number_is_refused_before_anything_is_written(spark, tmp_path):
    items = ITEMS.assign(price=["2.50", "three", "1"])
    with pytest.raises(SchemaError, match=r"column 'price': unparseable value.*three"):
        import_files.run(
            spark, import_files.parse_args([*write_csv(tmp_path, items=items), *FLAGS])
        )
    assert not (tmp_path / "inputs" / "interactions").exists()


def test_an_unparseable_timestamp_names_the_column(spark, tmp_path):
    events = EVENTS.assign(when=[*EVENTS["when"][:-1], "next tuesday"])
    with pytest.raises(SchemaError, match=r"column 'when': unparseable value.*next tuesday"):
        import_files.run(
            spark, import_files.parse_args([*write_csv(tmp_path, events=events), *FLAGS])
        )


def test_pandas_parquet_with_nanosecond_timestamps_is_read(spark, tmp_path):
    events = EVENTS.assign(when=pd.to_datetime(EVENTS["when"]).dt.tz_localize("UTC"))
    events.to_parquet(tmp_path / "events.parquet")  # pandas' default: timestamp[ns]
    ITEMS.assign(price=[2.5, 3.0, None]).to_parquet(tmp_path / "items.parquet")
    import pyarrow.parquet as pq

    assert str(pq.read_schema(tmp_path / "events.parquet").field("when").type).startswith(
        "timestamp[ns"
    )
    argv = [
        "--interactions",
        str(tmp_path / "events.parquet"),
        "--items",
        str(tmp_path / "items.parquet"),
        "--out",
        str(tmp_path / "inputs"),
        *FLAGS,
    ]
    import_files.run(spark, import_files.parse_args(argv))
    events = read_parquet(spark, tmp_path / "inputs" / "interactions", interactions.SPEC)
    first = events.where("listing_id = 'B' and user_id = '1'").first()
    assert first.event_ts == dt.datetime(2024, 1, 1, 10, 5)
    assert first.event_date == dt.date(2024, 1, 1)


def test_event_type_targets_are_checked_when_parsing():
    with pytest.raises(SystemExit):
        import_files.parse_args(
            [
                "--interactions",
                "e",
                "--items",
                "i",
                "--out",
                "o",
                "--user",
                "u",
                "--item",
                "s",
                "--timestamp",
                "t",
                "--event-types",
                "purchase=buy",
            ]
        )


def test_spec_file_and_flags_are_exclusive(tmp_path):
    (tmp_path / "spec.json").write_text(json.dumps({"features": []}))
    base = [
        "--interactions",
        "e",
        "--items",
        "i",
        "--out",
        "o",
        "--user",
        "u",
        "--item",
        "s",
        "--timestamp",
        "t",
    ]
    with pytest.raises(SystemExit):
        import_files.parse_args(
            [*base, "--feature-spec", str(tmp_path / "spec.json"), "--text", "x"]
        )
    assert import_files.parse_args([*base, "--feature-spec", str(tmp_path / "spec.json")])
