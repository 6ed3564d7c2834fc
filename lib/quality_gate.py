"""The gate between computing neighbours and publishing them.

A run is refused, before anything is written, when its measured recall@k is below
``min_recall`` or when its coverage (share of listings with all k neighbours) fell by more than
``max_coverage_drop`` (absolute share, e.g. 0.05 = five points) against the last published run.
The last published run's figures come from the table's own commit metadata, so the gate needs
no other state.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pyspark.sql import DataFrame

from lib import delta_io
from schemas import TableSpec


@dataclass(frozen=True)
class GateConfig:
    min_recall: float = 0.90
    # None: coverage is not compared with the previous run.
    max_coverage_drop: float | None = 0.05


class QualityGateError(RuntimeError):
    """The run failed the gate; nothing was published."""

    def __init__(self, table: str, problems: list[str], metrics: Mapping[str, Any] | None = None):
        self.table = table
        self.problems = problems
        # What was measured, so the caller can record why the run was refused.
        self.metrics = dict(metrics or {})
        super().__init__(
            f"quality gate refused to publish {table}: "
            + "; ".join(problems)
            + " (the published table is unchanged)"
        )


def last_published(table_path: str, *, search_depth: int = 50) -> dict[str, Any] | None:
    """Commit metadata of the newest commit that published a run (one that recorded a
    ``coverage``), or None when the table does not exist or has none."""
    if not delta_io.table_exists(table_path):
        return None
    for entry in delta_io.history(table_path, limit=search_depth):
        metadata = entry.get("metadata") or {}
        if metadata.get("coverage") is not None:
            return {**metadata, "version": entry.get("version")}
    return None


def problems(
    metrics: Mapping[str, Any], *, previous: Mapping[str, Any] | None, config: GateConfig
) -> list[str]:
    """Why ``metrics`` (``recall_at_k``, ``coverage``) must not be published; empty when fine."""
    found = []
    recall = metrics.get("recall_at_k")
    if recall is None:
        found.append("recall@k could not be measured (no sampled queries)")
    elif recall < config.min_recall:
        found.append(f"recall@k {recall:.4f} is below the minimum {config.min_recall:.4f}")
    coverage = metrics.get("coverage")
    if coverage is None:
        found.append("coverage was not measured")
    elif config.max_coverage_drop is not None and previous is not None:
        before = previous.get("coverage")
        if before is not None and float(before) - coverage > config.max_coverage_drop:
            found.append(
                f"coverage {coverage:.4f} dropped by {float(before) - coverage:.4f} from "
                f"{float(before):.4f} (run {previous.get('run_id')}), more than the allowed "
                f"{config.max_coverage_drop:.4f}"
            )
    return found


def enforce(
    metrics: Mapping[str, Any],
    *,
    previous: Mapping[str, Any] | None,
    config: GateConfig,
    table: str,
) -> None:
    """Raise ``QualityGateError`` listing every problem when the run fails the gate."""
    found = problems(metrics, previous=previous, config=config)
    if found:
        raise QualityGateError(table, found, metrics)


def publish(
    df: DataFrame,
    path: str,
    spec: TableSpec,
    *,
    metrics: Mapping[str, Any],
    config: GateConfig,
    replace_partition: dict[str, str],
    commit_metadata: Mapping[str, Any],
    sort_within_files_by: Sequence[str] = (),
    keep_last: int | None = None,
    vacuum_hours: float | None = None,
) -> dict[str, Any]:
    """Gate ``metrics`` against the last published run, then replace ``replace_partition`` of the
    table with ``df`` in one commit whose metadata carries ``commit_metadata`` and ``metrics``,
    then apply retention (``delta_io.apply_retention``: keep the last ``keep_last`` partitions,
    vacuum after ``vacuum_hours``). A refused run raises ``QualityGateError`` before anything is
    written. Returns ``table_version``, ``previous_coverage``, ``retired`` (partition values
    removed), ``vacuumed_files`` and ``stale_staging_files``."""
    previous = last_published(path)
    enforce(metrics, previous=previous, config=config, table=spec.name)
    version = delta_io.write_table(
        df,
        path,
        spec,
        mode="overwrite",
        replace_partition=replace_partition,
        commit_metadata={**commit_metadata, **metrics},
        sort_within_files_by=sort_within_files_by,
    )
    retention = delta_io.apply_retention(
        df.sparkSession, path, spec, keep_last=keep_last, vacuum_hours=vacuum_hours
    )
    return {
        "table_version": version,
        "previous_coverage": (previous or {}).get("coverage"),
        "retired": retention["removed"],
        "vacuumed_files": retention["vacuumed"],
        "stale_staging_files": retention["stale_staging_files"],
    }
