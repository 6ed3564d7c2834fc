from __future__ import annotations

from dataclasses import dataclass, field

from pyspark.sql.types import StructType


@dataclass(frozen=True)
class TableSpec:
    """A table's name (used in error messages), Spark schema and layout.

    ``key`` is the set of columns that identify a row; ``required`` the columns that may not be
    null whatever the schema's nullability says (input files rarely declare non-null columns).
    """

    name: str
    schema: StructType
    partition_by: tuple[str, ...] = ()
    key: tuple[str, ...] = ()
    required: tuple[str, ...] = field(default=())
    version: int = 1

    @property
    def columns(self) -> list[str]:
        return [f.name for f in self.schema.fields]

    @property
    def data_schema(self) -> StructType:
        """The columns stored inside the Parquet files (partition columns live in paths)."""
        return StructType([f for f in self.schema.fields if f.name not in self.partition_by])
