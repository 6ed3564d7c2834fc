"""One static HTML page per run: metrics versus baselines and what the embedding learned.

``gather_report_data`` is the IO half (a few small Spark collects and the model artifact);
``render_report`` is pure: matplotlib figures become base64 PNGs inside the page, so the file
works offline, from a mail attachment or an object store, with no JavaScript.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from lib import delta_io
from lib.evaluation import METHOD_ORDER
from lib.feature_spec import NO_FEATURES, FeatureSpec
from lib.lookup import format_value, neighbours_with_features
from schemas import listing_embeddings, listing_neighbours


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


_TOP_CATEGORIES = 10
_PALETTE = colormaps["tab10"].colors


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
    from lib.training import load_artifact  # torch is imported only when a model is shown

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


def report_for_run(
    spark: SparkSession,
    *,
    embeddings_table: str,
    neighbours_table: str,
    model_dir: str,
    run_date: dt.date,
    snapshot: DataFrame,
    listing_features: DataFrame,
    metrics: dict[str, dict[str, float | None]],
    out_path: str,
    run_id: str | None = None,
    stage_seconds: Mapping[str, float] | None = None,
    title: str = "Listing similarity",
    spec: FeatureSpec = NO_FEATURES,
    encoding: Mapping[str, Any] | None = None,
    notes: Sequence[str] = (),
    validation: Mapping[str, Any] | None = None,
) -> str:
    """Read one run's tables and artifacts, render its page to ``out_path``; return the path."""
    day = {"run_date": run_date.isoformat()}
    embeddings = delta_io.read_table(
        spark, embeddings_table, listing_embeddings.SPEC, partition=day
    )
    neighbours = delta_io.read_table(
        spark, neighbours_table, listing_neighbours.SPEC, partition=day
    )
    model_version = Path(model_dir).name
    metrics_path = Path(model_dir) / "metrics.json"
    training = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    if not stage_seconds:
        # Run outside the pipeline: the stages' own records are all there is.
        epochs = training.get("epochs") or []
        stage_seconds = (
            {"train (epochs)": sum(e.get("seconds", 0.0) for e in epochs)} if epochs else {}
        )
    counts = listing_features.agg(
        F.sum(F.col("is_active").cast("long")).alias("active_listings"),
        F.sum((F.col("is_active") & ~F.col("has_interactions")).cast("long")).alias(
            "cold_listings"
        ),
    ).first()
    model = metrics.get("model", {})
    summary = {
        "active listings": counts["active_listings"],
        "cold-start listings": counts["cold_listings"],
        "held-out pairs": model.get("pairs"),
        "warm pairs": model.get("pairs_warm"),
        "cold pairs": model.get("pairs_cold"),
        "stability vs previous run": model.get(f"stability_overlap_at_{10}"),
    }
    data = gather_report_data(
        embeddings=embeddings,
        neighbours=neighbours,
        snapshot=snapshot,
        listing_features=listing_features,
        metrics=metrics,
        title=title,
        run_date=run_date.isoformat(),
        model_version=model_version,
        artifact_path=str(Path(model_dir) / "model.pt"),
        training=training,
        ann=search_info(neighbours_table, run_id=run_id, model_version=model_version),
        stage_seconds=dict(stage_seconds),
        summary={k: v for k, v in summary.items() if v is not None},
        spec=spec,
        encoding=encoding,
        notes=notes,
    )
    data.validation = dict(validation or {})
    return write_report(out_path, render_report(data))


def write_report(path: str, page: str) -> str:
    """Write the page atomically (temp file + rename); return its path."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(target)
    return str(target)


# ---------------------------------------------------------------------------------------------
# Pure: figures and HTML


def pca(vectors: np.ndarray, components: int = 2) -> np.ndarray:
    """Project rows onto their first principal components (numpy SVD, no extra package)."""
    centred = vectors - vectors.mean(axis=0, keepdims=True)
    if len(centred) < 2:
        return np.zeros((len(centred), components))
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    projected = centred @ vt[:components].T
    if projected.shape[1] < components:  # fewer dimensions than asked: pad with zeros
        projected = np.pad(projected, ((0, 0), (0, components - projected.shape[1])))
    return projected


def _png(fig) -> str:
    buffer = io.BytesIO()
    # Figure objects without pyplot: no global state, no display backend, nothing to close.
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _img(encoded: str, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{encoded}">'


def _methods(metrics: Mapping[str, Any]) -> list[str]:
    return [m for m in METHOD_ORDER if m in metrics] + sorted(set(metrics) - set(METHOD_ORDER))


def _hit_rate_figure(metrics: Mapping[str, Mapping[str, float | None]]) -> str:
    methods = _methods(metrics)
    fig = Figure(figsize=(9, 3.4))
    ax = fig.subplots()
    width = 0.27
    for i, (suffix, label) in enumerate((("", "all"), ("_warm", "warm"), ("_cold", "cold"))):
        found = [metrics[m].get(f"hit_rate_at_10{suffix}") for m in methods]
        values = [np.nan if v is None else v for v in found]
        x = np.arange(len(methods)) + (i - 1) * width
        ax.bar(x, values, width, label=f"{label} pairs", color=_PALETTE[i])
        for xi, value in zip(x, found, strict=True):
            text = "n/a" if value is None else f"{value:.2f}"
            ax.annotate(text, (xi, value or 0.0), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(np.arange(len(methods)), methods)
    ax.set_ylabel("hit-rate@10")
    ax.set_title("Held-out next listing found among the top 10 neighbours")
    ax.legend(frameon=False, fontsize=8)
    ax.spines[["top", "right"]].set_visible(False)
    return _png(fig)


def _categorical_colours(values: pd.Series) -> tuple[list, list[tuple[str, tuple]]]:
    counts = values.fillna("(none)").value_counts()
    top = list(counts.index[:_TOP_CATEGORIES])
    lookup = {v: _PALETTE[i % len(_PALETTE)] for i, v in enumerate(top)}
    grey = (0.75, 0.75, 0.75)
    colours = [lookup.get(v, grey) for v in values.fillna("(none)")]
    legend = [(str(v), lookup[v]) for v in top]
    if len(counts) > len(top):
        legend.append(("other", grey))
    return colours, legend


def _map_figure(points: pd.DataFrame, coords: np.ndarray, columns: ReportColumns) -> str:
    """One PCA panel per colouring column (none: one plain panel), cold listings circled."""
    panels = [c for c in columns.colours if c in points and points[c].notna().any()] or [None]
    fig = Figure(figsize=(5.2 * len(panels), 4.6))
    axes = fig.subplots(1, len(panels), squeeze=False)
    cold = points["is_cold_start"].to_numpy(bool)
    for ax, column in zip(axes[0], panels, strict=True):
        if column is None:
            ax.scatter(coords[:, 0], coords[:, 1], s=6, color=_PALETTE[0], linewidths=0)
            ax.set_title("listing vectors")
        elif column == columns.numeric:
            values = points[column].astype(float)
            positive = bool((values.dropna() > 0).all())
            shade = np.log10(values.clip(lower=1e-9)) if positive else values
            scatter = ax.scatter(
                coords[:, 0], coords[:, 1], c=shade, s=6, cmap="viridis", linewidths=0
            )
            bar = fig.colorbar(scatter, ax=ax, shrink=0.8)
            bar.set_label(f"log10 {label(column)}" if positive else label(column))
        else:
            colours, legend = _categorical_colours(points[column].astype("string"))
            ax.scatter(coords[:, 0], coords[:, 1], c=colours, s=6, linewidths=0)
            handles = [
                Line2D([], [], marker="o", ls="", color=c, label=name[:22]) for name, c in legend
            ]
            ax.legend(
                handles=handles, fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1, 1)
            )
        if cold.any():
            ax.scatter(
                coords[cold, 0],
                coords[cold, 1],
                s=18,
                facecolors="none",
                edgecolors="black",
                linewidths=0.6,
                label="cold start",
            )
        if column is not None:
            ax.set_title(f"coloured by {label(column)}")
        ax.set_xticks([])
        ax.set_yticks([])
    return _png(fig)


def group_axis(vectors: np.ndarray, groups: pd.Series, min_size: int = 3) -> np.ndarray:
    """Positions of all rows on the direction that spreads the group centroids most.

    That is the first principal component of the (size-weighted) centroids of the groups with
    at least ``min_size`` rows: the one line along which the groups differ most.
    """
    keys = groups.astype("string").fillna("(none)").to_numpy()
    names, counts = np.unique(keys, return_counts=True)
    names = names[counts >= min_size] if (counts >= min_size).sum() >= 2 else names
    centroids = np.stack([vectors[keys == n].mean(axis=0) for n in names])
    weights = np.array([(keys == n).sum() for n in names], dtype=float)
    centre = np.average(centroids, axis=0, weights=weights)
    spread = (centroids - centre) * np.sqrt(weights)[:, None]
    if len(names) < 2 or not np.any(spread):
        return pca(vectors, 1)[:, 0]
    _, _, vt = np.linalg.svd(spread, full_matrices=False)
    return (vectors - centre) @ vt[0]


def _strip_figure(points: pd.DataFrame, position: np.ndarray, group: str) -> str:
    frame = pd.DataFrame({"group": points[group].astype("string").fillna("(none)"), "x": position})
    counts = frame["group"].value_counts()
    keep = [g for g in counts.index[:25] if counts[g] >= 3] or list(counts.index[:25])
    order = frame[frame["group"].isin(keep)].groupby("group")["x"].median().sort_values()
    fig = Figure(figsize=(9, 0.28 * len(order) + 1.2))
    ax = fig.subplots()
    rng = np.random.default_rng(0)
    for row, value in enumerate(order.index):
        xs = frame.loc[frame["group"] == value, "x"].to_numpy()
        jitter = row + rng.uniform(-0.18, 0.18, len(xs))
        colour = _PALETTE[row % len(_PALETTE)]
        ax.scatter(xs, jitter, s=4, alpha=0.35, color=colour, linewidths=0)
        ax.plot([np.median(xs)], [row], marker="|", markersize=14, color="black")
    ax.set_yticks(range(len(order)), [str(g)[:28] for g in order.index], fontsize=8)
    name = label(group)
    ax.set_xlabel(f"position on the one direction of the embedding that separates {name} most")
    ax.set_title(f"1-D projection of every listing, one row per {name} (| = median)")
    ax.spines[["top", "right"]].set_visible(False)
    return _png(fig)


def _table_figure(vectors: tuple, title: str) -> str:
    names, matrix = vectors[0], np.asarray(vectors[1], dtype=float)
    coords = pca(matrix)
    fig = Figure(figsize=(6, 5))
    ax = fig.subplots()
    ax.scatter(coords[:, 0], coords[:, 1], s=14, color=_PALETTE[0])
    for (x, y), name in zip(coords, names, strict=True):
        ax.annotate(str(name)[:20], (x, y), fontsize=7, xytext=(2, 2), textcoords="offset points")
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    return _png(fig)


def _area_centroids(
    points: pd.DataFrame, vectors: np.ndarray, area: str
) -> tuple[list[str], np.ndarray]:
    areas = points[area].astype("string").fillna("(none)").to_numpy()
    names = list(pd.Series(areas).value_counts().index[:40])
    return names, np.stack([vectors[areas == a].mean(axis=0) for a in names])


def _loss_figure(training: Mapping[str, Any]) -> str | None:
    losses = training.get("loss_per_epoch") or [e.get("loss") for e in training.get("epochs", [])]
    losses = [x for x in losses if x is not None]
    if not losses:
        return None
    fig = Figure(figsize=(5, 3))
    ax = fig.subplots()
    ax.plot(range(1, len(losses) + 1), losses, marker="o", color=_PALETTE[0])
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss")
    ax.set_title("Sampled-softmax loss per epoch")
    ax.spines[["top", "right"]].set_visible(False)
    return _png(fig)


def _timings_figure(stage_seconds: Mapping[str, float]) -> str | None:
    if not stage_seconds:
        return None
    names = list(stage_seconds)
    fig = Figure(figsize=(5, 0.4 * len(names) + 1))
    ax = fig.subplots()
    ax.barh(names, [stage_seconds[n] for n in names], color=_PALETTE[2])
    for i, n in enumerate(names):
        ax.annotate(f" {stage_seconds[n]:.1f}s", (stage_seconds[n], i), va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.set_title("Stage timings")
    ax.spines[["top", "right"]].set_visible(False)
    return _png(fig)


def _format(value: Any, digits: int = 3) -> str:
    """Metric-style text: a dash for missing, thousands separators for counts."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool | str):
        return html.escape(str(value))
    if isinstance(value, int) or (digits == 0 and float(value).is_integer()):
        return f"{int(value):,}"
    return f"{value:,.{digits}f}"


def _feature(value: Any) -> str:
    return html.escape(format_value(value))


# (metric key, column header, higher is better?) for the comparison table.
_TABLE_COLUMNS = (
    ("hit_rate_at_5", "hit@5", True),
    ("hit_rate_at_10", "hit@10", True),
    ("hit_rate_at_20", "hit@20", True),
    ("hit_rate_at_10_warm", "hit@10 warm", True),
    ("hit_rate_at_10_cold", "hit@10 cold", True),
    ("mrr_at_10", "MRR@10", True),
    ("mrr_at_10_warm", "MRR@10 warm", True),
    ("mrr_at_10_cold", "MRR@10 cold", True),
    ("coverage_at_10", "coverage@10", None),
    ("popularity_rank_ratio_at_10", "popularity rank ratio", None),
    ("median_distance_km", "median km", None),
)


def _coherence_columns(metrics: Mapping[str, Mapping[str, float | None]]) -> list[tuple]:
    """``same_<column>_share`` and ``median_<column>_ratio``: whatever the spec declared."""
    keys = sorted({k for m in metrics.values() for k in m})
    same = [
        (k, f"same {label(k[5:-6])}", None)
        for k in keys
        if k.startswith("same_") and k.endswith("_share")
    ]
    ratio = [
        (k, f"{label(k[7:-6])} ratio", None)
        for k in keys
        if k.startswith("median_") and k.endswith("_ratio")
    ]
    return same + ratio


def _metrics_table(metrics: Mapping[str, Mapping[str, float | None]]) -> str:
    methods = _methods(metrics)
    columns = [
        c
        for c in (*_TABLE_COLUMNS, *_coherence_columns(metrics))
        if any(metrics[m].get(c[0]) is not None for m in methods)
    ]
    header = "".join(f"<th>{html.escape(title)}</th>" for _, title, _ in columns)
    best = {}
    for key, _, higher in columns:
        values = [metrics[m].get(key) for m in methods if metrics[m].get(key) is not None]
        if higher and values:
            best[key] = max(values)
    rows = []
    for m in methods:
        cells = []
        for key, _, _ in columns:
            value = metrics[m].get(key)
            text = _format(value)
            if key in best and value is not None and value == best[key]:
                text = f"<b>{text}</b>"
            cells.append(f"<td>{text}</td>")
        cls = ' class="model"' if m == "model" else ""
        rows.append(f"<tr{cls}><th>{html.escape(m)}</th>{''.join(cells)}</tr>")
    return f"<table class='metrics'><tr><th>method</th>{header}</tr>{''.join(rows)}</table>"


def shortfalls(metrics: Mapping[str, Mapping[str, float | None]]) -> list[str]:
    """Plain sentences for every headline number where a baseline beats the model."""
    model = metrics.get("model", {})
    found = []
    for key, title in (
        ("hit_rate_at_10_warm", "warm hit-rate@10"),
        ("hit_rate_at_10_cold", "cold hit-rate@10"),
        ("mrr_at_10_warm", "warm MRR@10"),
        ("mrr_at_10_cold", "cold MRR@10"),
    ):
        ours = model.get(key)
        if ours is None:
            continue
        for method in _methods(metrics):
            theirs = metrics[method].get(key)
            if method != "model" and theirs is not None and theirs > ours:
                found.append(f"{method} beats the model on {title}: {theirs:.3f} vs {ours:.3f}")
    return found


def _card(example: Mapping[str, Any], shown: Sequence[str]) -> str:
    def describe(item: Mapping[str, Any]) -> str:
        parts = []
        for c in shown:
            value = item.get(c)
            if value is not None:
                parts.append(f"<span><i>{html.escape(label(c))}</i> {_feature(value)}</span>")
        return " ".join(parts)

    tag = "cold start" if example["cold"] else "warm"
    items = "".join(
        f"<li><b>{n['rank']}. {html.escape(str(n['listing_id']))}</b>"
        f"<span class='meta'>score {_format(n['score'])} · {_format(n['distance_km'], 1)} km</span>"
        f"<br>{describe(n)}</li>"
        for n in example["neighbours"]
    )
    return (
        f"<div class='card'><div class='head'><b>{html.escape(str(example['listing_id']))}</b>"
        f" <span class='tag {tag.split()[0]}'>{tag}</span><br>{describe(example['listing'])}</div>"
        f"<ol>{items}</ol></div>"
    )


_STYLE = """
body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:24px auto;max-width:1240px;
color:#222;padding:0 16px;line-height:1.4}
h1{margin-bottom:0}h2{margin-top:32px;border-bottom:1px solid #ddd;padding-bottom:4px}
.sub{color:#666;margin-top:4px}img{max-width:100%}
table.metrics{border-collapse:collapse;font-size:13px;margin:8px 0}
table.metrics td,table.metrics th{border:1px solid #ddd;padding:4px 7px;text-align:right}
table.metrics tr.model{background:#eef5ff}table.metrics tr th:first-child{text-align:left}
.kv{display:flex;flex-wrap:wrap;gap:8px 24px;font-size:14px}.kv div b{font-size:16px}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(380px,1fr));gap:12px}
.card{border:1px solid #ddd;border-radius:6px;padding:10px;font-size:12.5px}
.card .head{margin-bottom:6px}.card ol{padding-left:4px;margin:0;list-style:none}
.card li{margin:5px 0;border-top:1px solid #f0f0f0;padding-top:3px}.card span{margin-right:6px}.card i{color:#888;font-style:normal}
.meta{color:#555;margin-left:8px}.tag{border-radius:3px;padding:0 5px;font-size:11px}
.tag.warm{background:#e3f2e1}.tag.cold{background:#fde8d7}
.warn{background:#fff6e0;border-left:4px solid #f0b400;padding:6px 10px}
.grid2{display:grid;grid-template-columns:1fr 1fr;gap:12px}
"""


def _validation_section(validation: Mapping[str, Any]) -> str:
    """The blend's weights per support group and what each choice scored on validation."""
    blend = validation.get("blend") or {}
    rows = []
    by_group = blend.get("hit_rate_at_10_by_group") or {}
    for group, weights in (blend.get("weights") or {}).items():
        scores = by_group.get(group) or {}
        cells = "".join(f"<td>{_format(w, 1)}</td>" for w in weights.values())
        hits = "".join(
            f"<td>{_format(scores.get(c))}</td>"
            for c in ("blend", "cointeraction", "content", "model")
        )
        pairs = (blend.get("pairs_by_group") or {}).get(group)
        rows.append(
            f"<tr><th>{html.escape(group)}</th>{cells}<td>{_format(pairs, 0)}</td>{hits}</tr>"
        )
    components = list(next(iter((blend.get("weights") or {}).values()), {}))
    header = "".join(f"<th>w {html.escape(c)}</th>" for c in components)
    table = (
        f"<table class='metrics'><tr><th>support group</th>{header}<th>pairs</th>"
        "<th>hit@10 blend</th><th>co-interaction</th><th>content</th><th>model</th></tr>"
        + "".join(rows)
        + "</table>"
    )
    chosen = []
    for name in ("itemknn", "rp3beta", "als", "ease"):
        entry = validation.get(name) or {}
        value = entry.get("skipped") or entry.get("chosen")
        if value is not None:
            chosen.append(f"<li>{html.escape(name)}: {html.escape(json.dumps(value))}</li>")
    variant = (blend.get("variant") or {}).get("name", "?")
    return (
        "<h2>What validation chose</h2><p>Every choice is made on the days before the holdout, "
        "with components fitted without them. The published score of a listing's neighbour is "
        f"the weighted sum of standardised component scores; co-interaction is {html.escape(variant)}. "
        f"Validation pairs: {_format(blend.get('pairs'), 0)} of {_format(blend.get('queries'), 0)} "
        "sampled query listings.</p>"
        + table
        + (f"<p>Baselines as tuned on validation:</p><ul>{''.join(chosen)}</ul>" if chosen else "")
    )


def render_report(data: ReportData) -> str:
    """The whole page as one HTML string (images inline)."""
    columns = data.columns
    sections = []
    summary = "".join(
        f"<div>{html.escape(k.replace('_', ' '))}: <b>{_format(v, 0 if float(v).is_integer() else 3)}</b></div>"
        for k, v in data.summary.items()
    )
    sections.append(f"<div class='kv'>{summary}</div>")
    if data.metrics:
        missing = shortfalls(data.metrics)
        verdict = (
            "<div class='warn'><b>Where the model does not win:</b><ul>"
            + "".join(f"<li>{html.escape(s)}</li>" for s in missing)
            + "</ul></div>"
            if missing
            else "<p>The model beats every baseline on the warm and cold headline numbers.</p>"
        )
        if not data.metrics.get("model", {}).get("pairs_cold"):
            verdict += (
                "<p class='warn'>No held-out pair touches a cold-start listing, so the cold "
                "columns are empty: this data cannot measure cold start.</p>"
            )
        sections.append(
            "<h2>Model versus baselines</h2><p>Held-out pairs: consecutive listings A → B of one "
            "user after the training window; a hit is B among A's neighbours. Cold pairs have A "
            "or B without training interactions. Coverage, popularity rank ratio (1 = as popular "
            "as an average listing) and coherence use the top 10.</p>"
            + _metrics_table(data.metrics)
            + verdict
            + _img(_hit_rate_figure(data.metrics), "hit rates")
        )
    if data.validation:
        sections.append(_validation_section(data.validation))
    if len(data.points) >= 3:
        vectors = np.stack(data.points["embedding"].map(np.asarray).to_list()).astype(float)
        coords = pca(vectors)
        sections.append(
            f"<h2>Map of listing embeddings</h2><p>PCA of {len(vectors):,} sampled listing vectors "
            "(t-SNE/UMAP need a package this project does not depend on); circled points are cold "
            "start listings, embedded from their features alone.</p>"
            + _img(_map_figure(data.points, coords, columns), "embedding map")
            + (
                _img(
                    _strip_figure(
                        data.points, group_axis(vectors, data.points[columns.group]), columns.group
                    ),
                    "1-d strip",
                )
                if columns.group in data.points
                else ""
            )
        )
        learned = []
        if data.group_vectors:
            title = f"learned {label(columns.group or '')} embeddings (PCA)"
            learned.append(_img(_table_figure(data.group_vectors, title), "value embeddings"))
        area = data.area_vectors
        if area is None and columns.area in data.points and data.points[columns.area].notna().any():
            names, matrix = _area_centroids(data.points, vectors, columns.area)
            area = (names, matrix, f"mean listing vector per {label(columns.area)}")
        if area and len(area[0]) >= 3:
            learned.append(_img(_table_figure(area[:2], f"{area[2]} (PCA)"), "area embeddings"))
        if learned:
            sections.append(
                "<h2>Learned embeddings</h2><div class='grid2'>" + "".join(learned) + "</div>"
            )
    if data.examples:
        cards = "".join(_card(e, columns.shown) for e in data.examples)
        sections.append(
            f"<h2>Example listings and their top neighbours</h2><div class='cards'>{cards}</div>"
        )
    loss, timings = _loss_figure(data.training), _timings_figure(data.stage_seconds)
    ann = "".join(
        f"<div>{html.escape(str(k))}: <b>{_format(v, 3 if isinstance(v, float) else 0)}</b></div>"
        for k, v in data.ann.items()
    )
    run_info = [
        _img(loss, "loss curve") if loss else "<p>No training metrics.</p>",
        _img(timings, "stage timings") if timings else "<p>No stage timings.</p>",
    ]
    sections.append(
        "<h2>Training, search and timings</h2><div class='grid2'>"
        + "".join(run_info)
        + "</div>"
        + f"<h3>Neighbour search</h3><div class='kv'>{ann or 'not recorded'}</div>"
    )
    if data.notes:
        sections.append("<h2>Notes</h2>" + "".join(f"<p>{html.escape(n)}</p>" for n in data.notes))
    subtitle = f"run {html.escape(data.run_date)} · model {html.escape(str(data.model_version))}"
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(data.title)} {html.escape(data.run_date)}</title>"
        f"<style>{_STYLE}</style></head><body><h1>{html.escape(data.title)}</h1>"
        f"<p class='sub'>{subtitle}</p>{''.join(sections)}</body></html>"
    )
