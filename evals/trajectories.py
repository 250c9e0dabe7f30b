"""Self-generated trajectories: a run's checkpoint answers prompts from a dataset, in DMax's layout.

    python -m evals.trajectories --run_dir RUN --output DIR [--config FILE] [key=value ...]

Prompts are the first `prompt_tokens` tokens of the documents of a preprocess output's split (a
text dataset) or the prompt field of its records (a trajectory dataset), in manifest order. Each
is decoded by the chosen sampler of the run's latest (or `step`) checkpoint, batched through one
compiled program, and written as `{"question", "answer"}` rows (`.jsonl` or `.parquet`, local or
gs://): the question is the prompt's text, the answer the generated text up to its EOS. Rows are
written in parts of `rows_per_part` prompts, each whole or not at all, so a killed job re-runs only
its missing parts and gives the same rows as an uninterrupted one; `trajectories.json`, written
last, records the model, step, sampler, settings, counts and each part's sha256, and every rerun
checks the parts against it (a missing or altered part is made again; parts of other settings are
refused). One job writes an output at a time (`OUTPUT/.lock`, like the trainer's run lock).
Tokenize the rows with `python -m pipelines.preprocess --dataset dmax_trajectories --tokenizer
RUN_DATA/tokenizer.json --prompt_suffix S` to train OPUT on them, where S is `prompt_suffix` of
`trajectories.json`: '' after a text document's opening words, the data's own suffix after a
trajectory dataset's question (the rows then read as the data's own did).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import shlex
import sys
from typing import NamedTuple

import jax
import numpy as np
from etils import epath
from tokenizers import Tokenizer
from tqdm import tqdm

from evals import decoders, ledger, quality, runs
from evals.config import SamplingConfig
from pipelines import corpus
from trainer import data, runlock, signals
from trainer.config import check, load_into
from trainer.errors import ConfigError, UserError

SIDECAR = "trajectories.json"


@dataclasses.dataclass
class TrajectoriesConfig:
    step: int = 0  # checkpoint step to decode with (0 = the latest committed)
    data_path: str = ""  # preprocess output holding the prompts ("" = the run's data.path)
    split: str = "train"  # train | validation
    num_prompts: int = 2000  # prompts taken in manifest order (0 = every usable document)
    prompt_tokens: int = 16  # text datasets: leading tokens of a document (BOS included) used as the prompt
    sampler: str = "threshold"  # any decoder name (evals/decoders); those that fit the run's objective fit best
    batch_size: int = 64  # prompts per decoding call (one compiled program per prompt length)
    rows_per_part: int = 512  # prompts per output part: the unit that is written whole and resumed
    format: str = "jsonl"  # jsonl | parquet
    # Keep answers that reach gen_length without an EOS (dropping them biases OPUT's data toward short
    # answers; with gen_length filling the trained length their EOS falls past the training row).
    keep_unfinished: bool = True
    # all | correct: keep only right answers (rejection sampling: with sampling.temperature > 0 the kept
    # answers stay as varied as the model): on text data those the built-in corpus's grammar accepts
    # (pipelines/corpus.py), on a trajectory dataset those whose final number is its record's.
    keep: str = "all"
    sampling: SamplingConfig = dataclasses.field(default_factory=lambda: SamplingConfig(gen_length=0))

    def validate(self) -> None:
        check([
            (self.split in ("train", "validation"), "split", "must be train or validation"),
            (self.num_prompts >= 0, "num_prompts", "must be >= 0"),
            (self.prompt_tokens >= 2, "prompt_tokens", "must be at least 2"),
            (self.batch_size >= 1, "batch_size", "must be at least 1"),
            (self.rows_per_part >= 1, "rows_per_part", "must be at least 1"),
            (self.format in ("jsonl", "parquet"), "format", "must be jsonl or parquet"),
            (self.keep in ("all", "correct"), "keep", "must be all or correct"),
            (self.sampling.gen_length >= 0, "sampling.gen_length", "must be >= 0 (0 = fill the trained length)"),
            # Set by the job itself (the longest prompt, batch_size): one name per knob.
            (self.sampling.prompt_tokens == SamplingConfig.prompt_tokens, "sampling.prompt_tokens",
             "is not read here: set prompt_tokens"),
            (self.sampling.num_samples == SamplingConfig.num_samples, "sampling.num_samples",
             "is not read here: set num_prompts and batch_size"),
        ])


class Prompt(NamedTuple):
    index: int  # position among the usable prompts (the output order)
    tokens: np.ndarray  # token ids, BOS first
    question: str  # the prompt's text, without BOS (and without the dataset's prompt suffix)
    response: str = ""  # a trajectory record's own answer ("" for a text document's opening words)


def rejoin_suffix(manifest: dict) -> str:
    """What preprocess must put between a question and its answer (--prompt_suffix) for the rows to
    read as the data's own: nothing after a text document's opening words (the answer continues
    them), the data's prompt suffix after a trajectory dataset's question (written without it)."""
    if manifest["record_schema"]["fields"] == ["prompt", "response"]:
        return manifest["options"].get("prompt_suffix", "\n")
    return ""


def prompts(path: str, split: str, cfg: TrajectoriesConfig, tokenizer: Tokenizer) -> list[Prompt]:
    """The usable prompts in manifest order. A text document's first `prompt_tokens` tokens are used
    only when their text tokenizes back to exactly them (the cut falls between pre-tokens), so the
    question round-trips through preprocessing; records keep their own prompt."""
    manifest = data.load_manifest(path)
    trajectories = manifest["record_schema"]["fields"] == ["prompt", "response"]
    suffix = rejoin_suffix(manifest)
    bos = data.special_ids(manifest).get("bos")
    found = []
    for doc in data.documents(path, manifest, split):
        tokens = doc["tokens"]
        if trajectories:
            ids = tokens[:int(doc["prompt_len"])]
        elif len(tokens) > cfg.prompt_tokens:
            ids = tokens[:cfg.prompt_tokens]
        else:
            continue
        body = ids[1:] if bos is not None and len(ids) and ids[0] == bos else ids
        text = tokenizer.decode(body.tolist(), skip_special_tokens=False)
        response = ""
        if trajectories:
            text = text.removesuffix(suffix) if suffix else text
            response = tokenizer.decode(tokens[len(ids):].tolist())
        elif tokenizer.encode(text, add_special_tokens=False).ids != body.tolist():
            continue
        found.append(Prompt(len(found), ids.astype(np.int32), text, response))
        if cfg.num_prompts and len(found) == cfg.num_prompts:
            break
    return found


def _settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]


def _encode_rows(rows: list[dict], fmt: str) -> bytes:
    if fmt == "jsonl":
        return "".join(json.dumps(r) + "\n" for r in rows).encode()
    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema([("question", pa.string()), ("answer", pa.string())])),
                   buffer)
    return buffer.getvalue()


def _sha256(path: epath.Path) -> str | None:
    """A file's sha256 (None: there is no such file)."""
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def _read_record(path: epath.Path) -> dict | None:
    """A JSON record this job wrote, or None where it is missing or damaged (then remade)."""
    try:
        record = json.loads(path.read_text()) if path.exists() else None
    except ValueError:
        record = None
    if path.exists() and not isinstance(record, dict):
        print(f"warning: {path} is damaged; it is made again")
        return None
    return record


def part_matches(part: epath.Path, counts: epath.Path) -> bool:
    """Whether a part file is the one its counts record describes (by sha256): else it is made again."""
    recorded = _read_record(counts)
    return recorded is not None and recorded.get("sha256") is not None and recorded["sha256"] == _sha256(part)


def finished_index(out: epath.Path, tag: str) -> dict | None:
    """The index (trajectories.json) of a finished job with these settings whose every part is there
    as it lists it (count and sha256); None when there is no such index or a part must be made
    again. Parts or an index of other settings are refused: one output holds one job's rows."""
    index = _read_record(out / SIDECAR)
    if index is not None and index.get("settings_hash") != tag:
        raise ConfigError(f"{out} already holds trajectories made with other settings: choose another --output")
    foreign = sorted(p.name for p in out.glob("part-*") if f"-{tag}." not in p.name)
    if foreign:
        raise ConfigError(f"{out} holds parts made with other settings ({foreign[0]}): remove them or choose "
                          f"another --output")
    if index is None:
        return None
    listed = index.get("parts", [])
    altered = [p["file"] for p in listed if _sha256(out / p["file"]) != p["sha256"]]
    unlisted = sorted({p.name for p in out.glob("part-*")} - {p["file"] for p in listed})
    if altered or unlisted or not listed:
        print(f"warning: {out} does not match its {SIDECAR} ({(altered or unlisted or ['no parts listed'])[0]}); "
              f"the parts that differ are made again")
        return None
    return index if "prompt_suffix" in index else None  # an older index: written again from its parts


DROPPED = ("unfinished", "empty", "incorrect")  # why an answer is not a row


def decode_part(part: list[Prompt], generate, key: jax.Array, batch_size: int, eos_id: int, gen_length: int,
                tokenizer: Tokenizer, keep_unfinished: bool, keep: str = "all") -> tuple[list[dict], dict[str, int]]:
    """Rows of one part (its prompts grouped by length, each group in fixed-size batches, the last
    padded by repeating its final prompt) and the counts of dropped answers. `generate(batch, key)`
    decodes a batch once; batch i of the part draws its noise from fold_in(key, i)."""
    answers: dict[int, np.ndarray] = {}
    by_length: dict[int, list[Prompt]] = {}
    for prompt in part:
        by_length.setdefault(len(prompt.tokens), []).append(prompt)
    chunks = [(length, group[start:start + batch_size]) for length, group in sorted(by_length.items())
              for start in range(0, len(group), batch_size)]
    for index, (length, chunk) in enumerate(chunks):
        batch = np.stack([p.tokens for p in chunk] + [chunk[-1].tokens] * (batch_size - len(chunk)))
        out = generate(batch, jax.random.fold_in(key, index))
        for p, row in zip(chunk, out.tokens):
            answers[p.index] = row[length:]
    rows, dropped = [], dict.fromkeys(DROPPED, 0)
    for prompt in part:
        generated = answers[prompt.index]
        ends = np.flatnonzero(generated == eos_id)
        if not len(ends) and not keep_unfinished:
            dropped["unfinished"] += 1
            continue
        answer = tokenizer.decode(generated[:ends[0] if len(ends) else gen_length].tolist())
        if not answer.strip():
            dropped["empty"] += 1
            continue
        if keep == "correct" and not is_correct(prompt, answer, bool(len(ends))):
            dropped["incorrect"] += 1
            continue
        rows.append({"question": prompt.question, "answer": answer})
    return rows, dropped


def is_correct(prompt: Prompt, answer: str, ended: bool) -> bool:
    """keep=correct's test: a trajectory record's answer must end on the record's final number; a
    text prompt's continuation must make a story the built-in grammar accepts."""
    if prompt.response:
        return bool(quality.final_number(prompt.response)) and \
            quality.final_number(answer) == quality.final_number(prompt.response)
    return corpus.check_story(prompt.question, answer, ended).correct


def generate_trajectories(run_dir: str, output: str, cfg: TrajectoriesConfig) -> dict:
    """Writes (or completes) the trajectories of `run_dir` into `output`; returns the sidecar. One job
    writes an output at a time: two would leave parts of both behind one index."""
    lock = runlock.RunLock(output, holder="a trajectories job", option="--output")
    try:
        return _generate(run_dir, output, cfg, lock)
    finally:
        lock.release()  # only a lock this job took


def _generate(run_dir: str, output: str, cfg: TrajectoriesConfig, lock: runlock.RunLock) -> dict:
    run = runs.open_run(run_dir, cfg.data_path, cfg.split)  # its cfg.data.path: the data read
    run_cfg, manifest, tokenizer, ids, path = run.cfg, run.manifest, run.tokenizer, run.ids, run.cfg.data.path
    step = run.step(cfg.step)
    found = prompts(path, cfg.split, cfg, tokenizer)
    if not found:
        raise ConfigError(f"no usable prompts in the {cfg.split} split of {path} (prompt_tokens={cfg.prompt_tokens})")
    longest = max(len(p.tokens) for p in found)
    sampling_cfg = cfg.sampling
    if not sampling_cfg.gen_length:  # fill the length the model was trained on (whole blocks for full attention)
        fill = run_cfg.data.seq_len - longest
        if decoders.is_valid(cfg.sampler) and decoders.get(cfg.sampler).attention == decoders.FULL:
            fill -= fill % decoders.block_length(sampling_cfg, run_cfg)
        sampling_cfg = dataclasses.replace(sampling_cfg, gen_length=fill)
    names, sampling_cfg = decoders.plan(cfg.sampler, dataclasses.replace(sampling_cfg, prompt_tokens=longest), run_cfg)
    if len(names) != 1:
        raise ConfigError(f"sampler must name one sampler, got {cfg.sampler!r}")
    settings = {"run_dir": str(run_dir), "step": step, "data_path": str(path), "split": cfg.split,
                "prompts": len(found), **{k: v for k, v in dataclasses.asdict(cfg).items()
                                          if k not in ("data_path", "split", "step", "sampling")},
                "sampling": dataclasses.asdict(sampling_cfg)}
    tag = _settings_hash(settings)
    out = epath.Path(output)
    sidecar = out / SIDECAR
    lock.acquire()
    existing = finished_index(out, tag)
    if existing is not None:
        return existing

    graphdef, params, _ = run.weights(step)
    key = jax.random.key(sampling_cfg.seed)
    generate = lambda batch, batch_key: decoders.generate(  # noqa: E731  (decoded once, not timed)
        names[0], graphdef, params, batch, sampling_cfg, ids["mask"], ids["eos"], batch_key, timed=False)
    parts = [found[i:i + cfg.rows_per_part] for i in range(0, len(found), cfg.rows_per_part)]
    files, rows_total, dropped_total = [], 0, dict.fromkeys(DROPPED, 0)
    for index, part in enumerate(tqdm(parts, desc="trajectories", unit="part", dynamic_ncols=True)):
        name = f"part-{index:05d}-of-{len(parts):05d}-{tag}.{cfg.format}"
        counts = out / f".{name}.counts.json"
        if not part_matches(out / name, counts):
            rows, dropped = decode_part(part, generate, jax.random.fold_in(key, index), cfg.batch_size, ids["eos"],
                                        sampling_cfg.gen_length, tokenizer, cfg.keep_unfinished, cfg.keep)
            content = _encode_rows(rows, cfg.format)
            ledger.write_whole(counts, json.dumps({"rows": len(rows), "dropped": dropped,
                                                   "sha256": hashlib.sha256(content).hexdigest()}))
            ledger.write_whole(out / name, content)
        lock.beat()
        recorded = json.loads(counts.read_text())
        files.append({"file": name, "rows": recorded["rows"], "sha256": recorded["sha256"]})
        rows_total += recorded["rows"]
        dropped_total = {k: dropped_total[k] + recorded["dropped"].get(k, 0) for k in dropped_total}
    if not rows_total and dropped_total["incorrect"]:
        raise ConfigError(f"every answer was dropped ({dropped_total}): none is right (keep=correct checks a "
                          f"trajectory dataset's final numbers and the built-in corpus's grammar; use keep=all "
                          f"for other text), or train the model longer")
    if not rows_total:
        raise ConfigError(f"every answer was dropped ({dropped_total}): no answer ended with an EOS within "
                          f"{sampling_cfg.gen_length} tokens; train the model longer or keep_unfinished=true")
    suffix = rejoin_suffix(manifest)
    result = {"model": {"run_dir": str(run_dir), "step": step, "objective": run_cfg.objective.name,
                        "model": dataclasses.asdict(run_cfg.model)},
              "sampler": names[0], "settings": settings, "settings_hash": tag,
              "files": [part["file"] for part in files], "parts": files,
              "rows": rows_total, "dropped": dropped_total,
              "tokenizer_sha256": manifest["tokenizer"]["sha256"], "prompt_suffix": suffix,
              "preprocess": f"--dataset dmax_trajectories --tokenizer {path}/tokenizer.json "
                            f"--prompt_suffix {shlex.quote(suffix)}"}
    ledger.write_whole(sidecar, json.dumps(result, indent=2))
    return result


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m evals.trajectories", description=__doc__.splitlines()[0])
    parser.add_argument("--run_dir", required=True, help="A trainer run directory (local or gs://)")
    parser.add_argument("--output", required=True, help="Directory for the rows and trajectories.json")
    parser.add_argument("--config", help="Optional YAML of these settings")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. num_prompts=500 sampling.threshold=0.9")
    args = parser.parse_args(argv)
    return signals.exit_status(lambda: _main(args))


def _main(args: argparse.Namespace) -> int:
    try:
        cfg = load_into(TrajectoriesConfig(), args.config, args.overrides)
        cfg.validate()
        result = generate_trajectories(args.run_dir, args.output, cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{result['rows']} trajectories from step {result['model']['step']} ({result['sampler']}) in {args.output}; "
          f"dropped {result['dropped']}; tokenize with: python -m pipelines.preprocess {result['preprocess']} "
          f"--input '{args.output}/part-*' --output DIR")
    return 0


if __name__ == "__main__":
    from absl import flags

    flags.FLAGS(sys.argv[:1])  # Grain's worker processes read absl flags
    sys.exit(main(sys.argv[1:]))
