import json
import socket
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lib import sparse_optim, train_driver, training
from lib.checkpoints import checkpoint_path, latest_checkpoint, load_artifact, load_checkpoint
from lib.schema_check import arrow_schema
from lib.train_driver import run_distributed, run_with_restarts
from lib.training import TrainParams, read_manifest, train_worker
from schemas.training_examples import LISTING_FEATURES_SPEC, SPEC

# A catalogue's encoded features as the shard stage declares them in the manifest: single codes
# in the tower's order (``make`` first: it carries the learnable group), z-scores, token fields.
CODE_NAMES = ("make", "body_type", "price_eur_bucket", "geo_cell")
DENSE_NAMES = ("price_eur_norm", "latitude_norm", "longitude_norm")
TOKEN_FIELDS = (("amenities", 9, 3),)


def fabricate_shards(
    root: Path,
    *,
    num_users: int = 60,
    num_listings: int = 80,
    rows: int = 1200,
    files: int = 4,
    groups: int = 4,
    seed: int = 0,
    features: bool = True,
) -> Path:
    """A shards directory as the shard stage writes it, with learnable structure.

    Listing ``l`` belongs to group ``l % groups`` (its ``make`` code, the first of ``codes``, is
    the group + 1); each user interacts mostly (90%) with listings of one favourite group, so a
    model that learns users' groups beats chance by a wide margin. The last 5 listings never
    appear in training (cold). Without ``features`` the catalogue has none (a click log): empty
    ``codes``, ``dense`` and ``tokens`` arrays and a manifest that declares nothing.
    """
    rng = np.random.default_rng(seed)
    code_names = CODE_NAMES if features else ()
    dense_names = DENSE_NAMES if features else ()
    token_fields = TOKEN_FIELDS if features else ()
    cards = {c: 6 + i for i, c in enumerate(code_names)}
    if features:
        cards["make"] = groups + 1
    listing_group = np.arange(num_listings) % groups
    listing_codes = np.zeros((num_listings, len(code_names)), np.int32)
    for k, c in enumerate(code_names):
        listing_codes[:, k] = rng.integers(1, cards[c], num_listings)
    if features:
        listing_codes[:, 0] = listing_group + 1
    listing_dense = rng.normal(size=(num_listings, len(dense_names))).astype(np.float32)
    if features:
        listing_dense[:, 0] += listing_group
    # Up to ``slots`` distinct tokens per field, the rest padding (0).
    listing_tokens = np.zeros((num_listings, sum(s for _, _, s in token_fields)), np.int32)
    start = 0
    for _, size, slots in token_fields:
        for i in range(num_listings):
            present = rng.choice(np.arange(1, size), rng.integers(0, slots + 1), replace=False)
            listing_tokens[i, start : start + len(present)] = present
        start += slots

    warm = num_listings - 5
    users = rng.integers(0, num_users, rows)
    favourite = users % groups
    group = np.where(rng.random(rows) < 0.9, favourite, rng.integers(0, groups, rows))
    # A random warm listing of the chosen group.
    slot = rng.integers(0, (warm - 1 - group) // groups + 1)
    listings = group + groups * slot
    counts = np.bincount(listings, minlength=num_listings)
    log_q = np.log(counts[listings] / rows).astype(np.float32)

    (root / "train").mkdir(parents=True)
    (root / "listing_features").mkdir()
    train = pa.table(
        {
            "user_idx": users.astype(np.int32),
            "listing_idx": listings.astype(np.int32),
            "weight": rng.exponential(2.0, rows).astype(np.float32),
            "log_q": log_q,
        },
        schema=arrow_schema(SPEC.schema),
    )
    names = []
    for i, part in enumerate(np.array_split(np.arange(rows), files)):
        name = f"train/part-{i:05d}.parquet"
        pq.write_table(train.take(part), root / name)
        names.append(name)
    all_listings = np.arange(num_listings)
    features = pa.table(
        {
            "listing_idx": all_listings.astype(np.int32),
            "listing_id": [f"L{i}" for i in all_listings],
            "is_active": np.ones(num_listings, bool),
            "has_interactions": counts > 0,
            "codes": list(listing_codes),
            "dense": list(listing_dense),
            "tokens": list(listing_tokens),
        },
        schema=arrow_schema(LISTING_FEATURES_SPEC.schema),
    )
    pq.write_table(features, root / "listing_features" / "part-00000.parquet")
    manifest = {
        "schema_version": SPEC.version,
        "num_users": num_users,
        "num_listings": num_listings,
        "listing_features_version": LISTING_FEATURES_SPEC.version,
        "feature_spec": {"features": [{"column": "make", "kind": "categorical"}]},
        # Pairs in the tower's order, as the shard stage writes them.
        "cardinalities": [[c, cards[c]] for c in code_names],
        "dense_features": list(dense_names),
        "token_fields": [list(t) for t in token_fields],
        "train_files": names,
        "counts": {"training_examples": rows, "listings": num_listings},
        "encodings": {
            "version": 2,
            "codes": [{"name": "make", "kind": "categorical", "vocabulary": ["audi", "bmw"]}],
            "dense": [],
            "tokens": [],
        },
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return fabricate_shards(tmp_path_factory.mktemp("shards"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def single_rank(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")


def params(shards: Path, out: Path, **kw) -> TrainParams:
    base = dict(
        shards_dir=str(shards),
        out_dir=str(out),
        epochs=2,
        batch_size=64,
        dim=8,
        id_dim=8,
        feature_dim=4,
        hidden=16,
        shuffle_buffer=200,
        log_every=5,
        threads=1,
        lr=0.01,
        sparse_lr=0.05,
        temperature=0.1,
        min_steps=0,
    )
    return TrainParams(**{**base, **kw})


def state_of(out: Path) -> dict[str, torch.Tensor]:
    model, _ = load_artifact(str(out / "model.pt"))
    return model.state_dict()


def test_train_worker_learns_and_writes_a_loadable_artifact(shards, tmp_path, single_rank, capsys):
    out = tmp_path / "run"
    metrics = train_worker(params(shards, out, epochs=4))

    losses = metrics["loss_per_epoch"]
    assert len(losses) == 4
    assert all(np.isfinite(losses))
    assert losses[-1] < losses[0] * 0.85
    assert metrics["examples_per_s"] > 0
    assert metrics["epochs"][0]["examples"] == 1200
    assert metrics["parameter_counts"]["sparse"] == 60 * 8 + 81 * 8
    assert metrics["world_size"] == 1
    assert "epoch 1 step 5 loss" in capsys.readouterr().out

    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        f"epoch-00{i}.pt" for i in range(1, 5)
    ]
    raw = torch.load(out / "model.pt", weights_only=True)
    assert raw["encodings"] == read_manifest(str(shards))["encodings"]
    assert raw["vocab_sizes"]["num_listings"] == 80
    assert raw["metrics"] == metrics

    model, meta = load_artifact(str(out / "model.pt"))
    assert meta["config"]["dim"] == 8
    assert meta["categorical_codes"] == list(CODE_NAMES)
    assert meta["dense_features"] == list(DENSE_NAMES)
    assert model.config.token_fields == TOKEN_FIELDS
    assert model.config.cardinalities[0] == ("make", 5)
    assert "state_dict" not in meta
    for name, tensor in raw["state_dict"].items():
        torch.testing.assert_close(model.state_dict()[name], tensor, rtol=0, atol=0)
    assert not model.training


def test_trained_users_prefer_their_groups_listings(shards, tmp_path, single_rank):
    out = tmp_path / "run"
    train_worker(params(shards, out, epochs=5))
    model, _ = load_artifact(str(out / "model.pt"))
    table = pq.read_table(shards / "listing_features").to_pandas()
    codes = torch.tensor(
        np.hstack([np.stack(table["codes"]), np.stack(table["tokens"])]), dtype=torch.long
    )
    dense = torch.tensor(np.stack(table["dense"]), dtype=torch.float32)
    with torch.no_grad():
        listings = model.listing_vectors(
            torch.tensor(table["listing_idx"].to_numpy(), dtype=torch.long),
            codes,
            dense,
            torch.tensor(table["has_interactions"].to_numpy()),
        )
        users = model.user_vectors(torch.arange(60))
    top = (users @ listings.T).argmax(dim=1)
    make = codes[:, CODE_NAMES.index("make")].numpy()
    hits = (make[top.numpy()] - 1 == np.arange(60) % 4).mean()
    assert hits > 0.6  # chance is 0.25


def test_resumed_run_ends_with_the_same_weights(shards, tmp_path, single_rank, monkeypatch):
    straight = tmp_path / "straight"
    train_worker(params(shards, straight))

    resumed = tmp_path / "resumed"
    real_save = training.save_atomic

    def save_then_die(obj, path):
        real_save(obj, path)
        if path.name == "epoch-001.pt":
            raise KeyboardInterrupt("killed after the first checkpoint")

    monkeypatch.setattr(training, "save_atomic", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_worker(params(shards, resumed))
    assert latest_checkpoint(str(resumed)).name == "epoch-001.pt"
    assert not (resumed / "model.pt").exists()
    monkeypatch.setattr(training, "save_atomic", real_save)

    metrics = train_worker(params(shards, resumed))
    assert metrics["resumed_from_epoch"] == 1
    assert len(metrics["loss_per_epoch"]) == 2
    a, b = state_of(straight), state_of(resumed)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


def test_checkpoints_load_with_weights_only(shards, tmp_path, single_rank):
    out = tmp_path / "run"
    train_worker(params(shards, out, epochs=1))
    state = torch.load(out / "checkpoints" / "epoch-001.pt", weights_only=True)
    assert state["epoch"] == 1
    assert set(state) >= {"model", "sparse_optimizer", "dense_optimizer", "config", "rng", "step"}
    assert not list((out / "checkpoints").glob(".*tmp*"))


def test_finished_run_resumes_to_nothing_and_rewrites_artifact(shards, tmp_path, single_rank):
    out = tmp_path / "run"
    first = train_worker(params(shards, out, epochs=1))
    again = train_worker(params(shards, out, epochs=1))
    assert again["resumed_from_epoch"] == 1
    assert again["loss_per_epoch"] == first["loss_per_epoch"]


def test_resume_with_a_different_model_shape_is_refused(shards, tmp_path, single_rank):
    out = tmp_path / "run"
    train_worker(params(shards, out, epochs=1))
    with pytest.raises(ValueError, match="use a fresh out_dir"):
        train_worker(params(shards, out, epochs=2, dim=16))


def test_bad_manifest_is_refused(shards, tmp_path, single_rank):
    bad = tmp_path / "bad"
    bad.mkdir()
    manifest = json.loads((shards / "manifest.json").read_text())
    # A manifest that declares one code fewer than the listing_features rows hold.
    (bad / "listing_features").symlink_to(shards / "listing_features")
    (bad / "train").symlink_to(shards / "train")
    fewer = [pair for pair in manifest["cardinalities"] if pair[0] != "geo_cell"]
    (bad / "manifest.json").write_text(json.dumps({**manifest, "cardinalities": fewer}))
    with pytest.raises(
        ValueError, match=r"'codes': rows of \[4\] values where the manifest says 3"
    ):
        train_worker(params(bad, tmp_path / "out"))
    (bad / "manifest.json").write_text(json.dumps({**manifest, "schema_version": SPEC.version + 1}))
    with pytest.raises(ValueError, match="schema_version"):
        read_manifest(str(bad))
    with pytest.raises(FileNotFoundError):
        read_manifest(str(tmp_path / "nowhere"))


@pytest.mark.parametrize("version", [None, 1, LISTING_FEATURES_SPEC.version + 1])
def test_manifest_of_another_listing_features_version_is_refused(shards, tmp_path, version):
    manifest = json.loads((shards / "manifest.json").read_text())
    if version is None:
        # Shards from before the feature spec: named code columns, no version.
        del manifest["listing_features_version"]
        manifest["cardinalities"] = {"make_code": 5, "geo_cell": 7}
    else:
        manifest["listing_features_version"] = version
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=rf"listing features version {version}.*rebuild"):
        read_manifest(str(tmp_path))


def test_a_catalogue_without_features_trains_and_embeds_from_ids(tmp_path, single_rank):
    shards = fabricate_shards(tmp_path / "shards", features=False)
    manifest = read_manifest(str(shards))
    assert manifest["cardinalities"] == manifest["dense_features"] == []
    out = tmp_path / "run"
    metrics = train_worker(params(shards, out, epochs=2))
    assert all(np.isfinite(metrics["loss_per_epoch"]))
    assert metrics["loss_per_epoch"][-1] < metrics["loss_per_epoch"][0]

    model, meta = load_artifact(str(out / "model.pt"))
    assert meta["categorical_codes"] == meta["dense_features"] == []
    assert model.config.token_fields == ()
    table = pq.read_table(shards / "listing_features").to_pandas()
    known = torch.tensor(table["has_interactions"].to_numpy())
    n = len(table)
    with torch.no_grad():
        vectors = model.listing_vectors(
            torch.tensor(table["listing_idx"].to_numpy(), dtype=torch.long),
            torch.zeros(n, 0, dtype=torch.long),
            torch.zeros(n, 0),
            known,
        )
    cold = vectors[~known]
    assert len(cold) == 5
    # Without features nothing tells cold listings apart: one vector for all of them.
    torch.testing.assert_close(cold, cold[:1].expand(len(cold), -1))
    assert len(torch.unique(vectors[known], dim=0)) == int(known.sum())


@pytest.mark.slow
def test_run_distributed_two_processes(spark, shards, tmp_path):
    out = tmp_path / "ddp"
    metrics = run_with_restarts(params(shards, out, epochs=2), 2, local_mode=True)
    assert metrics["world_size"] == 2
    assert len(metrics["loss_per_epoch"]) == 2
    # Each rank reads half the files; together they cover every row once.
    assert metrics["epochs"][0]["examples"] == 1200
    model, meta = load_artifact(str(out / "model.pt"))
    assert meta["metrics"] == metrics
    assert model.config.to_dict() == meta["config"]
    assert (out / "checkpoints" / "epoch-002.pt").exists()


def test_dead_rank_restarts_while_checkpoints_advance_then_gives_up(tmp_path, monkeypatch):
    calls = []

    def flaky(p, num_processes, local_mode=True, use_gpu=False):
        calls.append(num_processes)
        if len(calls) in (1, 3):  # a rank dies after writing a new checkpoint
            checkpoint_path(p.out_dir, len(calls)).parent.mkdir(parents=True, exist_ok=True)
            checkpoint_path(p.out_dir, len(calls)).write_bytes(b"x")
            raise RuntimeError("TorchDistributor failed during training.")
        if len(calls) == 5:
            return {"done": True}
        raise RuntimeError("TorchDistributor failed during training.")

    monkeypatch.setattr(train_driver, "run_distributed", flaky)
    p = TrainParams(shards_dir="unused", out_dir=str(tmp_path))
    # Failures 1 and 3 wrote new checkpoints; so at most 2 failures in a row lack progress.
    assert run_with_restarts(p, 2, max_restarts=2) == {"done": True}
    assert calls == [2] * 5

    calls.clear()
    monkeypatch.setattr(
        train_driver, "run_distributed", lambda *a, **k: calls.append(1) or flaky_fail()
    )
    with pytest.raises(RuntimeError, match="rank died"):
        run_with_restarts(p, 2, max_restarts=2)
    assert len(calls) == 3  # the first try and two restarts without progress


def flaky_fail():
    raise RuntimeError("rank died")


def test_gpu_in_local_mode_needs_gpus_declared_to_the_driver(spark, shards, tmp_path):
    # The test session declares no GPU resources, as a driver without GPUs would.
    with pytest.raises(ValueError, match=r"spark\.driver\.resource\.gpu\.amount"):
        run_distributed(params(shards, tmp_path / "gpu"), num_processes=1, use_gpu=True)
    assert not (tmp_path / "gpu").exists()


def test_job_parses_flags_and_needs_a_session():
    from jobs.train_embeddings import parse_args, run

    args = parse_args(["--shards", "s", "--out", "o"])
    assert (args.num_processes, args.local_mode, args.use_gpu, args.epochs) == (2, True, False, 5)
    args = parse_args(
        ["--shards", "s", "--out", "o", "--no-local-mode", "--use-gpu", "--batch-size", "256"]
    )
    assert (args.local_mode, args.use_gpu, args.batch_size) == (False, True, 256)
    with pytest.raises(SystemExit):
        parse_args(["--out", "o"])
    with pytest.raises(ValueError, match="SparkSession"):
        run(None, args)


def test_train_worker_runs_as_one_rank_without_launcher_env(shards, tmp_path, monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    metrics = train_worker(params(shards, tmp_path / "run", epochs=1))
    assert metrics["world_size"] == 1
    assert (tmp_path / "run" / "model.pt").exists()


def test_training_stops_once_validation_stalls_and_keeps_the_best_epoch(
    shards, tmp_path, single_rank, monkeypatch
):
    # Validated after every epoch: epochs 3 to 5 score no better than epoch 2, so epoch 6 (which
    # would have scored best) never runs.
    scores = iter([0.2, 0.5, 0.4, 0.5, 0.3, 0.9])
    monkeypatch.setattr(training, "read_validation_set", lambda *a, **k: ["a pair"])
    monkeypatch.setattr(training, "validation_hit_rate", lambda *a, **k: next(scores))
    out = tmp_path / "run"
    metrics = train_worker(params(shards, out, epochs=6, patience=3))

    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2, 3, 4, 5]
    assert metrics["stopped_early"] is True
    assert metrics["best_epoch"] == 2
    assert metrics["validation_hit_rate_at_10"] == 0.5
    best = load_checkpoint(checkpoint_path(str(out), 2))["model"]
    assert all(torch.equal(v, best[k]) for k, v in state_of(out).items())


def test_training_without_patience_runs_every_epoch(shards, tmp_path, single_rank, monkeypatch):
    scores = iter([0.5, 0.1, 0.1, 0.1])
    monkeypatch.setattr(training, "read_validation_set", lambda *a, **k: ["a pair"])
    monkeypatch.setattr(training, "validation_hit_rate", lambda *a, **k: next(scores))
    metrics = train_worker(params(shards, tmp_path / "run", epochs=4, patience=0))

    assert len(metrics["epochs"]) == 4 and metrics["stopped_early"] is False
    assert metrics["best_epoch"] == 1


def test_sparse_row_adam_matches_torch_sparse_adam():
    torch.manual_seed(0)
    tables = [torch.nn.Embedding(50, 4, sparse=True) for _ in range(2)]
    tables[1].load_state_dict(tables[0].state_dict())
    initial = tables[0].weight.detach().clone()
    ours = sparse_optim.SparseRowAdam(tables[0].parameters(), lr=0.05)
    reference = torch.optim.SparseAdam(tables[1].parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(1)
    seen = torch.zeros(50, dtype=torch.bool)
    for _ in range(6):
        ids = torch.randint(0, 40, (12,), generator=gen)  # repeats: the gradient is uncoalesced
        seen[ids] = True
        target = torch.randn(12, 4, generator=gen)
        for table, opt in zip(tables, (ours, reference), strict=True):
            opt.zero_grad()
            ((table(ids) - target) ** 2).sum().backward()
            opt.step()
    torch.testing.assert_close(tables[0].weight, tables[1].weight, rtol=1e-5, atol=1e-6)
    mine, theirs = ours.state[tables[0].weight], reference.state[tables[1].weight]
    assert mine["step"] == theirs["step"] == 6
    torch.testing.assert_close(mine["exp_avg"], theirs["exp_avg"])
    torch.testing.assert_close(mine["exp_avg_sq"], theirs["exp_avg_sq"])
    # Lazy: rows no batch touched are exactly as initialised.
    assert torch.equal(tables[0].weight[~seen], initial[~seen])
    assert (~seen).sum() >= 10


def test_sparse_row_adam_refuses_dense_gradients():
    weight = torch.nn.Parameter(torch.ones(3, 2))
    weight.grad = torch.ones(3, 2)
    with pytest.raises(RuntimeError, match="sparse gradients"):
        sparse_optim.SparseRowAdam([weight]).step()


def _sync_rank(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(rank)  # different tables per rank: the broadcast must align them
    users = torch.nn.Embedding(6, 2, sparse=True)
    # Three floats a row and one row in the first table: the next table's rows start off an
    # 8-byte boundary unless the packed buffer pads them.
    listings = torch.nn.Embedding(5, 3, sparse=True)
    # Users: a bound above the lookups, so each rank's part is padded. Listings: one row looked
    # up twice against a bound of one row, so the gradient must be coalesced before it fits.
    sync = sparse_optim.SparseGradientSync([listings.weight, users.weight], [1, 4])
    sync.broadcast_from_rank_zero()
    # Rank 0 touches users 1 (twice) and 3; rank 1 touches users 3 and 5. Only rank 0 uses the
    # listings table, so rank 1 has no gradient for it.
    ids = torch.tensor([1, 1, 3]) if rank == 0 else torch.tensor([3, 5])
    loss = users(ids).sum() * (rank + 1)
    if rank == 0:
        loss = loss + 2 * listings(torch.tensor([4, 4])).sum()
    loss.backward()
    sync()
    torch.save(
        {
            "users": users.weight.detach(),
            "listings": listings.weight.detach(),
            "users_grad": users.weight.grad.to_dense(),
            "listings_grad": listings.weight.grad.to_dense(),
        },
        f"{out_dir}/rank{rank}.pt",
    )
    dist.destroy_process_group()


def test_sparse_gradient_sync_averages_rows_across_ranks(tmp_path):
    torch.multiprocessing.spawn(
        _sync_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True
    )
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    users = torch.zeros(6, 2)
    users[1], users[3], users[5] = 2 / 2, (1 + 2) / 2, 2 / 2  # mean of the two ranks' sums
    listings = torch.zeros(5, 3)
    listings[4] = 2 * 2 / 2
    for rank in got:
        torch.testing.assert_close(rank["users_grad"], users)
        torch.testing.assert_close(rank["listings_grad"], listings)
    assert torch.equal(got[0]["users"], got[1]["users"])
    assert torch.equal(got[0]["listings"], got[1]["listings"])


def test_sparse_gradient_sync_refuses_a_gradient_over_its_bound():
    users = torch.nn.Embedding(6, 2, sparse=True)
    users(torch.tensor([1, 2, 3])).sum().backward()
    with pytest.raises(RuntimeError, match="3 rows, more than its bound of 2"):
        sparse_optim.SparseGradientSync([users.weight], [2])()


def _ddp_config():
    from lib.model import TwoTowerConfig

    return TwoTowerConfig(
        num_users=10,
        num_listings=12,
        cardinalities=(("make", 4), ("body_type", 3)),
        num_dense=1,
        dim=4,
        id_dim=4,
        feature_dim=2,
        hidden=8,
        id_dropout=0.0,
    )


def _ddp_batch(rank: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(10 + rank)
    n = 6
    return {
        "user_idx": torch.randint(0, 10, (n,), generator=gen),
        "listing_idx": torch.randint(0, 12, (n,), generator=gen),
        "codes": torch.stack([torch.randint(0, 4, (n,), generator=gen)] * 2, 1) % 3,
        "dense": torch.randn(n, 1, generator=gen),
        "weight": torch.rand(n, generator=gen) + 0.5,
        "log_q": -torch.rand(n, generator=gen),
    }


def _ddp_rank(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    from lib.model import TwoTowerModel

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = TwoTowerModel(_ddp_config())
    net, sync = training._distributed(
        model, torch.device("cpu"), 2, model.sparse_row_bounds(6, pairs=False)
    )
    net(_ddp_batch(rank)).backward()
    sync()
    grads = {n: p.grad.to_dense() for n, p in model.named_parameters()}
    torch.save(grads, f"{out_dir}/grads{rank}.pt")
    dist.destroy_process_group()


def test_two_ranks_average_to_the_gradient_of_their_mean_loss(tmp_path):
    from lib.model import TwoTowerModel

    torch.multiprocessing.spawn(
        _ddp_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True
    )
    got = [torch.load(tmp_path / f"grads{r}.pt", weights_only=True) for r in range(2)]
    torch.manual_seed(0)
    reference = TwoTowerModel(_ddp_config())
    ((reference(_ddp_batch(0)) + reference(_ddp_batch(1))) / 2).backward()

    assert set(got[0]) == {n for n, _ in reference.named_parameters()}
    for name, p in reference.named_parameters():
        # Dense (DDP's hook) and sparse (SparseGradientSync) alike: the replicas stay equal.
        assert torch.equal(got[0][name], got[1][name]), name
        torch.testing.assert_close(got[0][name], p.grad.to_dense(), msg=name)
