"""The on-disk record: token-id fields in one ArrayRecord record, and where each record goes.

A record is `num_fields` little-endian uint32 field lengths followed by each field's token
ids in the manifest's dtype (little endian). Decoding needs only numpy:

    lengths = np.frombuffer(record, "<u4", count=num_fields)
    ids = np.frombuffer(record, dtype, offset=4 * num_fields)
    fields = np.split(ids, np.cumsum(lengths)[:-1])
"""

from __future__ import annotations

import hashlib

import numpy as np

RECORD_LAYOUT = (
    "num_fields little-endian uint32 field lengths, then each field's token ids "
    "in `dtype`, little endian, concatenated in `fields` order"
)
_SHARD_SALT = b"dlm-shard-v1:"  # keeps shard choice independent of the split decision


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def encode(fields: list[list[int]], dtype: np.dtype) -> bytes:
    header = np.array([len(f) for f in fields], dtype="<u4").tobytes()
    return header + np.concatenate([np.asarray(f, dtype=dtype) for f in fields]).tobytes()


def decode(record: bytes, num_fields: int, dtype: np.dtype) -> list[np.ndarray]:
    lengths = np.frombuffer(record, "<u4", count=num_fields)
    ids = np.frombuffer(record, dtype, offset=4 * num_fields)
    return np.split(ids, np.cumsum(lengths)[:-1])


def split_of(key: str, validation_fraction: float) -> str:
    """Validation iff the content hash falls in the lowest `validation_fraction` of its range."""
    return "validation" if int(key[:16], 16) < validation_fraction * 2**64 else "train"


def shard_of(key: str, num_shards: int) -> int:
    digest = hashlib.sha256(_SHARD_SALT + key.encode("ascii")).digest()
    return int.from_bytes(digest[:8], "big") % num_shards


def shard_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}.array_record"
