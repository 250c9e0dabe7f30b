"""Where the preprocess job's time goes: one in-process run (one worker) under cProfile.

    python benchmarks/preprocess_profile.py [--stories N] [--out results.json]

The job of benchmarks/preprocess.py (generated stories, a tokenizer trained beforehand and
given with --tokenizer, 8 shards) runs once under cProfile; the report splits its wall time
into the tokenizer's own `encode_batch_fast` (the whole of the raw baseline's work), the rest
of the Tokenize step (record encoding, shard choice, spilling), reading and validating
(line reading, checks, content hashes), shard writing, and what is left: building the
pipeline and Beam's runner. Each part prints its seconds and share; cProfile slows Python
code more than native code, so Python-heavy parts read a little high.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile

from _common import emit

from pipelines import corpus, manifest, preprocess

PARTS = {  # part: (file suffix, function name) of the cProfile entry whose cumulative time it is
    "tokenizer_encode_batch_fast": ("~", "<method 'encode_batch_fast' of 'tokenizers.Tokenizer' objects>"),
    "tokenize_step": ("pipelines/preprocess.py", "process", preprocess.Tokenize),
    "read_and_validate": ("pipelines/preprocess.py", "process", preprocess.ReadAndValidate),
    "write_shards": ("pipelines/preprocess.py", "process", preprocess.WriteShard),
}


def cumulative(stats: pstats.Stats, suffix: str, name: str, owner=None) -> float:
    line = owner.process.__code__.co_firstlineno if owner else None
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
    seconds["tokenize_step"] -= seconds["tokenizer_encode_batch_fast"]  # the step's own work
    seconds["pipeline_and_runner"] = total - sum(seconds.values())
    emit({"benchmark": "preprocess_profile", "stories": args.stories, "job_seconds": round(total, 2),
          "parts": {part: {"seconds": round(s, 2), "share": round(s / total, 3)} for part, s in seconds.items()}},
         args.out)


if __name__ == "__main__":
    main()
