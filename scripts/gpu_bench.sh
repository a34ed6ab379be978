#!/usr/bin/env bash
# The prepared device check (one H100/H200 run, about 6 minutes on an H200):
#   1. the GPU tests (graph replay = eager, fp32 CUDA = CPU, bf16 grouped matmuls, GPU sampler chi-square);
#   2. diagnostics of one 26B-A4B denoiser step (scripts/gpu_profile.py);
#   3. `dgemma bench` on the 26B-A4B shape, random bf16 weights built on the GPU, 16 steps per canvas,
#      batch 1 and 32: dgemma (fast sampler + CUDA graphs), dgemma (exact sampler, eager), AR, and the
#      reference (transformers 5.23, built from the same shape on the GPU) when it can be imported.
# If transformers 5.23 is not installed there, put its wheel in .whl/ (see docs/NOTES.md).
# Usage on the device machine:  bash scripts/gpu_bench.sh   (results land in $OUT or bench_out/)
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${OUT:-bench_out}
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv,noheader || true
timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_static.py 2>&1 | tail -15
timeout 150 python3 scripts/gpu_profile.py --batch 1 2>&1 | tail -60
for B in 1 32; do
  systems=dgemma-fast,dgemma,ar,reference
  [ "$B" = 32 ] && systems=dgemma-fast,ar,reference
  timeout 240 python3 -m dgemma.cli bench --shape 26b-a4b --device cuda --dtype bfloat16 --batch "$B" --steps 16 \
    --prompt-len 128 --ar-tokens 64 --systems "$systems" --out "$OUTDIR/b$B" 2>&1 | grep -v "^bench:" | tail -12
done
