#!/usr/bin/env bash
# Issue 11's device check (not yet run: no GPU was lent to that task). About 4 minutes on an H200:
#   1. tests/test_quant.py's GPU tests (Triton kernel = fallback; a quantized step captured in a CUDA graph);
#   2. `dgemma bench` on the 26B-A4B shape with fp8 and int4 weights (random, quantized one tensor at a time as
#      they are made), batch 1 and 32: dgemma (fast sampler + graphs) and AR, with peak memory.
#      Goals: fp8 >= 1,800 tok/s at batch 1 on an H200; int4 under 20 GB.
# Needs triton (part of CUDA torch wheels). Results land in $OUT or bench_out/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${OUT:-bench_out}
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src
timeout 180 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_quant.py > "$OUTDIR/gpu_quant_tests.txt" 2>&1
tail -4 "$OUTDIR/gpu_quant_tests.txt"
for Q in fp8 int4; do
  for B in 1 32; do
    timeout 240 python3 -m dgemma.cli bench --shape 26b-a4b --device cuda --dtype bfloat16 --quantize "$Q" \
      --batch "$B" --steps 16 --prompt-len 128 --ar-tokens 64 --systems dgemma-fast,ar --out "$OUTDIR/$Q-b$B" \
      2>&1 | grep -v "bench:" | tail -6
  done
done
