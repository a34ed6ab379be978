#!/usr/bin/env bash
# CPU speed per dtype and weight scheme (docs/NOTES.md, "Cheaper hardware"): the 100m shape and the shipped
# model at batch 1, 2 threads, nothing else running. Ratios are between systems of the same `dgemma bench` run.
set -euo pipefail
cd "$(dirname "$0")/.."
T=${THREADS:-2}
OUT=${OUT:-bench_out/quant}
S100="--shape 100m --steps 4 --prompt-len 128 --canvases 1 --ar-tokens 32 --threads $T"
SHIP="--steps 16 --prompt-len 32 --canvases 2 --ar-tokens 64 --threads $T"
dgemma bench $S100 --dtype float32 --systems dgemma,dgemma-fast,reference,ar --out "$OUT/100m_fp32"
dgemma bench $S100 --dtype bfloat16 --systems dgemma-fast,reference,ar --out "$OUT/100m_bf16"
dgemma bench $S100 --dtype bfloat16 --quantize int8 --systems dgemma-fast,ar --out "$OUT/100m_int8"
dgemma bench $S100 --dtype bfloat16 --quantize int4 --systems dgemma-fast,ar --out "$OUT/100m_int4"
dgemma bench $SHIP --dtype float32 --systems dgemma,dgemma-fast,reference,ar --out "$OUT/shipped_fp32"
dgemma bench $SHIP --dtype bfloat16 --systems dgemma-fast,reference,ar --out "$OUT/shipped_bf16"
dgemma bench $SHIP --dtype bfloat16 --quantize int8 --systems dgemma-fast,ar --out "$OUT/shipped_int8"
dgemma bench $SHIP --dtype bfloat16 --quantize int4 --systems dgemma-fast,ar --out "$OUT/shipped_int4"
# the same reference runs with glibc's default malloc in every process (dgemma's tuning off too)
dgemma bench $S100 --dtype bfloat16 --malloc default --systems dgemma-fast,reference --out "$OUT/100m_bf16_default_malloc"
