"""Checks that stop a run on bad input before anything is written.

These run Spark actions on purpose (one aggregation per check) and raise ``SchemaError`` naming
the table, column, problem and a few example rows.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from lib.schema_check import UNPARSEABLE, SchemaError
from schemas import TableSpec

_EXAMPLES = 3


def _examples(df: DataFrame, condition) -> list[dict]:
    return [row.asDict() for row in df.where(condition).limit(_EXAMPLES).collect()]


def require_not_null(df: DataFrame, spec: TableSpec) -> None:
    """Fail if any of the spec's required columns holds a null (one pass over the data)."""
    if not spec.required:
        return
    nulls = df.agg(*[F.sum(F.col(c).isNull().cast("long")).alias(c) for c in spec.required]).first()
    for column in spec.required:
        if nulls[column]:
            raise SchemaError(
                spec.name,
                column,
                f"{nulls[column]} rows have a null (or unparseable) value",
                _examples(df, F.col(column).isNull()),
            )


def require_unique_key(df: DataFrame, spec: TableSpec) -> None:
    """Fail if two rows share the spec's key (e.g. a listing snapshot with duplicate ids)."""
    duplicates = df.groupBy(*spec.key).count().where(F.col("count") > 1)
    found = duplicates.limit(_EXAMPLES).collect()
    if found:
        raise SchemaError(
            spec.name,
            ", ".join(spec.key),
            "duplicate key values",
            [row.asDict() for row in found],
        )


def require_rows(row_count: int, table: str, what: str) -> None:
    """Fail when an input (or its window) is empty: an empty night must not publish."""
    if row_count == 0:
        raise SchemaError(table, None, f"no rows {what}")


_RAISED = re.compile(rf"table '([^']+)', column '([^']+)': {UNPARSEABLE} '(.*?)'")


@contextmanager
def input_errors() -> Iterator[None]:
    """Re-raise a bad value that ``conform`` stopped inside a Spark task as a ``SchemaError``."""
    try:
        yield
    except SchemaError:
        raise
    except Exception as error:
        match = _RAISED.search(str(error))
        if match is None:
            raise
        table, column, value = match.groups()
        raise SchemaError(table, column, UNPARSEABLE, [value]) from None
