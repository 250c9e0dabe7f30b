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

import dataclasses
import os
import re
import shutil
import sys
import tempfile
import time

import apache_beam as beam
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import (
    PipelineOptions,
    SetupOptions,
    StandardOptions,
    WorkerOptions,
)

from pipelines import JOB_FAILURE_PREFIX, manifest, output, signals, sources, storage, tokenizer
from pipelines import config as config_lib
from pipelines.config import PreprocessConfig
from pipelines.documents import Document
from pipelines.sources import UserError
from pipelines.steps import NAMESPACE, ReadAndValidate, Tokenize, WriteShard, write_dead_letters, write_manifest, \
    write_tokenizer

DEFAULT_LOCAL_RUNNER = "FnApiRunner"  # DirectRunner first tries Prism, a download
LOCAL_RUNNERS = ("FnApiRunner", "DirectRunner", "BundleBasedDirectRunner", "PrismRunner")  # one machine, one disk


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


def run(config: PreprocessConfig, beam_args: list[str]):
    """Runs the job to completion; returns Beam's PipelineResult."""
    options = pipeline_options(beam_args)
    tokenizer_json = load_given_tokenizer(config)
    output.check(config)
    units, sources_read = plan(config)
    staging = output.prepare(config)
    target = config if staging is None else dataclasses.replace(config, output=staging.path)
    local = options.view_as(StandardOptions).runner in LOCAL_RUNNERS
    spill_dir = tempfile.mkdtemp(prefix="preprocess-spill-") if local else None
    try:
        pipeline = beam.Pipeline(options=options)
        build_pipeline(pipeline, target, units, sources_read, tokenizer_json, spill_dir)
        result = pipeline.run()
        result.wait_until_finish()
    except BaseException:
        if staging is not None:  # the finished dataset in --output is untouched
            os.close(staging.owner)  # the folder is abandoned: the next job on --output removes it
            dead_letters = os.path.join(staging.path, manifest.DEAD_LETTER)
            if os.path.exists(dead_letters) and os.path.getsize(dead_letters):  # bad records to read
                print(f"the failed job's dead letters are in {staging.path}/{manifest.DEAD_LETTER} (removed when "
                      f"the next job on {config.output} starts); {config.output} still holds the previous dataset")
            else:
                shutil.rmtree(staging.path, ignore_errors=True)
        raise
    finally:
        if spill_dir is not None:
            shutil.rmtree(spill_dir, ignore_errors=True)
    if staging is not None:
        output.release(staging)
        output.replace_directory(staging.path, config.output)
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
        if JOB_FAILURE_PREFIX in line:
            message = line.rsplit(JOB_FAILURE_PREFIX, 1)[1]
            return re.sub(r" \[while running '[^']*'\]$", "", message).strip()
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    return signals.exit_status(lambda: _preprocess(argv))


def _preprocess(argv: list[str]) -> int:
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
