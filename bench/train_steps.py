"""Where a training step's time goes, phase by phase, at 1 and 2 ranks.

    .venv/bin/python bench/train_steps.py [--ranks 1,2 --steps 600 --warmup 100]
        [--data /tmp/bench-train-shards]

Runs the training loop's own pieces (``ShardDataset`` loader, ``TwoTowerModel``, the ranks'
``DistributedDataParallel`` and ``SparseGradientSync`` from ``lib.training._distributed``,
``SparseRowAdam`` and fused AdamW) on the shards ``bench/train.py`` fabricates (run it once
first), one torch thread per rank, ranks in fresh processes on localhost as ``bench/train.py``
starts them, and times every phase of each step after the warm-up: load (next batch), forward,
backward (with DDP's averaging of the dense gradients), sync (the id tables' gradients),
sparse and dense optimizer steps. ``--ranks 1+1`` runs two independent single ranks side by
side instead: what two ranks cost without talking to each other.

Prints one JSON line per rank and run: milliseconds per step by phase and their total.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# As in bench/train.py: before torch is imported here or in any rank.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

PHASES = ("load", "forward", "backward", "sync", "sparse_step", "dense_step")


def _rank(rank: int, world: int, port: int, args: argparse.Namespace, results) -> None:
    from torch.utils.data import DataLoader

    from lib.loader import ShardDataset, read_listing_features
    from lib.model import TwoTowerModel
    from lib.sparse_optim import SparseRowAdam
    from lib.training import TrainParams, _distributed, model_config, read_manifest

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world)
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    shards = Path(args.data)
    manifest = read_manifest(str(shards))
    config = model_config(manifest, TrainParams(shards_dir=str(shards), out_dir=""))
    torch.manual_seed(0)
    model = TwoTowerModel(config)
    sparse = SparseRowAdam(model.sparse_parameters(), lr=0.02)
    dense = torch.optim.AdamW(model.dense_parameters(), lr=3e-3, fused=True)
    bounds = model.sparse_row_bounds(args.batch_size, pairs=False)
    net, sync = _distributed(model, torch.device("cpu"), world, bounds)
    features = read_listing_features(
        shards / "listing_features",
        config.num_listings,
        num_codes=len(config.cardinalities),
        num_dense=config.num_dense,
    )
    files = [str(shards / f) for f in manifest["train_files"]]
    dataset = ShardDataset(files, features, rank=rank, world_size=world, batch_size=args.batch_size)
    batches = iter(DataLoader(dataset, batch_size=None))
    spent = dict.fromkeys(PHASES, 0.0)
    for step in range(args.warmup + args.steps):
        marks = [time.perf_counter()]
        batch = next(batches)
        marks.append(time.perf_counter())
        loss = net(batch)
        sparse.zero_grad(set_to_none=True)
        dense.zero_grad(set_to_none=True)
        marks.append(time.perf_counter())
        loss.backward()
        marks.append(time.perf_counter())
        if sync is not None:
            sync()
        marks.append(time.perf_counter())
        sparse.step()
        marks.append(time.perf_counter())
        dense.step()
        marks.append(time.perf_counter())
        if step >= args.warmup:
            for phase, start, end in zip(PHASES, marks[:-1], marks[1:], strict=True):
                spent[phase] += end - start
    ms = {phase: round(seconds / args.steps * 1e3, 2) for phase, seconds in spent.items()}
    results.put({"rank": rank, "world_size": world, **ms, "total": round(sum(ms.values()), 2)})
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(world: int, copies: int, args: argparse.Namespace) -> list[dict]:
    """``copies`` independent groups of ``world`` ranks at once; every rank's phases."""
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    groups = [
        mp.start_processes(
            _rank,
            args=(world, _free_port(), args, results),
            nprocs=world,
            start_method="spawn",
            join=False,
        )
        for _ in range(copies)
    ]
    for group in groups:
        while not group.join():
            pass
    return [results.get() for _ in range(world * copies)]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--ranks", default="1,2", help="comma-separated: N ranks, or 1+1 (two alone)")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--data", default=str(Path(tempfile.gettempdir()) / "bench-train-shards"))
    args = p.parse_args(argv)
    if not (Path(args.data) / "manifest.json").exists():
        raise SystemExit(f"no shards under {args.data}: run bench/train.py once first")
    for text in args.ranks.split(","):
        world, copies = (1, len(text.split("+"))) if "+" in text else (int(text), 1)
        for result in sorted(run(world, copies, args), key=lambda r: r["rank"]):
            print(json.dumps({"ranks": text, **result}), flush=True)


if __name__ == "__main__":
    main()
