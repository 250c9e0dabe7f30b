"""Every file the trainer and the evals rewrite (configs, JSON records, ledgers, locks, reports) goes
through `write_whole`, so a reader or a crash never meets half a file. (pipelines/storage.py is the
preprocess job's twin: the packages share only files.)"""

from __future__ import annotations

import errno
import uuid

from etils import epath

from trainer.errors import UserError


class DiskFull(UserError):
    """No space left where a file or checkpoint is written: one line naming the path and the bytes."""


def write_whole(path: epath.Path, content: str | bytes) -> None:
    """Replaces a file so that readers see the old or the new content, never a part: an object
    store publishes an object only once fully uploaded; a local file is renamed into place."""
    path = epath.Path(path)
    write = "write_bytes" if isinstance(content, bytes) else "write_text"
    if "://" in str(path):
        getattr(path, write)(content)
        return
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex}"
    try:
        getattr(tmp, write)(content)
        tmp.replace(path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno == errno.ENOSPC:
            raise DiskFull(f"no space left on the device writing {path} ({len(content):,} bytes needed)") from None
        raise
