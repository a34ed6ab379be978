#!/usr/bin/env bash
# The prepared device check (one H100/H200 run, about 4-5 minutes on an H200; the MoE comparison is not timed yet):
#   1. the GPU tests (graph replay = eager exactly, fp32 CUDA = CPU, bf16 grouped matmuls, GPU sampler chi-square,
#      the fused Triton MoE kernels against torch._grouped_mm and fp32);
#   2. diagnostics of one 26B-A4B denoiser step and AR step (scripts/gpu_profile.py), the MoE both ways:
#      with every fused Triton kernel (DGEMMA_FUSED=all: MoE, dense MLP, sampler, norm + RoPE, norms; opt-in) and
#      with the default torch path (torch._grouped_mm etc.): kernel counts, step times, one head + sampler chunk both ways, and the
#      MoE tiles that triton.autotune chose (a few seconds per shape on first use);
#   3. `dgemma bench` on the 26B-A4B shape, random bf16 weights built on the GPU, 16 steps per canvas,
#      batch 1 and 32: dgemma (fast sampler + CUDA graphs), the request-level Engine (graphs per row count),
#      AR (same weights, graphs), and the reference
#      (transformers 5.23, built from the same shape on the GPU) when it can be imported.
# If transformers 5.23 is not installed there, put its wheel in .whl/ (see docs/NOTES.md).
# Usage on the device machine:  bash scripts/gpu_bench.sh  [PROFILE=0 to skip step 2; FUSED=all (or a list such as
#                               moe,rope): bench with those fused kernels; FUSED=compare: the default bench, then
#                               dgemma-fast and AR again with every fused kernel (about 2 minutes more)]   (results land in $OUT or bench_out/)
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
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_static.py tests/test_kernels.py \
  > "$OUTDIR/gpu_tests.txt" 2>&1
tail -6 "$OUTDIR/gpu_tests.txt"
if [ "${PROFILE:-1}" != 0 ]; then      # PROFILE=0 skips the diagnostics
  timeout 240 python3 scripts/gpu_profile.py --batch 1 > "$OUTDIR/profile_log.txt" 2>&1
  tail -70 "$OUTDIR/profile_log.txt"
fi
export DGEMMA_FUSED=${FUSED:-}
[ "$DGEMMA_FUSED" = compare ] && export DGEMMA_FUSED=
for B in 1 32; do
  timeout 240 python3 -m dgemma.cli bench --shape 26b-a4b --device cuda --dtype bfloat16 --batch "$B" --steps 16 \
    --prompt-len 128 --ar-tokens 64 --systems dgemma-fast,engine,ar,reference --out "$OUTDIR/b$B" 2>&1 | grep -v "bench:" | tail -12
done
if [ "${FUSED:-}" = compare ]; then   # the same weights with every fused kernel, after the default path
  for B in 1 32; do
    DGEMMA_FUSED=all timeout 200 python3 -m dgemma.cli bench --shape 26b-a4b --device cuda --dtype bfloat16 \
      --batch "$B" --steps 16 --prompt-len 128 --ar-tokens 64 --systems dgemma-fast,ar --out "$OUTDIR/b${B}_fused" \
      2>&1 | grep -v "bench:" | tail -8
  done
fi
