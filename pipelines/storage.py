"""File access for local paths and `gs://` through Beam's FileSystems, with atomic writes."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import uuid
from typing import BinaryIO

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from pipelines import JOB_FAILURE_PREFIX

_COPY_CHUNK = 8 << 20


def join(directory: str, name: str) -> str:
    return FileSystems.join(directory, name)


def exists(path: str) -> bool:
    return FileSystems.exists(path)


def size(path: str) -> int:
    return FileSystems.match([path])[0].metadata_list[0].size_in_bytes


def open_binary(path: str) -> BinaryIO:
    """A seekable binary reader; never decompresses (byte offsets stay meaningful)."""
    return FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)


def read_bytes(path: str) -> bytes:
    with open_binary(path) as f:
        return f.read()


def _staging_name(path: str) -> str:
    """Where to write before `path` is in place. A GCS object appears only when its upload
    completes, so object stores take the final name directly (no copy-and-delete rename);
    a local file is written under a name unique to this attempt and renamed into place."""
    if "://" in path:
        return path
    return f"{path}.tmp-{uuid.uuid4().hex}"


def _commit(staged: str, path: str) -> None:
    if staged != path:
        FileSystems.rename([staged], [path])


@contextlib.contextmanager
def _disk_full_as_job_failure(path: str, staged: str, size: int):
    """No space left for a file the job writes: the partial file is removed and the job fails with one
    line naming the file and its size."""
    try:
        yield
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        if staged != path:
            with contextlib.suppress(OSError):
                os.remove(staged)
        raise RuntimeError(f"{JOB_FAILURE_PREFIX}no space left on the device writing {path} ({size:,} bytes "
                           f"needed)") from None


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Writes `data` so that `path` is either absent or complete, never partial."""
    staged = _staging_name(path)
    with _disk_full_as_job_failure(path, staged, len(data)):
        with FileSystems.create(staged, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            f.write(data)
    _commit(staged, path)


def copy_local_file_atomic(local_path: str, path: str) -> tuple[int, str]:
    """Copies a local file to `path` (local or gs://) atomically; returns (bytes, sha256)."""
    staged = _staging_name(path)
    digest = hashlib.sha256()
    size = 0
    with _disk_full_as_job_failure(path, staged, os.path.getsize(local_path)):
        with open(local_path, "rb") as src, FileSystems.create(
            staged, compression_type=CompressionTypes.UNCOMPRESSED
        ) as dst:
            while chunk := src.read(_COPY_CHUNK):
                digest.update(chunk)
                size += len(chunk)
                dst.write(chunk)
    _commit(staged, path)
    return size, digest.hexdigest()


def delete_matching(pattern: str) -> None:
    """Deletes every file matching the glob; no error when none match."""
    paths = [m.path for m in FileSystems.match([pattern])[0].metadata_list]
    if paths:
        FileSystems.delete(paths)
