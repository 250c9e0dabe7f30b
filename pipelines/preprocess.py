"""The preprocess job: raw text or trajectories -> tokenized ArrayRecord shards + manifest.

    python -m pipelines.preprocess --dataset tinystories --input 'data/*.txt' --output out/ds

Graph: work units -> read + validate (bad records to the dead letters) -> split by content
hash -> [train a BPE on a hash-chosen sample of the train split] -> tokenize -> group by
(split, shard) -> sort by key, write each shard locally and copy it into place -> manifest
last. Every choice derives from content hashes, so output bytes do not depend on the
runner, the worker count or arrival order.

Local runners hold a GroupByKey in memory, so there each tokenized batch is spilled to a
local file per shard and only the file names are grouped: the job holds one batch and one
shard's records at a time, never the corpus. Dataflow groups the records themselves (its
shuffle is disk-backed; its workers share no disk).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import fnmatch
import os
import pathlib
import re
import shutil
import struct
import sys
import tempfile
import time
import uuid

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.transforms.window import GlobalWindows
from apache_beam.options.pipeline_options import (
    PipelineOptions,
    SetupOptions,
    StandardOptions,
    WorkerOptions,
)
from array_record.python.array_record_module import ArrayRecordWriter

from pipelines import JOB_FAILURE_PREFIX
from pipelines import config as config_lib
from pipelines import documents, manifest, records, sources, storage, tokenizer
from pipelines.config import PreprocessConfig
from pipelines.documents import BadRecord, Document
from pipelines.manifest import ShardInfo
from pipelines.sources import UserError

NAMESPACE = "preprocess"
DEFAULT_LOCAL_RUNNER = "FnApiRunner"  # DirectRunner first tries Prism, a download
LOCAL_RUNNERS = ("FnApiRunner", "DirectRunner", "BundleBasedDirectRunner", "PrismRunner")  # one machine, one disk
_FAILURE = JOB_FAILURE_PREFIX


class JobFailure(RuntimeError):
    """Raised inside the pipeline for a data problem the user must fix (one line)."""

    def __init__(self, message: str):
        super().__init__(_FAILURE + message)


# --------------------------------------------------------------------------- DoFns


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
            self._dtype = records.token_dtype(self._tokenizer.get_vocab_size(with_added_tokens=True))
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
                _write_spill(path, items)
                yield shard, path

    def _num_shards(self, split: str) -> int:
        c = self._config
        return c.num_shards if split == "train" else c.num_validation_shards


_SPILL_ITEM = "<III"  # key length, record length, token count; then key and record bytes


def _write_spill(path: str, items: list[tuple[str, bytes, int]]) -> None:
    with open(path, "wb") as f:
        for key, record, count in items:
            encoded = key.encode("ascii")
            f.write(struct.pack(_SPILL_ITEM, len(encoded), len(record), count) + encoded + record)


def _read_spill(path: str) -> list[tuple[str, bytes, int]]:
    """A spill file's items; plain bytes and lengths, no code (pickle would run whatever it finds)."""
    with open(path, "rb") as f:
        data = f.read()
    items, at = [], 0
    while at < len(data):
        key_len, record_len, count = struct.unpack_from(_SPILL_ITEM, data, at)
        at += struct.calcsize(_SPILL_ITEM)
        key, record = data[at:at + key_len].decode("ascii"), data[at + key_len:at + key_len + record_len]
        items.append((key, record, count))
        at += key_len + record_len
    return items


def _shard_items(grouped) -> list[tuple[str, bytes, int]]:
    """A shard's grouped values -> its (key, record, token count) items: records themselves, spill
    file names (their items are read back), and the None placeholder that makes empty shards exist."""
    items = []
    for value in grouped:
        if isinstance(value, str):
            items.extend(_read_spill(value))
        elif value is not None:
            items.append(value)
    return items


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
        rows = sorted(_shard_items(grouped))
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
        vocab_size=tok.get_vocab_size(with_added_tokens=True),
        tokenizer_sha256=tokenizer_sha,
        special_ids=tokenizer.special_ids(tok, config.mask_token)._asdict(),
        tokenizer_trained=config.tokenizer is None,
        shards=shards,
        bad_by_reason=bad_by_reason,
        sources=sources_read,
        options=config.manifest_options(),
    )
    storage.write_bytes_atomic(storage.join(config.output, manifest.MANIFEST), manifest.dumps(content))


# --------------------------------------------------------------------------- graph


def _training_texts(batch: list[tuple[str, Document]]) -> list[tuple[str, str]]:
    return [(doc.key, "\n".join(doc.texts)) for split, doc in batch if split == "train"]


def train_tokenizer(batches, config: PreprocessConfig):
    """A singleton PCollection: the JSON of a BPE trained on the lowest-hash train documents."""
    return (
        batches
        | "TrainTexts" >> beam.FlatMap(_training_texts)
        | "SampleForTokenizer" >> beam.combiners.Top.Smallest(config.tokenizer_train_docs)
        | "TrainBPE" >> beam.Map(
            lambda sample: tokenizer.train_bpe((text for _, text in sample), config.vocab_size)
        )
    )


def build_pipeline(
    pipeline: beam.Pipeline, config: PreprocessConfig, units: list[sources.WorkUnit],
    sources_read: list[str], tokenizer_json: str | None, spill_dir: str | None = None,
) -> None:
    out = config.output
    shard_counts = {"train": config.num_shards, "validation": config.num_validation_shards}

    parsed = (
        pipeline
        | "WorkUnits" >> beam.Create(units)
        | "SpreadUnits" >> beam.Reshuffle()
        | "ReadAndValidate" >> beam.ParDo(ReadAndValidate(config)).with_outputs(
            ReadAndValidate.BAD, main="batches"
        )
    )
    batches, bad = parsed.batches, parsed[ReadAndValidate.BAD]

    if tokenizer_json is None:
        tokenizer_pc = train_tokenizer(batches, config)
    else:
        tokenizer_pc = pipeline | "GivenTokenizer" >> beam.Create([tokenizer_json])
    tokenizer_side = beam.pvalue.AsSingleton(tokenizer_pc)

    placeholders = pipeline | "EveryShard" >> beam.Create(
        [((split, i), None) for split, count in shard_counts.items() for i in range(count)]
    )
    encoded = batches | "Tokenize" >> beam.ParDo(Tokenize(config, spill_dir), tokenizer_side)
    shards = (
        (encoded, placeholders)
        | "WithEmptyShards" >> beam.Flatten()
        | "GroupByShard" >> beam.GroupByKey()
        | "WriteShards" >> beam.ParDo(WriteShard(out, shard_counts, config.shard_compression))
    )
    dead_letters = (
        bad
        | "GatherBad" >> beam.combiners.ToList()
        | "WriteDeadLetters" >> beam.Map(write_dead_letters, out)
    )
    bad_counts = (
        bad | "BadReason" >> beam.Map(lambda b: (b.reason, 1)) | "CountBad" >> beam.CombinePerKey(sum)
    )
    tokenizer_sha = tokenizer_pc | "WriteTokenizer" >> beam.Map(write_tokenizer, out)

    # The manifest step reads everything else as side inputs, so it runs last.
    _ = (
        pipeline
        | "ManifestTrigger" >> beam.Create([None])
        | "WriteManifest" >> beam.Map(
            write_manifest,
            config=config,
            sources_read=sources_read,
            tokenizer_json=tokenizer_side,
            tokenizer_sha=beam.pvalue.AsSingleton(tokenizer_sha),
            shards=beam.pvalue.AsList(shards),
            bad_by_reason=beam.pvalue.AsDict(bad_counts),
            dead_letters=beam.pvalue.AsSingleton(dead_letters),
        )
    )


# --------------------------------------------------------------------------- launcher


def pipeline_options(beam_args: list[str]) -> PipelineOptions:
    if not any(a == "--runner" or a.startswith("--runner=") for a in beam_args):
        beam_args = [f"--runner={DEFAULT_LOCAL_RUNNER}", *beam_args]
    options = PipelineOptions(beam_args)
    runner = options.view_as(StandardOptions).runner or ""
    setup = options.view_as(SetupOptions)
    if "Dataflow" in runner and not (
        setup.setup_file or setup.requirements_file or options.view_as(WorkerOptions).sdk_container_image
    ):
        raise UserError(
            "DataflowRunner workers need this package: pass --setup_file ./setup.py "
            "(from the repository root) or --sdk_container_image with it installed"
        )
    return options


def load_given_tokenizer(config: PreprocessConfig) -> str | None:
    if config.tokenizer is None:
        return None
    try:
        text = storage.read_bytes(config.tokenizer).decode("utf-8")
    except Exception as e:
        raise UserError(f"cannot read --tokenizer {config.tokenizer}: {sources.first_line(e)}") from None
    tokenizer.special_ids(tokenizer.parse(text, config.tokenizer), config.mask_token, config.tokenizer)
    return text


def plan(config: PreprocessConfig) -> tuple[list[sources.WorkUnit], list[str]]:
    """(work units, source names); every input problem surfaces here, before any write."""
    if config.dataset == "tfds":
        specs = [sources.TfdsInput.parse(p) for p in config.input_patterns]
        units = [u for s in specs for u in sources.plan_tfds_units(s, config.tfds_data_dir)]
        return units, [s.source for s in specs]
    files = sources.expand_inputs(config.input_patterns)
    columns = ((("question", "answer"), ("messages",)) if config.dataset == "dmax_trajectories"
               else ((config.text_field,),))
    return sources.plan_file_units(files, config.read_chunk_bytes, columns), [path for path, _ in files]


def check_output(config: PreprocessConfig) -> None:
    """The output must be a usable directory outside every input glob: checked before any work."""
    # Files the job writes: an input glob that matches one would read the job's output back in.
    written = [manifest.MANIFEST, manifest.TOKENIZER, manifest.DEAD_LETTER, "train-00000-of-00001.array_record"]
    for pattern in config.input_patterns:
        caught = [name for name in written if fnmatch.fnmatch(storage.join(config.output, name), pattern)]
        if caught:
            raise UserError(f"--input {pattern} would read the job's own output ({caught[0]} in --output "
                            f"{config.output}): put the output outside the input folder")
    if "://" in config.output:
        return
    path = pathlib.Path(config.output).absolute()
    if path.exists() and not path.is_dir():
        raise UserError(f"--output {config.output} is a file, not a directory")
    existing = next(p for p in (path, *path.parents) if p.exists())  # what the job will create under
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--output {config.output} cannot be created or written ({existing} is not a writable "
                        f"directory)")


def prepare_output(config: PreprocessConfig) -> str | None:
    """Where the job writes: `--output`, or for `--overwrite` of a finished local dataset a staging
    directory beside it (returned) that replaces it only once the new dataset is complete."""
    manifest_path = storage.join(config.output, manifest.MANIFEST)
    if not storage.exists(manifest_path):
        return None
    if not config.overwrite:
        raise UserError(
            f"{config.output} already holds a finished dataset (manifest.json); "
            f"pass --overwrite to replace it or choose another --output"
        )
    if "://" not in config.output:
        return f"{config.output.rstrip('/')}.staging-{uuid.uuid4().hex[:8]}"
    # Object stores cannot swap directories: the manifest goes first, so a crash from here on
    # never leaves a mixed set that looks done (the old dataset is gone, though).
    storage.delete_matching(manifest_path)
    for pattern in ("*.array_record", manifest.TOKENIZER, manifest.DEAD_LETTER):
        storage.delete_matching(storage.join(config.output, pattern))
    return None


def _replace_directory(staging: str, output: str) -> None:
    """The finished staging directory takes the old dataset's place; the old one is removed."""
    old = f"{output.rstrip('/')}.replaced-{uuid.uuid4().hex[:8]}"
    os.rename(output, old)
    os.rename(staging, output)
    shutil.rmtree(old)


def run(config: PreprocessConfig, beam_args: list[str]):
    """Runs the job to completion; returns Beam's PipelineResult."""
    options = pipeline_options(beam_args)
    tokenizer_json = load_given_tokenizer(config)
    check_output(config)
    units, sources_read = plan(config)
    staging = prepare_output(config)
    target = config if staging is None else dataclasses.replace(config, output=staging)
    local = options.view_as(StandardOptions).runner in LOCAL_RUNNERS
    spill_dir = tempfile.mkdtemp(prefix="preprocess-spill-") if local else None
    try:
        pipeline = beam.Pipeline(options=options)
        build_pipeline(pipeline, target, units, sources_read, tokenizer_json, spill_dir)
        result = pipeline.run()
        result.wait_until_finish()
    except BaseException:
        if staging is not None:  # the finished dataset in --output is untouched
            if os.path.exists(os.path.join(staging, manifest.DEAD_LETTER)):
                print(f"the failed job's dead letters are in {staging}/{manifest.DEAD_LETTER}; "
                      f"{config.output} still holds the previous dataset")
            else:
                shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        if spill_dir is not None:
            shutil.rmtree(spill_dir, ignore_errors=True)
    if staging is not None:
        _replace_directory(staging, config.output)
    return result


def summary(result, config: PreprocessConfig, seconds: float) -> str:
    counters = {
        c.key.metric.name: c.committed if c.committed is not None else c.attempted
        for c in result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))["counters"]
    }
    tokens = counters.get("tokens", 0)
    lines = [
        f"preprocess finished in {seconds:.1f}s -> {config.output}",
        f"  documents   train {counters.get('documents_train', 0):,}   "
        f"validation {counters.get('documents_validation', 0):,}",
        f"  tokens      {tokens:,} ({tokens / max(seconds, 1e-9):,.0f}/s)",
        f"  shards      {counters.get('shards_written', 0)} written",
    ]
    bad = {k[len("bad_records_"):]: v for k, v in sorted(counters.items()) if k.startswith("bad_records_")}
    lines.append(
        "  bad records " + (", ".join(f"{k} {v:,}" for k, v in bad.items()) if bad else "none")
        + (f" (see {manifest.DEAD_LETTER})" if bad else "")
    )
    lines.append(f"  manifest    {storage.join(config.output, manifest.MANIFEST)}")
    return "\n".join(lines)


def job_failure_message(error: BaseException) -> str | None:
    """Our JobFailure's one line out of the runner's wrapping (repeats, step names)."""
    for line in str(error).splitlines():
        if _FAILURE in line:
            message = line.rsplit(_FAILURE, 1)[1]
            return re.sub(r" \[while running '[^']*'\]$", "", message).strip()
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        config, beam_args = config_lib.parse(argv)
        start = time.perf_counter()
        result = run(config, beam_args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # Beam wraps DoFn errors; surface ours as their one line
        message = job_failure_message(e)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 1
    print(summary(result, config, time.perf_counter() - start))
    return 0


if __name__ == "__main__":
    sys.exit(main())
