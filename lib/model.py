"""The two-tower retrieval model: users and listings embedded into one unit-norm space.

The listing tower sees the listing's id embedding plus its encoded features, so a listing that
never appeared in training (cold start) still gets a vector from its features alone; training
drops the id part at random (``id_dropout``) so the tower learns to do without it. This module
knows nothing of files, Spark or distributed training.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class TwoTowerConfig:
    """Everything needed to rebuild a ``TwoTowerModel`` (vocabulary sizes and layer sizes).

    ``cardinalities`` lists ``(code_name, n)`` in the order the listing tower reads the codes;
    codes are in ``[0, n)`` with 0 meaning unknown. A mapping is accepted and frozen into a tuple.
    ``token_fields`` lists ``(name, n, slots)`` per bag-of-tokens feature (amenities, words of a
    description): its ``slots`` codes follow the single codes, in ``[0, n)``, 0 padding.
    """

    num_users: int
    num_listings: int
    cardinalities: tuple[tuple[str, int], ...]
    num_dense: int
    dim: int = 32
    id_dim: int = 32
    feature_dim: int = 8
    hidden: int = 128
    id_dropout: float = 0.3
    temperature: float = 0.05
    dense_names: tuple[str, ...] = field(default=())
    token_fields: tuple[tuple[str, int, int], ...] = field(default=())
    # Weights of the loss terms: user -> listing, listing -> co-interacted listing (one shared
    # listing tower on both sides), and a feature-only vector pulled to its listing's full one.
    user_weight: float = 1.0
    pair_weight: float = 1.0
    align_weight: float = 0.1

    def __post_init__(self) -> None:
        cards = self.cardinalities
        pairs = cards.items() if isinstance(cards, Mapping) else cards
        object.__setattr__(self, "cardinalities", tuple((str(k), int(v)) for k, v in pairs))
        object.__setattr__(self, "dense_names", tuple(str(n) for n in self.dense_names))
        object.__setattr__(
            self,
            "token_fields",
            tuple((str(name), int(n), int(slots)) for name, n, slots in self.token_fields),
        )
        bad_tokens = [t for t in self.token_fields if t[1] < 1 or t[2] < 1]
        if bad_tokens:
            raise ValueError(
                f"TwoTowerConfig.token_fields sizes and slots must be >= 1: {bad_tokens}"
            )
        for name in ("num_users", "num_listings", "dim", "id_dim", "feature_dim", "hidden"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"TwoTowerConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_dense < 0:
            raise ValueError(f"TwoTowerConfig.num_dense must be >= 0, got {self.num_dense}")
        bad = [(k, v) for k, v in self.cardinalities if v < 1]
        if bad:
            raise ValueError(f"TwoTowerConfig.cardinalities must be >= 1: {bad}")
        if self.dense_names and len(self.dense_names) != self.num_dense:
            raise ValueError(
                f"dense_names has {len(self.dense_names)} names but num_dense is {self.num_dense}"
            )
        if not 0.0 <= self.id_dropout < 1.0:
            raise ValueError(f"id_dropout must be in [0, 1), got {self.id_dropout}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        for name in ("user_weight", "pair_weight", "align_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"TwoTowerConfig.{name} must be >= 0, got {getattr(self, name)}")

    @property
    def code_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.cardinalities)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (cardinalities as an ordered name -> size dict)."""
        out = asdict(self)
        out["cardinalities"] = dict(self.cardinalities)
        out["dense_names"] = list(self.dense_names)
        out["token_fields"] = [list(t) for t in self.token_fields]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TwoTowerConfig:
        """Inverse of ``to_dict``; unknown keys are an error rather than silently dropped."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown TwoTowerConfig keys: {unknown}")
        return cls(**dict(data))


class TwoTowerModel(nn.Module):
    """User tower and listing tower; ``forward(batch)`` is the training loss.

    The loss goes through ``forward`` so DistributedDataParallel's gradient hooks see it.
    The id tables are ``sparse=True`` embeddings: their gradients touch only the rows in the
    batch, which a lazy (row-wise) Adam updates and DDP all-reduces as sparse tensors.
    """

    def __init__(self, config: TwoTowerConfig):
        super().__init__()
        self.config = config
        self.user_embedding = nn.Embedding(config.num_users, config.dim, sparse=True)
        # One extra all-zero row that gets no gradient: "id unknown" (cold start or dropped id).
        self.listing_embedding = nn.Embedding(
            config.num_listings + 1, config.id_dim, sparse=True, padding_idx=config.num_listings
        )
        # All categorical features share one table, each code shifted by its feature's offset:
        # one lookup and one backward instead of one per feature (a measurable share of a step).
        sizes = [n for _, n in config.cardinalities]
        # Only the tables a catalogue's features need: DDP refuses parameters no loss uses.
        self.feature_embedding = nn.Embedding(sum(sizes), config.feature_dim) if sizes else None
        offsets = torch.tensor([0, *sizes[:-1]], dtype=torch.long).cumsum(0)
        self.register_buffer("code_offsets", offsets[: len(sizes)], persistent=False)
        self.register_buffer("code_sizes", torch.tensor(sizes, dtype=torch.long), persistent=False)
        # Each bag-of-tokens feature: one table for all of them too, pooled per feature.
        token_sizes = [n for _, n, _ in config.token_fields]
        self.token_embedding = (
            nn.Embedding(sum(token_sizes), config.feature_dim) if token_sizes else None
        )
        token_offsets = torch.tensor([0, *token_sizes[:-1]], dtype=torch.long).cumsum(0)
        slot_offsets = [
            int(token_offsets[f])
            for f, (_, _, slots) in enumerate(config.token_fields)
            for _ in range(slots)
        ]
        slot_sizes = [n for _, n, slots in config.token_fields for _ in range(slots)]
        self.register_buffer(
            "slot_offsets", torch.tensor(slot_offsets, dtype=torch.long), persistent=False
        )
        self.register_buffer(
            "slot_sizes", torch.tensor(slot_sizes, dtype=torch.long), persistent=False
        )
        in_dim = (
            config.id_dim
            + (len(sizes) + len(config.token_fields)) * config.feature_dim
            + config.num_dense
        )
        self.listing_mlp = nn.Sequential(
            nn.Linear(in_dim, config.hidden),
            nn.ReLU(),
            nn.Linear(config.hidden, config.dim),
        )
        self._reset_parameters()

    @property
    def unknown_listing_idx(self) -> int:
        return self.config.num_listings

    def _reset_parameters(self) -> None:
        # Small id vectors: the features dominate the tower at first and ids refine them.
        nn.init.normal_(self.user_embedding.weight, std=self.config.dim**-0.5)
        nn.init.normal_(self.listing_embedding.weight, std=0.1)
        with torch.no_grad():
            self.listing_embedding.weight[self.unknown_listing_idx].zero_()
        for table in (self.feature_embedding, self.token_embedding):
            if table is not None:
                nn.init.normal_(table.weight, std=0.1)

    def sparse_parameters(self) -> list[nn.Parameter]:
        """The id tables (sparse gradients): optimise with a sparse optimizer (lazy Adam)."""
        return [self.user_embedding.weight, self.listing_embedding.weight]

    def sparse_row_bounds(self, batch_size: int, pairs: bool) -> list[int]:
        """The most rows one step's gradient can touch in each id table (``sparse_parameters``
        order), for batches of ``batch_size`` user examples and, with ``pairs``, as many
        listing pairs: one row per lookup at most. A user example looks up its user and its
        listing; a pair its listing and its context (the alignment term reuses the context)."""
        listing_lookups = batch_size * (3 if pairs else 1)
        return [
            min(batch_size, self.config.num_users),
            min(listing_lookups, self.config.num_listings),
        ]

    def dense_parameters(self) -> list[nn.Parameter]:
        """Everything else (feature embeddings, MLP): optimise with AdamW."""
        sparse = {id(p) for p in self.sparse_parameters()}
        return [p for p in self.parameters() if id(p) not in sparse]

    def user_vectors(self, user_idx: torch.Tensor) -> torch.Tensor:
        """``[B] -> [B, dim]`` unit vectors."""
        return F.normalize(self.user_embedding(user_idx), dim=-1)

    def listing_vectors(
        self,
        listing_idx: torch.Tensor,
        codes: torch.Tensor,
        dense: torch.Tensor,
        id_known: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``[B, dim]`` unit vectors; where ``id_known`` is False the id is ignored entirely.

        ``codes`` is ``LongTensor[B, n_codes + n_slots]``: the single codes in
        ``config.code_names`` order, then every token field's slots; ``dense``
        ``FloatTensor[B, num_dense]``. With ``id_known`` all False the vector depends only on
        the features, which is how cold-start listings are embedded.
        """
        n_codes = len(self.code_offsets)
        if codes.shape[-1] != n_codes + len(self.slot_offsets):
            raise ValueError(
                f"codes has {codes.shape[-1]} columns, expected {n_codes} codes and "
                f"{len(self.slot_offsets)} token slots"
            )
        if dense.shape[-1] != self.config.num_dense:
            raise ValueError(
                f"dense has {dense.shape[-1]} columns, expected {self.config.num_dense}"
            )
        codes, tokens = codes[:, :n_codes], codes[:, n_codes:]
        # In one shared table an out-of-range code would silently read another feature's rows.
        out_of_range = (codes < 0) | (codes >= self.code_sizes)
        if bool(out_of_range.any()):
            bad = out_of_range.any(dim=0).nonzero().flatten().tolist()
            names = [self.config.code_names[i] for i in bad]
            raise ValueError(f"codes out of range for {names} (sizes {self.config.cardinalities})")
        if bool(((tokens < 0) | (tokens >= self.slot_sizes)).any()):
            raise ValueError(f"token codes out of range (fields {self.config.token_fields})")
        if id_known is not None:
            listing_idx = torch.where(
                id_known, listing_idx, torch.full_like(listing_idx, self.unknown_listing_idx)
            )
        ids = self.listing_embedding(listing_idx)
        parts = [ids]
        if self.feature_embedding is not None:
            parts.append(_lookup(self.feature_embedding, codes + self.code_offsets).flatten(1))
        parts += self._token_bags(tokens)
        x = torch.cat([*parts, dense.to(ids.dtype)], dim=-1)
        return F.normalize(self.listing_mlp(x), dim=-1)

    def _token_bags(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """Per token field, the mean of its tokens' vectors (zeros when it has none)."""
        if self.token_embedding is None:
            return []
        present = (tokens > 0).to(self.token_embedding.weight.dtype)
        vectors = _lookup(self.token_embedding, tokens + self.slot_offsets) * present[..., None]
        bags, start = [], 0
        for _, _, slots in self.config.token_fields:
            part = slice(start, start + slots)
            count = present[:, part].sum(dim=1, keepdim=True).clamp_min(1.0)
            bags.append(vectors[:, part].sum(dim=1) / count)
            start += slots
        return bags

    def forward(self, batch: Mapping[str, Any]) -> torch.Tensor:
        return self.loss(batch)

    def loss(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """The training loss of a batch of user examples, or of ``{"users": batch, "pairs":
        batch}`` (either may be absent): the weighted sum of the terms, in one forward so
        DistributedDataParallel sees every parameter used once per step."""
        if "users" not in batch and "pairs" not in batch:
            return self.user_loss(batch)
        config = self.config
        total = torch.zeros((), device=self.code_offsets.device)
        if "users" in batch and config.user_weight > 0:
            total = total + config.user_weight * self.user_loss(batch["users"])
        if "pairs" in batch:
            total = total + config.pair_weight * self.pair_loss(batch["pairs"])
            if config.align_weight > 0:
                total = total + config.align_weight * self.alignment_loss(batch["pairs"])
        return total

    def _columns(self, batch: Mapping[str, torch.Tensor]):
        """The distinct listings of a batch as softmax columns: (columns, target, their
        vectors, log counts, log q), ids dropped at random while training."""
        listing_idx = batch["listing_idx"]
        columns, target = torch.unique(listing_idx, return_inverse=True)
        rows = torch.arange(len(listing_idx), device=listing_idx.device)
        first = torch.full_like(columns, len(listing_idx)).scatter_reduce_(
            0, target, rows, reduce="amin"
        )
        vectors = self.listing_vectors(
            columns,
            batch["codes"].index_select(0, first),
            batch["dense"].index_select(0, first),
            self._id_mask(columns),
        )
        log_count = torch.bincount(target, minlength=len(columns)).to(vectors.dtype).log()
        log_q = batch["log_q"].index_select(0, first).to(vectors.dtype)
        return columns, target, vectors, log_count, log_q

    def _id_mask(self, idx: torch.Tensor) -> torch.Tensor | None:
        if self.training and self.config.id_dropout > 0:
            return torch.rand(idx.shape, device=idx.device) >= self.config.id_dropout
        return None

    def pair_loss(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """In-batch sampled softmax over listing pairs (context -> co-interacted listing), the
        same tower on both sides, log-Q corrected, weighted by ``log1p(weight)``.

        The published similarity is the cosine of two listing vectors, so this is the term
        that trains exactly what is published. A context listing is never its own negative.
        """
        columns, target, listings, log_count, log_q = self._columns(batch)
        context = batch["context_idx"]
        queries = self.listing_vectors(
            context, batch["context_codes"], batch["context_dense"], self._id_mask(context)
        )
        rows = torch.arange(len(target), device=target.device)
        logits = torch.addmm(
            (log_count - log_q)[None, :], queries, listings.T, alpha=1 / self.config.temperature
        )
        logits = logits.masked_fill(columns[None, :] == context[:, None], float("-inf"))
        logits = logits.index_put(
            (rows, target), -log_count.index_select(0, target), accumulate=True
        )
        weights = torch.log1p(batch["weight"].to(logits.dtype).clamp_min(0))
        weights = weights / weights.sum().clamp_min(1e-12)
        return (weights * F.cross_entropy(logits, target, reduction="none")).sum()

    def alignment_loss(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """1 - cosine between a listing's feature-only vector and its full vector (held fixed):
        a new listing lands where its warm look-alikes are."""
        context = batch["context_idx"]
        codes, dense = batch["context_codes"], batch["context_dense"]
        known = torch.ones_like(context, dtype=torch.bool)
        full = self.listing_vectors(context, codes, dense, known).detach()
        features_only = self.listing_vectors(context, codes, dense, ~known)
        return (1 - (features_only * full).sum(dim=-1)).mean()

    def user_loss(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """In-batch sampled softmax with log-Q correction, weighted by ``log1p(weight)``.

        Row i's positive is its own listing; every other row's listing is a negative, except
        copies of its own (not negatives). The listing tower runs once per distinct listing:
        a listing seen c times in the batch is one column whose logit gets ``+log c`` (c
        copies, as a negative), minus that again in the rows where it is the positive (one
        copy). This is exactly the loss over all B columns with copies masked, at the cost of
        the distinct listings. ``batch`` holds ``user_idx, listing_idx, codes, dense, weight,
        log_q`` as produced by the shard loader.
        """
        listing_idx = batch["listing_idx"]
        columns, target = torch.unique(listing_idx, return_inverse=True)
        rows = torch.arange(len(listing_idx), device=listing_idx.device)
        # A row that holds each distinct listing (its features and log_q are the same in all).
        first = torch.full_like(columns, len(listing_idx)).scatter_reduce_(
            0, target, rows, reduce="amin"
        )
        id_known = None
        if self.training and self.config.id_dropout > 0:
            id_known = torch.rand(columns.shape, device=columns.device) >= self.config.id_dropout
        users = self.user_vectors(batch["user_idx"])
        listings = self.listing_vectors(
            columns,
            batch["codes"].index_select(0, first),
            batch["dense"].index_select(0, first),
            id_known,
        )
        log_count = torch.bincount(target, minlength=len(columns)).to(users.dtype).log()
        # Subtracting log q undoes the popularity bias of in-batch negatives (Yi et al. 2019).
        log_q = batch["log_q"].index_select(0, first).to(users.dtype)
        weights = torch.log1p(batch["weight"].to(users.dtype).clamp_min(0))
        return weighted_softmax_cross_entropy(
            users,
            listings,
            log_count - log_q,
            -log_count.index_select(0, target),
            target,
            weights / weights.sum().clamp_min(1e-12),
            1 / self.config.temperature,
        )


def _lookup(table: nn.Embedding, idx: torch.Tensor) -> torch.Tensor:
    """``table(idx)`` for a dense table, as a row gather: the same values and gradient, but the
    backward is one ``index_add`` instead of ``embedding_dense_backward`` (about 3x slower on
    CPU for a batch's codes)."""
    return table.weight.index_select(0, idx.reshape(-1)).view(*idx.shape, table.embedding_dim)


def weighted_softmax_cross_entropy(
    users: torch.Tensor,
    listings: torch.Tensor,
    column_bias: torch.Tensor,
    target_bias: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor,
    alpha: float,
) -> torch.Tensor:
    """``Σ_i weight_i · cross_entropy(logits_i, target_i)`` for the logits
    ``alpha · users @ listings.T + column_bias``, plus ``target_bias_i`` on each row's target.

    Plain autograd on purpose. A hand-written ``autograd.Function`` that kept the softmax for
    its backward was faster on CPU, but under DDP with two ranks it crashed with heap corruption
    far more often than this version (2 of 3 runs against 0 of 6), at the time the id tables'
    sparse gradients still went through DDP (docs/design-notes.md).
    """
    rows = torch.arange(len(target), device=target.device)
    logits = torch.addmm(column_bias[None, :], users, listings.T, alpha=alpha)
    logits = logits.index_put((rows, target), target_bias, accumulate=True)
    return (weight * F.cross_entropy(logits, target, reduction="none")).sum()
