#!/usr/bin/env bash
# The README's first command runs this: the whole path on the built-in corpus, offline, on CPU:
# sample corpus -> Beam preprocessing -> DMax's recipe (recipes/dmax.sh: block-diffusion
# pretraining, an AR judge, self-generated trajectories, OPUT, evals with SPD). Re-running resumes.
# Knobs (environment): RUN (output folder), STORIES, and the recipe's BASE_STEPS, JUDGE_STEPS,
# PROMPTS, OPUT_STEPS, TRAIN_ARGS, TRAJ_ARGS, EVAL_ARGS and HARNESS_ARGS (the end-to-end test shrinks the run).
set -euo pipefail
cd "$(dirname "$0")"
STARTED=$SECONDS
PY=${PYTHON:-.venv/bin/python}
RUN=${RUN:-runs/quickstart}
STORIES=${STORIES:-5000}
# One XLA compilation cache for every process of the run: the base and OPUT models share their
# decoders' programs, and a re-run compiles nothing it compiled before.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$RUN/.jax_cache}
# The built-in corpus's defaults for the recipe: OPUT learns from the base model's answers sampled at
# temperature 1, of which only the stories the corpus's grammar accepts are kept (rejection sampling:
# varied and correct); every model writes whole stories (16-token prompts + 112 = the trained 128);
# no harness task (HARNESS_ARGS='harness.tasks=tinystories_cloze harness.limit=100' adds one).
export TRAJ_ARGS=${TRAJ_ARGS-sampler=one_token sampling.temperature=1.0 keep=correct}
export EVAL_ARGS=${EVAL_ARGS-sampling.gen_length=112}
export HARNESS_ARGS=${HARNESS_ARGS-}

echo "== 1/3 sample corpus: $STORIES stories"
"$PY" -m pipelines.corpus --output "$RUN/corpus/stories.txt" --num_stories "$STORIES" --seed 0
echo "== 2/3 preprocess (Beam, local runner)"
if [ ! -f "$RUN/data/manifest.json" ]; then
  "$PY" -m pipelines.preprocess --dataset tinystories --input "$RUN/corpus/stories.txt" \
    --output "$RUN/data" --vocab_size 4096 --num_shards 4
fi
"$PY" -m pipelines.manifest "$RUN/data"
echo "== 3/3 DMax's recipe (recipes/dmax.sh)"
DATA="$RUN/data" RUN="$RUN" PYTHON="$PY" bash recipes/dmax.sh
echo "metrics: $RUN/base/metrics.jsonl $RUN/oput/metrics.jsonl   ledgers: $RUN/{base,oput}/evals/ledger.jsonl"
echo "open $RUN/oput/evals/report.html (and $RUN/base/evals/report.html)"
echo "quickstart finished in $(( (SECONDS - STARTED + 30) / 60 )) minutes"
