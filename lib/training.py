"""Distributed training of the two-tower model under Spark's TorchDistributor: what a rank runs.

``lib.train_driver.run_distributed`` (driver) hands ``train_worker`` to TorchDistributor, which
starts one process per rank (torchrun) and sets ``MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE``.
Each rank streams its own shard files, trains a DDP replica (sparse lazy Adam for the id tables,
``lib.sparse_optim``; AdamW for the rest), and rank 0 writes a checkpoint per epoch and, at the
end, the model artifact and ``metrics.json`` (``lib.checkpoints``).

``out_dir`` (and ``shards_dir``) must be visible to every rank: local disk in local mode,
shared storage (DBFS, NFS, a FUSE-mounted bucket) when ranks run on executors.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from lib.checkpoints import (
    checkpoint,
    checkpoint_path,
    load_checkpoint,
    resume,
    save_atomic,
    write_outputs,
)
from lib.loader import ShardDataset, read_listing_features
from lib.model import TwoTowerConfig, TwoTowerModel
from lib.model_selection import read_validation_set, validation_hit_rate
from lib.sparse_optim import SparseGradientSync, SparseRowAdam
from schemas.training_examples import LISTING_FEATURES_SPEC
from schemas.training_examples import SPEC as TRAINING_EXAMPLES_SPEC

MANIFEST_SCHEMA_VERSION = TRAINING_EXAMPLES_SPEC.version


@dataclass(frozen=True)
class TrainParams:
    """Everything one training run needs; picklable, so TorchDistributor ships it to each rank."""

    shards_dir: str
    out_dir: str
    epochs: int = 5
    batch_size: int = 1024
    lr: float = 3e-3
    sparse_lr: float = 0.02
    weight_decay: float = 1e-5
    dim: int = 32
    id_dim: int = 32
    feature_dim: int = 8
    hidden: int = 128
    temperature: float = 0.05
    id_dropout: float = 0.3
    seed: int = 7
    num_workers: int = 0
    shuffle_buffer: int = 50_000
    log_every: int = 50
    threads: int = 1
    use_gpu: bool = False
    # Small data sets get more epochs than ``epochs``: at least this many steps per rank. The
    # artifact keeps the epoch that scored best on the validation pairs (lib.model_selection).
    min_steps: int = 1_000
    # Loss terms (lib.model): user -> listing, listing -> co-interacted listing, cold alignment.
    user_weight: float = 1.0
    pair_weight: float = 1.0
    align_weight: float = 0.1
    # Validation (and the checkpoint that goes with it) runs after at most this many epochs.
    max_validations: int = 10
    # Training stops once this many validations in a row scored no better than an earlier one
    # (0: never); the best epoch's weights are kept either way.
    patience: int = 3


# ---------------------------------------------------------------------------------------------
# IO: the shards' manifest


def read_manifest(shards_dir: str) -> dict[str, Any]:
    """Read and check ``shards_dir/manifest.json`` (the shard stage's output contract)."""
    path = Path(shards_dir) / "manifest.json"
    if not path.exists():
        raise FileNotFoundError(f"no manifest.json in shards directory {shards_dir}")
    manifest = json.loads(path.read_text())
    version = manifest.get("schema_version")
    if version != MANIFEST_SCHEMA_VERSION:
        raise ValueError(f"{path}: schema_version {version!r}, expected {MANIFEST_SCHEMA_VERSION}")
    missing = [
        k
        for k in ("num_users", "num_listings", "cardinalities", "dense_features", "train_files")
        if k not in manifest
    ]
    if missing:
        raise ValueError(f"{path}: missing keys {missing}")
    if manifest.get("listing_features_version") != LISTING_FEATURES_SPEC.version:
        raise ValueError(
            f"{path}: listing features version {manifest.get('listing_features_version')!r}, "
            f"expected {LISTING_FEATURES_SPEC.version}: rebuild the shards"
        )
    if not manifest["train_files"]:
        raise ValueError(f"{path}: train_files is empty")
    return manifest


def model_config(manifest: Mapping[str, Any], params: TrainParams) -> TwoTowerConfig:
    """The model shape implied by the shards' vocabularies and the run's parameters."""
    return TwoTowerConfig(
        num_users=int(manifest["num_users"]),
        num_listings=int(manifest["num_listings"]),
        cardinalities=tuple((c, int(n)) for c, n in manifest["cardinalities"]),
        num_dense=len(manifest["dense_features"]),
        dense_names=tuple(manifest["dense_features"]),
        token_fields=tuple(tuple(t) for t in manifest.get("token_fields", [])),
        dim=params.dim,
        id_dim=params.id_dim,
        feature_dim=params.feature_dim,
        hidden=params.hidden,
        id_dropout=params.id_dropout,
        temperature=params.temperature,
        user_weight=params.user_weight,
        pair_weight=params.pair_weight if manifest.get("pair_files") else 0.0,
        align_weight=params.align_weight if manifest.get("pair_files") else 0.0,
    )


# ---------------------------------------------------------------------------------------------
# Worker side


def train_worker(params: TrainParams) -> dict[str, Any]:
    """One DDP rank: train, checkpoint each epoch, write the artifact (rank 0); return metrics.

    Joins the process group from the ``env://`` variables TorchDistributor/torchrun set (gloo on
    CPU, nccl with CUDA); without ``WORLD_SIZE`` in the environment it runs as a single rank.
    Every rank returns the same metrics dict: in local mode all ranks write their return value
    to the same file, so whichever lands last must be the right one.
    """
    threads_before = torch.get_num_threads()
    torch.set_num_threads(params.threads)
    if params.use_gpu and not torch.cuda.is_available():
        raise RuntimeError("use_gpu=True but torch sees no CUDA device in this rank")
    use_cuda = params.use_gpu
    own_group = not dist.is_initialized()
    if own_group:
        backend = "nccl" if use_cuda else "gloo"
        if "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend, init_method="env://")
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        if use_cuda:
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local_rank)
            device = torch.device("cuda", local_rank)
        else:
            device = torch.device("cpu")
        return _train(params, device)
    finally:
        if own_group:
            dist.destroy_process_group()
        torch.set_num_threads(threads_before)


def _seed_everything(seed: int, epoch: int, rank: int) -> None:
    # Reseeding per (seed, epoch, rank) makes a resumed epoch draw exactly what it drew the
    # first time, whatever happened before the restart.
    torch.manual_seed(int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0]))


def log(message: str) -> None:
    print(message, flush=True)


def _train(params: TrainParams, device: torch.device) -> dict[str, Any]:
    rank, world = dist.get_rank(), dist.get_world_size()
    manifest = read_manifest(params.shards_dir)
    config = model_config(manifest, params)
    files = [str(Path(params.shards_dir) / f) for f in manifest["train_files"]]

    torch.manual_seed(params.seed)
    model = TwoTowerModel(config).to(device)
    sparse_opt = SparseRowAdam(list(model.sparse_parameters()), lr=params.sparse_lr)
    # fused: one kernel for all dense tensors instead of a dozen small ops per step.
    dense_opt = torch.optim.AdamW(
        model.dense_parameters(), lr=params.lr, weight_decay=params.weight_decay, fused=True
    )
    start_epoch, step, history = 0, 0, []
    resumed_from = resume(params, config, model, sparse_opt, dense_opt)
    if resumed_from is not None:
        start_epoch, step, history = resumed_from
        if rank == 0:
            log(f"resumed from epoch {start_epoch} (step {step})")

    pair_files = [str(Path(params.shards_dir) / f) for f in manifest.get("pair_files", [])]
    with_pairs = bool(pair_files) and config.pair_weight > 0
    row_bounds = model.sparse_row_bounds(params.batch_size, with_pairs)
    net, sync_sparse = _distributed(model, device, world, row_bounds)
    listing_features = read_listing_features(
        Path(params.shards_dir) / "listing_features",
        config.num_listings,
        num_codes=len(config.cardinalities),
        num_dense=config.num_dense,
        num_slots=sum(slots for _, _, slots in config.token_fields),
    )

    def shard_loader(paths: list[str], pairs: bool) -> tuple[ShardDataset, DataLoader]:
        found = ShardDataset(
            paths,
            listing_features,
            rank=rank,
            world_size=world,
            batch_size=params.batch_size,
            shuffle_buffer=params.shuffle_buffer,
            seed=params.seed,
            num_workers=params.num_workers,
            pairs=pairs,
        )
        return found, DataLoader(
            found,
            batch_size=None,
            num_workers=params.num_workers,
            pin_memory=device.type == "cuda",
        )

    dataset, loader = shard_loader(files, False)
    pairs = shard_loader(pair_files, True) if with_pairs else None
    epochs = max(params.epochs, math.ceil(params.min_steps / max(len(dataset), 1)))
    validate_every = max(1, math.ceil(epochs / max(params.max_validations, 1)))
    validation = read_validation_set(params.shards_dir, config.num_listings, seed=params.seed)
    features = dataset.layout.listing_features
    if rank == 0:
        log(
            f"training: world_size {world}, {len(files)} files, {len(dataset)} batches/rank/epoch, "
            f"epochs {start_epoch + 1}..{epochs}, device {device}, "
            f"{len(validation) if validation else 'no'} validation pairs, "
            f"{len(pairs[0]) if pairs else 'no'} listing-pair batches/rank/pass"
        )

    for epoch in range(start_epoch, epochs):
        # Every rank holds the same validation numbers, so all of them stop at the same epoch
        # (a run resumed after it stopped stops again here).
        if _stalled(history, params.patience):
            if rank == 0:
                log(
                    f"stopping after epoch {epoch}: {params.patience} validations without a "
                    "better hit rate"
                )
            break
        _seed_everything(params.seed, epoch, rank)
        dataset.set_epoch(epoch)
        net.train()
        started = last_log = time.perf_counter()
        cpu_started = time.process_time()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        examples = examples_at_log = 0
        batches = 0
        pair_batches = _endless(*pairs, epoch) if pairs else None
        for batch in loader:
            batch = _to_device(batch, device)
            users = batch
            if pair_batches is not None:
                batch = {"users": users, "pairs": _to_device(next(pair_batches), device)}
            loss = net(batch)
            sparse_opt.zero_grad(set_to_none=True)
            dense_opt.zero_grad(set_to_none=True)
            loss.backward()
            if sync_sparse is not None:
                sync_sparse()
            sparse_opt.step()
            dense_opt.step()
            step += 1
            batches += 1
            examples += len(users["user_idx"])
            loss_sum += loss.detach()
            if rank == 0 and params.log_every and step % params.log_every == 0:
                now = time.perf_counter()
                rate = (examples - examples_at_log) * world / max(now - last_log, 1e-9)
                log(f"epoch {epoch + 1} step {step} loss {loss.item():.4f} examples/s {rate:,.0f}")
                last_log, examples_at_log = now, examples
        seconds = time.perf_counter() - started
        cpu = time.process_time() - cpu_started
        history.append(_epoch_summary(epoch, loss_sum, batches, examples, seconds, cpu, device))
        checkpointed = (epoch + 1) % validate_every == 0 or epoch + 1 == epochs
        h = history[-1]
        if checkpointed and validation is not None:
            # Rank 0 scores; every rank records the same number (their metrics must agree).
            found = torch.zeros((), dtype=torch.float64, device=device)
            if rank == 0:
                found += validation_hit_rate(model, features, validation, device=device)
            dist.broadcast(found, src=0)
            h["validation_hit_rate_at_10"] = float(found)
        if rank == 0:
            found = h.get("validation_hit_rate_at_10")
            log(
                f"epoch {epoch + 1} done: loss {h['loss']:.4f}, {h['examples']} examples, "
                f"{h['seconds']:.1f}s, examples/s {h['examples_per_s']:,.0f}"
                + (f", validation hit@10 {found:.4f}" if found is not None else "")
            )
            if checkpointed:
                save_atomic(
                    checkpoint(
                        params, config, model, sparse_opt, dense_opt, epoch + 1, step, history
                    ),
                    checkpoint_path(params.out_dir, epoch + 1),
                )
        # Without this the other ranks' next epoch would start its clock while rank 0 writes.
        dist.barrier()

    best_epoch = _best_epoch(history)
    metrics = _metrics(params, model, history, world, step, resumed_from)
    metrics["best_epoch"] = best_epoch
    metrics["stopped_early"] = history[-1]["epoch"] < epochs
    metrics["validation_hit_rate_at_10"] = next(
        (h.get("validation_hit_rate_at_10") for h in history if h["epoch"] == best_epoch), None
    )
    if rank == 0:
        if best_epoch != history[-1]["epoch"]:
            state = load_checkpoint(checkpoint_path(params.out_dir, best_epoch))
            model.load_state_dict(state["model"])
            log(f"keeping epoch {best_epoch}: the best on the validation pairs")
        write_outputs(params, config, manifest, model, metrics)
    dist.barrier()
    return metrics


def _distributed(
    model: TwoTowerModel, device: torch.device, world: int, row_bounds: list[int]
) -> tuple[torch.nn.Module, SparseGradientSync | None]:
    """The module the training loop calls (the model itself for one rank, else DDP) and, with
    several ranks, the step that averages the id tables' sparse gradients after ``backward``.

    With one rank there is nothing to synchronise and DDP's hooks and buckets are pure
    overhead. With several, DDP averages the dense gradients (feature embeddings and the MLP:
    small; on CPU by one all-gather, ``_gathered_mean``) and ignores the id tables, whose
    sparse gradients ``SparseGradientSync`` averages with one dense all-gather: 2-rank runs
    with DDP's own sparse all-reduce (gloo's) intermittently corrupted the heap
    (docs/design-notes.md). On GPUs both talk over a gloo group: public NCCL builds have no
    sparse all-reduce.
    """
    if world == 1:
        return model, None
    group = dist.new_group(backend="gloo") if device.type == "cuda" else None
    sparse = {id(p) for p in model.sparse_parameters()}
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        model, [name for name, p in model.named_parameters() if id(p) in sparse]
    )
    net = DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        process_group=group,
        # The model's buffers are constants derived from its config (feature-code offsets):
        # broadcasting them before every forward would add a collective per step.
        forward_sync_buffers=False,
        # Not gradient_as_bucket_view=True: with the id tables' sparse gradients in DDP it
        # corrupted the heap within ~1,000 steps at 2 ranks.
        gradient_as_bucket_view=False,
    )
    if device.type == "cpu":
        net.register_comm_hook(group, _gathered_mean)
    sync = SparseGradientSync(model.sparse_parameters(), row_bounds, group)
    sync.broadcast_from_rank_zero()
    return net, sync


# No return annotation: DDP accepts none or the evaluated Future[Tensor], and this module's
# annotations are strings.
def _gathered_mean(group, bucket):
    """DDP comm hook: a bucket's mean over ranks (a ``Future``) by one all-gather and a local
    sum.

    The dense gradients are small (about 30k floats); for them gloo's ring all-reduce costs
    over twice an all-gather on two ranks (2.5 against 1.1 ms on the 2-core box). Every rank
    sums the same gathered tensors in the same order, so the replicas stay bit-identical.
    Gloo has no all-gather of CUDA tensors, so GPU ranks keep DDP's own all-reduce.
    """
    gradients = bucket.buffer()
    world = dist.get_world_size(group)
    gathered = [torch.empty_like(gradients) for _ in range(world)]
    done = dist.all_gather(gathered, gradients, group=group, async_op=True).get_future()
    return done.then(lambda _: torch.stack(gathered).sum(dim=0).div_(world))


def _epoch_summary(
    epoch: int,
    loss_sum: torch.Tensor,
    batches: int,
    examples: int,
    seconds: float,
    cpu_seconds: float,
    device: torch.device,
) -> dict[str, Any]:
    totals = torch.tensor(
        [float(loss_sum), batches, examples, cpu_seconds], dtype=torch.float64, device=device
    )
    dist.all_reduce(totals)
    # The slowest rank sets the pace; using its time makes every rank report the same numbers.
    slowest = torch.tensor([seconds], dtype=torch.float64, device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    loss_total, batch_total, example_total, cpu_total = totals.tolist()
    secs = float(slowest.item())
    return {
        "epoch": epoch + 1,
        "loss": loss_total / max(batch_total, 1),
        "batches": int(batch_total),
        "examples": int(example_total),
        "seconds": secs,
        "examples_per_s": example_total / max(secs, 1e-9),
        # CPU time of all rank processes (DataLoader workers not included): on a shared
        # machine examples per CPU-second says more about the code than wall-clock rates.
        "cpu_seconds": cpu_total,
    }


def _to_device(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _endless(dataset: ShardDataset, loader: DataLoader, epoch: int) -> Iterator[dict]:
    """The pair batches, pass after pass, each pass shuffled anew: an epoch is one pass over
    the user examples, however many pairs there are."""
    for n in itertools.count():
        # Distinct from every other epoch's passes, the same on every rank.
        dataset.set_epoch(epoch * 1_000_003 + n)
        yield from loader


def _stalled(history: list[dict[str, Any]], patience: int) -> bool:
    """Whether the last ``patience`` validations all scored no better than an earlier one."""
    scores = [
        h["validation_hit_rate_at_10"]
        for h in history
        if h.get("validation_hit_rate_at_10") is not None
    ]
    if patience <= 0 or len(scores) <= patience:
        return False
    return max(scores[-patience:]) <= max(scores[:-patience])


def _best_epoch(history: list[dict[str, Any]]) -> int:
    """The validated epoch with the best hit@10 (the earliest of equals); the last without."""
    scored = [h for h in history if h.get("validation_hit_rate_at_10") is not None]
    if not scored:
        return int(history[-1]["epoch"])
    best = max(scored, key=lambda h: (h["validation_hit_rate_at_10"], -h["epoch"]))
    return int(best["epoch"])


def parameter_counts(model: TwoTowerModel) -> dict[str, int]:
    """Number of scalar parameters in the sparse id tables, the dense rest, and in total."""
    sparse = sum(p.numel() for p in model.sparse_parameters())
    dense = sum(p.numel() for p in model.dense_parameters())
    return {"sparse": sparse, "dense": dense, "total": sparse + dense}


def _metrics(params, model, history, world, step, resumed_from) -> dict[str, Any]:
    examples = sum(h["examples"] for h in history)
    seconds = sum(h["seconds"] for h in history)
    return {
        "loss_per_epoch": [h["loss"] for h in history],
        "epochs": history,
        "examples_per_s": examples / seconds if seconds else 0.0,
        "world_size": world,
        "steps": step,
        "resumed_from_epoch": resumed_from[0] if resumed_from else None,
        "params": asdict(params),
        "parameter_counts": parameter_counts(model),
        "artifact": str(Path(params.out_dir) / "model.pt"),
    }
