"""Engine throughput with denoising frames off, on, and (optionally) on an older checkout without frames.

    python scripts/bench_engine_frames.py [--old-src PATH/src] [--repeats 5]

Runs 4 requests (random prompts, 4 canvases each, 8 steps) through `Engine` on the shipped model in fp32, in
fresh subprocesses taking turns (the order rotates each round), and prints the median tokens/s of each. The
old checkout (e.g. `git worktree add /tmp/old 37efbe8`) is the engine before frames existed.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, sys, time, torch
import dgemma
from dgemma.engine import Engine
torch.set_num_threads(int(sys.argv[2]))
m = dgemma.load(dgemma.default_model_path(), device="cpu", dtype="float32")
frames = sys.argv[1] == "on"
def once():
    eng = Engine(m, max_batch=4)
    g = torch.Generator().manual_seed(0)
    kw = dict(max_new_tokens=128, max_denoising_steps=8, eos_token_id=None)
    if frames:
        kw["frames"] = True
    ids = [eng.submit(torch.randint(10, 4000, (40,), generator=g).tolist(), seed=i, **kw) for i in range(4)]
    t0, n = time.perf_counter(), 0
    while eng.has_work():
        n += sum(len(e.tokens) for e in eng.step())
        if frames:
            eng.take_frames()
    return n / (time.perf_counter() - t0)
once()
print(json.dumps(max(once() for _ in range(3))))
"""


def run(mode: str, src: str, threads: int) -> float:
    env = {**os.environ, "PYTHONPATH": src}
    out = subprocess.run([sys.executable, "-c", CHILD, mode, str(threads)], env=env, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--old-src", help="src folder of a checkout without frames")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    here = str(Path(__file__).resolve().parents[1] / "src")
    systems = ([("old", a.old_src, "off")] if a.old_src else []) + [("frames off", here, "off"),
                                                                     ("frames on", here, "on")]
    res: dict[str, list[float]] = {name: [] for name, _, _ in systems}
    for r in range(a.repeats):
        for name, src, mode in systems[r % len(systems):] + systems[:r % len(systems)]:   # rotate the order
            res[name].append(run(mode, src, a.threads))
    med = {k: statistics.median(v) for k, v in res.items()}
    for k, v in med.items():
        print(f"{k:>11}: {v:8.1f} tok/s (median of {a.repeats}; runs {', '.join(f'{x:.0f}' for x in res[k])})")
    if a.old_src:
        print(f"frames off vs old: {med['frames off'] / med['old'] - 1:+.1%}")
    print(f"frames on vs off:  {med['frames on'] / med['frames off'] - 1:+.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
