"""Every file the trainer and the evals rewrite (configs, JSON records, ledgers, locks, reports) goes
through `write_whole`, so a reader or a crash never meets half a file. (pipelines/storage.py is the
preprocess job's twin: the packages share only files.)"""

from __future__ import annotations

import errno
import os
import shutil
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


def staging_for(target: epath.Path) -> epath.Path:
    """A fresh directory beside `target` to write its replacement into (`replace_dir` swaps it in)."""
    target = epath.Path(target)
    return target.parent / f".{target.name}.partial-{uuid.uuid4().hex}"


def replace_dir(staged: epath.Path, target: epath.Path, last: str) -> None:
    """Swaps the finished directory `staged` in for `target`, whatever `target` held (nothing of it
    stays). On local disk two renames: a reader sees the old directory or the new one. An object store
    has no rename: the old objects are deleted, then the new copied, the file `last` (what readers
    look for) last of all, so a reader never takes a half-copied directory for a finished one."""
    staged, target = epath.Path(staged), epath.Path(target)
    if "://" not in str(target):
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex}"
        if target.exists():
            os.rename(target, old)
        os.rename(staged, target)
        shutil.rmtree(old, ignore_errors=True)
        return
    if target.exists():
        (target / last).unlink(missing_ok=True)
        target.rmtree()
    target.mkdir(parents=True, exist_ok=True)
    for item in sorted(staged.iterdir(), key=lambda p: p.name == last):
        item.copy(target / item.name)
    staged.rmtree()
