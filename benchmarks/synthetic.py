"""A dataset in the preprocess output's layout, written without Beam or a trained tokenizer: random
token documents in ArrayRecord shards and a manifest, for loader benchmarks on machines that have
Grain and array_record but not Beam (the lent accelerator's image)."""

from __future__ import annotations

import hashlib
import json
import pathlib

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from pipelines import records
from trainer.data import FORMAT_VERSION

TOKENIZER_STAND_IN = '{"note": "random token ids: no tokenizer made these documents"}'


def token_dataset(directory: str, documents: int, vocab: int = 4096, shards: int = 4, seed: int = 0) -> str:
    """`documents` random documents of 60 to 400 tokens (TinyStories-like lengths), BOS first and EOS
    last, as uint16 one-field records in `shards` train shards; returns the dataset directory."""
    out = pathlib.Path(directory) / "data"
    out.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    entries = []
    for shard in range(shards):
        name = records.shard_name("train", shard, shards)
        docs = [[1, *rng.integers(4, vocab, rng.integers(60, 400)).tolist(), 2] for _ in range(shard, documents, shards)]
        encoded, counts = records.encode_batch([docs], records.token_dtype(vocab))
        writer = ArrayRecordWriter(str(out / name), "group_size:1,uncompressed")
        for record in encoded:
            writer.write(record)
        writer.close()
        count, tokens = len(encoded), int(counts.sum())
        data = (out / name).read_bytes()
        entries.append({"file": name, "num_records": count, "num_tokens": tokens, "num_bytes": len(data),
                        "sha256": hashlib.sha256(data).hexdigest()})
    (out / "tokenizer.json").write_text(TOKENIZER_STAND_IN)
    split = lambda shards: {"num_records": sum(s["num_records"] for s in shards),  # noqa: E731
                            "num_tokens": sum(s["num_tokens"] for s in shards), "shards": shards}
    manifest = {
        "format_version": FORMAT_VERSION, "dataset": "synthetic",
        "record_schema": {"dtype": records.token_dtype(vocab).name, "byteorder": "little", "fields": ["tokens"],
                          "layout": records.RECORD_LAYOUT},
        "tokenizer": {"file": "tokenizer.json", "sha256": hashlib.sha256(TOKENIZER_STAND_IN.encode()).hexdigest(),
                      "vocab_size": vocab, "special_ids": {"pad": 0, "bos": 1, "eos": 2, "mask": 3},
                      "trained_by_job": False},
        "splits": {"train": split(entries), "validation": split([])},
        "options": {},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return str(out)
