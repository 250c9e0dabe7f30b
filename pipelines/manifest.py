"""manifest.json: the commit marker and table of contents of a preprocessed dataset.

It is written last, after every shard, the tokenizer and the dead letters are in place,
so a directory without it is an unfinished job. `verify` checks a shard set against it:

    python -m pipelines.manifest DIR            # every shard's size, record count, sha256 and token ids
    python -m pipelines.manifest DIR --quick    # sizes and record counts only
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from typing import Any, NamedTuple

import numpy as np
from array_record.python.array_record_module import ArrayRecordReader

from pipelines import records, signals, sources, storage, tokenizer

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
DEAD_LETTER = "dead_letter.jsonl"
SPLITS = ("train", "validation")


class ShardInfo(NamedTuple):
    split: str
    index: int
    file: str
    num_records: int
    num_tokens: int
    num_bytes: int
    sha256: str


def build(
    *,
    dataset: str,
    fields: tuple[str, ...],
    vocab_size: int,
    tokenizer_sha256: str,
    special_ids: dict[str, int | None],
    tokenizer_trained: bool,
    shards: list[ShardInfo],
    bad_by_reason: dict[str, int],
    sources: list[str],
    options: dict[str, Any],
) -> dict[str, Any]:
    splits = {}
    for split in SPLITS:
        split_shards = sorted((s for s in shards if s.split == split), key=lambda s: s.index)
        splits[split] = {
            "num_records": sum(s.num_records for s in split_shards),
            "num_tokens": sum(s.num_tokens for s in split_shards),
            "shards": [
                {k: v for k, v in s._asdict().items() if k not in ("split", "index")}
                for s in split_shards
            ],
        }
    return {
        "format_version": FORMAT_VERSION,
        "dataset": dataset,
        "record_schema": {
            "dtype": records.token_dtype(vocab_size).name,
            "byteorder": "little",
            "fields": list(fields),
            "layout": records.RECORD_LAYOUT,
        },
        "tokenizer": {
            "file": TOKENIZER,
            "sha256": tokenizer_sha256,
            "vocab_size": vocab_size,
            "special_ids": special_ids,
            "trained_by_job": tokenizer_trained,
        },
        "splits": splits,
        "bad_records": {
            "total": sum(bad_by_reason.values()),
            "by_reason": dict(sorted(bad_by_reason.items())),
            "file": DEAD_LETTER,
        },
        "sources": sorted(sources),
        "options": dict(sorted(options.items())),
    }


def dumps(manifest: dict[str, Any]) -> bytes:
    return (json.dumps(manifest, indent=2, sort_keys=False) + "\n").encode("utf-8")


def load(directory: str) -> dict[str, Any]:
    return json.loads(storage.read_bytes(storage.join(directory, MANIFEST)))


def verify(directory: str, full: bool = True) -> list[str]:
    """Problems found checking the dataset in `directory` against its manifest ([] = good), one line
    each: the tokenizer's sha256 and ids, every shard's size and record count, and with `full` every
    shard's sha256 (flipped bytes keep the size) and that each token id is below `vocab_size`."""
    path = storage.join(directory, MANIFEST)
    if not storage.exists(path):
        return [f"{path} is missing: the job did not finish"]
    try:
        manifest = load(directory)
    except ValueError as e:
        return [f"{path} is not valid JSON ({sources.first_line(e)}): re-run preprocess"]
    problems = []
    if manifest.get("format_version") != FORMAT_VERSION:
        problems.append(f"format_version {manifest.get('format_version')} != {FORMAT_VERSION}")
    problems += _tokenizer_problems(directory, manifest["tokenizer"])
    for split in SPLITS:
        for shard in manifest["splits"][split]["shards"]:
            problems += _shard_problems(storage.join(directory, shard["file"]), shard, manifest, full)
    return problems


def _tokenizer_problems(directory: str, recorded: dict[str, Any]) -> list[str]:
    try:
        text = storage.read_bytes(storage.join(directory, TOKENIZER)).decode("utf-8")
    except Exception as e:
        return [f"{TOKENIZER} cannot be read: {sources.first_line(e)}"]
    if tokenizer.sha256(text) != recorded["sha256"]:
        return [f"{TOKENIZER} does not match the manifest's sha256"]
    size = tokenizer.vocab_size(tokenizer.parse(text))
    if size > recorded["vocab_size"]:  # older jobs counted tokens, which ids with gaps outrun
        return [f"{TOKENIZER} has ids up to {size - 1} but the manifest's vocab_size is {recorded['vocab_size']}: "
                f"re-run preprocess"]
    return []


def _shard_problems(path: str, shard: dict[str, Any], manifest: dict[str, Any], full: bool) -> list[str]:
    name = shard["file"]
    if not storage.exists(path):
        return [f"{name} is missing"]
    size = storage.size(path)
    if size != shard["num_bytes"]:
        return [f"{name} is {size:,} bytes, the manifest says {shard['num_bytes']:,}: it was truncated or appended to"]
    try:
        count = _num_records(path)
    except Exception as e:
        return [f"{name} cannot be read ({sources.first_line(e)}): it is corrupt"]
    if count != shard["num_records"]:
        return [f"{name} holds {count} records, manifest says {shard['num_records']}"]
    if not full:
        return []
    if _sha256(path) != shard["sha256"]:
        return [f"{name} does not match the manifest's sha256: it is corrupt"]
    largest = _largest_id(path, count, manifest["record_schema"])
    if largest >= manifest["tokenizer"]["vocab_size"]:
        return [f"{name} holds token id {largest}, not below the manifest's vocab_size "
                f"{manifest['tokenizer']['vocab_size']}: re-run preprocess"]
    return []


def _num_records(path: str) -> int:
    reader = ArrayRecordReader(path)
    try:
        return reader.num_records()
    finally:
        reader.close()


def _largest_id(path: str, count: int, schema: dict[str, Any], batch: int = 4096) -> int:
    """The largest token id a shard stores (-1 when it stores none), read `batch` records at a time."""
    dtype, header = np.dtype(schema["dtype"]).newbyteorder("<"), 4 * len(schema["fields"])
    largest = -1
    reader = ArrayRecordReader(path)
    try:
        for start in range(0, count, batch):
            for record in reader.read(start, min(start + batch, count)):
                ids = np.frombuffer(record, dtype, offset=header)
                largest = max(largest, int(ids.max())) if len(ids) else largest
    finally:
        reader.close()
    return largest


def _sha256(path: str) -> str:
    with storage.open_binary(path) as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.manifest",
                                     description="Check a preprocessed dataset against its manifest.json.")
    parser.add_argument("directory", help="A preprocess output (local or gs://)")
    parser.add_argument("--quick", action="store_true", help="Sizes and record counts only (no hashing or decoding)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    return signals.exit_status(lambda: _check(args.directory, args.quick))


def _check(directory: str, quick: bool) -> int:
    problems = verify(directory, full=not quick)
    for problem in problems:
        print(problem, file=sys.stderr)
    if not problems:
        checked = "sizes and record counts" if quick else "sizes, record counts, sha256 and token ids"
        print(f"{directory}: every shard matches its manifest ({checked})")
    return 1 if problems else 0

if __name__ == "__main__":
    sys.exit(main())
