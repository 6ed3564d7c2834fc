"""The ``runs`` table: one row per pipeline run, success or failure."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from pyspark.sql import DataFrame, SparkSession

from schemas import runs


@dataclass
class RunRecord:
    run_id: str
    run_date: dt.date
    started_at: dt.datetime
    model_version: str | None = None
    status: str = "running"
    finished_at: dt.datetime | None = None
    input_versions: dict[str, str] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    parameters: dict[str, str] = field(default_factory=dict)
    error: str | None = None


def run_row(spark: SparkSession, record: RunRecord) -> DataFrame:
    """A one-row DataFrame in the ``runs`` contract."""
    finished = record.finished_at or dt.datetime.now(dt.UTC).replace(tzinfo=None)
    row = (
        record.run_id,
        record.run_date,
        record.model_version,
        record.status,
        record.started_at,
        finished,
        dict(record.input_versions),
        {k: int(v) for k, v in record.counts.items() if v is not None},
        {k: float(v) for k, v in record.stage_seconds.items()},
        {k: float(v) for k, v in record.metrics.items() if v is not None},
        {k: str(v) for k, v in record.parameters.items()},
        record.error,
    )
    return spark.createDataFrame([row], runs.SCHEMA)


NEIGHBOUR_QUALITY = ("recall_at_k", "coverage", "distinct_neighbour_share")


def neighbour_quality(measured: dict) -> dict[str, float]:
    """The neighbour search's measured quality as ``runs.metrics`` entries
    (``neighbours.recall_at_k`` ...), from the stage's result or its commit metadata."""
    return {
        f"neighbours.{name}": float(measured[name])
        for name in NEIGHBOUR_QUALITY
        if measured.get(name) is not None
    }
