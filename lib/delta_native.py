"""The native Delta writer and reader: a session with Delta's SQL extension (a cluster, jars
from ``--packages``) writes, commits and reads through Delta Lake itself.

``df.write.format("delta")`` with ``replaceWhere`` for a partition overwrite and
``userMetadata`` for the commit metadata; the same contract as the embedded writer
(``lib.delta_commit``), so ``lib.delta_io`` picks either by the session alone.
"""

from __future__ import annotations

from collections.abc import Mapping

from delta.tables import DeltaTable as SparkDeltaTable
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from lib.delta_commit import metadata_json
from lib.schema_check import conform
from schemas import TableSpec


def sql_literal(value: str, data_type: T.DataType) -> str:
    escaped = str(value).replace("\\", "\\\\").replace("'", "\\'")
    return f"CAST('{escaped}' AS {data_type.simpleString()})"


def replace_where(spec: TableSpec, replace_partition: Mapping[str, str]) -> str:
    """The ``replaceWhere`` predicate selecting exactly one partition, typed by the spec."""
    types = {f.name: f.dataType for f in spec.schema.fields}
    return " AND ".join(
        f"`{key}` = {sql_literal(value, types[key])}" for key, value in replace_partition.items()
    )


def native_write_options(
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
        options["replaceWhere"] = replace_where(spec, replace_partition)
    if commit_metadata:
        options["userMetadata"] = metadata_json(commit_metadata)
    return options


def write_native(
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
    for key, value in native_write_options(spec, mode, replace_partition, commit_metadata).items():
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


def read_native(
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
