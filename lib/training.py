"""Distributed training of the two-tower model under Spark's TorchDistributor.

``run_distributed`` (driver) hands ``train_worker`` to TorchDistributor, which starts one process
per rank (torchrun) and sets ``MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE``. Each rank streams its
own shard files, trains a DDP replica (sparse lazy Adam for the id tables, AdamW for the rest), and
rank 0 writes a checkpoint per epoch and, at the end, the model artifact and ``metrics.json``.

``out_dir`` (and ``shards_dir``) must be visible to every rank: local disk in local mode,
shared storage (DBFS, NFS, a FUSE-mounted bucket) when ranks run on executors.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from lib.loader import ShardDataset, read_listing_features
from lib.model import TwoTowerConfig, TwoTowerModel
from lib.model_selection import read_validation_set, validation_hit_rate
from schemas.training_examples import LISTING_FEATURES_SPEC
from schemas.training_examples import SPEC as TRAINING_EXAMPLES_SPEC

MANIFEST_SCHEMA_VERSION = TRAINING_EXAMPLES_SPEC.version
# 2: one shared feature-embedding table (was one table per code), SparseRowAdam state.
ARTIFACT_FORMAT_VERSION = 2
CHECKPOINT_FORMAT_VERSION = 2
_CHECKPOINT_RE = re.compile(r"^epoch-(\d{3,})\.pt$")


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


class SparseRowAdam(torch.optim.Optimizer):
    """``torch.optim.SparseAdam``'s update (lazy Adam: only the rows in the gradient move), done
    with row gathers and scatters.

    SparseAdam builds sparse tensors for every moment update (``sparse_mask`` twice, three
    sparse adds); gathering the touched rows once, updating them densely and writing them back
    is the same arithmetic with fewer passes over the batch's rows. The state has SparseAdam's
    layout (``step``, ``exp_avg``, ``exp_avg_sq``), so checkpoints look the same.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ):
        if lr <= 0 or eps <= 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"invalid SparseRowAdam settings lr={lr} betas={betas} eps={eps}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not p.grad.is_sparse:
                    raise RuntimeError("SparseRowAdam needs sparse gradients (sparse=True tables)")
                grad = p.grad.coalesce()
                rows, values = grad._indices()[0], grad._values()
                if rows.numel() == 0:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                exp_avg = state["exp_avg"].index_select(0, rows).lerp_(values, 1 - beta1)
                exp_avg_sq = state["exp_avg_sq"].index_select(0, rows)
                exp_avg_sq.mul_(beta2).addcmul_(values, values, value=1 - beta2)
                state["exp_avg"].index_copy_(0, rows, exp_avg)
                state["exp_avg_sq"].index_copy_(0, rows, exp_avg_sq)
                step = state["step"]
                step_size = group["lr"] * math.sqrt(1 - beta2**step) / (1 - beta1**step)
                update = exp_avg.div_(exp_avg_sq.sqrt_().add_(group["eps"]))
                p.index_add_(0, rows, update, alpha=-step_size)
        return loss


# ---------------------------------------------------------------------------------------------
# IO: manifest, checkpoints, artifact


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


def checkpoint_path(out_dir: str, epoch: int) -> Path:
    return Path(out_dir) / "checkpoints" / f"epoch-{epoch:03d}.pt"


def latest_checkpoint(out_dir: str) -> Path | None:
    """The checkpoint with the highest epoch number in ``out_dir/checkpoints``, if any."""
    folder = Path(out_dir) / "checkpoints"
    if not folder.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _CHECKPOINT_RE.match(p.name))]
    return max(found)[1] if found else None


def save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename: never a torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (tensors and plain containers only)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def load_artifact(path: str) -> tuple[TwoTowerModel, dict[str, Any]]:
    """Rebuild the trained model from ``model.pt`` alone; returns (model in eval mode, metadata).

    The metadata is the artifact minus the weights: ``config``, ``encodings`` (copied from the
    shard manifest), ``vocab_sizes``, ``dense_features``, ``categorical_codes``, ``metrics``.
    """
    artifact = torch.load(path, map_location="cpu", weights_only=True)
    version = artifact.get("format_version")
    if version != ARTIFACT_FORMAT_VERSION:
        raise ValueError(f"{path}: artifact format {version!r}, expected {ARTIFACT_FORMAT_VERSION}")
    model = TwoTowerModel(TwoTowerConfig.from_dict(artifact["config"]))
    model.load_state_dict(artifact["state_dict"])
    model.eval()
    return model, {k: v for k, v in artifact.items() if k != "state_dict"}


# ---------------------------------------------------------------------------------------------
# Driver side


@contextmanager
def _rank_environment() -> Iterator[None]:
    """Environment for the rank processes TorchDistributor spawns on this machine.

    torchrun starts fresh interpreters whose ``sys.path`` is the temp dir of the pickled
    function: putting this package's root on PYTHONPATH lets them import ``lib`` even when the
    project is not pip-installed. OpenMP's default busy-waiting makes ``threads > 1`` several
    times slower than one thread when cores are shared (Spark tasks, other ranks), so ranks
    wait passively unless the caller chose a policy.
    """
    root = str(Path(__file__).resolve().parent.parent)
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "OMP_WAIT_POLICY")}
    parts = [p for p in (saved["PYTHONPATH"] or "").split(os.pathsep) if p]
    if root not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join([root, *parts])
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run_distributed(
    params: TrainParams, num_processes: int = 2, local_mode: bool = True, use_gpu: bool = False
) -> dict[str, Any]:
    """Train with ``num_processes`` DDP ranks via TorchDistributor; returns rank 0's metrics.

    Needs an active SparkSession. ``local_mode=True`` runs the ranks on the driver;
    ``False`` runs them as barrier tasks on executors (which must be able to import ``lib``).
    With ``use_gpu`` one rank runs per GPU (nccl); TorchDistributor takes the GPUs from Spark's
    resource scheduling, so the driver (local mode) or the executors and tasks must declare
    them (``spark.{driver,executor,task}.resource.gpu.amount`` plus a discovery script).
    """
    from pyspark.ml.torch.distributor import TorchDistributor
    from pyspark.sql import SparkSession

    spark = SparkSession.getActiveSession()
    if use_gpu and local_mode and spark is not None and "gpu" not in spark.sparkContext.resources:
        raise ValueError(
            "use_gpu in local mode, but the Spark driver declares no GPUs: set "
            "spark.driver.resource.gpu.amount and spark.driver.resource.gpu.discoveryScript"
        )
    params = replace(params, use_gpu=use_gpu)
    distributor = TorchDistributor(
        num_processes=num_processes, local_mode=local_mode, use_gpu=use_gpu
    )
    if local_mode:
        with _rank_environment():
            return distributor.run(train_worker, params)
    return distributor.run(train_worker, params)


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


def run_with_restarts(
    params: TrainParams,
    num_processes: int,
    *,
    local_mode: bool = True,
    use_gpu: bool = False,
    max_restarts: int = 3,
) -> dict[str, Any]:
    """``run_distributed``, restarted from the latest epoch checkpoint when a rank dies.

    Rank processes can die mid-epoch (preemption, a lost executor; here 2-rank DDP on CPU used to
    abort with heap corruption, see README). A restart resumes from the last
    checkpoint, which reaches the same weights as an uninterrupted run. ``max_restarts`` counts
    consecutive failures without a new checkpoint, so a long run is not given up for failures
    spread over many epochs.
    """
    failures_without_progress = 0
    while True:
        before = latest_checkpoint(params.out_dir)
        try:
            return run_distributed(params, num_processes, local_mode=local_mode, use_gpu=use_gpu)
        except RuntimeError as error:
            progressed = latest_checkpoint(params.out_dir) != before
            failures_without_progress = 1 if progressed else failures_without_progress + 1
            if failures_without_progress > max_restarts:
                raise
            _log(
                f"training failed ({str(error).splitlines()[0][:200]}); restarting from "
                f"{latest_checkpoint(params.out_dir) or 'the start'} "
                f"({failures_without_progress}/{max_restarts} without progress)"
            )


def _log(message: str) -> None:
    print(message, flush=True)


def _train(params: TrainParams, device: torch.device) -> dict[str, Any]:
    rank, world = dist.get_rank(), dist.get_world_size()
    manifest = read_manifest(params.shards_dir)
    config = model_config(manifest, params)
    files = [str(Path(params.shards_dir) / f) for f in manifest["train_files"]]

    torch.manual_seed(params.seed)
    model = TwoTowerModel(config).to(device)
    # Ranks that share gradients use torch's reference SparseAdam: while hunting a 2-rank heap
    # corruption (README) it ran cleaner than SparseRowAdam, though the crash still recurs. A
    # single rank keeps the faster row-wise update.
    sparse_optimizer = SparseRowAdam if world == 1 else torch.optim.SparseAdam
    sparse_opt = sparse_optimizer(list(model.sparse_parameters()), lr=params.sparse_lr)
    # fused: one kernel for all dense tensors instead of a dozen small ops per step.
    dense_opt = torch.optim.AdamW(
        model.dense_parameters(), lr=params.lr, weight_decay=params.weight_decay, fused=True
    )
    start_epoch, step, history = 0, 0, []
    resumed_from = _resume(params, config, model, sparse_opt, dense_opt)
    if resumed_from is not None:
        start_epoch, step, history = resumed_from
        if rank == 0:
            _log(f"resumed from epoch {start_epoch} (step {step})")

    net, sync_sparse = _distributed(model, device, world)
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
    pair_files = [str(Path(params.shards_dir) / f) for f in manifest.get("pair_files", [])]
    pairs = shard_loader(pair_files, True) if pair_files and config.pair_weight > 0 else None
    epochs = max(params.epochs, math.ceil(params.min_steps / max(len(dataset), 1)))
    validate_every = max(1, math.ceil(epochs / max(params.max_validations, 1)))
    validation = read_validation_set(params.shards_dir, config.num_listings, seed=params.seed)
    features = dataset.layout.listing_features
    if rank == 0:
        _log(
            f"training: world_size {world}, {len(files)} files, {len(dataset)} batches/rank/epoch, "
            f"epochs {start_epoch + 1}..{epochs}, device {device}, "
            f"{len(validation) if validation else 'no'} validation pairs, "
            f"{len(pairs[0]) if pairs else 'no'} listing-pair batches/rank/pass"
        )

    for epoch in range(start_epoch, epochs):
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
                _log(f"epoch {epoch + 1} step {step} loss {loss.item():.4f} examples/s {rate:,.0f}")
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
            _log(
                f"epoch {epoch + 1} done: loss {h['loss']:.4f}, {h['examples']} examples, "
                f"{h['seconds']:.1f}s, examples/s {h['examples_per_s']:,.0f}"
                + (f", validation hit@10 {found:.4f}" if found is not None else "")
            )
            if checkpointed:
                save_atomic(
                    _checkpoint(
                        params, config, model, sparse_opt, dense_opt, epoch + 1, step, history
                    ),
                    checkpoint_path(params.out_dir, epoch + 1),
                )
        # Without this the other ranks' next epoch would start its clock while rank 0 writes.
        dist.barrier()

    best_epoch = _best_epoch(history)
    metrics = _metrics(params, model, history, world, step, resumed_from)
    metrics["best_epoch"] = best_epoch
    metrics["validation_hit_rate_at_10"] = next(
        (h.get("validation_hit_rate_at_10") for h in history if h["epoch"] == best_epoch), None
    )
    if rank == 0:
        if best_epoch != history[-1]["epoch"]:
            state = load_checkpoint(checkpoint_path(params.out_dir, best_epoch))
            model.load_state_dict(state["model"])
            _log(f"keeping epoch {best_epoch}: the best on the validation pairs")
        _write_outputs(params, config, manifest, model, metrics)
    dist.barrier()
    return metrics


def _distributed(
    model: TwoTowerModel, device: torch.device, world: int
) -> tuple[torch.nn.Module, SparseGradientSync | None]:
    """The module the training loop calls (the model itself for one rank, else DDP) and, with
    several ranks, the step that averages the id tables' sparse gradients after ``backward``.

    With one rank there is nothing to synchronise and DDP's hooks and buckets are pure
    overhead. With several, DDP all-reduces the dense gradients (feature embeddings and the
    MLP: small) and ignores the id tables, whose sparse gradients ``SparseGradientSync``
    averages with dense all-gathers: 2-rank runs with DDP's own sparse all-reduce (gloo's)
    intermittently corrupted the heap (README). On GPUs both talk over a gloo group: public
    NCCL builds have no sparse all-reduce.
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
    sync = SparseGradientSync(model.sparse_parameters(), group)
    sync.broadcast_from_rank_zero()
    return net, sync


class SparseGradientSync:
    """Average sparse (COO, row-indexed) gradients across ranks: every rank all-gathers the
    others' touched rows and values, padded to the largest count, and sums duplicates. The same
    arithmetic as DDP's sparse all-reduce, through dense gloo collectives only."""

    def __init__(self, params: list[torch.nn.Parameter], group=None):
        self.params = params
        self.group = group

    def broadcast_from_rank_zero(self) -> None:
        """Start every rank from rank 0's tables, as DDP does for the parameters it manages."""
        with torch.no_grad():
            for p in self.params:
                dist.broadcast(p.data, src=0, group=self.group)

    def __call__(self) -> None:
        world = dist.get_world_size(self.group)
        grads = [self._coalesced(p) for p in self.params]
        counts = torch.tensor([g.indices().shape[1] for g in grads], dtype=torch.int64)
        gathered = [torch.empty_like(counts) for _ in range(world)]
        dist.all_gather(gathered, counts, group=self.group)
        sizes = torch.stack(gathered)  # (world, params)
        for i, (p, grad) in enumerate(zip(self.params, grads, strict=True)):
            most = int(sizes[:, i].max())
            rows = torch.zeros(most, dtype=torch.int64)
            values = torch.zeros((most, *grad.shape[1:]), dtype=grad.dtype)
            n = grad.indices().shape[1]
            rows[:n] = grad.indices()[0].cpu()
            values[:n] = grad.values().cpu()
            all_rows = [torch.empty_like(rows) for _ in range(world)]
            all_values = [torch.empty_like(values) for _ in range(world)]
            dist.all_gather(all_rows, rows, group=self.group)
            dist.all_gather(all_values, values, group=self.group)
            keep = [int(c) for c in sizes[:, i]]
            merged = torch.sparse_coo_tensor(
                torch.cat([r[:c] for r, c in zip(all_rows, keep, strict=True)])[None],
                torch.cat([v[:c] for v, c in zip(all_values, keep, strict=True)]) / world,
                grad.shape,
                # Indices come from coalesced gradients of this very table: in range by
                # construction, so the check would only cost time (and torch warns without it).
                check_invariants=False,
            )
            p.grad = merged.coalesce().to(p.device)

    @staticmethod
    def _coalesced(p: torch.nn.Parameter) -> torch.Tensor:
        if p.grad is None:  # no row of this table in the rank's batch
            return torch.sparse_coo_tensor(
                torch.empty((1, 0), dtype=torch.int64),
                torch.empty((0, *p.shape[1:]), dtype=p.dtype),
                p.shape,
                check_invariants=False,
            )
        return p.grad.coalesce()


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


def _best_epoch(history: list[dict[str, Any]]) -> int:
    """The validated epoch with the best hit@10 (the earliest of equals); the last without."""
    scored = [h for h in history if h.get("validation_hit_rate_at_10") is not None]
    if not scored:
        return int(history[-1]["epoch"])
    best = max(scored, key=lambda h: (h["validation_hit_rate_at_10"], -h["epoch"]))
    return int(best["epoch"])


def _resume(params, config, model, sparse_opt, dense_opt) -> tuple[int, int, list] | None:
    path = latest_checkpoint(params.out_dir)
    if path is None:
        return None
    state = load_checkpoint(path)
    if state.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        raise ValueError(f"{path}: unknown checkpoint format {state.get('format_version')!r}")
    if state["config"] != config.to_dict():
        raise ValueError(
            f"{path} was written for model config {state['config']}, but this run builds "
            f"{config.to_dict()}; use a fresh out_dir or the original parameters"
        )
    model.load_state_dict(state["model"])
    sparse_opt.load_state_dict(state["sparse_optimizer"])
    dense_opt.load_state_dict(state["dense_optimizer"])
    torch.set_rng_state(state["rng"]["torch"])
    if torch.cuda.is_available() and state["rng"].get("cuda"):
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return int(state["epoch"]), int(state["step"]), list(state["history"])


def _checkpoint(params, config, model, sparse_opt, dense_opt, epoch, step, history) -> dict:
    return {
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "epoch": epoch,
        "step": step,
        "config": config.to_dict(),
        "params": asdict(params),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "sparse_optimizer": sparse_opt.state_dict(),
        "dense_optimizer": dense_opt.state_dict(),
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        },
        "history": history,
    }


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


def _write_outputs(params, config, manifest, model, metrics) -> None:
    out = Path(params.out_dir)
    artifact = {
        "format_version": ARTIFACT_FORMAT_VERSION,
        "config": config.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "encodings": manifest.get("encodings", {}),
        "vocab_sizes": {
            "num_users": config.num_users,
            "num_listings": config.num_listings,
            "cardinalities": dict(config.cardinalities),
        },
        "categorical_codes": list(config.code_names),
        "dense_features": list(config.dense_names),
        "manifest_counts": manifest.get("counts", {}),
        "metrics": metrics,
    }
    save_atomic(artifact, out / "model.pt")
    tmp = out / ".metrics.json.tmp"
    tmp.write_text(json.dumps(metrics, indent=2))
    os.replace(tmp, out / "metrics.json")
