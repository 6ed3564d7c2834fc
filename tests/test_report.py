"""The report page: self-contained, honest about shortfalls, and readable when rendered."""

import base64
import os
import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure

from lib import report, report_data, report_figures
from lib.car_marketplace import FEATURE_SPEC
from lib.feature_spec import NO_FEATURES, from_dict

METRICS = {
    "model": {"hit_rate_at_10": 0.30, "hit_rate_at_10_warm": 0.35, "hit_rate_at_10_cold": 0.20,
              "mrr_at_10": 0.12, "mrr_at_10_warm": 0.14, "mrr_at_10_cold": 0.08, "pairs": 120.0,
              "pairs_cold": 40.0, "coverage_at_10": 0.9, "same_make_share": 0.6},
    "als": {"hit_rate_at_10": 0.31, "hit_rate_at_10_warm": 0.40, "hit_rate_at_10_cold": 0.0,
            "mrr_at_10": 0.15, "mrr_at_10_warm": 0.16, "mrr_at_10_cold": 0.0},
    "content": {"hit_rate_at_10": 0.10, "hit_rate_at_10_warm": 0.08, "hit_rate_at_10_cold": 0.15,
                "mrr_at_10": 0.05, "mrr_at_10_warm": 0.04, "mrr_at_10_cold": 0.09},
    "random": {"hit_rate_at_10": 0.01, "hit_rate_at_10_warm": 0.01, "hit_rate_at_10_cold": None,
               "mrr_at_10": 0.0},
}  # fmt: skip


def sample_data(n=300, seed=0) -> report_data.ReportData:
    rng = np.random.default_rng(seed)
    makes = rng.choice(["VW", "BMW", "Fiat", "Tesla"], n)
    centres = {"VW": 0.0, "BMW": 2.0, "Fiat": -2.0, "Tesla": 4.0}
    vectors = rng.normal(size=(n, 8)) * 0.3
    vectors[:, 0] += [centres[m] for m in makes]
    points = pd.DataFrame(
        {
            "listing_id": [f"L{i}" for i in range(n)],
            "embedding": list(vectors.astype(np.float32)),
            "is_cold_start": rng.random(n) < 0.1,
            "make": makes,
            "body_type": rng.choice(["suv", "estate", None], n),
            "price_eur": rng.uniform(3_000, 60_000, n),
            "city": rng.choice(["Berlin", "Köln", "Kiel", "Essen"], n),
        }
    )
    neighbour = dict(
        listing_id="L2",
        rank=1,
        score=0.93,
        distance_km=4.2,
        make="VW",
        model="Golf",
        body_type="estate",
        price_eur=9900.0,
        year=2019,
        mileage_km=80000,
        city="Köln",
    )
    example = {
        "listing_id": "L1",
        "cold": True,
        "listing": {**neighbour, "model": "<Polo>"},
        "neighbours": [neighbour],
    }
    return report_data.ReportData(
        title="Listing similarity",
        run_date="2026-11-20",
        model_version="20261120-abc",
        metrics=METRICS,
        points=points,
        # The car spec: make groups the strip, city (shown, not a feature) is the area.
        columns=report_data.ReportColumns.of(FEATURE_SPEC),
        examples=[example],
        group_vectors=(["VW", "BMW", "Fiat"], rng.normal(size=(3, 8))),
        training={"loss_per_epoch": [7.0, 6.1, 5.8]},
        ann={"method": "exact", "recall (exact search)": 1.0},
        stage_seconds={"shards": 12.5, "train": 30.0},
        summary={"active listings": 300, "cold pairs": 40.0},
        notes=["Data: Inside Airbnb (CC BY 4.0)."],
    )


@pytest.fixture(scope="module")
def page():
    return report.render_report(sample_data())


def test_page_is_self_contained(page):
    assert page.startswith("<!DOCTYPE html>")
    sources = re.findall(r'src="([^"]+)"', page)
    assert len(sources) >= 6  # bars, map, strip, make and city embeddings, loss, timings
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert "http://" not in page and "https://" not in page and "<script" not in page


def test_page_says_where_the_model_loses_and_escapes_text(page):
    assert "als beats the model on warm hit-rate@10: 0.400 vs 0.350" in page
    assert "cold hit-rate@10" not in " ".join(report.shortfalls(METRICS))  # model wins cold
    assert "&lt;Polo&gt;" in page and "<Polo>" not in page
    assert "Inside Airbnb" in page


def test_shortfalls_empty_when_model_wins():
    winning = {"model": {"hit_rate_at_10_warm": 0.5}, "als": {"hit_rate_at_10_warm": 0.4}}
    assert report.shortfalls(winning) == []


def test_pca_and_group_axis_find_the_obvious_direction():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 5)) * 0.1
    x[:, 3] += np.repeat([-1.0, 1.0], 100)
    coords = report_figures.pca(x)
    assert coords.shape == (200, 2)
    assert abs(np.corrcoef(coords[:, 0], x[:, 3])[0, 1]) > 0.99
    groups = pd.Series(np.repeat(["a", "b"], 100))
    axis = report_figures.group_axis(x, groups)
    assert np.sign(axis[:100].mean()) != np.sign(axis[100:].mean())


def test_feature_table_reads_both_model_layouts():
    cards = {"make": 3, "model": 2}
    shared = {"feature_embedding.weight": torch.arange(10.0).reshape(5, 2)}
    assert report_data.feature_table(shared, cards, "model").tolist() == [[6.0, 7.0], [8.0, 9.0]]
    split = {"code_embeddings.1.weight": torch.ones(2, 2)}
    assert report_data.feature_table(split, cards, "model").shape == (2, 2)
    assert report_data.feature_table(shared, cards, "colour") is None


def map_panels(data: report_data.ReportData, monkeypatch) -> tuple[str, list[int]]:
    """The rendered page, and the number of panels of each map figure drawn for it."""
    panels = []

    class Recording(Figure):
        def subplots(self, nrows=1, ncols=1, **kwargs):
            if kwargs.get("squeeze") is False:  # only the map asks for a grid of axes
                panels.append(ncols)
            return super().subplots(nrows, ncols, **kwargs)

    monkeypatch.setattr(report_figures, "Figure", Recording)
    return report.render_report(data), panels


def plain_data(spec, points: pd.DataFrame, example_listing: dict) -> report_data.ReportData:
    neighbour = {"listing_id": "L2", "rank": 1, "score": 0.9, "distance_km": None}
    return report_data.ReportData(
        title="Listing similarity",
        run_date="2026-11-20",
        model_version="m1",
        metrics={"model": {"hit_rate_at_10": 0.2, "pairs": 10.0}, "random": {}},
        points=points,
        columns=report_data.ReportColumns.of(spec),
        examples=[
            {
                "listing_id": "L1",
                "cold": False,
                "listing": example_listing,
                "neighbours": [{**neighbour, **example_listing}],
            }
        ],
    )


def plain_points(n: int = 40, **columns) -> pd.DataFrame:
    rng = np.random.default_rng(2)
    return pd.DataFrame(
        {
            "listing_id": [f"L{i}" for i in range(n)],
            "embedding": list(rng.normal(size=(n, 4)).astype(np.float32)),
            "is_cold_start": np.arange(n) % 5 == 0,
            **columns,
        }
    )


def test_page_renders_for_a_catalogue_without_features(monkeypatch):
    columns = report_data.ReportColumns.of(NO_FEATURES)
    assert columns == report_data.ReportColumns()
    assert columns.sampled == ()
    page, panels = map_panels(plain_data(NO_FEATURES, plain_points(), {}), monkeypatch)
    assert panels == [1]  # one uncoloured panel
    assert "Map of listing embeddings" in page and "L1" in page
    assert "1-d strip" not in page and "Learned embeddings" not in page
    assert "same " not in page  # no coherence columns


def test_page_renders_for_a_spec_with_only_a_numeric_feature(monkeypatch):
    spec = from_dict({"features": [{"column": "price", "kind": "numeric"}]})
    columns = report_data.ReportColumns.of(spec)
    assert (columns.group, columns.colours, columns.numeric, columns.area) == (
        None,
        ("price",),
        "price",
        None,
    )
    points = plain_points(price=np.r_[np.nan, np.linspace(5.0, 500.0, 39)])
    data = plain_data(spec, points, {"price": 12.5})
    data.metrics["model"]["median_price_ratio"] = 1.4
    page, panels = map_panels(data, monkeypatch)
    assert panels == [1]  # coloured by price
    assert "price ratio" in page and "<i>price</i> 12.5" in page
    assert "1-d strip" not in page


# CI installs Debian's chromium (.ci/run), so there a missing browser is a failure, not a skip.
@pytest.mark.skipif(
    shutil.which("chromium") is None and os.environ.get("CI") != "true",
    reason="chromium not installed (CI installs it)",
)
def test_headless_chromium_renders_a_readable_page(page, tmp_path):
    assert shutil.which("chromium"), "CI=true but chromium is missing: .ci/run installs it"
    html_path, png = tmp_path / "report.html", tmp_path / "report.png"
    report.write_report(str(html_path), page)
    subprocess.run(
        [
            *("chromium", "--headless", "--no-sandbox", "--disable-gpu"),
            *("--disable-background-networking", "--hide-scrollbars", "--window-size=1280,4000"),
            *(f"--screenshot={png}", html_path.as_uri()),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    from PIL import Image

    image = np.asarray(Image.open(png).convert("L"), dtype=float)
    assert image.shape == (4000, 1280)
    # Text and plots, not a blank or error page: plenty of dark pixels down the page.
    dark_rows = (image < 128).any(axis=1)
    assert dark_rows[:1000].mean() > 0.3 and dark_rows[1000:3000].mean() > 0.3
