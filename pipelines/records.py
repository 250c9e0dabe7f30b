"""The on-disk record: token-id fields in one ArrayRecord record, and where each record goes.

A record is `num_fields` little-endian uint32 field lengths followed by each field's token
ids in the manifest's dtype (little endian). Decoding needs only numpy:

    lengths = np.frombuffer(record, "<u4", count=num_fields)
    ids = np.frombuffer(record, dtype, offset=4 * num_fields)
    fields = np.split(ids, np.cumsum(lengths)[:-1])
"""

from __future__ import annotations

import hashlib
import itertools

import numpy as np

RECORD_LAYOUT = (
    "num_fields little-endian uint32 field lengths, then each field's token ids "
    "in `dtype`, little endian, concatenated in `fields` order"
)
_SHARD_SALT = b"dlm-shard-v1:"  # keeps shard choice independent of the split decision


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def encode_batch(fields_FD: list[list[list[int]]], dtype: np.dtype) -> tuple[list[bytes], np.ndarray]:
    """D records from F fields (`fields_FD[f][d]`: document d's ids in field f), and each record's
    token count. One numpy conversion per field, not one per document: the job's hot loop."""
    lengths_FD = np.array([[len(ids) for ids in field] for field in fields_FD], dtype="<u4")
    headers_D = [h.tobytes() for h in lengths_FD.T]
    fields_bytes_FD = []
    for field, lengths_D in zip(fields_FD, lengths_FD):
        data = np.fromiter(itertools.chain.from_iterable(field), dtype, count=int(lengths_D.sum())).tobytes()
        ends_D = np.cumsum(lengths_D, dtype=np.int64) * dtype.itemsize
        starts_D = ends_D - lengths_D * dtype.itemsize
        fields_bytes_FD.append([data[a:b] for a, b in zip(starts_D.tolist(), ends_D.tolist())])
    records_D = [b"".join(parts) for parts in zip(headers_D, *fields_bytes_FD)]
    return records_D, lengths_FD.sum(axis=0, dtype=np.int64)


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
