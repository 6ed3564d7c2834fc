"""Vectors and many rows as packed bytes, the form in which they cross Spark's shuffles.

Spark moves and Arrow-converts one byte string per row much faster than ``d`` array elements,
which was most of the cost of a shuffle here; so vectors travel as packed float32
(``pack_matrix``, read back by ``vector_matrix``), variable-length int lists as packed int32
(``pack_ints``), and whole Arrow tables as one IPC stream per value (``pack_tables``). Everything
here is plain numpy and Arrow, no per-row Python objects.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), as float32."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms == 0, 1.0, norms)


def vector_matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Vectors as an (n, d) float32 matrix, from a list<float> column or a binary column of
    packed float32 (``pack_matrix``), without per-row Python objects."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if len(array) == 0:
        return np.empty((0, 0), np.float32)
    if array.null_count:
        raise ValueError("embeddings must not be null")
    if pa.types.is_binary(array.type):
        offsets = np.frombuffer(array.buffers()[1], np.int32)
        offsets = offsets[array.offset : array.offset + len(array) + 1]
        lengths = np.diff(offsets)
        if lengths.min() != lengths.max() or lengths[0] % 4:
            raise ValueError("packed vectors must all have the same length")
        data = np.frombuffer(array.buffers()[2], np.uint8)[offsets[0] : offsets[-1]]
        return data.view(np.float32).reshape(len(array), int(lengths[0]) // 4)
    lengths = pc.list_value_length(array)
    low, high = pc.min_max(lengths).values()
    if low.as_py() != high.as_py():
        raise ValueError("embeddings must all have the same length")
    flat = array.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return flat.reshape(len(array), int(high.as_py()))


def pack_matrix(vectors: np.ndarray) -> pa.BinaryArray:
    """An (n, d) matrix as a binary column of packed float32 rows (read back with
    ``vector_matrix``)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, d = vectors.shape
    offsets = np.arange(0, (n + 1) * d * 4, d * 4, dtype=np.int32)
    return pa.Array.from_buffers(
        pa.binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(vectors.tobytes())]
    )


def pack_ints(values: np.ndarray, offsets: np.ndarray) -> pa.BinaryArray:
    """Variable-length int32 lists (flat values + row offsets) as a binary column."""
    values = np.ascontiguousarray(values, dtype=np.int32)
    return pa.Array.from_buffers(
        pa.binary(),
        len(offsets) - 1,
        [None, pa.py_buffer(np.asarray(offsets, np.int32) * 4), pa.py_buffer(values.tobytes())],
    )


def unpack_ints(column: pa.ChunkedArray | pa.Array) -> pa.ListArray:
    """The inverse of ``pack_ints``: a list<int32> column."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    offsets = np.frombuffer(array.buffers()[1], np.int32)[
        array.offset : array.offset + len(array) + 1
    ]
    data = np.frombuffer(array.buffers()[2], np.uint8)[offsets[0] : offsets[-1]].view(np.int32)
    return pa.ListArray.from_arrays(pa.array((offsets - offsets[0]) // 4), pa.array(data))


def pack_tables(tables: Iterable[pa.Table]) -> pa.BinaryArray:
    """Each table as one Arrow IPC stream, one binary value per table: many rows cross a shuffle
    as one value, which Spark moves for the cost of a copy instead of per-row
    (de)serialisation. The streams are written once, straight into the array's buffer."""
    tables = list(tables)
    # Sized up front: a growing stream re-copies its buffer, which cost more than the writing.
    # A stream adds its schema, the batch metadata and padding: ~1.2 kB for task rows.
    capacity = sum(table.nbytes for table in tables) + 8192 * len(tables) + 65536
    if capacity >= 1 << 31:
        raise ValueError("packed tables exceed 2 GiB in one batch; pack fewer rows at a time")
    buffer = pa.allocate_buffer(capacity)
    sink = pa.FixedSizeBufferWriter(buffer)
    offsets = [0]
    for table in tables:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        offsets.append(sink.tell())
    return pa.Array.from_buffers(
        pa.binary(),
        len(tables),
        [None, pa.py_buffer(np.asarray(offsets, np.int32)), buffer.slice(0, offsets[-1])],
    )


def unpack_tables(packed: pa.Array | pa.ChunkedArray) -> list[pa.Table]:
    """The inverse of ``pack_tables`` (without copying the payloads)."""
    chunks = packed.chunks if isinstance(packed, pa.ChunkedArray) else [packed]
    return [pa.ipc.open_stream(value.as_buffer()).read_all() for chunk in chunks for value in chunk]


def empty_binary(n: int) -> pa.BinaryArray:
    """``n`` empty binary values (no per-value Python objects)."""
    return pack_ints(np.empty(0, np.int32), np.zeros(n + 1, np.int32))
