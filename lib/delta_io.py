"""Reading and writing Delta tables: the one module through which every table is read and written.

Two writers sit behind one interface (see ARCHITECTURE.md):

* native: the session has Delta's SQL extension (cluster, jars from ``--packages``), so
  ``df.write.format("delta")`` writes and commits, with ``replaceWhere`` for a partition overwrite
  and ``userMetadata`` for the commit metadata;
* embedded (default, no Delta jars): Spark's own Parquet writer writes the files into a staging
  folder inside the table, the driver moves them into the table's hive-style partition folders,
  builds Delta per-file statistics from the Parquet footers and commits all files as one Delta
  transaction with the ``deltalake`` package (delta-rs).

Either way the result is a plain Delta table (protocol 1/2) that Spark+Delta, delta-rs, Polars and
DuckDB read. History, versions and existence checks go through delta-rs in both modes.

Paths: local paths, ``file://`` URIs and object-store URIs; ``s3a://`` (Spark's name) is handed to
pyarrow and delta-rs as ``s3://``. Driver-side file moves use ``pyarrow.fs``, so nothing here is
tied to local disks.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import posixpath
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from delta.tables import DeltaTable as SparkDeltaTable
from deltalake import CommitProperties, DeltaTable
from deltalake import Schema as DeltaSchema
from deltalake.transaction import AddAction, create_table_with_add_actions
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from lib.schema_check import SchemaError, arrow_schema, check_matches, conform
from lib.session import has_delta_extension
from schemas import TableSpec

WRITE_MODES = ("append", "overwrite")

# Spark ignores folders starting with "_" or "." when it lists a table, and so do Delta's vacuum
# and our own listing: the staging area can never be mistaken for data.
STAGING_DIR = "_staging"

# Key under which each embedded commit records its write id, so the writer can find the version
# it committed even when another writer commits right after it.
WRITE_ID_KEY = "writeId"

# Delta (Spark) truncates string statistics to a 32-character prefix; we keep the same bound.
_STRING_STATS_PREFIX = 32

# Min/max are collected for these types only. Float/double are left out on purpose: Parquet
# footers ignore or keep NaN depending on the writer, and Delta readers order NaN above every
# number, so a footer max could wrongly let a reader skip a file holding NaN.
_BOUNDED_TYPES = (
    T.ByteType,
    T.ShortType,
    T.IntegerType,
    T.LongType,
    T.StringType,
    T.DateType,
    T.TimestampType,
)
_NESTED_TYPES = (T.ArrayType, T.MapType, T.StructType)

_HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_IO_THREADS = 16
# Reader features that do not change which rows a data file holds or how its columns are named,
# so reading the files listed by delta-rs with Spark's Parquet reader is still exact.
_PLAIN_READER_FEATURES = frozenset({"timestampNtz", "v2Checkpoint", "vacuumProtocolCheck"})


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


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
    uri = _normalise(path)
    if has_delta_extension(df.sparkSession):
        return _write_native(df, uri, spec, mode, replace_partition, commit_metadata)
    return _write_embedded(df, uri, spec, mode, replace_partition, commit_metadata)


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
    uri = _normalise(path)
    if has_delta_extension(spark):
        return _read_native(spark, uri, spec, version, partition)
    table = DeltaTable(_arrow_uri(uri), version=version)
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
        .parquet(*[_spark_file_uri(f, uri) for f in files])
    )
    return conform(df, spec)


def table_exists(path: str) -> bool:
    """True when ``path`` holds a Delta table (has a readable ``_delta_log``)."""
    return DeltaTable.is_deltatable(_arrow_uri(_normalise(path)))


def latest_version(path: str) -> int | None:
    """The table's current version, or None when ``path`` is not a Delta table."""
    uri = _arrow_uri(_normalise(path))
    if not DeltaTable.is_deltatable(uri):
        return None
    return DeltaTable(uri).version()


def history(path: str, limit: int | None = None) -> list[dict]:
    """Commit infos, newest first, each with ``version`` and ``metadata`` (our commit metadata,
    parsed from ``userMetadata``; ``{}`` for commits without any)."""
    entries = DeltaTable(_arrow_uri(_normalise(path))).history(limit)
    for entry in entries:
        entry["metadata"] = _parse_user_metadata(entry.get("userMetadata"))
    return entries


def read_input(spark: SparkSession, path: str, spec: TableSpec) -> DataFrame:
    """Read an input that is either a Delta table or plain (possibly hive-partitioned) Parquet,
    conformed to ``spec`` (safe casts only, ``SchemaError`` otherwise)."""
    if table_exists(path):
        return read_table(spark, path, spec)
    _require_no_nanosecond_timestamps(_normalise(path), spec)
    return conform(spark.read.parquet(_normalise(path)), spec)


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
    fs, root = _filesystem(uri)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.File:
        files = [root]
    elif info.type == pafs.FileType.Directory:
        files = sorted(
            f.path
            for f in fs.get_file_info(pafs.FileSelector(root, recursive=True))
            if f.type == pafs.FileType.File and not _is_hidden(_relative(f.path, root))
        )
    else:
        return  # Spark names the missing path

    def nanosecond_column(file_path: str) -> str | None:
        try:
            schema = pq.read_schema(file_path, filesystem=fs)
        except pa.ArrowInvalid:
            return None  # not Parquet: Spark's own error says so
        return next((f.name for f in schema if _holds_nanoseconds(f.type)), None)

    with ThreadPoolExecutor(_IO_THREADS) as pool:
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
    fs, root = _filesystem(_normalise(path))
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"input {path!r} does not exist")
    if info.type == pafs.FileType.File:
        listing = [(info.base_name, info.size, info.mtime_ns)]
    else:
        listing = [
            (rel, f.size, f.mtime_ns)
            for f in fs.get_file_info(pafs.FileSelector(root, recursive=True))
            if f.type == pafs.FileType.File and not _is_hidden(rel := _relative(f.path, root))
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
    uri = _normalise(path)
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
        p[column] for p in DeltaTable(_arrow_uri(uri)).partitions() if p.get(column) is not None
    }
    ordered = sorted(values, key=lambda v: _partition_sort_key(v, data_type))
    removed = ordered[:-keep_last] if keep_last else []
    if removed:
        cutoff = ordered[-keep_last]
        metadata = _metadata_json(
            {"operation": "retention", "keep_last": keep_last, "removed": removed}
        )
        if native:
            condition = f"`{column}` < {_sql_literal(cutoff, data_type)}"
            spark.conf.set("spark.databricks.delta.commitInfo.userMetadata", metadata)
            try:
                SparkDeltaTable.forPath(spark, uri).delete(condition)
            finally:
                spark.conf.unset("spark.databricks.delta.commitInfo.userMetadata")
        else:
            DeltaTable(_arrow_uri(uri)).delete(
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
                DeltaTable(_arrow_uri(uri)).vacuum(
                    retention_hours=int(vacuum_hours),
                    dry_run=False,
                    enforce_retention_duration=False,
                    full=True,
                )
            )
        stale = _clean_staging(uri, vacuum_hours)
    return {
        "removed": removed,
        "vacuumed": vacuumed,
        "stale_staging_files": stale,
        "version": latest_version(uri),
    }


def _clean_staging(uri: str, older_than_hours: float) -> int:
    """Delete staging folders of writes that stopped (killed) more than ``older_than_hours`` ago:
    no commit can name their files, and Delta's vacuum never looks inside ``_`` folders."""
    fs, root = _filesystem(uri)
    staging = f"{root}/{STAGING_DIR}"
    if fs.get_file_info(staging).type != pafs.FileType.Directory:
        return 0
    cutoff_ns = (dt.datetime.now(dt.UTC).timestamp() - older_than_hours * 3600) * 1e9
    deleted = 0
    for folder in fs.get_file_info(pafs.FileSelector(staging)):
        if folder.type != pafs.FileType.Directory:
            continue
        inside = fs.get_file_info(pafs.FileSelector(folder.path, recursive=True))
        newest = max([f.mtime_ns or 0 for f in inside] + [folder.mtime_ns or 0])
        if newest < cutoff_ns:
            fs.delete_dir(folder.path)
            deleted += sum(f.type == pafs.FileType.File for f in inside)
    return deleted


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
# Arguments, layout and paths
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


def _normalise(path: str | os.PathLike[str]) -> str:
    """The table location as a URI without trailing slash: local paths become ``file://`` URIs."""
    text = os.fspath(path)
    if text.startswith("file:") and not text.startswith("file://"):  # Hadoop's file:/tmp/x
        text = "file://" + text[len("file:") :]
    if "://" not in text:
        text = "file://" + os.path.abspath(text)
    return text.rstrip("/")


def _arrow_uri(uri: str) -> str:
    """The URI for pyarrow and delta-rs, which call Spark's ``s3a://`` plain ``s3://``."""
    return "s3://" + uri[len("s3a://") :] if uri.startswith("s3a://") else uri


def _spark_file_uri(file_uri: str, table_uri: str) -> str:
    """A file URI from delta-rs as Spark needs it (delta-rs lists local files as bare paths)."""
    if "://" not in file_uri:
        return "file://" + file_uri
    if table_uri.startswith("s3a://") and file_uri.startswith("s3://"):
        return "s3a://" + file_uri[len("s3://") :]
    return file_uri


def _filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    fs, root = pafs.FileSystem.from_uri(_arrow_uri(uri))
    return fs, root.rstrip("/")


def _relative(path: str, root: str) -> str:
    return path[len(root) :].lstrip("/")


def _is_hidden(relative_path: str) -> bool:
    return any(part.startswith(("_", ".")) for part in relative_path.split("/"))


def _parse_user_metadata(raw: object) -> dict[str, Any]:
    if not isinstance(raw, str):
        return {}
    try:
        parsed = json.loads(raw)
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _metadata_json(commit_metadata: Mapping[str, object]) -> str:
    return json.dumps(dict(commit_metadata), sort_keys=True, default=str)


# --------------------------------------------------------------------------------------------
# Native writer (session with Delta's SQL extension)
# --------------------------------------------------------------------------------------------


def _sql_literal(value: str, data_type: T.DataType) -> str:
    escaped = str(value).replace("\\", "\\\\").replace("'", "\\'")
    return f"CAST('{escaped}' AS {data_type.simpleString()})"


def _replace_where(spec: TableSpec, replace_partition: Mapping[str, str]) -> str:
    """The ``replaceWhere`` predicate selecting exactly one partition, typed by the spec."""
    types = {f.name: f.dataType for f in spec.schema.fields}
    return " AND ".join(
        f"`{key}` = {_sql_literal(value, types[key])}" for key, value in replace_partition.items()
    )


def _native_write_options(
    spec: TableSpec,
    mode: str,
    replace_partition: Mapping[str, str] | None,
    commit_metadata: Mapping[str, object] | None,
) -> dict[str, str]:
    options: dict[str, str] = {}
    if mode == "overwrite":
        # A session set to dynamic partition overwrite would otherwise turn a whole-table
        # overwrite into a per-partition one, and Delta refuses replaceWhere with dynamic mode.
        options["partitionOverwriteMode"] = "static"
    if replace_partition:
        options["replaceWhere"] = _replace_where(spec, replace_partition)
    if commit_metadata:
        options["userMetadata"] = _metadata_json(commit_metadata)
    return options


def _write_native(
    df: DataFrame,
    uri: str,
    spec: TableSpec,
    mode: str,
    replace_partition: Mapping[str, str] | None,
    commit_metadata: Mapping[str, object] | None,
) -> int:
    writer = df.write.format("delta").mode(mode)
    if spec.partition_by:
        writer = writer.partitionBy(*spec.partition_by)
    for key, value in _native_write_options(spec, mode, replace_partition, commit_metadata).items():
        writer = writer.option(key, value)
    writer.save(uri)
    return _native_latest_version(df.sparkSession, uri)


def _native_latest_version(spark: SparkSession, uri: str) -> int:
    return int(SparkDeltaTable.forPath(spark, uri).history(1).head()["version"])


def _partition_condition(spec: TableSpec, partition: Mapping[str, str]) -> Column:
    types = {f.name: f.dataType for f in spec.schema.fields}
    condition = F.lit(True)
    for key, value in partition.items():
        condition = condition & (F.col(key) == F.lit(str(value)).cast(types[key]))
    return condition


def _read_native(
    spark: SparkSession,
    uri: str,
    spec: TableSpec,
    version: int | None,
    partition: Mapping[str, str] | None,
) -> DataFrame:
    reader = spark.read.format("delta")
    if version is not None:
        reader = reader.option("versionAsOf", version)
    df = reader.load(uri)
    if partition:
        df = df.where(_partition_condition(spec, partition))
    return conform(df, spec)


# --------------------------------------------------------------------------------------------
# Embedded writer (Spark writes Parquet, delta-rs commits)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _StagedFile:
    relative_path: str  # e.g. "run_date=2026-11-20/part-00000-<uuid>.c000.snappy.parquet"
    partition_values: dict[str, str | None]


def _write_embedded(
    df: DataFrame,
    uri: str,
    spec: TableSpec,
    mode: str,
    replace_partition: Mapping[str, str] | None,
    commit_metadata: Mapping[str, object] | None,
) -> int:
    full_overwrite = mode == "overwrite" and not replace_partition
    if DeltaTable.is_deltatable(_arrow_uri(uri)):
        _check_table_matches(DeltaTable(_arrow_uri(uri)), spec, allow_new_schema=full_overwrite)
    fs, root = _filesystem(uri)
    write_id = uuid.uuid4().hex
    staging = f"{root}/{STAGING_DIR}/{write_id}"
    staged: list[_StagedFile] = []
    custom_metadata: dict[str, object] = {WRITE_ID_KEY: write_id}
    if commit_metadata:
        custom_metadata["userMetadata"] = _metadata_json(commit_metadata)
    try:
        writer = df.write.mode("errorifexists")
        if spec.partition_by:
            writer = writer.partitionBy(*spec.partition_by)
        writer.parquet(f"{uri}/{STAGING_DIR}/{write_id}")
        staged = _staged_files(fs, staging, spec)
        _check_within_partition(staged, replace_partition, spec)
        adds = _publish(fs, staging, root, staged, spec)
        _commit(
            uri,
            spec,
            adds,
            mode=mode,
            replace_partition=replace_partition,
            custom_metadata=custom_metadata,
        )
    except BaseException:
        # Files already moved into the table are invisible (no commit names them) but would
        # linger; remove them unless the commit may have landed despite the error. When the log
        # cannot be read, keep them: an unreferenced file is harmless, a referenced one missing
        # would break the table.
        if staged:
            try:
                landed = _find_commit(uri, write_id) is not None
            except Exception:
                landed = True
            if not landed:
                _delete_quietly(fs, [f"{root}/{f.relative_path}" for f in staged])
        raise
    finally:
        _delete_dir_quietly(fs, staging)
    version = _find_commit(uri, write_id)
    return version if version is not None else DeltaTable(_arrow_uri(uri)).version()


def _staged_files(fs: pafs.FileSystem, staging: str, spec: TableSpec) -> list[_StagedFile]:
    """The Parquet files Spark wrote, with partition values from their hive-style folders."""
    if fs.get_file_info(staging).type == pafs.FileType.NotFound:
        return []  # Spark wrote nothing (empty partitioned DataFrame)
    files = []
    for info in fs.get_file_info(pafs.FileSelector(staging, recursive=True)):
        rel = _relative(info.path, staging)
        if info.type != pafs.FileType.File or _is_hidden(rel) or not rel.endswith(".parquet"):
            continue
        *folders, _name = rel.split("/")
        values: dict[str, str | None] = {}
        for folder in folders:
            key, _, raw = folder.partition("=")
            values[key] = None if raw == _HIVE_NULL else unquote(raw)
        if list(values) != list(spec.partition_by):
            raise RuntimeError(f"unexpected file {rel!r} in staging folder {staging!r}")
        files.append(_StagedFile(rel, values))
    return files


def _check_within_partition(
    staged: Sequence[_StagedFile], replace_partition: Mapping[str, str] | None, spec: TableSpec
) -> None:
    if not replace_partition:
        return
    want = {k: str(v) for k, v in replace_partition.items()}
    outside = sorted(
        {
            str(f.partition_values)
            for f in staged
            if any(f.partition_values[k] != v for k, v in want.items())
        }
    )
    if outside:
        raise ValueError(
            f"{spec.name}: overwriting partition {want} but rows belong to {outside[:5]}"
        )


def _publish(
    fs: pafs.FileSystem, staging: str, root: str, staged: Sequence[_StagedFile], spec: TableSpec
) -> list[AddAction]:
    """Move staged files into the table's partition folders and describe each as an add action."""

    def publish_one(staged_file: _StagedFile) -> AddAction | None:
        source = f"{staging}/{staged_file.relative_path}"
        target = f"{root}/{staged_file.relative_path}"
        footer = pq.read_metadata(source, filesystem=fs)
        if footer.num_rows == 0:
            return None  # Spark writes a schema-only file for an empty DataFrame; skip it
        fs.create_dir(posixpath.dirname(target), recursive=True)
        fs.move(source, target)
        info = fs.get_file_info(target)
        return AddAction(
            path=staged_file.relative_path,  # delta-rs URI-encodes it in the log
            size=info.size,
            partition_values=staged_file.partition_values,
            modification_time=info.mtime_ns // 1_000_000,
            data_change=True,
            stats=json.dumps(footer_stats(footer, spec)),
        )

    if not staged:
        return []
    with ThreadPoolExecutor(max_workers=min(_IO_THREADS, len(staged))) as pool:
        return [a for a in pool.map(publish_one, staged) if a is not None]


def _commit(
    uri: str,
    spec: TableSpec,
    adds: list[AddAction],
    *,
    mode: str,
    replace_partition: Mapping[str, str] | None,
    custom_metadata: dict[str, object],
) -> None:
    """Commit all ``adds`` (and, for overwrites, the removal of the replaced files) at once."""
    schema = DeltaSchema.from_arrow(arrow_schema(spec.schema))
    properties = CommitProperties(custom_metadata=custom_metadata)
    table_uri = _arrow_uri(uri)
    if not DeltaTable.is_deltatable(table_uri):
        create_table_with_add_actions(
            table_uri,
            schema,
            adds,
            mode="error",
            partition_by=list(spec.partition_by) or None,
            name=spec.name,
            commit_properties=properties,
        )
        return
    # In overwrite mode delta-rs adds a remove action for every live file matching the filters
    # (all files when there are none) to this same commit.
    filters = (
        [(k, "=", str(v)) for k, v in replace_partition.items()] if replace_partition else None
    )
    DeltaTable(table_uri).create_write_transaction(
        adds,
        mode=mode,
        schema=schema,
        partition_by=list(spec.partition_by) or None,
        partition_filters=filters,
        commit_properties=properties,
    )


def _find_commit(uri: str, write_id: str, search_depth: int = 20) -> int | None:
    """The version whose commit carries ``write_id``; None when the table does not exist or the
    write is not among its latest commits. Raises when the log cannot be read."""
    table_uri = _arrow_uri(uri)
    if not DeltaTable.is_deltatable(table_uri):
        return None
    for entry in DeltaTable(table_uri).history(search_depth):
        if entry.get(WRITE_ID_KEY) == write_id:
            return int(entry["version"])
    return None


def _delete_quietly(fs: pafs.FileSystem, paths: Sequence[str]) -> None:
    for path in paths:
        with contextlib.suppress(OSError):  # FileNotFoundError included
            fs.delete_file(path)


def _delete_dir_quietly(fs: pafs.FileSystem, path: str) -> None:
    with contextlib.suppress(OSError):
        if fs.get_file_info(path).type == pafs.FileType.Directory:
            fs.delete_dir(path)


def _delta_shape(schema_json: str) -> list[tuple[str, Any]]:
    """Column names and types of a Delta schema, nullability ignored (Spark reads everything back
    as nullable; the contract's non-null columns are checked by validation, not here)."""

    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {
                k: strip(v)
                for k, v in value.items()
                if k not in ("nullable", "containsNull", "valueContainsNull", "metadata")
            }
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return [(f["name"], strip(f["type"])) for f in json.loads(schema_json)["fields"]]


def _check_table_matches(table: DeltaTable, spec: TableSpec, *, allow_new_schema: bool) -> None:
    """Refuse to write into a table whose layout or schema differs from the contract; a whole-table
    overwrite may replace the schema (delta-rs then records the new one)."""
    partition_columns = list(table.metadata().partition_columns)
    if partition_columns != list(spec.partition_by):
        raise SchemaError(
            spec.name,
            None,
            f"table is partitioned by {partition_columns} but the contract says "
            f"{list(spec.partition_by)}",
        )
    if allow_new_schema:
        return
    have = _delta_shape(table.schema().to_json())
    want = _delta_shape(DeltaSchema.from_arrow(arrow_schema(spec.schema)).to_json())
    if have != want:
        raise SchemaError(
            spec.name,
            None,
            f"existing table columns {[n for n, _ in have]} differ from the contract "
            f"{[n for n, _ in want]}; only a full overwrite may change the schema",
        )


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


# --------------------------------------------------------------------------------------------
# Per-file statistics from Parquet footers
# --------------------------------------------------------------------------------------------


def footer_stats(footer: pq.FileMetaData, spec: TableSpec) -> dict[str, Any]:
    """Delta per-file statistics (``numRecords``, ``minValues``, ``maxValues``, ``nullCount``) for
    the spec's top-level primitive data columns, from a Parquet footer alone.

    A bound is left out whenever a row group lacks it, so every value written is a true bound.
    """
    types = {
        f.name: f.dataType
        for f in spec.data_schema.fields
        if not isinstance(f.dataType, _NESTED_TYPES)
    }
    lows: dict[str, Any] = {}
    highs: dict[str, Any] = {}
    nulls: dict[str, int] = {}
    unbounded: set[str] = set()
    null_unknown: set[str] = set()
    for group_index in range(footer.num_row_groups):
        group = footer.row_group(group_index)
        for column_index in range(group.num_columns):
            chunk = group.column(column_index)
            name = chunk.path_in_schema
            if name not in types:
                continue
            stats = chunk.statistics if chunk.is_stats_set else None
            if stats is not None and stats.has_null_count:
                nulls[name] = nulls.get(name, 0) + stats.null_count
            else:
                null_unknown.add(name)
            if not isinstance(types[name], _BOUNDED_TYPES):
                continue
            if stats is not None and stats.has_min_max:
                low, high = stats.min, stats.max
                lows[name] = low if name not in lows else min(lows[name], low)
                highs[name] = high if name not in highs else max(highs[name], high)
            elif stats is None or stats.num_values > 0:
                unbounded.add(name)  # non-null values without recorded bounds
    min_values: dict[str, Any] = {}
    max_values: dict[str, Any] = {}
    for name in types:
        if name in unbounded or name not in lows:
            continue
        low = _stat_value(lows[name], types[name], upper=False)
        high = _stat_value(highs[name], types[name], upper=True)
        if low is not None:
            min_values[name] = low
        if high is not None:
            max_values[name] = high
    null_count = {n: nulls[n] for n in types if n in nulls and n not in null_unknown}
    return {
        "numRecords": footer.num_rows,
        "minValues": min_values,
        "maxValues": max_values,
        "nullCount": null_count,
    }


def _stat_value(value: Any, data_type: T.DataType, *, upper: bool) -> Any:
    """A footer min/max in Delta's JSON stats form, widened (never narrowed) to stay a bound."""
    if isinstance(data_type, T.StringType):
        if not isinstance(value, str):
            return None
        if len(value) <= _STRING_STATS_PREFIX:
            return value
        # A prefix is still a lower bound; a truncated maximum would not be an upper bound.
        return None if upper else value[:_STRING_STATS_PREFIX]
    if isinstance(data_type, T.TimestampType):
        if not isinstance(value, dt.datetime) or value.tzinfo is None:
            return None
        micros = (value - _EPOCH) // dt.timedelta(microseconds=1)
        # Delta stats carry milliseconds: round the max up and the min down.
        millis = -(-micros // 1000) if upper else micros // 1000
        moment = _EPOCH + dt.timedelta(milliseconds=millis)
        return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
    if isinstance(data_type, T.DateType):
        return value.isoformat() if isinstance(value, dt.date) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None
