import datetime as dt
import math

import pytest
from chispa import assert_df_equality
from pyspark.sql import Row
from pyspark.sql import functions as F

from lib import features, shards
from lib.car_marketplace import FEATURE_SPEC
from lib.feature_spec import listings_table_spec
from lib.schema_check import conform
from schemas import interactions, training_examples

RUN_DATE = dt.date(2026, 11, 20)
# The generated car marketplace's listings contract: the fixed columns and its declared ones.
CAR_LISTINGS = listings_table_spec(FEATURE_SPEC)


def ts(day: int, hour: int = 12) -> dt.datetime:
    return dt.datetime(2026, 11, day, hour)


def events_df(spark, rows):
    full = [
        Row(
            user_id=u,
            listing_id=lst,
            event_type=t,
            event_ts=when,
            session_id=s,
            source="web",
            event_date=when.date(),
        )
        for u, lst, t, when, s in rows
    ]
    return spark.createDataFrame(full, interactions.SCHEMA)


def listing_rows(spark, rows):
    """rows: (listing_id, make, price, lat, lon, is_active)"""
    data = [
        {
            "listing_id": i,
            "make": make,
            "model": f"{make}-m" if make else None,
            "body_type": "hatchback",
            "fuel_type": "petrol",
            "transmission": "manual",
            "colour": "black",
            "year": 2020.0,
            "mileage_km": 50_000.0,
            "price_eur": price,
            "power_kw": 80.0,
            "latitude": lat,
            "longitude": lon,
            "city": "Berlin",
            "is_active": active,
            "created_date": dt.date(2026, 1, 1),
        }
        for i, make, price, lat, lon, active in rows
    ]
    return spark.createDataFrame(data, CAR_LISTINGS.schema)


@pytest.fixture
def snapshot(spark):
    return listing_rows(
        spark,
        [
            ("L1", "VW", 10_000.0, 52.5, 13.4, True),
            ("L2", "VW", 12_000.0, 52.5, 13.4, True),
            ("L3", "BMW", 30_000.0, 48.1, 11.6, True),
            ("L4", None, None, None, None, False),
        ],
    )


def test_tag_drop_reasons_tags_each_problem(spark, snapshot):
    events = events_df(
        spark,
        [
            ("u1", "L1", "view", ts(19), "s1"),  # kept
            ("u1", "L1", "view", ts(19), "s1"),  # exact duplicate: collapsed, copies=3
            ("u1", "L1", "view", ts(19), "s1"),
            ("u1", "L2", "click", ts(19), "s1"),  # unknown type
            ("u1", "L9", "view", ts(19), "s1"),  # unknown listing
            ("u1", "L2", "view", ts(21), "s2"),  # after the run date
            ("u1", "L2", "view", dt.datetime(2026, 7, 1), "s0"),  # before the lookback window
            *[("bot", "L3", "view", ts(18, h), f"b{h}") for h in range(5)],  # 5/day > ceiling 4
        ],
    )
    tagged = shards.tag_drop_reasons(
        events,
        snapshot,
        run_date=RUN_DATE,
        lookback_days=30,
        event_types=("view", "save", "contact"),
        max_events_per_user_day=4,
    )
    got = {
        (r.user_id, r.listing_id, r.event_type, r.event_ts.day, r.copies, r.drop_reason)
        for r in tagged.collect()
    }
    assert got == {
        ("u1", "L1", "view", 19, 3, None),
        ("u1", "L2", "click", 19, 1, "unknown_event_type"),
        ("u1", "L9", "view", 19, 1, "unknown_listing"),
        ("u1", "L2", "view", 21, 1, "future_event"),
        ("u1", "L2", "view", 1, 1, "outside_window"),
        *{("bot", "L3", "view", 18, 1, "bot_user")},
    }
    assert tagged.where("drop_reason = 'bot_user'").count() == 5
    counts = {r.drop_reason: (r.events, r.duplicates) for r in shards.drop_counts(tagged).collect()}
    assert counts[None] == (1, 2)
    assert counts["bot_user"] == (5, 0)


def test_tag_drop_reasons_flags_null_keys(spark, snapshot):
    day = dt.date(2026, 11, 19)
    rows = [(user, "L1", "view", ts(19), "s", "web", day) for user in (None, "u1")]
    schema = interactions.SCHEMA.jsonValue()
    nullable = {**schema, "fields": [{**f, "nullable": True} for f in schema["fields"]]}
    events = spark.createDataFrame(rows, interactions.SCHEMA.fromJson(nullable))
    tagged = shards.tag_drop_reasons(
        events,
        snapshot,
        run_date=RUN_DATE,
        lookback_days=30,
        event_types=("view",),
        max_events_per_user_day=100,
    )
    assert sorted((r.drop_reason or "kept") for r in tagged.collect()) == ["kept", "null_key"]


def test_split_holdout_is_by_time_and_disjoint(spark):
    events = events_df(
        spark,
        [("u1", "L1", "view", ts(d), "s") for d in (16, 17, 18, 19, 20)],
    )
    train, holdout = shards.split_holdout(events, run_date=RUN_DATE, holdout_days=2)
    assert sorted(r.event_ts.day for r in train.collect()) == [16, 17, 18]
    assert sorted(r.event_ts.day for r in holdout.collect()) == [19, 20]


def test_weight_interactions_applies_type_weights_and_decay(spark):
    end = dt.datetime(2026, 11, 21)
    events = events_df(
        spark,
        [
            ("u1", "L1", "view", end - dt.timedelta(days=10), "s1"),  # 1 × 0.5
            ("u1", "L1", "contact", end - dt.timedelta(days=0.000001), "s1"),  # ≈ 5
            ("u2", "L1", "unknown", end - dt.timedelta(days=1), "s2"),  # weight 0: dropped
        ],
    )
    weighted = shards.weight_interactions(
        events,
        run_date=RUN_DATE,
        event_weights={"view": 1.0, "save": 3.0, "contact": 5.0},
        half_life_days=10.0,
    )
    rows = weighted.collect()
    assert [(r.user_id, r.listing_id) for r in rows] == [("u1", "L1")]
    assert rows[0].weight == pytest.approx(5.5, rel=1e-4)


def test_extend_vocabulary_keeps_old_indices_and_appends_new_ones(spark):
    first = shards.extend_vocabulary(spark.createDataFrame([("b",), ("a",), ("a",)], ["id"]))
    assert sorted(map(tuple, first.collect())) == [("a", 0), ("b", 1)]
    second = shards.extend_vocabulary(
        spark.createDataFrame([("c",), ("0",), ("b",)], ["id"]), first
    )
    expected = spark.createDataFrame(
        [("a", 0), ("b", 1), ("0", 2), ("c", 3)], training_examples.VOCABULARY_SCHEMA
    )
    assert_df_equality(
        conform(second, training_examples.USER_VOCABULARY_SPEC),
        expected,
        ignore_row_order=True,
        ignore_nullable=True,
    )


def test_feature_encoding_buckets_oov_and_nulls(spark, snapshot):
    encoding = features.fit_feature_encoding(snapshot, FEATURE_SPEC)
    cards = features.cardinalities(encoding)
    assert list(cards) == [
        *("make", "model", "body_type", "fuel_type", "transmission", "colour"),
        *("year_bucket", "mileage_km_bucket", "price_eur_bucket", "power_kw_bucket", "geo_cell"),
    ]
    assert features.dense_names(encoding) == [
        *("year_norm", "mileage_km_norm", "price_eur_norm", "power_kw_norm"),
        *("latitude_norm", "longitude_norm"),
    ]
    assert features.token_fields(encoding) == []
    assert encoding["codes"][0]["vocabulary"] == ["VW", "BMW"]  # by frequency
    vocab = shards.extend_vocabulary(snapshot.select(F.col("listing_id").alias("id")))
    unseen = listing_rows(spark, [("L5", "Tesla", 20_000.0, 52.5, 13.4, True)])
    encoded = {
        r.listing_id: r
        for r in features.encode_listing_features(
            snapshot.unionByName(unseen), vocab, encoding
        ).collect()
    }

    def code(listing_id, name):
        return encoded[listing_id].codes[list(cards).index(name)]

    def dense(listing_id, name):
        return encoded[listing_id].dense[features.dense_names(encoding).index(name)]

    assert code("L1", "make") == 1 and code("L3", "make") == 2
    assert code("L4", "make") == 0  # null make -> unknown bucket
    assert "L5" not in encoded  # not in the vocabulary -> not encoded
    assert code("L4", "price_eur_bucket") == 0 and code("L1", "price_eur_bucket") >= 1
    assert code("L1", "geo_cell") == code("L2", "geo_cell") != code("L3", "geo_cell")
    assert code("L4", "geo_cell") == 0 and dense("L4", "latitude_norm") == 0.0
    assert dense("L3", "price_eur_norm") > dense("L2", "price_eur_norm")
    assert all(len(r.codes) == len(cards) and r.tokens == [] for r in encoded.values())
    assert all(0 <= c < size for c, size in zip(encoded["L3"].codes, cards.values(), strict=True))

    oov_vocab = shards.extend_vocabulary(unseen.select(F.col("listing_id").alias("id")))
    tesla = features.encode_listing_features(unseen, oov_vocab, encoding).first()
    assert tesla.codes[0] == 0  # make never seen when fitting -> out-of-vocabulary bucket


def test_assemble_training_examples_and_cold_flags(spark, snapshot):
    encoding = features.fit_feature_encoding(snapshot, FEATURE_SPEC)
    listing_vocab = shards.extend_vocabulary(snapshot.select(F.col("listing_id").alias("id")))
    encoded = features.encode_listing_features(snapshot, listing_vocab, encoding)
    weighted = spark.createDataFrame(
        [("u1", "L1", 1.0), ("u2", "L1", 2.0), ("u2", "L2", 1.0)],
        "user_id string, listing_id string, weight float",
    )
    user_vocab = shards.extend_vocabulary(weighted.select(F.col("user_id").alias("id")))
    examples = shards.assemble_training_examples(weighted, user_vocab, listing_vocab)
    assert examples.columns == training_examples.SCHEMA.fieldNames()
    listing_idx = {r.id: r.idx for r in listing_vocab.collect()}
    user_idx = {r.id: r.idx for r in user_vocab.collect()}
    rows = sorted(examples.collect())
    assert [(r.user_idx, r.listing_idx, r.weight) for r in rows] == sorted(
        [
            (user_idx["u1"], listing_idx["L1"], 1.0),
            (user_idx["u2"], listing_idx["L1"], 2.0),
            (user_idx["u2"], listing_idx["L2"], 1.0),
        ]
    )
    log_q = {r.listing_idx: r.log_q for r in rows}
    assert log_q[listing_idx["L1"]] == pytest.approx(math.log(2 / 3))
    assert log_q[listing_idx["L2"]] == pytest.approx(math.log(1 / 3))

    marked = {
        r.listing_id: r.has_interactions
        for r in shards.mark_listings_with_interactions(encoded, examples).collect()
    }
    assert marked == {"L1": True, "L2": True, "L3": False, "L4": False}


@pytest.mark.parametrize("broadcast_listings", [True, False])
def test_assembled_examples_spread_over_files_are_the_same_rows(
    spark, snapshot, broadcast_listings
):
    listing_vocab = shards.extend_vocabulary(snapshot.select(F.col("listing_id").alias("id")))
    weighted = spark.createDataFrame(
        [(f"u{i}", f"L{1 + i % 4}", float(i)) for i in range(1, 41)],
        "user_id string, listing_id string, weight float",
    )
    user_vocab = shards.extend_vocabulary(weighted.select(F.col("user_id").alias("id")))
    plain = shards.assemble_training_examples(weighted, user_vocab, listing_vocab)
    spread = shards.assemble_training_examples(
        weighted,
        user_vocab,
        listing_vocab,
        broadcast_listings=broadcast_listings,
        num_files=3,
        seed=5,
    )
    assert spread.rdd.getNumPartitions() == 3
    assert spread.columns == plain.columns
    assert sorted(spread.collect()) == sorted(plain.collect())
    assert len(plain.collect()) == 40


def test_shuffle_into_files_keeps_every_row(spark):
    df = spark.range(1000).withColumnRenamed("id", "x")
    shuffled = shards.shuffle_into_files(df, num_files=4, seed=1)
    assert shuffled.rdd.getNumPartitions() == 4
    assert sorted(r.x for r in shuffled.collect()) == list(range(1000))
