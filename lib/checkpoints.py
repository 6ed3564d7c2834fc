"""What training writes to disk and reads back: epoch checkpoints and the model artifact.

Rank 0 checkpoints the model, both optimizers, the RNG state and the epoch history
(``checkpoint``, ``checkpoint_path``); a restarted run ``resume``s from the latest one and
reaches the same weights as an uninterrupted run. At the end ``write_outputs`` writes
``model.pt`` (weights, config, encodings, metrics: enough to rebuild the model alone with
``load_artifact``) and ``metrics.json``. Files are replaced atomically (``save_atomic``) and
read with ``weights_only=True``; the format versions say which layout a file has.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from lib.model import TwoTowerConfig, TwoTowerModel

# 2: one shared feature-embedding table (was one table per code), SparseRowAdam state.
ARTIFACT_FORMAT_VERSION = 2
CHECKPOINT_FORMAT_VERSION = 2
_CHECKPOINT_RE = re.compile(r"^epoch-(\d{3,})\.pt$")


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


def resume(params, config, model, sparse_opt, dense_opt) -> tuple[int, int, list] | None:
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


def checkpoint(params, config, model, sparse_opt, dense_opt, epoch, step, history) -> dict:
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


def write_outputs(params, config, manifest, model, metrics) -> None:
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
