"""Offline evaluation of neighbour lists on the time holdout.

Every metric is a lazy Spark transform over the neighbour lists of all methods at once
(``method, listing_id, neighbour_id, rank, score``; rank 1..k) that returns a small tall
DataFrame ``(method, metric, value)``. ``collect_metrics`` is the one action that brings the
numbers to the driver. Model and baselines go through exactly the same code and the same pairs,
so their numbers are comparable.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping, Sequence
from functools import reduce

from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from lib import delta_io
from lib.feature_spec import NO_FEATURES, FeatureSpec
from lib.lookup import haversine_km
from schemas import listing_neighbours

KS = (5, 10, 20)
# The list length used for coverage, popularity bias, coherence and stability.
SUMMARY_K = 10
# The numbers the README table and `make quality` (bench/quality.py) report per method.
HEADLINE = ("hit_rate_at_10", "hit_rate_at_10_warm", "hit_rate_at_10_cold", "mrr_at_10")
METHOD_ORDER = (
    "model",
    "itemknn",
    "rp3beta",
    "ease",
    "als",
    "content",
    "embedding",
    "popularity",
    "random",
)


TALL_SCHEMA = "method string, metric string, value double"


def _tall(per_method: DataFrame, names: Sequence[str]) -> DataFrame:
    """One row per method -> (method, metric, value) rows; nulls stay null (no cold pairs)."""
    cells = [
        F.struct(F.lit(n).alias("metric"), F.col(n).cast("double").alias("value")) for n in names
    ]
    return per_method.select("method", F.explode(F.array(*cells)).alias("m")).select(
        "method", "m.metric", "m.value"
    )


def tag(neighbours: DataFrame, method: str) -> DataFrame:
    """Add the ``method`` column every metric groups by."""
    return neighbours.select(
        F.lit(method).alias("method"), "listing_id", "neighbour_id", "rank", "score"
    )


def holdout_pairs(holdout: DataFrame) -> DataFrame:
    """Consecutive distinct listings per user in the holdout: (user_id, query_id, target_id).

    Events are ordered by time (ties by listing id); repeated events on the same listing
    (view, then save, then contact) collapse into one step first, so a pair always joins two
    different listings. A user who goes A→B twice counts once.
    """
    order = Window.partitionBy("user_id").orderBy("event_ts", "listing_id")
    steps = (
        holdout.select("user_id", "listing_id", "event_ts")
        .withColumn("_previous", F.lag("listing_id").over(order))
        .where(F.col("_previous").isNull() | (F.col("_previous") != F.col("listing_id")))
    )
    return (
        steps.withColumn("query_id", F.lag("listing_id").over(order))
        .where(F.col("query_id").isNotNull())
        .select("user_id", "query_id", F.col("listing_id").alias("target_id"))
        .distinct()
    )


def label_pairs(
    pairs: DataFrame, listing_features: DataFrame, history: DataFrame | None = None
) -> DataFrame:
    """Keep pairs whose listings are both active and mark ``is_cold``.

    A pair is cold when either listing had no interaction in the history the published lists
    were built from: ``history`` (training examples with listing_idx) when given, else the
    ``has_interactions`` flag (the model's training examples). Only features can place a cold
    pair. Pairs touching an inactive or unknown listing are dropped, since no method may
    recommend such a listing.
    """
    side = listing_features.where(F.col("is_active"))
    if history is not None:
        seen = history.select("listing_idx").distinct().withColumn("_seen", F.lit(True))
        side = side.join(seen, "listing_idx", "left").select(
            "listing_id", F.coalesce(F.col("_seen"), F.lit(False)).alias("has_interactions")
        )
    side = side.select("listing_id", "has_interactions")
    query = side.select(
        F.col("listing_id").alias("query_id"), F.col("has_interactions").alias("_q")
    )
    target = side.select(
        F.col("listing_id").alias("target_id"), F.col("has_interactions").alias("_t")
    )
    return (
        pairs.join(query, "query_id")
        .join(target, "target_id")
        .select("user_id", "query_id", "target_id", (~(F.col("_q") & F.col("_t"))).alias("is_cold"))
    )


def ranking_metrics(
    pairs: DataFrame, neighbours: DataFrame, *, ks: Sequence[int] = KS
) -> DataFrame:
    """Hit-rate@k and MRR@k of each pair's target among its query's neighbours, per method.

    Computed over all pairs and split warm / cold (``label_pairs``); also the pair counts.
    Every method is scored on every pair, so a method with no list for a query scores 0 there.
    """
    ranks = neighbours.select(
        "method",
        F.col("listing_id").alias("query_id"),
        F.col("neighbour_id").alias("target_id"),
        "rank",
    )
    methods = neighbours.select("method").distinct()
    scored = pairs.crossJoin(methods).join(ranks, ["method", "query_id", "target_id"], "left")
    segments: dict[str, Column | None] = {
        "": None,
        "_warm": ~F.col("is_cold"),
        "_cold": F.col("is_cold"),
    }
    columns: dict[str, Column] = {}
    for suffix, keep in segments.items():

        def within(value: Column, keep: Column | None = keep) -> Column:
            return value if keep is None else F.when(keep, value)

        columns[f"pairs{suffix}"] = F.count(within(F.lit(1)))
        for k in ks:
            hit = F.coalesce(F.col("rank") <= k, F.lit(False))
            reciprocal = F.when(hit, 1.0 / F.col("rank")).otherwise(0.0)
            columns[f"hit_rate_at_{k}{suffix}"] = F.avg(within(hit.cast("double")))
            columns[f"mrr_at_{k}{suffix}"] = F.avg(within(reciprocal))
    per_method = scored.groupBy("method").agg(*[c.alias(n) for n, c in columns.items()])
    return _tall(per_method, list(columns))


def coverage_metrics(
    neighbours: DataFrame,
    active: DataFrame,
    *,
    k: int = SUMMARY_K,
    queries: DataFrame | None = None,
) -> DataFrame:
    """Catalogue coverage at ``k``, per method.

    ``coverage_at_k``: share of active listings that are someone's neighbour (rank <= k);
    ``full_lists_at_k``: share of listings with a list that have k neighbours. With
    ``queries`` (listing_id: the listings whose lists were computed), the full-list share is
    over them and ``coverage_at_k`` counts only what their lists show.
    """
    catalogue = active.select("listing_id").distinct().agg(F.count(F.lit(1)).alias("_n"))
    listed = (queries if queries is not None else active).select("listing_id").distinct()
    asked = listed.agg(F.count(F.lit(1)).alias("_asked"))
    top = neighbours.where(F.col("rank") <= k).join(listed, "listing_id", "left_semi")
    shown = top.groupBy("method").agg(F.countDistinct("neighbour_id").alias("_shown"))
    full = (
        top.groupBy("method", "listing_id")
        .count()
        .groupBy("method")
        .agg(F.count(F.when(F.col("count") >= k, 1)).alias("_full"))
    )
    per_method = (
        shown.join(full, "method")
        .crossJoin(catalogue)
        .crossJoin(asked)
        .select(
            "method",
            (F.col("_shown") / F.col("_n")).alias(f"coverage_at_{k}"),
            (F.col("_full") / F.col("_asked")).alias(f"full_lists_at_{k}"),
        )
    )
    return _tall(per_method, [f"coverage_at_{k}", f"full_lists_at_{k}"])


def popularity_ranks(popularity: DataFrame, active: DataFrame) -> DataFrame:
    """Rank active listings by training popularity: 1 = most popular, ties share a rank.

    ``popularity`` is (listing_id, popularity); active listings absent from it rank last
    together. SQL ``RANK`` over the catalogue, computed in parallel by range partitions
    (``lib.ordering.sorted_positions`` with ties), not in one ordered window.
    """
    from lib.ordering import sorted_positions

    scored = (
        active.select("listing_id")
        .distinct()
        .join(popularity, "listing_id", "left")
        .select("listing_id", F.coalesce(F.col("popularity"), F.lit(0.0)).alias("_popularity"))
    )
    ranked = sorted_positions(
        scored,
        ["_popularity", "listing_id"],
        "_position",
        ascending=[False, True],
        ties=["_popularity"],
    )
    return ranked.select(
        "listing_id", (F.col("_position") + 1).cast("int").alias("popularity_rank")
    )


def popularity_bias(neighbours: DataFrame, ranks: DataFrame, *, k: int = SUMMARY_K) -> DataFrame:
    """Mean popularity rank of the neighbours shown (rank <= k), raw and relative, per method.

    ``popularity_rank_ratio_at_k`` divides by the catalogue's mean rank: 1 means neighbours are
    as popular as a random listing, near 0 means only the bestsellers are ever shown.
    """
    catalogue_mean = ranks.agg(F.avg("popularity_rank").alias("_mean"))
    raw, ratio = f"mean_popularity_rank_at_{k}", f"popularity_rank_ratio_at_{k}"
    per_method = (
        neighbours.where(F.col("rank") <= k)
        .join(
            ranks.select(F.col("listing_id").alias("neighbour_id"), "popularity_rank"),
            "neighbour_id",
        )
        .groupBy("method")
        .agg(F.avg("popularity_rank").alias(raw))
        .crossJoin(catalogue_mean)
        .withColumn(ratio, F.col(raw) / F.col("_mean"))
    )
    return _tall(per_method, [raw, ratio])


def coherence_features(spec: FeatureSpec) -> tuple[tuple[str, ...], str | None, bool]:
    """What coherence compares: the first two categorical features (same value?), the first
    numeric one (ratio of the larger to the smaller) and, when declared, the distance."""
    categorical = tuple(f.column for f in spec.of_kind("categorical")[:2])
    numeric = spec.of_kind("numeric")
    return categorical, (numeric[0].column if numeric else None), spec.geo is not None


def coherence_metrics(
    neighbours: DataFrame, listings: DataFrame, spec: FeatureSpec, *, k: int = SUMMARY_K
) -> DataFrame:
    """How alike a listing and its neighbours are, on the features the spec declares.

    ``same_<column>_share`` for the first two categorical features, ``median_<column>_ratio``
    (larger / smaller, so 1.0 is identical) for the first numeric one and
    ``median_distance_km`` with geo, over neighbour rows with rank <= k, per method. A metric
    is null where no pair has both values. No such features: no rows.
    """
    categorical, numeric, geo = coherence_features(spec)
    columns = [
        *categorical,
        *([numeric] if numeric else []),
        *(["latitude", "longitude"] if geo else []),
    ]
    query = listings.select("listing_id", *[F.col(c).alias(f"q_{c}") for c in columns])
    other = listings.select(
        F.col("listing_id").alias("neighbour_id"), *[F.col(c).alias(f"n_{c}") for c in columns]
    )
    rows = (
        neighbours.where(F.col("rank") <= k).join(query, "listing_id").join(other, "neighbour_id")
    )

    def same(column: str) -> Column:
        q, n = F.col(f"q_{column}"), F.col(f"n_{column}")
        return F.avg(F.when(q.isNotNull() & n.isNotNull(), (q == n).cast("double")))

    metrics: dict[str, Column] = {}
    if geo:
        km = haversine_km(
            F.col("q_latitude"), F.col("q_longitude"), F.col("n_latitude"), F.col("n_longitude")
        )
        metrics["median_distance_km"] = F.percentile_approx(km, 0.5, 10_000)
    for column in categorical:
        metrics[f"same_{column}_share"] = same(column)
    if numeric:
        q, n = F.col(f"q_{numeric}"), F.col(f"n_{numeric}")
        ratio = F.when((q > 0) & (n > 0), F.greatest(q, n) / F.least(q, n))
        metrics[f"median_{numeric}_ratio"] = F.percentile_approx(ratio, 0.5, 10_000)
    if not metrics:
        return neighbours.sparkSession.createDataFrame([], TALL_SCHEMA)
    per_method = rows.groupBy("method").agg(*[c.alias(name) for name, c in metrics.items()])
    return _tall(per_method, list(metrics))


def stability_metrics(current: DataFrame, previous: DataFrame, *, k: int = SUMMARY_K) -> DataFrame:
    """Mean neighbour overlap@k with the previous run, over listings present in both runs.

    ``previous`` is the last run's published lists (no method column); 1.0 means identical
    top-k sets. A model retrained every night should stay high but below 1.
    """
    now = current.where(F.col("rank") <= k).select("method", "listing_id", "neighbour_id")
    before = previous.where(F.col("rank") <= k).select("listing_id", "neighbour_id")
    both = (
        now.select("method", "listing_id")
        .distinct()
        .join(before.select("listing_id").distinct(), "listing_id")
    )
    shared = (
        now.join(before, ["listing_id", "neighbour_id"]).groupBy("method", "listing_id").count()
    )
    per_method = (
        both.join(shared, ["method", "listing_id"], "left")
        .withColumn("_overlap", F.coalesce(F.col("count"), F.lit(0)) / F.lit(float(k)))
        .groupBy("method")
        .agg(
            F.avg("_overlap").alias(f"stability_overlap_at_{k}"),
            F.count(F.lit(1)).alias("stability_listings"),
        )
    )
    return _tall(per_method, [f"stability_overlap_at_{k}", "stability_listings"])


def all_metrics(
    neighbours: DataFrame,
    *,
    pairs: DataFrame,
    active: DataFrame,
    ranks: DataFrame,
    listings: DataFrame,
    spec: FeatureSpec = NO_FEATURES,
    ks: Sequence[int] = KS,
    k: int = SUMMARY_K,
    previous: DataFrame | None = None,
    stability_methods: Sequence[str] = ("model",),
    queries: DataFrame | None = None,
) -> DataFrame:
    """Every metric of every method in ``neighbours`` as (method, metric, value) rows.

    ``neighbours`` holds all methods' lists (``tag``); stability is computed against
    ``previous`` for ``stability_methods`` only (baselines are not published, so have no past).
    ``queries``: the listings whose lists were computed, when not the whole catalogue.
    """
    parts = [
        ranking_metrics(pairs, neighbours, ks=ks),
        coverage_metrics(neighbours, active, k=k, queries=queries),
        popularity_bias(neighbours, ranks, k=k),
        coherence_metrics(neighbours, listings, spec, k=k),
    ]
    if previous is not None:
        published = neighbours.where(F.col("method").isin(*stability_methods))
        parts.append(stability_metrics(published, previous, k=k))
    return reduce(DataFrame.unionByName, parts)


def evaluate_lists(
    lists: Mapping[str, DataFrame],
    *,
    pairs: DataFrame,
    listing_features: DataFrame,
    popularity: DataFrame,
    snapshot: DataFrame,
    spec: FeatureSpec = NO_FEATURES,
    previous: DataFrame | None = None,
    queries: DataFrame | None = None,
    ks: Sequence[int] = KS,
    k: int = SUMMARY_K,
) -> DataFrame:
    """``all_metrics`` of named neighbour lists on labelled held-out ``pairs`` (``label_pairs``).

    ``lists`` maps a method name to its (listing_id, neighbour_id, rank, score) lists;
    ``popularity`` is (listing_id, popularity) from training (``baselines.listing_popularity``).
    """
    tagged = reduce(DataFrame.unionByName, [tag(df, name) for name, df in lists.items()])
    active = listing_features.where(F.col("is_active"))
    return all_metrics(
        tagged,
        pairs=pairs,
        active=active,
        ranks=popularity_ranks(popularity, active),
        listings=snapshot,
        spec=spec,
        ks=ks,
        k=k,
        previous=previous,
        queries=queries,
    )


def published_lists(
    spark: SparkSession, table: str, run_date: dt.date
) -> tuple[DataFrame, DataFrame | None, dt.date | None]:
    """The published neighbour lists of ``run_date`` and of the run before it, if any.

    IO: reads the ``listing_neighbours`` table and runs one small query for the previous date.
    Returns (current, previous or None, previous run date or None).
    """
    published = delta_io.read_table(spark, table, listing_neighbours.SPEC)
    before = published.where(F.col("run_date") < run_date).agg(F.max("run_date")).first()[0]
    previous = published.where(F.col("run_date") == before) if before else None
    return published.where(F.col("run_date") == run_date), previous, before


def collect_metrics(metrics: DataFrame) -> dict[str, dict[str, float | None]]:
    """Run ``all_metrics``' DataFrame and return ``{method: {metric: value}}``.

    The one action of this module. NaN and null become None, so the result is valid JSON.
    """
    rows = metrics.collect()
    out: dict[str, dict[str, float | None]] = {}
    for row in rows:
        value = row["value"]
        clean = None if value is None or math.isnan(value) else float(value)
        out.setdefault(row["method"], {})[row["metric"]] = clean
    return out


def flatten(metrics: Mapping[str, Mapping[str, float | None]]) -> dict[str, float]:
    """``{"method.metric": value}`` without the Nones: what the ``runs`` table stores."""
    return {
        f"{method}.{name}": value
        for method, values in metrics.items()
        for name, value in values.items()
        if value is not None
    }


def headline(
    metrics: Mapping[str, Mapping[str, float | None]],
) -> dict[str, dict[str, float | None]]:
    """The four headline numbers (``HEADLINE``) of every method, model first."""
    order = [m for m in METHOD_ORDER if m in metrics] + sorted(set(metrics) - set(METHOD_ORDER))
    return {method: {name: metrics[method].get(name) for name in HEADLINE} for method in order}
