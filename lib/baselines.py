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
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from pyspark.ml.recommendation import ALS
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql.types import FloatType, IntegerType, StringType, StructField, StructType

from lib import features
from lib.neighbours import exact_top_k, merge_top_k, ranked_rows
from schemas import TableSpec

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

_RBF_CENTRES = np.linspace(-3.0, 3.0, 13)
_RBF_WIDTH = 0.5
# A block of a category with more values than this folds them onto this many positions:
# two values share one with odds 1/1024, while a listing's vector stays a few thousand floats.
_MAX_BLOCK = 1024


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


@dataclass(frozen=True)
class ContentBlock:
    """One feature's share of the content vector: where its value sits (``column``: codes,
    dense or tokens; ``start``/``width`` inside that array) and how it is spread."""

    name: str
    column: str
    start: int
    width: int
    kind: str  # "onehot" (width 1), "bag" (token slots) or "rbf" (a z-score)
    size: int


def content_blocks(encoding: Mapping[str, Any]) -> list[ContentBlock]:
    """The blocks of the encoding's features. Buckets are left out: their values are also
    z-scores, which the RBF block compares more finely."""
    blocks = [
        ContentBlock(entry["name"], "codes", j, 1, "onehot", min(size, _MAX_BLOCK))
        for j, (entry, size) in enumerate(
            zip(encoding["codes"], features.cardinalities(encoding).values(), strict=True)
        )
        if entry["kind"] != "bucket"
    ]
    blocks += [
        ContentBlock(entry["name"], "dense", j, 1, "rbf", len(_RBF_CENTRES))
        for j, entry in enumerate(encoding["dense"])
    ]
    start = 0
    for name, size, slots in features.token_fields(encoding):
        blocks.append(ContentBlock(name, "tokens", start, slots, "bag", min(size, _MAX_BLOCK)))
        start += slots
    return blocks


def _block_vectors(values: np.ndarray, block: ContentBlock) -> np.ndarray:
    """``[rows, block.size]`` unit rows (zero where the feature is unknown)."""
    rows = len(values)
    out = np.zeros((rows, block.size), np.float32)
    if block.kind == "rbf":
        clipped = np.clip(values[:, 0], -3.5, 3.5)
        out[:] = np.exp(-0.5 * ((_RBF_CENTRES[None, :] - clipped[:, None]) / _RBF_WIDTH) ** 2)
    else:
        codes = values.astype(np.int64)
        row, slot = np.nonzero(codes > 0)
        # Code c >= 1 at position (c - 1) mod size; 0 is unknown or padding and adds nothing.
        np.add.at(out, (row, (codes[row, slot] - 1) % block.size), 1.0)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return np.divide(out, norms, out=np.zeros_like(out), where=norms > 0)


def content_matrix(
    codes: np.ndarray, dense: np.ndarray, tokens: np.ndarray, blocks: list[ContentBlock]
) -> np.ndarray:
    """The content baseline's vectors of encoded listings, one row each.

    One unit block per feature, so the cosine of two listings is about the mean over features
    of a per-feature similarity: 1 for the same category, the share of shared tokens for a bag,
    a Gaussian of the distance for z-scored values, nothing for an unknown.
    """
    arrays = {"codes": codes, "dense": dense, "tokens": tokens}
    parts = [_block_vectors(arrays[b.column][:, b.start : b.start + b.width], b) for b in blocks]
    rows = len(codes)
    return np.hstack(parts) if parts else np.zeros((rows, 0), np.float32)


def _stacked(column: pd.Series, dtype) -> np.ndarray:
    if len(column) == 0:
        return np.zeros((0, 0), dtype)
    return np.stack([np.asarray(v, dtype) for v in column]).reshape(len(column), -1)


def content_vectors(listing_features: DataFrame, encoding: Mapping[str, Any]) -> DataFrame:
    """(listing_id, embedding) for every active listing from its encoded features alone.

    A catalogue without features has no content vectors: an empty DataFrame (the content
    baseline then has no lists, and the blend leaves it out).
    """
    blocks = content_blocks(encoding)

    def encode(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for pdf in batches:
            matrix = content_matrix(
                _stacked(pdf["codes"], np.int64),
                _stacked(pdf["dense"], np.float32),
                _stacked(pdf["tokens"], np.int64),
                blocks,
            )
            yield pd.DataFrame(
                {"listing_id": pdf["listing_id"].to_numpy(), "embedding": list(matrix)}
            )

    active = listing_features.where(F.col("is_active") & F.lit(bool(blocks)))
    return active.select("listing_id", "codes", "dense", "tokens").mapInPandas(
        encode, "listing_id string, embedding array<float>"
    )


def content_neighbours(
    listing_features: DataFrame,
    encoding: Mapping[str, Any],
    *,
    k: int,
    num_blocks: int = 1,
) -> DataFrame:
    """Cosine top-k over ``content_vectors``: no learning, cold listings included."""
    return ranked_rows(
        exact_top_k(content_vectors(listing_features, encoding), k=k, num_blocks=num_blocks)
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
