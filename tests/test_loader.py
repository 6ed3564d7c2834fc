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
from schemas.training_examples import LISTING_FEATURES_SPEC, SPEC

NUM_LISTINGS = 97
# The widths a shard manifest would give: single codes, z-scores, token slots.
NUM_CODES, NUM_DENSE, NUM_SLOTS = 4, 3, 2


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


def codes_of(i: int) -> list[int]:
    """Listing ``i``'s single codes ``(i + k) % 5``."""
    return [(i + k) % 5 for k in range(NUM_CODES)]


def tokens_of(i: int) -> list[int]:
    """Listing ``i``'s token slots: ``i % 7 + 1``, then padding on every other listing."""
    return [i % 7 + 1, 0 if i % 2 else i % 3 + 1][:NUM_SLOTS]


def dense_of(i: int) -> list[float]:
    return [float(i) * (k + 1) for k in range(NUM_DENSE)]


def write_listing_features(folder, listing_idx: np.ndarray, **columns) -> None:
    """Listing ``i`` has ``codes_of(i)``, ``dense_of(i)`` and ``tokens_of(i)``; ``columns``
    replaces whole columns (lists of per-row values)."""
    folder.mkdir(parents=True, exist_ok=True)
    idx = [int(i) for i in listing_idx]
    table = {
        "listing_idx": idx,
        "listing_id": [f"L{i}" for i in idx],
        "is_active": [True] * len(idx),
        "has_interactions": [True] * len(idx),
        "codes": [codes_of(i) for i in idx],
        "dense": [dense_of(i) for i in idx],
        "tokens": [tokens_of(i) for i in idx],
        **columns,
    }
    schema = arrow_schema(LISTING_FEATURES_SPEC.schema)
    pq.write_table(pa.table(table, schema=schema), folder / "part-00000.parquet")


def read(folder, num_listings: int, **widths) -> ListingFeatures:
    sizes = {"num_codes": NUM_CODES, "num_dense": NUM_DENSE, "num_slots": NUM_SLOTS, **widths}
    return read_listing_features(folder, num_listings, **sizes)


@pytest.fixture(scope="module")
def features(tmp_path_factory) -> ListingFeatures:
    folder = tmp_path_factory.mktemp("listing_features")
    write_listing_features(folder, np.arange(NUM_LISTINGS))
    return read(folder, NUM_LISTINGS)


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
    # The single codes, then the token slots, as the listing tower reads them.
    assert batch["codes"].shape == (120, NUM_CODES + NUM_SLOTS)
    assert batch["codes"].dtype == torch.int64
    # Row 100 is listing 3: its features come from listing 3's row of listing_features.
    assert batch["codes"][100].tolist() == codes_of(3) + tokens_of(3)
    assert batch["dense"].shape == (120, NUM_DENSE)
    assert batch["dense"][100].tolist() == dense_of(3)
    assert batch["dense"].dtype == batch["weight"].dtype == torch.float32
    assert batch["log_q"].tolist() == [-2.0] * 120


def test_listings_without_a_features_row_get_the_unknown_codes(tmp_path):
    write_listing_features(tmp_path, np.array([4, 1]))
    table = read(tmp_path, 6)
    assert table.codes.shape == (6, NUM_CODES + NUM_SLOTS)
    assert table.codes.dtype == torch.int32 and table.dense.dtype == torch.float32
    assert table.codes[4].tolist() == codes_of(4) + tokens_of(4)
    assert table.codes[1].tolist() == codes_of(1) + tokens_of(1)
    assert table.dense[4].tolist() == dense_of(4)
    assert table.codes[[0, 2, 3, 5]].eq(0).all() and table.dense[[0, 2, 3, 5]].eq(0).all()


def test_a_catalogue_without_features_reads_as_zero_width_tables(tmp_path):
    idx = np.array([2, 0])
    write_listing_features(tmp_path, idx, codes=[[], []], dense=[[], []], tokens=[[], []])
    table = read(tmp_path, 3, num_codes=0, num_dense=0, num_slots=0)
    assert table.codes.shape == (3, 0) and table.dense.shape == (3, 0)
    assert len(table) == 3


@pytest.mark.parametrize(
    ("column", "widths"),
    [
        ("codes", {"num_codes": NUM_CODES + 1}),
        ("dense", {"num_dense": NUM_DENSE - 1}),
        ("tokens", {"num_slots": 0}),
    ],
)
def test_arrays_wider_or_narrower_than_the_manifest_are_an_error(tmp_path, column, widths):
    write_listing_features(tmp_path, np.arange(5))
    with pytest.raises(ValueError, match=rf"listing_features.*'{column}'.*manifest says"):
        read(tmp_path, 5, **widths)


def test_one_row_of_another_width_is_an_error(tmp_path):
    codes = [codes_of(i) for i in range(5)]
    codes[3] = codes[3][:-1]
    write_listing_features(tmp_path, np.arange(5), codes=codes)
    with pytest.raises(
        ValueError, match=rf"column 'codes': rows of \[{NUM_CODES - 1}, {NUM_CODES}\] values"
    ):
        read(tmp_path, 5)


def test_features_outside_the_vocabulary_are_an_error(tmp_path):
    write_listing_features(tmp_path, np.array([0, 7]))
    with pytest.raises(ValueError, match=r"listing_features.*listing_idx.*outside \[0, 5\)"):
        read(tmp_path, 5)


def test_examples_of_listings_the_features_do_not_cover_are_an_error(tmp_path):
    files = write_shards(tmp_path / "train", [40])
    write_listing_features(tmp_path / "features", np.arange(10))
    small = read(tmp_path / "features", 10)
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
