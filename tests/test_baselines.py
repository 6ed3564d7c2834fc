"""Baselines on a tiny catalogue whose right answers are obvious."""

import datetime as dt

import numpy as np
import pytest

from lib import baselines
from lib.shards import weight_interactions
from schemas import interactions, training_examples

RUN_DATE = dt.date(2026, 11, 20)
# An encoding as ``lib.features.fit_feature_encoding`` returns it for a car catalogue: single
# codes (two categoricals, a price bucket, a geo cell), z-scores, no token features.
ENCODING = {
    "version": 2,
    "spec": {
        "features": [
            {"column": "make", "kind": "categorical"},
            {"column": "body_type", "kind": "categorical"},
            {"column": "price_eur", "kind": "numeric", "log": True},
            {"kind": "geo"},
        ]
    },
    "codes": [
        {"name": "make", "source": "make", "kind": "categorical", "vocabulary": ["VW", "BMW", "X"]},
        {"name": "body_type", "source": "body_type", "kind": "categorical", "vocabulary": ["a"]},
        {"name": "price_eur_bucket", "source": "price_eur", "kind": "bucket", "bounds": [1, 2]},
        {
            "name": "geo_cell",
            "source": "geo",
            "kind": "geo_cell",
            "cell_degrees": 0.5,
            "vocabulary": ["0:0", "0:1", "1:1"],
        },
    ],
    "dense": [
        {"name": "price_eur_norm", "source": "price_eur", "log": True, "mean": 0.0, "std": 1.0},
        {"name": "latitude_norm", "source": "latitude", "log": False, "mean": 0.0, "std": 1.0},
        {"name": "longitude_norm", "source": "longitude", "log": False, "mean": 0.0, "std": 1.0},
    ],
    "tokens": [],
}
MAKE, PRICE, LAT = 0, 2, 1  # positions in codes, codes and dense


def encoded(make: int = 0, price: int = 0, lat: float = 0.0) -> tuple[list[int], list[float]]:
    """A listing's codes and dense values: the given make, price bucket and latitude z-score."""
    codes, dense = [0] * len(ENCODING["codes"]), [0.0] * len(ENCODING["dense"])
    codes[MAKE], codes[PRICE], dense[LAT] = make, price, lat
    return codes, dense


def features(spark, rows):
    """rows: (idx, id, active, has_interactions, make code, price bucket, latitude z-score)."""
    data = [
        (idx, lid, active, seen, *encoded(make, price, lat), [])
        for idx, lid, active, seen, make, price, lat in rows
    ]
    return spark.createDataFrame(data, training_examples.LISTING_FEATURES_SCHEMA)


@pytest.fixture(scope="module")
def catalogue(spark):
    return features(
        spark,
        [
            (0, "A", True, True, 1, 1, 0.0),
            (1, "B", True, True, 1, 1, 0.1),
            (2, "C", True, True, 2, 3, 2.0),
            (3, "D", True, True, 2, 3, 2.1),
            (4, "OLD", False, True, 1, 1, 0.0),  # inactive: never a neighbour
            (5, "NEW", True, False, 2, 3, 2.05),  # cold: features only
        ],
    )


@pytest.fixture(scope="module")
def examples(spark, catalogue):
    """Decayed weights exactly as the shard stage computes them."""
    ts = dt.datetime(2026, 11, 18, 12)
    events = [
        ("u1", "A", "contact"),
        ("u1", "B", "contact"),
        ("u2", "A", "view"),
        ("u2", "B", "view"),
        ("u2", "C", "view"),
        ("u3", "C", "contact"),
        ("u3", "D", "contact"),
        ("u4", "D", "view"),
        ("u4", "OLD", "view"),
        ("u5", "A", "view"),
    ]
    df = spark.createDataFrame(
        [(u, lid, kind, ts, None, None, ts.date()) for u, lid, kind in events], interactions.SCHEMA
    )
    weighted = weight_interactions(
        df, run_date=RUN_DATE, event_weights={"view": 1.0, "contact": 5.0}, half_life_days=21.0
    )
    users = {f"u{i}": i for i in range(1, 6)}
    ids = {r.listing_id: r.listing_idx for r in catalogue.collect()}
    rows = [(users[r.user_id], ids[r.listing_id], r.weight) for r in weighted.collect()]
    return spark.createDataFrame(rows, "user_idx int, listing_idx int, weight float")


def lists_of(df):
    out = {}
    for r in df.orderBy("listing_id", "rank").collect():
        out.setdefault(r.listing_id, []).append(r.neighbour_id)
    return out


def test_popularity_same_list_for_everyone_without_self(spark, catalogue, examples):
    got = lists_of(baselines.popularity_neighbours(examples, catalogue, k=2))
    assert set(got) == {"A", "B", "C", "D", "NEW"}
    # A: a contact and two views; B, C, D tie on a contact and a view (ties by id); OLD inactive.
    assert got["NEW"] == ["A", "B"]
    assert got["A"] == ["B", "C"]
    assert all(lid not in ns for lid, ns in got.items())


def test_content_vector_is_a_mean_of_per_feature_similarities():
    blocks = baselines.content_blocks(ENCODING)
    # One block per categorical, geo cell and z-score; the price bucket is left out.
    assert [b.name for b in blocks] == [
        "make",
        "body_type",
        "geo_cell",
        "price_eur_norm",
        "latitude_norm",
        "longitude_norm",
    ]

    def vector(**values):
        codes, dense = encoded(**values)
        return baselines.content_matrix(
            np.array([codes]), np.array([dense], np.float32), np.zeros((1, 0), np.int64), blocks
        )[0]

    a = vector(make=1, lat=0.0)
    same = vector(make=1, lat=0.0)
    other = vector(make=2, lat=0.0)
    far = vector(make=1, lat=3.0)

    def cosine(x, y):
        return float(x @ y / np.linalg.norm(x) / np.linalg.norm(y))

    assert cosine(a, same) == pytest.approx(1.0)
    assert cosine(a, far) < cosine(a, same)
    assert cosine(a, other) < cosine(a, same)
    # An unknown code (0) contributes nothing rather than matching other unknowns.
    unknown = vector()
    assert cosine(unknown, a) < 1.0


def test_content_neighbours_place_cold_listings_by_features(spark, catalogue):
    got = lists_of(baselines.content_neighbours(catalogue, ENCODING, k=2))
    assert set(got["NEW"]) == {"C", "D"}
    assert got["A"][0] == "B"
    assert "OLD" not in {n for ns in got.values() for n in ns}


def test_als_item_vectors_and_neighbours(spark, catalogue, examples):
    vectors = baselines.fit_als_item_vectors(examples, catalogue, rank=4, max_iter=5, seed=1)
    with_vectors = {r.listing_id for r in vectors.collect()}
    assert with_vectors == {"A", "B", "C", "D", "OLD"}  # every listing with history, no cold one
    got = lists_of(baselines.als_neighbours(vectors, catalogue, k=2))
    assert set(got) == {"A", "B", "C", "D"}
    assert all(n in {"A", "B", "C", "D"} for ns in got.values() for n in ns)


def test_random_neighbours_distinct_active_reproducible(spark, catalogue):
    first = lists_of(baselines.random_neighbours(catalogue, k=3, seed=5))
    again = lists_of(baselines.random_neighbours(catalogue, k=3, seed=5))
    assert first == again
    assert set(first) == {"A", "B", "C", "D", "NEW"}
    for lid, ns in first.items():
        assert len(ns) == 3 and len(set(ns)) == 3 and lid not in ns
        assert "OLD" not in ns
