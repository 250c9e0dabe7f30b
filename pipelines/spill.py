"""Spill files: a tokenized batch's records for one shard, written to local disk on local runners
so that only file names go through the GroupByKey those runners hold in memory. Plain bytes and
lengths, no pickles: nothing the job reads back can run code."""

from __future__ import annotations

import struct

_ITEM = "<III"  # key length, record length, token count; then key and record bytes


def write(path: str, items: list[tuple[str, bytes, int]]) -> None:
    with open(path, "wb") as f:
        for key, record, count in items:
            encoded = key.encode("ascii")
            f.write(struct.pack(_ITEM, len(encoded), len(record), count) + encoded + record)


def read(path: str) -> list[tuple[str, bytes, int]]:
    """A spill file's items; plain bytes and lengths, no code (pickle would run whatever it finds)."""
    with open(path, "rb") as f:
        data = f.read()
    items, at = [], 0
    while at < len(data):
        key_len, record_len, count = struct.unpack_from(_ITEM, data, at)
        at += struct.calcsize(_ITEM)
        key, record = data[at:at + key_len].decode("ascii"), data[at + key_len:at + key_len + record_len]
        items.append((key, record, count))
        at += key_len + record_len
    return items


def shard_items(grouped) -> list[tuple[str, bytes, int]]:
    """A shard's grouped values -> its (key, record, token count) items: records themselves, spill
    file names (their items are read back), and the None placeholder that makes empty shards exist."""
    items = []
    for value in grouped:
        if isinstance(value, str):
            items.extend(read(value))
        elif value is not None:
            items.append(value)
    return items
