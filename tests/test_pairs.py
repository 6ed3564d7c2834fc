"""Listing-listing training pairs: built by the shard stage, loaded, and the model's pair terms."""

import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from lib import shards
from lib.loader import ListingFeatures, PairLayout
from lib.model import TwoTowerConfig, TwoTowerModel
from schemas import training_examples as te

CARDS = (("make_code", 3), ("model_code", 5))


def config(**overrides):
    base = dict(
        num_users=4,
        num_listings=12,
        cardinalities=CARDS,
        num_dense=1,
        dim=8,
        id_dim=8,
        feature_dim=4,
        hidden=16,
        id_dropout=0.0,
    )
    return TwoTowerConfig(**{**base, **overrides})


def pair_batch(context, target, n_listings=12):
    gen = torch.Generator().manual_seed(0)
    codes = torch.stack([torch.randint(0, c, (n_listings,), generator=gen) for _, c in CARDS], 1)
    dense = torch.randn(n_listings, 1, generator=gen)
    context, target = torch.tensor(context), torch.tensor(target)
    return {
        "context_idx": context,
        "context_codes": codes[context],
        "context_dense": dense[context],
        "listing_idx": target,
        "codes": codes[target],
        "dense": dense[target],
        "weight": torch.ones(len(target)),
        "log_q": torch.full((len(target),), math.log(1 / 12)),
    }


def test_pair_examples_link_each_users_listings_both_ways(spark):
    rows = [
        (0, 10, 3.0, 0.0),
        (0, 11, 1.0, 0.0),
        (0, 12, 2.0, 0.0),
        (1, 10, 1.0, 0.0),
        (1, 13, 5.0, 0.0),
        (2, 14, 1.0, 0.0),
    ]
    examples = spark.createDataFrame(rows, te.SCHEMA)
    got = [
        tuple(r)
        for r in shards.pair_examples(
            examples, max_items_per_user=200, num_files=2, seed=1
        ).collect()
    ]
    pairs = {(c, t): w for c, t, w, _ in got}
    # user 0: three listings give two consecutive pairs, each both ways; user 1 one pair;
    # user 2 (one listing) none.
    assert len(got) == 2 * 2 + 2
    assert pairs[(10, 13)] == pairs[(13, 10)] == 1.0  # the smaller weight
    assert {t for c, t in pairs if c == 14} == set() and (14 not in {t for _, t in pairs})
    user0 = {frozenset(p) for p in pairs if set(p) <= {10, 11, 12}}
    assert len(user0) == 2
    log_q = {t: q for _, t, _, q in got}
    counts = {t: sum(1 for _, u, _, _ in got if u == t) for t in log_q}
    assert all(log_q[t] == pytest.approx(math.log(counts[t] / len(got))) for t in log_q)
    again = sorted(
        tuple(r)
        for r in shards.pair_examples(
            examples, max_items_per_user=200, num_files=3, seed=1
        ).collect()
    )
    assert again == sorted(got)  # the order is seeded, not drawn from the partitioning
    capped = shards.pair_examples(examples, max_items_per_user=1, num_files=1, seed=1)
    assert capped.count() == 0


def test_pair_layout_looks_up_both_sides_features():
    features = ListingFeatures(
        torch.arange(8, dtype=torch.int32).reshape(4, 2), torch.arange(4.0)[:, None]
    )
    layout = PairLayout(features)
    batch = pa.record_batch(
        [
            pa.array([3, 0], pa.int32()),
            pa.array([1, 2], pa.int32()),
            pa.array([2.0, 1.0], pa.float32()),
            pa.array([-1.0, -2.0], pa.float32()),
        ],
        names=list(layout.columns),
    )
    out = layout.unpack(layout.pack(batch))
    assert out["context_idx"].tolist() == [3, 0] and out["listing_idx"].tolist() == [1, 2]
    assert out["context_codes"].tolist() == [[6, 7], [0, 1]]
    assert out["codes"].tolist() == [[2, 3], [4, 5]]
    assert out["context_dense"][:, 0].tolist() == [3.0, 0.0]
    assert out["weight"].tolist() == [2.0, 1.0]
    with pytest.raises(ValueError, match="listing_features covers 4"):
        layout.unpack(layout.pack(batch.set_column(0, "context_idx", pa.array([9, 0], pa.int32()))))


def test_the_pair_term_trains_co_interacted_listings_together():
    torch.manual_seed(0)
    model = TwoTowerModel(config())
    # Listings 0-5 pair with their neighbour in a ring of two groups.
    context = [0, 1, 2, 3, 4, 5] * 4
    target = [1, 2, 0, 4, 5, 3] * 4
    batch = pair_batch(context, target)
    opt = torch.optim.Adam(model.dense_parameters(), lr=0.02)
    before = model.pair_loss(batch).item()
    for _ in range(150):
        loss = model.loss({"pairs": batch})
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert model.pair_loss(batch).item() < before
    with torch.no_grad():
        model.eval()
        idx = torch.arange(6)
        v = model.listing_vectors(idx, batch["context_codes"][:6], batch["context_dense"][:6])
        sims = (v @ v.T).numpy()
    same_group = np.mean([sims[0, 1], sims[1, 2], sims[3, 4], sims[4, 5]])
    across = np.mean([sims[0, 3], sims[1, 4], sims[2, 5]])
    assert same_group > across


def test_a_context_listing_is_never_its_own_negative():
    torch.manual_seed(1)
    model = TwoTowerModel(config())
    # Listing 0's only partner is 1; 0 is also a column (it is 2's partner).
    batch = pair_batch([0, 2], [1, 0])
    loss = model.pair_loss(batch)
    assert torch.isfinite(loss)
    # Masking the self column means the loss equals a softmax over the other columns only.
    with torch.no_grad():
        q = model.listing_vectors(
            batch["context_idx"], batch["context_codes"], batch["context_dense"]
        )
        c = model.listing_vectors(
            torch.tensor([0, 1]), batch["codes"][[1, 0]], batch["dense"][[1, 0]]
        )
        logits = q @ c.T / model.config.temperature
        # row 0 (context 0): columns {0 (self, masked), 1 (target)} -> only the target remains.
        assert model.pair_loss(batch).item() == pytest.approx(
            0.5 * 0.0 + 0.5 * float(-torch.log_softmax(logits[1], 0)[0]), rel=1e-4
        )


def test_alignment_is_zero_when_ids_add_nothing_and_positive_otherwise():
    model = TwoTowerModel(config())
    batch = pair_batch([0, 1, 2], [1, 2, 0])
    with torch.no_grad():
        model.listing_embedding.weight.zero_()
    assert model.alignment_loss(batch).item() == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        model.listing_embedding.weight.normal_(std=1.0)
        model.listing_embedding.weight[model.unknown_listing_idx].zero_()
    assert model.alignment_loss(batch).item() > 0.01


def test_a_step_touches_at_most_the_row_bounds_of_its_id_tables():
    model = TwoTowerModel(config(num_users=8, num_listings=40))
    users = pair_batch([0, 1, 2, 3], [0, 1, 2, 3], n_listings=40)
    users = {k: v for k, v in users.items() if not k.startswith("context")}
    users["user_idx"] = torch.tensor([4, 5, 6, 7])
    # Every lookup a different row: the gradients reach the bounds exactly.
    pairs = pair_batch([4, 5, 6, 7], [8, 9, 10, 11], n_listings=40)
    model({"users": users, "pairs": pairs}).backward()

    touched = [p.grad.coalesce()._nnz() for p in model.sparse_parameters()]
    assert touched == model.sparse_row_bounds(4, pairs=True) == [4, 12]
    assert model.sparse_row_bounds(4, pairs=False) == [4, 4]
    assert model.sparse_row_bounds(64, pairs=True) == [8, 40]  # at most the tables


def test_loss_terms_are_weighted_and_configs_checked():
    torch.manual_seed(2)
    batch = pair_batch([0, 1, 2], [1, 2, 0])
    only_pairs = TwoTowerModel(config(align_weight=0.0))
    assert only_pairs.loss({"pairs": batch}).item() == pytest.approx(
        only_pairs.pair_loss(batch).item()
    )
    with pytest.raises(ValueError, match="pair_weight"):
        config(pair_weight=-1.0)
