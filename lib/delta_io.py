"""Reading and writing Delta tables: the one module through which every table is read and written.

Two writers sit behind one interface (see docs/architecture.md), picked by the session alone:

* native (``lib.delta_native``): the session has Delta's SQL extension (cluster, jars from
  ``--packages``), so ``df.write.format("delta")`` writes and commits, with ``replaceWhere`` for
  a partition overwrite and ``userMetadata`` for the commit metadata;
* embedded (``lib.delta_commit``; default, no Delta jars): Spark's own Parquet writer writes the
  files into a staging folder inside the table, the driver moves them into the table's
  hive-style partition folders, builds Delta per-file statistics from the Parquet footers
  (``lib.delta_stats``) and commits all files as one Delta transaction with the ``deltalake``
  package (delta-rs).

Either way the result is a plain Delta table (protocol 1/2) that Spark+Delta, delta-rs, Polars and
DuckDB read. History, versions, existence checks and retention go through delta-rs in both
modes (retention through Delta Lake when the session has it). This module also reads inputs
that are plain Parquet (``read_input``, ``input_version``).

Paths: local paths, ``file://`` URIs and object-store URIs (``lib.table_uris``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from delta.tables import DeltaTable as SparkDeltaTable
from deltalake import CommitProperties, DeltaTable
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import types as T

from lib.delta_commit import clean_staging, metadata_json, write_embedded
from lib.delta_native import read_native, sql_literal, write_native
from lib.schema_check import SchemaError, check_matches, conform
from lib.session import has_delta_extension
from lib.table_uris import (
    IO_THREADS,
    arrow_uri,
    filesystem,
    is_hidden,
    normalise,
    relative,
    spark_file_uri,
)
from schemas import TableSpec

WRITE_MODES = ("append", "overwrite")
# Reader features that do not change which rows a data file holds or how its columns are named,
# so reading the files listed by delta-rs with Spark's Parquet reader is still exact.
_PLAIN_READER_FEATURES = frozenset({"timestampNtz", "v2Checkpoint", "vacuumProtocolCheck"})


def write_table(
    df: DataFrame,
    path: str,
    spec: TableSpec,
    *,
    mode: str = "append",
    replace_partition: dict[str, str] | None = None,
    commit_metadata: dict[str, object] | None = None,
    sort_within_files_by: Sequence[str] = (),
    num_files: int | None = None,
) -> int:
    """Write ``df`` to the Delta table at ``path`` as one commit; return the committed version.

    ``mode="append"`` adds rows; ``mode="overwrite"`` replaces the whole table, or only the
    partition ``replace_partition`` (e.g. ``{"run_date": "2026-11-20"}``) when given, in which
    case every row must belong to that partition. The table is created, partitioned as the spec
    says, on first write. ``commit_metadata`` (JSON-able) is stored in the commit's
    ``userMetadata`` and shows up in :func:`history`. ``sort_within_files_by`` range-partitions
    and sorts rows so each file covers a narrow key range (point lookups read few files);
    ``num_files`` sets the number of write tasks, i.e. about the files per written partition.

    The DataFrame must match the spec exactly (``SchemaError`` otherwise, before anything is
    written). A failure before the commit leaves the table at its previous version.
    """
    check_matches(df, spec)
    _check_write_arguments(spec, mode, replace_partition, sort_within_files_by, num_files)
    df = _layout(df, spec, sort_within_files_by, num_files)
    uri = normalise(path)
    if has_delta_extension(df.sparkSession):
        return write_native(df, uri, spec, mode, replace_partition, commit_metadata)
    return write_embedded(df, uri, spec, mode, replace_partition, commit_metadata)


def read_table(
    spark: SparkSession,
    path: str,
    spec: TableSpec,
    *,
    version: int | None = None,
    partition: dict[str, str] | None = None,
) -> DataFrame:
    """Read the Delta table at ``path`` (optionally an older ``version`` or one ``partition``),
    conformed to ``spec``. An empty table or partition gives an empty DataFrame."""
    _check_partition_keys(spec, partition, "partition")
    uri = normalise(path)
    if has_delta_extension(spark):
        return read_native(spark, uri, spec, version, partition)
    table = DeltaTable(arrow_uri(uri), version=version)
    _check_plain_readable(table, spec)
    if partition:
        files = table.file_uris(
            file_pruning_predicate=[(k, "=", str(v)) for k, v in partition.items()]
        )
    else:
        files = table.file_uris()
    if not files:
        return spark.createDataFrame([], spec.schema)
    # basePath makes Spark take the partition columns from the hive-style folder names, typed
    # by the spec's schema.
    df = (
        spark.read.option("basePath", uri)
        .schema(spec.schema)
        .parquet(*[spark_file_uri(f, uri) for f in files])
    )
    return conform(df, spec)


def table_exists(path: str) -> bool:
    """True when ``path`` holds a Delta table (has a readable ``_delta_log``)."""
    return DeltaTable.is_deltatable(arrow_uri(normalise(path)))


def latest_version(path: str) -> int | None:
    """The table's current version, or None when ``path`` is not a Delta table."""
    uri = arrow_uri(normalise(path))
    if not DeltaTable.is_deltatable(uri):
        return None
    return DeltaTable(uri).version()


def history(path: str, limit: int | None = None) -> list[dict]:
    """Commit infos, newest first, each with ``version`` and ``metadata`` (our commit metadata,
    parsed from ``userMetadata``; ``{}`` for commits without any)."""
    entries = DeltaTable(arrow_uri(normalise(path))).history(limit)
    for entry in entries:
        entry["metadata"] = _parse_user_metadata(entry.get("userMetadata"))
    return entries


def read_input(spark: SparkSession, path: str, spec: TableSpec) -> DataFrame:
    """Read an input that is either a Delta table or plain (possibly hive-partitioned) Parquet,
    conformed to ``spec`` (safe casts only, ``SchemaError`` otherwise)."""
    if table_exists(path):
        return read_table(spark, path, spec)
    _require_no_nanosecond_timestamps(normalise(path), spec)
    return conform(spark.read.parquet(normalise(path)), spec)


NANOSECONDS = (
    "nanosecond timestamps (pandas' default), which Spark cannot read; write them in "
    "microseconds: df.to_parquet(path, coerce_timestamps='us', allow_truncated_timestamps=True) "
    "or df[column] = df[column].astype('datetime64[us, UTC]') first"
)


def _require_no_nanosecond_timestamps(uri: str, spec: TableSpec) -> None:
    """``SchemaError`` naming the column when a Parquet file of the input holds nanoseconds.

    Spark stops on INT64 TIMESTAMP(NANOS) with a bare AnalysisException (PARQUET_TYPE_ILLEGAL)
    that names neither table nor column, and only after a failed task. Its legacy
    ``nanosAsLong`` reading gives longs, not timestamps. So the footers are checked first (in
    parallel, no data read), every file, since files written by different tools can differ.
    """
    fs, root = filesystem(uri)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.File:
        files = [root]
    elif info.type == pafs.FileType.Directory:
        files = sorted(
            f.path
            for f in fs.get_file_info(pafs.FileSelector(root, recursive=True))
            if f.type == pafs.FileType.File and not is_hidden(relative(f.path, root))
        )
    else:
        return  # Spark names the missing path

    def nanosecond_column(file_path: str) -> str | None:
        try:
            schema = pq.read_schema(file_path, filesystem=fs)
        except pa.ArrowInvalid:
            return None  # not Parquet: Spark's own error says so
        return next((f.name for f in schema if _holds_nanoseconds(f.type)), None)

    with ThreadPoolExecutor(IO_THREADS) as pool:
        for file_path, column in zip(files, pool.map(nanosecond_column, files), strict=True):
            if column is not None:
                raise SchemaError(spec.name, column, f"{NANOSECONDS} (file {file_path})")


def _holds_nanoseconds(data_type: pa.DataType) -> bool:
    if pa.types.is_timestamp(data_type):
        return data_type.unit == "ns"
    # Lists, structs and maps: Spark fails on a nanosecond field anywhere inside them too.
    return any(_holds_nanoseconds(data_type.field(i).type) for i in range(data_type.num_fields))


def input_version(path: str) -> str:
    """What a run read: ``"delta:<version>"`` for a Delta table, else ``"parquet:<hash>"`` of the
    data files' names, sizes and modification times (listing only, no file is opened)."""
    version = latest_version(path)
    if version is not None:
        return f"delta:{version}"
    fs, root = filesystem(normalise(path))
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"input {path!r} does not exist")
    if info.type == pafs.FileType.File:
        listing = [(info.base_name, info.size, info.mtime_ns)]
    else:
        listing = [
            (rel, f.size, f.mtime_ns)
            for f in fs.get_file_info(pafs.FileSelector(root, recursive=True))
            if f.type == pafs.FileType.File and not is_hidden(rel := relative(f.path, root))
        ]
    digest = hashlib.sha256()
    for rel, size, mtime_ns in sorted(listing):
        digest.update(f"{rel}\t{size}\t{mtime_ns}\n".encode())
    return f"parquet:{digest.hexdigest()[:16]}"


def apply_retention(
    spark: SparkSession | None,
    path: str,
    spec: TableSpec,
    *,
    keep_last: int | None,
    vacuum_hours: float | None = None,
    partition_column: str | None = None,
) -> dict[str, Any]:
    """Keep the newest ``keep_last`` values of ``partition_column`` (default: the spec's first
    partition column, e.g. the last N run dates) and remove every older partition in one commit;
    then, unless ``vacuum_hours`` is None, delete files no commit has referenced for that long,
    including files a killed write left behind in the table's folders or in its staging folder.
    ``keep_last`` None or 0 keeps every partition.

    With Delta's extension in ``spark`` this runs ``DeltaTable.delete``/``vacuum`` of Delta
    Lake (which refuses windows under 168 hours unless its retention check is disabled);
    otherwise delta-rs. A window shorter than the longest write may delete the files of a write
    still in progress. Returns ``removed`` (partition values), ``vacuumed`` (table files deleted;
    None under Delta Lake, which does not report them), ``stale_staging_files`` and the table
    ``version`` afterwards.
    """
    uri = normalise(path)
    column = partition_column or (spec.partition_by[0] if spec.partition_by else None)
    if column is None or column not in spec.partition_by:
        raise ValueError(f"{spec.name}: retention needs a partition column, got {column!r}")
    if keep_last is not None and keep_last < 0:
        raise ValueError(f"keep_last must be >= 0, got {keep_last}")
    if vacuum_hours is not None and vacuum_hours < 0:
        raise ValueError(f"vacuum_hours must be >= 0, got {vacuum_hours}")
    if not table_exists(uri):
        return {"removed": [], "vacuumed": 0, "stale_staging_files": 0, "version": None}
    native = spark is not None and has_delta_extension(spark)
    data_type = {f.name: f.dataType for f in spec.schema.fields}[column]
    values = {
        p[column] for p in DeltaTable(arrow_uri(uri)).partitions() if p.get(column) is not None
    }
    ordered = sorted(values, key=lambda v: _partition_sort_key(v, data_type))
    removed = ordered[:-keep_last] if keep_last else []
    if removed:
        cutoff = ordered[-keep_last]
        metadata = metadata_json(
            {"operation": "retention", "keep_last": keep_last, "removed": removed}
        )
        if native:
            condition = f"`{column}` < {sql_literal(cutoff, data_type)}"
            spark.conf.set("spark.databricks.delta.commitInfo.userMetadata", metadata)
            try:
                SparkDeltaTable.forPath(spark, uri).delete(condition)
            finally:
                spark.conf.unset("spark.databricks.delta.commitInfo.userMetadata")
        else:
            DeltaTable(arrow_uri(uri)).delete(
                f'"{column}" < {_delta_rs_literal(cutoff, data_type)}',
                commit_properties=CommitProperties(custom_metadata={"userMetadata": metadata}),
            )
    vacuumed: int | None = 0
    stale = 0
    if vacuum_hours is not None:
        if native:
            SparkDeltaTable.forPath(spark, uri).vacuum(float(vacuum_hours))
            vacuumed = None  # Delta Lake's vacuum does not say which files it deleted
        else:
            vacuumed = len(
                DeltaTable(arrow_uri(uri)).vacuum(
                    retention_hours=int(vacuum_hours),
                    dry_run=False,
                    enforce_retention_duration=False,
                    full=True,
                )
            )
        stale = clean_staging(uri, vacuum_hours)
    return {
        "removed": removed,
        "vacuumed": vacuumed,
        "stale_staging_files": stale,
        "version": latest_version(uri),
    }


def _partition_sort_key(value: str, data_type: T.DataType) -> Any:
    if isinstance(data_type, T.ByteType | T.ShortType | T.IntegerType | T.LongType):
        return int(value)
    return value  # ISO dates and timestamps order as text


def _delta_rs_literal(value: str, data_type: T.DataType) -> str:
    if isinstance(data_type, T.ByteType | T.ShortType | T.IntegerType | T.LongType):
        return str(int(value))
    escaped = str(value).replace("'", "''")
    return f"'{escaped}'"


# --------------------------------------------------------------------------------------------
# Arguments, layout, readability
# --------------------------------------------------------------------------------------------


def _check_write_arguments(
    spec: TableSpec,
    mode: str,
    replace_partition: Mapping[str, str] | None,
    sort_within_files_by: Sequence[str],
    num_files: int | None,
) -> None:
    if mode not in WRITE_MODES:
        raise ValueError(f"mode must be one of {WRITE_MODES}, got {mode!r}")
    if replace_partition is not None:
        if mode != "overwrite":
            raise ValueError("replace_partition needs mode='overwrite'")
        if not replace_partition:
            raise ValueError("replace_partition must name at least one partition column")
    _check_partition_keys(spec, replace_partition, "replace_partition")
    unknown = [c for c in sort_within_files_by if c not in spec.columns]
    if unknown:
        raise ValueError(f"sort_within_files_by names unknown columns {unknown} of {spec.name}")
    if num_files is not None and num_files < 1:
        raise ValueError(f"num_files must be at least 1, got {num_files}")


def _check_partition_keys(spec: TableSpec, values: Mapping[str, str] | None, argument: str) -> None:
    unknown = [k for k in values or {} if k not in spec.partition_by]
    if unknown:
        raise ValueError(
            f"{argument} keys {unknown} are not partition columns of {spec.name} "
            f"(partitioned by {list(spec.partition_by)})"
        )


def _layout(
    df: DataFrame, spec: TableSpec, sort_within_files_by: Sequence[str], num_files: int | None
) -> DataFrame:
    """Shape the write tasks: range-partitioned and sorted by the sort keys so each file holds a
    narrow, disjoint key range (its min/max statistics then prune point lookups)."""
    sort = [*spec.partition_by, *sort_within_files_by]
    if sort_within_files_by:
        ranged = (
            df.repartitionByRange(num_files, *sort) if num_files else df.repartitionByRange(*sort)
        )
        # Spark's file writer sorts by partition columns first; keeping them as the sort prefix
        # lets it reuse this order instead of re-sorting.
        return ranged.sortWithinPartitions(*sort)
    if num_files:
        return df.repartition(num_files)
    return df


def _check_plain_readable(table: DeltaTable, spec: TableSpec) -> None:
    """Listing files and reading them as Parquet is only exact for tables without deletion
    vectors or column mapping; those need a Delta-enabled session."""
    protocol = table.protocol()
    features = set(protocol.reader_features or [])
    if protocol.min_reader_version == 2 or not features <= _PLAIN_READER_FEATURES:
        raise ValueError(
            f"{spec.name}: table needs Delta reader features "
            f"{sorted(features) or ['columnMapping']}; read it with a session that has Delta's "
            "extension"
        )


def _parse_user_metadata(raw: object) -> dict[str, Any]:
    if not isinstance(raw, str):
        return {}
    try:
        parsed = json.loads(raw)
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}
