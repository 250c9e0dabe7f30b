"""The job's output folder: checked before any work, and on `--overwrite` of a finished local
dataset written beside it and swapped in only when complete."""

from __future__ import annotations

import fnmatch
import os
import pathlib
import shutil
import uuid

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


def prepare(config: PreprocessConfig) -> str | None:
    """Where the job writes: `--output`, or for `--overwrite` of a finished local dataset a staging
    directory beside it (returned) that replaces it only once the new dataset is complete."""
    manifest_path = storage.join(config.output, manifest.MANIFEST)
    if not storage.exists(manifest_path):
        return None
    if not config.overwrite:
        raise UserError(
            f"{config.output} already holds a finished dataset (manifest.json); "
            f"pass --overwrite to replace it or choose another --output"
        )
    if "://" not in config.output:
        return f"{config.output.rstrip('/')}.staging-{uuid.uuid4().hex[:8]}"
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
