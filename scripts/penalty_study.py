"""Do OpenAI's presence / frequency penalties cure the diffusion text's repetition? A study on one checkpoint.

    python scripts/penalty_study.py [--model DIR] [--seeds 3] [--prompts 12] [--new 64] [--json OUT]

Each setting (presence, frequency) generates, through the Engine (the server's path) with the checkpoint's own
sampler settings, a continuation of each of the quality suite's fixed prompts for each seed, then reports over
all of them: distinct-1 (unique tokens / tokens, per continuation, averaged), the longest repeated run (tokens,
averaged), the mean length (a continuation ends at its EOS), and the perplexity of the continuations under the model's own causal encoder (geometric mean). The AR
text of the same weights (temperature 1) is the reference row. Penalties count committed tokens only (whole
canvases), as the server applies them. A measurement, not a test: it prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch

import dgemma
from dgemma.engine import Engine
from dgemma.train.quality import _eos_ids, _trim, distinct_n, geometric_mean, longest_repeat, perplexity, prompt_set

GRID = [(0.0, 0.0), (0.5, 0.0), (1.0, 0.0), (2.0, 0.0), (0.0, 0.5), (0.0, 1.0), (1.0, 1.0)]


def summarise(model, rows: list[tuple[list[int], list[int]]]) -> dict:
    """rows of (prompt ids, continuation ids) -> distinct-1, longest repeat, perplexity, tokens."""
    return {"distinct1": statistics.mean(distinct_n(c, 1) for _, c in rows),
            "longest_repeat": statistics.mean(longest_repeat(c) for _, c in rows),
            "perplexity": geometric_mean(perplexity(model, p, c) for p, c in rows),
            "tokens": statistics.mean(len(c) for _, c in rows)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    path = a.model or dgemma.default_model_path()
    model, tok = dgemma.load(path), dgemma.load_tokenizer(path)
    prompts = [ids for _, ids in prompt_set(tok)][:a.prompts]
    out = {"model": str(path), "seeds": a.seeds, "prompts": len(prompts), "new": a.new, "rows": []}
    ar = []
    for seed in range(a.seeds):
        for i, ids in enumerate(prompts):
            seq = model.generate_ar(torch.tensor([ids]), max_new_tokens=a.new, temperature=1.0, seed=seed * 1000 + i)
            cont = _trim(seq.sequences[0, len(ids):].tolist(), _eos_ids(model), model.sampler_config.pad_token_id)
            ar.append((ids, cont))                      # (up to its EOS, as the engine's)
    out["ar"] = summarise(model, ar)
    for presence, frequency in GRID:
        rows = []
        for seed in range(a.seeds):
            eng = Engine(model, max_batch=len(prompts))
            rids = [eng.submit(ids, seed=seed * 1000 + i, max_new_tokens=a.new, presence_penalty=presence,
                               frequency_penalty=frequency) for i, ids in enumerate(prompts)]
            res = eng.run()
            rows += [(ids, res[r].tokens) for ids, r in zip(prompts, rids)]
        out["rows"].append({"presence": presence, "frequency": frequency, **summarise(model, rows)})
    print(f"{'setting':22s} {'distinct-1':>10s} {'longest repeat':>14s} {'perplexity':>10s} {'tokens':>6s}")
    for name, r in [("AR, temperature 1", out["ar"])] + [
            (f"presence {r['presence']}, freq {r['frequency']}", r) for r in out["rows"]]:
        print(f"{name:22s} {r['distinct1']:10.3f} {r['longest_repeat']:14.2f} {r['perplexity']:10.1f} "
              f"{r['tokens']:6.1f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
