"""Approximate top-k cosine neighbours at catalogue scale: an inverted file (IVF) in Spark.

This module is the search API (``search``, ``ivf_top_k``, ``IvfParams``) and runs the steps:

1. **Centroids** (``lib.ivf_index``): spherical k-means on the driver over a bounded sample (at
   most ``MAX_SAMPLE`` vectors, whatever the catalogue size), broadcast to the executors.
2. **Assign** (``lib.ivf_index``): every listing gets its home list (nearest centroid) and its
   ``nprobe`` nearest lists (the home list first); with a partition key only lists holding that
   key's listings count.
3. **Plan** (``lib.ivf_plan``): the driver collects per (part, list) counts (``parts x nlist``
   rows) and splits each list's work into tasks of bounded size: queries in chunks, a huge
   list's candidates in slices, so no task dominates a stage however skewed the lists are.
4. **Home pass** (``lib.task_stages.home_tasks``): each listing is scored against its own list
   (one task per list when it is small enough: the listing travels once as both query and
   candidate) and keeps its best k there; the k-th of those, ``tau``, is a lower bound of its
   final k-th score. The same Python worker then routes the listing to the search pass
   (``lib.ivf_plan.Router``): as a query of its other ``nprobe - 1`` lists, as a candidate of its
   own. Those rows travel packed, one Arrow IPC payload per task key, so Spark shuffles
   thousands of values instead of millions of rows.
5. **Search pass** (``lib.task_stages.search_tasks``): a task scores its routed queries against
   its candidates and emits only candidates reaching the query's ``tau``, so only a few per
   (listing, list) leave it.
6. **Merge** (``lib.neighbours.merge_lists``): the home lists (passed through the search stage)
   and the search pass's lists, packed per merge partition, are ranked in Arrow inside the
   partitions into one row per listing with its neighbours and scores as arrays: k times fewer
   rows for the JVM to take in than one per neighbour, which the publish explodes to at the end.

The result is exactly what an IVF-Flat index with the same centroids and ``nprobe`` returns,
ties at the k-th score broken by neighbour_id; the scoring is the blockwise one of
``lib.block_scoring``. ``measure_recall`` (``lib.recall``) compares it with exact search on a
sample of queries, every run; it and ``coverage`` are part of this API.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import pyarrow as pa
from pyspark import Broadcast, StorageLevel
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from lib import neighbours, task_stages
from lib.ivf_index import (
    allowed_lists,
    assign_lists,
    collect_sample,
    default_nlist,
    default_sample_size,
    train_centroids,
)
from lib.ivf_plan import ListPlan, Router, list_counts, plan_arrays, plan_lists, plan_summary
from lib.neighbours import base_rows, task_rows
from lib.recall import coverage, measure_recall
from lib.task_stages import BOTH, CANDIDATE, QUERY, partitions_for


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
        allowed = sc.broadcast(allowed_lists(base, centroids_bc, nlist))
    assigned = assign_lists(base, centroids_bc, nprobe=nprobe, allowed=allowed).persist(
        StorageLevel.MEMORY_AND_DISK
    )
    plans = plan_lists(
        list_counts(assigned), task_work=params.task_work, max_candidates=params.max_candidates
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
    # (rid modulo the chunks); ``Router`` computes the same.
    members = assigned.join(plan_df, ["part", "list"]).withColumn(
        "slice", F.pmod(F.shiftright("rid", 32), F.col("slices"))
    )

    # Home pass: every listing against slice 0 of its own list -> its best k there and tau.
    whole = (F.col("h_chunks") == 1) & (F.col("slices") == 1)
    # A list small enough for one task: each member travels once, as query and candidate.
    whole_lists = task_rows(
        members.where(whole), role=BOTH, list_=F.col("list"), qchunk=F.lit(0), cslice=F.lit(0)
    )
    # Otherwise queries in chunks, each against the list's slice 0 (one copy per chunk).
    chunked_queries = task_rows(
        members.where(~whole),
        role=QUERY,
        list_=F.col("list"),
        qchunk=F.pmod("rid", F.col("h_chunks")),
        cslice=F.lit(0),
    )
    chunk = F.explode(F.sequence(F.lit(0), F.col("h_chunks") - 1))
    chunked_candidates = task_rows(
        members.where(~whole & (F.col("slice") == 0)).withColumn("c", chunk),
        role=CANDIDATE,
        list_=F.col("list"),
        qchunk=F.col("c"),
        cslice=F.lit(0),
    )
    home_rows = whole_lists.unionByName(chunked_queries).unionByName(chunked_candidates)
    total = sum(p.members for p in plans)
    # ... whose results become the search pass's task rows (``Router``): every listing against
    # the other lists it probes (and the rest of its own list when that is sliced); only
    # candidates reaching its tau leave a task.
    routed = task_stages.home_tasks(
        home_rows,
        k=k,
        num_partitions=partitions_for(total, parallelism),
        route=Router(plan),
        device=device,
    )
    search_rows = sum(
        p.search_queries * p.slices + p.members * p.search_chunks for p in plans if p.search_queries
    )
    # The merge holds whole partitions of list elements: k per listing from its home list and
    # typically a few k more from the lists it probes.
    merge_partitions = partitions_for(total * k, parallelism)
    found = task_stages.search_tasks(
        routed,
        k=k,
        num_partitions=partitions_for(search_rows, parallelism),
        merge_partitions=merge_partitions,
        device=device,
    )
    return neighbours.merge_lists(found, k=k, num_partitions=merge_partitions)


# The API of a search: ``coverage`` and ``measure_recall`` (``lib.recall``) check every result.
__all__ = [
    "METHODS",
    "IvfParams",
    "SearchResult",
    "coverage",
    "ivf_top_k",
    "measure_recall",
    "search",
    "with_partition_key",
]
