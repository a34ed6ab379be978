#!/usr/bin/env bash
# Issue 9, part 3: AR vs diffusion accuracy on held-out synthetic reasoning problems (docs/NOTES.md).
# Data -> tokenizer -> training (resumable: RESUME=1) -> evaluation. About 45 minutes of training on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${STEPS:-3000}
OUT=${OUT:-runs/reasoning}
[ -f data/reasoning/train.txt ] || python scripts/reasoning_study.py data data/reasoning
[ -f data/reasoning/tok/tokenizer.json ] || dgemma tokenizer train --data data/reasoning/train.txt --vocab-size 320 --out data/reasoning/tok
dgemma train --data data/reasoning/train.txt --tokenizer data/reasoning/tok --out "$OUT" --shape small \
  --canvas-length 64 --context 32 --canvases 2 --steps "$STEPS" --batch-size 16 --lr 3e-3 --warmup 100 \
  --eval-every 500 --save-every 100 --seed 0 ${RESUME:+--resume}
python scripts/reasoning_study.py eval --model "$OUT/checkpoint" --heldout data/reasoning/heldout.jsonl --n 200 \
  --json "$OUT/reasoning.json"
