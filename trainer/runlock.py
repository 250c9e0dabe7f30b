"""DIR/.lock: one writer per output directory (a trainer's run directory, a trajectories job's output).

The lock names its holder (host, pid, start) and carries a heartbeat the holder renews as it
works. A second writer on the same directory refuses in one line naming the holder. A lock
whose holder is gone is taken over with a warning: on the same host once its process no longer
runs, from another host once its heartbeat is older than `stale_after` seconds. On local disk the
lock is created exclusively (O_EXCL) and renewed by a rename; on gs:// it is written and read back,
which two writers started within the same moment can both pass (object stores offer no exclusive
create here).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
import uuid

from etils import epath

from trainer.errors import UserError
from trainer.files import DiskFull, write_whole

LOCK = ".lock"


class RunLocked(UserError):
    """Another live writer holds the directory: one line, exit code 2."""


class RunLock:
    def __init__(self, directory: str, stale_after: float = 600.0, holder: str = "the trainer",
                 option: str = "run_dir"):
        """`holder` names the kind of writer in messages, `option` the flag that chooses the directory."""
        self._path = epath.Path(directory) / LOCK
        self._stale_after = stale_after
        self._holder, self._option = holder, option
        self._token = uuid.uuid4().hex
        self._record = {"host": socket.gethostname(), "pid": os.getpid(), "token": self._token,
                        "started": time.time()}

    def acquire(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        if self._create():
            return
        holder = self._read()
        if holder is not None and self._alive(holder):
            raise RunLocked(f"{self._path.parent} is in use by {self._holder} with pid {holder['pid']} on "
                            f"{holder['host']} (started {time.ctime(holder['started'])}); stop it or use "
                            f"another {self._option}")
        who = f"pid {holder['pid']} on {holder['host']}" if holder else "an unreadable lock"
        print(f"warning: taking over the run lock of {who}, which is no longer running")
        self._path.unlink(missing_ok=True)
        if not self._create():
            raise RunLocked(f"{self._path.parent} was locked by another writer while this one started")

    def beat(self) -> None:
        """Renews the heartbeat (a lock that stops beating goes stale for other hosts)."""
        if self._ours():
            self._write()

    def release(self) -> None:
        if self._ours():
            self._path.unlink(missing_ok=True)

    def _write(self) -> None:
        write_whole(self._path, json.dumps({**self._record, "heartbeat": time.time()}))

    def _create(self) -> bool:
        """Creates the lock unless one exists; True when this trainer holds it."""
        if "://" in str(self._path):
            if self._path.exists():
                return False
            self._write()
            return self._ours()
        try:
            fd = os.open(self._path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        try:
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps({**self._record, "heartbeat": time.time()}))
        except OSError as e:  # an empty lock left behind would look like another holder's
            self._path.unlink(missing_ok=True)
            if e.errno == errno.ENOSPC:
                raise DiskFull(f"no space left on the device creating the run lock {self._path}: free space and "
                               f"re-run") from None
            raise
        return True

    def _read(self) -> dict | None:
        try:
            return json.loads(self._path.read_text())
        except (OSError, ValueError):
            return None

    def _ours(self) -> bool:
        holder = self._read()
        return holder is not None and holder.get("token") == self._token

    def _alive(self, holder: dict) -> bool:
        if holder.get("host") == socket.gethostname():
            try:
                os.kill(int(holder["pid"]), 0)
            except ProcessLookupError:
                return False
            except PermissionError:
                return True
            return True
        return time.time() - float(holder.get("heartbeat", 0)) < self._stale_after
