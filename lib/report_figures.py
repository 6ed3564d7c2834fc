"""The report page's figures: numpy projections and matplotlib figures as base64 PNGs.

Pure functions of ``lib.report_data``'s values: ``pca``, ``group_axis`` and ``area_centroids``
project listing vectors (numpy only, no extra package); each ``..._figure`` draws one chart on a
``matplotlib.figure.Figure`` (no pyplot: no global state, no display backend) and returns it
PNG-encoded, so ``lib.report`` can inline it and the page works offline.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from lib.report_data import ReportColumns, label, ordered_methods

_TOP_CATEGORIES = 10
_PALETTE = colormaps["tab10"].colors


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


def hit_rate_figure(metrics: Mapping[str, Mapping[str, float | None]]) -> str:
    methods = ordered_methods(metrics)
    fig = Figure(figsize=(9, 3.4))
    ax = fig.subplots()
    width = 0.27
    for i, (suffix, subset) in enumerate((("", "all"), ("_warm", "warm"), ("_cold", "cold"))):
        found = [metrics[m].get(f"hit_rate_at_10{suffix}") for m in methods]
        values = [np.nan if v is None else v for v in found]
        x = np.arange(len(methods)) + (i - 1) * width
        ax.bar(x, values, width, label=f"{subset} pairs", color=_PALETTE[i])
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


def map_figure(points: pd.DataFrame, coords: np.ndarray, columns: ReportColumns) -> str:
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


def strip_figure(points: pd.DataFrame, position: np.ndarray, group: str) -> str:
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


def table_figure(vectors: tuple, title: str) -> str:
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


def area_centroids(
    points: pd.DataFrame, vectors: np.ndarray, area: str
) -> tuple[list[str], np.ndarray]:
    areas = points[area].astype("string").fillna("(none)").to_numpy()
    names = list(pd.Series(areas).value_counts().index[:40])
    return names, np.stack([vectors[areas == a].mean(axis=0) for a in names])


def loss_figure(training: Mapping[str, Any]) -> str | None:
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


def timings_figure(stage_seconds: Mapping[str, float]) -> str | None:
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
