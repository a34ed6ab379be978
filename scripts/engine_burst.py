"""Time the Engine's prompt encoding for a burst of requests: B prompts submitted at once to an idle engine, the
first step's prefill (tokens and seconds, Engine.stats), three bursts in a row. Random weights of a named shape.

Usage:  python scripts/engine_burst.py [--shape tiny] [--batch 32] [--prompt-len 128] [--dtype bfloat16]
"""
from __future__ import annotations

import argparse

from dgemma.bench.worker import _prompt, _settings, build
from dgemma.engine import Engine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="tiny")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    spec = {"shape": a.shape, "device": a.device, "dtype": a.dtype, "overrides": {}, "batch": a.batch,
            "prompt_len": a.prompt_len, "canvases": 1, "steps": 4, "adaptive": False, "threads": None}
    m = build(spec)
    prompts = _prompt(m.config.vocab_size, a.batch, a.prompt_len).tolist()
    kw = _settings(spec, m.config.canvas_length)
    eng = Engine(m, max_batch=a.batch)
    for _ in range(3):
        for i, p in enumerate(prompts):
            eng.submit(p, seed=i, **kw)
        eng.step()
        s = eng.stats
        print(f"burst of {a.batch}: first step encoded {s.prefill_tokens} prompt tokens in {1000 * s.prefill_s:.0f} ms "
              f"(then a {s.rows}-row pass in {1000 * s.pass_s:.0f} ms)")
        eng.run()


if __name__ == "__main__":
    main()
