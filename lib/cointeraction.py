"""Co-interaction statistics: which listings the same users interacted with, and how strongly.

One row per (listing, co-interacted listing) holds every count that the classic item-item
similarities need: ItemKNN cosine over the binary or the weighted user×listing matrix with
shrinkage, and RP3beta (Paudel et al. 2017, a random walk listing → user → listing with
popularity penalised by ``deg^beta``). Each similarity variant is then a cheap function of those
columns (``variant_scores``), so the shard stage does the one expensive pass over the pairs and
later stages choose among the variants on validation without another pass over the interactions.

A user contributes at most ``max_items_per_user`` listings (the strongest), which bounds the
pairs at ``max_items_per_user²`` per user; each listing keeps, per variant, its ``per_variant``
best partners, which bounds the table at ``len(VARIANTS) × per_variant`` rows per listing
whatever the density of the data.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from lib.ordering import sorted_positions
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
    listing_users: float | np.ndarray  # one per row where the rows are several listings'
    listing_norm: float | np.ndarray
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
    listing_part = np.maximum(pairs.listing_users, 1.0) ** -variant.alpha
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
        .select("listing_idx", F.lit(True).alias("asked"))
    )


# Pairs expanded in numpy per Arrow batch, and pairs held before they are summed and truncated:
# bounds a task's memory.
_PAIR_CHUNK = 2_000_000
# One row per (user, a, b): the user's degree, the weights' product and both listings' support,
# so the pass that sums a listing's pairs needs no join.
_PAIR_SCHEMA = (
    "a int, b int, degree int, dot double, "
    "a_users int, a_norm float, b_users int, b_norm float, a_then_rank long"
)
_PAIR_COLUMNS = [f.split()[0] for f in _PAIR_SCHEMA.split(", ")]
_TRUNCATED_SCHEMA = (
    "a int, b int, common int, dot float, listing_users int, neighbour_users int, "
    "listing_norm float, neighbour_norm float, rp3 array<float>"
)
_TRUNCATED_COLUMNS = [f.split()[0] for f in _TRUNCATED_SCHEMA.split(", ")]


def _batch(columns: dict[str, np.ndarray], names: Sequence[str]) -> pa.RecordBatch:
    return pa.RecordBatch.from_arrays([pa.array(columns[n]) for n in names], names=list(names))


def _concat(parts: dict[str, list]) -> dict[str, np.ndarray]:
    return {name: np.concatenate(chunks) for name, chunks in parts.items() if chunks}


def _expand_users(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """Per user (a list of their listings with weight, is-query and the listing's support): every
    ordered pair of two of the user's listings whose first is a query."""
    for batch in batches:
        items = batch.column("items")
        offsets = items.offsets.to_numpy()
        offsets = offsets - offsets[0]
        flat = items.flatten()
        field = {name: flat.field(name).to_numpy(zero_copy_only=False) for name in flat.type.names}
        sizes = np.diff(offsets)
        firsts, seconds, degrees = [], [], []
        for i in np.flatnonzero(sizes >= 2).tolist():
            start, n = int(offsets[i]), int(sizes[i])
            first = np.repeat(np.arange(start, start + n), n)
            second = np.tile(np.arange(start, start + n), n)
            keep = (first != second) & field["asked"][first]
            firsts.append(first[keep])
            seconds.append(second[keep])
            degrees.append(np.full(int(keep.sum()), n, dtype=np.int32))
        if not firsts:
            continue
        first, second = np.concatenate(firsts), np.concatenate(seconds)
        degree = np.concatenate(degrees)
        for at in range(0, len(first), _PAIR_CHUNK):
            a, b = first[at : at + _PAIR_CHUNK], second[at : at + _PAIR_CHUNK]
            yield _batch(
                {
                    "a": field["listing"][a],
                    "b": field["listing"][b],
                    "degree": degree[at : at + _PAIR_CHUNK],
                    "dot": field["weight"][a] * field["weight"][b],
                    "a_users": field["users"][a],
                    "a_norm": field["norm"][a].astype(np.float32),
                    "b_users": field["users"][b],
                    "b_norm": field["norm"][b].astype(np.float32),
                    # One long sorts faster than two columns (a radix sort on the key).
                    "a_then_rank": (field["listing"][a].astype(np.int64) << 32)
                    | field["rank"][b].astype(np.int64),
                },
                _PAIR_COLUMNS,
            )


def _summed(held: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One row per (a, b) of rows sorted by a then the partner's rank: common users, sums."""
    a, key = held["a"], held["a_then_rank"]
    new = np.r_[True, key[1:] != key[:-1]]
    first = np.flatnonzero(new)
    inverse = np.cumsum(new) - 1
    degree = held["degree"].astype(np.float64)
    return {
        "a": a[first],
        "b": held["b"][first],
        "common": np.bincount(inverse).astype(np.int32),
        "dot": np.bincount(inverse, weights=held["dot"]),
        "rp3": np.stack(
            [np.bincount(inverse, weights=degree**-alpha) for alpha in RP3_ALPHAS], axis=1
        ),
        **{name: held[name][first] for name in ("a_users", "a_norm", "b_users", "b_norm")},
    }


def top_positions(scores: np.ndarray, keys: np.ndarray, count: int) -> np.ndarray:
    """Positions of the ``count`` best scores, best first, ties by the smaller key."""
    order = np.lexsort((np.asarray(keys).astype(str), -scores))
    return order[:count]


def _best_rows(scores: np.ndarray, count: int) -> np.ndarray:
    """Rows among the ``count`` best of any column of ``scores`` (rows in tie-break order): all
    above a column's ``count``-th best score, and the first of those equal to it."""
    threshold = -np.partition(-scores, count - 1, axis=0)[count - 1]
    above = scores > threshold
    level = scores == threshold
    room = count - above.sum(axis=0)
    return (above | (level & (np.cumsum(level, axis=0) <= room))).any(axis=1)


def _kept(columns: dict[str, np.ndarray], variants: Sequence[Variant], per_variant: int):
    """Which rows each listing ``a`` keeps: the union over ``variants`` of its ``per_variant``
    best partners, ties by the partner's rank (its listing_id's sort order)."""
    pairs = PairColumns(
        common=columns["common"].astype(np.float64),
        dot=columns["dot"],
        rp3=columns["rp3"],
        listing_users=columns["a_users"].astype(np.float64),
        listing_norm=columns["a_norm"].astype(np.float64),
        partner_users=columns["b_users"].astype(np.float64),
        partner_norm=columns["b_norm"].astype(np.float64),
    )
    a = columns["a"]
    starts = np.flatnonzero(np.r_[True, a[1:] != a[:-1]])
    stops = np.r_[starts[1:], len(a)]
    keep = np.ones(len(a), dtype=bool)
    crowded = np.flatnonzero(stops - starts > per_variant)
    if not len(crowded):
        return keep
    scores = np.empty((len(a), len(variants)))
    for j, variant in enumerate(variants):
        scores[:, j] = variant_scores(variant, pairs)
    for start, stop in zip(starts[crowded].tolist(), stops[crowded].tolist(), strict=True):
        keep[start:stop] = _best_rows(scores[start:stop], per_variant)
    return keep


def _truncate(variants: Sequence[Variant], per_variant: int):
    """Over a partition sorted by ``a`` and the partner's rank: the sums of each (a, b), then
    each ``a``'s kept partners. A listing's rows may span batches, so a listing is held until
    the next starts: a task holds ``_PAIR_CHUNK`` pairs or one listing's, whichever is more."""

    def finish(held: dict[str, np.ndarray]) -> pa.RecordBatch:
        columns = _summed(held)
        keep = _kept(columns, variants, per_variant)
        rp3 = columns["rp3"][keep].astype(np.float32)
        return pa.RecordBatch.from_arrays(
            [
                pa.array(columns["a"][keep]),
                pa.array(columns["b"][keep]),
                pa.array(columns["common"][keep]),
                pa.array(columns["dot"][keep].astype(np.float32)),
                pa.array(columns["a_users"][keep]),
                pa.array(columns["b_users"][keep]),
                pa.array(columns["a_norm"][keep]),
                pa.array(columns["b_norm"][keep]),
                pa.FixedSizeListArray.from_arrays(rp3.reshape(-1), len(RP3_ALPHAS)).cast(
                    pa.list_(pa.float32())
                ),
            ],
            names=_TRUNCATED_COLUMNS,
        )

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        held: dict[str, list] = {name: [] for name in _PAIR_COLUMNS}
        size = 0
        for batch in batches:
            for name in _PAIR_COLUMNS:
                held[name].append(batch.column(name).to_numpy(zero_copy_only=False))
            size += batch.num_rows
            if size < _PAIR_CHUNK:
                continue
            columns = _concat(held)
            done = columns["a"] != columns["a"][-1]
            if done.any():
                yield finish({name: values[done] for name, values in columns.items()})
                held = {name: [values[~done]] for name, values in columns.items()}
                size = int((~done).sum())
        if size:
            yield finish(_concat(held))

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

    One shuffle of the pairs: each task expands its users' pairs in numpy, each pair carrying
    both listings' support, and shuffles them by ``a``; a task then sums each listing's pairs
    and keeps its best partners in the same pass. (Summing by (a, b) first, then joining the
    support and grouping by listing, shuffled every pair three times.) Partners tie by their
    listing_id's rank, one sort of the ids.
    """
    capped = capped_interactions(examples, max_items_per_user=max_items_per_user)
    ids = listing_ids.select("listing_idx", "listing_id")
    ranks = sorted_positions(ids, ["listing_id"], "rank").join(ids, "listing_id")
    rows = capped.join(listing_support(capped), "listing_idx").join(
        ranks.select("listing_idx", "rank"), "listing_idx"
    )
    asked = _query_idx(queries, listing_ids)
    if asked is None:
        rows = rows.withColumn("asked", F.lit(True))
    else:
        rows = rows.join(asked, "listing_idx", "left").fillna(False, subset=["asked"])
    item = F.struct(
        F.col("listing_idx").alias("listing"),
        F.col("weight").cast("double").alias("weight"),
        "asked",
        "users",
        "norm",
        "rank",
    )
    truncated = (
        rows.groupBy("user_idx")
        .agg(F.collect_list(item).alias("items"))
        .mapInArrow(_expand_users, _PAIR_SCHEMA)
        .repartition("a")
        .sortWithinPartitions("a_then_rank")
        .mapInArrow(_truncate(tuple(variants), per_variant), _TRUNCATED_SCHEMA)
    )
    named = ids.select(F.col("listing_idx").alias("a"), "listing_id").join(truncated, "a")
    return named.join(
        ids.select(F.col("listing_idx").alias("b"), F.col("listing_id").alias("neighbour_id")), "b"
    ).select(*training_examples.COINTERACTION_SCHEMA.fieldNames())


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
