#!/usr/bin/env bash
# Run lm-evaluation-harness against `dgemma serve` over its OpenAI completions route (log-likelihood requests:
# token ids, echo, logprobs; the tokenizer through its /tokenize routes), offline, on a task read from local files.
#
#   bash scripts/lm_eval_local.sh [MODEL_DIR] [TASK_DIR] [TASK]
#
# Defaults: the shipped model, scripts/lm_eval_task (a 16-item smoke task: a check of the plumbing, not a
# benchmark), task dgemma_smoke. Any lm-eval task yaml whose data is on disk works the same way.
# Needs lm-eval (pip install "lm-eval[api]"; LM_EVAL=/path/to/lm_eval when it lives in another environment); the
# server runs on a loopback port and stops at the end. Results go to bench_out/lm_eval/.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-src/dgemma/default_model}
TASKS=${2:-scripts/lm_eval_task}
TASK=${3:-dgemma_smoke}
PORT=${PORT:-8391}
OUT=bench_out/lm_eval
mkdir -p "$OUT"
LM_EVAL=${LM_EVAL:-lm_eval}
command -v "$LM_EVAL" > /dev/null || { echo "lm-eval is not installed: pip install 'lm-eval[api]'" >&2; exit 2; }

# the task yaml names its data file as ITEMS: point it at the copy beside it
work=$(mktemp -d)
trap 'kill "$srv" 2>/dev/null || true; wait "$srv" 2>/dev/null || true; rm -rf "$work"' EXIT
cp "$TASKS"/*.yaml "$work"/
for f in "$work"/*.yaml; do sed -i "s#ITEMS#$(realpath "$TASKS")/items.jsonl#" "$f"; done

dgemma serve --model "$MODEL" --host 127.0.0.1 --port "$PORT" --served-model-name dgemma > "$OUT/server.log" 2>&1 &
srv=$!
for _ in $(seq 1 120); do
  curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && break
  kill -0 "$srv" 2>/dev/null || { cat "$OUT/server.log" >&2; exit 1; }
  sleep 1
done

HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "$LM_EVAL" --model local-completions \
  --model_args "model=dgemma,base_url=http://127.0.0.1:$PORT/v1/completions,tokenizer_backend=remote,num_concurrent=4,max_retries=1,tokenized_requests=True" \
  --tasks "$TASK" --include_path "$work" --output_path "$OUT" --log_samples
