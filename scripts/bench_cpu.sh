#!/usr/bin/env bash
# The CPU measurements quoted in docs/NOTES.md (2 cores, fp32 for every system, nothing else running).
# Each system runs in its own process; ratios are between systems of the same run.
set -euo pipefail
cd "$(dirname "$0")/.."
T=${THREADS:-2}
dgemma bench --dtype float32 --steps 16 --prompt-len 32 --canvases 4 --ar-tokens 128 --threads "$T" --out bench_out/default_model
dgemma bench --dtype float32 --adaptive --steps 32 --prompt-len 32 --canvases 4 --ar-tokens 128 --threads "$T" --systems dgemma,dgemma-fast,reference --out bench_out/default_model_adaptive
dgemma bench --shape tiny --steps 16 --prompt-len 40 --canvases 1 --ar-tokens 64 --threads "$T" --out bench_out/tiny
dgemma bench --shape 100m --steps 4 --prompt-len 128 --canvases 1 --ar-tokens 32 --threads "$T" --out bench_out/100m
