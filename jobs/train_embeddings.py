"""Stage 2: train the two-tower model on the training shards with TorchDistributor (DDP)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass, fields

from pyspark.sql import SparkSession

from lib.session import build_session
from lib.train_driver import run_with_restarts
from lib.training import TrainParams


@dataclass(frozen=True)
class TrainArgs:
    shards: str
    out: str
    epochs: int = 5
    batch_size: int = 1024
    dim: int = 32
    lr: float = 3e-3
    sparse_lr: float = 0.02
    temperature: float = 0.05
    id_dropout: float = 0.3
    num_processes: int = 2
    local_mode: bool = True
    use_gpu: bool = False
    threads: int = 1
    num_workers: int = 0
    shuffle_buffer: int = 50_000
    log_every: int = 50
    seed: int = 7
    max_restarts: int = 3
    min_steps: int = 1_000
    patience: int = 3
    user_weight: float = 1.0
    pair_weight: float = 1.0
    align_weight: float = 0.1


def parse_args(argv: Sequence[str] | None = None) -> TrainArgs:
    d = TrainArgs("", "")
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shards", required=True, help="shards directory (with manifest.json)")
    p.add_argument("--out", required=True, help="output dir: checkpoints/, model.pt, metrics.json")
    p.add_argument("--epochs", type=int, default=d.epochs, help="at least this many epochs")
    p.add_argument(
        "--min-steps",
        type=int,
        default=d.min_steps,
        help="more epochs for small data: at least this many steps per rank; the "
        "epoch best on the validation pairs is kept",
    )
    p.add_argument(
        "--patience",
        type=int,
        default=d.patience,
        help="stop after this many validations without a better hit rate (0: never)",
    )
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--dim", type=int, default=d.dim)
    p.add_argument("--lr", type=float, default=d.lr, help="AdamW lr (MLP, feature embeddings)")
    p.add_argument("--sparse-lr", type=float, default=d.sparse_lr, help="SparseAdam lr (id tables)")
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--user-weight", type=float, default=d.user_weight, help="user -> listing loss")
    p.add_argument(
        "--pair-weight",
        type=float,
        default=d.pair_weight,
        help="listing -> co-interacted listing loss (the shared tower on both sides)",
    )
    p.add_argument(
        "--align-weight",
        type=float,
        default=d.align_weight,
        help="feature-only vector pulled to the full one (cold start)",
    )
    p.add_argument("--id-dropout", type=float, default=d.id_dropout)
    p.add_argument("--num-processes", type=int, default=d.num_processes)
    p.add_argument(
        "--local-mode",
        action=argparse.BooleanOptionalAction,
        default=d.local_mode,
        help="ranks on the driver (default) or as barrier tasks on executors",
    )
    p.add_argument("--use-gpu", action="store_true", default=d.use_gpu)
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads per rank")
    p.add_argument("--num-workers", type=int, default=d.num_workers, help="loader workers per rank")
    p.add_argument("--shuffle-buffer", type=int, default=d.shuffle_buffer)
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--max-restarts",
        type=int,
        default=d.max_restarts,
        help="restarts from the last checkpoint after a rank dies, without new progress",
    )
    return TrainArgs(**vars(p.parse_args(argv)))


def run(spark: SparkSession | None, args: TrainArgs) -> dict:
    if spark is None:
        raise ValueError("train_embeddings needs an active SparkSession (TorchDistributor uses it)")
    same_named = {f.name for f in fields(TrainParams)} & {f.name for f in fields(TrainArgs)}
    params = TrainParams(
        shards_dir=args.shards, out_dir=args.out, **{k: getattr(args, k) for k in same_named}
    )
    return run_with_restarts(
        params,
        args.num_processes,
        local_mode=args.local_mode,
        use_gpu=args.use_gpu,
        max_restarts=args.max_restarts,
    )


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    spark = build_session("train-embeddings")
    print(json.dumps(run(spark, args)))


if __name__ == "__main__":
    main()
