"""Which training epoch to keep: the model's own neighbour lists scored on the validation pairs.

The shard stage writes the validation days' pairs (query listing → next listing of the same
user, by index) beside the training examples, which end before those days. Rank 0 embeds every
active listing after selected epochs and measures hit@10 of a bounded sample of those pairs; the
artifact keeps the best epoch's weights, so a small data set can run many epochs without
overfitting and a large one stops paying for epochs that no longer help.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from lib.loader import ListingFeatures
from lib.model import TwoTowerModel

VALIDATION_PAIRS = "validation_pairs"
HIT_AT = 10


@dataclass(frozen=True)
class ValidationSet:
    """Sampled validation pairs and the active catalogue they are scored against."""

    queries: torch.Tensor  # int64 [q] listing indices
    targets: torch.Tensor  # int64 [q]
    active: torch.Tensor  # int64 [n_active] listing indices that may be neighbours
    known: torch.Tensor  # bool [num_listings]: the listing has training interactions

    def __len__(self) -> int:
        return len(self.queries)


def read_validation_set(
    shards_dir: str | Path, num_listings: int, *, max_pairs: int = 2_000, seed: int = 7
) -> ValidationSet | None:
    """The shards' validation pairs (at most ``max_pairs``, a seeded sample), or None when the
    shards have none."""
    root = Path(shards_dir)
    path = root / VALIDATION_PAIRS
    if not path.exists():
        return None
    pairs = pq.read_table(path, columns=["query_idx", "target_idx"])
    if pairs.num_rows == 0:
        return None
    keep = np.random.default_rng(seed).permutation(pairs.num_rows)[:max_pairs]
    table = pq.read_table(
        root / "listing_features", columns=["listing_idx", "is_active", "has_interactions"]
    )
    idx = table.column("listing_idx").to_numpy()
    known = np.zeros(num_listings, dtype=bool)
    known[idx] = table.column("has_interactions").to_numpy(zero_copy_only=False)
    active = idx[table.column("is_active").to_numpy(zero_copy_only=False)]
    return ValidationSet(
        queries=torch.as_tensor(pairs.column("query_idx").to_numpy()[keep], dtype=torch.long),
        targets=torch.as_tensor(pairs.column("target_idx").to_numpy()[keep], dtype=torch.long),
        active=torch.as_tensor(np.sort(active), dtype=torch.long),
        known=torch.as_tensor(known),
    )


@torch.no_grad()
def validation_hit_rate(
    model: TwoTowerModel,
    features: ListingFeatures,
    validation: ValidationSet,
    *,
    device: torch.device,
    block: int = 8_192,
) -> float:
    """Share of validation pairs whose target is among the query's top-10 cosine neighbours
    (self excluded) in the model's embedding, cold listings embedded from features alone."""
    was_training = model.training
    model.eval()
    try:

        def vectors(idx: torch.Tensor) -> torch.Tensor:
            return model.listing_vectors(
                idx.to(device),
                features.codes[idx].long().to(device),
                features.dense[idx].to(device),
                id_known=validation.known[idx].to(device),
            )

        queries = vectors(validation.queries)
        best = torch.full((len(queries), HIT_AT), -torch.inf, device=device)
        best_idx = torch.full((len(queries), HIT_AT), -1, dtype=torch.long, device=device)
        for start in range(0, len(validation.active), block):
            candidates = validation.active[start : start + block]
            scores = queries @ vectors(candidates).T
            own = validation.queries.to(device)[:, None] == candidates.to(device)[None, :]
            scores = scores.masked_fill(own, -torch.inf)
            merged = torch.cat([best, scores], dim=1)
            ids = torch.cat([best_idx, candidates.to(device).expand(len(queries), -1)], dim=1)
            best, at = merged.topk(min(HIT_AT, merged.shape[1]), dim=1)
            best_idx = ids.gather(1, at)
        hits = (best_idx == validation.targets.to(device)[:, None]).any(dim=1)
        return float(hits.float().mean())
    finally:
        model.train(was_training)
