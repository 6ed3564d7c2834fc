"""What a team would build in an afternoon, computed on the same split as the model.

Each baseline returns ranked neighbour lists ``(listing_id, neighbour_id, rank, score)`` over
the active listings, like the published table, so ``lib.evaluation`` scores them identically.

Inputs are the shard stage's outputs: ``examples`` are the training examples
``(user_idx, listing_idx, weight)``, whose weights already come from
``lib.shards.weight_interactions`` (same event-type weights, same time decay, same cleaning);
``listing_features`` is the shard stage's encoded listing table (``has_interactions`` False
means cold start). Cold listings have no interactions, so popularity and ALS can neither
place them nor recommend them; content and random can.

The co-interaction baselines (ItemKNN, RP3beta) are variants of ``lib.cointeraction``, EASE is
``lib.ease``; ``lib.scorecard`` tunes each on the validation split.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np
import pandas as pd
from pyspark.ml.recommendation import ALS
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql.types import FloatType, IntegerType, StringType, StructField, StructType

from lib.neighbours import exact_top_k, merge_top_k, ranked_rows
from schemas import TableSpec, training_examples

RANKED_SCHEMA = StructType(
    [
        StructField("listing_id", StringType(), nullable=False),
        StructField("neighbour_id", StringType(), nullable=False),
        StructField("rank", IntegerType(), nullable=False),
        StructField("score", FloatType(), nullable=False),
    ]
)
# A ranked neighbour list of any method (model or baseline), as evaluation stores it.
RANKED_SPEC = TableSpec(name="ranked_neighbours", schema=RANKED_SCHEMA, key=("listing_id", "rank"))

# Codes whose order means something: neighbouring buckets are partly similar.
_ORDINAL = ("year_bucket", "mileage_bucket", "price_bucket", "power_bucket")
# Buckets of a value that is also a dense feature: counted once, through the dense feature.
_HAS_DENSE_TWIN = ("year_bucket", "mileage_bucket", "price_bucket")
_RBF_CENTRES = np.linspace(-3.0, 3.0, 13)
_RBF_WIDTH = 0.5


def _ranked(scored: DataFrame, k: int) -> DataFrame:
    return merge_top_k(scored.where(F.col("listing_id") != F.col("neighbour_id")), k=k).select(
        "listing_id", "neighbour_id", "rank", F.col("score").cast("float")
    )


def _active_ids(listing_features: DataFrame) -> DataFrame:
    return listing_features.where(F.col("is_active")).select("listing_idx", "listing_id")


def listing_popularity(examples: DataFrame, listing_features: DataFrame) -> DataFrame:
    """(listing_id, popularity, users): summed training weight and distinct users per listing."""
    return (
        examples.groupBy("listing_idx")
        .agg(
            F.sum("weight").cast("double").alias("popularity"),
            F.countDistinct("user_idx").alias("users"),
        )
        .join(listing_features.select("listing_idx", "listing_id"), "listing_idx")
        .select("listing_id", "popularity", "users")
    )


def popularity_neighbours(examples: DataFrame, listing_features: DataFrame, *, k: int) -> DataFrame:
    """Every listing's neighbours are the k most popular active listings (itself excluded)."""
    popular = (
        listing_popularity(examples, listing_features)
        .join(_active_ids(listing_features), "listing_id")
        .orderBy(F.desc("popularity"), "listing_id")
        .limit(k + 1)
        .select(F.col("listing_id").alias("neighbour_id"), F.col("popularity").alias("score"))
    )
    queries = _active_ids(listing_features).select("listing_id")
    return _ranked(queries.crossJoin(F.broadcast(popular)), k)


def fit_als_item_vectors(
    examples: DataFrame,
    listing_features: DataFrame,
    *,
    rank: int = 32,
    max_iter: int = 10,
    reg_param: float = 0.1,
    alpha: float = 1.0,
    seed: int = 7,
) -> DataFrame:
    """Fit Spark MLlib ALS (implicit feedback) on the weights; return (listing_id, embedding).

    Runs the ALS fit (Spark jobs). Only listings with training interactions get a vector.
    """
    als = ALS(
        rank=rank,
        maxIter=max_iter,
        regParam=reg_param,
        alpha=alpha,
        implicitPrefs=True,
        userCol="user_idx",
        itemCol="listing_idx",
        ratingCol="weight",
        nonnegative=False,
        seed=seed,
    )
    model = als.fit(examples.select("user_idx", "listing_idx", F.col("weight").cast("float")))
    return model.itemFactors.join(
        listing_features.select(F.col("listing_idx").alias("id"), "listing_id"), "id"
    ).select("listing_id", F.col("features").alias("embedding"))


def als_neighbours(
    item_vectors: DataFrame, listing_features: DataFrame, *, k: int, num_blocks: int = 1
) -> DataFrame:
    """Cosine top-k over ALS item factors, among active listings that have factors."""
    active = _active_ids(listing_features).select("listing_id")
    return ranked_rows(
        exact_top_k(item_vectors.join(active, "listing_id"), k=k, num_blocks=num_blocks)
    )


def _content_block_sizes(cardinalities: Mapping[str, int]) -> list[tuple[str, str, int]]:
    blocks = []
    for code in training_examples.CATEGORICAL_CODES:
        if code in _HAS_DENSE_TWIN:
            continue
        kind = "ordinal" if code in _ORDINAL else "onehot"
        blocks.append((code, kind, int(cardinalities[code])))
    blocks += [(name, "dense", len(_RBF_CENTRES)) for name in training_examples.DENSE_FEATURES]
    return blocks


def content_vector(row: Mapping[str, float], blocks: list[tuple[str, str, int]]) -> np.ndarray:
    """The content baseline's feature vector of one encoded listing.

    One block per feature, each scaled to unit length, so the cosine of two listings is about
    the mean over features of a per-feature similarity: 1 for the same category, a Gaussian of
    the distance for bucket codes and z-scored dense values, nothing for an unknown (code 0).
    """
    parts = []
    for name, kind, size in blocks:
        block = np.zeros(size, dtype=np.float64)
        value = row[name]
        if kind == "onehot" and value > 0:
            block[int(value)] = 1.0
        elif kind == "ordinal" and value > 0:
            positions = np.arange(size)
            block = np.exp(-0.5 * (positions - value) ** 2)
            block[0] = 0.0
        elif kind == "dense":
            block = np.exp(-0.5 * ((_RBF_CENTRES - np.clip(value, -3.5, 3.5)) / _RBF_WIDTH) ** 2)
        norm = np.linalg.norm(block)
        parts.append(block / norm if norm > 0 else block)
    return np.concatenate(parts).astype(np.float32)


def content_vectors(listing_features: DataFrame, cardinalities: Mapping[str, int]) -> DataFrame:
    """(listing_id, embedding) for every active listing from its encoded features alone."""
    blocks = _content_block_sizes(cardinalities)
    names = [name for name, _, _ in blocks]

    def encode(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for pdf in batches:
            records = pdf[names].to_dict("records")
            yield pd.DataFrame(
                {
                    "listing_id": pdf["listing_id"].to_numpy(),
                    "embedding": [content_vector(r, blocks) for r in records],
                }
            )

    active = listing_features.where(F.col("is_active")).select("listing_id", *names)
    return active.mapInPandas(encode, "listing_id string, embedding array<float>")


def content_neighbours(
    listing_features: DataFrame,
    cardinalities: Mapping[str, int],
    *,
    k: int,
    num_blocks: int = 1,
) -> DataFrame:
    """Cosine top-k over ``content_vectors``: no learning, cold listings included."""
    return ranked_rows(
        exact_top_k(content_vectors(listing_features, cardinalities), k=k, num_blocks=num_blocks)
    )


def random_neighbours(listing_features: DataFrame, *, k: int, seed: int = 7) -> DataFrame:
    """k distinct random active listings per listing (never itself), reproducible from ``seed``.

    Listings are put in a random order (sorted by a seeded hash, ties by id; the positions are
    computed in parallel by ``lib.ordering.sorted_positions``, not in one ordered window);
    listing at position p gets the k positions after p + s, with a random start s of its own.
    """
    from lib.ordering import sorted_positions

    active = _active_ids(listing_features).select("listing_id")
    shuffled = sorted_positions(
        active.withColumn("_hash", F.xxhash64("listing_id", F.lit(seed))),
        ["_hash", "listing_id"],
        "pos",
    ).select("listing_id", "pos")
    size = active.agg(F.count(F.lit(1)).alias("_n"))
    span = F.col("_n") - 1
    draws = (
        shuffled.crossJoin(size)
        .where(span > 0)
        .select(
            "listing_id",
            "pos",
            "_n",
            F.pmod(F.xxhash64("listing_id", F.lit(seed + 1)), span).alias("_start"),
            F.explode(F.sequence(F.lit(0), F.least(F.lit(k), span) - 1)).alias("_j"),
        )
    )
    target = F.pmod(F.col("pos") + 1 + F.pmod(F.col("_start") + F.col("_j"), span), F.col("_n"))
    ids = shuffled.select(F.col("pos").alias("_target"), F.col("listing_id").alias("neighbour_id"))
    return (
        draws.withColumn("_target", target)
        .join(ids, "_target")
        .select(
            "listing_id",
            "neighbour_id",
            (F.col("_j") + 1).cast("int").alias("rank"),
            (F.lit(1.0) / (F.col("_j") + 2)).cast("float").alias("score"),
        )
    )
