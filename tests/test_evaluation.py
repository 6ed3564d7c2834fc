"""Holdout pairs and every metric on tiny hand-checked lists."""

import datetime as dt
import json
import math

import numpy as np
import pytest
from pyspark.sql import types as T

from lib import evaluation, feature_spec, features
from lib.feature_spec import from_dict
from schemas import training_examples

T0 = dt.datetime(2026, 11, 19, 10, 0)
NEIGHBOUR_SCHEMA = "method string, listing_id string, neighbour_id string, rank int, score float"
FEATURES = T.StructType(
    [
        T.StructField("listing_id", T.StringType()),
        T.StructField("is_active", T.BooleanType()),
        T.StructField("has_interactions", T.BooleanType()),
    ]
)


# Two categorical features, a numeric one and the coordinates: every coherence metric.
SPEC = from_dict(
    {
        "features": [
            {"column": "make", "kind": "categorical"},
            {"column": "body_type", "kind": "categorical"},
            {"column": "price_eur", "kind": "numeric"},
            {"kind": "geo"},
        ],
        "display": ["make", "body_type", "price_eur", "city"],
    }
)
CONTRACT = feature_spec.listings_table_spec(SPEC)


def snapshot_of(spark, rows):
    """The listings snapshot for ``SPEC``: dicts of the given columns, the others null."""
    names = CONTRACT.schema.fieldNames()
    return spark.createDataFrame(
        [{**dict.fromkeys(names), "is_active": True, **row} for row in rows], CONTRACT.schema
    )


def holdout(spark, rows):
    data = [(u, lid, kind, T0 + dt.timedelta(minutes=m), None) for u, lid, kind, m in rows]
    return spark.createDataFrame(data, training_examples.HOLDOUT_SCHEMA)


def lists(spark, rows):
    return spark.createDataFrame(rows, NEIGHBOUR_SCHEMA)


def metric_dict(df):
    return {(r.method, r.metric): r.value for r in df.collect()}


def test_holdout_pairs_collapse_repeats_and_keep_order(spark):
    events = holdout(
        spark,
        [
            ("u1", "A", "view", 0),
            ("u1", "A", "save", 1),  # same listing again: one step
            ("u1", "B", "view", 2),
            ("u1", "A", "view", 3),
            ("u1", "B", "view", 4),  # A→B again: counted once
            ("u2", "C", "view", 0),  # a single listing makes no pair
        ],
    )
    pairs = sorted(tuple(r) for r in evaluation.holdout_pairs(events).collect())
    assert pairs == [("u1", "A", "B"), ("u1", "B", "A")]


def test_label_pairs_marks_cold_and_drops_inactive_or_unknown(spark):
    pairs = spark.createDataFrame(
        [("u", "W1", "W2"), ("u", "W1", "C1"), ("u", "W1", "GONE"), ("u", "W1", "NOPE")],
        "user_id string, query_id string, target_id string",
    )
    features = spark.createDataFrame(
        [("W1", True, True), ("W2", True, True), ("C1", True, False), ("GONE", False, True)],
        FEATURES,
    )
    labelled = {
        (r.query_id, r.target_id): r.is_cold
        for r in evaluation.label_pairs(pairs, features).collect()
    }
    assert labelled == {("W1", "W2"): False, ("W1", "C1"): True}


def test_ranking_metrics_per_method_and_segment(spark):
    pairs = spark.createDataFrame(
        [("u1", "A", "B", False), ("u2", "A", "C", False), ("u3", "D", "A", True)],
        "user_id string, query_id string, target_id string, is_cold boolean",
    )
    neighbours = lists(
        spark,
        [
            ("m", "A", "B", 1, 0.9),
            ("m", "A", "C", 7, 0.5),
            ("m", "D", "A", 2, 0.8),
            ("other", "A", "X", 1, 0.9),  # never hits; has no list for D at all
        ],
    )
    got = metric_dict(evaluation.ranking_metrics(pairs, neighbours, ks=(5, 10)))
    assert got[("m", "pairs")] == 3
    assert got[("m", "hit_rate_at_5")] == pytest.approx(2 / 3)
    assert got[("m", "hit_rate_at_10")] == pytest.approx(1.0)
    assert got[("m", "mrr_at_10")] == pytest.approx((1 + 1 / 7 + 1 / 2) / 3)
    assert got[("m", "hit_rate_at_5_warm")] == pytest.approx(0.5)
    assert got[("m", "hit_rate_at_5_cold")] == pytest.approx(1.0)
    assert got[("m", "pairs_cold")] == 1
    assert got[("other", "hit_rate_at_10")] == 0.0
    assert got[("other", "mrr_at_10_cold")] == 0.0


def test_ranking_metrics_without_cold_pairs_are_null_not_zero(spark):
    pairs = spark.createDataFrame(
        [("u1", "A", "B", False)],
        "user_id string, query_id string, target_id string, is_cold boolean",
    )
    got = metric_dict(
        evaluation.ranking_metrics(pairs, lists(spark, [("m", "A", "B", 1, 1.0)]), ks=(5,))
    )
    assert got[("m", "hit_rate_at_5_cold")] is None
    assert got[("m", "pairs_cold")] == 0
    assert got[("m", "hit_rate_at_5_warm")] == 1.0


def test_coverage_and_popularity_bias(spark):
    active = spark.createDataFrame([(x,) for x in "ABCD"], "listing_id string")
    neighbours = lists(
        spark,
        [
            ("pop", "A", "B", 1, 1.0),
            ("pop", "B", "A", 1, 1.0),
            ("pop", "C", "A", 1, 1.0),
            ("pop", "D", "A", 1, 1.0),
            ("tail", "A", "D", 1, 1.0),
            ("tail", "B", "D", 1, 1.0),
        ],
    )
    got = metric_dict(evaluation.coverage_metrics(neighbours, active, k=1))
    assert got[("pop", "coverage_at_1")] == pytest.approx(0.5)  # A and B are shown
    assert got[("pop", "full_lists_at_1")] == pytest.approx(1.0)
    assert got[("tail", "full_lists_at_1")] == pytest.approx(0.5)

    popularity = spark.createDataFrame(
        [("A", 10.0), ("B", 5.0), ("C", 5.0)], "listing_id string, popularity double"
    )
    ranks = {
        r.listing_id: r.popularity_rank
        for r in evaluation.popularity_ranks(popularity, active).collect()
    }
    assert ranks == {"A": 1, "B": 2, "C": 2, "D": 4}  # ties share a rank, no history ranks last
    bias = metric_dict(
        evaluation.popularity_bias(neighbours, evaluation.popularity_ranks(popularity, active), k=1)
    )
    catalogue_mean = (1 + 2 + 2 + 4) / 4
    assert bias[("pop", "mean_popularity_rank_at_1")] == pytest.approx((2 + 1 + 1 + 1) / 4)
    assert bias[("tail", "popularity_rank_ratio_at_1")] == pytest.approx(4 / catalogue_mean)


def test_coherence_metrics(spark):
    rows = [
        ("A", "VW", "suv", 10_000.0, 52.0, 13.0),
        ("B", "VW", "suv", 20_000.0, 52.0, 13.0),
        ("C", "BMW", None, 10_000.0, 53.0, 13.0),
    ]
    snapshot = snapshot_of(
        spark,
        [
            {
                "listing_id": i,
                "make": m,
                "body_type": b,
                "price_eur": p,
                "latitude": la,
                "longitude": lo,
            }
            for i, m, b, p, la, lo in rows
        ],
    )
    neighbours = lists(spark, [("m", "A", "B", 1, 1.0), ("m", "A", "C", 2, 0.5)])
    got = metric_dict(evaluation.coherence_metrics(neighbours, snapshot, SPEC, k=2))
    assert set(got) == {
        ("m", "same_make_share"),
        ("m", "same_body_type_share"),
        ("m", "median_price_eur_ratio"),
        ("m", "median_distance_km"),
    }
    assert got[("m", "same_make_share")] == pytest.approx(0.5)
    # C has no body type: not counted.
    assert got[("m", "same_body_type_share")] == pytest.approx(1.0)
    assert got[("m", "median_price_eur_ratio")] in (pytest.approx(1.0), pytest.approx(2.0))
    assert got[("m", "median_distance_km")] in (pytest.approx(0.0), pytest.approx(111.2, abs=0.5))


def test_coherence_metrics_follow_the_spec(spark):
    snapshot = snapshot_of(
        spark,
        [
            {"listing_id": "A", "make": "VW", "body_type": "suv", "price_eur": 1.0},
            {"listing_id": "B", "make": "VW", "body_type": "van", "price_eur": 4.0},
        ],
    )
    neighbours = lists(spark, [("m", "A", "B", 1, 1.0)])
    # Only the first numeric feature and no geo: one ratio, no distance.
    numeric = from_dict({"features": [{"column": "price_eur", "kind": "numeric"}]})
    got = metric_dict(evaluation.coherence_metrics(neighbours, snapshot, numeric, k=1))
    assert got == {("m", "median_price_eur_ratio"): pytest.approx(4.0)}
    # The categorical feature declared second is the second one compared.
    swapped = from_dict(
        {
            "features": [
                {"column": "body_type", "kind": "categorical"},
                {"column": "make", "kind": "categorical"},
            ]
        }
    )
    got = metric_dict(evaluation.coherence_metrics(neighbours, snapshot, swapped, k=1))
    assert got == {("m", "same_body_type_share"): 0.0, ("m", "same_make_share"): 1.0}


def test_stability_against_previous_run(spark):
    current = lists(
        spark,
        [("model", "A", "B", 1, 1.0), ("model", "A", "C", 2, 1.0), ("model", "N", "A", 1, 1.0)],
    )
    previous = spark.createDataFrame(
        [("A", "B", 1, 1.0), ("A", "D", 2, 1.0)],
        "listing_id string, neighbour_id string, rank int, score float",
    )
    got = metric_dict(evaluation.stability_metrics(current, previous, k=2))
    assert got[("model", "stability_overlap_at_2")] == pytest.approx(0.5)  # N is new: ignored
    assert got[("model", "stability_listings")] == 1


def test_collect_flatten_and_headline(spark):
    metrics = spark.createDataFrame(
        [
            ("model", "hit_rate_at_10", 0.5),
            ("model", "hit_rate_at_10_cold", None),
            ("random", "hit_rate_at_10", float("nan")),
        ],
        "method string, metric string, value double",
    )
    collected = evaluation.collect_metrics(metrics)
    assert collected == {
        "model": {"hit_rate_at_10": 0.5, "hit_rate_at_10_cold": None},
        "random": {"hit_rate_at_10": None},
    }
    assert evaluation.flatten(collected) == {"model.hit_rate_at_10": 0.5}
    head = evaluation.headline(collected)
    assert set(head["model"]) == set(evaluation.HEADLINE)
    assert head["model"]["mrr_at_10"] is None
    assert not any(
        isinstance(v, float) and math.isnan(v) for m in head.values() for v in m.values() if v
    )


def test_evaluate_lists_scores_every_method_on_the_same_pairs(spark):
    events = holdout(
        spark,
        [
            ("u1", "A", "view", 0),
            ("u1", "B", "view", 1),
            ("u2", "C", "view", 0),
            ("u2", "A", "view", 1),
        ],
    )
    features = spark.createDataFrame(
        [("A", True, True), ("B", True, True), ("C", True, False)], FEATURES
    )
    popularity = spark.createDataFrame(
        [("A", 3.0), ("B", 1.0)], "listing_id string, popularity double"
    )
    snapshot = snapshot_of(spark, [{"listing_id": x} for x in "ABC"])
    plain = "listing_id string, neighbour_id string, rank int, score float"
    found = evaluation.collect_metrics(
        evaluation.evaluate_lists(
            {
                "good": spark.createDataFrame([("A", "B", 1, 1.0), ("C", "A", 1, 1.0)], plain),
                "bad": spark.createDataFrame([("A", "C", 1, 1.0), ("C", "B", 1, 1.0)], plain),
            },
            pairs=evaluation.label_pairs(evaluation.holdout_pairs(events), features),
            listing_features=features,
            popularity=popularity,
            snapshot=snapshot,
            spec=SPEC,
        )
    )
    assert found["good"]["hit_rate_at_10_warm"] == 1.0
    assert found["good"]["hit_rate_at_10_cold"] == 1.0
    assert found["bad"]["hit_rate_at_10"] == 0.0
    assert found["good"]["pairs"] == found["bad"]["pairs"] == 2
    assert found["good"]["same_make_share"] is None  # no makes in this snapshot


def test_evaluate_job_writes_metrics_and_report(spark, tmp_path):
    """The stage on a hand-made run folder: shards, both tables (two runs), no model artifact."""
    from jobs import evaluate
    from lib import baselines, cointeraction, delta_io, neighbours, scorecard, similarity
    from lib.cointeraction import Variant
    from lib.parquet_io import write_json, write_parquet
    from schemas import listing_embeddings, listing_neighbours

    ids = [f"L{i}" for i in range(8)]
    cold = {"L7"}
    snapshot = snapshot_of(
        spark,
        [
            {
                "listing_id": lid,
                "make": "VW" if i % 2 else "BMW",
                "body_type": "suv",
                "price_eur": 1000.0 * (i + 1),
                "latitude": 52.0 + i / 100,
                "longitude": 13.0,
                "city": "Berlin",
            }
            for i, lid in enumerate(ids)
        ],
    )
    write_parquet(snapshot, tmp_path / "inputs" / "listings", CONTRACT)
    # The shard stage's encoding of that snapshot, the listing_idx in id order.
    encoding = features.fit_feature_encoding(snapshot, SPEC)
    vocab = spark.createDataFrame(list(zip(ids, range(8), strict=True)), "id string, idx int")
    encoded = features.encode_listing_features(snapshot, vocab, encoding).orderBy("listing_idx")
    # has_interactions is the fourth column: False for the cold listing.
    feature_rows = [(*r[:3], r.listing_id not in cold, *r[4:]) for r in encoded.collect()]
    shards = tmp_path / "work" / "2026-11-20" / "shards"
    catalogue = spark.createDataFrame(feature_rows, training_examples.LISTING_FEATURES_SCHEMA)
    write_parquet(catalogue, shards / "listing_features", training_examples.LISTING_FEATURES_SPEC)
    train = [(u, i, 1.0, -2.0) for u in range(6) for i in (u, u + 1)]
    examples = spark.createDataFrame(train, training_examples.SCHEMA)
    for name in ("train", "train_full"):
        write_parquet(examples, shards / name, training_examples.SPEC)
    write_parquet(
        holdout(
            spark,
            [
                ("u1", "L1", "view", 0),
                ("u1", "L2", "view", 1),
                ("u2", "L6", "view", 0),
                ("u2", "L7", "view", 1),
            ],
        ),
        shards / "holdout",
        training_examples.HOLDOUT_SPEC,
    )
    write_parquet(
        holdout(spark, [("u3", "L3", "view", 0), ("u3", "L4", "view", 1)]),
        shards / "validation",
        training_examples.HOLDOUT_SPEC,
    )
    for name in ("cointeraction_fit", "cointeraction_full"):
        write_parquet(
            cointeraction.cointeraction_table(examples, catalogue),
            shards / name,
            training_examples.COINTERACTION_SPEC,
        )
    write_json(
        shards / "manifest.json",
        {
            "feature_spec": SPEC.to_dict(),
            "cardinalities": [[n, size] for n, size in features.cardinalities(encoding).items()],
            "encodings": encoding,
        },
    )
    chosen = {
        "itemknn": Variant("itemknn", shrink=10.0).to_dict(),
        "rp3beta": Variant("rp3beta", alpha=0.5, beta=0.3).to_dict(),
        "variant": Variant("itemknn").to_dict(),
        "weights": {},
        "pairs": 1,
    }
    write_json(similarity.validation_path(str(shards)), chosen)
    model_dir = tmp_path / "models" / "m1"
    model_dir.mkdir(parents=True)
    write_json(model_dir / "metrics.json", {"loss_per_epoch": [3.0, 2.0]})

    rng = np.random.default_rng(0)
    tables = {
        name: str(tmp_path / "tables" / name)
        for name in ("listing_embeddings", "listing_neighbours")
    }
    for day in (dt.date(2026, 11, 19), dt.date(2026, 11, 20)):
        emb = spark.createDataFrame(
            [
                (lid, rng.normal(size=4).astype(np.float32).tolist(), "m1", lid in cold, day)
                for lid in ids
            ],
            listing_embeddings.SCHEMA,
        )
        delta_io.write_table(emb, tables["listing_embeddings"], listing_embeddings.SPEC)
        top = neighbours.exact_top_k(emb, k=5, num_blocks=1)
        delta_io.write_table(
            neighbours.to_neighbours_table(top, model_version="m1", run_date=day),
            tables["listing_neighbours"],
            listing_neighbours.SPEC,
        )
    for name in ("content", "embedding"):
        write_parquet(
            neighbours.ranked_rows(top),
            similarity.components_path(str(shards)) / name,
            baselines.RANKED_SPEC,
        )

    stats = evaluate.run(
        spark,
        evaluate.parse_args(
            [
                "--shards",
                str(shards),
                "--listings",
                str(tmp_path / "inputs" / "listings"),
                "--embeddings",
                tables["listing_embeddings"],
                "--neighbours",
                tables["listing_neighbours"],
                "--model",
                str(model_dir),
                "--run-date",
                "2026-11-20",
                "--out",
                str(tmp_path / "report"),
                "--k",
                "5",
                "--stage-seconds",
                '{"shards": 1.5}',
                "--baselines",
                "itemknn,rp3beta,ease,content,embedding,popularity,random",
            ]
        ),
    )

    # ALS is left out only to keep this test short: tests/test_baselines.py fits it.
    assert list(stats["headline"]) == [
        "model",
        "itemknn",
        "rp3beta",
        "ease",
        "content",
        "embedding",
        "popularity",
        "random",
    ]
    assert stats["validation"]["itemknn"]["name"] == "itemknn_binary_shrink10"
    assert stats["validation"]["ease"]["lambda"] in scorecard.EASE_LAMBDAS
    assert (
        stats["metrics"]["model.pairs_cold"] == 1.0 and stats["metrics"]["model.pairs_warm"] == 1.0
    )
    assert 0.0 <= stats["metrics"]["model.stability_overlap_at_10"] <= 1.0  # vs 2026-11-19
    assert "itemknn.stability_overlap_at_10" not in stats["metrics"]
    stored = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert stored["previous_run_date"] == "2026-11-19"
    page = (tmp_path / "report" / "report.html").read_text()
    assert "Model versus baselines" in page and "L7" in page
    assert (shards.parent / "evaluation" / "content").is_dir()
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--shards", "x"])  # the other paths are required

    # `listing-similarity similar` reads the same tables back for one listing.
    from jobs import similar

    found = similar.run(spark, similar.parse_args(["L7", "--root", str(tmp_path), "--k", "3"]))
    assert found["run_date"] == "2026-11-20"  # the latest run by default
    assert [n["rank"] for n in found["neighbours"]] == [1, 2, 3]
    assert all(
        n["distance_km"] is not None and "Berlin" in n["listing"] for n in found["neighbours"]
    )
    with pytest.raises(SystemExit, match="no neighbours"):
        similar.run(spark, similar.parse_args(["NOPE", "--root", str(tmp_path)]))
