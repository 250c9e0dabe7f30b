"""Preprocess throughput and memory, against raw `tokenizers` on the same input, in one run.

    python benchmarks/preprocess.py [--stories N] [--out results.json]

Prints JSON: the job's tokens/s with 1 and 2 DirectRunner (FnApiRunner) workers, raw
`Tokenizer.encode_batch_fast` (no offsets, the fastest path) tokens/s on one process over the
same documents, their ratios, and the job's peak memory (RSS) on 1x and 4x the input (one
worker; the job spills tokenized batches to per-shard files on local runners, whose
GroupByKey is in memory, so memory should stay flat in the input size).
The job runs with `--tokenizer` (trained once beforehand) so both sides do the same work: read,
tokenize; the job also validates, shuffles, sorts and writes shards.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

from tokenizers import Tokenizer

from _common import emit
from pipelines import corpus, manifest

# Peak RSS from VmHWM: exec resets it, while ru_maxrss carries the forking parent's peak.
_CHILD = """
import json, re, sys, time
from pipelines import preprocess
start = time.perf_counter()
code = preprocess.main(sys.argv[1:])
seconds = time.perf_counter() - start
peak_kib = int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
print(json.dumps({"code": code, "seconds": seconds, "peak_rss_mib": peak_kib / 1024}))
"""


def run_job(args: list[str]) -> dict:
    result = subprocess.run([sys.executable, "-c", _CHILD, *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"job failed: {result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def raw_tokenizer_rate(stories: list[str], tokenizer_path: str) -> tuple[float, int]:
    tok = Tokenizer.from_file(tokenizer_path)
    start = time.perf_counter()
    encodings = tok.encode_batch_fast(stories, add_special_tokens=False)
    seconds = time.perf_counter() - start
    tokens = sum(len(e.ids) for e in encodings) + 2 * len(stories)  # + BOS/EOS, as the job counts
    return tokens / seconds, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stories", type=int, default=40_000, help="Stories in the 1x input.")
    parser.add_argument("--out", help="Also write the JSON here.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        inputs = {}
        for scale in (1, 4):
            path = os.path.join(tmp, f"stories-{scale}x.txt")
            corpus.write_tinystories_layout(corpus.generate_stories(args.stories * scale, seed=1), path)
            inputs[scale] = path
        stories_1x = list(corpus.generate_stories(args.stories, seed=1))
        common = ["--dataset", "tinystories", "--num_shards", "8"]
        trained = run_job([*common, "--input", inputs[1], "--output", f"{tmp}/trained"])
        tokenizer_path = f"{tmp}/trained/{manifest.TOKENIZER}"
        given = [*common, "--tokenizer", tokenizer_path]

        raw_rate, raw_tokens = raw_tokenizer_rate(stories_1x, tokenizer_path)
        jobs = {}
        for workers in (1, 2):
            extra = [] if workers == 1 else ["--direct_num_workers", "2",
                                             "--direct_running_mode", "multi_processing"]
            out = f"{tmp}/w{workers}"
            run = run_job([*given, *extra, "--input", inputs[1], "--output", out])
            m = manifest.load(out)
            tokens = sum(m["splits"][s]["num_tokens"] for s in manifest.SPLITS)
            assert tokens == raw_tokens, (tokens, raw_tokens)
            jobs[f"workers_{workers}"] = {
                "seconds": round(run["seconds"], 2),
                "tokens_per_s": round(tokens / run["seconds"]),
                "ratio_vs_raw_encode_batch": round(tokens / run["seconds"] / raw_rate, 3),
            }
        memory = {
            f"{scale}x": round(run_job([*given, "--input", inputs[scale], "--output",
                                        f"{tmp}/m{scale}"])["peak_rss_mib"], 1)
            for scale in (1, 4)
        }
    report = {
        "benchmark": "preprocess",
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, {platform.python_version()}",
        "input_stories_1x": args.stories,
        "input_tokens_1x": raw_tokens,
        "tokenizer_training_seconds": round(trained["seconds"], 2),
        "raw_path": "encode_batch_fast",
        "raw_encode_batch_tokens_per_s": round(raw_rate),
        "job": jobs,
        "peak_rss_mib": {**memory, "ratio_4x_vs_1x": round(memory["4x"] / memory["1x"], 2)},
    }
    emit(report, args.out)


if __name__ == "__main__":
    main()
