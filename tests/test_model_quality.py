"""Embedding quality on a generated marketplace whose ground truth is known.

The sample generator hides each listing's segment and each user's home and search radius;
users view cars of their segments near home. A trained model must place listings near ones of
the same segment within their buyers' search radius, and do almost as well for cold-start
listings (embedded from features alone). The same checks run on broken models (random vectors,
features ignored, an untrained tower) to prove the margins mean something.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from lib import feature_spec
from lib.checkpoints import load_artifact
from lib.delta_io import read_input
from lib.model import TwoTowerModel
from lib.sample_data import MarketplaceSize, generate_marketplace, write_marketplace
from lib.sample_world import haversine_km
from lib.shard_writer import ShardParams, write_shards
from lib.training import TrainParams, model_config, read_manifest, train_worker
from schemas import interactions

pytestmark = pytest.mark.slow

RUN_DATE = dt.date(2026, 11, 20)
K = 10


@dataclass(frozen=True)
class World:
    """Active listings (model inputs + truth) and the trained model."""

    listings: pd.DataFrame
    model: TwoTowerModel
    manifest: dict
    metrics: dict


@pytest.fixture(scope="module")
def world(spark, tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("quality")
    size = MarketplaceSize(n_listings=1500, n_users=2500, n_events=90_000, days=30)
    market = generate_marketplace(size, RUN_DATE + dt.timedelta(days=1), seed=3)
    paths = write_marketplace(market, str(root / "inputs"))
    # The car features the generator declares beside its listings.
    spec = feature_spec.read(paths["feature_spec"])
    write_shards(
        spark,
        read_input(spark, paths["interactions"], interactions.SPEC),
        read_input(spark, paths["listings"], feature_spec.listings_table_spec(spec)),
        str(root / "shards"),
        ShardParams(run_date=RUN_DATE, lookback_days=30, num_files=4),
        spec=spec,
    )
    params = TrainParams(
        shards_dir=str(root / "shards"),
        out_dir=str(root / "model"),
        epochs=8,
        batch_size=512,
        log_every=0,
        min_steps=0,
    )
    with pytest.MonkeyPatch.context() as env:
        for name in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.delenv(name, raising=False)
        metrics = train_worker(params)
    model, _ = load_artifact(str(root / "model" / "model.pt"))
    return World(_listings(root, paths), model, read_manifest(str(root / "shards")), metrics)


def _listings(root: Path, paths: dict) -> pd.DataFrame:
    """Active listings with features, location, true segment and their buyers' median radius."""
    features = pq.read_table(root / "shards" / "listing_features").to_pandas()
    snapshot = pq.read_table(paths["listings"], columns=["listing_id", "latitude", "longitude"])
    truth = pq.read_table(paths["truth_listings"]).to_pandas()
    users = pq.read_table(paths["truth_users"], columns=["user_id", "radius_km"]).to_pandas()
    views = pq.read_table(paths["interactions"], columns=["user_id", "listing_id"]).to_pandas()
    buyers = views.drop_duplicates().merge(users, on="user_id")
    radius = buyers.groupby("listing_id").radius_km.median().rename("buyer_radius_km")
    out = (
        features[features.is_active]
        .merge(snapshot.to_pandas(), on="listing_id")
        .merge(truth, on="listing_id")
        .merge(radius, on="listing_id", how="left")
    )
    # A listing nobody viewed (cold) is judged by the radius a typical buyer searches.
    out["buyer_radius_km"] = out.buyer_radius_km.fillna(users.radius_km.median())
    return out.sort_values("listing_idx").reset_index(drop=True)


def embed(model: TwoTowerModel, frame: pd.DataFrame, *, use_features: bool = True) -> np.ndarray:
    """Listing vectors as the embeddings job computes them (cold listings without their id)."""
    # The single codes, then the token slots, as the listing tower reads them.
    codes = torch.as_tensor(
        np.hstack([np.stack(frame["codes"]), np.stack(frame["tokens"])]).astype(np.int64)
    )
    dense = torch.as_tensor(np.stack(frame["dense"]).astype(np.float32))
    if not use_features:
        codes, dense = torch.zeros_like(codes), torch.zeros_like(dense)
    with torch.inference_mode():
        return model.listing_vectors(
            torch.as_tensor(frame["listing_idx"].to_numpy(np.int64)),
            codes,
            dense,
            id_known=torch.as_tensor(frame["has_interactions"].to_numpy(bool)),
        ).numpy()


def coherence(vectors: np.ndarray, frame: pd.DataFrame, k: int = K) -> dict[str, float]:
    """Top-k cosine neighbours of every listing, judged against the ground truth.

    ``same_segment``: share of neighbours in the listing's segment; ``within_radius``: share
    within the listing's buyers' median search radius; ``median_km``: median neighbour
    distance. Separately for warm and cold listings, plus what random pairs give.
    """
    scores = vectors @ vectors.T
    np.fill_diagonal(scores, -np.inf)
    neighbours = np.argpartition(-scores, k, axis=1)[:, :k]
    randoms = np.random.default_rng(0).integers(0, len(frame), neighbours.shape)
    segment = frame["segment"].to_numpy()
    lat, lon = frame["latitude"].to_numpy(), frame["longitude"].to_numpy()
    radius = frame["buyer_radius_km"].to_numpy()[:, None]

    def km(other: np.ndarray) -> np.ndarray:
        return haversine_km(lat[:, None], lon[:, None], lat[other], lon[other])

    same = segment[neighbours] == segment[:, None]
    dist, random_dist = km(neighbours), km(randoms)
    cold = frame["is_cold"].to_numpy()
    out = {
        "chance_same_segment": float((segment[randoms] == segment[:, None]).mean()),
        "random_within_radius": float((random_dist <= radius).mean()),
        "random_median_km": float(np.median(random_dist)),
    }
    for name, rows in (("warm", ~cold), ("cold", cold)):
        out[f"{name}_same_segment"] = float(same[rows].mean())
        out[f"{name}_within_radius"] = float((dist <= radius)[rows].mean())
        out[f"{name}_median_km"] = float(np.median(dist[rows]))
    return out


def failed_checks(m: dict[str, float]) -> list[str]:
    """The quality bar; returns the checks that fail (empty when the embeddings pass)."""
    checks = {
        "warm neighbours share the segment": m["warm_same_segment"]
        >= max(0.6, 3 * m["chance_same_segment"]),
        "warm neighbours mostly within buyers' radius": m["warm_within_radius"]
        >= max(0.5, 3 * m["random_within_radius"]),
        "warm neighbours are near": m["warm_median_km"] <= 0.3 * m["random_median_km"],
        "cold neighbours share the segment": m["cold_same_segment"]
        >= max(0.8 * m["warm_same_segment"], 3 * m["chance_same_segment"]),
        "cold neighbours mostly within buyers' radius": m["cold_within_radius"]
        >= max(0.8 * m["warm_within_radius"], 3 * m["random_within_radius"]),
    }
    return [name for name, ok in checks.items() if not ok]


def test_training_converged(world):
    losses = world.metrics["loss_per_epoch"]
    assert losses[-1] < 0.75 * losses[0]
    assert world.listings["is_cold"].sum() >= 30  # enough cold listings to judge
    # The truth's "never interacted" is what the shard stage calls "no interactions".
    assert (world.listings["is_cold"] == ~world.listings["has_interactions"]).mean() > 0.95


def test_neighbours_share_segment_and_location_warm_and_cold(world):
    m = coherence(embed(world.model, world.listings), world.listings)
    assert failed_checks(m) == [], m


def _broken(world: World, kind: str) -> np.ndarray:
    frame = world.listings
    if kind == "random vectors":
        v = np.random.default_rng(1).normal(size=(len(frame), world.model.config.dim))
        return v / np.linalg.norm(v, axis=1, keepdims=True)
    if kind == "features ignored":
        return embed(world.model, frame, use_features=False)
    torch.manual_seed(0)
    params = TrainParams(shards_dir="", out_dir="")
    return embed(TwoTowerModel(model_config(world.manifest, params)).eval(), frame)


@pytest.mark.parametrize(
    ("kind", "must_fail"),
    [
        ("random vectors", "warm neighbours share the segment"),
        ("features ignored", "cold neighbours share the segment"),
        ("untrained", "warm neighbours share the segment"),
    ],
)
def test_broken_models_fail_the_same_checks(world, kind, must_fail):
    m = coherence(_broken(world, kind), world.listings)
    assert must_fail in failed_checks(m), m


def test_cold_vector_of_a_warm_listing_lands_near_its_warm_vector(world):
    """Dropping a warm listing's id (as if it were new) keeps it among its own kind."""
    warm = world.listings[world.listings["has_interactions"]]
    with_id = embed(world.model, warm)
    without_id = embed(world.model, warm.assign(has_interactions=False))
    rank = (without_id @ with_id.T > np.sum(without_id * with_id, 1)[:, None]).sum(1)
    # Median rank of the listing's own warm vector among all warm vectors (0 = nearest).
    assert np.median(rank) < 0.02 * len(warm), np.median(rank)
