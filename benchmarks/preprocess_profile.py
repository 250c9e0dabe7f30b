"""Where the preprocess job's time goes: one in-process run (one worker) under cProfile.

    python benchmarks/preprocess_profile.py [--stories N] [--out results.json]

The job of benchmarks/preprocess.py (generated stories, a tokenizer trained beforehand and
given with --tokenizer, 8 shards) runs once under cProfile, which sees the job's main thread;
the tokenizer's `encode_batch_fast` (the whole of the raw baseline's work) runs one batch ahead
on a thread of its own. The report splits the main thread's wall time into waiting for the
tokenizer (what the overlap did not hide), the rest of the Tokenize step (record encoding,
shard choice, spilling), reading and validating (line reading, checks, content hashes), shard
writing, and what is left: building the pipeline and Beam's runner. Each part prints its
seconds and share; cProfile slows Python code more than native code, so Python-heavy parts
read a little high.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile

from _common import emit

from pipelines import corpus, manifest, preprocess, steps

PARTS = {  # part: (file suffix, function name[, the method]) of the cProfile entry whose cumulative time it is
    "waiting_for_tokenizer": ("concurrent/futures/_base.py", "result"),
    "tokenize_step": ("pipelines/steps.py", "_records", steps.Tokenize._records),
    "read_and_validate": ("pipelines/steps.py", "process", steps.ReadAndValidate.process),
    "write_shards": ("pipelines/steps.py", "process", steps.WriteShard.process),
}


def cumulative(stats: pstats.Stats, suffix: str, name: str, method=None) -> float:
    line = method.__code__.co_firstlineno if method else None
    return sum(entry[3] for (path, lineno, fn), entry in stats.stats.items()
               if path.endswith(suffix) and fn == name and (line is None or lineno == line))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stories", type=int, default=40_000, help="Stories in the input.")
    parser.add_argument("--out", help="Also write the JSON here.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        text = f"{tmp}/stories.txt"
        corpus.write_tinystories_layout(corpus.generate_stories(args.stories, seed=1), text)
        common = ["--dataset", "tinystories", "--input", text, "--num_shards", "8"]
        assert preprocess.main([*common, "--output", f"{tmp}/trained"]) == 0
        profile = cProfile.Profile()
        code = profile.runcall(preprocess.main, [*common, "--tokenizer", f"{tmp}/trained/{manifest.TOKENIZER}",
                                                  "--output", f"{tmp}/job"])
        assert code == 0
    stats = pstats.Stats(profile)
    total = cumulative(stats, "pipelines/preprocess.py", "main")
    seconds = {part: cumulative(stats, *spec) for part, spec in PARTS.items()}
    seconds["tokenize_step"] -= seconds["waiting_for_tokenizer"]  # the step's own work
    seconds["pipeline_and_runner"] = total - sum(seconds.values())
    emit({"benchmark": "preprocess_profile", "stories": args.stories, "job_seconds": round(total, 2),
          "parts": {part: {"seconds": round(s, 2), "share": round(s / total, 3)} for part, s in seconds.items()}},
         args.out)


if __name__ == "__main__":
    main()
