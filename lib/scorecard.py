"""What the evaluate stage scores: the published lists and every baseline, each baseline with
its hyper-parameters chosen on the validation split, all for the same evaluation queries.

Validation is the days before the holdout (the shard stage's ``validation`` events): each
candidate setting is fitted on the examples before them (``train``) and scored on their pairs;
the chosen setting is refitted on the whole training window (``train_full``), which is what the
published lists use too, and only then scored on the holdout. ItemKNN's and RP3beta's settings
are the ones the neighbour stage chose (``lib.blend``, same validation pairs).

Lists are built only for the evaluation queries (the query listings of the held-out pairs plus
a sample of the catalogue for coverage and coherence), not for every listing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from lib import baselines, ease, evaluation
from lib.cointeraction import Variant, variant_lists
from lib.neighbours import ranked_rows

# Spark ALS (implicit): the earlier default, and strong regularisation with a high confidence
# scale (Hu et al. 2008 tune both), which validation preferred on the generated and Albany
# sets. Two points, not a wider grid: each costs a full ALS fit, and the evaluate stage must
# stay a small share of a run.
ALS_GRID = (
    {"rank": 32, "reg_param": 0.1, "alpha": 1.0},
    {"rank": 64, "reg_param": 1.0, "alpha": 40.0},
)
# EASE λ over the published range (Steck 2019: 1 to 10^4 with binary data).
EASE_LAMBDAS = (1.0, 10.0, 100.0, 1_000.0, 10_000.0)
EASE_MAX_ITEMS = 10_000


def evaluation_queries(
    pairs: DataFrame, listing_features: DataFrame, *, sample: int, seed: int
) -> DataFrame:
    """(listing_id): the query listings of ``pairs`` and ``sample`` hashed active listings."""
    active = listing_features.where(F.col("is_active")).select("listing_id")
    sampled = (
        active.withColumn("_h", F.xxhash64(F.lit(seed), "listing_id"))
        .orderBy("_h")
        .limit(sample)
        .drop("_h")
    )
    return pairs.select(F.col("query_id").alias("listing_id")).unionByName(sampled).distinct()


def only(lists: DataFrame, queries: DataFrame) -> DataFrame:
    """The rows of ranked ``lists`` whose listing is one of ``queries``."""
    return lists.join(queries.select("listing_id"), "listing_id", "left_semi")


def active_neighbours(lists: DataFrame, listing_features: DataFrame) -> DataFrame:
    """Ranked rows whose neighbour is active, re-ranked from 1."""
    active = listing_features.where(F.col("is_active")).select(
        F.col("listing_id").alias("neighbour_id")
    )
    return lists.join(active, "neighbour_id", "left_semi")


def cointeraction_lists(
    cointeraction: DataFrame,
    listing_features: DataFrame,
    variant: Variant,
    *,
    k: int,
    queries: DataFrame,
) -> DataFrame:
    """ItemKNN / RP3beta ranked rows for ``queries`` from the co-interaction table."""
    active = listing_features.where(F.col("is_active")).select(
        F.col("listing_id").alias("neighbour_id")
    )
    partners = only(cointeraction, queries).join(active, "neighbour_id", "left_semi")
    return ranked_rows(variant_lists(partners, variant, k=k))


def validation_scores(
    lists: Mapping[str, DataFrame], pairs: DataFrame
) -> dict[str, dict[str, float | None]]:
    """hit@10 and MRR@10 of each named list on validation ``pairs`` (one Spark job)."""
    tagged = [evaluation.tag(df, name) for name, df in lists.items()]
    merged = tagged[0]
    for more in tagged[1:]:
        merged = merged.unionByName(more)
    metrics = evaluation.collect_metrics(evaluation.ranking_metrics(pairs, merged, ks=(10,)))
    return {
        name: {m: metrics.get(name, {}).get(m) for m in ("hit_rate_at_10", "mrr_at_10", "pairs")}
        for name in lists
    }


def _best(scores: Mapping[Any, Mapping[str, float | None]], order: Sequence[Any]) -> Any:
    return max(
        order,
        key=lambda key: (
            scores[key]["hit_rate_at_10"] or 0.0,
            scores[key]["mrr_at_10"] or 0.0,
            -list(order).index(key),
        ),
    )


def tuned_als(
    fit: DataFrame,
    full: DataFrame,
    listing_features: DataFrame,
    *,
    validation_pairs: DataFrame,
    queries: DataFrame,
    k: int,
    seed: int,
    grid: Sequence[Mapping[str, float]] = ALS_GRID,
    screening_iterations: int = 5,
) -> tuple[DataFrame, dict[str, Any]]:
    """ALS with the grid point best on validation, refitted on ``full``; (lists, report).

    Runs one short ALS fit per grid point (``screening_iterations``) plus the full refit.
    """
    validation_queries = validation_pairs.select(F.col("query_id").alias("listing_id"))
    candidates = {}
    for i, params in enumerate(grid):
        # Half the iterations to rank the grid points; the chosen one is refitted in full.
        vectors = baselines.fit_als_item_vectors(
            fit, listing_features, seed=seed, max_iter=screening_iterations, **params
        )
        lists = baselines.als_neighbours(vectors, listing_features, k=k)
        candidates[i] = only(lists, validation_queries)
    scores = validation_scores({str(i): df for i, df in candidates.items()}, validation_pairs)
    best = int(_best(scores, [str(i) for i in range(len(grid))]))
    vectors = baselines.fit_als_item_vectors(full, listing_features, seed=seed, **grid[best])
    chosen = only(baselines.als_neighbours(vectors, listing_features, k=k), queries)
    report = {
        "chosen": dict(grid[best]),
        "grid": [{**dict(grid[i]), **scores[str(i)]} for i in range(len(grid))],
    }
    return chosen, report


def tuned_ease(
    fit: DataFrame,
    full: DataFrame,
    listing_features: DataFrame,
    *,
    validation_pairs: DataFrame,
    queries: DataFrame,
    k: int,
    lambdas: Sequence[float] = EASE_LAMBDAS,
    max_items: int = EASE_MAX_ITEMS,
) -> tuple[DataFrame | None, dict[str, Any]]:
    """EASE with the λ best on validation, refitted on ``full``; (lists or None, report).

    None with the reason in the report when the catalogue is too large for EASE's dense matrix.
    """
    spark = fit.sparkSession
    validation_queries = validation_pairs.select(F.col("query_id").alias("listing_id"))
    found = ease.ease_neighbours(
        spark,
        fit,
        listing_features,
        queries=validation_queries,
        k=k,
        lambdas=lambdas,
        max_items=max_items,
    )
    if isinstance(found, str):
        return None, {"skipped": found}
    scores = validation_scores({f"{lam:g}": df for lam, df in found.items()}, validation_pairs)
    best = float(_best(scores, [f"{lam:g}" for lam in lambdas]))
    refit = ease.ease_neighbours(
        spark, full, listing_features, queries=queries, k=k, lambdas=[best], max_items=max_items
    )
    report = {
        "chosen": {"lambda": best},
        "grid": [{"lambda": lam, **scores[f"{lam:g}"]} for lam in lambdas],
    }
    if isinstance(refit, str):
        return None, {"skipped": refit}
    return refit[best], report


METHODS = ("itemknn", "rp3beta", "ease", "als", "content", "embedding", "popularity", "random")


def build_lists(
    inputs,
    choice: Mapping[str, Any],
    published: DataFrame,
    *,
    queries: DataFrame,
    validation_pairs: DataFrame,
    components,
    k: int,
    seed: int,
    methods: Sequence[str] = METHODS,
) -> tuple[dict[str, DataFrame], dict[str, Any]]:
    """Every method's ranked rows for ``queries`` (lazy except ALS and EASE, whose tuning runs
    here), ``model`` being the ``published`` lists; and what validation chose for ALS and EASE.

    ``inputs`` is ``lib.similarity.ShardInputs``, ``choice`` the neighbour stage's validation
    result, ``components`` the folder of its content and embedding lists.
    """
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown baselines {unknown}; known: {', '.join(METHODS)}")
    features, spark = inputs.listing_features, published.sparkSession
    lists: dict[str, DataFrame] = {
        "model": only(published.select("listing_id", "neighbour_id", "rank", "score"), queries)
    }
    tuned: dict[str, Any] = {}
    for family in ("itemknn", "rp3beta"):
        if family in methods:
            variant = Variant.from_dict(choice[family])
            lists[family] = cointeraction_lists(
                inputs.cointeraction_full, features, variant, k=k, queries=queries
            )
            tuned[family] = {"chosen": variant.to_dict()}
    if "ease" in methods:
        found, tuned["ease"] = tuned_ease(
            inputs.fit_examples,
            inputs.full_examples,
            features,
            validation_pairs=validation_pairs,
            queries=queries,
            k=k,
        )
        if found is not None:
            lists["ease"] = found
    if "als" in methods:
        lists["als"], tuned["als"] = tuned_als(
            inputs.fit_examples,
            inputs.full_examples,
            features,
            validation_pairs=validation_pairs,
            queries=queries,
            k=k,
            seed=seed,
        )
    for name in ("content", "embedding"):
        if name in methods:
            stored = spark.read.schema(baselines.RANKED_SCHEMA).parquet(str(components / name))
            lists[name] = only(stored, queries)
    if "popularity" in methods:
        lists["popularity"] = only(
            baselines.popularity_neighbours(inputs.full_examples, features, k=k), queries
        )
    if "random" in methods:
        lists["random"] = only(baselines.random_neighbours(features, k=k, seed=seed), queries)
    return lists, tuned


def flatten_validation(validation: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of the validation choice as ``validation.*`` metrics for the runs row."""
    out: dict[str, float] = {}
    blend = validation.get("blend") or {}
    for name, value in (blend.get("hit_rate_at_10") or {}).items():
        if value is not None:
            out[f"validation.{name}.hit_rate_at_10"] = float(value)
    for group, weights in (blend.get("weights") or {}).items():
        for component, weight in weights.items():
            out[f"validation.weight.{group}.{component}"] = float(weight)
    for group, count in (blend.get("pairs_by_group") or {}).items():
        out[f"validation.pairs.{group}"] = float(count)
    return out


def validation_summary(validation: Mapping[str, Any]) -> dict[str, Any]:
    """What validation chose, in a few words per method (runs row parameters, the report)."""
    blend = validation.get("blend") or {}
    summary = {"blend_variant": (blend.get("variant") or {}).get("name")}
    for name in ("itemknn", "rp3beta", "als", "ease"):
        entry = validation.get(name) or {}
        summary[name] = entry.get("skipped") or entry.get("chosen")
    return summary
