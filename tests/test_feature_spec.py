"""The feature spec: parsing, the CLI flags, and what fitting and encoding make of each kind.

The encoding tests fit one spec that declares every kind on a tiny catalogue whose codes can
be worked out by hand; the rest check the edges (nothing declared, a column with no values,
numbers stored as text, ids stored as numbers) and the content baseline on bags of tokens.
"""

from __future__ import annotations

import argparse
import json
import math

import pytest
from pyspark.sql import functions as F
from pyspark.sql import types as T

from lib import baselines, evaluation, feature_spec, features, shards
from lib.delta_io import read_input
from lib.feature_spec import NO_FEATURES, Feature, FeatureSpec, from_dict, from_flags
from lib.schema_check import SchemaError

# --- parsing ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        ({"features": [{"column": "a", "kind": "colour"}]}, "kind 'colour' is not one of"),
        (
            {"features": [{"column": "price", "kind": "numeric", "bins": 4}]},
            "price: unknown option(s) ['bins'] for kind numeric",
        ),
        (
            {"features": [{"column": "make", "kind": "categorical"}] * 2},
            "['make'] declared more than once",
        ),
        (
            {"features": [{"column": "latitude", "kind": "numeric"}]},
            "['latitude'] are contract columns, not features",
        ),
        ({"features": [{"kind": "text"}]}, "a text feature needs a 'column'"),
        (
            {"features": [{"column": "price", "kind": "numeric", "buckets": 0}]},
            "price: buckets must be a positive integer, got 0",
        ),
        (
            {"features": [{"column": "price", "kind": "numeric", "log": "maybe"}]},
            'price: log must be true, false or "auto"',
        ),
        ({"features": [], "colour": []}, "unknown key(s) ['colour']"),
        ({"features": [], "display": "city"}, "display is a list of column names"),
    ],
)
def test_a_bad_spec_names_the_problem(data, problem):
    with pytest.raises(ValueError) as raised:
        from_dict(data, "feature spec f.json")
    assert str(raised.value).startswith("feature spec f.json: ")
    assert problem in str(raised.value)


def test_a_spec_file_that_is_not_json_names_the_file(tmp_path):
    path = tmp_path / "spec.json"
    path.write_text('{"features": [')
    with pytest.raises(ValueError, match=rf"feature spec {path}: not JSON"):
        feature_spec.read(path)


def test_a_spec_round_trips_through_its_file_and_shows_its_features(tmp_path):
    spec = from_dict(
        {
            "features": [
                {"column": "make", "kind": "categorical"},
                {"column": "price", "kind": "numeric", "log": True, "buckets": 8},
                {"kind": "geo", "cell_degrees": 0.25},
            ]
        }
    )
    feature_spec.write(spec, tmp_path / "spec.json")
    assert feature_spec.read(tmp_path / "spec.json") == spec
    assert spec.shown == ("make", "price")  # no display: the feature columns, geo aside
    assert spec.geo == Feature("geo", "geo", (("cell_degrees", 0.25),))
    assert spec.features[1].option("buckets") == 8 and spec.features[1].option("log") is True
    assert spec.features[0].option("max_vocabulary") == 50_000  # the default
    assert spec.with_display(["city"]).snapshot_columns() == {
        "make": T.StringType(),
        "price": T.DoubleType(),
        "city": T.StringType(),
    }


def test_from_flags_declares_transforms_and_separators():
    spec = from_flags(
        categorical=["make"],
        multi_categorical=["amenities:|", "tags"],
        numeric=["price:log", "year:linear", "rooms"],
        text=["title"],
        geo=True,
        display=["city"],
    )
    assert spec == FeatureSpec(
        features=(
            Feature("make", "categorical"),
            Feature("amenities", "multi_categorical", (("separator", "|"),)),
            Feature("tags", "multi_categorical"),
            Feature("price", "numeric", (("log", True),)),
            Feature("year", "numeric", (("log", False),)),
            Feature("rooms", "numeric"),
            Feature("title", "text"),
            Feature("geo", "geo"),
        ),
        display=("city",),
    )
    # A separator makes a string column, none an array column.
    columns = spec.snapshot_columns()
    assert columns["amenities"] == T.StringType()
    assert columns["tags"] == T.ArrayType(T.StringType())
    assert spec.features[5].option("log") == "auto"
    with pytest.raises(ValueError, match="--numeric price:sqrt: the transform is log or linear"):
        from_flags(numeric=["price:sqrt"])


def test_the_command_line_takes_a_spec_file_or_the_flags_not_both(tmp_path):
    parser = argparse.ArgumentParser()
    feature_spec.add_arguments(parser)
    args = parser.parse_args(["--numeric", "price:log,year", "--multi-categorical", "amenities:|"])
    assert feature_spec.from_arguments(args) == from_flags(
        numeric=["price:log", "year"], multi_categorical=["amenities:|"]
    )
    assert feature_spec.from_arguments(parser.parse_args([])) == NO_FEATURES
    feature_spec.write(from_flags(categorical=["make"]), tmp_path / "spec.json")
    both = parser.parse_args(["--feature-spec", str(tmp_path / "spec.json"), "--geo"])
    with pytest.raises(ValueError, match="not both"):
        feature_spec.from_arguments(both)


# --- fitting and encoding every kind ------------------------------------------------------------

SPEC = from_dict(
    {
        "features": [
            {"column": "colour", "kind": "categorical"},
            {"column": "price", "kind": "numeric"},  # log "auto": spread over orders of magnitude
            {"column": "year", "kind": "numeric", "buckets": 2},  # "auto": even, stays linear
            {"column": "amenities", "kind": "multi_categorical", "max_values": 2},
            {"column": "tags", "kind": "multi_categorical", "separator": "|", "max_values": 3},
            {"column": "title", "kind": "text", "max_tokens": 4},
            {"kind": "geo"},
        ]
    }
)
COLUMNS = ("colour", "price", "year", "latitude", "longitude", "amenities", "tags", "title")
ROWS = {
    "L1": ("red", 10.0, 2010.0, 52.51, 13.41, ["wifi", "tv", "wifi"], "a|b|c|d", "Sunny flat near the park"),
    "L2": ("red", 100.0, 2012.0, 52.52, 13.42, ["wifi", "tv", "pool"], "a| b |", "Sunny room, park VIEW"),
    "L3": ("red", 1000.0, 2014.0, 48.1, 11.6, ["pool"], "c", "Quiet flat"),
    "L4": ("blue", 10_000.0, 2016.0, 48.2, 11.5, [], None, "x"),
    "L5": ("blue", 100_000.0, 2018.0, None, None, None, "b|b", None),
    "L6": ("green", None, None, 53.5, 10.0, [" ", "tv"], "", "the end"),
    "L7": (None, None, None, None, None, None, None, None),
}  # fmt: skip


def snapshot_of(spark, spec: FeatureSpec, rows: dict[str, dict]):
    """A listings snapshot under ``spec``'s contract; unnamed columns null, L7 inactive."""
    schema = feature_spec.listings_table_spec(spec).schema
    data = [
        {**dict.fromkeys(schema.fieldNames()), "listing_id": i, "is_active": i != "L7", **row}
        for i, row in rows.items()
    ]
    return spark.createDataFrame(data, schema)


def encode(spark, snapshot, encoding) -> dict:
    vocab = shards.extend_vocabulary(snapshot.select(F.col("listing_id").alias("id")))
    rows = features.encode_listing_features(snapshot, vocab, encoding).collect()
    return {r.listing_id: r for r in rows}


@pytest.fixture(scope="module")
def fitted(spark):
    snapshot = snapshot_of(
        spark, SPEC, {i: dict(zip(COLUMNS, row, strict=True)) for i, row in ROWS.items()}
    )
    encoding = features.fit_feature_encoding(snapshot, SPEC)
    # The encoding is saved as JSON and read back by every later stage.
    saved = json.loads(json.dumps(encoding))
    return saved, encode(spark, snapshot, saved)


def codes_of(fitted, name: str) -> dict[str, int]:
    encoding, encoded = fitted
    at = list(features.cardinalities(encoding)).index(name)
    return {i: r.codes[at] for i, r in encoded.items()}


def dense_of(fitted, name: str) -> dict[str, float]:
    encoding, encoded = fitted
    at = features.dense_names(encoding).index(name)
    return {i: r.dense[at] for i, r in encoded.items()}


def tokens_of(fitted, name: str) -> dict[str, list[int]]:
    encoding, encoded = fitted
    start = 0
    for field, _, slots in features.token_fields(encoding):
        if field == name:
            return {i: r.tokens[start : start + slots] for i, r in encoded.items()}
        start += slots
    raise KeyError(name)


def vocabulary(encoding, part: str, name: str) -> list[str]:
    return next(e["vocabulary"] for e in encoding[part] if e["name"] == name)


def test_every_row_has_the_widths_the_encoding_names(fitted):
    encoding, encoded = fitted
    assert features.cardinalities(encoding) == {
        "colour": 4,
        "price_bucket": len(encoding["codes"][1]["bounds"]) + 2,
        "year_bucket": 3,  # one boundary: below it, from it on, unknown
        "geo_cell": 4,
    }
    assert features.dense_names(encoding) == [
        "price_norm",
        "year_norm",
        "latitude_norm",
        "longitude_norm",
    ]
    assert features.token_fields(encoding) == [("amenities", 4, 2), ("tags", 5, 3), ("title", 5, 4)]
    assert set(encoded) == set(ROWS)  # inactive listings are encoded too
    assert not encoded["L7"].is_active and not any(r.has_interactions for r in encoded.values())
    for row in encoded.values():
        assert (len(row.codes), len(row.dense), len(row.tokens)) == (4, 4, 9)


def test_categorical_codes_follow_frequency_and_zero_is_unknown(spark, fitted):
    encoding, _ = fitted
    assert vocabulary(encoding, "codes", "colour") == ["red", "blue", "green"]
    got = codes_of(fitted, "colour")
    assert got == {"L1": 1, "L2": 1, "L3": 1, "L4": 2, "L5": 2, "L6": 3, "L7": 0}
    unseen = snapshot_of(spark, SPEC, {"L9": {"colour": "purple"}})
    assert encode(spark, unseen, encoding)["L9"].codes[0] == 0


def test_numeric_buckets_and_z_scores_log_only_where_skewed(fitted):
    encoding, _ = fitted
    price, year = encoding["dense"][0], encoding["dense"][1]
    assert price["log"] is True and year["log"] is False
    # The year's z-score: population mean and standard deviation of the values there are.
    assert year["mean"] == pytest.approx(2014.0) and year["std"] == pytest.approx(math.sqrt(8))
    years = dense_of(fitted, "year_norm")
    assert years["L1"] == pytest.approx(-4 / math.sqrt(8))
    assert years["L6"] == years["L7"] == 0.0  # missing: the mean, not an extreme
    logs = [math.log1p(v) for v in (10.0, 100.0, 1000.0, 10_000.0, 100_000.0)]
    mean = sum(logs) / 5
    std = math.sqrt(sum((x - mean) ** 2 for x in logs) / 5)
    assert price["mean"] == pytest.approx(mean) and price["std"] == pytest.approx(std)
    assert dense_of(fitted, "price_norm")["L3"] == pytest.approx((logs[2] - mean) / std, abs=1e-5)
    # Buckets rise with the value; 0 is missing.
    buckets = codes_of(fitted, "year_bucket")
    ordered = [buckets[i] for i in ("L1", "L2", "L3", "L4", "L5")]
    assert ordered == sorted(ordered) and set(ordered) == {1, 2}
    assert buckets["L6"] == buckets["L7"] == 0
    prices = codes_of(fitted, "price_bucket")
    assert [prices[i] for i in ("L1", "L2", "L3", "L4", "L5")] == sorted(
        prices[i] for i in ("L1", "L2", "L3", "L4", "L5")
    )
    assert prices["L1"] < prices["L5"] and prices["L6"] == 0


def test_geo_cells_and_coordinates(fitted):
    cells = codes_of(fitted, "geo_cell")
    assert cells["L1"] == cells["L2"]  # 1.3 km apart: one 0.5° cell
    assert cells["L3"] == cells["L4"] != cells["L1"]
    assert len({cells["L1"], cells["L3"], cells["L6"]}) == 3
    assert cells["L5"] == cells["L7"] == 0 and 0 < cells["L6"] < 4
    latitudes = dense_of(fitted, "latitude_norm")
    assert latitudes["L6"] > latitudes["L1"] > latitudes["L3"]
    assert latitudes["L5"] == dense_of(fitted, "longitude_norm")["L5"] == 0.0


def test_multi_valued_from_an_array_column(fitted):
    encoding, _ = fitted
    # tv on three listings, pool and wifi on two (ties by value).
    assert vocabulary(encoding, "tokens", "amenities") == ["tv", "pool", "wifi"]
    assert tokens_of(fitted, "amenities") == {
        "L1": [3, 1],  # distinct, in order of appearance
        "L2": [3, 1],  # capped at max_values: pool is the third
        "L3": [2, 0],  # padded with 0
        "L4": [0, 0],
        "L5": [0, 0],
        "L6": [1, 0],  # a blank value is no value
        "L7": [0, 0],
    }


def test_multi_valued_from_a_separated_string(fitted):
    encoding, _ = fitted
    assert vocabulary(encoding, "tokens", "tags") == ["b", "a", "c", "d"]
    assert tokens_of(fitted, "tags") == {
        "L1": [2, 1, 3],  # a|b|c|d: the first three
        "L2": [2, 1, 0],  # values are trimmed, empty ones dropped
        "L3": [3, 0, 0],
        "L4": [0, 0, 0],
        "L5": [1, 0, 0],  # b|b: once
        "L6": [0, 0, 0],
        "L7": [0, 0, 0],
    }


def test_text_words_are_lower_cased_and_need_two_listings(fitted):
    encoding, _ = fitted
    # Words of two or more characters on at least two listings ("x" is too short; "near",
    # "room", "view", "quiet" and "end" are on one listing each).
    assert vocabulary(encoding, "tokens", "title") == ["flat", "park", "sunny", "the"]
    assert tokens_of(fitted, "title") == {
        "L1": [3, 1, 4, 2],  # sunny flat (near) the park
        "L2": [3, 2, 0, 0],  # Sunny (room,) park (VIEW)
        "L3": [1, 0, 0, 0],
        "L4": [0, 0, 0, 0],
        "L5": [0, 0, 0, 0],
        "L6": [4, 0, 0, 0],
        "L7": [0, 0, 0, 0],
    }


# --- edges --------------------------------------------------------------------------------------


NO_VALUE = "but no listing has a value"


@pytest.mark.parametrize(
    ("declared", "values", "column", "problem"),
    [
        ({"column": "colour", "kind": "categorical"}, {}, "colour", NO_VALUE),
        ({"column": "price", "kind": "numeric"}, {"price": [None, None]}, "price", NO_VALUE),
        (
            {"column": "amenities", "kind": "multi_categorical"},
            {"amenities": [[], [" "]]},
            "amenities",
            NO_VALUE,
        ),
        (
            {"column": "title", "kind": "text"},
            {"title": ["unique words", "other text"]},  # each word on one listing only
            "title",
            "(text: no word is on 2 listings)",
        ),
        ({"kind": "geo"}, {}, "latitude, longitude", NO_VALUE),
    ],
)
def test_a_declared_column_without_values_is_refused(spark, declared, values, column, problem):
    spec = from_dict({"features": [declared]})
    rows = {i: {c: v[n] for c, v in values.items()} for n, i in enumerate(("A", "B"))}
    with pytest.raises(SchemaError) as raised:
        features.fit_feature_encoding(snapshot_of(spark, spec, rows), spec)
    assert (raised.value.table, raised.value.column) == ("listings", column)
    assert problem in str(raised.value)


def test_a_numeric_column_stored_as_text_is_refused_on_read(spark, tmp_path):
    spec = from_flags(numeric=["price"])
    path = str(tmp_path / "listings")
    spark.createDataFrame(
        [("L1", True, "9.99")], "listing_id string, is_active boolean, price string"
    ).write.parquet(path)
    with pytest.raises(SchemaError) as raised:
        read_input(spark, path, feature_spec.listings_table_spec(spec))
    assert (raised.value.table, raised.value.column) == ("listings", "price")
    assert "type string where double is expected" in str(raised.value)


def test_an_integer_category_reads_as_its_text(spark, tmp_path):
    spec = from_flags(categorical=["room_type"])
    path = str(tmp_path / "listings")
    spark.createDataFrame(
        [("L1", True, 3), ("L2", True, 7), ("L3", True, 3)],
        "listing_id string, is_active boolean, room_type int",
    ).write.parquet(path)
    snapshot = read_input(spark, path, feature_spec.listings_table_spec(spec))
    assert snapshot.schema["room_type"].dataType == T.StringType()
    encoding = features.fit_feature_encoding(snapshot, spec)
    assert vocabulary(encoding, "codes", "room_type") == ["3", "7"]
    assert {i: r.codes for i, r in encode(spark, snapshot, encoding).items()} == {
        "L1": [1],
        "L2": [2],
        "L3": [1],
    }


def test_content_baseline_on_bags_of_tokens(spark):
    spec = from_flags(multi_categorical=["amenities"])
    snapshot = snapshot_of(
        spark,
        spec,
        {
            "A": {"amenities": ["wifi", "tv", "pool", "parking"]},
            "B": {"amenities": ["wifi", "tv", "pool", "garden"]},
            "C": {"amenities": ["sauna", "gym"]},
            "D": {"amenities": ["sauna", "gym", "wifi"]},
        },
    )
    encoding = features.fit_feature_encoding(snapshot, spec)
    assert [b.kind for b in baselines.content_blocks(encoding)] == ["bag"]
    vocab = shards.extend_vocabulary(snapshot.select(F.col("listing_id").alias("id")))
    encoded = features.encode_listing_features(snapshot, vocab, encoding)
    top = {
        r.listing_id: r.neighbour_id
        for r in baselines.content_neighbours(encoded, encoding, k=1).collect()
    }
    # Three of four amenities shared: each other's nearest; C and D share two of three.
    assert top == {"A": "B", "B": "A", "C": "D", "D": "C"}


def test_no_features_give_zero_width_arrays_and_no_content(spark):
    snapshot = snapshot_of(spark, NO_FEATURES, {"A": {"latitude": 52.0}, "B": {}})
    assert snapshot.columns == feature_spec.listings_table_spec(NO_FEATURES).schema.fieldNames()
    encoding = features.fit_feature_encoding(snapshot, NO_FEATURES)
    assert (encoding["codes"], encoding["dense"], encoding["tokens"]) == ([], [], [])
    assert features.cardinalities(encoding) == {} and features.token_fields(encoding) == []
    encoded = encode(spark, snapshot, encoding)
    assert {i: (r.codes, r.dense, r.tokens) for i, r in encoded.items()} == {
        "A": ([], [], []),
        "B": ([], [], []),
    }
    assert baselines.content_blocks(encoding) == []
    vocab = shards.extend_vocabulary(snapshot.select(F.col("listing_id").alias("id")))
    listing_features = features.encode_listing_features(snapshot, vocab, encoding)
    assert baselines.content_vectors(listing_features, encoding).count() == 0


def test_coherence_metrics_without_features_have_no_rows(spark):
    snapshot = snapshot_of(spark, NO_FEATURES, {"A": {}, "B": {}})
    neighbours = spark.createDataFrame(
        [("m", "A", "B", 1, 1.0)],
        "method string, listing_id string, neighbour_id string, rank int, score float",
    )
    metrics = evaluation.coherence_metrics(neighbours, snapshot, NO_FEATURES)
    assert metrics.collect() == []
    assert metrics.columns == ["method", "metric", "value"]
