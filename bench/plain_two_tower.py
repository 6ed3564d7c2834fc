"""A plain two-tower training loop: the reference ``bench/train.py`` sets our loop against.

Id embeddings only (``torch.nn.Embedding(sparse=True)`` for users and listings, no features, no
MLP), ``torch.optim.SparseAdam``, L2-normalised vectors, an in-batch softmax over the batch's
listings with the usual log-Q correction, batches drawn from the examples held in memory as
numpy arrays (no loader, no DDP). It is what a minimal two-tower trainer costs on this machine
with the same batch size, dimension and examples; ``ratio_to_plain`` in ``bench/train.py`` is
our loop's examples/s over this loop's.

    .venv/bin/python bench/plain_two_tower.py --shards /tmp/bench-train-shards [--epochs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F


def read_examples(shards: Path) -> dict[str, np.ndarray | int]:
    """``user_idx``, ``listing_idx``, ``log_q`` of a shards directory's ``train/`` Parquet files
    (the manifest's ``train_files`` in order), and the manifest's user and listing counts."""
    manifest = json.loads((shards / "manifest.json").read_text())
    columns = ["user_idx", "listing_idx", "log_q"]
    tables = [pq.read_table(shards / f, columns=columns) for f in manifest["train_files"]]
    out: dict[str, np.ndarray | int] = {
        c: np.concatenate([t[c].to_numpy() for t in tables]) for c in columns
    }
    out["num_users"] = int(manifest["num_users"])
    out["num_listings"] = int(manifest["num_listings"])
    return out


class PlainTwoTower(torch.nn.Module):
    def __init__(self, num_users: int, num_listings: int, dim: int):
        super().__init__()
        self.users = torch.nn.Embedding(num_users, dim, sparse=True)
        self.listings = torch.nn.Embedding(num_listings, dim, sparse=True)
        torch.nn.init.normal_(self.users.weight, std=dim**-0.5)
        torch.nn.init.normal_(self.listings.weight, std=dim**-0.5)

    def forward(
        self, user_idx: torch.Tensor, listing_idx: torch.Tensor, log_q: torch.Tensor, alpha: float
    ) -> torch.Tensor:
        users = F.normalize(self.users(user_idx), dim=-1)
        listings = F.normalize(self.listings(listing_idx), dim=-1)
        # Row i's positive is column i; every other row's listing is a negative.
        logits = torch.addmm(-log_q[None, :], users, listings.T, alpha=alpha)
        return F.cross_entropy(logits, torch.arange(len(user_idx), device=logits.device))


def train_plain(
    examples: dict,
    *,
    batch_size: int,
    dim: int,
    epochs: int,
    threads: int,
    lr: float = 0.02,
    temperature: float = 0.05,
    seed: int = 7,
    device: str = "cpu",
) -> dict:
    """Train ``epochs`` passes over ``examples`` (every example once per epoch, in a new random
    order, batches of ``batch_size``); returns examples/s per epoch, the last as the rate."""
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        model = PlainTwoTower(examples["num_users"], examples["num_listings"], dim).to(device)
        optimizer = torch.optim.SparseAdam(list(model.parameters()), lr=lr)
        users = torch.from_numpy(examples["user_idx"].astype(np.int64)).to(device)
        listings = torch.from_numpy(examples["listing_idx"].astype(np.int64)).to(device)
        log_q = torch.from_numpy(examples["log_q"].astype(np.float32)).to(device)
        n = len(users)
        history = []
        for _ in range(epochs):
            started, cpu_started = time.perf_counter(), time.process_time()
            order = torch.from_numpy(rng.permutation(n)).to(device)
            loss_sum = torch.zeros((), device=device)
            steps = 0
            for start in range(0, n, batch_size):
                rows = order[start : start + batch_size]
                loss = model(users[rows], listings[rows], log_q[rows], 1 / temperature)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum += loss.detach()
                steps += 1
            loss_mean = float(loss_sum) / max(steps, 1)  # also waits for the GPU
            seconds = time.perf_counter() - started
            history.append(
                {
                    "steps": steps,
                    "examples": n,
                    "seconds": round(seconds, 2),
                    "examples_per_second": round(n / seconds),
                    "examples_per_cpu_second": round(n / (time.process_time() - cpu_started)),
                    "loss": round(loss_mean, 4),
                }
            )
    finally:
        torch.set_num_threads(threads_before)
    return {
        "plain_examples_per_second": history[-1]["examples_per_second"],
        "epochs": history,
        "batch": batch_size,
        "dim": dim,
        "threads": threads,
        "optimizer": "torch.optim.SparseAdam",
        "device": device,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", type=Path, required=True, help="a shards directory (manifest.json)")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    a = p.parse_args(argv)
    result = train_plain(
        read_examples(a.shards),
        batch_size=a.batch_size,
        dim=a.dim,
        epochs=a.epochs,
        threads=a.threads,
        device=a.device,
    )
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
