#!/usr/bin/env bash
# Prepared device check (one H100/H200 run, ~8 minutes): 26B-A4B shape, random bf16 weights built on the GPU,
# 16 denoising steps per canvas, batch 1 and 32, dgemma (exact and fast samplers) and AR mode.
# The reference needs a 50 GB checkpoint folder, so on the GPU it is timed only where one is available
# (pass REF=/path/to/checkpoint); its published numbers are in ../shared/docs/anchors.md.
# Usage on the device machine:  bash scripts/gpu_bench.sh   (results land in $OUT or bench_out/)
set -euo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${OUT:-bench_out}
export PYTHONPATH=$PWD/src:${PYTHONPATH:-}
python -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"
for B in 1 32; do
  python -m dgemma.cli bench --shape 26b-a4b --device cuda --dtype bfloat16 --batch "$B" --steps 16 \
    --prompt-len 128 --ar-tokens 32 --systems dgemma,dgemma-fast,ar --out "$OUTDIR/b$B" 2>&1 | tail -8
done
if [ -n "${REF:-}" ]; then
  python -m dgemma.cli bench --model "$REF" --device cuda --dtype bfloat16 --batch 1 --steps 16 \
    --systems dgemma,reference --out "$OUTDIR/ref" 2>&1 | tail -6
fi
