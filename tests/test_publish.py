"""Publishing listing_neighbours: the quality gate, one commit per run, retention, and faults
(a publish killed mid-write, readers polling during a publish)."""

import datetime as dt
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from deltalake import DeltaTable

from jobs import compute_neighbours
from lib import delta_commit, delta_io, quality_gate
from schemas import listing_embeddings, listing_neighbours

REPO = Path(__file__).resolve().parents[1]
SPEC = listing_neighbours.SPEC
DAY1, DAY2, DAY3 = dt.date(2026, 11, 18), dt.date(2026, 11, 19), dt.date(2026, 11, 20)
N, K = 120, 5


@pytest.fixture(scope="module")
def embeddings(spark, tmp_path_factory) -> str:
    """A listing_embeddings table with the same N listings on three run dates."""
    path = str(tmp_path_factory.mktemp("publish") / "listing_embeddings")
    rng = np.random.default_rng(11)
    centres = rng.normal(size=(6, 8))
    vectors = centres[rng.integers(0, 6, N)] + 0.4 * rng.normal(size=(N, 8))
    rows = [
        (f"L{i:03d}", [float(v) for v in vectors[i]], f"m-{day:%d}", False, day)
        for day in (DAY1, DAY2, DAY3)
        for i in range(N)
    ]
    delta_io.write_table(
        spark.createDataFrame(rows, listing_embeddings.SCHEMA), path, listing_embeddings.SPEC
    )
    return path


def job_argv(embeddings: str, table: str, day: dt.date, *extra: str) -> list[str]:
    return [
        "--embeddings",
        embeddings,
        "--table",
        table,
        "--run-date",
        day.isoformat(),
        "--k",
        str(K),
        "--nlist",
        "4",
        "--nprobe",
        "2",
        "--recall-sample",
        "40",
        *extra,
    ]


def publish(spark, embeddings, table, day, *extra) -> dict:
    args = compute_neighbours.parse_args(job_argv(embeddings, table, day, *extra))
    return compute_neighbours.run(spark, args)


def rows_of(table: str, version: int | None = None) -> list[tuple]:
    arrow = DeltaTable(table, version=version).to_pyarrow_table()
    return sorted(
        (r["run_date"], r["listing_id"], r["rank"], r["neighbour_id"], r["model_version"])
        for r in arrow.to_pylist()
    )


def assert_complete_runs(rows: list[tuple]) -> None:
    """Every run date in the table holds one whole run: every listing with ranks 1..K."""
    by_day: dict = {}
    for day, listing_id, rank, _, model in rows:
        by_day.setdefault(day, {}).setdefault(listing_id, []).append((rank, model))
    for day, listings in by_day.items():
        assert len(listings) == N, f"{day}: {len(listings)} listings"
        for ranks in listings.values():
            assert sorted(r for r, _ in ranks) == list(range(1, K + 1)), day
        assert len({m for ranks in listings.values() for _, m in ranks}) == 1, day


# ---------------------------------------------------------------------------------------------
# One commit per run, metadata, idempotence
# ---------------------------------------------------------------------------------------------


def test_publish_commits_one_run_with_metadata_and_a_rerun_changes_nothing(
    spark, embeddings, tmp_path
):
    table = str(tmp_path / "listing_neighbours")

    first = publish(spark, embeddings, table, DAY1, "--run-id", "run-1")
    before = rows_of(table)
    second = publish(spark, embeddings, table, DAY1, "--run-id", "run-2")

    assert {"recall_at_k", "method", "nlist", "nprobe", "coverage"} <= set(first)
    assert first["method"] == "ivf" and (first["nlist"], first["nprobe"]) == (4, 2)
    assert first["recall_at_k"] >= 0.9 and first["coverage"] == 1.0
    assert second["previous_coverage"] == 1.0
    assert rows_of(table) == before  # same table, no duplicates
    assert len(before) == N * K
    assert_complete_runs(before)
    publishes = [e for e in delta_io.history(table) if e["metadata"].get("coverage") is not None]
    assert [e["version"] for e in publishes] == [second["table_version"], first["table_version"]]
    meta = publishes[0]["metadata"]
    assert meta["run_id"] == "run-2" and meta["model_version"] == f"m-{DAY1:%d}"
    assert meta["recall_at_k"] == second["recall_at_k"]
    assert meta["parameters"]["nprobe"] == "2" and meta["nlist"] == 4
    # The rerun's commit removed the first run's files and added its own, in one commit.
    actions = (Path(table) / "_delta_log" / f"{second['table_version']:020d}.json").read_text()
    assert '"remove"' in actions and '"add"' in actions


def test_exact_method_publishes_recall_one(spark, embeddings, tmp_path):
    table = str(tmp_path / "listing_neighbours")
    stats = publish(spark, embeddings, table, DAY2, "--method", "exact", "--num-blocks", "2")
    assert stats["method"] == "exact" and stats["recall_at_k"] == 1.0
    assert stats["nlist"] is None


# ---------------------------------------------------------------------------------------------
# The quality gate
# ---------------------------------------------------------------------------------------------


def test_gate_problems_name_recall_and_coverage_drop():
    config = quality_gate.GateConfig(min_recall=0.9, max_coverage_drop=0.05)
    previous = {"coverage": 0.99, "run_id": "r0"}

    assert (
        quality_gate.problems(
            {"recall_at_k": 0.95, "coverage": 0.95}, previous=previous, config=config
        )
        == []
    )
    found = quality_gate.problems(
        {"recall_at_k": 0.5, "coverage": 0.9}, previous=previous, config=config
    )
    assert len(found) == 2
    assert "recall@k 0.5000 is below the minimum 0.9000" in found[0]
    assert "dropped by 0.0900 from 0.9900 (run r0)" in found[1]
    assert quality_gate.problems(
        {"recall_at_k": None, "coverage": 1.0}, previous=None, config=config
    )


def test_gate_refuses_a_low_recall_run_and_leaves_the_table_unchanged(spark, embeddings, tmp_path):
    table = str(tmp_path / "listing_neighbours")
    publish(spark, embeddings, table, DAY1, "--run-id", "good")
    version, before = delta_io.latest_version(table), rows_of(table)

    # No approximate run reaches recall 1.01: the gate must refuse it.
    with pytest.raises(quality_gate.QualityGateError, match=r"recall@k .* below the minimum"):
        publish(spark, embeddings, table, DAY2, "--run-id", "bad", "--min-recall", "1.01")

    assert delta_io.latest_version(table) == version
    assert rows_of(table) == before
    assert quality_gate.last_published(table)["run_id"] == "good"


def test_gate_refuses_a_coverage_drop(spark, embeddings, tmp_path):
    table = str(tmp_path / "listing_neighbours")
    publish(spark, embeddings, table, DAY1, "--run-id", "good")
    version = delta_io.latest_version(table)
    df = delta_io.read_table(spark, table, SPEC)

    with pytest.raises(quality_gate.QualityGateError, match=r"coverage 0\.5000 dropped by 0\.5000"):
        quality_gate.publish(
            df,
            table,
            SPEC,
            metrics={"recall_at_k": 1.0, "coverage": 0.5},
            config=quality_gate.GateConfig(),
            replace_partition={"run_date": DAY1.isoformat()},
            commit_metadata={"run_id": "worse"},
        )

    assert delta_io.latest_version(table) == version


# ---------------------------------------------------------------------------------------------
# Retention
# ---------------------------------------------------------------------------------------------


def test_retention_keeps_the_last_runs_and_vacuums_their_files(spark, embeddings, tmp_path):
    table = str(tmp_path / "listing_neighbours")
    publish(spark, embeddings, table, DAY1)
    old_files = {p for p in Path(table).rglob("*.parquet") if "run_date=2026-11-18" in str(p)}
    publish(spark, embeddings, table, DAY2, "--retain-runs", "2")
    assert {r[0] for r in rows_of(table)} == {DAY1, DAY2}

    stats = publish(spark, embeddings, table, DAY3, "--retain-runs", "2", "--vacuum-hours", "0")

    assert stats["retired"] == [DAY1.isoformat()]
    assert stats["vacuumed_files"] >= len(old_files) > 0
    assert not any(p.exists() for p in old_files)
    rows = rows_of(table)
    assert {r[0] for r in rows} == {DAY2, DAY3}
    assert_complete_runs(rows)
    assert delta_io.read_table(spark, table, SPEC).count() == 2 * N * K
    # The retention commit is not a published run: the gate still compares with DAY3's run.
    assert quality_gate.last_published(table)["parameters"]["run_date"] == DAY3.isoformat()


def test_retention_without_a_table_or_with_keep_all_does_nothing(spark, tmp_path):
    assert delta_io.apply_retention(spark, str(tmp_path / "none"), SPEC, keep_last=2) == {
        "removed": [],
        "vacuumed": 0,
        "stale_staging_files": 0,
        "version": None,
    }
    with pytest.raises(ValueError, match="keep_last"):
        delta_io.apply_retention(spark, str(tmp_path), SPEC, keep_last=-1)


# ---------------------------------------------------------------------------------------------
# Faults: a real process killed mid-publish, readers polling during publishes
# ---------------------------------------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import pathlib, sys, time
    sys.path.insert(0, {repo!r})
    from lib import delta_commit
    from jobs import compute_neighbours

    hook, marker, argv = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3:]

    def pause_before(original):
        def paused(*args, **kwargs):
            marker.write_text(hook)
            time.sleep(600)
            return original(*args, **kwargs)
        return paused

    if hook == "before_move":  # Spark has written the new files to the staging folder
        delta_commit._publish = pause_before(delta_commit._publish)
    elif hook == "before_commit":  # the new files sit in the table's folders, uncommitted
        delta_commit._commit = pause_before(delta_commit._commit)
    for day in (argv.pop(0).split(",") if hook == "loop" else [None]):
        run_argv = argv if day is None else [*argv, "--run-date", day, "--run-id", "loop-" + day]
        compute_neighbours.main(run_argv)
    """
)


def start_child(tmp_path: Path, hook: str, argv: list[str]) -> tuple[subprocess.Popen, Path]:
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(repo=str(REPO)))
    marker = tmp_path / "marker"
    log = open(tmp_path / "child.log", "w")  # noqa: SIM115 - closed with the process
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable}
    # Its own session (process group): the kill reaches the driver and its JVM, nothing else.
    proc = subprocess.Popen(
        [sys.executable, str(script), hook, str(marker), *argv],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    return proc, marker


@pytest.mark.slow
@pytest.mark.parametrize("hook", ["before_move", "before_commit"])
def test_publish_killed_mid_write_leaves_the_previous_snapshot(spark, embeddings, tmp_path, hook):
    table = str(tmp_path / "listing_neighbours")
    publish(spark, embeddings, table, DAY1, "--run-id", "kept")
    version, before = delta_io.latest_version(table), rows_of(table)
    files_before = set(Path(table).rglob("*.parquet"))

    argv = job_argv(embeddings, table, DAY1, "--run-id", "killed", "--nprobe", "3")
    proc, marker = start_child(tmp_path, hook, argv)
    deadline = time.monotonic() + 600
    while not marker.exists():
        assert proc.poll() is None, (tmp_path / "child.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "the child never reached the kill point"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)

    new_files = set(Path(table).rglob("*.parquet")) - files_before
    assert new_files, "the child was killed before it wrote anything"
    assert delta_io.latest_version(table) == version
    assert rows_of(table) == before
    assert (
        sorted(
            (r.run_date, r.listing_id, r["rank"], r.neighbour_id, r.model_version)
            for r in delta_io.read_table(spark, table, SPEC).collect()
        )
        == before
    )
    assert quality_gate.last_published(table)["run_id"] == "kept"

    # The next run publishes normally; vacuum then clears what the killed run left behind
    # (in the table's folders or in its staging folder).
    stats = publish(spark, embeddings, table, DAY1, "--run-id", "after", "--vacuum-hours", "0")
    assert rows_of(table) == before
    assert not any(p.exists() for p in new_files)
    cleared = stats["vacuumed_files"] + stats["stale_staging_files"]
    assert cleared >= len(new_files)
    assert list((Path(table) / delta_commit.STAGING_DIR).iterdir()) == []


@pytest.mark.slow
def test_readers_polling_during_publishes_only_see_complete_runs(spark, embeddings, tmp_path):
    table = str(tmp_path / "listing_neighbours")
    publish(spark, embeddings, table, DAY1, "--run-id", "first")
    days = ",".join(d.isoformat() for d in (DAY2, DAY1, DAY3))
    argv = [
        "--embeddings",
        embeddings,
        "--table",
        table,
        "--k",
        str(K),
        "--nlist",
        "4",
        "--nprobe",
        "2",
        "--recall-sample",
        "40",
    ]
    proc, _ = start_child(tmp_path, "loop", [days, *argv])

    seen: set[int] = set()
    while proc.poll() is None:
        snapshot = DeltaTable(table)
        seen.add(snapshot.version())
        assert_complete_runs(rows_of(table, snapshot.version()))
        time.sleep(0.05)

    assert proc.returncode == 0, (tmp_path / "child.log").read_text()[-3000:]
    final = rows_of(table)
    assert {r[0] for r in final} == {DAY1, DAY2, DAY3}
    assert_complete_runs(final)
    assert len(seen) >= 2  # the readers did overlap with publishes
