"""The published tables as other teams read them: DuckDB, Polars, delta-rs and Spark SQL.

A small ``listing_neighbours`` table is written with the project's own writer
(``lib.delta_io.write_table``), including a partition replaced by a later commit, so a reader
that ignored the Delta log would see stale rows. DuckDB's Delta extension (loaded from the
``duckdb-extension-delta`` package, no download) and Polars must read back exactly the rows Spark
wrote.

The README's query examples run here too: every fenced Python block in README.md whose first
line is ``# readme-example: NAME`` is executed in a folder where ``demo/tables/listing_neighbours``
is that table, with ``spark`` defined, and must leave ``similar`` holding listing L0000042's
neighbours of 2026-11-20 by rank, as Spark wrote them.
"""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

import duckdb
import duckdb_extension_delta
import numpy as np
import pandas as pd
import polars as pl
import pytest

from lib import delta_io
from schemas import listing_neighbours

README = Path(__file__).resolve().parents[1] / "README.md"
# Every reader the README promises an example for.
EXAMPLES = ("spark-sql", "duckdb", "polars", "deltalake")
EXAMPLE_BLOCK = re.compile(
    r"^```(?:python|py)\n(# readme-example: ([\w-]+)\n.*?)^```", re.MULTILINE | re.DOTALL
)
TABLE = "demo/tables/listing_neighbours"
DAY = dt.date(2026, 11, 20)
LISTING = "L0000042"
COLUMNS = listing_neighbours.SPEC.columns  # model_version, listing_id, neighbour_id, rank, ...


def neighbour_rows(run_date: dt.date, model_version: str, shift: int) -> list[tuple]:
    """Five listings with three neighbours each; ``shift`` varies ids and scores."""
    ids = [f"L00000{n}" for n in range(40, 45)]
    rows = []
    for i, listing in enumerate(ids):
        others = [x for x in ids if x != listing]
        for rank in range(1, 4):
            neighbour = others[(i + rank + shift) % len(others)]
            score = round(0.9 - 0.137 * rank - 0.01 * shift, 3)  # not exact in float32
            rows.append((model_version, listing, neighbour, rank, score, run_date))
    return rows


def as_float32(rows: list[tuple]) -> list[tuple]:
    """The rows as stored: ``score`` is a float column (float32)."""
    return [(*r[:4], float(np.float32(r[4])), r[5]) for r in rows]


@pytest.fixture(scope="module")
def published(spark, tmp_path_factory):
    """(folder holding demo/tables/listing_neighbours, the rows Spark wrote, sorted)."""
    root = tmp_path_factory.mktemp("readers")
    path = str(root / TABLE)
    spec = listing_neighbours.SPEC
    day_before = neighbour_rows(DAY - dt.timedelta(days=1), "20261119-aaaa", shift=0)
    stale = neighbour_rows(DAY, "20261120-stale", shift=1)
    final = neighbour_rows(DAY, "20261120-bbbb", shift=2)

    def write(rows, **kwargs) -> None:
        df = spark.createDataFrame(rows, spec.schema)
        delta_io.write_table(df, path, spec, sort_within_files_by=("listing_id",), **kwargs)

    write(day_before, mode="overwrite")
    write(stale, mode="append")
    write(
        final,
        mode="overwrite",
        replace_partition={"run_date": DAY.isoformat()},
        commit_metadata={"run_id": "test", "model_version": "20261120-bbbb", "k": 3},
    )
    return root, sorted(as_float32(day_before + final))


def duckdb_with_delta() -> duckdb.DuckDBPyConnection:
    """A connection with the Delta extension installed from the pip package's file."""
    folder = Path(duckdb_extension_delta.__file__).parent / "extensions" / f"v{duckdb.__version__}"
    extension = folder / "delta.duckdb_extension"
    assert extension.is_file(), (
        f"duckdb-extension-delta has no build for DuckDB {duckdb.__version__}"
    )
    con = duckdb.connect(config={"allow_unsigned_extensions": True})
    con.install_extension(str(extension))
    con.load_extension("delta")
    return con


def test_duckdb_delta_scan_reads_what_spark_wrote(published):
    root, expected = published
    con = duckdb_with_delta()
    query = f"SELECT {', '.join(COLUMNS)} FROM delta_scan('{root / TABLE}')"
    assert sorted(con.sql(query).fetchall()) == expected
    day = con.sql(f"{query} WHERE run_date = DATE '{DAY.isoformat()}'").fetchall()
    assert {row[0] for row in day} == {"20261120-bbbb"}


def test_polars_reads_what_spark_wrote(published):
    root, expected = published
    table = pl.read_delta(str(root / TABLE))
    assert table.schema["score"] == pl.Float32 and table.schema["run_date"] == pl.Date
    assert sorted(table.select(COLUMNS).rows()) == expected
    lazy = pl.scan_delta(str(root / TABLE)).filter(pl.col("run_date") == DAY)
    assert sorted(lazy.select(COLUMNS).collect().rows()) == [r for r in expected if r[5] == DAY]


def readme_examples() -> dict[str, str]:
    found: dict[str, str] = {}
    for code, name in (
        (m.group(1), m.group(2)) for m in EXAMPLE_BLOCK.finditer(README.read_text())
    ):
        assert name not in found, f"README.md has two examples named {name!r}"
        found[name] = code
    return found


def test_readme_has_an_example_for_every_reader():
    assert sorted(readme_examples()) == sorted(EXAMPLES)


def ranked(similar) -> list[tuple]:
    """(rank, neighbour_id, score) of an example's result, whatever kind of frame it is."""
    wanted = ["rank", "neighbour_id", "score"]
    if isinstance(similar, pl.DataFrame):
        rows = similar.select(wanted).rows()
    elif isinstance(similar, pd.DataFrame):
        rows = similar[wanted].itertuples(index=False, name=None)
    else:
        raise TypeError(f"`similar` should be a pandas or Polars DataFrame, not {type(similar)}")
    return [(int(rank), str(neighbour), float(score)) for rank, neighbour, score in rows]


@pytest.mark.parametrize("name", EXAMPLES)
def test_readme_example_runs_and_finds_the_listing(name, published, spark, monkeypatch):
    root, expected = published
    code = readme_examples().get(name)
    assert code is not None, f"README.md lost its '# readme-example: {name}' block"
    monkeypatch.chdir(root)
    namespace = {"spark": spark, "__name__": f"readme_example_{name}"}
    exec(compile(code, f"README.md[{name}]", "exec"), namespace)
    assert "similar" in namespace, f"the {name} example should leave its result in `similar`"
    want = [(r[3], r[2], r[4]) for r in expected if r[1] == LISTING and r[5] == DAY]
    assert len(want) == 3
    assert ranked(namespace["similar"]) == sorted(want)
