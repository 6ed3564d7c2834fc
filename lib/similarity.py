"""The neighbour stage's wiring of the blend: what it reads from the shards, the content search,
the choice on validation and the published lists (``lib.blend`` holds the arithmetic).

Validation uses components fitted without the validation days: the model (trained on the
``train`` examples, which end before them) and the co-interactions of ``cointeraction_fit``.
Publication uses the same model and content lists with the co-interactions of the whole
training window (``cointeraction_full``), so the last days before the run count too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from lib import ann, baselines, blend, evaluation, feature_spec, neighbours
from lib.cointeraction import VARIANTS, Variant
from lib.feature_spec import FeatureSpec
from lib.neighbours import ranked_rows
from lib.parquet_io import read_json, read_parquet, write_json, write_parquet
from schemas import training_examples as te

VALIDATION_FILE = "validation.json"


@dataclass(frozen=True)
class ShardInputs:
    """The shard stage's outputs that the blend reads (lazy DataFrames)."""

    listing_features: DataFrame
    fit_examples: DataFrame
    full_examples: DataFrame
    validation_events: DataFrame
    cointeraction_fit: DataFrame
    cointeraction_full: DataFrame
    # The shards' feature encoding (``lib.features``) and the spec it was fitted for.
    encoding: dict[str, Any]

    @property
    def spec(self) -> FeatureSpec:
        return feature_spec.from_dict(self.encoding["spec"])

    @classmethod
    def read(cls, spark: SparkSession, shards_dir: str) -> ShardInputs:
        root = Path(shards_dir)
        return cls(
            listing_features=read_parquet(
                spark, root / "listing_features", te.LISTING_FEATURES_SPEC
            ),
            fit_examples=read_parquet(spark, root / "train", te.SPEC),
            full_examples=read_parquet(spark, root / "train_full", te.SPEC),
            validation_events=read_parquet(spark, root / "validation", te.HOLDOUT_SPEC),
            cointeraction_fit=read_parquet(
                spark, root / "cointeraction_fit", te.COINTERACTION_SPEC
            ),
            cointeraction_full=read_parquet(
                spark, root / "cointeraction_full", te.COINTERACTION_SPEC
            ),
            encoding=read_json(root / "manifest.json")["encodings"],
        )


def validation_path(shards_dir: str) -> Path:
    """Where the neighbour stage records what validation chose (beside the shards)."""
    return Path(shards_dir).parent / VALIDATION_FILE


def components_path(shards_dir: str) -> Path:
    """Where the neighbour stage leaves the content and model lists for the evaluate stage."""
    return Path(shards_dir).parent / "components"


def write_components(
    content_lists: DataFrame, model_lists: DataFrame, shards_dir: str, *, k: int
) -> None:
    """The top-``k`` of the content and model searches as ranked rows (IO)."""
    for name, lists in (("content", content_lists), ("embedding", model_lists)):
        rows = ranked_rows(lists).where(F.col("rank") <= k)
        write_parquet(rows, components_path(shards_dir) / name, baselines.RANKED_SPEC)


def read_validation(shards_dir: str) -> dict[str, Any] | None:
    path = validation_path(shards_dir)
    return json.loads(path.read_text()) if path.exists() else None


def support(examples: DataFrame, listing_features: DataFrame) -> DataFrame:
    """(listing_id, users): distinct users with history per listing."""
    return (
        examples.groupBy("listing_idx")
        .agg(F.countDistinct("user_idx").alias("users"))
        .join(listing_features.select("listing_idx", "listing_id"), "listing_idx")
        .select("listing_id", "users")
    )


def _allowed_partners(
    cointeraction: DataFrame,
    embeddings: DataFrame,
    snapshot: DataFrame | None,
    key: str | None,
) -> DataFrame:
    """Co-interaction partners that may be published: embedded (active) listings, and with
    ``key``, of the listing's own partition."""
    active = embeddings.select(F.col("listing_id").alias("neighbour_id"))
    cointeraction = cointeraction.join(active, "neighbour_id", "left_semi")
    if key is None or snapshot is None:
        return cointeraction
    keys = snapshot.select("listing_id", F.col(key).cast("string").alias("_k"))
    return (
        cointeraction.join(keys, "listing_id")
        .join(
            keys.select(F.col("listing_id").alias("neighbour_id"), F.col("_k").alias("_nk")),
            "neighbour_id",
        )
        .where(F.col("_k").eqNullSafe(F.col("_nk")))
        .drop("_k", "_nk")
    )


def content_search(
    shards: ShardInputs,
    embeddings: DataFrame,
    *,
    params: ann.IvfParams,
    method: str,
    num_listings: int,
    partition_key: str | None = None,
    snapshot: DataFrame | None = None,
) -> ann.SearchResult:
    """Content neighbours (``baselines.content_vectors``) of the listings in ``embeddings``,
    with the same search as the model's; none when the catalogue declares no features."""
    if not baselines.content_blocks(shards.encoding):
        spark = embeddings.sparkSession
        empty = spark.createDataFrame([], neighbours.RANKED_LISTS_SCHEMA)
        return ann.SearchResult(empty, method="none", info={"content": "no features declared"})
    vectors = baselines.content_vectors(shards.listing_features, shards.encoding).join(
        embeddings.select("listing_id", *([partition_key] if partition_key else [])),
        "listing_id",
    )
    vectors = vectors.persist(StorageLevel.MEMORY_AND_DISK)
    found = ann.search(
        vectors,
        method=method,
        params=params,
        num_listings=num_listings,
        partition_col=partition_key,
    )
    found.top_k = found.top_k.persist(StorageLevel.MEMORY_AND_DISK)
    found.cached.extend([vectors, found.top_k])
    return found


def choose(
    shards: ShardInputs,
    embeddings: DataFrame,
    content_lists: DataFrame,
    model_lists: DataFrame,
    *,
    cf_limit: int,
    max_queries: int,
    seed: int,
    variants: tuple[Variant, ...] = VARIANTS,
    partition_key: str | None = None,
    snapshot: DataFrame | None = None,
) -> dict[str, Any]:
    """``blend.choose_on_validation`` on the shards' validation pairs (runs Spark jobs)."""
    pairs = evaluation.label_pairs(
        evaluation.holdout_pairs(shards.validation_events), shards.listing_features
    )
    return blend.choose_on_validation(
        pairs,
        support=support(shards.fit_examples, shards.listing_features),
        cointeraction=_allowed_partners(
            shards.cointeraction_fit, embeddings, snapshot, partition_key
        ),
        content_lists=content_lists,
        model_lists=model_lists,
        variants=variants,
        cf_limit=cf_limit,
        max_queries=max_queries,
        seed=seed,
    )


def publish_lists(
    shards: ShardInputs,
    embeddings: DataFrame,
    content_lists: DataFrame,
    model_lists: DataFrame,
    choice: dict[str, Any],
    *,
    k: int,
    cf_limit: int,
    partition_key: str | None = None,
    snapshot: DataFrame | None = None,
) -> DataFrame:
    """Every listing of ``embeddings``' blended top-``k`` (ranked lists, lazy)."""
    inputs = blend.blend_inputs(
        embeddings.select("listing_id"),
        support(shards.full_examples, shards.listing_features),
        _allowed_partners(shards.cointeraction_full, embeddings, snapshot, partition_key),
        content_lists,
        model_lists,
    )
    return blend.blended_lists(
        inputs,
        variant=Variant.from_dict(choice["variant"]),
        weights=blend.weights_table(choice),
        k=k,
        cf_limit=cf_limit,
    )


def summary(choice: dict[str, Any]) -> dict[str, Any]:
    """The part of the choice that goes into the commit metadata and the runs row."""
    return {
        "variant": choice["variant"]["name"],
        "weights": choice["weights"],
        "pairs": choice["pairs"],
        "pairs_by_group": choice["pairs_by_group"],
        "queries": choice["queries"],
        "hit_rate_at_10": choice["hit_rate_at_10"],
    }


@dataclass
class Blended:
    """The blended lists of a run (lazy, persisted), what validation chose, and the content
    search whose cached parts the lists read until ``release()``."""

    lists: DataFrame
    choice: dict[str, Any]
    content: ann.SearchResult

    def release(self) -> None:
        self.lists.unpersist()
        self.content.release()


def blend_for_run(
    spark: SparkSession,
    shards_dir: str,
    embeddings: DataFrame,
    model_lists: DataFrame,
    *,
    params: ann.IvfParams,
    method: str,
    num_listings: int,
    k: int,
    validation_queries: int,
    seed: int = 7,
    partition_key: str | None = None,
    snapshot: DataFrame | None = None,
) -> Blended:
    """The neighbour stage's blend: content search, choice on validation (written beside the
    shards with the content and model lists), and every listing's blended top-``k``.

    IO: reads the shards, runs Spark jobs, writes ``validation.json`` and ``components/``.
    """
    shards = ShardInputs.read(spark, shards_dir)
    content = content_search(
        shards,
        embeddings,
        params=params,
        method=method,
        num_listings=num_listings,
        partition_key=partition_key,
        snapshot=snapshot,
    )
    choice = choose(
        shards,
        embeddings,
        content.top_k,
        model_lists,
        cf_limit=params.k,
        max_queries=validation_queries,
        seed=seed,
        partition_key=partition_key,
        snapshot=snapshot,
    )
    write_json(validation_path(shards_dir), choice)
    write_components(content.top_k, model_lists, shards_dir, k=k)
    lists = publish_lists(
        shards,
        embeddings,
        content.top_k,
        model_lists,
        choice,
        k=k,
        cf_limit=params.k,
        partition_key=partition_key,
        snapshot=snapshot,
    ).persist(StorageLevel.MEMORY_AND_DISK)
    return Blended(lists, choice, content)
