"""The issue-9 text measure over several seeds: `dgemma eval --quality` once per seed, then geometric means.

    python scripts/quality_seeds.py MODEL [--seeds 0-8] [--out DIR] [-- extra dgemma eval arguments]

Each seed is a different draw for all 15 prompts (the suite's spread across seeds is why one seed is not enough;
docs/NOTES.md). Prints, for AR and the shipped diffusion setting: the geometric mean of the perplexities over seeds,
the diffusion/AR ratio (geometric mean of the per-seed ratios), distinct-1, the mean longest repeat, tokens per
forward and the rate at which the confidence stop fired. Each seed's JSON is kept in --out.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from dgemma.train.quality import geometric_mean as geo

SUITE = ["--quality", "--prompts", "15", "--tasks", "0", "--max-new-tokens", "64", "--steps", "8"]


def seeds(text: str) -> list[int]:
    """'0-8' or '0,3,5' -> a list of seeds."""
    if "-" in text:
        lo, hi = text.split("-")
        return list(range(int(lo), int(hi) + 1))
    return [int(s) for s in text.split(",")]


def main() -> int:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model")
    p.add_argument("--seeds", type=seeds, default=list(range(9)))
    p.add_argument("--out", default=None, help="folder for each seed's JSON (default: runs/quality/<model name>)")
    args = p.parse_args(argv)
    out = Path(args.out or Path("runs/quality") / Path(args.model).resolve().name)
    out.mkdir(parents=True, exist_ok=True)
    per_seed = []
    for s in args.seeds:
        f = out / f"seed{s}.json"
        if not f.exists():   # a seed already measured is not run again (delete the folder to redo)
            cmd = [sys.executable, "-m", "dgemma.cli", "eval", "--model", args.model, *SUITE, "--seed", str(s),
                   "--json", str(f), *extra]
            r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if r.returncode:
                sys.exit(f"seed {s} failed:\n{r.stderr[-2000:]}")
        runs = json.loads(f.read_text())["runs"]
        per_seed.append((runs[0], runs[1]))
        ar, diff = per_seed[-1]
        print(f"seed {s}: AR {ar['perplexity']:.1f}  diffusion {diff['perplexity']:.1f}  "
              f"ratio {diff['perplexity'] / ar['perplexity']:.2f}x", flush=True)
    ar = [a for a, _ in per_seed]
    di = [d for _, d in per_seed]
    summary = {
        "model": args.model, "seeds": args.seeds, "extra": extra,
        "ar_perplexity": geo([r["perplexity"] for r in ar]),
        "diffusion_perplexity": geo([r["perplexity"] for r in di]),
        "ratio": geo([d["perplexity"] / a["perplexity"] for a, d in per_seed]),
        "distinct_1": sum(r["distinct_1"] for r in di) / len(di),
        "ar_distinct_1": sum(r["distinct_1"] for r in ar) / len(ar),
        "longest_repeat": sum(r["longest_repeat"] for r in di) / len(di),
        "tokens_per_forward": sum(r["tokens_per_forward"] for r in di) / len(di),
        "stop_rate": sum(r["stop_rate"] for r in di) / len(di),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"{args.model}: diffusion {summary['diffusion_perplexity']:.0f} / AR {summary['ar_perplexity']:.1f} = "
          f"{summary['ratio']:.2f}x; distinct-1 {summary['distinct_1']:.2f} (AR {summary['ar_distinct_1']:.2f}), "
          f"longest repeat {summary['longest_repeat']:.1f}, {summary['tokens_per_forward']:.2f} tok/fwd, "
          f"stop {summary['stop_rate']:.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
