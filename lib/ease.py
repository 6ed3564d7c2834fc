"""EASE, the "embarrassingly shallow autoencoder" (Steck 2019), as an item-item baseline.

EASE learns an item-item weight matrix ``B`` that reconstructs each user's interaction row from
the user's other items: minimise ``|X - X B|² + λ|B|²`` subject to ``diag(B) = 0``, where ``X``
is the binary user × listing matrix. The solution is closed form: with the Gram matrix
``G = XᵀX`` (co-counts; the diagonal holds each listing's degree) and ``P = (G + λI)⁻¹``,

    B_ij = -P_ij / P_jj  (i ≠ j),  B_ii = 0.

A user who has only listing ``i`` gets the scores of row ``i`` of ``B``, so row ``i`` is used as
``i``'s neighbour scores: ``score(i, j) = B_ij``. Unlike co-occurrence cosine, each weight is a
regression coefficient fitted against all other listings at once, so co-occurrence that other
listings already explain counts less; scores can be negative.

Why on the driver: ``P`` is the inverse of a dense m × m matrix (m = listings with
interactions), which Spark has no distributed form of, and for a small catalogue
(``max_items`` = 10,000: an 800 MB float64 matrix, an inversion or eigendecomposition of
seconds to minutes) one machine does it faster than any shuffle. Spark only builds the sparse
co-counts (``gram_entries``), whose rows are bounded by m²; larger catalogues are skipped with a
reason instead of run, since the cost grows as m² memory and m³ time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import pyarrow as pa
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql.types import FloatType, IntegerType, StringType, StructField, StructType

from lib.block_scoring import positions_in_runs
from lib.schema_check import arrow_schema

# Same contract as ``lib.baselines.RANKED_SCHEMA``; repeated here rather than imported so that
# ``lib.baselines`` can import this module without a cycle (a test checks they agree).
RANKED_SCHEMA = StructType(
    [
        StructField("listing_id", StringType(), nullable=False),
        StructField("neighbour_id", StringType(), nullable=False),
        StructField("rank", IntegerType(), nullable=False),
        StructField("score", FloatType(), nullable=False),
    ]
)

# Query rows scored at a time in ``ease_neighbours``: a block of B rows is 8 bytes × n each, so
# 1,024 rows of a 10,000-listing catalogue are 80 MB instead of 800 MB for all of them.
_QUERY_BLOCK = 1024


def _validated_lambdas(lam: float | Sequence[float]) -> list[float]:
    lams = [lam] if isinstance(lam, int | float | np.floating | np.integer) else list(lam)
    if not lams:
        raise ValueError("EASE needs at least one regularisation λ")
    out = []
    for value in lams:
        value = float(value)
        # λ > 0 is what makes G + λI invertible: G is only positive semi-definite.
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"EASE regularisation λ must be finite and > 0, got {value}")
        out.append(value)
    return list(dict.fromkeys(out))


def _capped(examples: DataFrame, max_items_per_user: int) -> DataFrame:
    """(user_idx, listing_idx): each user's ``max_items_per_user`` strongest listings."""
    if max_items_per_user < 1:
        raise ValueError(f"max_items_per_user must be >= 1, got {max_items_per_user}")
    strongest = Window.partitionBy("user_idx").orderBy(F.desc("weight"), F.asc("listing_idx"))
    return (
        examples.select("user_idx", "listing_idx", "weight")
        .withColumn("_n", F.row_number().over(strongest))
        .where(F.col("_n") <= max_items_per_user)
        .select("user_idx", "listing_idx")
    )


def gram_entries(examples: DataFrame, *, max_items_per_user: int = 200) -> DataFrame:
    """The nonzero entries of ``G = XᵀX`` as rows (a int, b int, count long). Lazy.

    ``examples`` has one row per (user_idx, listing_idx) with a ``weight``; ``X`` is their
    binary matrix. Every ordered pair of listings a user interacted with is one co-count, a == b
    included (the listing's degree). Each user contributes only their ``max_items_per_user``
    highest-weight listings (ties: smaller listing_idx), so one heavy user adds at most
    ``max_items_per_user``² pairs to the self-join.
    """
    kept = _capped(examples, max_items_per_user)
    left = kept.select("user_idx", F.col("listing_idx").cast("int").alias("a"))
    right = kept.select("user_idx", F.col("listing_idx").cast("int").alias("b"))
    return (
        left.join(right, "user_idx")
        .groupBy("a", "b")
        .agg(F.count(F.lit(1)).cast("long").alias("count"))
    )


def dense_gram(a, b, count, n: int) -> np.ndarray:
    """The n × n float64 matrix with ``count`` at (a, b); repeated pairs add up.

    ``a``, ``b``, ``count`` are equally long array-likes (numpy, pandas or Arrow) of dense
    indices 0..n-1 and co-counts, e.g. ``gram_entries`` rows after re-indexing.
    """
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    count = np.asarray(count, dtype=np.float64)
    if not (len(a) == len(b) == len(count)):
        raise ValueError("a, b and count must have the same length")
    if len(a) and (min(a.min(), b.min()) < 0 or max(a.max(), b.max()) >= n):
        raise ValueError(f"gram entry indices must lie in 0..{n - 1}")
    # bincount over flat positions: one pass, no Python loop, and duplicates sum as in XᵀX.
    flat = np.bincount(a * n + b, weights=count, minlength=n * n)
    return flat.reshape(n, n)


def _row_makers(
    gram: np.ndarray, lams: list[float]
) -> dict[float, Callable[[np.ndarray], np.ndarray]]:
    """For each λ, a function from query indices to those rows of B (self scores -inf).

    The expensive factorisation runs here, once; the functions only do matrix products, so
    callers can score queries in blocks.
    """
    n = gram.shape[0]

    def finish(p_rows: np.ndarray, p_diag: np.ndarray, queries: np.ndarray) -> np.ndarray:
        rows = -p_rows / p_diag[None, :]
        rows[np.arange(len(queries)), queries] = -np.inf
        return rows

    if len(lams) == 1:
        lam = lams[0]
        p = np.linalg.inv(gram + lam * np.eye(n))
        p_diag = np.diag(p).copy()
        return {lam: lambda q: finish(p[q], p_diag, q)}

    # One eigendecomposition serves every λ: P(λ) = V diag(1/(Λ+λ)) Vᵀ, so each extra λ costs
    # matrix products instead of another O(n³) inversion. eigh itself took ~3x one inversion
    # (n = 2,000-3,000, 2 cores), so this pays from about three λ on.
    eigvals, vectors = np.linalg.eigh(gram)
    # G is PSD; rounding can leave eigenvalues of about -1e-13·|G|, which would only add error.
    eigvals = np.maximum(eigvals, 0.0)
    squared = vectors**2
    makers = {}
    for lam in lams:
        inv = 1.0 / (eigvals + lam)
        p_diag = squared @ inv

        def make(q, inv=inv, p_diag=p_diag):
            return finish((vectors[q] * inv[None, :]) @ vectors.T, p_diag, q)

        makers[lam] = make
    return makers


def _validated_gram(gram: np.ndarray) -> np.ndarray:
    gram = np.asarray(gram, dtype=np.float64)
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"the gram matrix must be square, got shape {gram.shape}")
    return gram


def _validated_queries(queries: np.ndarray, n: int) -> np.ndarray:
    queries = np.asarray(queries, dtype=np.int64).reshape(-1)
    if len(queries) and (queries.min() < 0 or queries.max() >= n):
        raise ValueError(f"query indices must lie in 0..{n - 1}")
    return queries


def ease_scores(
    gram: np.ndarray, lam: float | Sequence[float], queries: np.ndarray
) -> dict[float, np.ndarray]:
    """Rows ``queries`` of EASE's B for each λ: {float(λ): float64 array [len(queries), n]}.

    ``B_ij = -P_ij / P_jj`` with ``P = (gram + λI)⁻¹``; a query's own column is -inf (a listing
    is never its own neighbour). One λ is a direct inversion; several share one
    eigendecomposition of ``gram``. λ must be > 0 (ValueError otherwise).
    """
    lams = _validated_lambdas(lam)
    gram = _validated_gram(gram)
    queries = _validated_queries(queries, gram.shape[0])
    return {value: make(queries) for value, make in _row_makers(gram, lams).items()}


def top_k_rows(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``k`` best columns, best first: (idx int64 [q, k], score float32 [q, k]).

    Ties go to the smaller column index. -inf and NaN entries are never returned; a row with
    fewer than ``k`` others is padded with idx -1 and score NaN (the result is never ragged).
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2:
        raise ValueError(f"scores must be 2-d, got shape {scores.shape}")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    q, n = scores.shape
    idx = np.full((q, k), -1, np.int64)
    best = np.full((q, k), np.nan, np.float32)
    if q == 0 or n == 0 or k == 0:
        return idx, best
    clean = np.where(np.isnan(scores), -np.inf, scores)
    keep = np.isfinite(clean)
    if k < n:
        # Everything at least as good as the k-th best: the top k plus any ties at the border,
        # so only those few are sorted instead of whole rows.
        kth = np.partition(clean, n - k, axis=1)[:, n - k]
        keep &= clean >= kth[:, None]
    rows, cols = np.nonzero(keep)
    values = clean[rows, cols]
    order = np.lexsort((cols, -values, rows))
    rows, cols, values = rows[order], cols[order], values[order]
    pos = positions_in_runs(rows)
    first = pos < k
    idx[rows[first], pos[first]] = cols[first]
    best[rows[first], pos[first]] = values[first]
    return idx, best


def _ranked_table(
    query_ids: np.ndarray, neighbour_ids: np.ndarray, idx: np.ndarray, scores: np.ndarray
) -> pa.Table:
    found = idx >= 0
    rows, pos = np.nonzero(found)
    return pa.table(
        {
            "listing_id": pa.array(query_ids[rows], pa.string()),
            "neighbour_id": pa.array(neighbour_ids[idx[rows, pos]], pa.string()),
            "rank": pa.array(pos + 1, pa.int32()),
            "score": pa.array(scores[rows, pos], pa.float32()),
        },
        schema=arrow_schema(RANKED_SCHEMA),
    )


def ease_neighbours(
    spark: SparkSession,
    examples: DataFrame,
    listing_features: DataFrame,
    *,
    queries: DataFrame,
    k: int,
    lambdas: Sequence[float],
    max_items: int = 10_000,
    max_items_per_user: int = 200,
) -> dict[float, DataFrame] | str:
    """EASE top-k lists for the ``queries`` (column listing_id), one DataFrame per λ.

    IO: runs Spark jobs and collects to the driver. The model is fit over the active listings
    with interactions (inactive listings' examples are dropped first, as in the co-occurrence
    baseline), so every neighbour is active; only queries among those listings get rows.
    Returns {float(λ): DataFrame in ``RANKED_SCHEMA``} (listing_id, neighbour_id, rank 1..k,
    score = B_ij; fewer than k rows where a listing has fewer others), or, when more than
    ``max_items`` listings have interactions, a string saying why EASE was skipped: the gram
    matrix is collected to the driver (at most ``max_items``² rows of ``gram_entries``) and
    inverted densely there, which is only sensible for small catalogues.
    """
    lams = _validated_lambdas(lambdas)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    active = listing_features.where(F.col("is_active")).select("listing_idx", "listing_id")
    kept = examples.join(active.select("listing_idx"), "listing_idx").select(
        "user_idx", "listing_idx", "weight"
    )
    # Listings that survive the per-user cap: exactly the ones with a row and column in G.
    items = (
        _capped(kept, max_items_per_user)
        .select("listing_idx")
        .distinct()
        .join(active, "listing_idx")
    )
    m = items.count()
    if m > max_items:
        return (
            f"EASE skipped: {m} listings with interactions > max_items={max_items} "
            f"(an {m}×{m} matrix on the driver)"
        )
    mapping = items.toArrow().sort_by("listing_idx")
    item_idx = mapping.column("listing_idx").to_numpy()
    item_ids = np.asarray(mapping.column("listing_id").to_pylist(), dtype=object)

    wanted = (
        queries.select("listing_id")
        .distinct()
        .join(items.select("listing_id"), "listing_id", "left_semi")
        .toArrow()
    )
    position = {lid: i for i, lid in enumerate(item_ids)}
    query_pos = np.sort(
        np.asarray([position[lid] for lid in wanted.column("listing_id").to_pylist()], np.int64)
    )

    entries = gram_entries(kept, max_items_per_user=max_items_per_user).toArrow()
    gram = dense_gram(
        np.searchsorted(item_idx, entries.column("a").to_numpy()),
        np.searchsorted(item_idx, entries.column("b").to_numpy()),
        entries.column("count").to_numpy(),
        m,
    )
    empty = _ranked_table(
        np.empty(0, object), item_ids, np.empty((0, k), np.int64), np.empty((0, k), np.float32)
    )
    # Nothing to score (no query has interactions): skip the O(m³) factorisation.
    makers = _row_makers(gram, lams) if len(query_pos) else dict.fromkeys(lams)
    out = {}
    for lam, make in makers.items():
        tables = [empty]
        for start in range(0, len(query_pos), _QUERY_BLOCK):
            block = query_pos[start : start + _QUERY_BLOCK]
            idx, best = top_k_rows(make(block), k)
            tables.append(_ranked_table(item_ids[block], item_ids, idx, best))
        out[lam] = from_driver(spark, pa.concat_tables(tables), RANKED_SCHEMA)
    return out


def from_driver(
    spark: SparkSession, table: pa.Table, schema: StructType, max_bytes: int = 512 << 10
) -> DataFrame:
    """A driver-side Arrow table as a DataFrame whose tasks each read a slice of about
    ``max_bytes`` from one broadcast of it.

    ``createDataFrame`` would serialise the rows into the tasks themselves, half the table per
    task on two cores, and Spark warns about every task over 1 MB (EASE's lists for a few
    thousand queries are several MB).
    """
    slices = max(1, math.ceil(table.nbytes / max_bytes))
    rows = max(1, math.ceil(table.num_rows / slices))
    shipped = spark.sparkContext.broadcast(table)

    def emit(batches):
        for batch in batches:
            for index in batch.column("id").to_pylist():
                yield from shipped.value.slice(index * rows, rows).to_batches()

    partitions = min(slices, spark.sparkContext.defaultParallelism)
    return spark.range(0, slices, numPartitions=partitions).mapInArrow(emit, schema)
