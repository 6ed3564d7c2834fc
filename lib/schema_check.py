"""Applying the contracts in ``schemas/`` on read and checking them on write."""

from __future__ import annotations

import pyarrow as pa
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from schemas import TableSpec


class SchemaError(ValueError):
    """An input or output table does not match its contract; names table, column and problem."""

    def __init__(self, table: str, column: str | None, problem: str, examples: list | None = None):
        self.table, self.column, self.problem, self.examples = table, column, problem, examples
        where = f"table '{table}'" + (f", column '{column}'" if column else "")
        message = f"{where}: {problem}"
        if examples:
            message += "; e.g. " + "; ".join(str(e) for e in examples[:5])
        super().__init__(message)


# Casts a reader may apply silently: they never lose information or change meaning.
_WIDENINGS: dict[type, tuple[type, ...]] = {
    T.LongType: (T.IntegerType, T.ShortType, T.ByteType),
    T.IntegerType: (T.ShortType, T.ByteType),
    T.DoubleType: (T.FloatType, T.IntegerType, T.LongType, T.ShortType, T.DecimalType),
    T.FloatType: (T.IntegerType, T.ShortType),
    # Strings are parsed; values that do not parse are caught by the validation step.
    T.TimestampType: (T.StringType, T.DateType, T.TimestampNTZType),
    T.DateType: (T.StringType, T.TimestampType),
    # An id, category or shown value stored as a number or boolean reads as its text.
    T.StringType: (
        T.IntegerType,
        T.LongType,
        T.ShortType,
        T.ByteType,
        T.BooleanType,
        T.DoubleType,
        T.FloatType,
    ),
}


def _same_type(actual: T.DataType, expected: T.DataType) -> bool:
    if isinstance(expected, T.ArrayType) and isinstance(actual, T.ArrayType):
        return _same_type(actual.elementType, expected.elementType)
    if isinstance(expected, T.MapType) and isinstance(actual, T.MapType):
        return _same_type(actual.keyType, expected.keyType) and _same_type(
            actual.valueType, expected.valueType
        )
    return type(actual) is type(expected)


def conform(df: DataFrame, spec: TableSpec) -> DataFrame:
    """Select the spec's columns in order, applying only safe casts; fail on anything else.

    Extra input columns are dropped; a missing column or an incompatible type raises
    ``SchemaError`` naming the table and column. Optional (nullable) columns that are absent
    are added as nulls so older snapshots still read.
    """
    actual = {f.name: f.dataType for f in df.schema.fields}
    columns: list[Column] = []
    for field in spec.schema.fields:
        if field.name not in actual:
            if field.nullable and field.name not in spec.required:
                columns.append(F.lit(None).cast(field.dataType).alias(field.name))
                continue
            raise SchemaError(
                spec.name, field.name, f"missing column (have: {', '.join(sorted(actual))})"
            )
        have = actual[field.name]
        if _same_type(have, field.dataType):
            columns.append(F.col(field.name))
        elif isinstance(have, T.StringType) and isinstance(
            field.dataType, T.DateType | T.TimestampType
        ):
            columns.append(_parsed(spec.name, field.name, field.dataType))
        elif isinstance(have, _WIDENINGS.get(type(field.dataType), ())):
            columns.append(F.col(field.name).cast(field.dataType).alias(field.name))
        else:
            raise SchemaError(
                spec.name,
                field.name,
                f"type {have.simpleString()} where {field.dataType.simpleString()} is expected",
            )
    return df.select(*columns)


UNPARSEABLE = "unparseable value"


def _parsed(table: str, column: str, data_type: T.DataType) -> Column:
    # A bad value stops the first Spark action with a message naming table, column and value,
    # instead of ANSI mode's generic cast error (or, without ANSI, a silent null).
    raw = F.col(column)
    parsed = raw.try_cast(data_type)
    message = F.concat(
        F.lit(f"table '{table}', column '{column}': {UNPARSEABLE} '"), raw, F.lit("'")
    )
    return (
        F.when(raw.isNotNull() & parsed.isNull(), F.raise_error(message))
        .otherwise(parsed)
        .cast(data_type)
        .alias(column)
    )


def check_matches(df: DataFrame, spec: TableSpec) -> None:
    """Raise ``SchemaError`` unless ``df`` has exactly the spec's columns, order and types."""
    have = [(f.name, f.dataType) for f in df.schema.fields]
    want = [(f.name, f.dataType) for f in spec.schema.fields]
    if [n for n, _ in have] != [n for n, _ in want]:
        raise SchemaError(
            spec.name,
            None,
            f"columns {[n for n, _ in have]} do not match the contract {[n for n, _ in want]}",
        )
    for (name, actual), (_, expected) in zip(have, want, strict=True):
        if not _same_type(actual, expected):
            raise SchemaError(
                spec.name,
                name,
                f"writes {actual.simpleString()} where the contract says {expected.simpleString()}",
            )


_ARROW_TYPES: dict[type, pa.DataType] = {
    T.StringType: pa.string(),
    T.IntegerType: pa.int32(),
    T.LongType: pa.int64(),
    T.FloatType: pa.float32(),
    T.DoubleType: pa.float64(),
    T.BooleanType: pa.bool_(),
    T.DateType: pa.date32(),
    T.TimestampType: pa.timestamp("us", tz="UTC"),
}


def _arrow_type(data_type: T.DataType) -> pa.DataType:
    if isinstance(data_type, T.ArrayType):
        return pa.list_(_arrow_type(data_type.elementType))
    if isinstance(data_type, T.MapType):
        return pa.map_(_arrow_type(data_type.keyType), _arrow_type(data_type.valueType))
    return _ARROW_TYPES[type(data_type)]


def arrow_schema(schema: T.StructType) -> pa.Schema:
    """The Arrow schema Spark reads back as ``schema`` (for files written without Spark)."""
    return pa.schema(
        [pa.field(f.name, _arrow_type(f.dataType), nullable=f.nullable) for f in schema.fields]
    )
