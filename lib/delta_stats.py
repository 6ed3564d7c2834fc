"""Delta per-file statistics (row count, min/max, null counts) from a Parquet footer alone.

The embedded writer (``lib.delta_commit``) commits Spark's Parquet files without reading them
again, so the statistics that let readers skip files come from the footers. Every value written
is a true bound or none at all: a wrong bound would make a reader skip rows.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pyarrow.parquet as pq
from pyspark.sql import types as T

from schemas import TableSpec

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
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


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
