"""manifest.json: the commit marker and table of contents of a preprocessed dataset.

It is written last, after every shard, the tokenizer and the dead letters are in place,
so a directory without it is an unfinished job. `verify` checks a shard set against it:

    python -m pipelines.manifest DIR            # every shard's sha256, size and record count
    python -m pipelines.manifest DIR --quick    # sizes and record counts only
"""

from __future__ import annotations

import hashlib
import json
import sys
from typing import Any, NamedTuple

from array_record.python.array_record_module import ArrayRecordReader

from pipelines import records, storage
from pipelines.tokenizer import sha256 as tokenizer_sha256

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
    """Problems found checking the shard set in `directory` against its manifest ([] = good):
    sizes and record counts, and with `full` every shard's sha256 (flipped bytes keep the size)."""
    path = storage.join(directory, MANIFEST)
    if not storage.exists(path):
        return [f"{path} is missing: the job did not finish"]
    manifest = load(directory)
    problems = []
    if manifest.get("format_version") != FORMAT_VERSION:
        problems.append(f"format_version {manifest.get('format_version')} != {FORMAT_VERSION}")
    tokenizer = storage.read_bytes(storage.join(directory, TOKENIZER)).decode("utf-8")
    if tokenizer_sha256(tokenizer) != manifest["tokenizer"]["sha256"]:
        problems.append(f"{TOKENIZER} does not match the manifest's sha256")
    for split in SPLITS:
        for shard in manifest["splits"][split]["shards"]:
            shard_path = storage.join(directory, shard["file"])
            if not storage.exists(shard_path):
                problems.append(f"{shard['file']} is missing")
                continue
            reader = ArrayRecordReader(shard_path)
            try:
                count = reader.num_records()
            finally:
                reader.close()
            if count != shard["num_records"]:
                problems.append(
                    f"{shard['file']} holds {count} records, manifest says {shard['num_records']}"
                )
            elif full and _sha256(shard_path) != shard["sha256"]:
                problems.append(f"{shard['file']} does not match the manifest's sha256: it is corrupt")
    return problems


def _sha256(path: str) -> str:
    with storage.open_binary(path) as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    quick = "--quick" in args
    args = [a for a in args if a != "--quick"]
    if len(args) != 1:
        print("usage: python -m pipelines.manifest DIR [--quick]", file=sys.stderr)
        return 2
    problems = verify(args[0], full=not quick)
    for problem in problems:
        print(problem, file=sys.stderr)
    if not problems:
        checked = "record counts" if quick else "sha256 and record counts"
        print(f"{args[0]}: every shard matches its manifest ({checked})")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
