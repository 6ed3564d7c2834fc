"""Co-interaction statistics: which listings the same users interacted with, and how strongly.

One row per (listing, co-interacted listing) holds every count that the classic item-item
similarities need: ItemKNN cosine over the binary or the weighted user×listing matrix with
shrinkage, and RP3beta (Paudel et al. 2017, a random walk listing → user → listing with
popularity penalised by ``deg^beta``). Each similarity variant is then a cheap function of those
columns (``variant_scores``), so the shard stage does the one expensive self-join and later
stages choose among the variants on validation without another pass over the interactions.

A user contributes at most ``max_items_per_user`` listings (the strongest), which bounds the
self-join at ``max_items_per_user²`` pairs per user; each listing keeps, per variant, its
``per_variant`` best partners, which bounds the table at ``len(VARIANTS) × per_variant`` rows
per listing whatever the density of the data.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from schemas import training_examples

# Published ranges (Dacrema et al. 2019, "Are we really making much progress?"): ItemKNN shrink
# 0–200 (the weighted matrix holds decayed weights, so its useful shrink is smaller),
# RP3beta alpha 0.5–1.2 and beta 0.4–0.6 (0.3 and 0 included: cheaper than being wrong).
SHRINKS = (0.0, 2.0, 10.0, 50.0, 200.0)
WEIGHTED_SHRINKS = (0.0, 0.1, 1.0, 10.0)
RP3_ALPHAS = (0.5, 0.8, 1.1)
RP3_BETAS = (0.0, 0.3, 0.45, 0.6)


@dataclass(frozen=True)
class Variant:
    """One co-interaction similarity: ``itemknn`` (cosine, binary or weighted) or ``rp3beta``."""

    family: str
    weighted: bool = False
    shrink: float = 0.0
    alpha: float = 1.0
    beta: float = 0.5

    def __post_init__(self) -> None:
        if self.family not in ("itemknn", "rp3beta"):
            raise ValueError(f"unknown co-interaction family {self.family!r}")
        if self.family == "rp3beta" and self.alpha not in RP3_ALPHAS:
            raise ValueError(f"RP3beta alpha must be one of {RP3_ALPHAS} (stored sums)")
        if self.shrink < 0:
            raise ValueError(f"shrink must be >= 0, got {self.shrink}")

    @property
    def name(self) -> str:
        if self.family == "itemknn":
            kind = "weighted" if self.weighted else "binary"
            return f"itemknn_{kind}_shrink{self.shrink:g}"
        return f"rp3beta_alpha{self.alpha:g}_beta{self.beta:g}"

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "family": self.family,
            "weighted": self.weighted,
            "shrink": self.shrink,
            "alpha": self.alpha,
            "beta": self.beta,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Variant:
        return cls(
            family=data["family"],
            weighted=bool(data["weighted"]),
            shrink=float(data["shrink"]),
            alpha=float(data["alpha"]),
            beta=float(data["beta"]),
        )


VARIANTS = (
    *(Variant("itemknn", shrink=s) for s in SHRINKS),
    *(Variant("itemknn", weighted=True, shrink=s) for s in WEIGHTED_SHRINKS),
    *(Variant("rp3beta", alpha=a, beta=b) for a in RP3_ALPHAS for b in RP3_BETAS),
)


@dataclass(frozen=True)
class PairColumns:
    """One listing's stored partners as arrays (what ``variant_scores`` reads)."""

    common: np.ndarray  # users who interacted with both
    dot: np.ndarray  # Σ_u w_u,listing · w_u,partner
    rp3: np.ndarray  # [n, len(RP3_ALPHAS)]: Σ_u deg(u)^-alpha over the common users
    listing_users: float
    listing_norm: float
    partner_users: np.ndarray
    partner_norm: np.ndarray


def variant_scores(variant: Variant, pairs: PairColumns) -> np.ndarray:
    """The similarity of one listing to each of its stored partners under ``variant``."""
    if variant.family == "itemknn":
        if variant.weighted:
            norms = pairs.listing_norm * pairs.partner_norm
            return pairs.dot / (norms + variant.shrink)
        degrees = np.sqrt(pairs.listing_users * pairs.partner_users)
        return pairs.common / (degrees + variant.shrink)
    # P(listing -> user) = 1/deg(listing), P(user -> partner) = 1/deg(user), each raised to
    # alpha; the partner's popularity is divided out with deg^beta.
    mass = pairs.rp3[:, RP3_ALPHAS.index(variant.alpha)]
    listing_part = max(pairs.listing_users, 1.0) ** -variant.alpha
    return listing_part * mass * np.maximum(pairs.partner_users, 1.0) ** -variant.beta


def capped_interactions(examples: DataFrame, *, max_items_per_user: int) -> DataFrame:
    """(user_idx, listing_idx, weight, user_items): each user's strongest listings only."""
    strongest = Window.partitionBy("user_idx").orderBy(F.desc("weight"), "listing_idx")
    per_user = Window.partitionBy("user_idx")
    return (
        examples.select("user_idx", "listing_idx", F.col("weight").cast("double"))
        .withColumn("_n", F.row_number().over(strongest))
        .where(F.col("_n") <= max_items_per_user)
        .withColumn("user_items", F.count(F.lit(1)).over(per_user))
        .drop("_n")
    )


def listing_support(capped: DataFrame) -> DataFrame:
    """(listing_idx, users, norm): distinct users and the weight vector's length per listing."""
    return capped.groupBy("listing_idx").agg(
        F.count(F.lit(1)).cast("int").alias("users"),
        F.sqrt(F.sum(F.col("weight") ** 2)).alias("norm"),
    )


def _query_idx(queries: DataFrame | None, listing_ids: DataFrame) -> DataFrame | None:
    if queries is None:
        return None
    return (
        queries.select("listing_id")
        .distinct()
        .join(listing_ids.select("listing_id", "listing_idx"), "listing_id")
        .select(F.col("listing_idx").alias("a"))
    )


# Pairs expanded in numpy before they are summed locally: bounds a task's memory.
_PAIR_CHUNK = 2_000_000
_PAIR_SCHEMA = "a int, b int, common long, dot double, rp3 array<double>"


def _flush(a: list, b: list, w: list, deg: list) -> pa.RecordBatch:
    """Sum the (a, b) pairs expanded so far: one row per distinct pair."""
    a_all, b_all = np.concatenate(a), np.concatenate(b)
    keys = (a_all.astype(np.int64) << 32) | b_all.astype(np.int64)
    unique, inverse = np.unique(keys, return_inverse=True)
    weights, degrees = np.concatenate(w), np.concatenate(deg)
    rp3 = np.stack([np.bincount(inverse, weights=degrees**-alpha) for alpha in RP3_ALPHAS], axis=1)
    return pa.RecordBatch.from_arrays(
        [
            pa.array((unique >> 32).astype(np.int32)),
            pa.array((unique & 0xFFFFFFFF).astype(np.int32)),
            pa.array(np.bincount(inverse).astype(np.int64)),
            pa.array(np.bincount(inverse, weights=weights)),
            pa.FixedSizeListArray.from_arrays(rp3.reshape(-1), len(RP3_ALPHAS)).cast(
                pa.list_(pa.float64())
            ),
        ],
        names=["a", "b", "common", "dot", "rp3"],
    )


def _expand_users(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """Per user (a list of listing, weight, is-query): every ordered pair of two of the user's
    listings whose first is a query, summed within the task."""
    a, b, w, deg, size = [], [], [], [], 0
    for batch in batches:
        items = batch.column("items")
        offsets = items.offsets.to_numpy()
        offsets = offsets - offsets[0]
        flat = items.flatten()
        listing = flat.field("listing").to_numpy(zero_copy_only=False)
        weight = flat.field("weight").to_numpy(zero_copy_only=False)
        asked = flat.field("asked").to_numpy(zero_copy_only=False)
        for i in range(batch.num_rows):
            start, stop = int(offsets[i]), int(offsets[i + 1])
            n = stop - start
            if n < 2:
                continue
            first = np.repeat(np.arange(start, stop), n)
            second = np.tile(np.arange(start, stop), n)
            keep = (first != second) & asked[first]
            first, second = first[keep], second[keep]
            a.append(listing[first])
            b.append(listing[second])
            w.append(weight[first] * weight[second])
            deg.append(np.full(len(first), float(n)))
            size += len(first)
            if size >= _PAIR_CHUNK:
                yield _flush(a, b, w, deg)
                a, b, w, deg, size = [], [], [], [], 0
    if size:
        yield _flush(a, b, w, deg)


def pair_statistics(capped: DataFrame, *, queries: DataFrame | None = None) -> DataFrame:
    """(a, b, common, dot, rp3): ordered pairs of different listings with a common user;
    ``a`` restricted to ``queries`` (column a) when given.

    Each task expands its users' pairs in numpy and sums them before the shuffle, so equal pairs
    of a task's users cross it once: a self-join of the interactions by user makes one JVM row
    per pair (74M at 20k listings and 42k users), and its sum dominated the shard stage.
    """
    rows = capped
    if queries is not None:
        flags = queries.select(F.col("a").alias("listing_idx"), F.lit(True).alias("_asked"))
        rows = rows.join(flags, "listing_idx", "left")
    else:
        rows = rows.withColumn("_asked", F.lit(True))
    item = F.struct(
        F.col("listing_idx").alias("listing"),
        F.col("weight").cast("double").alias("weight"),
        F.coalesce(F.col("_asked"), F.lit(False)).alias("asked"),
    )
    per_user = rows.groupBy("user_idx").agg(F.collect_list(item).alias("items"))
    return (
        per_user.mapInArrow(_expand_users, _PAIR_SCHEMA)
        .groupBy("a", "b")
        .agg(
            F.sum("common").cast("int").alias("common"),
            F.sum("dot").alias("dot"),
            F.array(*[F.sum(F.col("rp3")[i]) for i in range(len(RP3_ALPHAS))]).alias("rp3"),
        )
    )


def _columns(items: pa.StructArray, start: int, stop: int, row: dict) -> PairColumns:
    part = items.slice(start, stop - start)
    rp3 = part.field("rp3")
    width = len(RP3_ALPHAS)
    return PairColumns(
        common=part.field("common").to_numpy(zero_copy_only=False).astype(np.float64),
        dot=part.field("dot").to_numpy(zero_copy_only=False).astype(np.float64),
        rp3=rp3.flatten().to_numpy(zero_copy_only=False).astype(np.float64).reshape(-1, width),
        listing_users=float(row["users"]),
        listing_norm=float(row["norm"]),
        partner_users=part.field("b_users").to_numpy(zero_copy_only=False).astype(np.float64),
        partner_norm=part.field("b_norm").to_numpy(zero_copy_only=False).astype(np.float64),
    )


def top_positions(scores: np.ndarray, keys: np.ndarray, count: int) -> np.ndarray:
    """Positions of the ``count`` best scores, best first, ties by the smaller key."""
    order = np.lexsort((np.asarray(keys).astype(str), -scores))
    return order[:count]


def _truncate(variants: Sequence[Variant], per_variant: int):
    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            lists = batch.column("items")
            items = lists.flatten()
            offsets = lists.offsets.to_numpy()
            offsets = offsets - offsets[0]
            users = batch.column("users").to_numpy(zero_copy_only=False)
            norms = batch.column("norm").to_numpy(zero_copy_only=False)
            partners = np.asarray(items.field("neighbour_id").to_pylist(), dtype=object)
            kept: list[np.ndarray] = []
            for i in range(batch.num_rows):
                start, stop = int(offsets[i]), int(offsets[i + 1])
                columns = _columns(items, start, stop, {"users": users[i], "norm": norms[i]})
                keep = np.zeros(stop - start, dtype=bool)
                for variant in variants:
                    scores = variant_scores(variant, columns)
                    keep[top_positions(scores, partners[start:stop], per_variant)] = True
                kept.append(np.flatnonzero(keep) + start)
            if not kept:
                continue
            taken_at = np.concatenate(kept)
            owner = np.repeat(np.arange(batch.num_rows), np.diff(offsets))[taken_at]
            taken = items.take(pa.array(taken_at))
            yield pa.RecordBatch.from_arrays(
                [
                    batch.column("listing_id").take(pa.array(owner)),
                    taken.field("neighbour_id"),
                    taken.field("common"),
                    taken.field("dot").cast(pa.float32()),
                    pa.array(users[owner], pa.int32()),
                    taken.field("b_users"),
                    pa.array(norms[owner], pa.float32()),
                    taken.field("b_norm").cast(pa.float32()),
                    taken.field("rp3").cast(pa.list_(pa.float32())),
                ],
                names=list(training_examples.COINTERACTION_SCHEMA.fieldNames()),
            )

    return run


def cointeraction_table(
    examples: DataFrame,
    listing_ids: DataFrame,
    *,
    max_items_per_user: int = 50,
    per_variant: int = 50,
    variants: Sequence[Variant] = VARIANTS,
    queries: DataFrame | None = None,
) -> DataFrame:
    """The ``cointeraction`` contract: for every listing with a co-interacted partner, the
    union of its ``per_variant`` best partners under each of ``variants`` (ties by the smaller
    neighbour_id, as every ranked list here), with the statistics.

    ``examples`` are training examples (user_idx, listing_idx, weight); ``listing_ids`` maps
    listing_idx to listing_id (the shard stage's listing features). With ``queries`` (a
    listing_id column), only those listings' rows are built: validation needs no more.
    """
    capped = capped_interactions(examples, max_items_per_user=max_items_per_user)
    support = listing_support(capped)
    ids = listing_ids.select("listing_idx", "listing_id")
    pairs = (
        pair_statistics(capped, queries=_query_idx(queries, listing_ids))
        .join(
            support.select(
                F.col("listing_idx").alias("b"),
                F.col("users").alias("b_users"),
                F.col("norm").alias("b_norm"),
            ),
            "b",
        )
        .join(
            ids.select(F.col("listing_idx").alias("b"), F.col("listing_id").alias("neighbour_id")),
            "b",
        )
    )
    items = F.struct("neighbour_id", "common", "dot", "b_users", "b_norm", "rp3")
    grouped = (
        pairs.groupBy("a")
        .agg(F.collect_list(items).alias("items"))
        .join(support.select(F.col("listing_idx").alias("a"), "users", "norm"), "a")
        .join(ids.select(F.col("listing_idx").alias("a"), "listing_id"), "a")
        .select("listing_id", "users", "norm", "items")
    )
    return grouped.mapInArrow(
        _truncate(tuple(variants), per_variant), training_examples.COINTERACTION_SCHEMA
    )


def grouped_partners(cointeraction: DataFrame) -> DataFrame:
    """(listing_id, cf): each listing's rows of the cointeraction table as one list."""
    return cointeraction.groupBy("listing_id").agg(
        F.collect_list(
            F.struct(
                "neighbour_id",
                "common",
                "dot",
                "listing_users",
                "neighbour_users",
                "listing_norm",
                "neighbour_norm",
                "rp3",
            )
        ).alias("cf")
    )


def partner_columns(cf: pa.StructArray | None) -> tuple[np.ndarray, PairColumns]:
    """One ``grouped_partners`` list as (partner ids, ``PairColumns``)."""
    if cf is None or len(cf) == 0:
        empty = np.zeros(0)
        return np.zeros(0, dtype=object), PairColumns(
            empty, empty, np.zeros((0, len(RP3_ALPHAS))), 0.0, 0.0, empty, empty
        )

    def col(name: str) -> np.ndarray:
        return cf.field(name).to_numpy(zero_copy_only=False)

    rp3 = cf.field("rp3").flatten().to_numpy(zero_copy_only=False).astype(np.float64)
    columns = PairColumns(
        common=col("common").astype(np.float64),
        dot=col("dot").astype(np.float64),
        rp3=rp3.reshape(-1, len(RP3_ALPHAS)),
        listing_users=float(col("listing_users")[0]),
        listing_norm=float(col("listing_norm")[0]),
        partner_users=col("neighbour_users").astype(np.float64),
        partner_norm=col("neighbour_norm").astype(np.float64),
    )
    return col("neighbour_id").astype(object), columns


def _variant_tasks(variant: Variant, k: int):
    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            lists = batch.column("cf")
            ids_out, scores_out = [], []
            for i in range(batch.num_rows):
                value = lists[i]
                partners, columns = partner_columns(value.values if value.is_valid else None)
                scores = variant_scores(variant, columns)
                best = top_positions(scores, partners.astype(str), k)
                ids_out.append([str(p) for p in partners[best]])
                scores_out.append(scores[best].astype(np.float32).tolist())
            yield pa.RecordBatch.from_arrays(
                [
                    batch.column("listing_id"),
                    pa.array(ids_out, pa.list_(pa.string())),
                    pa.array(scores_out, pa.list_(pa.float32())),
                ],
                names=["listing_id", "neighbour_ids", "scores"],
            )

    return run


def variant_lists(cointeraction: DataFrame, variant: Variant, *, k: int) -> DataFrame:
    """Each listing's top-``k`` partners under ``variant`` as ranked lists (listing_id,
    neighbour_ids, scores), the ItemKNN / RP3beta baselines."""
    return grouped_partners(cointeraction).mapInArrow(
        _variant_tasks(variant, k),
        "listing_id string, neighbour_ids array<string>, scores array<float>",
    )
