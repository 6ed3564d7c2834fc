"""The published similarity: co-interaction, content and the learned model, blended by support.

Each listing's candidates are the union of three lists: its best co-interaction partners (the
variant chosen on validation, ``lib.cointeraction``), its content neighbours (feature vectors)
and its model neighbours (the learned embeddings). Each component's score is standardised over
the listing's candidates (a candidate missing from a component's list gets that list's lowest
score: it ranked below all of them), and the blended score is the weighted sum

    score(a, b) = Σ_c w_c[g(a)] · z_c(a, b),   g(a) = support group of a (users with history)

with one weight vector per support group, chosen on the validation split from a grid that
contains every pure component (``weight_grid``); a candidate without any history gets a
co-interaction score of its own (``NEW_LISTING_SCORES``), chosen with the weights. The choice
(``choose_weights``) takes, per group with enough validation pairs, the simplest weights within
one standard error of the best hit@10 among those that meet the product's bar on validation:
cold pairs at least as good as content kNN, warm pairs within 5 % of the best component. So a
listing with much history is placed by co-interaction and a new one by its features when
validation shows it pays, and a small validation split falls back to a single component rather
than to a blend that won by chance. A group with too few validation pairs is chosen together
with its neighbours in support (``pooled_groups``), not by the popular listings' pairs.

This module holds the per-listing arithmetic (numpy, the same for validation on the driver and
for publication inside Spark tasks) and the Spark transforms that feed it.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from lib.cointeraction import (
    PairColumns,
    Variant,
    grouped_partners,
    partner_columns,
    top_positions,
    variant_scores,
)

COMPONENTS = ("cointeraction", "content", "model")
# Support groups by the query listing's users in the history: none (cold), 1-2, 3-9, 10+.
SUPPORT_EDGES = (1, 3, 10)
GRID_STEP = 0.1
# A group with fewer validation pairs than this uses the weights chosen over all pairs.
MIN_GROUP_PAIRS = 200
# Fewer validation pairs than this in all, and nothing is chosen: every component weighs the same.
MIN_VALIDATION_PAIRS = 30
HIT_AT = 10
# Where a candidate without any history stands on co-interaction, in standard deviations of
# the listing's candidates: its absence from the co-interaction list is no evidence against it,
# unlike a listing with history that nobody co-interacted with. Chosen on validation too,
# the neutral 0 first so that it wins ties.
NEW_LISTING_SCORES = (0.0, -1.0, 1.0)


def support_group(users: np.ndarray | float) -> np.ndarray:
    """0 for no history, then one group per ``SUPPORT_EDGES`` interval."""
    return np.searchsorted(np.asarray(SUPPORT_EDGES), np.asarray(users), side="right")


def group_names() -> list[str]:
    names = ["cold"]
    edges = [*SUPPORT_EDGES, None]
    for low, high in itertools.pairwise(edges):
        names.append(f"users_{low}+" if high is None else f"users_{low}-{high - 1}")
    return names


def weight_grid(step: float = GRID_STEP) -> np.ndarray:
    """Every weight vector on the simplex with the given step, the pure components first."""
    n = round(1 / step)
    pure = [tuple(float(i == j) for j in range(len(COMPONENTS))) for i in range(len(COMPONENTS))]
    mixed = [
        (i * step, j * step, (n - i - j) * step)
        for i in range(n + 1)
        for j in range(n + 1 - i)
        if (i, j, n - i - j) not in {(n, 0, 0), (0, n, 0), (0, 0, n)}
    ]
    return np.round(np.array(pure + mixed, dtype=np.float64), 10)


@dataclass(frozen=True)
class Candidates:
    """One listing's candidate union: ids, the raw score of each component (NaN: absent) and
    which candidates have no history at all."""

    ids: np.ndarray  # object array of neighbour ids
    raw: np.ndarray  # [n, len(COMPONENTS)]
    new: np.ndarray  # bool [n]


def candidate_union(
    cf_ids: np.ndarray,
    cf_scores: np.ndarray,
    content_ids: Sequence[str],
    content_scores: Sequence[float],
    model_ids: Sequence[str],
    model_scores: Sequence[float],
    *,
    query_id: str,
    cf_limit: int,
    content_new: Sequence[bool] | None = None,
    model_new: Sequence[bool] | None = None,
) -> Candidates:
    """The union of the three lists (co-interaction cut to its ``cf_limit`` best), self
    excluded, ids in ascending order. ``content_new`` / ``model_new`` flag the neighbours of
    those lists that have no history."""
    keep = top_positions(np.asarray(cf_scores, dtype=np.float64), np.asarray(cf_ids), cf_limit)
    lists = (
        (np.asarray(cf_ids, dtype=object)[keep], np.asarray(cf_scores, dtype=np.float64)[keep]),
        (np.asarray(content_ids, dtype=object), np.asarray(content_scores, dtype=np.float64)),
        (np.asarray(model_ids, dtype=object), np.asarray(model_scores, dtype=np.float64)),
    )
    flags = (None, content_new, model_new)
    ids = np.unique(np.concatenate([ids for ids, _ in lists]).astype(str))
    ids = ids[ids != query_id]
    raw = np.full((len(ids), len(COMPONENTS)), np.nan)
    new = np.zeros(len(ids), dtype=bool)
    for column, ((found, scores), flag) in enumerate(zip(lists, flags, strict=True)):
        if len(found):
            at = np.searchsorted(ids, found.astype(str))
            inside = (at < len(ids)) & (ids[np.minimum(at, len(ids) - 1)] == found.astype(str))
            raw[at[inside], column] = scores[inside]
            if flag is not None and len(flag):
                new[at[inside]] |= np.asarray(flag, dtype=bool)[inside]
    return Candidates(ids.astype(object), raw, new)


def standardise(
    raw: np.ndarray, new: np.ndarray | None = None, new_score: float = 0.0
) -> np.ndarray:
    """Per component: absent -> the component's lowest present score, then z-scores over the
    candidates (a component with no spread, or absent everywhere, contributes zeros). On
    co-interaction (column 0), candidates without history (``new``) are left out of the
    statistics and scored ``new_score`` instead."""
    out = np.zeros_like(raw)
    new = np.zeros(len(raw), dtype=bool) if new is None else np.asarray(new, dtype=bool)
    for column in range(raw.shape[1]):
        rows = ~new if column == 0 else np.ones(len(raw), dtype=bool)
        values = raw[rows, column]
        present = ~np.isnan(values)
        if present.any():
            filled = np.where(present, values, values[present].min())
            spread = filled.std()
            if spread > 1e-12:
                out[rows, column] = (filled - filled.mean()) / spread
        if column == 0 and present.any():
            out[new, 0] = new_score
    return out


def ranked(ids: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best (ids, scores), ties by the smaller id (as ``merge_top_k`` does)."""
    order = np.lexsort((ids.astype(str), -scores))[:k]
    return ids[order], scores[order]


def target_ranks(scores: np.ndarray, ids: np.ndarray, target: str) -> np.ndarray | None:
    """Rank (from 1) of ``target`` under each column of ``scores`` [n, G], with the same tie
    rule as ``ranked``; None when the target is not a candidate."""
    where = np.flatnonzero(ids == target)
    if len(where) == 0:
        return None
    t = scores[where[0]]
    earlier = (ids.astype(str) < target)[:, None]
    ahead = (scores > t[None, :]) | ((scores == t[None, :]) & earlier)
    return ahead.sum(axis=0) + 1


# ---------------------------------------------------------------------------------------------
# Choosing on validation (driver, on a bounded sample of validation queries)


@dataclass
class ValidationQuery:
    """What validation knows of one sampled query listing."""

    query_id: str
    support: float
    cf_ids: np.ndarray
    cf_columns: PairColumns
    content_ids: np.ndarray
    content_scores: np.ndarray
    model_ids: np.ndarray
    model_scores: np.ndarray
    targets: list[str]
    content_new: np.ndarray | None = None
    model_new: np.ndarray | None = None
    # The targets whose pair is cold (the target has no history).
    cold_targets: frozenset[str] = frozenset()

    def candidates(self, variant: Variant, cf_limit: int) -> Candidates:
        """The candidate union, co-interaction scored by ``variant``."""
        cf = variant_scores(variant, self.cf_columns) if len(self.cf_ids) else np.zeros(0)
        return candidate_union(
            self.cf_ids,
            cf,
            self.content_ids,
            self.content_scores,
            self.model_ids,
            self.model_scores,
            query_id=self.query_id,
            cf_limit=cf_limit,
            content_new=self.content_new,
            model_new=self.model_new,
        )


def _hits(ranks: np.ndarray | None, width: int) -> tuple[np.ndarray, np.ndarray]:
    if ranks is None:
        return np.zeros(width), np.zeros(width)
    hit = ranks <= HIT_AT
    return hit.astype(float), np.where(hit, 1.0 / ranks, 0.0)


def score_variants(
    queries: Sequence[ValidationQuery], variants: Sequence[Variant]
) -> dict[str, dict[str, float]]:
    """Validation hit@10 and MRR@10 of each co-interaction variant's own lists."""
    hits, mrr, pairs = np.zeros(len(variants)), np.zeros(len(variants)), 0
    for query in queries:
        if len(query.cf_ids):
            scores = np.stack([variant_scores(v, query.cf_columns) for v in variants], axis=1)
        else:
            scores = np.zeros((0, len(variants)))
        for target in query.targets:
            pairs += 1
            ranks = target_ranks(scores, query.cf_ids.astype(object), target)
            h, r = _hits(ranks, len(variants))
            hits, mrr = hits + h, mrr + r
    n = max(pairs, 1)
    return {
        v.name: {"hit_rate_at_10": hits[i] / n, "mrr_at_10": mrr[i] / n, "pairs": pairs}
        for i, v in enumerate(variants)
    }


def best_variant(
    scores: Mapping[str, Mapping[str, float]], variants: Sequence[Variant], family: str | None
) -> Variant:
    """The variant (of ``family``, or any) with the best validation hit@10, then MRR@10."""
    pool = [v for v in variants if family is None or v.family == family]
    return max(
        pool,
        key=lambda v: (
            scores[v.name]["hit_rate_at_10"],
            scores[v.name]["mrr_at_10"],
            -pool.index(v),
        ),
    )


def _complexity(grid: np.ndarray, combos: Sequence[tuple[int, int]]) -> np.ndarray:
    """Components with a weight, per combo (the new-listing score counts with co-interaction)."""
    return np.array([int((grid[g] > 0).sum()) for _, g in combos])


def _feasible_best(
    hits: np.ndarray,
    mrr: np.ndarray,
    cold: np.ndarray,
    warm: np.ndarray,
    pure: dict,
    *,
    pairs: int,
    complexity: np.ndarray,
) -> int:
    """The simplest combo within one standard error of the best validation hit@10, among
    those that meet the product's bar on these pairs: cold hits at least pure content's, warm
    hits at least 0.95 x the best pure component's less one standard error (without any combo
    meeting both, the warm bar is dropped; pure content always meets the cold bar).

    The one-standard-error rule (Breiman et al. 1984) is what keeps a few hundred validation
    pairs from choosing among ~200 combos by noise: a blend must beat a single component by
    more than chance to be published. Ties: more hits, then MRR, then the earliest.
    """
    n = max(pairs, 1)

    def noise(count: float) -> float:
        """One standard error of a hit count of ``count`` out of ``n`` pairs."""
        rate = min(max(count / n, 0.0), 1.0)
        return float(np.sqrt(rate * (1 - rate) * n))

    cold_ok = cold >= cold[pure["content"]] - 1e-9
    # The warm bar, like the choice, is judged up to one standard error: on a few dozen pairs
    # a strict bar would pick whichever blend happened to hit one more warm target.
    best_warm = max(warm[i] for i in pure.values())
    warm_ok = warm >= 0.95 * best_warm - noise(best_warm) - 1e-9
    feasible = cold_ok & warm_ok if (cold_ok & warm_ok).any() else cold_ok
    best = hits[feasible].max()
    allowed = feasible & (hits >= best - noise(best) - 1e-9)
    order = -np.arange(len(hits))
    keys = (order, mrr, hits, -complexity)
    return int(np.lexsort(tuple(np.where(allowed, k, -np.inf) for k in keys))[-1])


def pooled_groups(pairs: np.ndarray, group: int, min_pairs: int) -> tuple[int, int]:
    """The run of support groups, around ``group``, whose validation pairs choose its weights.

    A group with too few pairs takes in the adjacent group (of the two, the one with more pairs)
    until the run has ``min_pairs``: a new listing is judged with the sparsely supported ones
    rather than by the popular listings, whose pairs are most of any split and which
    co-interaction serves. Without enough pairs even over every group, the run is all of them.
    """
    lo = hi = group
    while pairs[lo : hi + 1].sum() < min_pairs and (lo > 0 or hi < len(pairs) - 1):
        if lo > 0 and (hi == len(pairs) - 1 or pairs[lo - 1] >= pairs[hi + 1]):
            lo -= 1
        else:
            hi += 1
    return lo, hi


def choose_weights(
    queries: Sequence[ValidationQuery],
    variant: Variant,
    *,
    cf_limit: int,
    grid: np.ndarray | None = None,
    min_group_pairs: int = MIN_GROUP_PAIRS,
) -> dict:
    """Per support group, the simplest grid weights within one standard error of the best
    validation hit@10 among those whose cold and warm hit rates meet the product's bar
    (``_feasible_best``).

    Returns the weights per group, and the validation hit@10 of the blend and of each pure
    component per group and overall, for the runs row and the report.
    """
    grid = weight_grid() if grid is None else grid
    fills = np.asarray(NEW_LISTING_SCORES)
    # Every (new-listing score, weights) pair: column f * len(grid) + g.
    combos = [(f, g) for f in range(len(fills)) for g in range(len(grid))]
    groups = len(SUPPORT_EDGES) + 1
    hits = np.zeros((groups, len(combos)))
    mrr = np.zeros((groups, len(combos)))
    cold_hits = np.zeros((groups, len(combos)))
    pairs = np.zeros(groups, dtype=int)
    for query in queries:
        found = query.candidates(variant, cf_limit)
        blended = np.concatenate(
            [standardise(found.raw, found.new, fill) @ grid.T for fill in fills], axis=1
        )
        group = int(support_group(query.support))
        for target in query.targets:
            h, r = _hits(target_ranks(blended, found.ids, target), len(combos))
            hits[group] += h
            mrr[group] += r
            if target in query.cold_targets or query.support == 0:
                cold_hits[group] += h
            pairs[group] += 1
    warm_hits = hits - cold_hits
    pure = {c: combos.index((0, i)) for i, c in enumerate(COMPONENTS)}  # the grid's first rows
    complexity = _complexity(grid, combos)
    overall = _feasible_best(
        hits.sum(0),
        mrr.sum(0),
        cold_hits.sum(0),
        warm_hits.sum(0),
        pure,
        pairs=int(pairs.sum()),
        complexity=complexity,
    )
    if pairs.sum() < MIN_VALIDATION_PAIRS:
        # Too little validation to choose anything: every component weighs about the same.
        equal = int(np.argmin(np.abs(grid - 1 / len(COMPONENTS)).sum(axis=1)))
        overall = combos.index((int(np.argmin(np.abs(fills))), equal))
    chosen = []
    pooled_with = []
    for g in range(groups):
        lo, hi = pooled_groups(pairs, g, min_group_pairs)
        pooled_with.append((lo, hi))
        span = slice(lo, hi + 1)
        if pairs[span].sum() < min_group_pairs:
            chosen.append(overall)
            continue
        chosen.append(
            _feasible_best(
                hits[span].sum(0),
                mrr[span].sum(0),
                cold_hits[span].sum(0),
                warm_hits[span].sum(0),
                pure,
                pairs=int(pairs[span].sum()),
                complexity=complexity,
            )
        )
    names = group_names()

    def rate(values: np.ndarray, count: int) -> float | None:
        return float(values / count) if count else None

    def weights_of(combo: int) -> dict[str, float]:
        fill, row = combos[combo]
        return {
            **dict(zip(COMPONENTS, grid[row].tolist(), strict=True)),
            "new_listing_cointeraction": float(fills[fill]),
        }

    return {
        "variant": variant.to_dict(),
        "support_edges": list(SUPPORT_EDGES),
        "weights": {names[g]: weights_of(chosen[g]) for g in range(groups)},
        "pairs_by_group": {names[g]: int(pairs[g]) for g in range(groups)},
        "chosen_on_groups": {
            names[g]: [names[i] for i in range(lo, hi + 1)]
            for g, (lo, hi) in enumerate(pooled_with)
        },
        "hit_rate_at_10": {
            "blend": rate(sum(hits[g, chosen[g]] for g in range(groups)), pairs.sum()),
            **{c: rate(hits[:, i].sum(), pairs.sum()) for c, i in pure.items()},
        },
        "hit_rate_at_10_by_group": {
            names[g]: {
                "blend": rate(hits[g, chosen[g]], pairs[g]),
                **{c: rate(hits[g, i], pairs[g]) for c, i in pure.items()},
            }
            for g in range(groups)
        },
    }


def weights_table(choice: Mapping) -> np.ndarray:
    """[groups, components + 1] from ``choose_weights``' result: the weights, then the score of
    a candidate without history on co-interaction."""
    columns = (*COMPONENTS, "new_listing_cointeraction")
    return np.array([[choice["weights"][g][c] for c in columns] for g in group_names()])


# ---------------------------------------------------------------------------------------------
# Publication (Spark): every listing's candidate union, blended inside tasks

BLENDED_SCHEMA = "listing_id string, neighbour_ids array<string>, scores array<float>"


def _flag_new(lists: DataFrame, support: DataFrame, prefix: str) -> DataFrame:
    """Ranked lists as (listing_id, <prefix>_ids, <prefix>_scores, <prefix>_new), the last
    flagging neighbours without history, in list order."""
    users = support.select(F.col("listing_id").alias("neighbour_id"), "users")
    rows = (
        lists.select(
            "listing_id", "scores", F.posexplode("neighbour_ids").alias("pos", "neighbour_id")
        )
        .join(users, "neighbour_id", "left")
        .select(
            "listing_id",
            F.struct(
                "pos",
                "neighbour_id",
                F.col("scores")[F.col("pos")].alias("score"),
                F.col("users").isNull().alias("new"),
            ).alias("item"),
        )
    )
    ordered = rows.groupBy("listing_id").agg(F.sort_array(F.collect_list("item")).alias("items"))
    return ordered.select(
        "listing_id",
        F.col("items.neighbour_id").alias(f"{prefix}_ids"),
        F.col("items.score").alias(f"{prefix}_scores"),
        F.col("items.new").alias(f"{prefix}_new"),
    )


def blend_inputs(
    listings: DataFrame,
    support: DataFrame,
    cointeraction: DataFrame,
    content_lists: DataFrame,
    model_lists: DataFrame,
) -> DataFrame:
    """One row per listing of ``listings`` (listing_id) with everything the blend reads.

    ``support``: (listing_id, users) of the listings with history; ``cointeraction``: the
    co-interaction table; ``content_lists`` and ``model_lists``: ranked lists (listing_id,
    neighbour_ids, scores).
    """
    return (
        listings.select("listing_id")
        .join(support.select("listing_id", F.col("users").alias("support")), "listing_id", "left")
        .join(grouped_partners(cointeraction), "listing_id", "left")
        .join(_flag_new(content_lists, support, "content"), "listing_id", "left")
        .join(_flag_new(model_lists, support, "model"), "listing_id", "left")
        .select(
            "listing_id",
            F.coalesce(F.col("support"), F.lit(0)).alias("support"),
            "cf",
            *[f"{p}_{c}" for p in ("content", "model") for c in ("ids", "scores", "new")],
        )
    )


def _list_of(column: pa.ListArray, i: int) -> np.ndarray:
    value = column[i]
    if not value.is_valid:
        return np.zeros(0, dtype=object)
    return value.values.to_numpy(zero_copy_only=False)


def validation_queries(rows: pa.Table, targets: Mapping[str, list[str]]) -> list[ValidationQuery]:
    """``blend_inputs`` rows (collected for a sample) as ``ValidationQuery`` objects."""
    found = []
    cf_column = rows.column("cf").combine_chunks()
    names = [f"{p}_{c}" for p in ("content", "model") for c in ("ids", "scores", "new")]
    lists = {
        name: rows.column(name).combine_chunks() for name in names if name in rows.column_names
    }
    empty = pa.array([None] * rows.num_rows, pa.list_(pa.bool_()))
    for i, query_id in enumerate(rows.column("listing_id").to_pylist()):
        cf_value = cf_column[i]
        cf_ids, cf_columns = partner_columns(cf_value.values if cf_value.is_valid else None)
        found.append(
            ValidationQuery(
                query_id=query_id,
                support=float(rows.column("support")[i].as_py()),
                cf_ids=cf_ids,
                cf_columns=cf_columns,
                content_ids=_list_of(lists["content_ids"], i),
                content_scores=_list_of(lists["content_scores"], i).astype(np.float64),
                model_ids=_list_of(lists["model_ids"], i),
                model_scores=_list_of(lists["model_scores"], i).astype(np.float64),
                targets=list(targets.get(query_id, [])),
                content_new=_list_of(lists.get("content_new", empty), i).astype(bool),
                model_new=_list_of(lists.get("model_new", empty), i).astype(bool),
            )
        )
    return found


def _blend_tasks(variant: Variant, weights: np.ndarray, k: int, cf_limit: int):
    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            table = pa.Table.from_batches([batch])
            out_ids, out_scores = [], []
            for query in validation_queries(table, {}):
                found = query.candidates(variant, cf_limit)
                row = weights[int(support_group(query.support))]
                z = standardise(found.raw, found.new, float(row[len(COMPONENTS)]))
                ids, scores = ranked(found.ids, z @ row[: len(COMPONENTS)], k)
                out_ids.append([str(i) for i in ids])
                out_scores.append(scores.astype(np.float32).tolist())
            yield pa.RecordBatch.from_arrays(
                [
                    table.column("listing_id").combine_chunks(),
                    pa.array(out_ids, pa.list_(pa.string())),
                    pa.array(out_scores, pa.list_(pa.float32())),
                ],
                names=["listing_id", "neighbour_ids", "scores"],
            )

    return run


def blended_lists(
    inputs: DataFrame, *, variant: Variant, weights: np.ndarray, k: int, cf_limit: int
) -> DataFrame:
    """Every ``blend_inputs`` row's top-``k`` blended neighbours (``BLENDED_SCHEMA``, the same
    shape as an ANN search result)."""
    return inputs.mapInArrow(_blend_tasks(variant, weights, k, cf_limit), BLENDED_SCHEMA)


# ---------------------------------------------------------------------------------------------
# The whole choice, end to end (runs Spark jobs; only the bounded sample reaches the driver)


def sample_queries(pairs: DataFrame, *, max_queries: int, seed: int) -> DataFrame:
    """At most ``max_queries`` distinct query listings of ``pairs``, by a seeded hash."""
    return (
        pairs.select(F.col("query_id").alias("listing_id"))
        .distinct()
        .withColumn("_h", F.xxhash64(F.lit(seed), "listing_id"))
        .orderBy("_h")
        .limit(max_queries)
        .drop("_h")
    )


def choose_on_validation(
    pairs: DataFrame,
    *,
    support: DataFrame,
    cointeraction: DataFrame,
    content_lists: DataFrame,
    model_lists: DataFrame,
    variants: Sequence[Variant],
    cf_limit: int,
    max_queries: int = 4_000,
    seed: int = 7,
) -> dict:
    """Choose the co-interaction variant and the blend weights on validation ``pairs``
    (user_id, query_id, target_id[, is_cold]) from components fitted without them.

    Runs Spark jobs; collects the candidate lists of at most ``max_queries`` sampled queries.
    Returns the variants' scores, the chosen variant, per-group weights and what the blend and
    each pure component scored (``choose_weights``).
    """
    queries = sample_queries(pairs, max_queries=max_queries, seed=seed)
    wanted = pairs.join(queries.withColumnRenamed("listing_id", "query_id"), "query_id")
    targets: dict[str, list[str]] = {}
    cold: dict[str, set[str]] = {}
    for row in wanted.select("query_id", "target_id", "is_cold").toArrow().to_pylist():
        targets.setdefault(row["query_id"], []).append(row["target_id"])
        if row["is_cold"]:
            cold.setdefault(row["query_id"], set()).add(row["target_id"])
    rows = blend_inputs(queries, support, cointeraction, content_lists, model_lists).toArrow()
    found = validation_queries(rows, targets)
    for query in found:
        query.cold_targets = frozenset(cold.get(query.query_id, ()))
    variant_scores_ = score_variants(found, variants)
    chosen = best_variant(variant_scores_, variants, None)
    choice = choose_weights(found, chosen, cf_limit=cf_limit)
    return {
        "queries": len(found),
        "pairs": sum(len(q.targets) for q in found),
        "variants": variant_scores_,
        "itemknn": best_variant(variant_scores_, variants, "itemknn").to_dict(),
        "rp3beta": best_variant(variant_scores_, variants, "rp3beta").to_dict(),
        **choice,
    }
