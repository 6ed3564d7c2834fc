"""Approximate top-k cosine neighbours at catalogue scale: an inverted file (IVF) in Spark.

1. **Centroids**: spherical k-means on the driver over a bounded sample (at most
   ``MAX_SAMPLE`` vectors, whatever the catalogue size), broadcast to the executors.
2. **Assign**: every listing gets its home list (nearest centroid) and its ``nprobe`` nearest
   lists (the home list first); with a partition key only lists holding that key's listings count.
3. **Plan**: the driver collects per (part, list) counts (``parts x nlist`` rows) and splits each
   list's work into tasks of bounded size: queries in chunks, a huge list's candidates in slices,
   so no task dominates a stage however skewed the lists are.
4. **Home pass**: each listing is scored against its own list (one task per list when it is
   small enough: the listing travels once as both query and candidate) and keeps its best k
   there; the k-th of those, ``tau``, is a lower bound of its final k-th score. The same Python
   worker then routes the listing to the search pass (``_Router``): as a query of its other
   ``nprobe - 1`` lists, as a candidate of its own. Those rows travel packed, one Arrow IPC
   payload per task key, so Spark shuffles thousands of values instead of millions of rows.
5. **Search pass**: a task scores its routed queries against its candidates and emits only
   candidates reaching the query's ``tau``, so only a few per (listing, list) leave it.
6. **Merge**: the home lists (passed through the search stage) and the search pass's lists,
   packed per merge partition, are ranked in Arrow inside the partitions into one row per
   listing with its neighbours and scores as arrays: k times fewer rows for the JVM to take in
   than one per neighbour, which the publish explodes to at the end.

The result is exactly what an IVF-Flat index with the same centroids and ``nprobe`` returns; the
scoring is the blockwise one of ``lib.neighbours``. ``measure_recall`` compares it
with exact search on a sample of queries, every run.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyspark import Broadcast, StorageLevel
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from lib import neighbours
from lib.neighbours import (
    BOTH,
    CANDIDATE,
    NO_PART,
    PASS,
    QUERY,
    base_rows,
    partitions_for,
    task_rows,
    unit_rows,
    vector_matrix,
)

# k-means sample bound: training cost stays flat as the catalogue grows.
MAX_SAMPLE = 262_144
MAX_NLIST = 8_192


@dataclass(frozen=True)
class IvfParams:
    """Search parameters; ``None`` means derived from the catalogue size."""

    k: int = 20
    nlist: int | None = None
    nprobe: int = 16
    sample_size: int | None = None
    # faiss trains IVF quantizers with 10 iterations too.
    iterations: int = 10
    seed: int = 7
    # Upper bound on query x candidate scores per task (~0.1 s of CPU) ...
    task_work: int = 1 << 25
    # ... and on candidates per task: larger lists are sliced.
    max_candidates: int = 1 << 15
    device: str = "cpu"


def default_nlist(num_listings: int) -> int:
    """About sqrt(n) lists: a list and a query's probes stay a small, fixed share of the work."""
    return int(min(MAX_NLIST, max(1, round(math.sqrt(max(1, num_listings))))))


def default_sample_size(nlist: int) -> int:
    """64 vectors per centroid (at least 10,000), never more than ``MAX_SAMPLE``."""
    return int(min(MAX_SAMPLE, max(10_000, 64 * nlist)))


# --------------------------------------------------------------------------------------------
# Centroids (driver)
# --------------------------------------------------------------------------------------------


def train_centroids(
    sample: np.ndarray, nlist: int, *, iterations: int = 10, seed: int = 7
) -> np.ndarray:
    """Spherical k-means: ``nlist`` unit centroids of the unit-scaled ``sample`` rows.

    Starts from distinct random sample points; a centroid left empty is moved onto the sample
    point farthest from its own centroid, so lists stay populated.
    """
    import torch

    x = torch.from_numpy(unit_rows(sample))
    nlist = max(1, min(nlist, len(x)))
    generator = torch.Generator().manual_seed(seed)
    centroids = x[torch.randperm(len(x), generator=generator)[:nlist]].clone()
    for _ in range(iterations):
        best_score, assign = _nearest(x, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=nlist)
        empty = torch.nonzero(counts == 0).squeeze(1)
        if len(empty):
            far = torch.argsort(best_score)[: len(empty)]
            sums[empty] = x[far]
        centroids = torch.nn.functional.normalize(sums, dim=1)
    return centroids.numpy().astype(np.float32)


def _nearest(x, centroids, block: int = 65_536):
    import torch

    scores, index = [], []
    for start in range(0, len(x), block):
        best = (x[start : start + block] @ centroids.T).max(dim=1)
        scores.append(best.values)
        index.append(best.indices)
    return torch.cat(scores), torch.cat(index)


def collect_sample(embeddings: DataFrame, *, size: int, num_listings: int, seed: int) -> np.ndarray:
    """Collect about ``size`` embeddings (a bounded, deterministic hash sample) to the driver."""
    fraction = min(1.0, 1.5 * size / max(1, num_listings))
    picked = (
        embeddings.select("listing_id", "embedding")
        .withColumn("h", F.xxhash64(F.lit(seed), "listing_id"))
        .where(F.pmod("h", F.lit(1_000_000)) < F.lit(int(fraction * 1_000_000)))
        .orderBy("h")
        .limit(size)
        .select(F.col("embedding").cast("array<float>").alias("vec"))
    )
    table = picked.toArrow()
    if table.num_rows == 0:
        raise ValueError("cannot train IVF centroids: the embeddings sample is empty")
    return vector_matrix(table.column("vec"))


# --------------------------------------------------------------------------------------------
# Assignment (executors)
# --------------------------------------------------------------------------------------------


def _assign(centroids: Broadcast, nprobe: int, allowed: Broadcast | None):
    """mapInArrow: (part, rid, listing_id, vec) -> + list (home) and probe_bytes (the probed
    lists, nearest first, packed by ``neighbours.pack_ints``)."""

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        import torch

        torch.set_num_threads(1)
        c = torch.from_numpy(centroids.value)
        masks = allowed.value if allowed is not None else None
        for batch in batches:
            if batch.num_rows == 0:
                continue
            vectors = unit_rows(vector_matrix(batch.column("vec")))
            scores = torch.from_numpy(vectors) @ c.T
            parts = batch.column("part").to_numpy(zero_copy_only=False)
            if masks is not None:
                for part in set(parts):
                    rows = torch.from_numpy(np.flatnonzero(parts == part))
                    blocked = torch.from_numpy(~masks.get(part, np.ones(len(c), bool)))
                    scores[rows[:, None], torch.nonzero(blocked).squeeze(1)[None, :]] = float(
                        "-inf"
                    )
            take = min(nprobe, len(c))
            values, probes = torch.topk(scores, take, dim=1)
            valid = torch.isfinite(values).numpy()
            valid[:, 0] = True  # the home list: its own part always has it
            lengths = valid.sum(axis=1)
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
            flat = probes.numpy()[valid].astype(np.int32)
            yield pa.RecordBatch.from_arrays(
                [
                    batch.column("part"),
                    batch.column("rid"),
                    batch.column("listing_id"),
                    pa.array(probes[:, 0].numpy().astype(np.int32)),
                    neighbours.pack_ints(flat, offsets),
                    neighbours.pack_matrix(vectors),
                ],
                names=["part", "rid", "listing_id", "list", "probe_bytes", "vec"],
            )

    return run


_ASSIGNED_SCHEMA = (
    "part string, rid long, listing_id string, list int, probe_bytes binary, vec binary"
)


def assign_lists(
    base: DataFrame, centroids: Broadcast, *, nprobe: int, allowed: Broadcast | None = None
) -> DataFrame:
    """Home list and ``nprobe`` probe lists of every (part, rid, listing_id, vec) row; vectors
    come back unit length and packed (``neighbours.pack_matrix``). ``allowed`` maps a part to
    the lists it may probe (boolean mask)."""
    return base.mapInArrow(_assign(centroids, nprobe, allowed), _ASSIGNED_SCHEMA)


# --------------------------------------------------------------------------------------------
# Planning (driver, from per-list counts)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ListPlan:
    """How one (part, list) is split into tasks.

    The members are cut into ``slices`` of at most ``max_candidates``. The home pass scores each
    member against slice 0 in ``home_chunks`` tasks; the search pass scores the listings routed
    here from other lists against every slice, and, when there are several slices, the members
    against slices 1.., in ``search_chunks`` x ``slices`` tasks.
    """

    part: str
    list: int
    members: int
    routed: int  # listings of other lists that probe this one
    slices: int
    home_chunks: int
    search_chunks: int

    @property
    def per_slice(self) -> int:
        return -(-self.members // self.slices)

    @property
    def search_queries(self) -> int:
        return self.routed + (self.members if self.slices > 1 else 0)

    @property
    def home_task_scores(self) -> int:
        return -(-self.members // self.home_chunks) * self.per_slice

    @property
    def search_task_scores(self) -> int:
        return -(-self.search_queries // self.search_chunks) * self.per_slice


def plan_lists(
    counts: Iterable[tuple[str, int, int, int]], *, task_work: int, max_candidates: int
) -> list[ListPlan]:
    """Split every (part, list, members, routed from other lists) into tasks of at most about
    ``task_work`` scores and ``max_candidates`` candidates each."""
    plans = []
    for part, list_, members, routed in counts:
        slices = max(1, -(-members // max_candidates))
        per_slice = -(-members // slices)
        searching = routed + (members if slices > 1 else 0)

        def chunks(queries: int, per_slice: int = per_slice) -> int:
            return max(1, min(max(1, queries), -(-(queries * per_slice) // task_work)))

        plans.append(
            ListPlan(part, int(list_), members, routed, slices, chunks(members), chunks(searching))
        )
    return plans


def plan_summary(plans: Sequence[ListPlan]) -> dict:
    """Task counts and the largest planned task (scores), for logs, metadata and tests."""
    searched = [p for p in plans if p.search_queries and p.members]
    return {
        "lists": len(plans),
        "largest_list": max((p.members for p in plans), default=0),
        "home_tasks": sum(p.home_chunks for p in plans),
        "search_tasks": sum(p.search_chunks * p.slices for p in searched),
        "max_task_scores": max(
            [p.home_task_scores for p in plans] + [p.search_task_scores for p in searched],
            default=0,
        ),
        "max_task_candidates": max((p.per_slice for p in plans), default=0),
    }


def _count_probes(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """mapInArrow over assigned rows: per (part, list), the listings that probe it and how many
    of them have it as their home list, summed over the partition."""
    totals: dict[tuple[str, int], list[int]] = {}
    for batch in batches:
        if batch.num_rows == 0:
            continue
        probes = neighbours.unpack_ints(batch.column("probe_bytes"))
        lengths = pc.list_value_length(probes).to_numpy(zero_copy_only=False)
        lists = probes.flatten().to_numpy().astype(np.int64)
        home = np.zeros(len(lists), np.int64)
        home[np.cumsum(lengths) - lengths] = 1
        part = pc.dictionary_encode(batch.column("part"))
        codes = np.repeat(part.indices.to_numpy(zero_copy_only=False), lengths)
        width = int(lists.max()) + 1
        keys, inverse, probing = np.unique(
            codes * width + lists, return_inverse=True, return_counts=True
        )
        members = np.bincount(inverse, weights=home, minlength=len(keys))
        names = part.dictionary.to_pylist()
        for key, count, member in zip(keys, probing, members, strict=True):
            code, list_ = divmod(int(key), width)
            total = totals.setdefault((names[code], list_), [0, 0])
            total[0] += int(member)
            total[1] += int(count)
    if totals:
        (parts, lists_), values = zip(*totals.keys(), strict=True), list(totals.values())
        yield pa.RecordBatch.from_arrays(
            [
                pa.array(parts, pa.string()),
                pa.array(lists_, pa.int32()),
                pa.array([v[0] for v in values], pa.int64()),
                pa.array([v[1] for v in values], pa.int64()),
            ],
            names=["part", "list", "members", "probing"],
        )


def _list_counts(assigned: DataFrame) -> list[tuple[str, int, int, int]]:
    """(part, list, members, listings of other lists probing it): counted in the Python
    workers from the packed probes, so only parts x nlist rows reach Spark's aggregation."""
    rows = (
        assigned.select("part", "probe_bytes")
        .mapInArrow(_count_probes, "part string, list int, members long, probing long")
        .groupBy("part", "list")
        .agg(F.sum("members").alias("members"), F.sum("probing").alias("probing"))
        .collect()
    )
    return [(r.part, r.list, int(r.members), int(r.probing) - int(r.members)) for r in rows]


def _allowed_lists(base: DataFrame, centroids: Broadcast, nlist: int) -> dict[str, np.ndarray]:
    """Per part, which lists hold at least one of its listings (parts x nlist booleans)."""
    homes = (
        assign_lists(base, centroids, nprobe=1)
        .groupBy("part", "list")
        .count()
        .select("part", "list")
        .collect()
    )
    masks: dict[str, np.ndarray] = {}
    for row in homes:
        masks.setdefault(row.part, np.zeros(nlist, bool))[row.list] = True
    return masks


# --------------------------------------------------------------------------------------------
# Search
# --------------------------------------------------------------------------------------------


METHODS = ("ivf", "exact")


@dataclass
class SearchResult:
    """The (lazy) ranked neighbour lists (``neighbours.RANKED_LISTS_SCHEMA``: listing_id,
    neighbour_ids, scores, best first) and what the search decided (``info``: JSON-able, goes
    into stats and commit metadata).

    Intermediate results that feed two later steps stay cached until ``release()``.
    """

    top_k: DataFrame
    method: str
    info: dict = field(default_factory=dict)
    cached: list = field(default_factory=list, repr=False)

    def release(self) -> None:
        """Drop cached intermediates and broadcasts; ``top_k`` may not be evaluated after."""
        for item in self.cached:
            if isinstance(item, DataFrame):
                item.unpersist()
            else:
                item.destroy()
        self.cached.clear()


def search(
    embeddings: DataFrame,
    *,
    method: str,
    params: IvfParams,
    num_listings: int,
    partition_col: str | None = None,
    num_blocks: int | None = None,
) -> SearchResult:
    """Top-``params.k`` neighbours by ``method``: ``ivf`` (``ivf_top_k``) or ``exact``
    (``neighbours.exact_top_k``, blockwise brute force, the reference)."""
    if method == "ivf":
        return ivf_top_k(
            embeddings, params=params, num_listings=num_listings, partition_col=partition_col
        )
    if method == "exact":
        blocks = num_blocks or neighbours.default_num_blocks(num_listings)
        top_k = neighbours.exact_top_k(
            embeddings,
            k=params.k,
            num_blocks=blocks,
            partition_col=partition_col,
            device=params.device,
        )
        return SearchResult(top_k, "exact", {"num_blocks": blocks})
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def with_partition_key(embeddings: DataFrame, listings: DataFrame, key: str) -> DataFrame:
    """Embeddings of active listings only, with the listings snapshot's ``key`` column."""
    if key not in listings.columns:
        raise ValueError(f"partition key {key!r} is not a column of the listings snapshot")
    active = listings.where(F.col("is_active")).select("listing_id", key)
    return embeddings.join(active, "listing_id")


def ivf_top_k(
    embeddings: DataFrame,
    *,
    params: IvfParams,
    num_listings: int,
    partition_col: str | None = None,
) -> SearchResult:
    """Approximate top-``k`` cosine neighbours of every (listing_id, embedding) row, within the
    same ``partition_col`` value when given.

    Runs a few small Spark jobs now (the centroid sample, per-list counts; only bounded data
    reaches the driver) and returns the neighbours as a lazy DataFrame, one row per listing:
    listing_id, neighbour_ids, scores (best first). Call ``release()`` on the result when done
    with it.
    """
    spark = embeddings.sparkSession
    sc = spark.sparkContext
    nlist = params.nlist or default_nlist(num_listings)
    sample_size = params.sample_size or default_sample_size(nlist)
    sample = collect_sample(
        embeddings, size=sample_size, num_listings=num_listings, seed=params.seed
    )
    centroids = train_centroids(sample, nlist, iterations=params.iterations, seed=params.seed)
    nlist = len(centroids)
    nprobe = max(1, min(params.nprobe, nlist))
    centroids_bc = sc.broadcast(centroids)
    base = base_rows(embeddings, partition_col)
    allowed = None
    if partition_col is not None:
        allowed = sc.broadcast(_allowed_lists(base, centroids_bc, nlist))
    assigned = assign_lists(base, centroids_bc, nprobe=nprobe, allowed=allowed).persist(
        StorageLevel.MEMORY_AND_DISK
    )
    plans = plan_lists(
        _list_counts(assigned), task_work=params.task_work, max_candidates=params.max_candidates
    )
    plan_bc = sc.broadcast(plan_arrays(plans))
    top_k = _search(assigned, plans, plan_bc, params=params, parallelism=sc.defaultParallelism)
    cached = [assigned, centroids_bc, plan_bc] + ([allowed] if allowed is not None else [])
    info = {
        "nlist": nlist,
        "nprobe": nprobe,
        "kmeans_sample": len(sample),
        **{f"plan_{k}": v for k, v in plan_summary(plans).items()},
    }
    return SearchResult(top_k, "ivf", info, cached)


def plan_arrays(plans: Sequence[ListPlan]) -> dict[str, dict[str, np.ndarray]]:
    """Per part, the plan as arrays indexed by list: ``slices``, ``chunks`` (search chunks) and
    ``searching`` (queries the search pass routes to the list); lists without a plan get 1, 1
    and 0."""
    size = 1 + max((p.list for p in plans), default=0)
    out: dict[str, dict[str, np.ndarray]] = {}
    for p in plans:
        arrays = out.setdefault(
            p.part,
            {
                "slices": np.ones(size, np.int64),
                "chunks": np.ones(size, np.int64),
                "searching": np.zeros(size, np.int64),
            },
        )
        arrays["slices"][p.list] = p.slices
        arrays["chunks"][p.list] = p.search_chunks
        arrays["searching"][p.list] = p.search_queries
    return out


def _ragged_range(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenated ``range(start, start + count)`` for every (start, count)."""
    total = int(counts.sum())
    first = np.cumsum(counts) - counts
    return np.repeat(starts - first, counts) + np.arange(total)


class _Router:
    """``route`` for ``neighbours.home_tasks``: turns home-pass results into the search pass's
    task rows, packed one payload per task key, so the few million (query, probed list) rows
    cross the shuffle as a few thousand values.

    A listing becomes a query of every list it probes besides its own (and of its own list's
    other slices when that list is sliced), in every candidate slice there; it becomes a
    candidate of its own list's search chunks. Its home best k pass through the search stage
    to the merge unchanged.
    """

    def __init__(self, plan: Broadcast):
        self.plan = plan

    def __call__(self, home: pa.Table) -> Iterator[pa.RecordBatch]:
        first_rid = int(home.column("rid")[0].as_py())
        lists = home.select(["rid", "listing_id", "top_ids", "top_scores"])
        yield neighbours.packed_task_rows([(PASS, NO_PART, -1, first_rid % (1 << 31), 0)], [lists])
        parts = home.column("part").to_numpy(zero_copy_only=False)
        for part in sorted(set(parts)):
            rows = home.take(pa.array(np.flatnonzero(parts == part)))
            yield from self._route_part(part, rows, self.plan.value[part])

    @staticmethod
    def _route_part(part: str, home: pa.Table, plan: dict) -> Iterator[pa.RecordBatch]:
        slices, chunks, searching = plan["slices"], plan["chunks"], plan["searching"]
        own = home.column("list").to_numpy()
        rid = home.column("rid").to_numpy()
        probes = home.column("probes").combine_chunks()
        lengths = pc.list_value_length(probes).to_numpy(zero_copy_only=False)
        dest = probes.flatten().to_numpy().astype(np.int64)
        owner = np.repeat(np.arange(len(own)), lengths)
        first = np.cumsum(lengths) - lengths
        is_home = np.arange(len(dest)) == np.repeat(first, lengths)
        # Every slice of a probed list; only the other slices of the own list.
        start = is_home.astype(np.int64)
        count = np.maximum(slices[dest] - start, 0)
        q_owner, q_list = np.repeat(owner, count), np.repeat(dest, count)
        q_slice = _ragged_range(start, count)
        q_chunk = rid[q_owner] % chunks[q_list]
        # Candidates: one copy per search chunk of the own list, in the listing's slice.
        c_count = np.where(searching[own] > 0, chunks[own], 0)
        c_owner = np.repeat(np.arange(len(own)), c_count)
        c_chunk = _ragged_range(np.zeros(len(own), np.int64), c_count)
        c_slice = (rid[c_owner] >> 32) % slices[own[c_owner]]

        who = np.concatenate([q_owner, c_owner])
        keys = np.stack(
            [
                np.concatenate([q_list, own[c_owner]]),
                np.concatenate([q_chunk, c_chunk]),
                np.concatenate([q_slice, c_slice]),
            ]
        )
        if len(who) == 0:
            return
        order = np.lexsort(keys[::-1])
        who, keys = who[order], keys[:, order]
        role = np.concatenate(
            [np.full(len(q_owner), QUERY, np.int8), np.full(len(c_owner), CANDIDATE, np.int8)]
        )[order]
        picked = pa.array(who)
        routed = pa.table(
            [
                pa.array(np.full(len(who), part, object), pa.string()),
                pa.array(keys[0], pa.int32()),
                pa.array(keys[1], pa.int32()),
                pa.array(keys[2], pa.int32()),
                pa.array(role, pa.int8()),
                pa.array(rid[who]),
                home.column("listing_id").take(picked),
                home.column("vec").take(picked),
                home.column("tau").take(picked),
                neighbours.empty_binary(len(who)),
            ],
            schema=neighbours.TASK_ARROW_SCHEMA,
        ).combine_chunks()
        # One chunk: a slice then packs as one record batch, not one per input batch it spans.
        bounds = np.flatnonzero(np.any(keys[:, 1:] != keys[:, :-1], axis=0)) + 1
        starts = np.concatenate([[0], bounds])
        ends = np.concatenate([bounds, [len(who)]])
        yield neighbours.packed_task_rows(
            [(QUERY, part, int(keys[0, a]), int(keys[1, a]), int(keys[2, a])) for a in starts],
            [routed.slice(a, b - a) for a, b in zip(starts, ends, strict=True)],
        )


def _search(
    assigned: DataFrame,
    plans: Sequence[ListPlan],
    plan: Broadcast,
    *,
    params: IvfParams,
    parallelism: int,
) -> DataFrame:
    """Home pass, search pass and merge: the ranked top k (lazy)."""
    spark = assigned.sparkSession
    # From an Arrow table: a list of tuples would start Python workers to deserialise it, once
    # per branch that joins it below (~2 s at 1M listings).
    plan_df = F.broadcast(
        spark.createDataFrame(
            pa.table(
                {
                    "part": pa.array([p.part for p in plans], pa.string()),
                    "list": pa.array([p.list for p in plans], pa.int32()),
                    "slices": pa.array([p.slices for p in plans], pa.int32()),
                    "h_chunks": pa.array([p.home_chunks for p in plans], pa.int32()),
                }
            )
        )
    )
    k, device = params.k, params.device
    # The high bits pick a listing's candidate slice, so slices do not follow query chunks
    # (rid modulo the chunks); ``_Router`` computes the same.
    members = assigned.join(plan_df, ["part", "list"]).withColumn(
        "slice", F.pmod(F.shiftright("rid", 32), F.col("slices"))
    )

    # Home pass: every listing against slice 0 of its own list -> its best k there and tau.
    whole = (F.col("h_chunks") == 1) & (F.col("slices") == 1)
    home_rows = (
        task_rows(
            members.where(whole), role=BOTH, list_=F.col("list"), qchunk=F.lit(0), cslice=F.lit(0)
        )
        .unionByName(
            task_rows(
                members.where(~whole),
                role=QUERY,
                list_=F.col("list"),
                qchunk=F.pmod("rid", F.col("h_chunks")),
                cslice=F.lit(0),
            )
        )
        .unionByName(
            task_rows(
                members.where(~whole & (F.col("slice") == 0)).withColumn(
                    "c", F.explode(F.sequence(F.lit(0), F.col("h_chunks") - 1))
                ),
                role=CANDIDATE,
                list_=F.col("list"),
                qchunk=F.col("c"),
                cslice=F.lit(0),
            )
        )
    )
    total = sum(p.members for p in plans)
    # ... whose results become the search pass's task rows (``_Router``): every listing against
    # the other lists it probes (and the rest of its own list when that is sliced); only
    # candidates reaching its tau leave a task.
    routed = neighbours.home_tasks(
        home_rows,
        k=k,
        num_partitions=partitions_for(total, parallelism),
        route=_Router(plan),
        device=device,
    )
    search_rows = sum(
        p.search_queries * p.slices + p.members * p.search_chunks for p in plans if p.search_queries
    )
    # The merge holds whole partitions of list elements: k per listing from its home list and
    # typically a few k more from the lists it probes.
    merge_partitions = partitions_for(total * k, parallelism)
    found = neighbours.search_tasks(
        routed,
        k=k,
        num_partitions=partitions_for(search_rows, parallelism),
        merge_partitions=merge_partitions,
        device=device,
    )
    return neighbours.merge_lists(found, k=k, num_partitions=merge_partitions)


# --------------------------------------------------------------------------------------------
# Quality: recall against exact search on a sample, coverage
# --------------------------------------------------------------------------------------------


def _exact_for_sample(queries: Broadcast, k: int, device: str):
    """mapInArrow over (part, rid, listing_id, vec): each sampled query's top k in the partition.

    A running top k per query is kept across the partition's batches, and its k-th score is the
    threshold for the next batch, so later batches add few rows.
    """

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        import torch

        torch.set_num_threads(1)
        resolved = neighbours.resolve_device(device)
        q_ids, q_parts, q_rids, q_vectors = queries.value
        best = np.full((len(q_ids), k), -np.inf, np.float32)
        best_ids = np.full((len(q_ids), k), None, dtype=object)
        for batch in batches:
            if batch.num_rows == 0:
                continue
            vectors = unit_rows(vector_matrix(batch.column("vec")))
            parts = batch.column("part").to_numpy(zero_copy_only=False)
            rids = batch.column("rid").to_numpy(zero_copy_only=False)
            listing_ids = batch.column("listing_id")
            ids = np.asarray(listing_ids.to_pylist(), dtype=object)
            for part in set(parts):
                cand = np.flatnonzero(parts == part)
                mine = np.flatnonzero(q_parts == part)
                if len(mine) == 0:
                    continue
                qi, ci, scores = neighbours.top_candidates(
                    q_vectors[mine],
                    vectors[cand],
                    k=k,
                    thresholds=best[mine].min(axis=1),
                    query_rids=q_rids[mine],
                    candidate_rids=rids[cand],
                    device=resolved,
                    candidate_order=neighbours.id_order(listing_ids, cand),
                )
                _keep_best(best, best_ids, mine[qi], ids[cand[ci]], scores)
        rows, cols = np.nonzero(np.isfinite(best))
        if len(rows):
            yield pa.RecordBatch.from_arrays(
                [
                    pa.array(q_ids[rows].tolist(), pa.string()),
                    pa.array(best_ids[rows, cols].tolist(), pa.string()),
                    pa.array(best[rows, cols], pa.float32()),
                ],
                names=["listing_id", "neighbour_id", "score"],
            )

    return run


def _keep_best(best, best_ids, queries, ids, scores) -> None:
    """Merge (query, id, score) rows (at most k per query) into the running top k in place."""
    if len(queries) == 0:
        return
    k = best.shape[1]
    order = np.lexsort((-scores, queries))
    queries, ids, scores = queries[order], ids[order], scores[order]
    slot = neighbours.positions_in_runs(queries)
    fresh = np.full_like(best, -np.inf)
    fresh_ids = np.full(best_ids.shape, None, dtype=object)
    fresh[queries, slot] = scores
    fresh_ids[queries, slot] = ids
    merged = np.concatenate([best, fresh], axis=1)
    merged_ids = np.concatenate([best_ids, fresh_ids], axis=1)
    top = np.argsort(-merged, axis=1, kind="stable")
    ranked = np.take_along_axis(merged, top, axis=1)
    tied = np.flatnonzero((ranked[:, k - 1] == ranked[:, k]) & np.isfinite(ranked[:, k - 1]))
    if len(tied):
        # A tie at the k-th score: equal scores by neighbour id, as the merge ranks them.
        scores, width = merged[tied], merged.shape[1]
        names = np.where(np.isfinite(scores), merged_ids[tied], "").astype(str)
        codes = np.unique(names, return_inverse=True)[1].reshape(names.shape)
        rows = np.repeat(np.arange(len(tied)), width)
        order = np.lexsort((codes.ravel(), -scores.ravel(), rows)).reshape(len(tied), width)
        top[tied] = order - width * np.arange(len(tied))[:, None]
    top = top[:, :k]
    best[:] = np.take_along_axis(merged, top, axis=1)
    best_ids[:] = np.take_along_axis(merged_ids, top, axis=1)


def measure_recall(
    embeddings: DataFrame,
    top_k: DataFrame,
    *,
    k: int,
    sample_size: int = 2_000,
    seed: int = 7,
    partition_col: str | None = None,
    device: str = "cpu",
) -> dict:
    """Recall@k of ``top_k`` (ranked lists) against exact search for a deterministic sample of
    queries.

    Runs Spark jobs and collects only the sample (queries, their exact and found neighbours).
    A found neighbour counts as a hit when it scores at least the exact k-th neighbour's score
    (less 1e-5), so ties among equal vectors do not count as misses. Returns ``recall_at_k`` and
    ``recall_queries``.
    """
    base = base_rows(embeddings, partition_col)
    sample = (
        base.withColumn("h", F.xxhash64(F.lit(seed + 1), "listing_id"))
        .orderBy("h")
        .limit(sample_size)
        .drop("h")
    )
    table = sample.toArrow()
    if table.num_rows == 0:
        return {"recall_at_k": None, "recall_queries": 0}
    q_ids = np.asarray(table.column("listing_id").to_pylist(), dtype=object)
    queries = (
        q_ids,
        np.asarray(table.column("part").to_pylist(), dtype=object),
        table.column("rid").to_numpy(),
        unit_rows(vector_matrix(table.column("vec"))),
    )
    spark = embeddings.sparkSession
    queries_bc = spark.sparkContext.broadcast(queries)
    exact = neighbours.merge_top_k(
        base.mapInArrow(_exact_for_sample(queries_bc, k, device), neighbours.EMITTED_SCHEMA),
        k=k,
        dedupe=False,
    )
    truth: dict[str, list[float]] = {}
    for row in exact.select("listing_id", "score").collect():
        truth.setdefault(row.listing_id, []).append(row.score)
    found = found_scores(top_k, [str(i) for i in q_ids])
    queries_bc.destroy()
    return {"recall_at_k": recall_from_scores(truth, found), "recall_queries": len(q_ids)}


def found_scores(top_k: DataFrame, listing_ids: Sequence[str]) -> dict[str, list[float]]:
    """The neighbour scores ``top_k`` (ranked lists) holds for a few listings, collected."""
    wanted = top_k.sparkSession.createDataFrame([(i,) for i in listing_ids], "listing_id string")
    rows = top_k.join(F.broadcast(wanted), "listing_id").select("listing_id", "scores").collect()
    return {row.listing_id: list(row.scores) for row in rows}


def recall_from_scores(
    truth: dict[str, list[float]], found: dict[str, list[float]], tolerance: float = 1e-5
) -> float | None:
    """Share of exact neighbours matched: per query, found scores >= the exact k-th score
    (less ``tolerance``), capped at the number of exact neighbours. None without any."""
    wanted = sum(len(scores) for scores in truth.values())
    if wanted == 0:
        return None
    hits = 0
    for query, exact_scores in truth.items():
        kth = min(exact_scores) - tolerance
        hits += min(len(exact_scores), sum(s >= kth for s in found.get(query, [])))
    return hits / wanted


def quality(
    embeddings: DataFrame,
    top_k: DataFrame,
    *,
    k: int,
    num_listings: int,
    recall_sample: int = 2_000,
    partition_col: str | None = None,
    device: str = "cpu",
) -> dict:
    """``coverage`` and ``measure_recall`` of one search result (runs Spark jobs)."""
    found = coverage(top_k, k=k, num_listings=num_listings)
    return found | measure_recall(
        embeddings,
        top_k,
        k=k,
        sample_size=recall_sample,
        partition_col=partition_col,
        device=device,
    )


def coverage(top_k: DataFrame, *, k: int, num_listings: int) -> dict:
    """Runs one Spark job over ranked lists: share of listings with all ``k`` neighbours,
    listings with at least one, and distinct neighbours as a share of the catalogue."""
    # One row per neighbour; a listing's first one (pos 0) stands for the listing.
    first = F.col("pos") == 0
    row = (
        top_k.select(
            F.size("neighbour_ids").alias("found"),
            F.posexplode("neighbour_ids").alias("pos", "neighbour_id"),
        )
        .agg(
            F.sum(F.when(first & (F.col("found") >= k), 1).otherwise(0)).alias("full"),
            F.sum(F.when(first, 1).otherwise(0)).alias("with_any"),
            F.countDistinct("neighbour_id").alias("distinct_neighbours"),
        )
        .first()
    )
    n = max(1, num_listings)
    return {
        "coverage": (row.full or 0) / n,
        "listings_with_neighbours": int(row.with_any or 0),
        "distinct_neighbour_share": (row.distinct_neighbours or 0) / n,
    }


__all__ = [
    "MAX_SAMPLE",
    "NO_PART",
    "IvfParams",
    "ListPlan",
    "SearchResult",
    "assign_lists",
    "collect_sample",
    "coverage",
    "default_nlist",
    "default_sample_size",
    "found_scores",
    "ivf_top_k",
    "measure_recall",
    "plan_lists",
    "plan_summary",
    "quality",
    "recall_from_scores",
    "search",
    "train_centroids",
    "with_partition_key",
]
