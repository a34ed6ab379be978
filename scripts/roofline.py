"""Arithmetic floors of a DiffusionGemma step for a named shape: matmul FLOPs and weight bytes of one denoiser
pass (with the head and the self-conditioning mix of the fast sampler) and of one AR step, and the times they
imply at a given matmul rate and memory bandwidth. A calculation from the config, not a measurement: real steps
add launch gaps, attention softmax, norms and the sampler's passes over the logits.

Counted per token: every projection (q, k, v, o, router, dense MLP, the k routed experts' three matrices), the
self-conditioning MLP (denoiser), the tied head, the soft-embedding mix p @ E (denoiser), and attention's two
matmuls against the keys a canvas sees (prompt + canvas; sliding layers at most the window). Weight bytes: each
weight read once per pass, experts only where some token of the pass routes to them: the experts n tokens reach
when each picks k distinct experts uniformly, E (1 - (1 - k/E)^n), rounded (exactly k for one token; all 128 at
256 tokens; ~112 for an AR step of 32 tokens).

Usage:  PYTHONPATH=src python scripts/roofline.py [--shape 26b-a4b] [--batch 1 32] [--prompt-len 128]
            [--steps 16] [--tflops 759] [--tbs 4.2]     (defaults: the H200 rates measured in docs/NOTES.md run 4)
"""
from __future__ import annotations

import argparse

from dgemma.config import preset


def per_token_macs(cfg, keys: int, denoiser: bool) -> tuple[float, dict[str, float]]:
    """Multiply-accumulates per token of one pass where each query sees `keys` keys."""
    H, k, E = cfg.hidden_size, cfg.top_k_experts, cfg.num_experts
    parts = {"attention projections": 0.0, "attention scores": 0.0, "dense MLP": 0.0, "experts": 0.0,
             "router": 0.0}
    for i in range(cfg.num_hidden_layers):
        D, kv = cfg.layer_head_dim(i), cfg.layer_kv_heads(i)
        q, kvw = cfg.num_attention_heads * D, kv * D
        sliding = cfg.is_sliding(i)
        parts["attention projections"] += H * (q + kvw * (2 if sliding else 1)) + q * H
        seen = min(keys, cfg.sliding_window) if sliding else keys
        parts["attention scores"] += 2 * cfg.num_attention_heads * D * seen
        parts["dense MLP"] += 3 * H * cfg.intermediate_size
        parts["experts"] += k * 3 * H * cfg.moe_intermediate_size
        parts["router"] += H * E
    parts["head"] = H * cfg.vocab_size
    if denoiser:
        parts["self-conditioning MLP"] = 3 * H * cfg.intermediate_size
        parts["soft-embedding mix"] = H * cfg.vocab_size
    return sum(parts.values()), parts


def experts_reached(cfg, tokens: int) -> int:
    """Experts that `tokens` tokens reach, each picking k distinct ones uniformly: the expected count, rounded."""
    E, k = cfg.num_experts, cfg.top_k_experts
    return round(E * (1 - (1 - k / E) ** tokens))


def weight_bytes(cfg, tokens: int, denoiser: bool, elem: int = 2) -> float:
    """Bytes of weights one pass reads once, with the experts its tokens reach (experts_reached)."""
    H, I, Ie = cfg.hidden_size, cfg.intermediate_size, cfg.moe_intermediate_size
    n = 0
    for i in range(cfg.num_hidden_layers):
        D, kv = cfg.layer_head_dim(i), cfg.layer_kv_heads(i)
        q = cfg.num_attention_heads * D
        n += H * (q + kv * D * (2 if cfg.is_sliding(i) else 1)) + q * H + 3 * H * I + H * cfg.num_experts
        n += experts_reached(cfg, tokens) * 3 * H * Ie
    n += H * cfg.vocab_size + (3 * H * I if denoiser else 0)      # tied head (read again by the mix: counted once)
    return n * elem


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="26b-a4b")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--tflops", type=float, default=759.0, help="matmul rate, TFLOP/s")
    ap.add_argument("--tbs", type=float, default=4.2, help="memory bandwidth, TB/s")
    a = ap.parse_args()
    cfg = preset(a.shape)
    C = cfg.canvas_length
    for B in a.batch:
        macs, parts = per_token_macs(cfg, a.prompt_len + C, denoiser=True)
        flops = 2 * macs * B * C
        wb = weight_bytes(cfg, B * C, denoiser=True)
        t_c, t_m = flops / (a.tflops * 1e12) * 1e3, wb / (a.tbs * 1e12) * 1e3
        floor = max(t_c, t_m)
        print(f"{a.shape} batch {B}: denoiser pass of {B} x {C} tokens ({a.prompt_len}-token prompts)")
        for name, v in sorted(parts.items(), key=lambda kv: -kv[1]):
            print(f"  {name:24s} {2 * v * B * C / 1e12:8.2f} TFLOP")
        print(f"  total {flops / 1e12:.1f} TFLOP -> {t_c:.1f} ms at {a.tflops:.0f} TFLOP/s; weights {wb / 1e9:.1f} GB -> "
              f"{t_m:.1f} ms at {a.tbs} TB/s; floor {floor:.1f} ms per pass = "
              f"{B * C / a.steps / (floor / 1e3):,.0f} tok/s at {a.steps} steps per canvas (prompt encoding left out)")
        ar_macs, _ = per_token_macs(cfg, a.prompt_len, denoiser=False)
        ar_flops, ar_b = 2 * ar_macs * B, weight_bytes(cfg, B, denoiser=False)
        ar = max(ar_flops / (a.tflops * 1e12), ar_b / (a.tbs * 1e12)) * 1e3
        print(f"  AR step of {B} token(s): {ar_flops / 1e9:.1f} GFLOP, weights {ar_b / 1e9:.2f} GB -> floor {ar:.2f} ms "
              f"= {B / (ar / 1e3):,.0f} tok/s")


if __name__ == "__main__":
    main()
