"""The embedded Delta writer: Spark writes Parquet, the driver commits it with delta-rs.

Used when the session has no Delta jars (the default). Spark's own Parquet writer writes the
files into a staging folder inside the table (``STAGING_DIR``: Spark, Delta's vacuum and our
listing all ignore ``_`` folders); the driver moves them into the table's hive-style partition
folders, builds Delta per-file statistics from the Parquet footers (``lib.delta_stats``) and
commits all files as one Delta transaction with the ``deltalake`` package (delta-rs), an
overwrite removing the replaced files in the same commit. Each commit records a write id
(``WRITE_ID_KEY``), so a failed write can tell whether its commit landed and clean up only when
it did not.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import posixpath
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import pyarrow.fs as pafs
import pyarrow.parquet as pq
from deltalake import CommitProperties, DeltaTable
from deltalake import Schema as DeltaSchema
from deltalake.transaction import AddAction, create_table_with_add_actions
from pyspark.sql import DataFrame

from lib.delta_stats import footer_stats
from lib.schema_check import SchemaError, arrow_schema
from lib.table_uris import IO_THREADS, arrow_uri, filesystem, is_hidden, relative
from schemas import TableSpec

# Spark ignores folders starting with "_" or "." when it lists a table, and so do Delta's vacuum
# and our own listing: the staging area can never be mistaken for data.
STAGING_DIR = "_staging"
# Key under which each embedded commit records its write id, so the writer can find the version
# it committed even when another writer commits right after it.
WRITE_ID_KEY = "writeId"
_HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"


def metadata_json(commit_metadata: Mapping[str, object]) -> str:
    return json.dumps(dict(commit_metadata), sort_keys=True, default=str)


@dataclass(frozen=True)
class StagedFile:
    relative_path: str  # e.g. "run_date=2026-11-20/part-00000-<uuid>.c000.snappy.parquet"
    partition_values: dict[str, str | None]


def write_embedded(
    df: DataFrame,
    uri: str,
    spec: TableSpec,
    mode: str,
    replace_partition: Mapping[str, str] | None,
    commit_metadata: Mapping[str, object] | None,
) -> int:
    full_overwrite = mode == "overwrite" and not replace_partition
    if DeltaTable.is_deltatable(arrow_uri(uri)):
        _check_table_matches(DeltaTable(arrow_uri(uri)), spec, allow_new_schema=full_overwrite)
    fs, root = filesystem(uri)
    write_id = uuid.uuid4().hex
    staging = f"{root}/{STAGING_DIR}/{write_id}"
    staged: list[StagedFile] = []
    custom_metadata: dict[str, object] = {WRITE_ID_KEY: write_id}
    if commit_metadata:
        custom_metadata["userMetadata"] = metadata_json(commit_metadata)
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
    return version if version is not None else DeltaTable(arrow_uri(uri)).version()


def _staged_files(fs: pafs.FileSystem, staging: str, spec: TableSpec) -> list[StagedFile]:
    """The Parquet files Spark wrote, with partition values from their hive-style folders."""
    if fs.get_file_info(staging).type == pafs.FileType.NotFound:
        return []  # Spark wrote nothing (empty partitioned DataFrame)
    files = []
    for info in fs.get_file_info(pafs.FileSelector(staging, recursive=True)):
        rel = relative(info.path, staging)
        if info.type != pafs.FileType.File or is_hidden(rel) or not rel.endswith(".parquet"):
            continue
        *folders, _name = rel.split("/")
        values: dict[str, str | None] = {}
        for folder in folders:
            key, _, raw = folder.partition("=")
            values[key] = None if raw == _HIVE_NULL else unquote(raw)
        if list(values) != list(spec.partition_by):
            raise RuntimeError(f"unexpected file {rel!r} in staging folder {staging!r}")
        files.append(StagedFile(rel, values))
    return files


def _check_within_partition(
    staged: Sequence[StagedFile], replace_partition: Mapping[str, str] | None, spec: TableSpec
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
    fs: pafs.FileSystem, staging: str, root: str, staged: Sequence[StagedFile], spec: TableSpec
) -> list[AddAction]:
    """Move staged files into the table's partition folders and describe each as an add action."""

    def publish_one(staged_file: StagedFile) -> AddAction | None:
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
    with ThreadPoolExecutor(max_workers=min(IO_THREADS, len(staged))) as pool:
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
    table_uri = arrow_uri(uri)
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
    table_uri = arrow_uri(uri)
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


def clean_staging(uri: str, older_than_hours: float) -> int:
    """Delete staging folders of writes that stopped (killed) more than ``older_than_hours`` ago:
    no commit can name their files, and Delta's vacuum never looks inside ``_`` folders."""
    fs, root = filesystem(uri)
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
