"""One static HTML page per run: metrics versus baselines and what the embedding learned.

``report_for_run`` reads one run's tables and artifacts and writes its page. The IO half is
``lib.report_data`` (``gather_report_data``: a few small Spark collects and the model
artifact); ``render_report`` here is pure: the HTML sections, tables and cards, with the
figures of ``lib.report_figures`` inlined as base64 PNGs, so the file works offline, from a
mail attachment or an object store, with no JavaScript.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from lib import delta_io
from lib.feature_spec import NO_FEATURES, FeatureSpec
from lib.lookup import format_value
from lib.report_data import ReportData, gather_report_data, label, ordered_methods, search_info
from lib.report_figures import (
    area_centroids,
    group_axis,
    hit_rate_figure,
    loss_figure,
    map_figure,
    pca,
    strip_figure,
    table_figure,
    timings_figure,
)
from schemas import listing_embeddings, listing_neighbours

# ---------------------------------------------------------------------------------------------
# IO: one run's tables and artifacts in, its page out


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
# Pure: HTML


def _img(encoded: str, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{encoded}">'


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
    methods = ordered_methods(metrics)
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
        for method in ordered_methods(metrics):
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
            + _img(hit_rate_figure(data.metrics), "hit rates")
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
            + _img(map_figure(data.points, coords, columns), "embedding map")
            + (
                _img(
                    strip_figure(
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
            learned.append(_img(table_figure(data.group_vectors, title), "value embeddings"))
        area = data.area_vectors
        if area is None and columns.area in data.points and data.points[columns.area].notna().any():
            names, matrix = area_centroids(data.points, vectors, columns.area)
            area = (names, matrix, f"mean listing vector per {label(columns.area)}")
        if area and len(area[0]) >= 3:
            learned.append(_img(table_figure(area[:2], f"{area[2]} (PCA)"), "area embeddings"))
        if learned:
            sections.append(
                "<h2>Learned embeddings</h2><div class='grid2'>" + "".join(learned) + "</div>"
            )
    if data.examples:
        cards = "".join(_card(e, columns.shown) for e in data.examples)
        sections.append(
            f"<h2>Example listings and their top neighbours</h2><div class='cards'>{cards}</div>"
        )
    loss, timings = loss_figure(data.training), timings_figure(data.stage_seconds)
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
