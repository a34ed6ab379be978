"""GPU diagnostics for one denoiser step of a named shape (default 26b-a4b, bf16, random weights on the device).

Prints and writes (to $OUT or bench_out/) JSON with: agreement of the static (graph) plan with the dynamic one,
eager vs CUDA-graph step time, the MoE's share and achieved bandwidth, and a kernel-time table of one
eager step. The step runs two ways, compared side by side (keys prefixed fused_ / torch_): with every fused
Triton kernel (DGEMMA_FUSED=all: kernels.moe and mlp, norm_rope, the layer norms, the sampler's kernels) and with
the default torch path (torch._grouped_mm, eager norms and RoPE, torch sampler ops): the GPU kernels launched per
denoiser step and per AR step, the time of one step (eager and graph-replayed), and the experts layer alone.
One chunk of the head + fast sampler is timed with torch ops and with the fused kernel (sampling.fused_rows), and
one attention call per layer kind with each of torch's attention backends, folded and not (`attention_times`).
Usage:  PYTHONPATH=src python scripts/gpu_profile.py [--shape 26b-a4b] [--batch 1] [--quick]
        (a smoke run on the CPU, as tests/test_bench.py does: --device cpu --shape tiny --override KEY=INT ...,
        with TRITON_INTERPRET=1)
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from dgemma import kernels, sampling
from dgemma.bench.worker import build
from dgemma.generate import _FastStep


DEV = "cuda"   # --device: cuda for the measurements; cpu runs every line on a small shape (the test's smoke run)


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def timed(fn) -> float:
    """Median milliseconds of fn() over 10 calls after two warm-up calls (CUDA events); on the CPU, of one call
    (the smoke run's interpreted kernels are slow)."""
    warm_up, reps = (2, 10) if DEV == "cuda" else (0, 1)
    for _ in range(warm_up):
        fn()
    times = []
    for _ in range(reps):
        if DEV == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            sync()
            times.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t))
    return sorted(times)[len(times) // 2]


def kernel_count(prof) -> int:
    """GPU kernels the profiler recorded (memcpy / memset not counted); on the CPU, every op it recorded."""
    kind = torch.autograd.DeviceType.CUDA if DEV == "cuda" else torch.autograd.DeviceType.CPU
    return sum(1 for e in prof.events() if e.device_type == kind and not e.name.startswith(("Memcpy", "Memset")))


def profiled(fn):
    """(profiler, fn's result) of one call of fn, the device's activity only."""
    with profile(activities=[ProfilerActivity.CUDA if DEV == "cuda" else ProfilerActivity.CPU]) as prof:
        out = fn()
        sync()
    return prof, out


def attention_times(B: int, C: int, L: int, g: torch.Generator) -> dict[str, float | str]:
    """Milliseconds of one attention call (model.attention) at the 26B's head layouts, a denoiser pass's C queries
    and an AR step's one, over L keys with a broadcast bias mask, folded (what CUDA runs) or with enable_gqa, with
    torch's default choice and each backend alone ("no kernel": that backend refuses the call)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from dgemma.model import attention
    backends = {"default": None, "cudnn": SDPBackend.CUDNN_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "math": SDPBackend.MATH}
    out: dict[str, float | str] = {}
    for layer, Hkv, D in (("sliding", 8, 256), ("global", 2, 512)):
        for S in (C, 1):
            q = torch.randn(B, S, 16, D, device=DEV, dtype=torch.bfloat16, generator=g).transpose(1, 2)
            k, v = (torch.randn(B, Hkv, L, D, device=DEV, dtype=torch.bfloat16, generator=g) for _ in range(2))
            keep = torch.rand(B, 1, 1, L, device=DEV, generator=g) < 0.9
            mask = torch.zeros(keep.shape, device=DEV, dtype=torch.bfloat16).masked_fill_(~keep, float("-inf"))
            for name, allowed in backends.items():
                for fold in (True, False):
                    key = f"attn_{layer}_q{S}_L{L}_{name}_{'folded' if fold else 'gqa'}_ms"
                    try:
                        with sdpa_kernel(allowed) if allowed is not None else contextlib.nullcontext():
                            out[key] = timed(lambda: attention(q, k, v, mask, fold=fold))
                    except RuntimeError as err:                # "no kernel": the backend refused the call
                        refused = any(m in str(err) for m in ("No available kernel", "No viable backend"))
                        out[key] = "no kernel" if refused else f"failed: {str(err)[:200]}"
    return out


def set_path(mode: str) -> None:
    """'fused' (every kernel of kernels.FUSIBLE) or 'torch'; the model reads DGEMMA_FUSED on every call."""
    os.environ["DGEMMA_FUSED"] = "all" if mode == "fused" else ""


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="26b-a4b")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                    help="cpu: a smoke run of every line (use a small --shape; TRITON_INTERPRET=1 for the kernels)")
    ap.add_argument("--override", action="append", default=[], metavar="KEY=INT",
                    help="a config value of the shape, e.g. num_hidden_layers=6 (repeatable)")
    ap.add_argument("--quick", action="store_true",
                    help="only one denoiser step's kernels and times, both paths (no fp32 check, parts, AR)")
    a = ap.parse_args()
    global DEV
    DEV = a.device
    out_dir = Path(os.environ.get("OUT", "bench_out"))
    out_dir.mkdir(parents=True, exist_ok=True)
    over = {k: int(v) for k, v in (o.split("=", 1) for o in a.override)}
    r = {"shape": a.shape, "overrides": over, "batch": a.batch, "triton": kernels.available(),
         "gpu": torch.cuda.get_device_name() if DEV == "cuda" else "cpu"}
    if not a.quick:
        # correctness at the real dimensions, in fp32 (no routing flips from rounding), 6 layers (5 sliding + 1 full)
        m = build({"shape": a.shape, "device": DEV, "dtype": "float32",
                   "overrides": {"num_hidden_layers": 6, **over}})
        g = torch.Generator(device=DEV).manual_seed(1)
        C, V = m.config.canvas_length, m.config.vocab_size
        ids = torch.randint(3, V, (a.batch, a.prompt_len), device=DEV, generator=g)
        cache = m.new_cache(a.batch, a.prompt_len + C)
        m.encode(ids, cache)
        canvas = torch.randint(0, V, (a.batch, C), device=DEV, generator=g)
        hd = m.denoise(canvas, cache).float()
        r["fp32_static_vs_dynamic_rel_err"] = float((m.denoise(canvas, cache, static=True) - hd).norm() / hd.norm())
        r["fp32_dynamic_repeat_rel_err"] = float((m.denoise(canvas, cache) - hd).norm() / hd.norm())
        del m, cache, hd
        if DEV == "cuda":
            torch.cuda.empty_cache()

    m = build({"shape": a.shape, "device": DEV, "dtype": "bfloat16", "overrides": over})
    cfg, B = m.config, a.batch
    C, V, H = cfg.canvas_length, cfg.vocab_size, cfg.hidden_size
    g = torch.Generator(device=DEV).manual_seed(0)
    ids = torch.randint(3, V, (B, a.prompt_len), device=DEV, generator=g)
    cache = m.new_cache(B, a.prompt_len + C)
    m.encode(ids, cache)
    canvas = torch.randint(0, V, (B, C), device=DEV, generator=g)
    soft = m.embed(torch.randint(0, V, (B, C), device=DEV, generator=g))   # a plausible signal

    hd = m.denoise(canvas, cache, soft).float()
    hs = m.denoise(canvas, cache, soft, static=True).float()
    r["bf16_static_vs_dynamic_rel_err"] = float((hs - hd).norm() / hd.norm())
    r["bf16_static_repeat_equal"] = bool(torch.equal(m.denoise(canvas, cache, soft, static=True).float(), hs))

    rc = min(sampling.rows_per_chunk(V), B * C)                # (the 26B: 256 rows, a canvas)
    step = _FastStep(m, cache, rc, 0.1, static=True)
    temp = torch.tensor(0.6, device=DEV)
    u = torch.rand(B * C, device=DEV, generator=g)
    ren = torch.randint(0, V, (B, C), device=DEV, generator=g)
    store = step.graphs
    weight_bytes = sum(p.numel() * p.element_size() for p in m.parameters())
    r["weights_gb"] = weight_bytes / 1e9
    outs = {}
    for mode in ("fused", "torch"):                      # a graph key per mode: graphs keep the path they captured
        set_path(mode)
        eager_out = step.step(canvas, soft, temp, u, ren)
        key = ("profile", B, mode)
        for _ in range(3):                                 # warm-up, capture, replay
            graph_out = store.run(key, step.step, canvas, soft, temp, u, ren)
        r[f"{mode}_graph_equals_eager"] = all(torch.equal(x, y) for x, y in zip(graph_out, eager_out))
        outs[mode] = m.denoise(canvas, cache, soft).float()
        r[f"{mode}_eager_forward_ms"] = timed(lambda: m.denoise(canvas, cache, soft))
        r[f"{mode}_eager_static_step_ms"] = timed(lambda: step.step(canvas, soft, temp, u, ren))
        r[f"{mode}_graph_step_ms"] = timed(lambda: store.run(key, step.step, canvas, soft, temp, u, ren))
        r[f"{mode}_graph_step_weight_tb_s"] = weight_bytes / (r[f"{mode}_graph_step_ms"] / 1000) / 1e12
        prof, _ = profiled(lambda: step.step(canvas, soft, temp, u, ren))
        r[f"{mode}_denoise_step_kernels"] = kernel_count(prof)
        table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=70)
        (out_dir / f"profile_b{B}_{mode}.txt").write_text(table)
    # bf16 routing flips make whole-step differences of a few % possible; the experts-layer comparison is below
    r["bf16_denoise_fused_vs_torch_rel_err"] = float((outs["fused"] - outs["torch"]).norm() / outs["torch"].norm())

    if not a.quick:
        layer = m.layers[0]
        exp_bytes = sum(p.numel() * p.element_size() for p in layer.experts.parameters())
        for T in (B * C, B):                                   # a denoiser step's tokens, an AR step's tokens
            x = torch.randn(T, H, device=DEV, dtype=m.dtype, generator=g)
            w, idx = layer.router(x)
            xs, order, _, offs = layer.experts.group(x, idx)                  # (offs: int32, as the kernels take)
            ms = timed(lambda: layer.experts._grouped(xs, offs))
            r[f"grouped_mm_T{T}_ms"], r[f"grouped_mm_T{T}_tb_s"] = ms, exp_bytes / (ms / 1000) / 1e12
            if kernels.available():                            # three kernels: gate/up, down, the combine
                r[f"rows_per_expert_T{T}_max"] = int(torch.bincount(idx.flatten(), minlength=cfg.num_experts).max())
                for bm in (16, 32, 64):                        # rows per block: moe_block_rows' choice and the others
                    try:
                        r[f"fused_moe_T{T}_BM{bm}_ms"] = timed(lambda: kernels.moe(
                            x, layer.experts.gate_up_proj, layer.experts.down_proj, idx, w, order, offs, block_m=bm))
                    except Exception as err:                   # (BM 32 is compiled nowhere else: say why, go on)
                        r[f"fused_moe_T{T}_BM{bm}_ms"] = f"failed: {type(err).__name__}: {str(err)[:200]}"
                bm = r[f"fused_moe_T{T}_block_rows"] = kernels.moe_block_rows(T * cfg.top_k_experts, cfg.num_experts)
                ms = r[f"fused_moe_T{T}_ms"] = r[f"fused_moe_T{T}_BM{bm}_ms"]      # what kernels.moe runs by default
                if isinstance(ms, float):
                    r[f"fused_moe_T{T}_tb_s"] = exp_bytes / (ms / 1000) / 1e12
                mlp = layer.mlp                                # the dense MLP: two kernels vs cuBLAS + GELU + product
                mlp_bytes = sum(p.numel() * p.element_size() for p in mlp.parameters())
                for mode in ("fused", "torch"):
                    set_path(mode)
                    ms = timed(lambda: mlp(x))
                    r[f"{mode}_dense_mlp_T{T}_ms"] = ms
                    r[f"{mode}_dense_mlp_T{T}_tb_s"] = mlp_bytes / (ms / 1000) / 1e12
            ys = {}
            for mode in ("fused", "torch"):
                set_path(mode)
                ys[mode] = layer.experts(x, w, idx).float()
                r[f"{mode}_experts_forward_T{T}_ms"] = timed(lambda: layer.experts(x, w, idx))
            r[f"experts_fused_vs_torch_T{T}_rel_err"] = float((ys["fused"] - ys["torch"]).norm() / ys["torch"].norm())
        if kernels.available():   # the tiles triton.autotune chose per (width, depth, rows per block)
            tk = kernels._kernels()
            r["moe_autotuned"] = {f"{name} {key}": str(cfg) for name in ("gate_up_kernel", "down_kernel")
                                  for key, cfg in getattr(tk, name).cache.items()}
        r.update(attention_times(B, C, cache.key_slots(C, True)[1], g))     # the static pass's full-layer keys
        hh = torch.randn(rc, H, device=DEV, dtype=m.dtype, generator=g)
        r["head_chunk_ms"] = timed(lambda: m.head(hh))
        lg = m.head(hh)
        uu = torch.rand(rc, device=DEV, generator=g)
        r["sampler_chunk_ms"] = timed(lambda: sampling.sample_rows(lg.clone(), temp, None, m.embed_tokens,
                                                                   m.embed_scale(), uu))
        if kernels.available():   # the same chunk from the raw logits in one Triton kernel (DGEMMA_FUSED=sampler)
            cap = cfg.final_logit_softcapping
            r["fused_head_and_sampler_chunk_ms"] = timed(lambda: sampling.fused_rows(
                m.embed_tokens.logits(hh), temp, cap, uu, m.embed_tokens, m.embed_scale()))
            r["torch_head_and_sampler_chunk_ms"] = timed(lambda: sampling.sample_rows(
                m.head(hh), temp, None, m.embed_tokens, m.embed_scale(), uu))

    if not a.quick:
        ar_ids = torch.randint(3, V, (B, a.prompt_len), device=DEV, generator=g)
        for mode in ("fused", "torch"):
            set_path(mode)
            m._runtime.graphs = None                           # generate_ar's graph keys do not name the MoE path
            m.generate_ar(ar_ids, max_new_tokens=32, eos_token_id=None)       # warm-up, capture
            sync()
            t = time.perf_counter()
            m.generate_ar(ar_ids, max_new_tokens=32, eos_token_id=None)
            sync()
            r[f"{mode}_ar_ms_per_token_with_prefill"] = 1000 * (time.perf_counter() - t) / 32
            ar_cache = m.new_cache(B, a.prompt_len + 8, scratch=1)
            m.encode(ar_ids, ar_cache)
            m.head(m.encode_step(ar_ids[:, -1:], ar_cache)[:, -1])           # warm-up (Triton compiles on first use)
            ar_cache = m.new_cache(B, a.prompt_len + 8, scratch=1)
            m.encode(ar_ids, ar_cache)
            prof, _ = profiled(lambda: m.head(m.encode_step(ar_ids[:, -1:], ar_cache)[:, -1]))
            r[f"{mode}_ar_step_kernels"] = kernel_count(prof)
            ar_table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=12,
                                                 max_name_column_width=70)
            (out_dir / f"profile_ar_b{B}_{mode}.txt").write_text(ar_table)
    m._runtime.graphs = None
    os.environ.pop("DGEMMA_FUSED")

    (out_dir / f"profile_b{B}.json").write_text(json.dumps(r, indent=2))
    print((out_dir / f"profile_b{B}_fused.txt").read_text())
    if not a.quick:
        print((out_dir / f"profile_ar_b{B}_fused.txt").read_text())
    print(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
