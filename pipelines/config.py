"""The preprocess job's options: one typed field per knob; the CLI is generated from it."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from pipelines.sources import UserError
from pipelines.tokenizer import MIN_VOCAB_SIZE

DATASETS = ("tinystories", "dmax_trajectories", "tfds")
COMPRESSIONS = ("uncompressed", "snappy", "zstd", "brotli")


def _knob(default: Any, help: str, **kwargs: Any) -> Any:
    return dataclasses.field(default=default, metadata={"help": help, **kwargs})


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
    dataset: str = _knob(None, "Input kind: " + " | ".join(DATASETS) + ".", choices=DATASETS)
    input: str = _knob(None, "Comma-separated paths or globs (local or gs://); for tfds NAME[/CONFIG]:SPLIT.")
    output: str = _knob(None, "Output directory (local or gs://) for shards, tokenizer.json and manifest.json.")
    tokenizer: str | None = _knob(None, "An existing Hugging Face tokenizer.json to use instead of training one.")
    vocab_size: int = _knob(4096, "Vocabulary size of the byte-level BPE trained on the train split.")
    mask_token: str | None = _knob(None, "Name of the mask token in --tokenizer (found by its usual names if unset).")
    tokenizer_train_docs: int = _knob(100_000, "Train documents sampled (lowest content hashes) to train the BPE.")
    num_shards: int = _knob(8, "ArrayRecord shards of the train split.")
    num_validation_shards: int = _knob(1, "ArrayRecord shards of the validation split.")
    validation_fraction: float = _knob(0.05, "Share of documents sent to validation by content hash.")
    max_bad_fraction: float = _knob(0.01, "Fail the job when more than this share of records is bad.")
    max_doc_chars: int = _knob(100_000, "Longer documents are dead-lettered as too_long.")
    text_field: str = _knob("text", "Field holding the text in JSON-lines, parquet and TFDS rows.")
    prompt_suffix: str = _knob("\n", "Ends each trajectory prompt before tokenizing (dmax_trajectories): a newline "
                               "starts the response on a fresh pre-token; '' keeps a text continuation seamless.")
    tfds_data_dir: str | None = _knob(None, "TFDS data_dir (local or gs://) holding the prepared dataset.")
    read_chunk_bytes: int = _knob(64 << 20, "Byte range one worker reads of a text or JSON-lines file.")
    batch_docs: int = _knob(1024, "Documents read, validated and tokenized as one pipeline element.")
    shard_compression: str = _knob("uncompressed", "ArrayRecord chunk compression: " + " | ".join(COMPRESSIONS)
                                   + " (token ids barely compress; compressed shards write and read slower).",
                                   choices=COMPRESSIONS)
    overwrite: bool = _knob(False, "Replace a finished dataset already in --output.")

    @property
    def input_patterns(self) -> list[str]:
        return [p.strip() for p in self.input.split(",") if p.strip()]

    def validate(self) -> None:
        checks = [
            (self.vocab_size >= MIN_VOCAB_SIZE, "vocab_size",
             f"must be at least {MIN_VOCAB_SIZE} (256 bytes + the special tokens)"),
            (self.num_shards >= 1, "num_shards", "must be at least 1"),
            (self.num_validation_shards >= 1, "num_validation_shards", "must be at least 1"),
            (0 <= self.validation_fraction < 1, "validation_fraction", "must be in [0, 1)"),
            (0 <= self.max_bad_fraction <= 1, "max_bad_fraction", "must be in [0, 1]"),
            (self.max_doc_chars >= 1, "max_doc_chars", "must be positive"),
            (self.tokenizer_train_docs >= 1, "tokenizer_train_docs", "must be positive"),
            (self.read_chunk_bytes >= 1 << 10, "read_chunk_bytes", "must be at least 1024"),
            (self.batch_docs >= 1, "batch_docs", "must be positive"),
            (bool(self.input_patterns), "input", "names no path"),
        ]
        for ok, name, message in checks:
            if not ok:
                raise UserError(f"--{name} {getattr(self, name)!r} {message}")

    def manifest_options(self) -> dict[str, Any]:
        """The options that shape the output (not where it goes, nor how it is run)."""
        options = dataclasses.asdict(self)
        for name in ("output", "overwrite", "read_chunk_bytes", "batch_docs"):
            options.pop(name)
        return options


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipelines.preprocess",
        description="Tokenize text into ArrayRecord shards with a manifest (an Apache Beam job). "
        "Unknown flags go to Beam (--runner, --direct_num_workers, --project, --region, "
        "--temp_location, --setup_file, ...).",
    )
    for f in dataclasses.fields(PreprocessConfig):
        meta = dict(f.metadata)
        help_text = meta.pop("help")
        if f.type == "bool":
            p.add_argument(f"--{f.name}", action="store_true", help=help_text)
            continue
        kind = {"int": int, "float": float}.get(f.type, str)
        required = f.name in ("dataset", "input", "output")
        p.add_argument(f"--{f.name}", type=kind, default=f.default, required=required,
                       help=help_text, **meta)
    return p


def parse(argv: list[str]) -> tuple[PreprocessConfig, list[str]]:
    """(config, the remaining flags for Beam); argparse itself exits 2 on malformed flags."""
    known, beam_args = parser().parse_known_args(argv)
    config = PreprocessConfig(**vars(known))
    config.validate()
    return config, beam_args
