"""The Spark stages that score tasks: task rows in, one shuffle, the kept candidates out.

A *task* is a set of query vectors and a set of candidate vectors, identified by the key
(``part``, ``list``, ``qchunk``, ``cslice``). Task rows (``TASK_SCHEMA``: one per query,
candidate, or listing that is both) are shuffled once so that each task lands whole in one Spark
partition; a Python worker then scores each of its tasks (``lib.block_scoring``) and keeps per
query only what can still matter: its best ``k`` (``home_tasks``) or the candidates reaching its
threshold ``tau``, at most ``k`` (``search_tasks``), packed for the merge
(``lib.neighbours.merge_lists``). Memory per worker is one partition's task rows plus one score
block; nothing proportional to the catalogue reaches the driver.

``lib.neighbours.exact_top_k`` (block pairs) and ``lib.ann`` (IVF lists) build their searches on
these stages.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyspark.sql import DataFrame

from lib.block_scoring import best_k, resolve_device, top_candidates
from lib.packing import empty_binary, pack_tables, unpack_ints, unpack_tables, vector_matrix

# Task row roles. A listing that is both query and candidate of a task travels once. PASS rows
# carry candidate lists (``LISTS_ARROW_SCHEMA``, packed) through a search stage to the merge.
CANDIDATE, QUERY, BOTH, PASS = 0, 1, 2, 3
# Rows per Spark partition where a stage collects whole partitions in a Python worker.
ROWS_PER_PARTITION = 200_000
TASK_COLUMNS = (
    "part",  # partition key value: only listings of one part meet in a task
    "list",  # the candidates' list (IVF) or block (exact)
    "qchunk",  # which slice of the queries routed to this list
    "cslice",  # which slice of this list's candidates
    "role",  # CANDIDATE, QUERY or BOTH
    "rid",  # row id: xxhash64(listing_id), used to never score a listing against itself
    "listing_id",
    "vec",  # packed unit vector
    "tau",  # queries only: emit candidates scoring at least this (null: no threshold)
    "probe_bytes",  # IVF home pass only: the lists this query searches, packed int32
    "payload",  # empty, or many rows of this task packed as one Arrow IPC stream (``pack_tables``)
)
# Only flat columns: Spark's Arrow writer is very slow on null arrays (every candidate row).
TASK_SCHEMA = (
    "part string, list int, qchunk int, cslice int, role tinyint, rid long, "
    "listing_id string, vec binary, tau float, probe_bytes binary, payload binary"
)
# The Arrow types of those columns (payload aside), as packed rows must have them.
TASK_ARROW_SCHEMA = pa.schema(
    [
        ("part", pa.string()),
        ("list", pa.int32()),
        ("qchunk", pa.int32()),
        ("cslice", pa.int32()),
        ("role", pa.int8()),
        ("rid", pa.int64()),
        ("listing_id", pa.string()),
        ("vec", pa.binary()),
        ("tau", pa.float32()),
        ("probe_bytes", pa.binary()),
    ]
)
# Per listing (rid: its row id), some candidates: what the tasks emit and the merge ranks. They
# travel packed (``pack_tables``), one value per (search partition, merge partition): ``bucket``
# is the merge partition, rid modulo the merge's partition count.
LISTS_ARROW_SCHEMA = pa.schema(
    [
        ("rid", pa.int64()),
        ("listing_id", pa.string()),
        ("top_ids", pa.list_(pa.string())),
        ("top_scores", pa.list_(pa.float32())),
    ]
)
PACKED_LISTS_SCHEMA = "bucket int, payload binary"


def partitions_for(rows: int, parallelism: int) -> int:
    """Spark partitions for a stage whose Python workers hold a whole partition: about
    ``ROWS_PER_PARTITION`` rows each, in whole waves of ``parallelism`` tasks (5 home tasks on
    2 cores left one core idle for a whole task)."""
    waves = max(1, -(-rows // (ROWS_PER_PARTITION * parallelism)))
    return waves * parallelism


def packed_task_rows(
    keys: Sequence[tuple[int, str, int, int, int]], tables: Sequence[pa.Table]
) -> pa.RecordBatch:
    """``TASK_SCHEMA`` rows that carry only a task key (role, part, list, qchunk, cslice) and
    that task's rows (``TASK_ARROW_SCHEMA``, or candidate lists for PASS) packed as the payload;
    ``_load_partition`` unpacks them."""
    n = len(tables)
    role, part, list_, qchunk, cslice = (list(column) for column in zip(*keys, strict=True))
    return pa.RecordBatch.from_arrays(
        [
            pa.array(part, pa.string()),
            pa.array(list_, pa.int32()),
            pa.array(qchunk, pa.int32()),
            pa.array(cslice, pa.int32()),
            pa.array(role, pa.int8()),
            pa.array(np.zeros(n, np.int64)),
            pa.array([""] * n, pa.string()),
            empty_binary(n),
            pa.array(np.full(n, np.nan, np.float32)),
            empty_binary(n),
            pack_tables(tables),
        ],
        schema=TASK_ARROW_SCHEMA.append(pa.field("payload", pa.binary())),
    )


def _task_groups(table: pa.Table) -> list[np.ndarray]:
    """Row indices of each task (rows sharing part, list, qchunk and cslice), each task's rows
    by ``rid``: a task's matrices are then the same however its rows reached the partition, and
    so are its scores, to the last bit.

    Integer keys sorted with numpy: the part strings become dictionary codes, so no per-row
    Python objects are made (a pandas group-by on the four columns cost ~15 % of a search task).
    """
    part = pc.dictionary_encode(table.column("part"), null_encoding="encode").combine_chunks()
    keys = [part.indices.to_numpy(zero_copy_only=False)] + [
        table.column(name).to_numpy(zero_copy_only=False) for name in TASK_COLUMNS[1:4]
    ]
    order = np.lexsort([table.column("rid").to_numpy(zero_copy_only=False), *keys[::-1]])
    ordered = np.stack([key[order] for key in keys])
    bounds = np.flatnonzero(np.any(ordered[:, 1:] != ordered[:, :-1], axis=0)) + 1
    return np.split(order, bounds)


def id_order(ids: pa.Array, rows: np.ndarray) -> Callable[[], np.ndarray]:
    """``candidate_order`` for ``top_candidates``/``best_k``: the rank of each of ``rows``' listing
    id, so equal scores are broken by neighbour_id as the merges break them. Ranking strings
    costs a sort, so it runs only when called (when a tie needs it)."""

    def ranks() -> np.ndarray:
        picked = ids.take(pa.array(rows))
        return pc.rank(picked, sort_keys="ascending", tiebreaker="dense").to_numpy()

    return ranks


def _prepare_worker(device: str) -> str:
    import torch

    # Spark runs one Python worker per core already; more threads would only contend.
    torch.set_num_threads(1)
    return resolve_device(device)


def _load_partition(batches: Iterator[pa.RecordBatch]):
    """The partition's task rows (packed ones unpacked) as one table, their vectors, row ids,
    per-task (query rows, candidate rows) index pairs and the PASS tables; None for an empty
    partition."""
    batches = [b for b in batches if b.num_rows]
    if not batches:
        return None
    table = pa.Table.from_batches(batches)
    packed = pc.greater(pc.binary_length(table.column("payload")), 0)
    passed = []
    if pc.any(packed).as_py():
        unpacked = [table.filter(pc.invert(packed)).drop_columns(["payload"])]
        payloads = table.filter(packed)
        roles = payloads.column("role").to_pylist()
        for role, rows in zip(roles, unpack_tables(payloads.column("payload")), strict=True):
            (passed if role == PASS else unpacked).append(rows)
        table = pa.concat_tables(unpacked)
    else:
        table = table.drop_columns(["payload"])
    if table.num_rows == 0:
        return table, np.empty((0, 0), np.float32), np.empty(0, np.int64), [], passed
    # Task rows carry unit vectors already (``packed_rows``, ``lib.ann.assign_lists``).
    vectors = vector_matrix(table.column("vec"))
    role = table.column("role").to_numpy(zero_copy_only=False)
    rids = table.column("rid").to_numpy(zero_copy_only=False)
    tasks = [
        (rows[role[rows] != CANDIDATE], rows[role[rows] != QUERY]) for rows in _task_groups(table)
    ]
    return table, vectors, rids, tasks, passed


def pack_lists(lists: pa.Table, buckets: int) -> pa.RecordBatch:
    """``LISTS_ARROW_SCHEMA`` rows as ``PACKED_LISTS_SCHEMA`` rows, one per merge bucket."""
    bucket = lists.column("rid").to_numpy() % buckets
    order = np.argsort(bucket, kind="stable")
    lists, bucket = lists.take(pa.array(order)).combine_chunks(), bucket[order]
    starts = np.flatnonzero(np.concatenate([[True], bucket[1:] != bucket[:-1]]))
    ends = np.append(starts[1:], len(bucket))
    return pa.RecordBatch.from_arrays(
        [
            pa.array(bucket[starts], pa.int32()),
            pack_tables(lists.slice(a, b - a) for a, b in zip(starts, ends, strict=True)),
        ],
        names=["bucket", "payload"],
    )


def _search_tasks(
    k: int, device: str, buckets: int
) -> Callable[[Iterator[pa.RecordBatch]], Iterator]:
    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        resolved = _prepare_worker(device)
        loaded = _load_partition(batches)
        if loaded is None:
            return
        table, vectors, rids, tasks, passed = loaded
        taus = table.column("tau").to_numpy(zero_copy_only=False).astype(np.float32)
        ids = table.column("listing_id").combine_chunks()
        picked_q, picked_c, picked_s = [np.empty(0, np.int64)], [np.empty(0, np.int64)], []
        for queries, candidates in tasks:
            qi, ci, scores = top_candidates(
                vectors[queries],
                vectors[candidates],
                k=k,
                thresholds=taus[queries],
                query_rids=rids[queries],
                candidate_rids=rids[candidates],
                device=resolved,
                candidate_order=id_order(ids, candidates),
            )
            picked_q.append(queries[qi])
            picked_c.append(candidates[ci])
            picked_s.append(scores)
        q, c = np.concatenate(picked_q), np.concatenate(picked_c)
        if len(q):
            # One list per (query, task).
            order = np.argsort(q, kind="stable")
            q, c = q[order], c[order]
            scores = np.concatenate(picked_s)[order]
            starts = np.flatnonzero(np.concatenate([[True], q[1:] != q[:-1]]))
            offsets = pa.array(np.append(starts, len(q)).astype(np.int32))
            passed.append(
                pa.Table.from_arrays(
                    [
                        pa.array(rids[q[starts]]),
                        ids.take(q[starts]),
                        pa.ListArray.from_arrays(offsets, ids.take(c)),
                        pa.ListArray.from_arrays(offsets, pa.array(scores, pa.float32())),
                    ],
                    schema=LISTS_ARROW_SCHEMA,
                )
            )
        if passed:
            yield pack_lists(pa.concat_tables(passed), buckets)

    return run


# Home results handed to ``route`` at a time: bounds a worker's memory whatever ``nprobe``.
_ROUTE_ROWS = 1 << 16


def _home_tasks(
    k: int, device: str, route: Callable[[pa.Table], Iterator[pa.RecordBatch]]
) -> Callable[[Iterator[pa.RecordBatch]], Iterator]:
    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        resolved = _prepare_worker(device)
        loaded = _load_partition(batches)
        if loaded is None:
            return
        table, vectors, rids, tasks, _ = loaded
        ids = table.column("listing_id").combine_chunks()
        lists = table.column("list").to_numpy(zero_copy_only=False)
        pending: list[tuple] = []

        def home_table() -> pa.Table:
            queries = np.concatenate([q for q, _, _ in pending])
            best = np.concatenate([b for _, b, _ in pending])
            neighbour_rows = np.concatenate([r for _, _, r in pending])
            valid = np.isfinite(best)
            offsets = pa.array(np.concatenate([[0], np.cumsum(valid.sum(axis=1))]).astype(np.int32))
            picked = pa.array(queries)
            return pa.table(
                {
                    "part": table.column("part").take(picked),
                    "list": pa.array(lists[queries], pa.int32()),
                    "rid": pa.array(rids[queries]),
                    "listing_id": ids.take(picked),
                    "probes": unpack_ints(table.column("probe_bytes").take(picked)),
                    "vec": table.column("vec").take(picked),
                    # The k-th best of any candidate subset is a lower bound of the final k-th.
                    "tau": pa.array(best[:, k - 1], pa.float32()),
                    "top_ids": pa.ListArray.from_arrays(offsets, ids.take(neighbour_rows[valid])),
                    "top_scores": pa.ListArray.from_arrays(
                        offsets, pa.array(best[valid], pa.float32())
                    ),
                }
            )

        held = 0
        for queries, candidates in tasks:
            index, best = best_k(
                vectors[queries],
                vectors[candidates],
                k=k,
                query_rids=rids[queries],
                candidate_rids=rids[candidates],
                device=resolved,
                candidate_order=id_order(ids, candidates),
            )
            if best.shape[1] < k:  # fewer candidates than k: pad with -inf so tasks stack
                pad = k - best.shape[1]
                best = np.pad(best, ((0, 0), (0, pad)), constant_values=-np.inf)
                index = np.pad(index, ((0, 0), (0, pad)))
            rows = candidates[index] if len(candidates) else np.zeros_like(index)
            pending.append((queries, best, rows))
            held += len(queries)
            if held >= _ROUTE_ROWS:
                yield from route(home_table())
                pending, held = [], 0
        if pending:
            yield from route(home_table())

    return run


def search_tasks(
    tasks: DataFrame, *, k: int, num_partitions: int, merge_partitions: int, device: str = "cpu"
) -> DataFrame:
    """Score task rows (``TASK_SCHEMA``): per query and task, the candidates reaching the query's
    threshold, at most ``k``, as one list (none when no candidate reaches it); PASS rows' lists
    go through as they are. Returns them packed for ``merge_lists`` with ``merge_partitions``.
    One shuffle on the task key."""
    return (
        tasks.select(*TASK_COLUMNS)
        .repartition(num_partitions, *TASK_COLUMNS[:4])
        .mapInArrow(_search_tasks(k, device, merge_partitions), PACKED_LISTS_SCHEMA)
    )


def home_tasks(
    tasks: DataFrame,
    *,
    k: int,
    num_partitions: int,
    route: Callable[[pa.Table], Iterator[pa.RecordBatch]],
    device: str = "cpu",
) -> DataFrame:
    """Score each query row of ``tasks`` (each in exactly one task) against its task's
    candidates and hand the results to ``route``, which returns the next stage's
    ``TASK_SCHEMA`` rows. ``route`` gets a table of up to ``_ROUTE_ROWS`` queries: part, list
    (the task's), rid, listing_id, probes (unpacked), vec, ``tau`` (the k-th best score, -inf
    when fewer candidates) and the best ``k`` as ``top_ids``/``top_scores``, best first."""
    return (
        tasks.select(*TASK_COLUMNS)
        .repartition(num_partitions, *TASK_COLUMNS[:4])
        .mapInArrow(_home_tasks(k, device, route), TASK_SCHEMA)
    )
