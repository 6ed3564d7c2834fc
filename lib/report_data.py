"""What a run's report page shows, and the IO that collects it.

``ReportColumns`` picks the snapshot columns the page uses from the feature spec; ``ReportData``
holds everything the page shows, small enough for the driver. ``gather_report_data`` fills it
with a few small Spark collects (a sample of embeddings, example neighbour lists), the model
artifact's learned tables (``learned_tables``, ``feature_table``) and ``search_info`` reads
what the neighbour stage recorded in its Delta commit. Rendering is ``lib.report``'s.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from lib import delta_io
from lib.evaluation import METHOD_ORDER
from lib.feature_spec import NO_FEATURES, FeatureSpec
from lib.lookup import neighbours_with_features


@dataclass(frozen=True)
class ReportColumns:
    """Which snapshot columns the page uses, from the feature spec: ``group`` (the first
    categorical feature: the 1-D strip and its learned table), ``colours`` (the map's panels:
    two categorical features and a numeric one), ``area`` (a place-like column the listing
    vectors are averaged over: the first shown column that is not a feature, else the second
    categorical) and ``shown`` (the example cards)."""

    group: str | None = None
    colours: tuple[str, ...] = ()
    numeric: str | None = None
    area: str | None = None
    shown: tuple[str, ...] = ()

    @classmethod
    def of(cls, spec: FeatureSpec) -> ReportColumns:
        categorical = [f.column for f in spec.of_kind("categorical")]
        numeric = [f.column for f in spec.of_kind("numeric")]
        features = {f.column for f in spec.features}
        plain = [c for c in spec.shown if c not in features]
        area = plain[0] if plain else (categorical[1] if len(categorical) > 1 else None)
        return cls(
            group=categorical[0] if categorical else None,
            colours=(*categorical[:2], *numeric[:1]),
            numeric=numeric[0] if numeric else None,
            area=area,
            shown=spec.shown,
        )

    @property
    def sampled(self) -> tuple[str, ...]:
        """The columns collected with the sampled embeddings."""
        wanted = [
            *self.colours,
            *([self.group] if self.group else []),
            *([self.area] if self.area else []),
        ]
        return tuple(dict.fromkeys(wanted))


def label(column: str) -> str:
    return column.replace("_", " ")


def ordered_methods(metrics: Mapping[str, Any]) -> list[str]:
    return [m for m in METHOD_ORDER if m in metrics] + sorted(set(metrics) - set(METHOD_ORDER))


@dataclass
class ReportData:
    """Everything the page shows; small enough to hold on the driver."""

    title: str
    run_date: str
    model_version: str | None
    metrics: dict[str, dict[str, float | None]]
    points: pd.DataFrame  # listing_id, is_cold_start, embedding, the ``columns.sampled``
    columns: ReportColumns = field(default_factory=ReportColumns)
    examples: list[dict[str, Any]] = field(default_factory=list)
    group_vectors: tuple[list[str], np.ndarray] | None = None
    area_vectors: tuple[list[str], np.ndarray, str] | None = None
    training: dict[str, Any] = field(default_factory=dict)
    ann: dict[str, Any] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # What the validation split chose: the blend (``lib.blend``) and the tuned baselines.
    validation: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# IO: what the page needs, collected from the run's tables and artifacts


def feature_table(state: Mapping[str, Any], cardinalities: Mapping[str, int], code: str):
    """Rows of the learned embedding table of one categorical feature, or None.

    Handles both layouts the model has had: one shared table with per-feature offsets
    (``feature_embedding``) and one table per feature (``code_embeddings.<i>``).
    """
    names = list(cardinalities)
    if code not in names:
        return None
    if "feature_embedding.weight" in state:
        start = sum(cardinalities[n] for n in names[: names.index(code)])
        table = state["feature_embedding.weight"][start : start + cardinalities[code]]
    else:
        table = state.get(f"code_embeddings.{names.index(code)}.weight")
    return None if table is None else table.detach().cpu().numpy()


def learned_tables(
    artifact_path: str, group: str | None, cell_areas: Mapping[int, str]
) -> tuple[tuple[list[str], np.ndarray] | None, tuple[list[str], np.ndarray, str] | None]:
    """The model's learned embeddings of the ``group`` feature's values and of the geo cells
    (labelled by area).

    ``cell_areas`` maps a geo-cell code to the area most of its listings are in. Code 0 is the
    unknown bucket, so vocabulary entry i is row i + 1.
    """
    from lib.checkpoints import load_artifact  # torch is imported only when a model is shown

    model, meta = load_artifact(artifact_path)
    state, cardinalities = model.state_dict(), dict(meta["config"]["cardinalities"])
    vocabularies = {c["name"]: c.get("vocabulary", []) for c in meta["encodings"].get("codes", [])}
    group_vectors = area_vectors = None
    values = vocabularies.get(group or "", [])
    table = feature_table(state, cardinalities, group) if group else None
    if table is not None and len(values) >= 2:
        group_vectors = (list(values), table[1 : len(values) + 1])
    cells = sorted(c for c in cell_areas if c > 0)
    table = feature_table(state, cardinalities, "geo_cell")
    if table is not None and len(cells) >= 3:
        names = [cell_areas[c] for c in cells]
        area_vectors = (names, table[cells], "learned geo-cell embeddings, labelled by area")
    return group_vectors, area_vectors


def gather_report_data(
    *,
    embeddings: DataFrame,
    neighbours: DataFrame,
    snapshot: DataFrame,
    listing_features: DataFrame,
    metrics: dict[str, dict[str, float | None]],
    title: str,
    run_date: str,
    model_version: str | None,
    artifact_path: str | None = None,
    training: dict[str, Any] | None = None,
    ann: dict[str, Any] | None = None,
    stage_seconds: dict[str, float] | None = None,
    summary: dict[str, Any] | None = None,
    spec: FeatureSpec = NO_FEATURES,
    encoding: Mapping[str, Any] | None = None,
    notes: Sequence[str] = (),
    sample: int = 3000,
    examples: int = 6,
) -> ReportData:
    """Collect a sample of embeddings, example neighbour lists and the learned tables (IO)."""
    columns = ReportColumns.of(spec)
    sampled = [c for c in columns.sampled if c in snapshot.columns]
    points = (
        embeddings.select("listing_id", "embedding", "is_cold_start")
        .join(snapshot.select("listing_id", *sampled), "listing_id", "left")
        .orderBy(F.xxhash64("listing_id"))
        .limit(sample)
        .toPandas()
    )
    picked: list[str] = []
    for cold in (False, True):
        want = examples - examples // 2 if not cold else examples // 2
        chosen = points[points["is_cold_start"] == cold]["listing_id"].head(want)
        picked += chosen.tolist()
    shown = [c for c in columns.shown if c in snapshot.columns]
    rows = neighbours_with_features(
        neighbours.where(F.col("listing_id").isin(picked) & (F.col("rank") <= 5)), snapshot, shown
    ).collect()
    cold_ids = set(points.loc[points["is_cold_start"], "listing_id"])
    cards = []
    for listing_id in picked:
        mine = sorted(
            (r.asDict() for r in rows if r.listing_id == listing_id), key=lambda r: r["rank"]
        )
        if mine:
            query = {c: mine[0][c] for c in shown}
            cards.append(
                {
                    "listing_id": listing_id,
                    "cold": listing_id in cold_ids,
                    "listing": query,
                    "neighbours": [
                        {
                            "listing_id": r["neighbour_id"],
                            "rank": r["rank"],
                            "score": r["score"],
                            "distance_km": r["distance_km"],
                            **{c: r[f"n_{c}"] for c in shown},
                        }
                        for r in mine
                    ],
                }
            )
    group_vectors = area_vectors = None
    if artifact_path and Path(artifact_path).exists():
        code_names = [c["name"] for c in (encoding or {}).get("codes", [])]
        best: dict[int, tuple[int, str]] = {}
        if "geo_cell" in code_names and columns.area in snapshot.columns:
            cell = F.col("codes")[code_names.index("geo_cell")].alias("geo_cell")
            area = F.col(columns.area).cast("string").alias("area")
            cell_rows = (
                listing_features.select("listing_id", cell)
                .join(snapshot.select("listing_id", area).where(area.isNotNull()), "listing_id")
                .groupBy("geo_cell", "area")
                .count()
                .collect()
            )
            for r in cell_rows:
                if r["count"] > best.get(r["geo_cell"], (0, ""))[0]:
                    best[r["geo_cell"]] = (r["count"], r["area"])
        try:
            group_vectors, area_vectors = learned_tables(
                artifact_path, columns.group, {cell: name for cell, (_, name) in best.items()}
            )
        except (ValueError, KeyError) as error:  # an artifact this code cannot read: no panel
            notes = [*notes, f"Learned embedding tables not shown: {error}"]
    return ReportData(
        title=title,
        run_date=run_date,
        model_version=model_version,
        metrics=metrics,
        points=points,
        columns=columns,
        examples=cards,
        group_vectors=group_vectors,
        area_vectors=area_vectors,
        training=training or {},
        ann=ann or {},
        stage_seconds=stage_seconds or {},
        summary=summary or {},
        notes=list(notes),
    )


def search_info(neighbours_table: str, *, run_id: str | None, model_version: str | None) -> dict:
    """What the neighbour stage recorded for this run in its commit (method, k, recall ...)."""
    for entry in delta_io.history(neighbours_table):
        meta = entry.get("metadata") or {}
        if (run_id and meta.get("run_id") == run_id) or (
            model_version and meta.get("model_version") == model_version
        ):
            # Nested values (the stage's full parameter map) are for machines, not the page.
            info = {
                k: v
                for k, v in meta.items()
                if k not in ("run_id", "model_version") and not isinstance(v, dict | list)
            }
            if info.get("method") == "exact" and not any("recall" in k for k in info):
                info["recall (exact search)"] = 1.0
            return {"table version": entry.get("version"), **info}
    return {}
