"""Would torch.compile (inductor's C++ backend) speed up the CPU path? A probe, not a feature: it times a
bf16 denoiser pass, the head + fast sampler on one canvas and an AR token, eager and with the element-wise regions
around the matmuls compiled (the q/k/v norms and RoPE; the layer from the attention's output projection to the
experts, and after them; the head and sampler as one function), and reports the first call's compile time.
The compiled layer is this script's own copy of model.Layer's eager code, so the library is untouched.

    PYTHONPATH=src python scripts/cpu_compile_probe.py [--shape 100m] [--threads 2]

Results and the decision (not adopted) are in docs/NOTES.md, "Cheaper hardware".
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
import torch.nn.functional as F

from dgemma import model as M
from dgemma import sampling
from dgemma.bench.worker import _prompt, build


def epilogue(att, q, k_raw, v, cos, sin):
    v = k_raw if v is None else v
    q, k = att.q_norm(q).transpose(1, 2), att.k_norm(k_raw).transpose(1, 2)
    q = q * cos + M.rotate_half(q) * sin
    k = k * cos + M.rotate_half(k) * sin
    return q, k, M.rms_norm(v, None, att.eps).transpose(1, 2)


def before_experts(L, h, a):
    r = h + L.post_attention_layernorm(a)
    m1 = L.post_feedforward_layernorm_1(L.mlp(L.pre_feedforward_layernorm(r)))
    flat = r.reshape(-1, r.shape[-1])
    w, idx = L.router(flat)
    return r, m1, L.pre_feedforward_layernorm_2(flat), w, idx


def after_experts(L, r, m1, m2, encoder):
    h = r + L.post_feedforward_layernorm(m1 + L.post_feedforward_layernorm_2(m2))
    return h * (L.encoder_layer_scalar if encoder else L.layer_scalar)


def head_and_sample(m, h, temp, u):
    return sampling.sample_rows(m.head(h), temp, None, m.embed_tokens, m.embed_scale(), u)


REGIONS = {f.__name__: f for f in (epilogue, before_experts, after_experts, head_and_sample)}


def layer_forward(L, h, cos, sin, attend, encoder, x=None, next_norm=None):
    """model.Layer.forward's eager path (plain weights, no fused kernels) through REGIONS."""
    B, S, H = h.shape
    at = L.self_attn
    x = L.input_layernorm(h)
    q = F.linear(x, at.q_proj.weight).view(B, S, at.heads, at.head_dim)
    k = F.linear(x, at.k_proj.weight).view(B, S, at.kv_heads, at.head_dim)
    v = F.linear(x, at.v_proj.weight).view(B, S, at.kv_heads, at.head_dim) if at.v_proj is not None else None
    q, k, v = REGIONS["epilogue"](at, q, k, v, cos, sin)
    o = attend(q, k, v).transpose(1, 2).reshape(B, S, -1)
    r, m1, x2, w, idx = REGIONS["before_experts"](L, h, F.linear(o, at.o_proj.weight))
    m2 = L.experts(x2, w, idx).view(B, S, H)
    return REGIONS["after_experts"](L, r, m1, m2, encoder), None


def timed(f, n: int = 5) -> float:
    f()
    t = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - t) / n * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="100m")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp())   # a cold compile, as a user's first
    m = build(dict(shape=a.shape, dtype="bfloat16", device="cpu"))
    V, C = m.config.vocab_size, m.config.canvas_length
    ids = _prompt(V, 1, 128)
    cache = m.new_cache(1, 128 + C)
    temp, u = sampling.temperature(1, 2, 0.4, 0.8), torch.rand(C)
    M.Layer.forward = layer_forward
    eager = dict(REGIONS)
    import torch._inductor.config as ic
    ic.emulate_precision_casts = True          # round where eager rounds, as far as inductor can
    compiled = {k: torch.compile(f, dynamic=True) for k, f in eager.items()}   # compiles at the first call
    with torch.inference_mode():
        m.encode(ids, cache)
        canvas = torch.randint(0, V, (1, C))
        h = m.denoise(canvas, cache).reshape(C, -1)
        for rnd in range(3):                  # eager, compiled, eager, compiled: the machine drifts
            for mode in ("eager", "compiled"):
                REGIONS.update(eager if mode == "eager" else compiled)
                t0 = time.perf_counter()
                m.denoise(canvas, cache)
                REGIONS["head_and_sample"](m, h, temp, u)
                m.generate_ar(ids, max_new_tokens=2)
                first = time.perf_counter() - t0
                d = timed(lambda: m.denoise(canvas, cache))
                s = timed(lambda: REGIONS["head_and_sample"](m, h, temp, u))
                ar = (timed(lambda: m.generate_ar(ids, max_new_tokens=17), 2) -
                      timed(lambda: m.generate_ar(ids, max_new_tokens=1), 2)) / 16
                print(f"{mode:9s} first call {first:6.1f} s  denoiser pass {d:6.1f} ms  head + sampler {s:6.1f} ms"
                      f"  AR token {ar:6.1f} ms", flush=True)


if __name__ == "__main__":
    main()
