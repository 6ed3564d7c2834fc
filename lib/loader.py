"""Streams training shards (Parquet) into batches of tensors for one DDP rank.

Replaces petastorm (see ARCHITECTURE.md): each (rank, DataLoader worker) reads its own subset
of the shard files with pyarrow, passes rows through a shuffle buffer and yields ready-made
batches, so the DataLoader runs with ``batch_size=None``. Every rank yields the same number of
batches per epoch (computed from the Parquet footers), because DDP hangs when one rank runs
out of batches while the others wait for its gradients.

Training examples carry ids and weights only; each batch looks its listings' encoded features
up in ``ListingFeatures``, the ``listing_features`` table held in memory as two tensors.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from torch.utils.data import IterableDataset, get_worker_info

from schemas.training_examples import LISTING_FEATURES_SPEC

ID_COLUMNS = ("user_idx", "listing_idx")
# Listing-listing pairs: a context listing and a listing co-interacted with it.
PAIR_ID_COLUMNS = ("context_idx", "listing_idx")
FLOAT_COLUMNS = ("weight", "log_q")


@dataclass(frozen=True)
class ListingFeatures:
    """Encoded features of every listing index: ``codes`` int32 ``[n, n_codes + n_slots]``
    (the single codes, then the token slots; widened per batch, so a large catalogue's table
    stays half the size), ``dense`` float32 ``[n, n_dense]``. Indices without a features row
    keep zeros: the unknown code, no tokens and the mean of every normalised feature."""

    codes: torch.Tensor
    dense: torch.Tensor

    def __len__(self) -> int:
        return len(self.codes)


def _fixed_width(table, column: str, width: int, dtype) -> np.ndarray:
    lists = table.column(column).combine_chunks()
    lengths = lists.value_lengths().to_numpy(zero_copy_only=False)
    if len(lengths) and (lengths.min() != width or lengths.max() != width):
        raise ValueError(
            f"table '{LISTING_FEATURES_SPEC.name}', column '{column}': rows of "
            f"{sorted(set(lengths.tolist()))[:5]} values where the manifest says {width}: "
            "shards and manifest from different runs?"
        )
    values = lists.flatten().to_numpy(zero_copy_only=False).astype(dtype, copy=False)
    return values.reshape(len(lengths), width)


def read_listing_features(
    path: str | Path, num_listings: int, *, num_codes: int, num_dense: int, num_slots: int = 0
) -> ListingFeatures:
    """Load a ``listing_features`` directory (or file) into a table indexed by ``listing_idx``.

    The widths come from the shard manifest (``cardinalities``, ``dense_features``,
    ``token_fields``) and every row must have them.
    """
    table = pq.read_table(path, columns=["listing_idx", "codes", "dense", "tokens"])
    idx = table.column("listing_idx").to_numpy()
    outside = idx[(idx < 0) | (idx >= num_listings)]
    if len(outside):
        raise ValueError(
            f"table '{LISTING_FEATURES_SPEC.name}', column 'listing_idx': {len(outside)} values "
            f"outside [0, {num_listings}), e.g. {outside[:3].tolist()}"
        )
    codes = np.zeros((num_listings, num_codes + num_slots), np.int32)
    dense = np.zeros((num_listings, num_dense), np.float32)
    codes[idx, :num_codes] = _fixed_width(table, "codes", num_codes, np.int32)
    codes[idx, num_codes:] = _fixed_width(table, "tokens", num_slots, np.int32)
    dense[idx] = _fixed_width(table, "dense", num_dense, np.float32)
    return ListingFeatures(torch.from_numpy(codes), torch.from_numpy(dense))


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

    Yields dicts ``user_idx, listing_idx`` (int64 ``[B]``), ``codes`` (int64 ``[B, n_codes]``)
    and ``dense`` (float32 ``[B, n_dense]``) looked up in ``listing_features``, ``weight,
    log_q`` (float32 ``[B]``). Use with
    ``DataLoader(dataset, batch_size=None, num_workers=num_workers)``; ``num_workers`` must be the
    DataLoader's, since it decides which files each worker reads.

    Order is a pure function of ``(seed, epoch, rank, worker)``. Each worker index stops at the
    smallest batch count that worker index has on any rank, so all ranks yield ``len(self)``
    batches; rows beyond that (only when ranks got unequal row counts) are skipped this epoch.
    """

    def __init__(
        self,
        files: Sequence[str],
        listing_features: ListingFeatures,
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
        pairs: bool = False,
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
        self.layout = (PairLayout if pairs else RowLayout)(listing_features)
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
        return (self.layout.unpack(b) for b in islice(batches, self.worker_batches[worker_id]))

    def _read(self, files: Sequence[str]) -> Iterator[np.ndarray]:
        # Large reads keep the shuffle buffer's permutations cheap per row emitted.
        read_rows = max(self.batch_size, self.shuffle_buffer // 2, 4096)
        for path in files:
            parquet = pq.ParquetFile(path)
            for rb in parquet.iter_batches(batch_size=read_rows, columns=list(self.layout.columns)):
                yield self.layout.pack(rb)

    def _batches(self, files: Sequence[str], rng: np.random.Generator) -> Iterator[np.ndarray]:
        size, keep = self.batch_size, self.shuffle_buffer
        buffer: np.ndarray | None = None
        for chunk in self._read(files):
            buffer = chunk if buffer is None else np.concatenate([buffer, chunk])
            n = len(buffer)
            if n < keep + size:
                continue
            if keep:
                buffer = np.take(buffer, rng.permutation(n), axis=0)
            emit = (n - keep) // size * size
            for start in range(0, emit, size):
                yield buffer[start : start + size]
            buffer = buffer[emit:]
        if buffer is None:
            return
        n = len(buffer)
        if keep:
            buffer = np.take(buffer, rng.permutation(n), axis=0)
        for start in range(0, n, size):
            if start + size <= n or not self.drop_last:
                yield buffer[start : min(start + size, n)]


class RowLayout:
    """Training rows packed as one int32 matrix, floats stored bit-for-bit.

    The shuffle buffer moves whole rows; one row-gather of a packed ``[n, width]`` matrix is
    several times cheaper than gathering every column array separately.
    """

    columns = (*ID_COLUMNS, *FLOAT_COLUMNS)

    def __init__(self, listing_features: ListingFeatures):
        self.listing_features = listing_features

    def pack(self, rb) -> np.ndarray:
        """A record batch -> ``int32[rows, 4]`` in ``self.columns`` order."""
        out = np.empty((rb.num_rows, len(self.columns)), np.int32)
        floats = out.view(np.float32)
        for j, name in enumerate(self.columns):
            target = out if j < len(ID_COLUMNS) else floats
            target[:, j] = rb.column(name).to_numpy(zero_copy_only=False)
        return out

    def unpack(self, block: np.ndarray) -> dict[str, torch.Tensor]:
        """Packed rows -> the batch dict the model reads, features looked up per listing."""
        t = torch.from_numpy(np.ascontiguousarray(block))
        listing = t[:, 1].long()
        if len(listing) and int(listing.max()) >= len(self.listing_features):
            raise ValueError(
                f"training example with listing_idx {int(listing.max())}, but listing_features "
                f"covers {len(self.listing_features)} listings: shards from different runs?"
            )
        floats = t[:, 2:].view(torch.float32)
        return {
            "user_idx": t[:, 0].long(),
            "listing_idx": listing,
            "codes": self.listing_features.codes[listing].long(),
            "dense": self.listing_features.dense[listing],
            "weight": floats[:, 0].contiguous(),
            "log_q": floats[:, 1].contiguous(),
        }


class PairLayout(RowLayout):
    """``RowLayout`` of listing-listing pairs: both sides' features are looked up, the context
    listing's under ``context_*`` keys."""

    columns = (*PAIR_ID_COLUMNS, *FLOAT_COLUMNS)

    def unpack(self, block: np.ndarray) -> dict[str, torch.Tensor]:
        t = torch.from_numpy(np.ascontiguousarray(block))
        context, listing = t[:, 0].long(), t[:, 1].long()
        top = int(torch.cat([context, listing]).max()) if len(listing) else -1
        if top >= len(self.listing_features):
            raise ValueError(
                f"training pair with listing_idx {top}, but listing_features covers "
                f"{len(self.listing_features)} listings: shards from different runs?"
            )
        floats = t[:, 2:].view(torch.float32)
        return {
            "context_idx": context,
            "context_codes": self.listing_features.codes[context].long(),
            "context_dense": self.listing_features.dense[context],
            "listing_idx": listing,
            "codes": self.listing_features.codes[listing].long(),
            "dense": self.listing_features.dense[listing],
            "weight": floats[:, 0].contiguous(),
            "log_q": floats[:, 1].contiguous(),
        }
