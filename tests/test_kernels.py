"""The fused MoE kernels (kernels.moe), the shared block ownership (kernels._blocks) and Experts' path choice."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch

from dgemma import kernels
from dgemma.config import ModelConfig
from dgemma.model import Experts


def test_block_ownership_covers_every_row_once():
    """Every row of every group lies in exactly one block of its own expert; spare blocks are marked E."""
    g = torch.Generator().manual_seed(0)
    for E, BM in ((5, 16), (3, 4), (8, 64), (1, 16)):
        counts = torch.randint(0, 40, (E,), generator=g)
        counts[0] = 0                                           # an empty expert first, and (E > 1) one later
        counts[-1] = 0 if E > 2 else counts[-1]
        ends = torch.cumsum(counts, 0).to(torch.int32)
        M = int(ends[-1])
        if M == 0:
            continue
        blk_e, blk_row = kernels._blocks(ends, M, BM)
        assert blk_e.shape[0] == -(-M // BM) + min(E, M)
        owner = torch.full((M,), -1)
        for e, r0 in zip(blk_e.tolist(), blk_row.tolist()):
            if e == E:
                continue
            start, end = int(ends[e] - counts[e]), int(ends[e])
            assert start <= r0 < end and (r0 - start) % BM == 0
            rows = torch.arange(r0, min(r0 + BM, end))
            assert (owner[rows] == -1).all()
            owner[rows] = e
        assert (owner >= 0).all()


def test_block_rows_by_rows_per_expert():
    assert kernels.moe_block_rows(8, 128) == 16              # an AR step, batch 1, 26B-A4B (8 slots)
    assert kernels.moe_block_rows(2048, 128) == 16           # a denoiser step, batch 1 (~16 rows per expert)
    assert kernels.moe_block_rows(256 * 128, 128) == 64
    assert kernels.moe_block_rows(2048 * 128, 128) == 128    # ~2,000 rows per expert


def _experts(E: int, H: int, I: int, k: int, dtype=torch.float32) -> Experts:
    cfg = ModelConfig(vocab_size=64, hidden_size=H, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=16, global_head_dim=16, num_global_key_value_heads=1,
                      sliding_window=6, num_experts=E, top_k_experts=k, moe_intermediate_size=I, canvas_length=8)
    ex = Experts(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():                                       # outputs of order one
        ex.gate_up_proj.normal_(generator=g).mul_(H ** -0.5)
        ex.down_proj.normal_(generator=g).mul_(I ** -0.5)
    return ex.to(dtype)


@pytest.mark.parametrize("dtype,H,I", [(torch.float32, 32, 16), (torch.bfloat16, 32, 16), (torch.float32, 34, 18)])
def test_cpu_experts_forward_is_unchanged(dtype, H, I):
    """On the CPU Experts never takes the fused path, and gives what the grouped matmuls (aligned widths) or the
    per-expert loop followed by the weighted, sequential index_add_ give, bit for bit."""
    ex = _experts(6, H, I, 2, dtype)
    g = torch.Generator().manual_seed(1)
    T, k = 11, 2
    x = torch.randn(T, H, generator=g).to(dtype)
    idx = torch.stack([torch.randperm(6, generator=g)[:k] for _ in range(T)])
    w = torch.rand(T, k, generator=g)
    with torch.no_grad():
        assert not ex._fused_ok(x) and ex._grouped_ok(x) == (H == 32)
        out = ex(x, w, idx)
        xs, order, tok, offs = ex.group(x, idx)
        if ex._grouped_ok(x):
            y = ex._grouped(xs, offs.to(torch.int32))
        else:
            ys, start = [], 0
            for e, end in enumerate(offs.tolist()):
                if end > start:
                    gg, u = torch.nn.functional.linear(xs[start:end], ex.gate_up_proj[e]).chunk(2, dim=-1)
                    h = torch.nn.functional.gelu(gg, approximate="tanh") * u
                    ys.append(torch.nn.functional.linear(h, ex.down_proj[e]))
                start = end
            y = torch.cat(ys)
        want = torch.zeros_like(x).index_add_(0, tok, (y * w.reshape(-1)[order, None]).to(dtype))
    assert torch.equal(out, want)


# Run by Triton's interpreter in a fresh process (the interpreter must be on before triton is first imported).
# argv: JSON list of cases [E, H, I, T, k, block_m or null, dtype, counts or null]; counts fixes how many of the
# T*k slots each expert gets (else routing is random).
INTERPRETED = """
import json, sys, torch
import torch.nn.functional as F
from dgemma import kernels
assert kernels.available()

def reference(xs, gu, dn, offs, ws):
    out, start = torch.zeros(xs.shape[0], dn.shape[1]), 0
    for e, end in enumerate(offs.tolist()):
        g, u = F.linear(xs[start:end], gu[e]).chunk(2, dim=-1)
        out[start:end] = F.linear(F.gelu(g, approximate="tanh") * u, dn[e]) * ws[start:end, None]
        start = end
    return out

for n, (E, H, I, T, k, bm, dtype, counts) in enumerate(json.loads(sys.argv[1])):
    g = torch.Generator().manual_seed(n)
    dtype = getattr(torch, dtype)
    gu = (torch.randn(E, 2 * I, H, generator=g) / H ** 0.5).to(dtype)
    dn = (torch.randn(E, H, I, generator=g) / I ** 0.5).to(dtype)
    if counts is None:
        counts = torch.bincount(torch.randint(0, E, (T * k,), generator=g), minlength=E)
    offs = torch.cumsum(torch.as_tensor(counts), 0)
    assert int(offs[-1]) == T * k, counts
    xs = torch.randn(T * k, H, generator=g).to(dtype)
    ws = torch.rand(T * k, generator=g)
    got = kernels.moe(xs, gu, dn, offs, ws, block_m=bm)
    want = reference(xs.float(), gu.float(), dn.float(), offs, ws)
    tol = 1e-5 if dtype == torch.float32 else 2e-2     # (the interpreter truncates fp32 -> bf16; GPUs round)
    err = float((got.float() - want).abs().max() / want.abs().max())
    assert got.dtype == dtype and got.shape == (T * k, H) and err <= tol, (n, E, H, I, T, k, bm, err)
print("ok")
"""

CASES = {
    # uneven groups, empty experts (first, middle, last), odd widths, BM chosen by size (16 here)
    "small_blocks": [[5, 40, 24, 13, 2, None, "float32", [0, 9, 0, 17, 0]],
                     [4, 72, 67, 6, 1, None, "float32", [1, 0, 3, 2]],     # H, I > 64: two tiles and two K steps
                     [4, 24, 12, 1, 1, None, "float32", [0, 0, 1, 0]],     # one token, k = 1
                     [4, 24, 12, 1, 2, None, "float32", [1, 0, 0, 1]],     # one token, k = 2
                     [6, 40, 24, 9, 2, 16, "bfloat16", None]],
    # groups of several blocks; the size-chosen BM 64 (>32 rows per expert) and a forced 128
    "large_blocks": [[3, 40, 20, 100, 1, None, "float32", [70, 0, 30]],
                     [2, 36, 70, 75, 2, 128, "float32", [0, 150]],
                     [3, 24, 12, 45, 2, 16, "float32", [50, 1, 39]]],
}


@pytest.mark.skipif(not kernels.triton_installed(), reason="triton is not installed")
@pytest.mark.parametrize("cases", sorted(CASES))
def test_fused_moe_in_the_interpreter(cases):
    """kernels.moe (both kernels, the device-side blocks, masks on every edge) against an fp32 loop over experts."""
    r = subprocess.run([sys.executable, "-c", INTERPRETED, json.dumps(CASES[cases])], capture_output=True,
                       text=True, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not kernels.triton_installed(), reason="needs CUDA and triton")
def test_fused_moe_equals_grouped_mm_on_cuda(monkeypatch):
    """bf16 on a GPU at the 26B-A4B expert sizes: the fused kernels and torch._grouped_mm both stay close to fp32;
    Experts picks the fused path with DGEMMA_MOE=fused and not without; a CUDA graph replays the fused step exactly."""
    monkeypatch.setenv("DGEMMA_MOE", "fused")
    E, H, I, k = 128, 2816, 704, 8
    f32 = _experts(E, H, I, k).cuda()
    b16 = copy.deepcopy(f32).to(torch.bfloat16)
    g = torch.Generator(device="cuda").manual_seed(0)
    with torch.inference_mode():
        for T in (1, 256, 2048):                          # an AR step, a denoiser step, a batch of 8 canvases
            x = torch.randn(T, H, device="cuda", generator=g)
            idx = torch.rand(T, E - 4, device="cuda", generator=g).topk(k, dim=-1).indices   # 4 experts get none
            w = torch.rand(T, k, device="cuda", generator=g)
            want = f32(x, w, idx)                          # fp32 on CUDA: the per-expert loop
            xb = x.bfloat16()
            assert b16._fused_ok(xb)
            fused = b16(xb, w, idx)
            monkeypatch.delenv("DGEMMA_MOE")
            assert not b16._fused_ok(xb) and b16._grouped_ok(xb)
            grouped = b16(xb, w, idx)
            monkeypatch.setenv("DGEMMA_MOE", "fused")
            assert _rel(fused, want) < 1e-2 and _rel(grouped, want) < 1e-2, (T, _rel(fused, want), _rel(grouped, want))
            assert _rel(fused, grouped) < 2e-2
        odd = _experts(8, 200, 84, 2).cuda()               # widths _grouped_mm cannot take (rows not 16-byte)
        x = torch.randn(37, 200, device="cuda", generator=g)
        idx = torch.rand(37, 8, device="cuda", generator=g).topk(2, dim=-1).indices
        w = torch.rand(37, 2, device="cuda", generator=g)
        ref = odd(x, w, idx)
        odd.to(torch.bfloat16)
        assert odd._fused_ok(x.bfloat16()) and _rel(odd(x.bfloat16(), w, idx), ref) < 2e-2
        xb = torch.randn(256, H, device="cuda", generator=g, dtype=torch.bfloat16)
        idx = torch.rand(256, E, device="cuda", generator=g).topk(k, dim=-1).indices
        w = torch.rand(256, k, device="cuda", generator=g)
        eager = b16(xb, w, idx)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = b16(xb, w, idx)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, eager)
