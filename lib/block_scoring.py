"""Scoring one task: a block of queries against a block of candidates, plain numpy and torch.

Both search methods score the same way (``lib.task_stages`` runs this inside Spark's Python
workers): dense matrix products one score block at a time (torch, on CUDA when asked), a query's
own entry masked, and per query only what can still matter kept: the candidates reaching its
threshold, at most ``k`` (``top_candidates``), or its best ``k`` (``best_k``).

Equal scores are ranked by a tie-break key per candidate (the rank of its listing id, as every
merge ranks them), so identical vectors get the same neighbours however the catalogue is split
into tasks. The key is asked for only when a tie reaches the ``k``-th place, which real scores
rarely do, so the common path costs nothing extra.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

# Every cosine is >= -1; a threshold below that keeps every real candidate but never a masked one.
_KEEP_ALL = -2.0
# Score blocks are at most this many floats (1 MB): large enough for fast matrix products, small
# enough to stay in cache for the comparison and the ranking that read them next (4 MB blocks
# made a search partition's scoring ~1.3x and a home partition ~1.15x slower; 128 MB ~1.4x more).
_SCORE_BLOCK = 1 << 18
# A row's top k is bounded from the maxima of this many times k groups of its scores.
_BOUND_GROUPS = 2


def resolve_device(device: str) -> str:
    """``auto`` means CUDA when this process sees a GPU, else CPU."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


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


def _memoised(make: Callable[[], np.ndarray]) -> Callable[[], np.ndarray]:
    """``make`` run at most once, on the first call."""
    held: list[np.ndarray] = []

    def get() -> np.ndarray:
        if not held:
            held.append(np.asarray(make(), np.int64))
        return held[0]

    return get


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


def _ranked_in_full(scores, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(columns, scores) of each row's best ``k`` by ``torch.topk``, best first, as numpy."""
    import torch

    values, cols = torch.topk(scores, k, dim=1)
    return cols.cpu().numpy(), values.cpu().numpy()


def best_columns(block: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(columns, scores) of each row's best ``k`` of a score block (numpy, ``k`` < its width),
    both (rows, k), best first; which of equal scores at the ``k``-th place is left to the
    caller (``_top_k_of_rows``).

    ``torch.topk`` costs several times the block's matrix product on the CPU (a home task spent
    ~4x as long ranking as multiplying). So a bound goes first: the columns are cut into
    ``_BOUND_GROUPS * k`` disjoint groups, and the ``k``-th largest of the groups' maxima is ``k``
    distinct scores of the row, so at most the row's ``k``-th score. About 1.4 k scores per row
    reach it, whatever the width; only those are ranked.
    """
    rows, width = block.shape
    groups = _BOUND_GROUPS * k
    per_group = width // groups
    if per_group < 4:  # narrow: a bound would leave too many to rank
        return _ranked_in_full(_torch(block), k)
    # Group g holds columns g, g + groups, ...: a strided view, reduced by torch (~2x numpy).
    strided = block[:, : per_group * groups].reshape(rows, per_group, groups)
    maxima = _torch(strided).amax(dim=1).numpy()
    bound = np.partition(maxima, groups - k, axis=1)[:, groups - k]
    hits = np.flatnonzero(block >= bound[:, None])
    hit_rows, hit_cols = np.divmod(hits, width)
    counts = np.bincount(hit_rows, minlength=rows)
    if counts.min() < k:  # NaN scores: no bound holds
        return _ranked_in_full(_torch(block), k)
    # The hits, row by row, as a dense (rows, most hits) matrix padded with NaN, which sorts
    # after every score (-inf, a masked one, included).
    first = np.cumsum(counts) - counts
    dense = np.full((rows, int(counts.max())), np.nan, np.float32)
    dense[hit_rows, np.arange(len(hits)) - first[hit_rows]] = block.reshape(-1)[hits]
    ranked = np.argsort(-dense, axis=1)[:, :k]
    return hit_cols[first[:, None] + ranked], np.take_along_axis(dense, ranked, axis=1)


def _torch(block: np.ndarray):
    import torch

    return torch.from_numpy(block)


def _top_k_of_rows(
    scores, k: int, order: Callable[[], np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Each row's best ``k`` columns of a score block (torch, ``k`` < its width): (columns,
    scores) as numpy, both (rows, k), best first; equal scores at the boundary go to the
    smallest ``order()`` keys, entries of -inf (missing) excepted.

    The best ``k + 1`` are found first (``best_columns`` on the CPU, ``torch.topk`` on a GPU);
    only a row whose ``k``-th and ``k + 1``-th scores are equal (where either keeps an
    arbitrary one of the tied columns) is ranked again, so ``order`` runs only when there is
    such a tie.
    """
    import torch

    if scores.device.type == "cpu":
        cols, values = best_columns(scores.numpy(), k + 1)
    else:
        cols, values = _ranked_in_full(scores, k + 1)
    kth = values[:, k - 1]
    tied = np.flatnonzero((values[:, k] == kth) & np.isfinite(kth))
    cols, values = cols[:, :k], values[:, :k]
    if len(tied):
        rows = scores[torch.from_numpy(tied).to(scores.device)].cpu().numpy()
        cols[tied], values[tied] = _break_boundary_ties(rows, kth[tied], k, order())
    return cols, values


def _reaching(block: np.ndarray, taus: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row, column, score) of every score reaching its row's threshold, row by row."""
    hits = np.flatnonzero(block >= taus[:, None])
    rows, cols = np.divmod(hits, block.shape[1])
    return rows, cols, block.reshape(-1)[hits]


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
        rows, cols, values = _reaching(block, taus[start : start + len(block)])
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
