"""Time the fast sampler's per-chunk work on the CPU (sampling.sample_rows with uniforms) on a trained model's own
logits, with and without sampling.EXP_FLOOR (the floor under lam - max that keeps torch's vectorised exp on its
fast path), and say how far the two results are apart.

The logits are the shipped model's denoiser logits at a canvas's first step (random canvas ids after a real prompt;
context and canvases differ per row), [rows, V] fp32, as generate hands them to the sampler. Each temperature is
timed both ways, alternated, best of `--reps`.

With --cuts: instead, the cost of top-k / top-p truncation (sampling.dropped: a `topk`, or a full sort for top-p)
on the same fast-sampler chunk, at T = 1; --vocab V times synthetic softcapped logits of width V instead (the
shipped model's vocabulary is 4,096; the 100m shape's 32,768).

Usage:  PYTHONPATH=src python scripts/bench_sampler_cpu.py [--rows 2048] [--threads 2] [--reps 7]
        PYTHONPATH=src python scripts/bench_sampler_cpu.py --cuts [--vocab 32768 --rows 256]
"""
from __future__ import annotations

import argparse
import time
from typing import Callable

import torch

import dgemma
from dgemma import sampling

PROMPTS = ["The old house at the end of the street", "And it came to pass in those days", "It is a truth universally",
           "Call me Ishmael. Some years ago", "To be, or not to be, that is the question"]


def logits_of(model, tok, rows: int) -> torch.Tensor:
    """[rows, V] denoiser logits of the model: each canvas of random ids after one of PROMPTS."""
    C, V = model.config.canvas_length, model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    out = []
    for i in range(-(-rows // C)):
        ctx = torch.tensor([tok.encode(PROMPTS[i % len(PROMPTS)])])
        canvas = torch.randint(0, V, (1, C), generator=gen)
        out.append(model.denoise_logits(ctx, canvas)[0])
    return torch.cat(out)[:rows]


def best_ms(fn: Callable[[], object], reps: int) -> float:
    """fn's fastest time of `reps` calls after one warm-up call, in ms."""
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--cuts", action="store_true", help="time top-k / top-p truncation instead")
    ap.add_argument("--vocab", type=int, help="with --cuts: synthetic logits of this width")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.cuts:
        return time_cuts(a)
    model = dgemma.load(dgemma.default_model_path(), dtype="float32")
    tok = dgemma.load_tokenizer(model.path)
    with torch.inference_mode():
        logits = logits_of(model, tok, a.rows)
        emb, scale = model.embed_tokens, model.embed_scale()
        u = torch.rand(a.rows, generator=torch.Generator().manual_seed(1))
        s = model.sampler_config
        print(f"{a.rows} rows x V = {logits.shape[1]} (the shipped model's logits), {a.threads} threads, "
              f"best of {a.reps}")
        print("| T | with the floor (ms) | without (ms) | speed-up | same samples | max entropy diff | max soft diff |")
        print("|---|---|---|---|---|---|---|")
        floor = sampling.EXP_FLOOR
        for T in (s.t_min, s.t_max, 1.0):
            temp = torch.tensor(T)
            res, ms = {}, {True: [], False: []}
            for _ in range(2):                        # alternated: the machine's drift hits both alike
                for on in (True, False):
                    sampling.EXP_FLOOR = floor if on else float("-inf")
                    ms[on].append(best_ms(lambda: res.__setitem__(on, sampling.sample_rows(
                        logits.clone(), temp, None, emb, scale, u)), a.reps))
            sampling.EXP_FLOOR = floor
            on, off = min(ms[True]), min(ms[False])
            same = bool(torch.equal(res[True].sample, res[False].sample))
            dent = float((res[True].entropy - res[False].entropy).abs().max())
            dsoft = float((res[True].soft - res[False].soft).abs().max())
            print(f"| {T:g} | {on:.1f} | {off:.1f} | {off / on:.2f}x | {same} | {dent:.2e} | {dsoft:.2e} |")


def time_cuts(a) -> None:
    """Fast-sampler chunk time without and with truncation, alternated twice, best of `reps`."""
    if a.vocab:
        g = torch.Generator().manual_seed(0)
        logits = torch.tanh(torch.randn(a.rows, a.vocab, generator=g) * 4 / 30) * 30
        what = "synthetic softcapped logits"
    else:
        model = dgemma.load(dgemma.default_model_path(), dtype="float32")
        with torch.inference_mode():
            logits = logits_of(model, dgemma.load_tokenizer(model.path), a.rows)
        what = "the shipped model's logits"
    u, temp = torch.rand(a.rows, generator=torch.Generator().manual_seed(1)), torch.tensor(1.0)
    cuts = {"none": {}, "top_k 50": {"top_k": 50}, "top_p 0.9": {"top_p": 0.9},
            "top_k 50, top_p 0.9": {"top_k": 50, "top_p": 0.9}}
    ms = {name: [] for name in cuts}
    for _ in range(2):
        for name, kw in cuts.items():
            ms[name].append(best_ms(lambda: sampling.sample_rows(logits.clone(), temp, None, uniform=u, **kw), a.reps))
    print(f"{a.rows} rows x V = {logits.shape[1]} ({what}), {a.threads} threads, best of {a.reps}, fast sampler")
    print("| truncation | ms per chunk | vs none |\n|---|---|---|")
    for name in cuts:
        print(f"| {name} | {min(ms[name]):.1f} | {min(ms[name]) / min(ms['none']):.1f}x |")


if __name__ == "__main__":
    main()
