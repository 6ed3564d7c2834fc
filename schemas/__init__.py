"""Data contracts: one module per table, each exposing a ``TableSpec``.

Every read applies these schemas (``lib.schema_check.conform``) and every write is checked
against them (``lib.schema_check.check_matches``), so a schema change is a visible diff here.
"""

from schemas._spec import TableSpec

__all__ = ["TableSpec"]
