"""The IVF index: centroids trained on a bounded sample, and every listing's lists.

``train_centroids`` is spherical k-means on the driver over at most ``MAX_SAMPLE`` vectors
(``collect_sample``), whatever the catalogue size; the centroids are broadcast and
``assign_lists`` gives every listing, in the executors, its home list (nearest centroid) and its
``nprobe`` nearest lists, home first. With a partition key only the lists holding that key's
listings count (``allowed_lists``). ``lib.ivf_plan`` turns the assignment into tasks.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
from pyspark import Broadcast
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from lib import packing
from lib.block_scoring import best_columns
from lib.packing import unit_rows, vector_matrix

# k-means sample bound: training cost stays flat as the catalogue grows.
MAX_SAMPLE = 262_144
MAX_NLIST = 8_192


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
    lists, nearest first, packed by ``packing.pack_ints``)."""

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
            if take < len(c):
                probes, values = best_columns(scores.numpy(), take)
            else:
                values, probes = (t.numpy() for t in torch.topk(scores, take, dim=1))
            valid = np.isfinite(values)
            valid[:, 0] = True  # the home list: its own part always has it
            lengths = valid.sum(axis=1)
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
            flat = probes[valid].astype(np.int32)
            yield pa.RecordBatch.from_arrays(
                [
                    batch.column("part"),
                    batch.column("rid"),
                    batch.column("listing_id"),
                    pa.array(probes[:, 0].astype(np.int32)),
                    packing.pack_ints(flat, offsets),
                    packing.pack_matrix(vectors),
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
    come back unit length and packed (``packing.pack_matrix``). ``allowed`` maps a part to
    the lists it may probe (boolean mask)."""
    return base.mapInArrow(_assign(centroids, nprobe, allowed), _ASSIGNED_SCHEMA)


def allowed_lists(base: DataFrame, centroids: Broadcast, nlist: int) -> dict[str, np.ndarray]:
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
