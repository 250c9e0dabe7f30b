"""Training batches from a preprocess output: manifest checks and the Grain pipeline.

Record indices (manifest order) -> global seeded shuffle -> repeat (reshuffled each
epoch) -> this stream's indices -> chunks of `data.pack_documents` -> one batched read and
decode per chunk -> pack the chunk into seq_len rows (trainer/packing.py: tokens, segment
ids, positions) -> rows rebatched to the batch size -> optional multiprocess prefetch.
Grain handles a chunk, not a document, per element: its per-element machinery costs more
than reading and packing a document. The order is a pure function of (seed, step), and
the iterator's state (the chunk being consumed and the row within it) is checkpointed
with the model.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import grain
import numpy as np
from etils import epath
from tokenizers import Tokenizer

from trainer import objectives, packing
from trainer.objectives import editflow
from trainer.checkpointing import first_line
from trainer.config import Config, ModelConfig
from trainer.errors import DataError

FORMAT_VERSION = 1
# Which documents share a row and which rows form a batch; a checkpointed iterator state resumes
# only under the order that wrote it. 1: Grain's first-fit packer over single documents.
# 2: chunks of data.pack_documents packed best-fit decreasing.
DATA_ORDER = 2


# What every reader of a manifest (the trainer, evals, trajectories) relies on: key paths and types.
MANIFEST_KEYS = {
    ("record_schema", "dtype"): str, ("record_schema", "fields"): list,
    ("tokenizer", "file"): str, ("tokenizer", "sha256"): str, ("tokenizer", "vocab_size"): int,
    **{("tokenizer", "special_ids", name): (int, type(None)) for name in ("pad", "bos", "eos", "mask")},
    **{("splits", split, key): kind for split in ("train", "validation")
       for key, kind in (("num_records", int), ("shards", list))},
}
SHARD_KEYS = {"file": str, "num_records": int}


def load_manifest(path: str) -> dict[str, Any]:
    """A preprocess output's manifest, checked against what its readers rely on: one DataError line
    for a missing file, invalid JSON, another format version or a missing or mistyped key."""
    manifest_path = epath.Path(path) / "manifest.json"
    if not manifest_path.exists():
        raise DataError(f"{path} has no manifest.json: not a finished preprocess output (data.path)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except ValueError as e:
        raise DataError(f"{manifest_path} is not valid JSON ({first_line(e)}): re-run preprocess") from None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version != FORMAT_VERSION:
        raise DataError(f"{manifest_path} has format_version {version}, this trainer reads {FORMAT_VERSION}")
    problem = _schema_problem(manifest)
    if problem:
        raise DataError(f"{manifest_path} {problem}: not a manifest preprocess wrote (re-run preprocess)")
    return manifest


def _schema_problem(manifest: dict[str, Any]) -> str | None:
    """What the manifest lacks of MANIFEST_KEYS and SHARD_KEYS (None: nothing)."""
    for keys, kind in MANIFEST_KEYS.items():
        value = manifest
        for key in keys:
            if not isinstance(value, dict) or key not in value:
                return f"lacks {'.'.join(keys)}"
            value = value[key]
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
            return f"has {'.'.join(keys)}={value!r}, not of the type preprocess writes"
    for split in ("train", "validation"):
        for i, shard in enumerate(manifest["splits"][split]["shards"]):
            if not isinstance(shard, dict) or any(not isinstance(shard.get(k), t) for k, t in SHARD_KEYS.items()):
                return f"has a shard entry splits.{split}.shards[{i}] without {' and '.join(SHARD_KEYS)}"
    return None


def tokenizer_sha(path: str) -> str | None:
    """The sha256 of a dataset's tokenizer from its manifest (None where it has no manifest)."""
    manifest_path = epath.Path(path) / "manifest.json"
    return json.loads(manifest_path.read_text())["tokenizer"]["sha256"] if manifest_path.exists() else None


def check_dataset(path: str, manifest: dict[str, Any], model: ModelConfig, verify: str = "full") -> None:
    """Refuses a shard set whose tokenizer, record counts or (verify="full") bytes disagree with the
    manifest, or whose vocabulary differs from the model's."""
    tok = manifest["tokenizer"]
    if tok["vocab_size"] != model.vocab_size:
        raise DataError(f"model.vocab_size {model.vocab_size} does not match the dataset's "
                        f"tokenizer ({tok['vocab_size']} tokens in {path}/tokenizer.json)")
    if not manifest["splits"]["train"]["num_records"]:
        raise DataError(f"the train split of {path} holds no records: preprocess more data or a lower "
                        f"--validation_fraction")
    tokenizer_bytes = (epath.Path(path) / tok["file"]).read_bytes()
    if hashlib.sha256(tokenizer_bytes).hexdigest() != tok["sha256"]:
        raise DataError(f"{path}/{tok['file']} does not match the manifest's sha256: the dataset was altered")
    largest = max(tokenizer_vocab(tokenizer_bytes.decode()).values())
    if largest >= tok["vocab_size"]:  # older preprocess jobs counted tokens, which ids with gaps outrun
        raise DataError(f"{path}/{tok['file']} has token ids up to {largest} but the manifest's vocab_size is "
                        f"{tok['vocab_size']}: re-run preprocess (the vocabulary is the largest id + 1)")
    for split in ("train", "validation"):
        for shard in manifest["splits"][split]["shards"]:
            shard_path = str(epath.Path(path) / shard["file"])
            try:
                count = len(grain.sources.ArrayRecordDataSource([shard_path]))
            except Exception as e:
                raise DataError(f"cannot read shard {shard_path}: {str(e).splitlines()[0]}") from None
            if count != shard["num_records"]:
                raise DataError(f"{shard_path} holds {count} records but the manifest says "
                                f"{shard['num_records']}: re-run preprocess")
            if verify == "full":
                with epath.Path(shard_path).open("rb") as f:
                    if hashlib.file_digest(f, "sha256").hexdigest() != shard["sha256"]:
                        raise DataError(f"{shard_path} does not match the manifest's sha256: the shard is "
                                        f"corrupt; re-run preprocess (data.verify=quick skips this check)")


def special_ids(manifest: dict[str, Any]) -> dict[str, int | None]:
    return manifest["tokenizer"]["special_ids"]


def tokenizer_vocab(tokenizer_json: str) -> dict[str, int]:
    """Every token of a tokenizer.json (added tokens included) and its id."""
    return Tokenizer.from_str(tokenizer_json).get_vocab(with_added_tokens=True)


class ShardSource:
    """The records of a split's shards (Grain's ArrayRecordDataSource), checked as they are read: a
    record that cannot be read, or that holds a token id the vocabulary lacks, is a one-line
    DataError naming its shard, never a Riegeli traceback or an id silently clamped by the
    embedding lookup."""

    def __init__(self, path: str, manifest: dict[str, Any], split: str):
        self._path, self._paths = path, shard_paths(path, manifest, split)
        schema = manifest["record_schema"]
        self._header, self._dtype = 4 * len(schema["fields"]), np.dtype(schema["dtype"]).newbyteorder("<")
        self._vocab_size = manifest["tokenizer"]["vocab_size"]
        try:
            self._source = grain.sources.ArrayRecordDataSource(self._paths)
        except Exception as e:
            raise self._damaged(self._unreadable_shard(), e) from None

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> bytes:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[bytes]:
        try:
            records = self._source.__getitems__(indices)  # one call: the reads run in parallel
        except Exception as e:
            raise self._damaged(self._unreadable_record(indices, e), e) from None
        for index, record in zip(indices, records):
            ids = np.frombuffer(record, self._dtype, offset=self._header)
            if len(ids) and int(ids.max()) >= self._vocab_size:
                raise DataError(f"shard {self._shard_of(index)} holds token id {int(ids.max())}, past the manifest's "
                                f"vocab_size {self._vocab_size}: the shard is damaged; check the dataset with "
                                f"python -m pipelines.manifest {self._path}")
        return records

    def _damaged(self, shard: str, error: Exception) -> DataError:
        return DataError(f"shard {shard} is damaged ({first_line(error)}): check the dataset with python -m "
                         f"pipelines.manifest {self._path}, then re-run preprocess")

    def _unreadable_shard(self) -> str:
        for shard in self._paths:
            try:
                grain.sources.ArrayRecordDataSource([shard])
            except Exception:
                return shard
        return ", ".join(self._paths)

    def _unreadable_record(self, indices: list[int], error: Exception) -> str:
        """The shard of the first record that fails alone (the batched read does not say which)."""
        for index in indices:
            try:
                self._source[index]
            except Exception:
                return self._shard_of(index)
        raise error

    def _shard_of(self, index: int) -> str:
        ends = np.cumsum([len(grain.sources.ArrayRecordDataSource([p])) for p in self._paths])
        return self._paths[int(np.searchsorted(ends, index, side="right"))]


class _Decode(grain.transforms.Map):
    """Record bytes -> all fields' token ids concatenated (prompt then response for trajectories)."""

    def __init__(self, num_fields: int, dtype: str):
        self._num_fields, self._dtype = num_fields, np.dtype(dtype).newbyteorder("<")

    def map(self, record: bytes) -> dict[str, np.ndarray]:
        lengths = np.frombuffer(record, "<u4", count=self._num_fields)
        ids = np.frombuffer(record, self._dtype, offset=4 * self._num_fields)
        # Fields before the last one are the prompt (trajectories); text has none.
        return {"tokens": ids.astype(np.int32), "prompt_len": np.int32(lengths[:-1].sum())}


class _TrajectoryRow(grain.transforms.Map):
    """One prompt + response example in a fixed row (no packing: examples never see each other).

    The row is padded with EOS; the response and the first `supervised_eos` EOS after it carry
    loss, the prompt and the rest do not (DMax's labels). A response that overflows the row is
    cut at the row's end (counted in `truncated`).
    """

    def __init__(self, seq_len: int, eos_id: int, supervised_eos: int):
        self._seq_len, self._eos, self._supervised_eos = seq_len, eos_id, supervised_eos

    def map(self, element):
        tokens, prompt_len = element["tokens"], int(element["prompt_len"])
        row = np.full(self._seq_len, self._eos, np.int32)
        row[: min(len(tokens), self._seq_len)] = tokens[: self._seq_len]
        index = np.arange(self._seq_len)
        supervised = (index >= prompt_len) & (index < len(tokens) + self._supervised_eos)
        return {"tokens": row, "prompt_len": np.int32(min(prompt_len, self._seq_len)),
                "loss_mask": supervised, "truncated": np.int32(len(tokens) > self._seq_len)}


def shard_paths(path: str, manifest: dict[str, Any], split: str) -> list[str]:
    return [str(epath.Path(path) / s["file"]) for s in manifest["splits"][split]["shards"]]


def documents(path: str, manifest: dict[str, Any], split: str) -> grain.MapDataset:
    """The split's documents in manifest order, each as {"tokens": int32 ids} (all fields joined)."""
    schema = manifest["record_schema"]
    source = ShardSource(path, manifest, split)
    return grain.MapDataset.source(source).map(_Decode(len(schema["fields"]), schema["dtype"]))


def read_options(cfg: Config) -> grain.ReadOptions:
    # Grain's default (16 threads, 500 elements ahead) polls every pending read per element: slower
    # than reading in line on local disk. Order is the same either way.
    return grain.ReadOptions(num_threads=cfg.data.read_threads, prefetch_buffer_size=cfg.data.read_buffer)


class _Chunks(grain.MapDataset):
    """Runs of `size` consecutive elements of an index dataset, each one int64 array (the last may be
    short). Fetched through Grain's batched `_getitems` (the path its batch pushdown uses): one pass
    through shuffle/repeat/slice per chunk instead of one per element, which cost more than the
    read itself."""

    def __init__(self, parent: grain.MapDataset, size: int):
        super().__init__(parent)
        self._size = size

    def __len__(self) -> int:
        return -(-len(self._parent) // self._size)

    def __getitem__(self, chunk):
        if isinstance(chunk, slice):
            return self.slice(chunk)
        start = chunk * self._size
        indices = range(start, min(start + self._size, len(self._parent)))
        return np.asarray(self._parent._getitems(list(indices)), np.int64)  # noqa: SLF001 (Grain's batched read)

    def __str__(self) -> str:
        return f"_Chunks(size={self._size})"


class _ReadAndPack(grain.experimental.MapWithIndexTransform):
    """A chunk of record indices -> its documents packed into rows ([R, seq_len] arrays)."""

    def __init__(self, source: ShardSource, schema: dict[str, Any], seq_len: int, seed: int | None, stream: int,
                 fill_eos_id: int | None = None):
        self._source = source
        self._header = 4 * len(schema["fields"])
        self._dtype = np.dtype(schema["dtype"]).newbyteorder("<")
        self._seq_len, self._seed, self._stream, self._fill_eos_id = seq_len, seed, stream, fill_eos_id

    def map_with_index(self, index: int, indices_N: np.ndarray) -> dict[str, np.ndarray]:
        records = self._source.__getitems__(indices_N.tolist())
        documents = [np.frombuffer(r, self._dtype, offset=self._header) for r in records]
        rng = None if self._seed is None else np.random.default_rng([self._seed, self._stream, index])
        rows = packing.pack(documents, self._seq_len, rng)
        return rows if self._fill_eos_id is None else packing.fill_with_eos(rows, self._fill_eos_id)


def in_reading_order(ds: grain.MapDataset, seed: int, *, shuffle: bool, repeat: bool, process_index: int = 0,
                     process_count: int = 1) -> grain.MapDataset:
    """A split's records as one loader stream reads them: a global seeded shuffle, a new permutation
    each epoch (Grain reshuffles a shuffled dataset each time it repeats), then record-level
    sharding (stream i of n takes every n-th)."""
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if repeat:
        ds = ds.repeat()
    return ds[process_index::process_count]


def packed_dataset(
    cfg: Config, manifest: dict[str, Any], split: str, batch_size: int, *, shuffle: bool,
    repeat: bool, process_index: int = 0, process_count: int = 1,
) -> grain.IterDataset:
    """Batches of {tokens, tokens_segment_ids, tokens_positions}, each [batch_size, seq_len] int32."""
    source = ShardSource(cfg.data.path, manifest, split)
    ds = in_reading_order(grain.MapDataset.range(len(source)), cfg.seed, shuffle=shuffle, repeat=repeat,
                          process_index=process_index, process_count=process_count)
    ds = _Chunks(ds, cfg.data.pack_documents).map_with_index(_ReadAndPack(
        source, manifest["record_schema"], cfg.data.seq_len, cfg.seed if shuffle else None, process_index,
        special_ids(manifest)["eos"] if cfg.data.eos_fill else None))
    rows = ds.to_iter_dataset(read_options(cfg))
    return grain.experimental.RebatchIterDataset(rows, batch_size, drop_remainder=repeat)


def trajectory_dataset(cfg: Config, manifest: dict[str, Any], split: str, batch_size: int, *, shuffle: bool,
                       repeat: bool, process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
    """Batches of {tokens, prompt_len, loss_mask, truncated} for prompt/response training."""
    if manifest["record_schema"]["fields"] != ["prompt", "response"]:
        raise DataError(f"objective.name={cfg.objective.name} needs prompt/response records "
                        f"(preprocess --dataset dmax_trajectories); {cfg.data.path} holds "
                        f"{manifest['record_schema']['fields']}")
    ds = in_reading_order(documents(cfg.data.path, manifest, split), cfg.seed, shuffle=shuffle, repeat=repeat,
                          process_index=process_index, process_count=process_count)
    row = _TrajectoryRow(cfg.data.seq_len, special_ids(manifest)["eos"], cfg.objective.supervised_eos)
    ds = ds.map(row).to_iter_dataset(read_options(cfg))
    return ds.batch(batch_size, drop_remainder=repeat)


class _EditColumns(grain.experimental.MapWithIndexTransform):
    """One document (or prompt + response) -> Edit Flows' aligned columns (objectives/editflow.py),
    the shared prefix drawn from (seed, stream, element index): the same rows on every run."""

    def __init__(self, cfg: Config, mask_id: int, stream: int):
        self._cfg, self._mask_id, self._stream = cfg, mask_id, stream

    def map_with_index(self, index: int, element: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        s, tokens = self._cfg.objective, element["tokens"]
        rng = np.random.default_rng([self._cfg.seed, self._stream, index])
        prompt_len = editflow.example_prompt_len(int(element["prompt_len"]), len(tokens), s, rng)
        return editflow.columns(tokens, prompt_len, s, self._mask_id, self._cfg.data.seq_len)


def edit_dataset(cfg: Config, manifest: dict[str, Any], split: str, batch_size: int, *, shuffle: bool,
                 repeat: bool, process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
    """Batches of {z0, z1, tokens_segment_ids} [batch_size, seq_len] and {x1_len, prompt_len, truncated}
    [batch_size]: one example per row, never packed (an edit may change its length)."""
    ds = in_reading_order(documents(cfg.data.path, manifest, split), cfg.seed, shuffle=shuffle, repeat=repeat,
                          process_index=process_index, process_count=process_count)
    ds = ds.map_with_index(_EditColumns(cfg, special_ids(manifest)["mask"], process_index))
    return ds.to_iter_dataset(read_options(cfg)).batch(batch_size, drop_remainder=repeat)


# The rows each kind of objective reads (an objective's registry entry names one), in training and in
# the evals' likelihood (which scores trajectories' prompt + response as text).
LOADERS = {objectives.registry.PACKED: packed_dataset, objectives.registry.TRAJECTORY: trajectory_dataset,
           objectives.registry.EDIT: edit_dataset}
EVAL_LOADERS = {**LOADERS, objectives.registry.TRAJECTORY: packed_dataset}


class _ConcatStreams(grain.IterDataset):
    """Each step, one batch from every stream, concatenated along rows (stream order)."""

    def __init__(self, streams: list[grain.IterDataset]):
        super().__init__(streams)
        self._streams = streams

    def __iter__(self):
        return _ConcatStreamsIterator([iter(stream) for stream in self._streams])


class _ConcatStreamsIterator(grain.DatasetIterator):
    def __init__(self, iterators):
        super().__init__(iterators)
        self._iterators = iterators

    def __next__(self):
        batches = [next(it) for it in self._iterators]
        return {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}

    def get_state(self):
        return {"streams": [it.get_state() for it in self._iterators]}

    def set_state(self, state):
        for it, stream_state in zip(self._iterators, state["streams"]):
            it.set_state(stream_state)


def train_iterator(cfg: Config, manifest: dict[str, Any], process_index: int = 0,
                   process_count: int = 1):
    """The checkpointable training iterator of this process's share of each global batch.

    A global batch is `data.streams` equal parts; stream s reads records s, s + streams, ...
    of the shuffled order and packs them on its own. A process owns a contiguous run of
    streams, so the global batch is the same whatever the number of processes, and each
    process reads only its own records.
    """
    streams = cfg.data.streams or process_count
    rows = cfg.train.global_batch // streams
    make = LOADERS[objectives.get(cfg.objective.name).batch]
    owned = range(process_index * streams // process_count, (process_index + 1) * streams // process_count)
    parts = [make(cfg, manifest, "train", rows, shuffle=True, repeat=True, process_index=s, process_count=streams)
             for s in owned]
    ds = parts[0] if len(parts) == 1 else _ConcatStreams(parts)
    if cfg.data.num_workers > 0:
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=cfg.data.num_workers, per_worker_buffer_size=cfg.data.prefetch))
    return iter(ds)


def loader_settings(cfg: Config, manifest: dict[str, Any], process_count: int = 1) -> dict[str, Any]:
    """What a checkpointed iterator state means something under (saved with it, compared on resume):
    the rows the loader builds, how many streams share a global batch, and the train shards read."""
    shards = "".join(s["sha256"] for s in manifest["splits"]["train"]["shards"])
    return {"train.global_batch": cfg.train.global_batch, "data.streams": cfg.data.streams or process_count,
            "data.seq_len": cfg.data.seq_len, "data.pack_documents": cfg.data.pack_documents, "seed": cfg.seed,
            "rows": objectives.get(cfg.objective.name).batch,
            "data.eos_fill": cfg.data.eos_fill,
            "train shards sha256": hashlib.sha256(shards.encode()).hexdigest()[:16]}


def epochs_for(manifest: dict[str, Any], cfg: Config) -> float:
    """Approximate epochs a run covers, for the start-of-run summary."""
    tokens = manifest["splits"]["train"]["num_tokens"]
    return cfg.train.steps * cfg.train.global_batch * cfg.data.seq_len / max(tokens, 1)
