#!/usr/bin/env bash
# The README's first command runs this: the whole path on the built-in corpus, offline, on CPU.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-.venv/bin/python}
RUN=${RUN:-runs/quickstart}

echo "== 1/4 sample corpus"
"$PY" -m pipelines.corpus --output "$RUN/corpus/stories.txt" --num_stories 5000 --seed 0
echo "== 2/4 preprocess (Beam, local runner)"
"$PY" -m pipelines.preprocess --dataset tinystories --input "$RUN/corpus/stories.txt" \
  --output "$RUN/data" --vocab_size 4096 --num_shards 4 --overwrite
"$PY" -m pipelines.manifest "$RUN/data"
echo "== 3/4 train (MDLM, tiny config; re-running resumes from the last checkpoint)"
"$PY" -m trainer --config configs/tinystories_tiny.yaml data.path="$RUN/data" run_dir="$RUN/train" \
  train.steps=200 train.checkpoint_every=50 wandb.mode=offline
echo "== 4/4 evaluate every committed checkpoint (perplexity bound, SPD vs remasking)"
"$PY" -m evals --run_dir "$RUN/train" --once wandb_mode=offline
echo "metrics: $RUN/train/metrics.jsonl   ledger: $RUN/train/evals/ledger.jsonl"
echo "open $RUN/train/evals/report.html"
