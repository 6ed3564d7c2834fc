"""Top-k cosine neighbours inside Spark: the blockwise scoring both search methods share.

A *task* is a set of query vectors and a set of candidate vectors, identified by the key
(``part``, ``list``, ``qchunk``, ``cslice``). Task rows (``TASK_SCHEMA``: one per query,
candidate, or listing that is both) are shuffled once so that each task lands whole in one Spark
partition; a Python worker then scores each of its tasks with dense matrix products (torch, on
CUDA when asked) and keeps per query only what can still matter: its best ``k`` (``home_tasks``)
or the candidates reaching its threshold ``tau``, at most ``k`` (``search_tasks``). The merges
keep the best ``k`` per query across tasks. Memory per worker is one partition's task rows plus
one score block; nothing proportional to the catalogue reaches the driver.

Vectors travel as packed float32 bytes (``pack_matrix``): Spark moves and Arrow-converts one
byte string per row instead of ``d`` array elements, which is most of the cost of a shuffle here.

``exact_top_k`` is blockwise brute force built on that: listings are hashed into blocks and every
(candidate block, query block) pair is one task. ``lib.ann`` builds the IVF search on the same
tasks.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from schemas import listing_neighbours

# No partition key: every listing is in the same (empty-named) part.
NO_PART = ""
# Task row roles. A listing that is both query and candidate of a task travels once. PASS rows
# carry candidate lists (``LISTS_ARROW_SCHEMA``, packed) through a search stage to the merge.
CANDIDATE, QUERY, BOTH, PASS = 0, 1, 2, 3
# Every cosine is >= -1; a threshold below that keeps every real candidate but never a masked one.
_KEEP_ALL = -2.0
# Score blocks are at most this many floats (1 MB): large enough for fast matrix products, small
# enough to stay in cache for the comparison and the ranking that read them next (4 MB blocks
# made a search partition's scoring ~1.3x and a home partition ~1.15x slower; 128 MB ~1.4x more).
_SCORE_BLOCK = 1 << 18
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
EMITTED_SCHEMA = "listing_id string, neighbour_id string, score float"
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
# A listing's top k as one row, best first (rank = position + 1): the search result's shape, a
# twentieth of the rows that one row per neighbour takes (``ranked_rows``).
RANKED_LISTS_SCHEMA = "listing_id string, neighbour_ids array<string>, scores array<float>"
PACKED_SCHEMA = "part string, rid long, listing_id string, vec binary"


def default_num_blocks(num_listings: int, block_size: int = 4_000) -> int:
    """Blocks of a few thousand vectors: a block pair's score matrix stays ~64 MB."""
    return max(1, -(-num_listings // block_size))


def partitions_for(rows: int, parallelism: int) -> int:
    """Spark partitions for a stage whose Python workers hold a whole partition: about
    ``ROWS_PER_PARTITION`` rows each, in whole waves of ``parallelism`` tasks (5 home tasks on
    2 cores left one core idle for a whole task)."""
    waves = max(1, -(-rows // (ROWS_PER_PARTITION * parallelism)))
    return waves * parallelism


# --------------------------------------------------------------------------------------------
# Vectors
# --------------------------------------------------------------------------------------------


def resolve_device(device: str) -> str:
    """``auto`` means CUDA when this process sees a GPU, else CPU."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), as float32."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms == 0, 1.0, norms)


def vector_matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Vectors as an (n, d) float32 matrix, from a list<float> column or a binary column of
    packed float32 (``pack_matrix``), without per-row Python objects."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if len(array) == 0:
        return np.empty((0, 0), np.float32)
    if array.null_count:
        raise ValueError("embeddings must not be null")
    if pa.types.is_binary(array.type):
        offsets = np.frombuffer(array.buffers()[1], np.int32)
        offsets = offsets[array.offset : array.offset + len(array) + 1]
        lengths = np.diff(offsets)
        if lengths.min() != lengths.max() or lengths[0] % 4:
            raise ValueError("packed vectors must all have the same length")
        data = np.frombuffer(array.buffers()[2], np.uint8)[offsets[0] : offsets[-1]]
        return data.view(np.float32).reshape(len(array), int(lengths[0]) // 4)
    lengths = pc.list_value_length(array)
    low, high = pc.min_max(lengths).values()
    if low.as_py() != high.as_py():
        raise ValueError("embeddings must all have the same length")
    flat = array.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return flat.reshape(len(array), int(high.as_py()))


def pack_ints(values: np.ndarray, offsets: np.ndarray) -> pa.BinaryArray:
    """Variable-length int32 lists (flat values + row offsets) as a binary column."""
    values = np.ascontiguousarray(values, dtype=np.int32)
    return pa.Array.from_buffers(
        pa.binary(),
        len(offsets) - 1,
        [None, pa.py_buffer(np.asarray(offsets, np.int32) * 4), pa.py_buffer(values.tobytes())],
    )


def unpack_ints(column: pa.ChunkedArray | pa.Array) -> pa.ListArray:
    """The inverse of ``pack_ints``: a list<int32> column."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    offsets = np.frombuffer(array.buffers()[1], np.int32)[
        array.offset : array.offset + len(array) + 1
    ]
    data = np.frombuffer(array.buffers()[2], np.uint8)[offsets[0] : offsets[-1]].view(np.int32)
    return pa.ListArray.from_arrays(pa.array((offsets - offsets[0]) // 4), pa.array(data))


def pack_tables(tables: Iterable[pa.Table]) -> pa.BinaryArray:
    """Each table as one Arrow IPC stream, one binary value per table: many rows cross a shuffle
    as one value, which Spark moves for the cost of a copy instead of per-row
    (de)serialisation. The streams are written once, straight into the array's buffer."""
    tables = list(tables)
    # Sized up front: a growing stream re-copies its buffer, which cost more than the writing.
    # A stream adds its schema, the batch metadata and padding: ~1.2 kB for task rows.
    capacity = sum(table.nbytes for table in tables) + 8192 * len(tables) + 65536
    if capacity >= 1 << 31:
        raise ValueError("packed tables exceed 2 GiB in one batch; pack fewer rows at a time")
    buffer = pa.allocate_buffer(capacity)
    sink = pa.FixedSizeBufferWriter(buffer)
    offsets = [0]
    for table in tables:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        offsets.append(sink.tell())
    return pa.Array.from_buffers(
        pa.binary(),
        len(tables),
        [None, pa.py_buffer(np.asarray(offsets, np.int32)), buffer.slice(0, offsets[-1])],
    )


def unpack_tables(packed: pa.Array | pa.ChunkedArray) -> list[pa.Table]:
    """The inverse of ``pack_tables`` (without copying the payloads)."""
    chunks = packed.chunks if isinstance(packed, pa.ChunkedArray) else [packed]
    return [pa.ipc.open_stream(value.as_buffer()).read_all() for chunk in chunks for value in chunk]


def empty_binary(n: int) -> pa.BinaryArray:
    """``n`` empty binary values (no per-value Python objects)."""
    return pack_ints(np.empty(0, np.int32), np.zeros(n + 1, np.int32))


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


def pack_matrix(vectors: np.ndarray) -> pa.BinaryArray:
    """An (n, d) matrix as a binary column of packed float32 rows (read back with
    ``vector_matrix``)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, d = vectors.shape
    offsets = np.arange(0, (n + 1) * d * 4, d * 4, dtype=np.int32)
    return pa.Array.from_buffers(
        pa.binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(vectors.tobytes())]
    )


# --------------------------------------------------------------------------------------------
# Scoring one task (plain numpy/torch; runs inside Python workers)
# --------------------------------------------------------------------------------------------


def positions_in_runs(keys: np.ndarray) -> np.ndarray:
    """Each element's position (from 0) within its run of equal values; ``keys`` sorted."""
    position = np.arange(len(keys))
    starts = np.ones(len(keys), bool)
    starts[1:] = keys[1:] != keys[:-1]
    return position - np.maximum.accumulate(np.where(starts, position, 0))


def _self_positions(query_rids: np.ndarray, candidate_rids: np.ndarray):
    """(query index, candidate index) pairs where a query meets itself among the candidates,
    query indices ascending."""
    if len(candidate_rids) == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    order = np.argsort(candidate_rids, kind="stable")
    ordered = candidate_rids[order]
    pos = np.minimum(np.searchsorted(ordered, query_rids), len(ordered) - 1)
    rows = np.flatnonzero(ordered[pos] == query_rids)
    return rows, order[pos[rows]]


def _score_blocks(queries, candidates, query_rids, candidate_rids, device):
    """Yield (first query index, score block) with each query's own entry set to -inf."""
    import torch

    # A (d, n) contiguous right-hand side: torch's CPU matmul is ~1.7x faster than with c.T.
    c_t = torch.from_numpy(np.ascontiguousarray(candidates.T)).to(device)
    step = max(1, _SCORE_BLOCK // max(1, len(candidates)))
    self_rows, self_cols = _self_positions(query_rids, candidate_rids)
    for start in range(0, len(queries), step):
        q = torch.from_numpy(np.ascontiguousarray(queries[start : start + step])).to(device)
        scores = torch.mm(q, c_t)
        first, last = np.searchsorted(self_rows, [start, start + step])
        if last > first:
            rows = torch.from_numpy(self_rows[first:last] - start).to(device)
            scores[rows, torch.from_numpy(self_cols[first:last]).to(device)] = float("-inf")
        yield start, scores


def _column_order(width: int) -> Callable[[], np.ndarray]:
    """The default tie-break: candidates in the order they are given."""
    return lambda: np.arange(width)


def _break_boundary_ties(
    rows: np.ndarray, kth: np.ndarray, k: int, keys: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The best ``k`` columns of each row of ``rows`` whose ``k``-th best score ``kth`` is tied
    with a score it leaves out: every column scoring above ``kth``, then the columns scoring
    exactly ``kth`` with the smallest ``keys``. Returns (columns, scores), both (rows, k), by
    score descending and key ascending."""
    above = rows > kth[:, None]
    tied_rows, tied_cols = np.nonzero(rows == kth[:, None])
    # Each row's equal columns by key; a row takes as many as it has room left for.
    order = np.lexsort((keys[tied_cols], tied_rows))
    tied_rows, tied_cols = tied_rows[order], tied_cols[order]
    room = k - above.sum(axis=1)
    taken = positions_in_runs(tied_rows) < room[tied_rows]
    above_rows, above_cols = np.nonzero(above)
    picked_rows = np.concatenate([above_rows, tied_rows[taken]])
    picked_cols = np.concatenate([above_cols, tied_cols[taken]])
    scores = rows[picked_rows, picked_cols]
    order = np.lexsort((keys[picked_cols], -scores, picked_rows))
    return picked_cols[order].reshape(len(rows), k), scores[order].reshape(len(rows), k)


def _top_k_of_rows(
    scores, k: int, order: Callable[[], np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Each row's best ``k`` columns of a score block (torch, ``k`` < its width): (columns,
    scores) as numpy, both (rows, k), best first; equal scores at the boundary go to the
    smallest ``order()`` keys, entries of -inf (missing) excepted.

    ``torch.topk`` of ``k + 1`` finds them; only a row whose ``k``-th and ``k + 1``-th scores are
    equal (where ``topk`` keeps an arbitrary one of the tied columns) is ranked again, so
    ``order`` runs only when there is such a tie.
    """
    import torch

    values, cols = torch.topk(scores, k + 1, dim=1)
    values, cols = values.cpu().numpy(), cols.cpu().numpy()
    kth = values[:, k - 1]
    tied = np.flatnonzero((values[:, k] == kth) & np.isfinite(kth))
    values, cols = values[:, :k], cols[:, :k]
    if len(tied):
        rows = scores[torch.from_numpy(tied).to(scores.device)].cpu().numpy()
        cols[tied], values[tied] = _break_boundary_ties(rows, kth[tied], k, order())
    return cols, values


def top_candidates(
    queries: np.ndarray,
    candidates: np.ndarray,
    *,
    k: int,
    thresholds: np.ndarray,
    query_rids: np.ndarray,
    candidate_rids: np.ndarray,
    device: str = "cpu",
    candidate_order: Callable[[], np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each query, the candidates scoring at least its threshold (NaN or -inf: none), at most
    ``k`` (its best), never itself. Rows must be unit length. Returns (query index, candidate
    index, score).

    Equal scores are ranked by ``candidate_order()``, each candidate's tie-break key (ascending;
    default: the candidates' order), so a query with more than ``k`` candidates tied at its
    ``k``-th score keeps the same ones whatever else a task holds. It is called only when such
    a tie exists (the callers' keys rank listing ids, which costs a sort).

    Most (query, foreign list) pairs have few or no candidates above the query's threshold, so
    the threshold comparison runs on every score and a ranking only where a query has more than
    ``k``. The comparison and the positions run in numpy: torch's CPU comparison and
    ``nonzero`` took ~3x as long, more than the matrix product.
    """
    import torch

    out_q, out_c, out_s = [np.empty(0, np.int64)], [np.empty(0, np.int64)], []
    if len(queries) == 0 or len(candidates) == 0:
        return out_q[0], out_c[0], np.empty(0, np.float32)
    width = len(candidates)
    order = _memoised(candidate_order or _column_order(width))
    taus = np.nan_to_num(np.asarray(thresholds, np.float32), nan=_KEEP_ALL, neginf=_KEEP_ALL)
    taus = np.maximum(taus, _KEEP_ALL)
    for start, scores in _score_blocks(queries, candidates, query_rids, candidate_rids, device):
        block = scores.cpu().numpy()
        hits = np.flatnonzero(block >= taus[start : start + len(block), None])
        rows, cols = np.divmod(hits, width)
        values = block[rows, cols]
        counts = np.bincount(rows, minlength=len(block))
        # Past an eighth of its candidates a query's top k is cheaper to rank in full.
        full = (counts > k) & (counts * 8 > width)
        if full.any():
            full_rows = np.flatnonzero(full)
            top_cols, top_values = _top_k_of_rows(torch.from_numpy(block[full_rows]), k, order)
            out_q.append(np.repeat(full_rows, k) + start)
            out_c.append(top_cols.reshape(-1))
            out_s.append(top_values.reshape(-1))
            rest = ~full[rows]
            rows, cols, values = rows[rest], cols[rest], values[rest]
        crowded = counts[rows] > k
        if crowded.any():
            # The best k of each query's (few) hits: by query, then score descending, then key.
            many = np.flatnonzero(crowded)
            ranked = many[np.lexsort((-values[many], rows[many]))]
            position = positions_in_runs(rows[ranked])
            # A tie at the boundary: a query's k-th and (k+1)-th hits score the same.
            last, after = ranked[:-1], ranked[1:]
            boundary = (position[:-1] == k - 1) & (values[last] == values[after])
            if boundary.any():
                keys = order()[cols[many]]
                ranked = many[np.lexsort((keys, -values[many], rows[many]))]
                position = positions_in_runs(rows[ranked])
            keep = np.concatenate([np.flatnonzero(~crowded), ranked[position < k]])
            rows, cols, values = rows[keep], cols[keep], values[keep]
        out_q.append(rows + start)
        out_c.append(cols)
        out_s.append(values)
    return (
        np.concatenate(out_q).astype(np.int64),
        np.concatenate(out_c).astype(np.int64),
        np.concatenate(out_s).astype(np.float32),
    )


def best_k(
    queries: np.ndarray,
    candidates: np.ndarray,
    *,
    k: int,
    query_rids: np.ndarray,
    candidate_rids: np.ndarray,
    device: str = "cpu",
    candidate_order: Callable[[], np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Each query's best ``k`` candidates (itself excluded), best first: (indices, scores), both
    (queries, min(k, candidates)); missing entries have score -inf. Equal scores at the
    boundary go to the smallest ``candidate_order()`` keys, as in ``top_candidates``."""
    import torch

    width = min(k, len(candidates))
    index = np.zeros((len(queries), width), np.int64)
    best = np.full((len(queries), width), -np.inf, np.float32)
    if width == 0 or len(queries) == 0:
        return index, best
    order = _memoised(candidate_order or _column_order(len(candidates)))
    for start, scores in _score_blocks(queries, candidates, query_rids, candidate_rids, device):
        if width < len(candidates):
            cols, values = _top_k_of_rows(scores, width, order)
        else:  # every candidate is kept: nothing is left out, so no tie to break
            values, cols = (t.cpu().numpy() for t in torch.topk(scores, width, dim=1))
        index[start : start + len(scores)] = cols
        best[start : start + len(scores)] = values
    return index, best


def _memoised(make: Callable[[], np.ndarray]) -> Callable[[], np.ndarray]:
    """``make`` run at most once, on the first call."""
    held: list[np.ndarray] = []

    def get() -> np.ndarray:
        if not held:
            held.append(np.asarray(make(), np.int64))
        return held[0]

    return get


# --------------------------------------------------------------------------------------------
# Scoring a partition's tasks (mapInArrow functions)
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Merging per-task results
# --------------------------------------------------------------------------------------------


def _rank_lists(table: pa.Table, k: int) -> pa.Table:
    """``LISTS_ARROW_SCHEMA`` rows -> one ``RANKED_LISTS_SCHEMA`` row per listing: its best k,
    ties broken by neighbour_id, self-pairs dropped."""
    encoded = pc.dictionary_encode(table["listing_id"].combine_chunks())
    top_ids = table["top_ids"].combine_chunks()
    lengths = pc.list_value_length(top_ids).to_numpy(zero_copy_only=False)
    # Listings as integer codes: the sort compares strings only between equal scores.
    codes = pa.array(np.repeat(encoded.indices.to_numpy(zero_copy_only=False), lengths))
    flat = pa.table(
        {
            "code": codes,
            "score": pc.list_flatten(table["top_scores"].combine_chunks()),
            "neighbour_id": pc.list_flatten(top_ids),
        }
    )
    flat = flat.filter(pc.not_equal(encoded.dictionary.take(codes), flat["neighbour_id"]))
    flat = flat.sort_by(
        [("code", "ascending"), ("score", "descending"), ("neighbour_id", "ascending")]
    )
    code = flat["code"].to_numpy()
    rank = positions_in_runs(code) + 1
    starts = rank == 1
    keep = rank <= k
    # A listing's first row (rank 1) is always kept, so its list starts there among kept rows.
    offsets = pa.array(np.append(np.flatnonzero(starts[keep]), keep.sum()).astype(np.int32))
    kept = pa.array(keep)
    return pa.table(
        {
            "listing_id": encoded.dictionary.take(pa.array(code[starts])),
            "neighbour_ids": pa.ListArray.from_arrays(
                offsets, flat["neighbour_id"].filter(kept).combine_chunks()
            ),
            "scores": pa.ListArray.from_arrays(
                offsets, flat["score"].filter(kept).combine_chunks()
            ),
        }
    )


def _merge_partition(k: int) -> Callable[[Iterator[pa.RecordBatch]], Iterator]:
    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        lists = [table for batch in batches for table in unpack_tables(batch.column("payload"))]
        if lists:
            yield from _rank_lists(pa.concat_tables(lists), k).to_batches()

    return run


def merge_lists(packed: DataFrame, *, k: int, num_partitions: int) -> DataFrame:
    """The best ``k`` per listing of its candidate lists (``search_tasks`` output, packed for
    ``num_partitions``; any number of lists per listing), best first (ties by neighbour_id),
    as ``RANKED_LISTS_SCHEMA``. Pairs must not repeat. One shuffle of the packed values; the
    ranking runs in Arrow inside the partitions."""
    return packed.repartition(num_partitions, "bucket").mapInArrow(
        _merge_partition(k), RANKED_LISTS_SCHEMA
    )


def ranked_rows(lists: DataFrame) -> DataFrame:
    """``RANKED_LISTS_SCHEMA`` rows as one row per (listing, neighbour): listing_id,
    neighbour_id, rank (from 1), score."""
    return lists.select(
        "listing_id", "scores", F.posexplode("neighbour_ids").alias("pos", "neighbour_id")
    ).select(
        "listing_id",
        "neighbour_id",
        (F.col("pos") + 1).cast("int").alias("rank"),
        F.col("scores")[F.col("pos")].cast("float").alias("score"),
    )


def merge_top_k(candidates: DataFrame, *, k: int, dedupe: bool = True) -> DataFrame:
    """Keep the best ``k`` (listing_id, neighbour_id, score) rows per listing, ranked from 1.

    ``dedupe=False`` skips a shuffle when each pair can appear only once.
    """
    order = Window.partitionBy("listing_id").orderBy(F.desc("score"), F.asc("neighbour_id"))
    rows = candidates.where(F.col("listing_id") != F.col("neighbour_id"))
    if dedupe:
        rows = rows.dropDuplicates(["listing_id", "neighbour_id"])
    return (
        rows.withColumn("rank", F.row_number().over(order))
        .where(F.col("rank") <= k)
        .select("listing_id", "neighbour_id", F.col("rank").cast("int"), "score")
    )


# --------------------------------------------------------------------------------------------
# Rows, exact search, the published shape
# --------------------------------------------------------------------------------------------


def part_column(partition_col: str | None) -> Column:
    """The partition key as the ``part`` string column (nulls form their own part)."""
    if partition_col is None:
        return F.lit(NO_PART).alias("part")
    return F.coalesce(F.col(partition_col).cast("string"), F.lit(NO_PART)).alias("part")


def base_rows(embeddings: DataFrame, partition_col: str | None = None) -> DataFrame:
    """(part, rid, listing_id, vec array<float>) from (listing_id, embedding[, partition_col])."""
    return embeddings.select(
        part_column(partition_col),
        F.xxhash64("listing_id").alias("rid"),
        "listing_id",
        F.col("embedding").cast("array<float>").alias("vec"),
    )


def _pack(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    for batch in batches:
        if batch.num_rows:
            vectors = pack_matrix(unit_rows(vector_matrix(batch.column("vec"))))
            yield batch.set_column(batch.schema.get_field_index("vec"), "vec", vectors)


def packed_rows(embeddings: DataFrame, partition_col: str | None = None) -> DataFrame:
    """``base_rows`` with unit vectors packed as binary (``pack_matrix``)."""
    return base_rows(embeddings, partition_col).mapInArrow(_pack, PACKED_SCHEMA)


def task_rows(
    rows: DataFrame, *, role: int | Column, list_: Column, qchunk: Column, cslice: Column
) -> DataFrame:
    """Rows with (part, rid, listing_id, vec[, tau, probe_bytes]) shaped as ``TASK_SCHEMA``
    rows."""
    # Candidates never need a query's threshold or probes.
    names = set(rows.columns) if isinstance(role, Column) or role != CANDIDATE else set()
    role_col = role if isinstance(role, Column) else F.lit(role)
    return rows.select(
        "part",
        list_.cast("int").alias("list"),
        qchunk.cast("int").alias("qchunk"),
        cslice.cast("int").alias("cslice"),
        role_col.cast("tinyint").alias("role"),
        "rid",
        "listing_id",
        "vec",
        (F.col("tau") if "tau" in names else F.lit(None)).cast("float").alias("tau"),
        (F.col("probe_bytes") if "probe_bytes" in names else F.lit(None))
        .cast("binary")
        .alias("probe_bytes"),
        F.lit(bytearray()).alias("payload"),
    )


def exact_top_k(
    embeddings: DataFrame,
    *,
    k: int,
    num_blocks: int,
    partition_col: str | None = None,
    device: str = "cpu",
) -> DataFrame:
    """Exact top-``k`` cosine neighbours of every row of ``embeddings`` (listing_id, embedding),
    within the same ``partition_col`` value when given.

    Returns ``RANKED_LISTS_SCHEMA`` rows (``ranked_rows`` gives one row per neighbour); ties
    broken by neighbour_id so reruns give identical tables.
    """
    base = packed_rows(embeddings, partition_col).withColumn(
        "block", F.pmod(F.col("rid"), F.lit(num_blocks))
    )
    every_block = base.withColumn("target", F.explode(F.sequence(F.lit(0), F.lit(num_blocks - 1))))
    # Task (candidate block c, query block q): a listing is a query of (target, own block) and a
    # candidate of (own block, target); on the diagonal it is both.
    diagonal = F.col("target") == F.col("block")
    queries = task_rows(
        every_block.where(~diagonal),
        role=QUERY,
        list_=F.col("target"),
        qchunk=F.col("block"),
        cslice=F.lit(0),
    )
    candidates = task_rows(
        every_block,
        role=F.when(diagonal, BOTH).otherwise(CANDIDATE),
        list_=F.col("block"),
        qchunk=F.col("target"),
        cslice=F.lit(0),
    )
    # One block pair per partition spreads the scoring over every core; past a few thousand
    # pairs, pairs share partitions. The merge holds about as many list elements per partition.
    partitions = min(num_blocks * num_blocks, 8192)
    found = search_tasks(
        queries.unionByName(candidates),
        k=k,
        num_partitions=partitions,
        merge_partitions=partitions,
        device=device,
    )
    return merge_lists(found, k=k, num_partitions=partitions)


def to_neighbours_table(top_k: DataFrame, *, model_version: str, run_date: dt.date) -> DataFrame:
    """Shape ranked neighbour lists (``RANKED_LISTS_SCHEMA``) into the published
    ``listing_neighbours`` contract, one row per neighbour."""
    return (
        ranked_rows(top_k)
        .select(
            F.lit(model_version).alias("model_version"),
            "listing_id",
            "neighbour_id",
            "rank",
            F.col("score").cast("float").alias("score"),
            F.lit(run_date).alias("run_date"),
        )
        .select(*listing_neighbours.SCHEMA.fieldNames())
    )
