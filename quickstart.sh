#!/usr/bin/env bash
# The README's first command runs this: the whole path on the built-in corpus, offline, on CPU.
# Knobs (environment): RUN (output folder), STORIES, STEPS, and TRAIN_ARGS / EVAL_ARGS with extra
# key=value overrides for the trainer and the eval stage (the end-to-end test shrinks the run).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-.venv/bin/python}
RUN=${RUN:-runs/quickstart}
STORIES=${STORIES:-5000}
STEPS=${STEPS:-600}
read -r -a TRAIN_EXTRA <<< "${TRAIN_ARGS:-}"
read -r -a EVAL_EXTRA <<< "${EVAL_ARGS:-}"

echo "== 1/4 sample corpus: $STORIES stories"
"$PY" -m pipelines.corpus --output "$RUN/corpus/stories.txt" --num_stories "$STORIES" --seed 0
echo "== 2/4 preprocess (Beam, local runner)"
"$PY" -m pipelines.preprocess --dataset tinystories --input "$RUN/corpus/stories.txt" \
  --output "$RUN/data" --vocab_size 4096 --num_shards 4 --overwrite
"$PY" -m pipelines.manifest "$RUN/data"
echo "== 3/4 train: MDLM, tiny config, $STEPS steps (re-running resumes from the last checkpoint)"
"$PY" -m trainer --config configs/tinystories_tiny.yaml data.path="$RUN/data" run_dir="$RUN/train" \
  train.steps="$STEPS" train.checkpoint_every=$((STEPS / 4)) train.keep_last=4 wandb.mode=offline \
  ${TRAIN_EXTRA[@]+"${TRAIN_EXTRA[@]}"}
echo "== 4/4 evaluate every committed checkpoint (perplexity bound; SPD vs remasking)"
"$PY" -m evals --run_dir "$RUN/train" --once wandb_mode=offline ${EVAL_EXTRA[@]+"${EVAL_EXTRA[@]}"}
echo "metrics: $RUN/train/metrics.jsonl   ledger: $RUN/train/evals/ledger.jsonl"
echo "open $RUN/train/evals/report.html"
