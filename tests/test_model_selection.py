"""Choosing the training epoch on the validation pairs."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lib.loader import ListingFeatures
from lib.model import TwoTowerConfig, TwoTowerModel
from lib.model_selection import read_validation_set, validation_hit_rate
from lib.schema_check import arrow_schema
from lib.training import _best_epoch, _stalled
from schemas.training_examples import LISTING_FEATURES_SPEC

CARDS = (("make", 4), ("model", 6))
TOKENS = (("amenities", 5, 2),)
N = 40


def model_and_features():
    torch.manual_seed(0)
    config = TwoTowerConfig(
        num_users=5,
        num_listings=N,
        cardinalities=CARDS,
        num_dense=2,
        token_fields=TOKENS,
        dim=8,
        id_dim=8,
        feature_dim=4,
        hidden=16,
    )
    gen = torch.Generator().manual_seed(1)
    # The single codes, then the token slots (as read_listing_features lays them out).
    codes = torch.stack(
        [torch.randint(0, c, (N,), generator=gen) for _, c in CARDS]
        + [torch.randint(0, n, (N,), generator=gen) for _, n, s in TOKENS for _ in range(s)],
        1,
    )
    features = ListingFeatures(codes.int(), torch.randn(N, 2, generator=gen))
    return TwoTowerModel(config), features


def write_shards(root, pairs, *, active, known):
    (root / "validation_pairs").mkdir(parents=True)
    (root / "listing_features").mkdir()
    q, t = zip(*pairs, strict=True)
    pq.write_table(
        pa.table({"query_idx": pa.array(q, pa.int32()), "target_idx": pa.array(t, pa.int32())}),
        root / "validation_pairs" / "part-0.parquet",
    )
    pq.write_table(
        pa.table(
            {
                "listing_idx": list(range(N)),
                "listing_id": [f"L{i}" for i in range(N)],
                "is_active": active,
                "has_interactions": known,
                "codes": [[1, 2]] * N,
                "dense": [[0.0, 0.0]] * N,
                "tokens": [[3, 0]] * N,
            },
            schema=arrow_schema(LISTING_FEATURES_SPEC.schema),
        ),
        root / "listing_features" / "part-0.parquet",
    )


def test_hit_rate_equals_a_numpy_top_10_over_active_listings(tmp_path):
    model, features = model_and_features()
    rng = np.random.default_rng(2)
    active = [i % 7 != 0 for i in range(N)]
    known = [i % 3 != 0 for i in range(N)]
    pairs = [(int(a), int(b)) for a, b in rng.integers(0, N, (60, 2)) if a != b and active[b]]
    write_shards(tmp_path, pairs, active=active, known=known)
    validation = read_validation_set(tmp_path, N)
    found = validation_hit_rate(model, features, validation, device=torch.device("cpu"), block=7)

    with torch.no_grad():
        model.eval()
        vectors = model.listing_vectors(
            torch.arange(N),
            features.codes.long(),
            features.dense,
            id_known=torch.tensor(known),
        ).numpy()
    hits = []
    for a, b in pairs:
        scores = vectors[a] @ vectors.T
        scores[[i for i in range(N) if not active[i] or i == a]] = -np.inf
        hits.append(b in np.argsort(-scores)[:10])
    assert found == pytest.approx(np.mean(hits))
    assert 0 < found < 1


def test_without_validation_pairs_there_is_nothing_to_choose_on(tmp_path):
    assert read_validation_set(tmp_path, N) is None


def test_the_best_validated_epoch_wins_and_the_earliest_of_equals():
    history = [
        {"epoch": 1, "validation_hit_rate_at_10": 0.1},
        {"epoch": 2},
        {"epoch": 3, "validation_hit_rate_at_10": 0.3},
        {"epoch": 4, "validation_hit_rate_at_10": 0.3},
        {"epoch": 5, "validation_hit_rate_at_10": 0.2},
    ]
    assert _best_epoch(history) == 3
    assert _best_epoch([{"epoch": 1}, {"epoch": 2}]) == 2


def test_training_stalls_when_the_last_validations_do_not_beat_an_earlier_one():
    def history(*scores):
        return [{"epoch": i + 1, "validation_hit_rate_at_10": v} for i, v in enumerate(scores)]

    assert _stalled(history(0.2, 0.5, 0.4, 0.5, 0.3), patience=3)  # a tie is no better
    assert not _stalled(history(0.2, 0.5, 0.4, 0.6, 0.3), patience=3)
    assert not _stalled(history(0.5, 0.4, 0.3), patience=3)  # nothing earlier to compare with
    assert not _stalled(history(0.5, 0.4, 0.3, 0.2), patience=0)
    # Epochs without validation do not count.
    assert _stalled([*history(0.5, 0.1), {"epoch": 3}], patience=1)
