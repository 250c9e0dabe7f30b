"""File access for local paths and `gs://` through Beam's FileSystems, with atomic writes."""

from __future__ import annotations

import hashlib
import uuid
from typing import BinaryIO

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

_COPY_CHUNK = 8 << 20


def join(directory: str, name: str) -> str:
    return FileSystems.join(directory, name)


def exists(path: str) -> bool:
    return FileSystems.exists(path)


def open_binary(path: str) -> BinaryIO:
    """A seekable binary reader; never decompresses (byte offsets stay meaningful)."""
    return FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)


def read_bytes(path: str) -> bytes:
    with open_binary(path) as f:
        return f.read()


def _temporary_name(path: str) -> str:
    # Unique per attempt, so a retried bundle never collides with a half-written file.
    return f"{path}.tmp-{uuid.uuid4().hex}"


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Writes `data` to a temporary name, then renames it into place."""
    tmp = _temporary_name(path)
    with FileSystems.create(tmp, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        f.write(data)
    FileSystems.rename([tmp], [path])


def copy_local_file_atomic(local_path: str, path: str) -> tuple[int, str]:
    """Copies a local file to `path` (local or gs://) atomically; returns (bytes, sha256)."""
    tmp = _temporary_name(path)
    digest = hashlib.sha256()
    size = 0
    with open(local_path, "rb") as src, FileSystems.create(
        tmp, compression_type=CompressionTypes.UNCOMPRESSED
    ) as dst:
        while chunk := src.read(_COPY_CHUNK):
            digest.update(chunk)
            size += len(chunk)
            dst.write(chunk)
    FileSystems.rename([tmp], [path])
    return size, digest.hexdigest()


def delete_matching(pattern: str) -> None:
    """Deletes every file matching the glob; no error when none match."""
    paths = [m.path for m in FileSystems.match([pattern])[0].metadata_list]
    if paths:
        FileSystems.delete(paths)
