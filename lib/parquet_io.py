"""Plain-Parquet IO for the pipeline's intermediate data (shards, vocabularies, holdout).

Published tables go through ``lib.delta_io``; these intermediates live in a run's work directory,
are written once and swapped in whole, so they need no transaction log.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from pyspark.sql import DataFrame, SparkSession

from lib.schema_check import check_matches, conform
from schemas import TableSpec


def write_parquet(
    df: DataFrame,
    path: str | os.PathLike,
    spec: TableSpec,
    *,
    row_group_bytes: int | None = None,
) -> None:
    """Check ``df`` against ``spec`` and write it as Parquet at ``path`` (replacing it)."""
    check_matches(df, spec)
    writer = df.write.mode("overwrite")
    if row_group_bytes:
        writer = writer.option("parquet.block.size", str(row_group_bytes))
    writer.parquet(str(path))


def read_parquet(spark: SparkSession, path: str | os.PathLike, spec: TableSpec) -> DataFrame:
    """Read Parquet written by ``write_parquet`` (or anyone) and apply ``spec``."""
    return conform(spark.read.schema(spec.schema).parquet(str(path)), spec)


def parquet_files(path: str | os.PathLike) -> list[str]:
    """Data files under ``path``, relative to it, sorted (Spark's ``part-*`` naming)."""
    root = Path(path)
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.parquet"))


class StagedDirectory:
    """Build a directory beside its final place and swap it in only when complete.

    A run that fails leaves the previous directory exactly as it was; the half-built one is
    removed. (On object stores, which cannot rename directories, point runs at a fresh path.)
    """

    def __init__(self, final_path: str | os.PathLike):
        self.final = Path(final_path)
        self.staging = self.final.with_name(f".{self.final.name}.staging-{uuid.uuid4().hex[:8]}")

    def __enter__(self) -> Path:
        self.staging.mkdir(parents=True)
        return self.staging

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            return
        old = self.final.with_name(f".{self.final.name}.old-{uuid.uuid4().hex[:8]}")
        if self.final.exists():
            self.final.rename(old)
        self.staging.rename(self.final)
        shutil.rmtree(old, ignore_errors=True)


def write_json(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Write JSON atomically (temp file + rename) so a reader never sees half a file."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))
    tmp.replace(target)


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    return json.loads(Path(path).read_text())
