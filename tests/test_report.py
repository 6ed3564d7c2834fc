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

from lib import report

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


def sample_data(n=300, seed=0) -> report.ReportData:
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
    neighbour = {"listing_id": "L2", "rank": 1, "score": 0.93, "distance_km": 4.2, "make": "VW",
                 "model": "Golf", "body_type": "estate", "price_eur": 9900.0, "year": 2019,
                 "mileage_km": 80000, "city": "Köln"}  # fmt: skip
    example = {"listing_id": "L1", "cold": True, "listing": {**neighbour, "model": "<Polo>"},
               "neighbours": [neighbour]}  # fmt: skip
    return report.ReportData(
        title="Listing similarity",
        run_date="2026-11-20",
        model_version="20261120-abc",
        metrics=METRICS,
        points=points,
        examples=[example],
        make_vectors=(["VW", "BMW", "Fiat"], rng.normal(size=(3, 8))),
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


def test_pca_and_make_axis_find_the_obvious_direction():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 5)) * 0.1
    x[:, 3] += np.repeat([-1.0, 1.0], 100)
    coords = report.pca(x)
    assert coords.shape == (200, 2)
    assert abs(np.corrcoef(coords[:, 0], x[:, 3])[0, 1]) > 0.99
    groups = pd.Series(np.repeat(["a", "b"], 100))
    axis = report.make_axis(x, groups)
    assert np.sign(axis[:100].mean()) != np.sign(axis[100:].mean())


def test_feature_table_reads_both_model_layouts():
    cards = {"make_code": 3, "model_code": 2}
    shared = {"feature_embedding.weight": torch.arange(10.0).reshape(5, 2)}
    assert report.feature_table(shared, cards, "model_code").tolist() == [[6.0, 7.0], [8.0, 9.0]]
    split = {"code_embeddings.1.weight": torch.ones(2, 2)}
    assert report.feature_table(split, cards, "model_code").shape == (2, 2)
    assert report.feature_table(shared, cards, "colour_code") is None


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
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu",
         "--disable-background-networking", "--hide-scrollbars", "--window-size=1280,4000",
         f"--screenshot={png}", html_path.as_uri()],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    from PIL import Image

    image = np.asarray(Image.open(png).convert("L"), dtype=float)
    assert image.shape == (4000, 1280)
    # Text and plots, not a blank or error page: plenty of dark pixels down the page.
    dark_rows = (image < 128).any(axis=1)
    assert dark_rows[:1000].mean() > 0.3 and dark_rows[1000:3000].mean() > 0.3
