#!/usr/bin/env bash
# DMax's recipe on a preprocess output, offline: block-diffusion pretraining -> an AR judge of
# sample quality -> self-generated trajectories (the base model answers prompts from the train
# split) -> tokenized with the same tokenizer -> OPUT fine-tuning from the block-diffusion model ->
# evals of both runs. Re-running resumes each stage (a finished stage is skipped).
# Environment: DATA (a preprocess output, required), RUN (output folder), BASE_STEPS, JUDGE_STEPS,
# JUDGE (an AR run to judge with instead of training one: several recipe runs share a judge),
# PROMPTS (trajectories), TRAJ_VALIDATION (their validation share), OPUT_STEPS, BASE_CONFIG /
# JUDGE_CONFIG / OPUT_CONFIG (configs/*.yaml), TRAIN_ARGS (key=value for all three trainings),
# TRAJ_ARGS, EVAL_ARGS, HARNESS_ARGS (the lm-evaluation-harness task the evals run on each checkpoint;
# '' for none: it needs the harness extra), EVALS=0 (skip the last stage).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
: "${DATA:?set DATA to a preprocess output (python -m pipelines.preprocess ...)}"
RUN=${RUN:-runs/dmax}
BASE_STEPS=${BASE_STEPS:-600}
JUDGE_STEPS=${JUDGE_STEPS:-$BASE_STEPS}  # the AR twin at the base's budget
# About as many fine-tuning rows as answers kept (2,048 prompts keep about 1,000 on the built-in corpus;
# 100 steps of 16 rows): on 530 answers, 150 steps (6 epochs) taught OPUT to end stories early.
PROMPTS=${PROMPTS:-2048}
OPUT_STEPS=${OPUT_STEPS:-100}
BASE_CONFIG=${BASE_CONFIG:-configs/tinystories_tiny_bd3lm.yaml}
JUDGE_CONFIG=${JUDGE_CONFIG:-configs/tinystories_tiny_ar.yaml}
OPUT_CONFIG=${OPUT_CONFIG:-configs/tinystories_tiny_oput.yaml}
read -r -a TRAIN_EXTRA <<< "${TRAIN_ARGS:-}"
read -r -a TRAJ_EXTRA <<< "${TRAJ_ARGS:-}"
read -r -a EVAL_EXTRA <<< "${EVAL_ARGS:-}"
read -r -a HARNESS_EXTRA <<< "${HARNESS_ARGS-harness.tasks=tinystories_cloze harness.limit=100}"

train() {  # run_dir config steps [key=value ...]: resumes from its last checkpoint
  local run_dir=$1 config=$2 steps=$3
  shift 3
  "$PY" -m trainer --config "$config" run_dir="$run_dir" train.steps="$steps" \
    train.checkpoint_every=$(( steps / 2 > 0 ? steps / 2 : 1 )) "$@" ${TRAIN_EXTRA[@]+"${TRAIN_EXTRA[@]}"}
}

echo "== recipe 1/6 block-diffusion pretraining: $BASE_CONFIG, $BASE_STEPS steps"
train "$RUN/base" "$BASE_CONFIG" "$BASE_STEPS" data.path="$DATA"
OWN_JUDGE=0
if [ -n "${JUDGE:-}" ]; then
  echo "== recipe 2/6 the AR judge of sample quality: $JUDGE (JUDGE)"
else
  OWN_JUDGE=1
  echo "== recipe 2/6 the AR judge of sample quality: $JUDGE_CONFIG, $JUDGE_STEPS steps"
  JUDGE="$RUN/judge"
  train "$JUDGE" "$JUDGE_CONFIG" "$JUDGE_STEPS" data.path="$DATA"
fi
echo "== recipe 3/6 self-generated trajectories: the base model answers $PROMPTS train prompts"
"$PY" -m evals.trajectories --run_dir "$RUN/base" --output "$RUN/trajectories" num_prompts="$PROMPTS" \
  ${TRAJ_EXTRA[@]+"${TRAJ_EXTRA[@]}"}
echo "== recipe 4/6 tokenize them with the same tokenizer"
if [ ! -f "$RUN/trajectories_data/manifest.json" ]; then
  # Question and answer joined as DATA's rows were ('' after a story's opening words, DATA's own suffix
  # after a trajectory dataset's question); the trailing x keeps a newline through $(...).
  suffix=$("$PY" -c 'import json, sys; sys.stdout.write(json.load(open(sys.argv[1]))["prompt_suffix"] + "x")' \
    "$RUN/trajectories/trajectories.json")
  "$PY" -m pipelines.preprocess --dataset dmax_trajectories --input "$RUN/trajectories/part-*" \
    --output "$RUN/trajectories_data" --tokenizer "$DATA/tokenizer.json" --prompt_suffix "${suffix%x}" \
    --num_shards 2 --validation_fraction "${TRAJ_VALIDATION:-0.05}"
fi
echo "== recipe 5/6 OPUT from the block-diffusion model: $OPUT_CONFIG, $OPUT_STEPS steps"
train "$RUN/oput" "$OPUT_CONFIG" "$OPUT_STEPS" data.path="$RUN/trajectories_data" train.init_from_run="$RUN/base"
echo "== recipe 6/6 evaluate both at their last step (perplexity bound; one-token, threshold and SPD decoding) and the AR twin"
[ "${EVALS:-1}" = 0 ] && exit 0
# The OPUT run's quality reference is the base model's one-token decoding (same prompts and judge).
for run in base oput; do
  reference=()
  [ "$run" = oput ] && reference=(reference_run_dir="$RUN/base")
  "$PY" -m evals --run_dir "$RUN/$run" --once --latest gen_ppl_run_dir="$JUDGE" data_path="$DATA" wandb_mode=offline \
    ${reference[@]+"${reference[@]}"} ${HARNESS_EXTRA[@]+"${HARNESS_EXTRA[@]}"} ${EVAL_EXTRA[@]+"${EVAL_EXTRA[@]}"}
done
summarised=("$RUN/base" "$RUN/oput")
if [ "$OWN_JUDGE" = 1 ]; then  # the AR twin's own greedy stories, at the same budget, beside the base's
  "$PY" -m evals --run_dir "$JUDGE" --once --latest samplers=causal data_path="$DATA" wandb_mode=offline \
    ${EVAL_EXTRA[@]+"${EVAL_EXTRA[@]}"}
  summarised+=("$JUDGE")
fi
echo "== what the recipe measured (python -m evals.summary; [90% intervals over the prompts])"
"$PY" -m evals.summary "${summarised[@]}"
echo "reports: $RUN/base/evals/report.html  $RUN/oput/evals/report.html"
