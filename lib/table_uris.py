"""Where a table lives: URIs as Spark, pyarrow and delta-rs each spell them, and its files.

Local paths, ``file://`` URIs and object-store URIs are accepted; ``s3a://`` (Spark's name) is
handed to pyarrow and delta-rs as ``s3://``. Driver-side file work uses ``pyarrow.fs``, so
nothing of the Delta modules is tied to local disks.
"""

from __future__ import annotations

import os

import pyarrow.fs as pafs

IO_THREADS = 16


def normalise(path: str | os.PathLike[str]) -> str:
    """The table location as a URI without trailing slash: local paths become ``file://`` URIs."""
    text = os.fspath(path)
    if text.startswith("file:") and not text.startswith("file://"):  # Hadoop's file:/tmp/x
        text = "file://" + text[len("file:") :]
    if "://" not in text:
        text = "file://" + os.path.abspath(text)
    return text.rstrip("/")


def arrow_uri(uri: str) -> str:
    """The URI for pyarrow and delta-rs, which call Spark's ``s3a://`` plain ``s3://``."""
    return "s3://" + uri[len("s3a://") :] if uri.startswith("s3a://") else uri


def spark_file_uri(file_uri: str, table_uri: str) -> str:
    """A file URI from delta-rs as Spark needs it (delta-rs lists local files as bare paths)."""
    if "://" not in file_uri:
        return "file://" + file_uri
    if table_uri.startswith("s3a://") and file_uri.startswith("s3://"):
        return "s3a://" + file_uri[len("s3://") :]
    return file_uri


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    fs, root = pafs.FileSystem.from_uri(arrow_uri(uri))
    return fs, root.rstrip("/")


def relative(path: str, root: str) -> str:
    return path[len(root) :].lstrip("/")


def is_hidden(relative_path: str) -> bool:
    return any(part.startswith(("_", ".")) for part in relative_path.split("/"))
