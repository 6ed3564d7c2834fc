"""Streams training shards (Parquet) into batches of tensors for one DDP rank.

Replaces petastorm (see ARCHITECTURE.md): each (rank, DataLoader worker) reads its own subset
of the shard files with pyarrow, passes rows through a shuffle buffer and yields ready-made
batches, so the DataLoader runs with ``batch_size=None``. Every rank yields the same number of
batches per epoch (computed from the Parquet footers), because DDP hangs when one rank runs
out of batches while the others wait for its gradients.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from itertools import islice

import numpy as np
import pyarrow.parquet as pq
import torch
from torch.utils.data import IterableDataset, get_worker_info

from schemas.training_examples import CATEGORICAL_CODES, DENSE_FEATURES

ID_COLUMNS = ("user_idx", "listing_idx")
FLOAT_COLUMNS = ("weight", "log_q")

Columns = dict[str, np.ndarray]


def file_row_counts(files: Sequence[str]) -> list[int]:
    """Row count of every Parquet file, from its footer (no data pages are read)."""
    return [pq.ParquetFile(f).metadata.num_rows for f in files]


def assign_files(
    files: Sequence[str], rank: int, world_size: int, worker_id: int, num_workers: int
) -> list[str]:
    """The files one (rank, worker) reads: disjoint slices that together cover ``files``."""
    return list(files[rank * num_workers + worker_id :: world_size * num_workers])


def _num_batches(rows: int, batch_size: int, drop_last: bool) -> int:
    return rows // batch_size if drop_last else -(-rows // batch_size)


class ShardDataset(IterableDataset):
    """Shuffled, pre-batched rows of the shard files that belong to one rank.

    Yields dicts ``user_idx, listing_idx`` (int64 ``[B]``), ``codes`` (int64 ``[B, n_codes]``),
    ``dense`` (float32 ``[B, n_dense]``), ``weight, log_q`` (float32 ``[B]``). Use with
    ``DataLoader(dataset, batch_size=None, num_workers=num_workers)``; ``num_workers`` must be the
    DataLoader's, since it decides which files each worker reads.

    Order is a pure function of ``(seed, epoch, rank, worker)``. Each worker index stops at the
    smallest batch count that worker index has on any rank, so all ranks yield ``len(self)``
    batches; rows beyond that (only when ranks got unequal row counts) are skipped this epoch.
    """

    def __init__(
        self,
        files: Sequence[str],
        *,
        rank: int = 0,
        world_size: int = 1,
        batch_size: int = 1024,
        shuffle_buffer: int = 50_000,
        seed: int = 0,
        epoch: int = 0,
        num_workers: int = 0,
        drop_last: bool = False,
        row_counts: Sequence[int] | None = None,
        code_columns: Sequence[str] = CATEGORICAL_CODES,
        dense_columns: Sequence[str] = DENSE_FEATURES,
    ):
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.files = [str(f) for f in files]
        self.rank, self.world_size = rank, world_size
        self.batch_size, self.shuffle_buffer = batch_size, max(0, shuffle_buffer)
        self.seed, self.epoch = seed, epoch
        self.workers = max(1, num_workers)
        self.drop_last = drop_last
        self.code_columns, self.dense_columns = tuple(code_columns), tuple(dense_columns)
        slots = world_size * self.workers
        if len(self.files) < slots:
            raise ValueError(
                f"{len(self.files)} shard files for {world_size} ranks x {self.workers} loader "
                f"workers: every (rank, worker) needs at least one file"
            )
        counts = list(row_counts) if row_counts is not None else file_row_counts(self.files)
        if len(counts) != len(self.files):
            raise ValueError(f"{len(counts)} row counts for {len(self.files)} files")
        rows = [
            [sum(counts[r * self.workers + w :: slots]) for w in range(self.workers)]
            for r in range(world_size)
        ]
        self.worker_batches = [
            min(_num_batches(rows[r][w], batch_size, drop_last) for r in range(world_size))
            for w in range(self.workers)
        ]
        self.rank_rows = [sum(r) for r in rows]

    def __len__(self) -> int:
        """Batches this rank yields per epoch (the same on every rank)."""
        return sum(self.worker_batches)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's shuffle; call before creating the DataLoader iterator."""
        self.epoch = epoch

    def files_for(self, worker_id: int) -> list[str]:
        return assign_files(self.files, self.rank, self.world_size, worker_id, self.workers)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker_id, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        if num_workers != self.workers:
            raise ValueError(
                f"ShardDataset was built for {self.workers} loader workers but runs in "
                f"{num_workers}; pass the DataLoader's num_workers to the dataset"
            )
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker_id])
        files = self.files_for(worker_id)
        if self.shuffle_buffer:
            files = [files[i] for i in rng.permutation(len(files))]
        batches = self._batches(files, rng)
        return (_to_tensors(b) for b in islice(batches, self.worker_batches[worker_id]))

    def _read(self, files: Sequence[str]) -> Iterator[Columns]:
        # Large reads keep the shuffle buffer's permutations cheap per row emitted.
        read_rows = max(self.batch_size, self.shuffle_buffer // 2, 4096)
        columns = [*ID_COLUMNS, *FLOAT_COLUMNS, *self.code_columns, *self.dense_columns]
        for path in files:
            for rb in pq.ParquetFile(path).iter_batches(batch_size=read_rows, columns=columns):
                yield _columns(rb, self.code_columns, self.dense_columns)

    def _batches(self, files: Sequence[str], rng: np.random.Generator) -> Iterator[Columns]:
        size, keep = self.batch_size, self.shuffle_buffer
        buffer: Columns | None = None
        for chunk in self._read(files):
            buffer = chunk if buffer is None else _concat(buffer, chunk)
            n = _len(buffer)
            if n < keep + size:
                continue
            if keep:
                buffer = _take(buffer, rng.permutation(n))
            emit = (n - keep) // size * size
            for start in range(0, emit, size):
                yield _slice(buffer, start, start + size)
            buffer = _slice(buffer, emit, n)
        if buffer is None:
            return
        n = _len(buffer)
        if keep:
            buffer = _take(buffer, rng.permutation(n))
        for start in range(0, n, size):
            if start + size <= n or not self.drop_last:
                yield _slice(buffer, start, min(start + size, n))


def _columns(rb, code_columns: Sequence[str], dense_columns: Sequence[str]) -> Columns:
    def col(name: str) -> np.ndarray:
        return rb.column(name).to_numpy(zero_copy_only=False, writable=True)

    out = {name: col(name) for name in (*ID_COLUMNS, *FLOAT_COLUMNS)}
    n = rb.num_rows
    out["codes"] = (
        np.stack([col(c) for c in code_columns], axis=1)
        if code_columns
        else np.zeros((n, 0), np.int32)
    )
    out["dense"] = (
        np.stack([col(c) for c in dense_columns], axis=1).astype(np.float32, copy=False)
        if dense_columns
        else np.zeros((n, 0), np.float32)
    )
    return out


def _len(cols: Columns) -> int:
    return len(cols["user_idx"])


def _concat(a: Columns, b: Columns) -> Columns:
    return {k: np.concatenate([a[k], b[k]]) for k in a}


def _take(cols: Columns, idx: np.ndarray) -> Columns:
    return {k: v[idx] for k, v in cols.items()}


def _slice(cols: Columns, start: int, stop: int) -> Columns:
    return {k: v[start:stop] for k, v in cols.items()}


def _to_tensors(cols: Columns) -> dict[str, torch.Tensor]:
    return {
        "user_idx": torch.from_numpy(cols["user_idx"].astype(np.int64)),
        "listing_idx": torch.from_numpy(cols["listing_idx"].astype(np.int64)),
        "codes": torch.from_numpy(cols["codes"].astype(np.int64)),
        "dense": torch.from_numpy(np.ascontiguousarray(cols["dense"], dtype=np.float32)),
        "weight": torch.from_numpy(np.ascontiguousarray(cols["weight"], dtype=np.float32)),
        "log_q": torch.from_numpy(np.ascontiguousarray(cols["log_q"], dtype=np.float32)),
    }
