#!/usr/bin/env bash
# The prepared device check, in two stages, one device call each (at most 600 s a call and 15 minutes a task,
# machine start included): the targets in at most 7 minutes (every bench system is its own process that builds
# 50 GB of weights), then the diagnostics in at most 5 if device time is left. In a stage the steps run in order
# of value under one deadline (DEADLINE seconds, default 420 / 300), each with a timeout of its own cut to the
# time left; a step that cannot get 30 s is skipped and says so.
# STAGE=targets (the default): what the targets are judged on
#   1. the GPU tests (graph replay = eager exactly, the Engine's too, fp32 CUDA = CPU, bf16 grouped matmuls, GPU
#      sampler chi-square, folded attention on a fused kernel, the fused Triton kernels against
#      torch._grouped_mm, the eager ops and fp32, a fused step's graph replay); if a fused-kernel test fails,
#      every bench below runs the default path only (FUSED=none); if the folded-attention test fails, every
#      step runs with DGEMMA_FOLD=0 (pass it to the diagnostics stage too);
#   2. `dgemma bench`, 26B-A4B shape, random bf16 weights built on the GPU, 128-token prompt, 16 steps per canvas,
#      batch 1 with the fused paths (DGEMMA_FUSED=$FUSED, default all: MoE, dense MLP, sampler, norm + RoPE,
#      norms, q/k/v GEMM, GEMV): dgemma (fast sampler + CUDA graphs), the request-level Engine (graphs per row
#      count), AR (same weights, graphs) and the reference (transformers 5.23 from the same shape, when it can be
#      imported) -- the targets' numbers;
#   3. the same at batch 32, without the reference (add it with B32_REFERENCE=1: ~2 minutes and 108 GB more).
# STAGE=diagnostics: what the fused paths change, and where the time goes (nothing with FUSED=none: the targets
# stage has then benched the default path already)
#   4. batch 1 and 5. batch 32 on the default path (dgemma, AR);
#   6. diagnostics of one denoiser step and AR step (scripts/gpu_profile.py): kernels per step and step times
#      with and without the fused kernels, the MoE and dense MLP both ways, one head + sampler chunk both ways,
#      and the MoE tiles that triton.autotune chose; 7. the kernel table of one batch-32 step, both ways (--quick).
# STAGE=all: both in one call (DEADLINE default 580).
# Each stage ends with scripts/gpu_report.py over the bench files it has (run it here over both stages' files).
# If transformers 5.23 is not installed there, put its wheel in .whl/ (see docs/NOTES.md).
# Usage on the device machine:  bash scripts/gpu_bench.sh   [STAGE=targets|diagnostics|all; FUSED=none: the
#                               default path only, no 6 and 7; PROFILE=0: skip 6 and 7; DEADLINE=seconds]
#                               (results land in $OUT or bench_out/)
# A dry run of the plumbing on a CPU (tests/test_bench.py runs one): DEVICE=cpu SHAPE=tiny
#   PROFILE_ARGS="--override canvas_length=16 ..." (the benches and profiles then run on the CPU, not on a GPU)
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${OUT:-bench_out}
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src
STAGE=${STAGE:-targets}
DEVICE=${DEVICE:-cuda}
SHAPE=${SHAPE:-26b-a4b}
read -ra PROFILE_ARGS <<< "${PROFILE_ARGS:-}"
case "$STAGE" in
  targets) DEADLINE=${DEADLINE:-420} ;;
  diagnostics) DEADLINE=${DEADLINE:-300} ;;
  all) DEADLINE=${DEADLINE:-580} ;;
  *) echo "STAGE must be targets, diagnostics or all (got '$STAGE')"; exit 2 ;;
esac
FUSED=${FUSED:-all}
unset DGEMMA_FUSED
[ "${DGEMMA_FOLD:-1}" = 0 ] && echo "== DGEMMA_FOLD=0: attention without the fold"
# MoE / GEMV tiles: the short autotuning list (DGEMMA_AUTOTUNE unset; =full would compile ~200 tiles in the
# batch-1 bench step alone); triton.autotune's timings saved on disk with the compiled kernels, so that each
# step's fresh process (each bench system, the profile) reuses the tiles the first one chose
export TRITON_CACHE_AUTOTUNING=1

exec 3>&1      # run_step's own lines go here, where a step's output may be redirected to a file
run_step() {   # run_step NAME MAX_SECONDS COMMAND...: at most MAX_SECONDS, and never past the deadline
  local name=$1 max=$2 t=$(( DEADLINE - SECONDS - 5 ))
  shift 2
  [ "$t" -gt "$max" ] && t=$max
  if [ "$t" -lt 30 ]; then
    echo "== SKIPPED $name: $(( DEADLINE - SECONDS )) s left" >&3
    return
  fi
  echo "== $name (up to $t s; at ${SECONDS} s of $DEADLINE)" >&3
  timeout "$t" "$@"
  local rc=$?
  [ "$rc" -ne 0 ] && echo "== $name ended with status $rc (124: timed out)" >&3
}

bench() {      # bench NAME MAX_SECONDS BATCH SYSTEMS OUT_NAME
  run_step "$1" "$2" python3 -m dgemma.cli bench --shape "$SHAPE" --device "$DEVICE" --dtype bfloat16 --batch "$3" \
    --steps 16 --prompt-len 128 --ar-tokens 64 --systems "$4" --out "$OUTDIR/$5" 2>&1 | grep -v "bench:" | tail -14
}

if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available()
                                 else 'no GPU')"
python3 -c "import triton; print('triton', triton.__version__)" 2>&1 | tail -1

stage() { [ "$STAGE" = all ] || [ "$STAGE" = "$1" ]; }
if stage targets; then
  rm -rf "$OUTDIR"/b1_fused "$OUTDIR"/b32_fused "$OUTDIR"/b1 "$OUTDIR"/b32   # no earlier run's files in the report
  # the fused kernels' tests first: if the step times out, their verdict is in already; with the default tiles
  # only (DGEMMA_AUTOTUNE=0): a cold machine's autotuning of every test shape would take most of the 90 s
  run_step "GPU tests" 90 env DGEMMA_AUTOTUNE=0 python3 -m pytest -q -rP -m gpu -p no:cacheprovider \
    tests/test_kernels.py tests/test_static.py tests/test_engine.py > "$OUTDIR/gpu_tests.txt" 2>&1
  tail -6 "$OUTDIR/gpu_tests.txt"
  if grep -Eq "^(FAILED|ERROR) tests/test_static.py::test_folded_attention" "$OUTDIR/gpu_tests.txt"; then
    echo "== the folded-attention GPU test failed: every step below runs with DGEMMA_FOLD=0 (torch's own choice)"
    export DGEMMA_FOLD=0
  fi
  if grep -Eq "^(FAILED|ERROR) tests/test_kernels.py" "$OUTDIR/gpu_tests.txt"; then
    echo "== a fused-kernel GPU test failed: the benches run the default path only (run diagnostics with FUSED=none)"
    FUSED=none
  fi
  B32_SYSTEMS=dgemma-fast,engine,ar
  [ "${B32_REFERENCE:-0}" = 1 ] && B32_SYSTEMS=$B32_SYSTEMS,reference
  if [ "$FUSED" != none ]; then
    DGEMMA_FUSED=$FUSED bench "batch 1, DGEMMA_FUSED=$FUSED" 180 1 dgemma-fast,engine,ar,reference b1_fused
    DGEMMA_FUSED=$FUSED bench "batch 32, DGEMMA_FUSED=$FUSED" 150 32 "$B32_SYSTEMS" b32_fused
  else
    bench "batch 1, default path" 180 1 dgemma-fast,engine,ar,reference b1
    bench "batch 32, default path" 150 32 "$B32_SYSTEMS" b32
  fi
fi
if stage diagnostics && [ "$FUSED" = none ]; then
  echo "== diagnostics: nothing to do with FUSED=none (the targets stage benched the default path)"
elif stage diagnostics; then
  rm -rf "$OUTDIR"/b1 "$OUTDIR"/b32
  bench "batch 1, default path" 90 1 dgemma-fast,ar b1
  bench "batch 32, default path" 90 32 dgemma-fast,ar b32
  if [ "${PROFILE:-1}" != 0 ]; then                        # (the profiles time both paths)
    run_step "step diagnostics" 150 python3 scripts/gpu_profile.py --batch 1 --device "$DEVICE" \
      --shape "$SHAPE" "${PROFILE_ARGS[@]}" > "$OUTDIR/profile_log.txt" 2>&1
    tail -70 "$OUTDIR/profile_log.txt"
    run_step "batch 32 step kernels" 120 python3 scripts/gpu_profile.py --batch 32 --quick \
      --device "$DEVICE" --shape "$SHAPE" "${PROFILE_ARGS[@]}" \
      > "$OUTDIR/profile_b32_log.txt" 2>&1
    tail -40 "$OUTDIR/profile_b32_log.txt"
  fi
fi
python3 scripts/gpu_report.py "$OUTDIR" 2>&1 | tail -40      # the targets, judged from the bench files
echo "== done at ${SECONDS} s"
