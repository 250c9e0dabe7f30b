#!/usr/bin/env bash
# The README's first command runs this: the whole path on the built-in corpus, offline, on CPU.
# Stage 1 (today): generate the sample corpus and preprocess it into ArrayRecord shards.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-.venv/bin/python}
RUN=${RUN:-runs/quickstart}

echo "== 1/2 sample corpus"
"$PY" -m pipelines.corpus --output "$RUN/corpus/stories.txt" --num_stories 5000 --seed 0
echo "== 2/2 preprocess (Beam, local runner)"
"$PY" -m pipelines.preprocess --dataset tinystories --input "$RUN/corpus/stories.txt" \
  --output "$RUN/data" --vocab_size 4096 --num_shards 4 --overwrite
"$PY" -m pipelines.manifest "$RUN/data"
