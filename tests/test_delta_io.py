import datetime as dt
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from chispa import assert_df_equality
from deltalake import DeltaTable
from pyspark.sql import functions as F
from pyspark.sql import types as T

from lib import delta_commit, delta_io, delta_native
from lib.schema_check import SchemaError
from schemas import TableSpec, interactions, listing_neighbours, runs

SPEC = listing_neighbours.SPEC
DAY1 = dt.date(2026, 11, 19)
DAY2 = dt.date(2026, 11, 20)


def neighbours(spark, run_date, listing_ids, model="m1"):
    rows = [
        (model, lid, f"{lid}-n{rank}", rank, 1.0 - rank / 8, run_date)
        for lid in listing_ids
        for rank in (1, 2)
    ]
    return spark.createDataFrame(rows, SPEC.schema)


def assert_same_rows(actual, expected):
    assert_df_equality(actual, expected, ignore_row_order=True, ignore_nullable=True)


def data_files(table: Path) -> set[str]:
    return {
        str(p.relative_to(table))
        for p in table.rglob("*.parquet")
        if not any(part.startswith(("_", ".")) for part in p.relative_to(table).parts)
    }


def log_actions(table: Path, version: int) -> list[dict]:
    text = (table / "_delta_log" / f"{version:020d}.json").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def add_actions(table: Path) -> list[dict]:
    return pa.table(DeltaTable(str(table)).get_add_actions(flatten=True)).to_pylist()


# ---------------------------------------------------------------------------------------------
# Round trips and independent readers
# ---------------------------------------------------------------------------------------------


def test_round_trip_creates_partitioned_table(spark, tmp_path):
    table = tmp_path / "neighbours"
    df = neighbours(spark, DAY1, ["a", "b"]).unionByName(neighbours(spark, DAY2, ["c"]))

    version = delta_io.write_table(df, str(table), SPEC)

    assert version == 0
    assert delta_io.table_exists(str(table))
    assert delta_io.latest_version(str(table)) == 0
    assert_same_rows(delta_io.read_table(spark, str(table), SPEC), df)
    files = data_files(table)
    assert files and all(
        f.startswith(("run_date=2026-11-19/", "run_date=2026-11-20/")) for f in files
    )
    assert all(Path(f).name.startswith("part-") for f in files)
    assert list((table / delta_commit.STAGING_DIR).iterdir()) == []


def test_independent_reader_sees_same_rows_schema_and_partitions(spark, tmp_path):
    table = tmp_path / "neighbours"
    df = neighbours(spark, DAY1, ["a", "b"]).unionByName(neighbours(spark, DAY2, ["c"]))
    delta_io.write_table(df, str(table), SPEC)

    delta = DeltaTable(str(table))
    arrow = delta.to_pyarrow_table()

    assert delta.metadata().partition_columns == ["run_date"]
    assert delta.metadata().name == "listing_neighbours"
    assert [(f.name, str(f.type)) for f in delta.schema().fields] == [
        ("model_version", 'PrimitiveType("string")'),
        ("listing_id", 'PrimitiveType("string")'),
        ("neighbour_id", 'PrimitiveType("string")'),
        ("rank", 'PrimitiveType("integer")'),
        ("score", 'PrimitiveType("float")'),
        ("run_date", 'PrimitiveType("date")'),
    ]
    assert arrow.schema.field("run_date").type == pa.date32()
    key = ("run_date", "listing_id", "rank")
    got = sorted(arrow.to_pylist(), key=lambda r: tuple(r[k] for k in key))
    want = sorted((r.asDict() for r in df.collect()), key=lambda r: tuple(r[k] for k in key))
    assert got == [{**r, "score": pytest.approx(r["score"])} for r in want]


def test_tables_with_deletion_vectors_need_a_delta_session(spark, tmp_path):
    table = tmp_path / "dv"
    DeltaTable.create(
        str(table),
        pa.schema([pa.field("listing_id", pa.string())]),
        configuration={"delta.enableDeletionVectors": "true"},
    )
    spec = TableSpec("dv", T.StructType([T.StructField("listing_id", T.StringType())]))

    with pytest.raises(ValueError, match="deletionVectors"):
        delta_io.read_table(spark, str(table), spec)


def test_file_uri_and_plain_path_name_the_same_table(spark, tmp_path):
    table = tmp_path / "neighbours"
    df = neighbours(spark, DAY1, ["a"])

    delta_io.write_table(df, table.as_uri(), SPEC)
    delta_io.write_table(df, str(table), SPEC, mode="overwrite")

    assert delta_io.latest_version(table.as_uri()) == 1
    assert_same_rows(delta_io.read_table(spark, table.as_uri(), SPEC), df)


# ---------------------------------------------------------------------------------------------
# Modes, versions, time travel
# ---------------------------------------------------------------------------------------------


def test_partition_overwrite_leaves_other_partition_untouched_and_is_idempotent(spark, tmp_path):
    table = tmp_path / "neighbours"
    day1 = neighbours(spark, DAY1, ["a", "b"])
    old_day2 = neighbours(spark, DAY2, ["c", "d"])
    new_day2 = neighbours(spark, DAY2, ["e"], model="m2")
    v0 = delta_io.write_table(day1.unionByName(old_day2), str(table), SPEC)
    day1_files = {p: (table / p).stat().st_mtime_ns for p in data_files(table) if "2026-11-19" in p}
    old_day2_files = {p for p in data_files(table) if "2026-11-20" in p}

    v1 = delta_io.write_table(
        new_day2, str(table), SPEC, mode="overwrite", replace_partition={"run_date": "2026-11-20"}
    )
    v2 = delta_io.write_table(
        new_day2, str(table), SPEC, mode="overwrite", replace_partition={"run_date": "2026-11-20"}
    )

    assert (v0, v1, v2) == (0, 1, 2)
    assert_same_rows(delta_io.read_table(spark, str(table), SPEC), day1.unionByName(new_day2))
    live = {a["path"] for a in add_actions(table)}
    assert set(day1_files) <= live
    assert not old_day2_files & live
    assert {p: (table / p).stat().st_mtime_ns for p in day1_files} == day1_files
    # One commit holds both the removal of the replaced partition's files and the new files.
    actions = log_actions(table, 1)
    removed = {a["remove"]["path"] for a in actions if "remove" in a}
    added = {a["add"]["path"] for a in actions if "add" in a}
    assert removed == old_day2_files
    assert added and all(p.startswith("run_date=2026-11-20/") for p in added)
    # Time travel still reads the replaced rows.
    assert_same_rows(
        delta_io.read_table(spark, str(table), SPEC, version=0), day1.unionByName(old_day2)
    )


def test_append_adds_and_full_overwrite_replaces(spark, tmp_path):
    table = tmp_path / "neighbours"
    first = neighbours(spark, DAY1, ["a"])
    second = neighbours(spark, DAY2, ["b"])
    third = neighbours(spark, DAY2, ["z"], model="m3")

    assert delta_io.write_table(first, str(table), SPEC, mode="append") == 0
    assert delta_io.write_table(second, str(table), SPEC, mode="append") == 1
    assert_same_rows(delta_io.read_table(spark, str(table), SPEC), first.unionByName(second))

    assert delta_io.write_table(third, str(table), SPEC, mode="overwrite") == 2
    assert_same_rows(delta_io.read_table(spark, str(table), SPEC), third)
    assert [h["version"] for h in delta_io.history(str(table))] == [2, 1, 0]


def test_first_write_may_be_a_partition_overwrite(spark, tmp_path):
    table = tmp_path / "neighbours"
    df = neighbours(spark, DAY2, ["a"])

    version = delta_io.write_table(
        df, str(table), SPEC, mode="overwrite", replace_partition={"run_date": "2026-11-20"}
    )

    assert version == 0
    assert_same_rows(delta_io.read_table(spark, str(table), SPEC), df)


def test_read_one_partition_and_empty_results(spark, tmp_path):
    table = tmp_path / "neighbours"
    day1 = neighbours(spark, DAY1, ["a"])
    delta_io.write_table(day1.unionByName(neighbours(spark, DAY2, ["b"])), str(table), SPEC)

    only_day1 = delta_io.read_table(spark, str(table), SPEC, partition={"run_date": "2026-11-19"})
    missing = delta_io.read_table(spark, str(table), SPEC, partition={"run_date": "2030-01-01"})

    assert_same_rows(only_day1, day1)
    assert missing.schema == SPEC.schema
    assert missing.isEmpty()
    with pytest.raises(ValueError, match="not partition columns"):
        delta_io.read_table(spark, str(table), SPEC, partition={"listing_id": "a"})


def test_empty_write_creates_an_empty_table(spark, tmp_path):
    table = tmp_path / "neighbours"
    empty = spark.createDataFrame([], SPEC.schema)

    assert delta_io.write_table(empty, str(table), SPEC) == 0

    result = delta_io.read_table(spark, str(table), SPEC)
    assert result.schema == SPEC.schema
    assert result.isEmpty()
    assert DeltaTable(str(table)).metadata().partition_columns == ["run_date"]


def test_overwriting_a_partition_with_no_rows_empties_it(spark, tmp_path):
    table = tmp_path / "neighbours"
    day1 = neighbours(spark, DAY1, ["a"])
    delta_io.write_table(day1.unionByName(neighbours(spark, DAY2, ["b"])), str(table), SPEC)

    delta_io.write_table(
        spark.createDataFrame([], SPEC.schema),
        str(table),
        SPEC,
        mode="overwrite",
        replace_partition={"run_date": "2026-11-20"},
    )

    assert_same_rows(delta_io.read_table(spark, str(table), SPEC), day1)


# ---------------------------------------------------------------------------------------------
# Statistics and commit metadata
# ---------------------------------------------------------------------------------------------


def test_add_actions_carry_footer_stats(spark, tmp_path):
    table = tmp_path / "neighbours"
    ids = ["a", "b", "c", "d", "e", "f"]
    df = neighbours(spark, DAY2, ids)

    delta_io.write_table(df, str(table), SPEC, sort_within_files_by=("listing_id",), num_files=2)

    adds = add_actions(table)
    assert len(adds) == 2
    assert sum(a["num_records"] for a in adds) == 2 * len(ids)
    for add in adds:
        rows = pq.read_table(table / add["path"]).to_pylist()  # independent look at the file
        file_ids = [r["listing_id"] for r in rows]
        assert add["num_records"] == len(rows)
        assert add["min.listing_id"] == min(file_ids)
        assert add["max.listing_id"] == max(file_ids)
        assert (add["min.rank"], add["max.rank"]) == (1, 2)
        assert add["null_count.listing_id"] == 0
        assert add["null_count.score"] == 0
        assert add["min.score"] is None  # float bounds are left out on purpose (NaN)
        assert add["partition.run_date"] == DAY2
    # Range-partitioned by listing_id: the files cover disjoint id ranges.
    first, second = sorted(adds, key=lambda a: a["min.listing_id"])
    assert first["max.listing_id"] < second["min.listing_id"]


def test_stats_for_timestamps_dates_nulls_and_long_strings(spark, tmp_path):
    spec = TableSpec(
        name="stats_probe",
        schema=T.StructType(
            [
                T.StructField("key", T.StringType()),
                T.StructField("count", T.LongType()),
                T.StructField("at", T.TimestampType()),
                T.StructField("day", T.DateType()),
                T.StructField("flag", T.BooleanType()),
                T.StructField("tags", T.ArrayType(T.StringType())),
                T.StructField("part", T.StringType()),
            ]
        ),
        partition_by=("part",),
    )
    long_key = "k" * 40
    rows = [
        (
            "b",
            5,
            dt.datetime(2026, 11, 20, 10, 0, 0, 123456, tzinfo=dt.UTC),
            dt.date(2026, 1, 2),
            True,
            ["x"],
            "p",
        ),
        (
            long_key,
            None,
            dt.datetime(2026, 11, 20, 11, 0, 0, 999999, tzinfo=dt.UTC),
            None,
            None,
            None,
            "p",
        ),
    ]
    df = spark.createDataFrame(rows, spec.schema).coalesce(1)

    delta_io.write_table(df, str(tmp_path / "probe"), spec)

    (add,) = [a["add"] for a in log_actions(tmp_path / "probe", 0) if "add" in a]
    stats = json.loads(add["stats"])
    assert add["partitionValues"] == {"part": "p"}
    assert stats["numRecords"] == 2
    assert stats["minValues"] == {
        "key": "b",
        "count": 5,
        "at": "2026-11-20T10:00:00.123Z",
        "day": "2026-01-02",
    }
    # The 40-character key cannot be truncated into a valid upper bound, so no max for it;
    # the timestamp max is rounded up to the next millisecond.
    assert stats["maxValues"] == {"count": 5, "at": "2026-11-20T11:00:01.000Z", "day": "2026-01-02"}
    assert stats["nullCount"] == {"key": 0, "count": 1, "at": 0, "day": 1, "flag": 1}


def test_commit_metadata_in_history(spark, tmp_path):
    table = tmp_path / "neighbours"
    metadata = {"run_id": "run-42", "model_version": "m1", "recall_at_k": 0.93, "params": {"k": 2}}

    delta_io.write_table(neighbours(spark, DAY1, ["a"]), str(table), SPEC)
    delta_io.write_table(neighbours(spark, DAY2, ["b"]), str(table), SPEC, commit_metadata=metadata)

    ours = delta_io.history(str(table))
    assert [(h["version"], h["metadata"]) for h in ours] == [(1, metadata), (0, {})]
    assert len(delta_io.history(str(table), limit=1)) == 1
    independent = DeltaTable(str(table)).history()
    assert json.loads(independent[0]["userMetadata"]) == metadata
    assert independent[0]["operation"] == "WRITE"


# ---------------------------------------------------------------------------------------------
# Failures leave the table as it was
# ---------------------------------------------------------------------------------------------


def test_schema_mismatch_raises_before_touching_table(spark, tmp_path):
    table = tmp_path / "neighbours"
    good = neighbours(spark, DAY1, ["a"])
    delta_io.write_table(good, str(table), SPEC)
    files_before = data_files(table)
    wrong_type = good.withColumn("rank", F.col("rank").cast("long"))
    missing_column = good.drop("score")

    with pytest.raises(SchemaError, match="rank"):
        delta_io.write_table(wrong_type, str(table), SPEC)
    with pytest.raises(SchemaError, match="listing_neighbours"):
        delta_io.write_table(missing_column, str(table), SPEC, mode="overwrite")
    with pytest.raises(SchemaError):
        delta_io.write_table(wrong_type, str(tmp_path / "new"), SPEC)

    assert delta_io.latest_version(str(table)) == 0
    assert data_files(table) == files_before
    assert not (tmp_path / "new").exists()
    assert not delta_io.table_exists(str(tmp_path / "new"))


def test_existing_table_with_other_schema_is_refused_unless_fully_overwritten(spark, tmp_path):
    table = tmp_path / "neighbours"
    delta_io.write_table(neighbours(spark, DAY1, ["a"]), str(table), SPEC)
    wider_schema = T.StructType(
        [*SPEC.schema.fields[:-1], T.StructField("note", T.StringType()), SPEC.schema.fields[-1]]
    )
    wider = TableSpec(SPEC.name, wider_schema, SPEC.partition_by, SPEC.key, SPEC.required)
    df = spark.createDataFrame([("m", "a", "b", 1, 0.5, "hi", DAY2)], wider_schema)

    with pytest.raises(SchemaError, match="only a full overwrite"):
        delta_io.write_table(df, str(table), wider, mode="append")
    assert delta_io.latest_version(str(table)) == 0

    assert delta_io.write_table(df, str(table), wider, mode="overwrite") == 1
    assert_same_rows(delta_io.read_table(spark, str(table), wider), df)


def test_failure_before_commit_keeps_previous_version(spark, tmp_path, monkeypatch):
    table = tmp_path / "neighbours"
    day1 = neighbours(spark, DAY1, ["a", "b"])
    delta_io.write_table(day1, str(table), SPEC)
    files_before = data_files(table)
    staged = []

    def broken_commit(uri, spec, adds, **kwargs):
        staged.extend(a.path for a in adds)  # Spark has written, files are in place
        raise RuntimeError("commit service down")

    monkeypatch.setattr(delta_commit, "_commit", broken_commit)
    with pytest.raises(RuntimeError, match="commit service down"):
        delta_io.write_table(
            neighbours(spark, DAY1, ["x"]),
            str(table),
            SPEC,
            mode="overwrite",
            replace_partition={"run_date": "2026-11-19"},
        )

    assert staged, "the failure must come after Spark wrote the files"
    assert delta_io.latest_version(str(table)) == 0
    assert_same_rows(delta_io.read_table(spark, str(table), SPEC), day1)
    assert data_files(table) == files_before  # moved files of the failed write are removed
    assert list((table / delta_commit.STAGING_DIR).iterdir()) == []


def test_error_after_a_landed_commit_keeps_the_files(spark, tmp_path, monkeypatch):
    table = tmp_path / "neighbours"
    delta_io.write_table(neighbours(spark, DAY1, ["a"]), str(table), SPEC)
    real_commit = delta_commit._commit

    def commit_then_fail(*args, **kwargs):
        real_commit(*args, **kwargs)
        raise TimeoutError("lost the reply")

    monkeypatch.setattr(delta_commit, "_commit", commit_then_fail)
    day2 = neighbours(spark, DAY2, ["b"])
    with pytest.raises(TimeoutError):
        delta_io.write_table(day2, str(table), SPEC)

    assert delta_io.latest_version(str(table)) == 1
    assert_same_rows(
        delta_io.read_table(spark, str(table), SPEC),
        neighbours(spark, DAY1, ["a"]).unionByName(day2),
    )


def test_failed_first_write_leaves_no_table(spark, tmp_path, monkeypatch):
    table = tmp_path / "neighbours"
    monkeypatch.setattr(
        delta_commit, "_commit", lambda *a, **k: (_ for _ in ()).throw(OSError("x"))
    )

    with pytest.raises(OSError):
        delta_io.write_table(neighbours(spark, DAY1, ["a"]), str(table), SPEC)

    assert not delta_io.table_exists(str(table))
    assert delta_io.latest_version(str(table)) is None
    assert data_files(table) == set()


def test_rows_outside_the_replaced_partition_are_refused(spark, tmp_path):
    table = tmp_path / "neighbours"
    delta_io.write_table(neighbours(spark, DAY2, ["a"]), str(table), SPEC)
    files_before = data_files(table)
    mixed = neighbours(spark, DAY1, ["b"]).unionByName(neighbours(spark, DAY2, ["c"]))

    with pytest.raises(ValueError, match="overwriting partition"):
        delta_io.write_table(
            mixed, str(table), SPEC, mode="overwrite", replace_partition={"run_date": "2026-11-20"}
        )

    assert delta_io.latest_version(str(table)) == 0
    assert data_files(table) == files_before


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "upsert"}, "mode must be"),
        ({"mode": "append", "replace_partition": {"run_date": "2026-11-20"}}, "needs mode"),
        ({"mode": "overwrite", "replace_partition": {"rank": "1"}}, "not partition columns"),
        ({"sort_within_files_by": ("nope",)}, "unknown columns"),
        ({"num_files": 0}, "at least 1"),
    ],
)
def test_bad_write_arguments_are_refused(spark, tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        delta_io.write_table(neighbours(spark, DAY1, ["a"]), str(tmp_path / "t"), SPEC, **kwargs)
    assert not (tmp_path / "t").exists()


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def interaction_rows(spark, day, users):
    rows = [
        (u, "l1", "view", dt.datetime.combine(day, dt.time(9, 30)), "s1", "web", day) for u in users
    ]
    return spark.createDataFrame(rows, interactions.SPEC.schema)


def test_read_input_plain_hive_partitioned_parquet(spark, tmp_path):
    path = tmp_path / "interactions"
    df = interaction_rows(spark, DAY1, ["u1", "u2"]).unionByName(
        interaction_rows(spark, DAY2, ["u3"])
    )
    # Inputs from other teams: no Delta log, narrower types where widening is safe.
    df.withColumn("event_ts", F.col("event_ts").cast("string")).write.partitionBy(
        "event_date"
    ).parquet(str(path))

    result = delta_io.read_input(spark, str(path), interactions.SPEC)

    assert result.schema.fieldNames() == interactions.SPEC.columns
    assert_same_rows(result, df)


def test_read_input_delta_table(spark, tmp_path):
    path = tmp_path / "interactions"
    df = interaction_rows(spark, DAY1, ["u1"])
    delta_io.write_table(df, str(path), interactions.SPEC)

    assert_same_rows(delta_io.read_input(spark, str(path), interactions.SPEC), df)


def test_input_version_changes_with_data(spark, tmp_path):
    delta_path = tmp_path / "delta"
    delta_io.write_table(neighbours(spark, DAY1, ["a"]), str(delta_path), SPEC)
    assert delta_io.input_version(str(delta_path)) == "delta:0"
    delta_io.write_table(neighbours(spark, DAY2, ["b"]), str(delta_path), SPEC)
    assert delta_io.input_version(str(delta_path)) == "delta:1"

    parquet_path = tmp_path / "plain"
    interaction_rows(spark, DAY1, ["u1"]).write.partitionBy("event_date").parquet(str(parquet_path))
    first = delta_io.input_version(str(parquet_path))
    assert first.startswith("parquet:")
    assert delta_io.input_version(parquet_path.as_uri()) == first  # listing only, stable
    interaction_rows(spark, DAY2, ["u2"]).write.mode("append").partitionBy("event_date").parquet(
        str(parquet_path)
    )
    assert delta_io.input_version(str(parquet_path)) != first

    with pytest.raises(FileNotFoundError):
        delta_io.input_version(str(tmp_path / "missing"))


# ---------------------------------------------------------------------------------------------
# Native writer (no Delta jars here: option building and dispatch only)
# ---------------------------------------------------------------------------------------------


def test_native_options_for_partition_overwrite():
    options = delta_native.native_write_options(
        SPEC, "overwrite", {"run_date": "2026-11-20"}, {"run_id": "r1", "recall": 0.9}
    )

    assert options == {
        "partitionOverwriteMode": "static",
        "replaceWhere": "`run_date` = CAST('2026-11-20' AS date)",
        "userMetadata": '{"recall": 0.9, "run_id": "r1"}',
    }
    assert delta_native.native_write_options(SPEC, "append", None, None) == {}
    assert delta_native.native_write_options(SPEC, "overwrite", None, None) == {
        "partitionOverwriteMode": "static"
    }


def test_native_replace_where_escapes_and_types_each_column():
    spec = TableSpec(
        "t",
        T.StructType(
            [
                T.StructField("v", T.LongType()),
                T.StructField("city", T.StringType()),
                T.StructField("day", T.DateType()),
            ]
        ),
        partition_by=("city", "day"),
    )

    where = delta_native.replace_where(spec, {"city": "O'Hare\\x", "day": "2026-11-20"})

    assert where == (
        "`city` = CAST('O\\'Hare\\\\x' AS string) AND `day` = CAST('2026-11-20' AS date)"
    )


class _Recorder:
    """Stands in for Spark's DataFrameWriter/DataFrameReader and records the calls."""

    def __init__(self, result=None):
        self.calls: list[tuple] = []
        self.result = result

    def __getattr__(self, name):
        def call(*args):
            self.calls.append((name, *args))
            return self.result if name in ("save", "load") else self

        return call


def test_write_table_dispatches_to_native_writer(spark, monkeypatch, tmp_path):
    writer = _Recorder()

    class FakeFrame:
        schema = SPEC.schema
        sparkSession = spark
        write = writer

    monkeypatch.setattr(delta_io, "has_delta_extension", lambda _spark: True)
    monkeypatch.setattr(delta_native, "_native_latest_version", lambda _spark, _uri: 7)

    version = delta_io.write_table(
        FakeFrame(),
        str(tmp_path / "t"),
        SPEC,
        mode="overwrite",
        replace_partition={"run_date": "2026-11-20"},
        commit_metadata={"run_id": "r1"},
    )

    assert version == 7
    assert writer.calls == [
        ("format", "delta"),
        ("mode", "overwrite"),
        ("partitionBy", "run_date"),
        ("option", "partitionOverwriteMode", "static"),
        ("option", "replaceWhere", "`run_date` = CAST('2026-11-20' AS date)"),
        ("option", "userMetadata", '{"run_id": "r1"}'),
        ("save", (tmp_path / "t").as_uri()),
    ]
    assert not (tmp_path / "t").exists()


def test_read_table_dispatches_to_native_reader(spark, monkeypatch, tmp_path):
    stored = neighbours(spark, DAY1, ["a"]).unionByName(neighbours(spark, DAY2, ["b"]))
    reader = _Recorder(result=stored)

    class FakeSession:
        read = reader

    monkeypatch.setattr(delta_io, "has_delta_extension", lambda _spark: True)

    result = delta_io.read_table(
        FakeSession(), str(tmp_path / "t"), SPEC, version=3, partition={"run_date": "2026-11-20"}
    )

    assert reader.calls == [
        ("format", "delta"),
        ("option", "versionAsOf", 3),
        ("load", (tmp_path / "t").as_uri()),
    ]
    assert_same_rows(result, neighbours(spark, DAY2, ["b"]))


def test_unpartitioned_table_with_maps_and_timestamps(spark, tmp_path):
    table = tmp_path / "runs"
    started = dt.datetime(2026, 11, 20, 2, 0, tzinfo=dt.UTC)
    rows = [
        (
            "run-1",
            DAY2,
            "m1",
            "succeeded",
            started,
            started + dt.timedelta(minutes=42),
            {"interactions": "delta:3"},
            {"listings": 6},
            {"train": 12.5},
            {"recall_at_10": 0.97},
            {"k": "10"},
            None,
        )
    ]
    df = spark.createDataFrame(rows, runs.SPEC.schema)

    assert delta_io.write_table(df, str(table), runs.SPEC) == 0
    assert delta_io.write_table(df, str(table), runs.SPEC, mode="overwrite") == 1

    # One row; chispa's ignore_row_order cannot sort map columns.
    assert delta_io.read_table(spark, str(table), runs.SPEC).collect() == df.collect()
    (add,) = add_actions(table)
    assert "/" not in add["path"]
    assert add["num_records"] == 1
    assert add["min.started_at"] == started
    assert DeltaTable(str(table)).metadata().partition_columns == []
