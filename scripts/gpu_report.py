"""The GPU speed targets (issue 10) judged from the files scripts/gpu_bench.sh writes, as Markdown for docs/NOTES.md.

Reads DIR/{b1_fused,b1,b32_fused,b32}/bench.json (those present, in any of the DIRs given; `dgemma bench` output:
gpu_bench.sh's two stages each bring back their own folder) and prints one table of
every system's throughput, step time and peak memory per run, then one row per target with the measured value
and whether it is met. Every ratio is taken within one bench run (one invocation, the same weights and
machine); a target whose inputs are missing says so instead of guessing.

Usage:  python scripts/gpu_report.py DIR [DIR ...]   (DIR: the $OUT of a gpu_bench.sh run, e.g. its files_at folder)
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

RUNS = {"b1_fused": "batch 1, fused", "b1": "batch 1, default", "b32_fused": "batch 32, fused",
        "b32": "batch 32, default"}


def load(*roots: Path) -> dict[str, dict]:
    """run name -> bench.json's results, from the first root that has the run (systems that failed keep their
    error; an unreadable file is skipped)."""
    out = {}
    for name in RUNS:
        f = next((r / name / "bench.json" for r in roots if (r / name / "bench.json").exists()), None)
        if f is not None:
            try:
                out[name] = json.loads(f.read_text())["results"]
            except (ValueError, KeyError) as err:
                print(f"skipping {f}: {err}")
    return out


def best(runs: dict[str, dict], names: tuple[str, ...], system: str, key: str, high: bool = True):
    """(value, run) of the best `key` of `system` over the runs named (missing or failed ones skipped)."""
    found = [(r[system][key], n) for n in names if (r := runs.get(n)) and r.get(system, {}).get(key) is not None]
    return (max if high else min)(found) if found else (None, None)


def ratio(runs: dict[str, dict], names: tuple[str, ...], a: str, b: str):
    """(tok/s of a / tok/s of b, run) within one run, the best such run; None if no run has both."""
    found = [(r[a]["tokens_per_s"] / r[b]["tokens_per_s"], n) for n in names if (r := runs.get(n))
             and "tokens_per_s" in r.get(a, {}) and "tokens_per_s" in r.get(b, {})]
    return max(found) if found else (None, None)


def targets(runs: dict[str, dict]) -> list[tuple[str, str, str, str]]:
    """(target, needed, measured (run), verdict) rows."""
    b1, b32 = ("b1_fused", "b1"), ("b32_fused", "b32")
    rows = []

    def row(name: str, needed: str, value, run, ok, fmt: str) -> None:
        if value is None:
            rows.append((name, needed, "not measured", "-"))
        else:
            rows.append((name, needed, f"{format(value, fmt)} ({RUNS[run]})", "met" if ok(value) else "NOT met"))

    v, r = best(runs, b1, "dgemma-fast", "step_ms", high=False)
    row("batch 1 decoder pass", "<= 15 ms", v, r, lambda x: x <= 15, ".1f")
    v, r = best(runs, b1, "dgemma-fast", "tokens_per_s")
    row("batch 1 throughput", ">= 1,000 tok/s", v, r, lambda x: x >= 1000, ",.0f")
    v, r = ratio(runs, b1, "dgemma-fast", "reference")
    row("batch 1 vs the reference (same run)", ">= 2.3x", v, r, lambda x: x >= 2.3, ".2f")
    v, r = best(runs, b1, "ar", "decode_step_ms", high=False)     # one-token steps only (bench since this task)
    if v is not None:
        row("AR step, batch 1 (one-token steps, ms each)", "<= 3 ms", v, r, lambda x: x <= 3, ".2f")
    else:
        v, r = best(runs, b1, "ar", "step_ms", high=False)
        row("AR step, batch 1 (ms per token, prompt included)", "<= 3 ms", v, r, lambda x: x <= 3, ".2f")
    v, r = best(runs, b32, "dgemma-fast", "tokens_per_s")
    row("batch 32 throughput", ">= 4,000 tok/s", v, r, lambda x: x >= 4000, ",.0f")
    p = None if r is None else runs[r]["dgemma-fast"].get("peak_over_weights")
    row("batch 32 memory (the throughput's run)", "<= 1.25x the weights", p, r, lambda x: x <= 1.25, ".2f")
    for names, label in ((b1, "batch 1"), (b32, "batch 32")):
        engine = [(v, n) for n in names if (v := ratio(runs, (n,), "engine", "dgemma-fast")[0]) is not None]
        for v, n in engine or [(None, None)]:            # each run that has both: the engine must hold in each
            row(f"Engine / generate, {label}", ">= 0.95x", v, n, lambda x: x >= 0.95, ".3f")
    for names, label in ((b1, "batch 1"), (b32, "batch 32")):
        v, r = ratio(runs, names, "dgemma-fast", "ar")
        if v is not None:
            rows.append((f"diffusion / AR, {label} (reported, no target)", "-", f"{v:.2f}x ({RUNS[r]})", "-"))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dirs", type=Path, nargs="+", metavar="DIR")
    a = ap.parse_args()
    runs = load(*a.dirs)
    if not runs:
        raise SystemExit(f"no bench.json under {' or '.join(map(str, a.dirs))}/{{{','.join(RUNS)}}}")
    print("| run | system | tok/s | step ms | peak GiB | peak / weights |\n|---|---|---|---|---|---|")
    for name, results in runs.items():
        for system, r in results.items():
            if "error" in r:
                print(f"| {RUNS[name]} | {system} | failed: {r['error'][:80]} | | | |")
                continue
            pw = r.get("peak_over_weights")
            print(f"| {RUNS[name]} | {system} | {r['tokens_per_s']:,.1f} | {r['step_ms']:.2f} | "
                  f"{r.get('peak_gib', float('nan')):.2f} | {'-' if pw is None else f'{pw:.2f}x'} |")
    print("\n| target | needed | measured | |\n|---|---|---|---|")
    for t in targets(runs):
        print("| " + " | ".join(t) + " |")


if __name__ == "__main__":
    main()
