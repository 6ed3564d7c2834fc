"""Embedding every listing with the trained model, inside Spark executors."""

from __future__ import annotations

import datetime as dt
import io
from collections.abc import Iterator

import numpy as np
import pandas as pd
from pyspark import Broadcast
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from schemas import listing_embeddings

_EMBEDDING_SCHEMA = "listing_id string, embedding array<float>, is_cold_start boolean"
# One model per Python worker process, reused across the tasks that worker runs.
_MODELS: dict[str, object] = {}


def _model(artifact: Broadcast, model_version: str):
    if model_version not in _MODELS:
        import torch

        from lib.checkpoints import load_artifact

        torch.set_num_threads(1)  # one worker per core already
        _MODELS.clear()
        _MODELS[model_version], _ = load_artifact(io.BytesIO(artifact.value))
    return _MODELS[model_version]


def _matrix(column: pd.Series, dtype) -> np.ndarray:
    """A column of equal-length arrays as a ``[rows, width]`` matrix (width 0 allowed)."""
    if len(column) == 0:
        return np.zeros((0, 0), dtype)
    return np.stack([np.asarray(v, dtype) for v in column]).reshape(len(column), -1)


def _embed_batches(artifact: Broadcast, model_version: str, batch_size: int):
    def embed(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        import torch

        model = _model(artifact, model_version)
        for pdf in batches:
            for start in range(0, len(pdf), batch_size):
                part = pdf.iloc[start : start + batch_size]
                codes = np.hstack(
                    [_matrix(part["codes"], np.int64), _matrix(part["tokens"], np.int64)]
                )
                with torch.inference_mode():
                    vectors = model.listing_vectors(
                        torch.as_tensor(part["listing_idx"].to_numpy(np.int64)),
                        torch.as_tensor(codes),
                        torch.as_tensor(_matrix(part["dense"], np.float32)),
                        id_known=torch.as_tensor(part["has_interactions"].to_numpy(bool)),
                    ).numpy()
                yield pd.DataFrame(
                    {
                        "listing_id": part["listing_id"].to_numpy(),
                        "embedding": list(vectors.astype(np.float32)),
                        "is_cold_start": ~part["has_interactions"].to_numpy(bool),
                    }
                )

    return embed


def embed_listings(
    listing_features: DataFrame,
    artifact: Broadcast,
    *,
    model_version: str,
    run_date: dt.date,
    batch_size: int = 4096,
) -> DataFrame:
    """Embed every active listing into the ``listing_embeddings`` contract.

    ``artifact`` is the broadcast bytes of ``model.pt``: executors rebuild the model from it
    alone, once per Python worker. Listings without training interactions are embedded from
    their features only (``is_cold_start``).
    """
    active = listing_features.where(F.col("is_active"))
    embedded = active.mapInPandas(
        _embed_batches(artifact, model_version, batch_size), _EMBEDDING_SCHEMA
    )
    return embedded.select(
        "listing_id",
        "embedding",
        F.lit(model_version).alias("model_version"),
        "is_cold_start",
        F.lit(run_date).alias("run_date"),
    ).select(*listing_embeddings.SCHEMA.fieldNames())
