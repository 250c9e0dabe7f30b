"""The job's output folder: checked before any work, and on `--overwrite` of a finished local
dataset written beside it (`OUTPUT.staging-*`) and swapped in only when complete.

The job writing a staging folder holds an exclusive lock (flock) on its `.owner` file while it
runs, which the kernel drops when the job ends however it ends. So the next job on the same output
tells a killed job's staging folder (removed) from a running job's (refused: one writer per output).
"""

from __future__ import annotations

import fcntl
import fnmatch
import os
import pathlib
import shutil
import uuid
from typing import NamedTuple

from pipelines import manifest, storage
from pipelines.config import PreprocessConfig
from pipelines.sources import UserError


def check(config: PreprocessConfig) -> None:
    """The output must be a usable directory outside every input glob: checked before any work."""
    # Files the job writes: an input glob that matches one would read the job's output back in.
    written = [manifest.MANIFEST, manifest.TOKENIZER, manifest.DEAD_LETTER, "train-00000-of-00001.array_record"]
    for pattern in config.input_patterns:
        caught = [name for name in written if fnmatch.fnmatch(storage.join(config.output, name), pattern)]
        if caught:
            raise UserError(f"--input {pattern} would read the job's own output ({caught[0]} in --output "
                            f"{config.output}): put the output outside the input folder")
    if "://" in config.output:
        return
    path = pathlib.Path(config.output).absolute()
    if path.exists() and not path.is_dir():
        raise UserError(f"--output {config.output} is a file, not a directory")
    existing = next(p for p in (path, *path.parents) if p.exists())  # what the job will create under
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--output {config.output} cannot be created or written ({existing} is not a writable "
                        f"directory)")


OWNER = ".owner"


class Staging(NamedTuple):
    path: str  # the folder the job writes, beside --output
    owner: int  # the open, locked descriptor of its .owner file: held until the job ends


def _staging_folders(output: str) -> list[pathlib.Path]:
    target = pathlib.Path(output.rstrip("/")).absolute()
    return sorted(target.parent.glob(f"{target.name}.staging-*"))


def _claim(folder: pathlib.Path) -> int | None:
    """An exclusive lock on the folder's .owner file (its descriptor), or None while a job holds it."""
    fd = os.open(folder / OWNER, os.O_CREAT | os.O_WRONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def remove_abandoned_staging(output: str) -> None:
    """Removes the staging folders of jobs on `output` that were killed; refuses while one runs."""
    for folder in _staging_folders(output):
        fd = _claim(folder)
        if fd is None:
            raise UserError(f"another preprocess job is replacing {output} (it writes {folder}): wait for it to "
                            f"finish or choose another --output")
        shutil.rmtree(folder, ignore_errors=True)
        os.close(fd)
        print(f"removed {folder}, the staging folder of an --overwrite job that was stopped")


def release(staging: Staging) -> None:
    """The finished job lets go of its staging folder (the .owner file is no part of the dataset)."""
    os.unlink(os.path.join(staging.path, OWNER))
    os.close(staging.owner)


def prepare(config: PreprocessConfig) -> Staging | None:
    """Where the job writes: `--output`, or for `--overwrite` of a finished local dataset a staging
    directory beside it (returned, claimed by this job) that replaces it only once the new dataset
    is complete. A killed job's staging folder is removed first."""
    if "://" not in config.output:
        remove_abandoned_staging(config.output)
    manifest_path = storage.join(config.output, manifest.MANIFEST)
    if not storage.exists(manifest_path):
        return None
    if not config.overwrite:
        raise UserError(
            f"{config.output} already holds a finished dataset (manifest.json); "
            f"pass --overwrite to replace it or choose another --output"
        )
    if "://" not in config.output:
        folder = pathlib.Path(f"{config.output.rstrip('/')}.staging-{uuid.uuid4().hex[:8]}")
        folder.mkdir()
        return Staging(str(folder), _claim(folder))
    # Object stores cannot swap directories: the manifest goes first, so a crash from here on
    # never leaves a mixed set that looks done (the old dataset is gone, though).
    storage.delete_matching(manifest_path)
    for pattern in ("*.array_record", manifest.TOKENIZER, manifest.DEAD_LETTER):
        storage.delete_matching(storage.join(config.output, pattern))
    return None


def replace_directory(staging: str, output: str) -> None:
    """The finished staging directory takes the old dataset's place; the old one is removed."""
    old = f"{output.rstrip('/')}.replaced-{uuid.uuid4().hex[:8]}"
    os.rename(output, old)
    os.rename(staging, output)
    shutil.rmtree(old)
