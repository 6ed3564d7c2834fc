from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DataLoader

from lib.loader import (
    ListingFeatures,
    ShardDataset,
    assign_files,
    file_row_counts,
    read_listing_features,
)
from lib.schema_check import arrow_schema
from schemas.training_examples import (
    CATEGORICAL_CODES,
    DENSE_FEATURES,
    LISTING_FEATURES_SPEC,
    SPEC,
)

NUM_LISTINGS = 97


def write_shards(folder, rows_per_file: list[int]) -> list[str]:
    """Training-example files whose ``user_idx`` is a global row number (to count rows)."""
    folder.mkdir(parents=True, exist_ok=True)
    schema = arrow_schema(SPEC.schema)
    paths, start = [], 0
    for i, n in enumerate(rows_per_file):
        ids = np.arange(start, start + n, dtype=np.int32)
        columns = {
            "user_idx": ids,
            "listing_idx": ids % NUM_LISTINGS,
            "weight": np.ones(n, np.float32),
            "log_q": np.full(n, -2.0, np.float32),
        }
        path = folder / f"part-{i:05d}.parquet"
        pq.write_table(pa.table(columns, schema=schema), path, row_group_size=16)
        paths.append(str(path))
        start += n
    return paths


def write_listing_features(folder, listing_idx: np.ndarray) -> None:
    """Listing ``i`` has codes ``(i + k) % 5`` and dense values ``i * (k + 1)``."""
    folder.mkdir(parents=True, exist_ok=True)
    idx = listing_idx.astype(np.int32)
    columns = {
        "listing_idx": idx,
        "listing_id": [f"L{i}" for i in idx],
        "is_active": np.ones(len(idx), bool),
        "has_interactions": np.ones(len(idx), bool),
        **{c: (idx + k) % 5 for k, c in enumerate(CATEGORICAL_CODES)},
        **{c: idx.astype(np.float32) * (k + 1) for k, c in enumerate(DENSE_FEATURES)},
    }
    schema = arrow_schema(LISTING_FEATURES_SPEC.schema)
    pq.write_table(pa.table(columns, schema=schema), folder / "part-00000.parquet")


@pytest.fixture(scope="module")
def features(tmp_path_factory) -> ListingFeatures:
    folder = tmp_path_factory.mktemp("listing_features")
    write_listing_features(folder, np.arange(NUM_LISTINGS))
    return read_listing_features(folder, NUM_LISTINGS)


def rows_of(batches) -> list[int]:
    return [int(u) for b in batches for u in b["user_idx"]]


def epoch(files, features, *, rank=0, world_size=1, workers=0, **kw) -> list[dict]:
    ds = ShardDataset(files, features, rank=rank, world_size=world_size, num_workers=workers, **kw)
    return list(DataLoader(ds, batch_size=None, num_workers=workers))


def test_files_split_disjointly_across_rank_and_worker():
    files = [f"f{i}" for i in range(12)]
    seen = [
        f
        for rank in range(2)
        for worker in range(3)
        for f in assign_files(files, rank, 2, worker, 3)
    ]
    assert sorted(seen) == sorted(files)
    assert assign_files(files, 1, 2, 2, 3) == ["f5", "f11"]


def test_row_counts_come_from_footers(tmp_path):
    files = write_shards(tmp_path, [10, 0, 33])
    assert file_row_counts(files) == [10, 0, 33]


def test_batches_carry_every_column_with_model_dtypes(tmp_path, features):
    files = write_shards(tmp_path, [140])
    (batch, *_) = epoch(files, features, batch_size=120, shuffle_buffer=0)
    assert batch["user_idx"].tolist() == list(range(120))
    assert batch["user_idx"].dtype == torch.int64
    assert batch["listing_idx"].tolist() == [i % NUM_LISTINGS for i in range(120)]
    assert batch["codes"].shape == (120, len(CATEGORICAL_CODES))
    assert batch["codes"].dtype == torch.int64
    # Row 100 is listing 3: its features come from listing 3's row of listing_features.
    assert batch["codes"][100].tolist() == [(3 + k) % 5 for k in range(len(CATEGORICAL_CODES))]
    assert batch["dense"].shape == (120, len(DENSE_FEATURES))
    assert batch["dense"][100].tolist() == [3.0 * (k + 1) for k in range(len(DENSE_FEATURES))]
    assert batch["dense"].dtype == batch["weight"].dtype == torch.float32
    assert batch["log_q"].tolist() == [-2.0] * 120


def test_listings_without_a_features_row_get_the_unknown_codes(tmp_path):
    write_listing_features(tmp_path, np.array([4, 1]))
    table = read_listing_features(tmp_path, 6)
    assert table.codes.shape == (6, len(CATEGORICAL_CODES))
    assert table.codes[4].tolist() == [(4 + k) % 5 for k in range(len(CATEGORICAL_CODES))]
    assert table.codes[1].tolist() == [(1 + k) % 5 for k in range(len(CATEGORICAL_CODES))]
    assert table.codes[[0, 2, 3, 5]].eq(0).all() and table.dense[[0, 2, 3, 5]].eq(0).all()


def test_features_outside_the_vocabulary_are_an_error(tmp_path):
    write_listing_features(tmp_path, np.array([0, 7]))
    with pytest.raises(ValueError, match=r"listing_features.*listing_idx.*outside \[0, 5\)"):
        read_listing_features(tmp_path, 5)


def test_examples_of_listings_the_features_do_not_cover_are_an_error(tmp_path):
    files = write_shards(tmp_path / "train", [40])
    write_listing_features(tmp_path / "features", np.arange(10))
    small = read_listing_features(tmp_path / "features", 10)
    with pytest.raises(ValueError, match=r"listing_idx 39.*covers 10 listings"):
        epoch(files, small, batch_size=40, shuffle_buffer=0)


@pytest.mark.parametrize("workers", [0, 2])
def test_every_row_seen_once_per_epoch_across_ranks(tmp_path, features, workers):
    files = write_shards(tmp_path, [50] * 8)
    per_rank = [
        epoch(
            files,
            features,
            rank=r,
            world_size=2,
            workers=workers,
            batch_size=32,
            shuffle_buffer=60,
            seed=3,
        )
        for r in range(2)
    ]
    assert len(per_rank[0]) == len(per_rank[1])
    assert sorted(rows_of(per_rank[0]) + rows_of(per_rank[1])) == list(range(400))
    assert set(rows_of(per_rank[0])).isdisjoint(rows_of(per_rank[1]))


def test_ranks_with_unequal_rows_yield_equal_batch_counts(tmp_path, features):
    files = write_shards(tmp_path, [100, 37, 80, 5, 64, 64])
    lengths = []
    for r in range(3):
        ds = ShardDataset(files, features, rank=r, world_size=3, batch_size=16, shuffle_buffer=20)
        batches = list(DataLoader(ds, batch_size=None))
        assert len(batches) == len(ds)
        lengths.append(len(batches))
        # Stopping early never repeats a row.
        assert len(set(rows_of(batches))) == len(rows_of(batches))
    # Ranks hold 105, 101 and 144 rows: 7, 7 and 9 batches of 16; all stop at 7.
    assert lengths == [7, 7, 7]


def test_equal_batches_per_rank_with_workers(tmp_path, features):
    files = write_shards(tmp_path, [70, 10, 40, 40, 33, 90, 1, 64])
    counts = []
    for r in range(2):
        batches = epoch(
            files, features, rank=r, world_size=2, workers=2, batch_size=16, shuffle_buffer=10
        )
        counts.append(len(batches))
    assert counts[0] == counts[1] > 0


def test_order_is_deterministic_per_seed_and_epoch(tmp_path, features):
    files = write_shards(tmp_path, [60] * 4)
    run = lambda **kw: rows_of(epoch(files, features, batch_size=16, shuffle_buffer=50, **kw))  # noqa: E731
    first = run(seed=1, epoch=0)
    assert run(seed=1, epoch=0) == first
    assert run(seed=1, epoch=1) != first
    assert run(seed=2, epoch=0) != first
    assert sorted(first) == list(range(240))
    assert first != list(range(240))


def test_set_epoch_changes_the_shuffle(tmp_path, features):
    files = write_shards(tmp_path, [60] * 2)
    ds = ShardDataset(files, features, batch_size=16, shuffle_buffer=50, seed=1)
    first = rows_of(DataLoader(ds, batch_size=None))
    ds.set_epoch(1)
    assert rows_of(DataLoader(ds, batch_size=None)) != first
    ds.set_epoch(0)
    assert rows_of(DataLoader(ds, batch_size=None)) == first


def test_drop_last_yields_only_full_batches(tmp_path, features):
    files = write_shards(tmp_path, [50])
    sizes = [len(b["user_idx"]) for b in epoch(files, features, batch_size=16, drop_last=True)]
    assert sizes == [16, 16, 16]
    sizes = [len(b["user_idx"]) for b in epoch(files, features, batch_size=16)]
    assert sorted(sizes) == [2, 16, 16, 16]


def test_shuffle_mixes_rows_across_files(tmp_path, features):
    files = write_shards(tmp_path, [100] * 2)
    first_batch = epoch(files, features, batch_size=20, shuffle_buffer=150, seed=0)[0]
    from_file = Counter(int(u) // 100 for u in first_batch["user_idx"])
    assert len(from_file) == 2


def test_too_few_files_for_ranks_and_workers_is_an_error(tmp_path, features):
    files = write_shards(tmp_path, [10, 10, 10])
    with pytest.raises(ValueError, match="every \\(rank, worker\\) needs"):
        ShardDataset(files, features, rank=0, world_size=2, num_workers=2)


def test_worker_count_mismatch_is_an_error(tmp_path, features):
    files = write_shards(tmp_path, [10, 10])
    ds = ShardDataset(files, features, num_workers=0, batch_size=4)
    with pytest.raises(Exception, match="loader workers"):
        list(DataLoader(ds, batch_size=None, num_workers=2))


def test_bad_rank_is_an_error(tmp_path, features):
    files = write_shards(tmp_path, [10, 10])
    with pytest.raises(ValueError, match="rank"):
        ShardDataset(files, features, rank=2, world_size=2)
