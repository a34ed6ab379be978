"""GPU diagnostics for one denoiser step of a named shape (default 26b-a4b, bf16, random weights on the device).

Prints and writes (to $OUT or bench_out/) JSON with: agreement of the static (graph) plan with the dynamic one,
eager vs CUDA-graph step time, the MoE's share and achieved bandwidth, and a kernel-time table of one
eager step.  Usage:  PYTHONPATH=src python scripts/gpu_profile.py [--shape 26b-a4b] [--batch 1]
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from dgemma import sampling
from dgemma.bench.worker import build
from dgemma.generate import _FastStep


def timed(fn, reps: int = 10) -> float:
    """Median milliseconds of fn() on the GPU (CUDA events), after two warm-up calls."""
    fn()
    fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="26b-a4b")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=128)
    a = ap.parse_args()
    out_dir = Path(os.environ.get("OUT", "bench_out"))
    out_dir.mkdir(parents=True, exist_ok=True)
    m = build({"shape": a.shape, "device": "cuda", "dtype": "bfloat16"})
    cfg, B = m.config, a.batch
    C, V, H = cfg.canvas_length, cfg.vocab_size, cfg.hidden_size
    g = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(3, V, (B, a.prompt_len), device="cuda", generator=g)
    cache = m.new_cache(B, a.prompt_len + C)
    m.encode(ids, cache)
    canvas = torch.randint(0, V, (B, C), device="cuda", generator=g)
    soft = m.embed(torch.randint(0, V, (B, C), device="cuda", generator=g))   # a plausible signal
    r = {"shape": a.shape, "batch": B, "gpu": torch.cuda.get_device_name()}

    hd = m.denoise(canvas, cache, soft).float()
    hs = m.denoise(canvas, cache, soft, static=True).float()
    r["static_vs_dynamic_rel_err"] = float((hs - hd).norm() / hd.norm())

    rc = sampling.rows_per_chunk(V)
    step = _FastStep(m, cache, rc, 0.1, static=True)
    temp = torch.tensor(0.6, device="cuda")
    u = torch.rand(B * C, device="cuda", generator=g)
    ren = torch.randint(0, V, (B, C), device="cuda", generator=g)
    eager_out = step.step(canvas, soft, temp, u, ren)
    store = step.graphs
    key = ("profile", B)
    for _ in range(3):                                     # warm-up, capture, replay
        graph_out = store.run(key, step.step, canvas, soft, temp, u, ren)
    r["graph_vs_eager_argmax_agreement"] = float((graph_out[1] == eager_out[1]).float().mean())
    r["graph_vs_eager_soft_rel_err"] = float((graph_out[3].float() - eager_out[3].float()).norm()
                                             / eager_out[3].float().norm())

    r["eager_forward_ms"] = timed(lambda: m.denoise(canvas, cache, soft))
    r["eager_static_step_ms"] = timed(lambda: step.step(canvas, soft, temp, u, ren))
    r["graph_step_ms"] = timed(lambda: store.run(key, step.step, canvas, soft, temp, u, ren))
    weight_bytes = sum(p.numel() * p.element_size() for p in m.parameters())
    r["weights_gb"] = weight_bytes / 1e9
    r["graph_step_weight_tb_s"] = weight_bytes / (r["graph_step_ms"] / 1000) / 1e12

    layer = m.layers[0]
    x = torch.randn(B * C, H, device="cuda", dtype=m.dtype, generator=g)
    w, idx = layer.router(x)
    r["experts_per_layer_ms"] = timed(lambda: layer.experts(x, w, idx))
    exp_bytes = sum(p.numel() * p.element_size() for p in layer.experts.parameters())
    r["experts_tb_s"] = exp_bytes / (r["experts_per_layer_ms"] / 1000) / 1e12
    r["experts_all_layers_ms"] = r["experts_per_layer_ms"] * cfg.num_hidden_layers
    hh = torch.randn(rc, H, device="cuda", dtype=m.dtype, generator=g)
    r["head_chunk_ms"] = timed(lambda: m.head(hh))
    lg = m.head(hh)
    uu = torch.rand(rc, device="cuda", generator=g)
    r["sampler_chunk_ms"] = timed(lambda: sampling.sample_rows(lg.clone(), temp, None, m.embed_tokens.weight,
                                                               m.embed_scale(), uu))

    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step.step(canvas, soft, temp, u, ren)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=70)
    (out_dir / f"profile_b{B}.txt").write_text(table)
    (out_dir / f"profile_b{B}.json").write_text(json.dumps(r, indent=2))
    print(table)
    print(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
