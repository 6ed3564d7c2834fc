"""Training throughput of the two-tower model on this machine.

    .venv/bin/python bench/train.py [--listings 200000 --users 500000 --examples 1500000]
        [--batch-size 1024 --dim 32 --configs 1x2,2x1,1x1,1x1+w1 --rounds 3] [--max-load 1.5]
        [--use-gpu]

Fabricates a training-shards directory of the stage-1 layout (8 Parquet files + manifest.json,
skewed listing popularity and user activity, log-Q from the counts) once under ``--data``, then
trains it with ``lib.training.train_worker`` for each configuration ``PxT[+wN]`` (P DDP processes
× T torch threads each, N DataLoader workers per process), every configuration in fresh
processes with an ``env://`` rendezvous on localhost, exactly what torchrun/TorchDistributor
give a rank. The id tables are sparse (SparseRowAdam) as in production.

A configuration's rate is its last epoch's examples/s as the training loop measures it (all
ranks' examples over the slowest rank's time, loader included); the first epoch also pays for
warm-up. ``uptime`` load is recorded before and after each run, because on a shared machine a
rate means little without it.

The reference, on the same examples (read back from the written ``train/`` files): a plain
two-tower loop (``bench/plain_two_tower.py``: id embeddings only, ``nn.Embedding(sparse=True)``
+ ``torch.optim.SparseAdam``, in-batch softmax, same batch size, dim and epochs, one process
with as many threads as the largest configuration has cores). The same box's speed drifts by
a fifth between minutes, so the runs alternate: ``--rounds`` times every configuration, then the
plain loop. A configuration's ratio is the median over the rounds of its rate over the same
round's plain rate.

The last printed line is one JSON object: ``examples_per_second`` (the best configuration's
median), ``plain_examples_per_second`` (median), ``ratio_to_plain`` (median of the rounds'
ratios; goal >= 0.8) and ``ratio_to_plain_range``, ``best_config``, ``configs`` (each with its
runs), ``plain`` (every round's) and ``device``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Must be set before torch (OpenMP) is imported here or in any rank: busy-waiting OpenMP
# threads steal the core from the other rank or the loader when cores are shared.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from lib.car_marketplace import FEATURE_SPEC  # noqa: E402
from lib.schema_check import arrow_schema  # noqa: E402
from schemas.training_examples import LISTING_FEATURES_SPEC, SPEC  # noqa: E402

# The encoded features of the sample marketplace's spec (lib/car_marketplace.py), in the
# tower's order: vocabulary sizes of the default 20k-listing catalogue, scaled up where the
# catalogue grows (model and location codes), so the feature table is as big as production's.
CARDINALITIES = {
    "make": 41,
    "model": 400,
    "body_type": 9,
    "fuel_type": 6,
    "transmission": 3,
    "colour": 11,
    "year_bucket": 17,
    "mileage_km_bucket": 17,
    "price_eur_bucket": 17,
    "power_kw_bucket": 17,
    "geo_cell": 600,
}
DENSE_FEATURES = (
    "year_norm",
    "mileage_km_norm",
    "price_eur_norm",
    "power_kw_norm",
    "latitude_norm",
    "longitude_norm",
)
# (name, codes incl. the 0 pad, slots): the car spec declares no bag-of-tokens feature.
TOKEN_FIELDS: tuple[tuple[str, int, int], ...] = ()


def _fixed_lists(matrix: np.ndarray) -> pa.ListArray:
    """A ``[rows, width]`` matrix as a list column (one array per row, width 0 allowed)."""
    rows, width = matrix.shape
    offsets = np.arange(rows + 1, dtype=np.int32) * width
    return pa.ListArray.from_arrays(offsets, pa.array(matrix.reshape(-1)))


def fabricate_shards(
    out: Path, *, listings: int, users: int, examples: int, files: int = 8, seed: int = 0
) -> Path:
    """Write a shards directory (train/, listing_features/, manifest.json) unless it exists."""
    wanted = {
        "listings": listings,
        "users": users,
        "examples": examples,
        "files": files,
        "schema_version": SPEC.version,
        "listing_features_version": LISTING_FEATURES_SPEC.version,
    }
    marker = out / "bench-shards.json"
    if marker.exists() and json.loads(marker.read_text()) == wanted:
        return out
    shutil.rmtree(out, ignore_errors=True)
    (out / "train").mkdir(parents=True)
    rng = np.random.default_rng(seed)
    codes = np.zeros((listings, len(CARDINALITIES)), np.int32)
    for k, size in enumerate(CARDINALITIES.values()):
        codes[:, k] = rng.integers(1, size, listings)
    dense = rng.normal(size=(listings, len(DENSE_FEATURES))).astype(np.float32)
    # Each token field: up to ``slots`` tokens per listing, the rest padding (0).
    tokens = np.zeros((listings, sum(slots for _, _, slots in TOKEN_FIELDS)), np.int32)
    start = 0
    for _, size, slots in TOKEN_FIELDS:
        used = rng.integers(0, slots + 1, listings)
        drawn = rng.integers(1, size, (listings, slots))
        tokens[:, start : start + slots] = np.where(np.arange(slots) < used[:, None], drawn, 0)
        start += slots
    # Long-tailed popularity and activity, about as skewed as the sample marketplace's.
    popularity = rng.lognormal(0.0, 1.2, listings)
    activity = rng.lognormal(0.0, 1.0, users)
    listing = rng.choice(listings, examples, p=popularity / popularity.sum()).astype(np.int32)
    user = rng.choice(users, examples, p=activity / activity.sum()).astype(np.int32)
    counts = np.bincount(listing, minlength=listings)
    columns = {
        "user_idx": user,
        "listing_idx": listing,
        "weight": rng.exponential(2.0, examples).astype(np.float32),
        "log_q": np.log(counts[listing] / examples).astype(np.float32),
    }
    table = pa.table(columns, schema=arrow_schema(SPEC.schema))
    (out / "listing_features").mkdir()
    every = np.arange(listings, dtype=np.int32)
    feature_columns = {
        "listing_idx": every,
        "listing_id": [f"L{i}" for i in every],
        "is_active": np.ones(listings, bool),
        "has_interactions": counts > 0,
        "codes": _fixed_lists(codes),
        "dense": _fixed_lists(dense),
        "tokens": _fixed_lists(tokens),
    }
    pq.write_table(
        pa.table(feature_columns, schema=arrow_schema(LISTING_FEATURES_SPEC.schema)),
        out / "listing_features" / "part-00000.parquet",
    )
    names = []
    for i, part in enumerate(np.array_split(np.arange(examples), files)):
        names.append(f"train/part-{i:05d}.parquet")
        pq.write_table(table.slice(part[0], len(part)), out / names[-1], row_group_size=1 << 17)
    manifest = {
        "schema_version": SPEC.version,
        "num_users": users,
        "num_listings": listings,
        "listing_features_version": LISTING_FEATURES_SPEC.version,
        "feature_spec": FEATURE_SPEC.to_dict(),
        # Pairs, not a map, as the shard stage writes them: the order is the tower's.
        "cardinalities": [[name, size] for name, size in CARDINALITIES.items()],
        "dense_features": list(DENSE_FEATURES),
        "token_fields": [list(t) for t in TOKEN_FIELDS],
        "train_files": names,
        "counts": {"training_examples": examples, "listings": listings},
        "encodings": {},
    }
    (out / "manifest.json").write_text(json.dumps(manifest))
    marker.write_text(json.dumps(wanted))
    return out


def parse_config(text: str) -> dict:
    """``"2x1"`` -> 2 processes × 1 thread; ``"1x1+w1"`` adds 1 DataLoader worker per process."""
    head, _, workers = text.partition("+w")
    processes, _, threads = head.partition("x")
    return {
        "processes": int(processes),
        "threads": int(threads),
        "num_workers": int(workers or 0),
    }


def _rank(rank: int, world: int, port: int, params, results) -> None:
    from lib.training import train_worker

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
    )
    metrics = train_worker(params)
    if rank == 0:
        results.put(metrics)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load() -> float:
    return round(os.getloadavg()[0], 2)


def wait_for_quiet(max_load: float, timeout_s: float) -> float:
    """Block until the 1-minute load is below ``max_load`` (or ``timeout_s`` passed)."""
    deadline = time.monotonic() + timeout_s
    while load() >= max_load and time.monotonic() < deadline:
        time.sleep(15)
    return load()


def run_config(shards: Path, config: dict, args: argparse.Namespace) -> dict:
    """Train ``args.epochs`` epochs with one configuration in fresh processes; its rates."""
    from lib.training import TrainParams

    out = Path(tempfile.mkdtemp(prefix="bench-train-"))
    params = TrainParams(
        shards_dir=str(shards),
        out_dir=str(out),
        epochs=args.epochs,
        min_steps=0,  # a throughput bench: exactly --epochs
        batch_size=args.batch_size,
        dim=args.dim,
        id_dim=args.dim,
        hidden=args.hidden,
        threads=config["threads"],
        num_workers=config["num_workers"],
        log_every=args.log_every,
        use_gpu=args.use_gpu,
    )
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    before = load()
    started = time.perf_counter()
    try:
        mp.start_processes(
            _rank,
            args=(config["processes"], _free_port(), params, results),
            nprocs=config["processes"],
            start_method="spawn",
        )
        metrics = results.get()
    finally:
        shutil.rmtree(out, ignore_errors=True)
    epochs = metrics["epochs"]
    return {
        **config,
        "batch": args.batch_size,
        "examples_per_second": round(epochs[-1]["examples_per_s"]),
        "epoch_examples_per_second": [round(e["examples_per_s"]) for e in epochs],
        # All ranks' CPU time; on a loaded machine this moves far less than the wall rate.
        "examples_per_cpu_second": round(epochs[-1]["examples"] / epochs[-1]["cpu_seconds"]),
        "loss_per_epoch": [round(e["loss"], 4) for e in epochs],
        "wall_seconds": round(time.perf_counter() - started, 1),
        "load_before": before,
        "load_after": load(),
    }


# ratio_to_plain: our loop's examples/s over the plain id-only loop's must be at least this.
GOAL_RATIO_TO_PLAIN = 0.8


def config_cores(result: dict) -> int:
    """Cores a configuration keeps busy: processes x threads (+ loader workers)."""
    return result["processes"] * (result["threads"] + result["num_workers"])


def _plain(_: int, shards: Path, args: argparse.Namespace, threads: int, results) -> None:
    from bench import plain_two_tower

    results.put(
        plain_two_tower.train_plain(
            plain_two_tower.read_examples(shards),
            batch_size=args.batch_size,
            dim=args.dim,
            epochs=args.epochs,
            threads=threads,
            device="cuda" if args.use_gpu else "cpu",
        )
    )


def run_plain(shards: Path, args: argparse.Namespace, *, threads: int) -> dict:
    """The plain two-tower loop on the examples of ``shards``' train/ files (on the first GPU
    with ``--use-gpu``), in a fresh process like every configuration: none of them inherits
    another run's memory."""
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    before = load()
    mp.start_processes(
        _plain, args=(shards, args, threads, results), nprocs=1, start_method="spawn"
    )
    return {**results.get(), "load_before": before, "load_after": load()}


def device_name(use_gpu: bool) -> str:
    if use_gpu:
        return f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {cpu}, {os.cpu_count()} cores"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--listings", type=int, default=200_000)
    p.add_argument("--users", type=int, default=500_000)
    p.add_argument("--examples", type=int, default=1_500_000)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--hidden", type=int, default=128, help="listing-tower MLP width")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="times every configuration and then the plain loop run, alternating",
    )
    p.add_argument("--configs", default="1x2,2x1,1x1,1x1+w1")
    p.add_argument("--log-every", type=int, default=0)
    p.add_argument("--use-gpu", action="store_true", help="nccl, one process per GPU")
    p.add_argument(
        "--max-load",
        type=float,
        default=0.0,
        help="before each configuration wait (up to --wait-s) until the 1-min load is below this",
    )
    p.add_argument("--wait-s", type=float, default=1800.0)
    p.add_argument(
        "--plain-threads",
        type=int,
        default=0,
        help="torch threads of the plain loop (default: the largest configuration's cores)",
    )
    p.add_argument("--data", default=str(Path(tempfile.gettempdir()) / "bench-train-shards"))
    args = p.parse_args(argv)

    shards = fabricate_shards(
        Path(args.data), listings=args.listings, users=args.users, examples=args.examples
    )
    configs = [parse_config(text) for text in args.configs.split(",")]
    plain_threads = args.plain_threads or max(config_cores(c) for c in configs)
    runs: list[list[dict]] = [[] for _ in configs]
    plains = []
    for round_ in range(args.rounds):
        for config, done in zip(configs, runs, strict=True):
            if args.max_load:
                wait_for_quiet(args.max_load, args.wait_s)
            result = run_config(shards, config, args)
            print(json.dumps({"round": round_ + 1, **result}), flush=True)
            done.append(result)
        if args.max_load:
            wait_for_quiet(args.max_load, args.wait_s)
        plains.append(run_plain(shards, args, threads=plain_threads))
        print(json.dumps({"round": round_ + 1, "plain": plains[-1]}), flush=True)
    plain_rates = [p["plain_examples_per_second"] for p in plains]
    summaries = [
        summarise(config, done, plain_rates) for config, done in zip(configs, runs, strict=True)
    ]
    best = max(summaries, key=lambda r: r["ratio_to_plain"])
    print(
        json.dumps(
            {
                "examples_per_second": best["examples_per_second"],
                "plain_examples_per_second": round(statistics.median(plain_rates)),
                "ratio_to_plain": best["ratio_to_plain"],
                "ratio_to_plain_range": best["ratio_to_plain_range"],
                "goal_ratio_to_plain_min": GOAL_RATIO_TO_PLAIN,
                "best_config": best["config"],
                "rounds": args.rounds,
                "plain_threads": plain_threads,
                "configs": summaries,
                "plain": plains,
                "device": device_name(args.use_gpu),
                "catalogue": {"listings": args.listings, "users": args.users},
                "examples_per_epoch": args.examples,
                "dim": args.dim,
                "hidden": args.hidden,
                "torch": torch.__version__,
            }
        )
    )


def summarise(config: dict, runs: list[dict], plain_rates: list[int]) -> dict:
    """One configuration over the rounds: its median rate and, round by round, its rate over
    the plain loop's of the same round (median and range): pairing each run with the plain
    run next to it cancels most of what the machine's speed drifts by between rounds."""
    rates = [r["examples_per_second"] for r in runs]
    ratios = [rate / max(plain, 1) for rate, plain in zip(rates, plain_rates, strict=True)]
    return {
        "config": f"{config['processes']}x{config['threads']}+w{config['num_workers']}",
        "examples_per_second": round(statistics.median(rates)),
        "ratio_to_plain": round(statistics.median(ratios), 3),
        "ratio_to_plain_range": [round(min(ratios), 3), round(max(ratios), 3)],
        "runs": runs,
    }


if __name__ == "__main__":
    main()
