"""Planning the IVF search: per-list work split into bounded tasks, and listings routed to them.

The driver collects per (part, list) counts (``list_counts``: ``parts x nlist`` rows, counted in
the Python workers) and splits each list's work into tasks of bounded size (``plan_lists``):
queries in chunks, a huge list's candidates in slices, so no task dominates a stage however
skewed the lists are. The plan is broadcast as arrays (``plan_arrays``), and ``Router`` uses it
in the home pass's workers to turn each listing's home result into the search pass's task rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyspark import Broadcast
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from lib import packing, task_stages
from lib.neighbours import NO_PART
from lib.task_stages import CANDIDATE, PASS, QUERY

# --------------------------------------------------------------------------------------------
# Plans (driver, from per-list counts)
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
        probes = packing.unpack_ints(batch.column("probe_bytes"))
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


def list_counts(assigned: DataFrame) -> list[tuple[str, int, int, int]]:
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


# --------------------------------------------------------------------------------------------
# Routing home results to the search pass (executors)
# --------------------------------------------------------------------------------------------


def _ragged_range(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenated ``range(start, start + count)`` for every (start, count)."""
    total = int(counts.sum())
    first = np.cumsum(counts) - counts
    return np.repeat(starts - first, counts) + np.arange(total)


class Router:
    """``route`` for ``task_stages.home_tasks``: turns home-pass results into the search pass's
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
        yield task_stages.packed_task_rows([(PASS, NO_PART, -1, first_rid % (1 << 31), 0)], [lists])
        encoded = pc.dictionary_encode(home.column("part")).combine_chunks()
        codes = encoded.indices.to_numpy(zero_copy_only=False)
        for code in np.argsort(encoded.dictionary.to_pylist()):
            part = encoded.dictionary[int(code)].as_py()
            # One part (no partition key) is the whole table: no copy of its lists and vectors.
            rows = home if len(encoded.dictionary) == 1 else home.filter(pa.array(codes == code))
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
                # Fixed-size rows: gathered as a matrix, faster than Arrow's take of binaries.
                packing.pack_matrix(packing.vector_matrix(home.column("vec"))[who]),
                home.column("tau").take(picked),
                packing.empty_binary(len(who)),
            ],
            schema=task_stages.TASK_ARROW_SCHEMA,
        ).combine_chunks()
        # One chunk: a slice then packs as one record batch, not one per input batch it spans.
        bounds = np.flatnonzero(np.any(keys[:, 1:] != keys[:, :-1], axis=0)) + 1
        starts = np.concatenate([[0], bounds])
        ends = np.concatenate([bounds, [len(who)]])
        yield task_stages.packed_task_rows(
            [(QUERY, part, int(keys[0, a]), int(keys[1, a]), int(keys[2, a])) for a in starts],
            [routed.slice(a, b - a) for a, b in zip(starts, ends, strict=True)],
        )
