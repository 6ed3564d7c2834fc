"""Where one deployment keeps its inputs, per-run work, models, tables and reports."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

TABLES = ("listing_embeddings", "listing_neighbours", "runs")


@dataclass(frozen=True)
class Layout:
    """A root directory laid out as ``inputs/ work/<date>/ models/<version>/ tables/ reports/``."""

    root: str

    @property
    def interactions(self) -> str:
        return f"{self.root}/inputs/interactions"

    @property
    def listings(self) -> str:
        return f"{self.root}/inputs/listings"

    @property
    def feature_spec(self) -> str:
        """The listings' declared features (``lib.feature_spec``), when the inputs have one."""
        return f"{self.root}/inputs/feature_spec.json"

    @property
    def truth(self) -> str:
        return f"{self.root}/inputs/truth"

    def table(self, name: str) -> str:
        if name not in TABLES:
            raise ValueError(f"unknown table {name!r}; tables are {', '.join(TABLES)}")
        return f"{self.root}/tables/{name}"

    def shards(self, run_date: dt.date) -> str:
        return f"{self.root}/work/{run_date.isoformat()}/shards"

    def model_dir(self, model_version: str) -> str:
        return f"{self.root}/models/{model_version}"

    def report(self, run_date: dt.date) -> str:
        return f"{self.root}/reports/{run_date.isoformat()}/report.html"

    def previous_shards(self, run_date: dt.date) -> str | None:
        """The latest completed shards before ``run_date``: its vocabularies keep ids stable."""
        work = Path(self.root) / "work"
        earlier = sorted(
            p.parent
            for p in work.glob("*/shards/manifest.json")
            if p.parent.parent.name < run_date.isoformat()
        )
        return str(earlier[-1]) if earlier else None
