"""Input layouts: which files to read, how to split them into work units, and how to parse them.

A work unit is a byte range of a text or JSON-lines file, one parquet row group, or an
index range of a TFDS split, so a single large file still spreads over many workers.
Each record is reported with a stable position (byte offset, row or index), which is
what dead letters cite and what makes keys independent of how the work was split.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from collections.abc import Iterator
from typing import Any, NamedTuple

import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from pipelines import JOB_FAILURE_PREFIX, storage

STORY_SEPARATOR = b"<|endoftext|>"
# Lines longer than this are never separators; bounds how far a range reader looks back.
_MAX_SEPARATOR_LINE = 256
TFDS_RECORDS_PER_UNIT = 10_000

TEXT_SUFFIXES = (".txt",)
JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)


class UserError(Exception):
    """A problem with the user's input or options: reported as one line, exit code 2."""


class WorkUnit(NamedTuple):
    layout: str  # "text" | "jsonl" | "parquet" | "tfds"
    source: str  # file path, or "tfds:NAME/CONFIG:SPLIT"
    start: int  # byte offset, row group or record index (inclusive)
    end: int  # exclusive


class RawRecord(NamedTuple):
    """One input record before validation: `payload` is bytes (text layout) or a parsed row."""

    source: str
    position: int
    payload: Any


# --------------------------------------------------------------------------- planning


def layout_of(path: str) -> str:
    lower = path.lower()
    for layout, suffixes in (
        ("text", TEXT_SUFFIXES),
        ("jsonl", JSONL_SUFFIXES),
        ("parquet", PARQUET_SUFFIXES),
    ):
        if lower.endswith(suffixes):
            return layout
    raise UserError(
        f"cannot tell the layout of {path} from its name; use .txt (stories separated by "
        f"<|endoftext|> lines), .jsonl/.json (JSON lines) or .parquet"
    )


def expand_inputs(patterns: list[str]) -> list[tuple[str, int]]:
    """(path, size) for every file the globs match, sorted; an empty glob is a user error."""
    files: dict[str, int] = {}
    for pattern in patterns:
        try:
            matched = FileSystems.match([pattern])[0].metadata_list
        except Exception as e:  # Beam raises BeamIOError for unreachable buckets etc.
            raise UserError(f"cannot list input {pattern}: {first_line(e)}") from None
        if not matched and not _unlisted(pattern, set()):
            raise UserError(f"input {pattern} matches no files; check the path or glob")
        for m in matched:
            files[m.path] = m.size_in_bytes
        for path, reason in _unlisted(pattern, {m.path for m in matched}):
            raise UserError(f"input {pattern} matches {path}, which cannot be read ({reason}): remove it or narrow "
                            f"the glob")
    for path in files:
        try:
            with storage.open_binary(path) as f:
                f.read(1)
        except Exception as e:
            raise UserError(f"cannot read input file {path}: {first_line(e)}") from None
    return sorted(files.items())


def _unlisted(pattern: str, listed: set[str]) -> list[tuple[str, str]]:
    """(path, why) for each local file the glob matches that Beam's listing left out because it could
    not stat it (a dangling symlink, a symlink loop): read, refused or dead-lettered, never dropped."""
    if "://" in pattern:
        return []
    missed = []
    for path in sorted(set(glob.glob(pattern)) - listed):
        try:
            os.stat(path)
        except OSError as e:
            missed.append((path, e.strerror or type(e).__name__))
    return missed


def plan_file_units(files: list[tuple[str, int]], chunk_bytes: int,
                    columns: tuple[tuple[str, ...], ...] = ()) -> list[WorkUnit]:
    """Work units of the files; a parquet file must hold one of the `columns` sets."""
    units: list[WorkUnit] = []
    for path, size in files:
        layout = layout_of(path)
        if layout == "parquet":
            try:
                with storage.open_binary(path) as f:
                    parquet = pq.ParquetFile(f)
                    row_groups, names = parquet.num_row_groups, set(parquet.schema_arrow.names)
            except Exception as e:
                raise UserError(f"cannot read parquet file {path}: {first_line(e)}") from None
            if columns and not any(set(c) <= names for c in columns):
                wanted = " or ".join("+".join(c) for c in columns)
                raise UserError(f"parquet file {path} has no column {wanted} (it has {', '.join(sorted(names))}); "
                                f"name the text column with --text_field")
            units += [WorkUnit(layout, path, g, g + 1) for g in range(row_groups)]
        else:
            units += [
                WorkUnit(layout, path, start, min(start + chunk_bytes, size))
                for start in range(0, max(size, 1), chunk_bytes)
            ]
    return units


@dataclasses.dataclass(frozen=True)
class TfdsInput:
    name: str  # NAME or NAME/CONFIG
    split: str

    @property
    def source(self) -> str:
        return f"tfds:{self.name}:{self.split}"

    @classmethod
    def parse(cls, spec: str) -> "TfdsInput":
        name, sep, split = spec.rpartition(":")
        if not sep or not name or not split:
            raise UserError(f"--input {spec!r} for --dataset tfds must read NAME[/CONFIG]:SPLIT")
        return cls(name, split)


def open_tfds(spec: TfdsInput, data_dir: str | None):
    import tensorflow_datasets as tfds  # imported lazily: heavy, and only this layout needs it

    try:
        return tfds.data_source(spec.name, split=spec.split, data_dir=data_dir)
    except Exception as e:
        raise UserError(
            f"cannot open TFDS dataset {spec.name} split {spec.split} in {data_dir}: "
            f"{first_line(e)}"
        ) from None


def plan_tfds_units(spec: TfdsInput, data_dir: str | None) -> list[WorkUnit]:
    size = len(open_tfds(spec, data_dir))
    return [
        WorkUnit("tfds", spec.source, start, min(start + TFDS_RECORDS_PER_UNIT, size))
        for start in range(0, size, TFDS_RECORDS_PER_UNIT)
    ]


# --------------------------------------------------------------------------- reading


BOM = b"\xef\xbb\xbf"  # a UTF-8 byte-order mark: some editors start a file with it; it is not text


def _lines_from(f, start: int, end: int) -> Iterator[tuple[int, bytes]]:
    """(offset, line) for the lines whose first byte lies in [start, end); a file's leading
    byte-order mark is dropped."""
    if start > 0:
        f.seek(start - 1)
        offset = start - 1 + len(f.readline())  # finish the line holding byte start-1
    else:
        f.seek(0)
        offset = 0
    while offset < end:
        line = f.readline()
        if not line:
            return
        yield offset, line[len(BOM):] if offset == 0 and line.startswith(BOM) else line
        offset += len(line)


def _is_separator(line: bytes) -> bool:
    return len(line) <= _MAX_SEPARATOR_LINE and line.strip() == STORY_SEPARATOR


def read_stories(f, start: int, end: int) -> Iterator[tuple[int, bytes]]:
    """(offset, story) for the stories whose first byte lies in [start, end).

    A story starts at offset 0 or right after a separator line, so a reader that starts
    mid-file looks back far enough to see a separator line ending at or after `start`.
    """
    lookback = max(0, start - _MAX_SEPARATOR_LINE)
    story_start = 0 if lookback == 0 else None
    lines: list[bytes] = []
    for offset, line in _lines_from(f, lookback, 1 << 62):
        if _is_separator(line):
            if story_start is not None and story_start >= start:
                yield story_start, b"".join(lines)
            story_start, lines = offset + len(line), []
            if story_start >= end:
                return
        elif story_start is not None:
            lines.append(line)
    if story_start is not None and story_start >= start:
        story = b"".join(lines)
        if story.strip():  # a trailing newline after the last separator is not a story
            yield story_start, story


def read_unit(unit: WorkUnit, tfds_data_dir: str | None = None) -> Iterator[RawRecord]:
    """Every raw record of a unit: bytes for text stories, a parsed row or an error marker."""
    if unit.layout == "tfds":
        source = open_tfds(TfdsInput.parse(unit.source[len("tfds:") :]), tfds_data_dir)
        for index in range(unit.start, unit.end):
            yield RawRecord(unit.source, index, source[index])
        return
    with storage.open_binary(unit.source) as f:
        if unit.layout == "text":
            for offset, story in read_stories(f, unit.start, unit.end):
                yield RawRecord(unit.source, offset, story)
        elif unit.layout == "jsonl":
            for offset, line in _lines_from(f, unit.start, unit.end):
                if line.strip():
                    yield RawRecord(unit.source, offset, _parse_json_line(line))
        else:
            parquet = pq.ParquetFile(f)
            first_row = sum(parquet.metadata.row_group(g).num_rows for g in range(unit.start))
            try:
                rows = parquet.read_row_group(unit.start).to_pylist()
            except Exception as e:  # damaged data pages behind an intact footer: the job fails in one line
                raise RuntimeError(f"{JOB_FAILURE_PREFIX}cannot read row group {unit.start} of parquet file "
                                   f"{unit.source}: {first_line(e)}") from None
            for i, row in enumerate(rows):
                yield RawRecord(unit.source, first_row + i, row)


class MalformedJson(NamedTuple):
    line: bytes
    error: str


def _parse_json_line(line: bytes) -> Any:
    try:
        return json.loads(line)
    except (ValueError, UnicodeDecodeError) as e:
        return MalformedJson(line, str(e))


def first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]
