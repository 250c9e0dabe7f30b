"""Runs every benchmark and writes one JSON summary (the README's figures come from it).

    python benchmarks/run_all.py [--out benchmarks/latest.json] [--quick] [--only NAME[,NAME]]

`--only` reruns the named benchmarks and keeps the file's other results as they were; each result
records when it ran.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
# --quick decoding: 250 base steps, the fewest at which the bases write some right answers for the
# recipe's keep=correct trajectories to keep (at 60 it keeps none and the recipe stops).
QUICK_DECODING = ["--steps", "250", "--oput_steps", "20", "--prompts", "128", "--seeds", "1", "--eval_prompts", "8",
                  "--no-ablation"]
BENCHMARKS = {  # name: (script, full-size args, --quick args)
    "preprocess": ("preprocess.py", [], ["--stories", "10000"]),
    "train_step": ("train_step.py", [], ["--steps", "2"]),
    "decoding": ("decoding.py", [], QUICK_DECODING),
    "decoding_shared": ("decoding.py", ["--corpus", "shared", "--no-ablation", "--svg",
                                        "benchmarks/frontier_shared.svg"],
                        ["--corpus", "shared", *QUICK_DECODING, "--svg", "benchmarks/frontier_shared.svg"]),
    "decoding_arithmetic": ("decoding.py", ["--corpus", "arithmetic", "--no-ablation", "--eval_prompts", "256", "--svg",
                                            "benchmarks/frontier_arithmetic.svg"],
                            ["--corpus", "arithmetic", *QUICK_DECODING, "--svg", "benchmarks/frontier_arithmetic.svg"]),
    "ceiling": ("ceiling.py", [], ["--steps", "100", "--docs", "32"]),
    "quality": ("quality.py", [], ["--steps", "60"]),
    # MDLM's arm (--arm mdlm) is left out here: its one-token decoder runs a full-canvas forward per
    # token, about an hour more on 2 cores for its 36 checkpoints.
    "learning": ("learning.py", ["--arm", "ar", "--arm", "bd3lm"], ["--seeds", "1", "--steps", "100"]),
    "adaptation": ("adaptation.py", [], ["--seeds", "1", "--ar_steps", "100", "--adapt_steps", "100"]),
    "editflow": ("editflow.py", [], ["--seeds", "1", "--steps", "100", "--every", "100"]),
    "oput": ("oput.py", [], ["--base_steps", "150", "--tune_steps", "60"]),
    "harness_levels": ("harness_levels.py", [], ["--steps", "100", "--docs", "10"]),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(HERE, "latest.json"), help="Where to write the summary.")
    parser.add_argument("--quick", action="store_true", help="Smaller inputs: minutes instead of tens of minutes.")
    parser.add_argument("--only", help="Comma-separated benchmarks to rerun; the others keep their results.")
    args = parser.parse_args()
    only = args.only.split(",") if args.only else list(BENCHMARKS)
    unknown = [name for name in only if name not in BENCHMARKS]
    if unknown:
        sys.exit(f"error: --only {','.join(unknown)}: not a benchmark (known: {', '.join(BENCHMARKS)})")
    previous = json.load(open(args.out)) if os.path.exists(args.out) else {}
    summary = {
        "date": _now(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus, Python {platform.python_version()}",
        "quick": args.quick,
        "results": {name: previous.get("results", {}).get(name) for name in BENCHMARKS if name not in only},
    }
    for name, (script, full, quick) in ((n, BENCHMARKS[n]) for n in only):
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            command = [sys.executable, os.path.join(HERE, script), *(quick if args.quick else full), "--out", out.name]
            print(f"== {name}: {' '.join(command[1:])}", flush=True)
            result = subprocess.run(command, cwd=os.path.dirname(HERE), capture_output=True, text=True)
            if result.returncode != 0:
                summary["results"][name] = {"error": result.stderr.strip().splitlines()[-1:]}
                continue
            summary["results"][name] = {
                "command": " ".join(["python", os.path.relpath(command[1], os.path.dirname(HERE)), *command[2:-2]]),
                "date": _now(), **json.load(open(out.name))}
    summary["results"] = {name: summary["results"][name] for name in BENCHMARKS if summary["results"].get(name)}
    if previous.get("device"):  # accelerator figures come from benchmarks/device.sh on another machine
        summary["device"] = previous["device"]
    with open(args.out, "w") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")
    print(json.dumps(summary, indent=2))


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


if __name__ == "__main__":
    main()
