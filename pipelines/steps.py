"""The preprocess job's steps (Beam DoFns and the writers of its outputs); pipelines/preprocess.py
wires them into the graph."""

from __future__ import annotations

import concurrent.futures
import os
import tempfile
import uuid

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindows
from array_record.python.array_record_module import ArrayRecordWriter

from pipelines import JOB_FAILURE_PREFIX, documents, manifest, records, sources, spill, storage, tokenizer
from pipelines.config import PreprocessConfig
from pipelines.documents import BadRecord, Document
from pipelines.manifest import ShardInfo

NAMESPACE = "preprocess"  # Beam counters


class JobFailure(RuntimeError):
    """Raised inside the pipeline for a data problem the user must fix (one line)."""

    def __init__(self, message: str):
        super().__init__(JOB_FAILURE_PREFIX + message)


class ReadAndValidate(beam.DoFn):
    """Work unit -> batches of up to `batch_docs` (split, Document), or a BadRecord on the 'bad' output.

    Batches, not documents, travel the graph: Beam's per-element cost is paid once per batch."""

    BAD = "bad"

    def __init__(self, config: PreprocessConfig):
        self._config = config
        self._documents = {split: Metrics.counter(NAMESPACE, f"documents_{split}") for split in manifest.SPLITS}

    def process(self, unit: sources.WorkUnit):
        c = self._config
        batch: list[tuple[str, Document]] = []
        for raw in sources.read_unit(unit, c.tfds_data_dir):
            result = documents.validate(raw, c.dataset, c.text_field, c.max_doc_chars)
            if isinstance(result, BadRecord):
                Metrics.counter(NAMESPACE, f"bad_records_{result.reason}").inc()
                yield beam.pvalue.TaggedOutput(self.BAD, result)
                continue
            batch.append((records.split_of(result.key, c.validation_fraction), result))
            if len(batch) == c.batch_docs:
                yield self._counted(batch)
                batch = []
        if batch:
            yield self._counted(batch)

    def _counted(self, batch: list[tuple[str, Document]]) -> list[tuple[str, Document]]:
        for split, counter in self._documents.items():
            counter.inc(sum(s == split for s, _ in batch))
        return batch


class Tokenize(beam.DoFn):
    """A batch of (split, Document) -> ((split, shard), (key, record bytes, token count)), or with
    `spill_dir` ((split, shard), the path of a file holding the batch's items of that shard).

    The tokenizer runs one batch ahead on a thread: it releases the GIL and spreads a batch over
    every core, so while it encodes batch k+1 this thread builds batch k's records and reads and
    validates upstream. Records leave in the bundle's batch order all the same."""

    def __init__(self, config: PreprocessConfig, spill_dir: str | None = None):
        self._config = config
        self._spill_dir = spill_dir
        self._json: str | None = None

    def setup(self):
        self._encoder = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tokenize")

    def teardown(self):
        self._encoder.shutdown()

    def start_bundle(self):
        self._pending: tuple[list, concurrent.futures.Future] | None = None

    def _load(self, tokenizer_json: str) -> None:
        if tokenizer_json != self._json:
            self._tokenizer = tokenizer.parse(tokenizer_json)
            self._ids = tokenizer.special_ids(self._tokenizer, self._config.mask_token)
            self._dtype = records.token_dtype(tokenizer.vocab_size(self._tokenizer))
            self._json = tokenizer_json

    def process(self, batch: list[tuple[str, Document]], tokenizer_json: str):
        self._load(tokenizer_json)
        ahead = (batch, self._encoder.submit(self._fields, self._tokenizer, [doc for _, doc in batch]))
        pending, self._pending = self._pending, ahead
        if pending is not None:
            yield from self._records(*pending)

    def finish_bundle(self):
        pending, self._pending = self._pending, None
        if pending is not None:
            for element in self._records(*pending):
                yield GlobalWindows.windowed_value(element)

    def _fields(self, tok, docs: list[Document]) -> list[list[list[int]]]:
        """The batch's record fields, field-major: [bos + text + eos], or [bos + prompt], [response + eos]."""
        def encode(texts: list[str]) -> list[list[int]]:
            # encode_batch_fast skips character offsets, which records never store: same ids, less work.
            return [e.ids for e in tok.encode_batch_fast(texts, add_special_tokens=False)]

        bos = [] if self._ids.bos is None else [self._ids.bos]
        eos = [self._ids.eos]
        if self._config.dataset == "dmax_trajectories":
            prompts = encode([d.texts[0] + self._config.prompt_suffix for d in docs])
            responses = encode([d.texts[1] for d in docs])
            return [[bos + p for p in prompts], [r + eos for r in responses]]
        return [[bos + ids + eos for ids in encode([d.texts[0] for d in docs])]]

    def _records(self, batch: list[tuple[str, Document]], fields: concurrent.futures.Future):
        encoded, counts = records.encode_batch(fields.result(), self._dtype)
        Metrics.counter(NAMESPACE, "tokens").inc(int(counts.sum()))
        by_shard: dict[tuple[str, int], list] = {}
        for (split, doc), record, count in zip(batch, encoded, counts.tolist()):
            shard = records.shard_of(doc.key, self._num_shards(split))
            by_shard.setdefault((split, shard), []).append((doc.key, record, count))
        for shard, items in by_shard.items():
            if self._spill_dir is None:
                yield from ((shard, item) for item in items)
            else:  # a retried batch writes new files; only the names of the attempt that counts are grouped
                path = os.path.join(self._spill_dir, f"{shard[0]}-{shard[1]:05d}-{uuid.uuid4().hex}.spill")
                spill.write(path, items)
                yield shard, path

    def _num_shards(self, split: str) -> int:
        c = self._config
        return c.num_shards if split == "train" else c.num_validation_shards


class WriteShard(beam.DoFn):
    """(split, shard) + its records -> the shard file in place, sorted by key; its ShardInfo."""

    def __init__(self, output: str, shard_counts: dict[str, int], compression: str):
        self._output = output
        self._shard_counts = shard_counts
        self._options = f"group_size:1,{compression}"  # one record per chunk: random access reads one chunk

    def process(self, element):
        (split, index), grouped = element
        # Sorting by key (then bytes, for identical documents) fixes the order whatever
        # the arrival order or spill files.
        rows = sorted(spill.shard_items(grouped))
        name = records.shard_name(split, index, self._shard_counts[split])
        with tempfile.TemporaryDirectory() as tmp:
            local = f"{tmp}/{name}"
            writer = ArrayRecordWriter(local, self._options)
            for _, record, _ in rows:
                writer.write(record)
            writer.close()
            size, sha = storage.copy_local_file_atomic(local, storage.join(self._output, name))
        Metrics.counter(NAMESPACE, "shards_written").inc()
        yield ShardInfo(split, index, name, len(rows), sum(n for _, _, n in rows), size, sha)


def write_dead_letters(bad: list[BadRecord], output: str) -> int:
    lines = sorted(bad, key=lambda b: (b.source, b.position))
    data = "".join(b.to_json() + "\n" for b in lines).encode("utf-8")
    storage.write_bytes_atomic(storage.join(output, manifest.DEAD_LETTER), data)
    return len(lines)


def write_tokenizer(tokenizer_json: str, output: str) -> str:
    storage.write_bytes_atomic(storage.join(output, manifest.TOKENIZER), tokenizer_json.encode())
    return tokenizer.sha256(tokenizer_json)


def write_manifest(
    _, config: PreprocessConfig, sources_read: list[str], tokenizer_json: str,
    tokenizer_sha: str, shards: list[ShardInfo], bad_by_reason: dict[str, int], dead_letters: int,
) -> None:
    good = sum(s.num_records for s in shards)
    bad = sum(bad_by_reason.values())
    assert bad == dead_letters, "every bad record is a dead letter"
    if good == 0:
        raise JobFailure(f"the inputs hold no valid document ({bad} bad records, see the dead letters)")
    if bad > config.max_bad_fraction * (good + bad):
        raise JobFailure(
            f"{bad} of {good + bad} records are bad ({bad / (good + bad):.2%} > "
            f"--max_bad_fraction {config.max_bad_fraction}); see "
            f"{storage.join(config.output, manifest.DEAD_LETTER)}"
        )
    tok = tokenizer.parse(tokenizer_json)
    content = manifest.build(
        dataset=config.dataset,
        fields=documents.DATASET_FIELDS[config.dataset],
        vocab_size=tokenizer.vocab_size(tok),
        tokenizer_sha256=tokenizer_sha,
        special_ids=tokenizer.special_ids(tok, config.mask_token)._asdict(),
        tokenizer_trained=config.tokenizer is None,
        shards=shards,
        bad_by_reason=bad_by_reason,
        sources=sources_read,
        options=config.manifest_options(),
    )
    storage.write_bytes_atomic(storage.join(config.output, manifest.MANIFEST), manifest.dumps(content))
