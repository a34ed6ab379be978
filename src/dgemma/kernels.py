"""Triton kernels (CUDA; also run on the CPU by Triton's interpreter, TRITON_INTERPRET=1, for tests).

Knows: matmuls over rows sorted by expert with group ends `offs` (as model.Experts.group makes them). Each
program takes a block of up to BM rows of one expert and BN output columns; which expert and rows a block owns
is computed on the device (`_blocks`: cumsum / searchsorted, no host sync, a launch grid fixed by the shapes),
so a step that runs them can be captured in a CUDA graph.
  * `qmm`: one weight-only quantized matmul for dense layers and for experts; loads the int8 / fp8 / int4
    codes of its weight tile, dequantizes them in registers and accumulates in fp32.
  * `moe`: the unquantized (bf16 / fp16; fp32 for tests) mixture-of-experts MLP in two kernels: gate and up
    projections with GELU-tanh(gate) * up in the epilogue, then the down projection times each row's routing
    weight. Opt-in until it has been measured on a GPU: model.Experts uses it on CUDA with DGEMMA_MOE=fused in
    the environment, and the two torch._grouped_mm calls otherwise.
Does not know: the stored layout's origin (quant.py), routing or the combine of each token's k rows (model.py).
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.cache
def available() -> bool:
    """Triton is installed and has somewhere to run (a CUDA device, or the interpreter)."""
    return triton_installed() and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")


def moe_enabled() -> bool:
    """The fused MoE kernels are wanted: DGEMMA_MOE=fused (the default, torch._grouped_mm, stays until the fused
    path has run on a GPU); read on every call so one process can time both."""
    return os.environ.get("DGEMMA_MOE", "grouped") == "fused"


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _blocks(ends: torch.Tensor, rows: int, BM: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Block ownership, on the device: rows [0, rows) in expert groups with ends `ends` [E] int32, cut into
    blocks of up to BM rows of one expert. -> blk_e [nb] int32 (the block's expert; E for a spare block, which
    does nothing) and blk_row [nb] int32 (its first row). nb = cdiv(rows, BM) + min(E, rows) bounds the number
    of blocks (each non-empty group adds at most one partial block) and depends only on shapes: no host sync."""
    E = ends.shape[0]
    counts = ends - torch.cat([ends.new_zeros(1), ends[:-1]])                     # [E] rows per expert
    nblk = (counts + BM - 1) // BM                                                # [E] blocks per expert
    blk_end = torch.cumsum(nblk, 0)                                               # [E]
    b = torch.arange(-(-rows // BM) + min(E, rows), device=ends.device, dtype=torch.int32)   # [nb]
    blk_e = torch.searchsorted(blk_end, b, right=True).to(torch.int32)            # [nb]
    e_c = blk_e.clamp(max=E - 1).long()
    blk_row = (ends[e_c] - counts[e_c] + (b - (blk_end - nblk)[e_c]) * BM).to(torch.int32)
    return blk_e, blk_row


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def qmm_kernel(x_ptr, q_ptr, s_ptr, z_ptr, out_ptr, blk_e_ptr, blk_row_ptr, ends_ptr,
                   N, K, E, sxm, sqe, sqn, sse, ssn, som,
                   INT4: tl.constexpr, F32DOT: tl.constexpr, G: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        pid_b, pid_n = tl.program_id(0), tl.program_id(1)
        e = tl.load(blk_e_ptr + pid_b)
        if e < E:
            r0 = tl.load(blk_row_ptr + pid_b)
            r1 = tl.load(ends_ptr + e)
            rows = r0 + tl.arange(0, BM)
            cols = pid_n * BN + tl.arange(0, BN)
            rmask, nmask = rows < r1, cols < N
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            for k0 in range(0, K, BK):
                ks = k0 + tl.arange(0, BK)
                kmask = ks < K
                a = tl.load(x_ptr + rows[:, None] * sxm + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
                wmask = kmask[:, None] & nmask[None, :]
                if INT4:
                    byte = tl.load(q_ptr + e * sqe + cols[None, :] * sqn + (ks // 2)[:, None], mask=wmask, other=0)
                    code = (byte.to(tl.int32) >> ((ks % 2) * 4)[:, None]) & 15
                    soff = e * sse + cols[None, :] * ssn + (ks // G)[:, None]
                    s = tl.load(s_ptr + soff, mask=wmask, other=0.0).to(tl.float32)
                    z = tl.load(z_ptr + soff, mask=wmask, other=0.0).to(tl.float32)
                    w = (code.to(tl.float32) - 8.0) * s + z
                else:
                    w = tl.load(q_ptr + e * sqe + cols[None, :] * sqn + ks[:, None], mask=wmask, other=0.0)
                    w = w.to(tl.float32)
                if F32DOT:   # fp32 inputs, or the interpreter (whose bf16 dot is wrong)
                    acc += tl.dot(a.to(tl.float32), w, input_precision="ieee")   # not TF32
                else:        # tensor cores: codes dequantized to the activation dtype
                    acc += tl.dot(a, w.to(a.dtype))
            if not INT4:   # one scale per output row of the weight: applied once, after the sum
                acc = acc * tl.load(s_ptr + e * sse + cols, mask=nmask, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptr + rows[:, None] * som + cols[None, :], acc.to(out_ptr.dtype.element_ty),
                     mask=rmask[:, None] & nmask[None, :])

    return triton, qmm_kernel


def qmm(x: torch.Tensor, t: dict[str, torch.Tensor], weights: str, group: int | None,
        offs: torch.Tensor | None) -> torch.Tensor:
    """x [T, K] @ W_e^T per row group -> [T, N] in x's dtype. t: the stored layout (quant.py) of a 2-D weight
    (offs None) or of E experts [E, N, ..] with offs [E] the end of each expert's rows in x."""
    triton, kernel = _kernel()
    x = x.contiguous()
    q, s = t["qdata"], t["scale"]
    if q.dim() == 2:
        q, s = q[None], s[None]
    z = t.get("zero")
    z = s if z is None else (z if z.dim() == 3 else z[None])
    E, N = q.shape[0], q.shape[1]
    T, K = x.shape
    out = torch.empty(T, N, dtype=x.dtype, device=x.device)
    if T == 0:
        return out
    ends = (torch.full((1,), T, dtype=torch.int32, device=x.device) if offs is None
            else offs.to(device=x.device, dtype=torch.int32))
    BM = 16 if T <= 16 * E else 64
    BN, BK = 64, 64
    blk_e, blk_row = _blocks(ends, T, BM)
    grid = (blk_e.shape[0], triton.cdiv(N, BN))
    kernel[grid](x, q, s, z, out, blk_e, blk_row, ends, N, K, E, x.stride(0), q.stride(0), q.stride(1),
                 s.stride(0), s.stride(1), out.stride(0), INT4=weights == "int4",
                 F32DOT=x.dtype == torch.float32 or _interpreted(), G=group or 1, BM=BM, BN=BN, BK=BK)
    return out


# ---- the unquantized MoE MLP --------------------------------------------------------------------------------
@functools.cache
def _moe_kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def gate_up_kernel(x_ptr, w_ptr, h_ptr, blk_e_ptr, blk_row_ptr, ends_ptr, I, K, E, sxm, swe, swn, shm,
                       F32DOT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        """h[rows, cols] = gelu_tanh(x W_gate^T) * (x W_up^T) for a block of one expert's rows; W = w[e] [2I, K]."""
        pid_b, pid_n = tl.program_id(0), tl.program_id(1)
        e = tl.load(blk_e_ptr + pid_b)
        if e < E:
            r0 = tl.load(blk_row_ptr + pid_b)
            r1 = tl.load(ends_ptr + e)
            rows = r0 + tl.arange(0, BM)                                      # [BM]
            cols = pid_n * BN + tl.arange(0, BN)                              # [BN] in [0, I)
            rmask, nmask = rows < r1, cols < I
            wg = w_ptr + e.to(tl.int64) * swe + cols[None, :] * swn           # [1, BN] gate rows of W
            wu = wg + I * swn                                                 # the matching up rows
            gate = tl.zeros((BM, BN), dtype=tl.float32)
            up = tl.zeros((BM, BN), dtype=tl.float32)
            for k0 in range(0, K, BK):
                ks = k0 + tl.arange(0, BK)                                    # [BK]
                kmask = ks < K
                a = tl.load(x_ptr + rows[:, None].to(tl.int64) * sxm + ks[None, :],
                            mask=rmask[:, None] & kmask[None, :], other=0.0)  # [BM, BK]
                wmask = kmask[:, None] & nmask[None, :]
                g = tl.load(wg + ks[:, None], mask=wmask, other=0.0)          # [BK, BN] = W_gate^T tile
                u = tl.load(wu + ks[:, None], mask=wmask, other=0.0)
                if F32DOT:   # fp32 inputs, or the interpreter (whose bf16 dot is wrong)
                    a = a.to(tl.float32)
                    gate += tl.dot(a, g.to(tl.float32), input_precision="ieee")
                    up += tl.dot(a, u.to(tl.float32), input_precision="ieee")
                else:
                    gate += tl.dot(a, g)
                    up += tl.dot(a, u)
            # gelu_tanh(g) = g * (1 + tanh(z)) / 2 = g * sigmoid(2z), z = sqrt(2/pi) (g + 0.044715 g^3)
            z = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
            h = gate * tl.sigmoid(2.0 * z) * up
            tl.store(h_ptr + rows[:, None].to(tl.int64) * shm + cols[None, :], h.to(h_ptr.dtype.element_ty),
                     mask=rmask[:, None] & nmask[None, :])

    @triton.jit
    def down_kernel(h_ptr, w_ptr, ws_ptr, y_ptr, blk_e_ptr, blk_row_ptr, ends_ptr, N, K, E, shm, swe, swn, sym,
                    F32DOT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        """y[rows, cols] = (h W^T) * ws[rows] for a block of one expert's rows; W = w[e] [N, K]."""
        pid_b, pid_n = tl.program_id(0), tl.program_id(1)
        e = tl.load(blk_e_ptr + pid_b)
        if e < E:
            r0 = tl.load(blk_row_ptr + pid_b)
            r1 = tl.load(ends_ptr + e)
            rows = r0 + tl.arange(0, BM)                                      # [BM]
            cols = pid_n * BN + tl.arange(0, BN)                              # [BN] in [0, N)
            rmask, nmask = rows < r1, cols < N
            wp = w_ptr + e.to(tl.int64) * swe + cols[None, :] * swn           # [1, BN]
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            for k0 in range(0, K, BK):
                ks = k0 + tl.arange(0, BK)
                kmask = ks < K
                a = tl.load(h_ptr + rows[:, None].to(tl.int64) * shm + ks[None, :],
                            mask=rmask[:, None] & kmask[None, :], other=0.0)  # [BM, BK]
                w = tl.load(wp + ks[:, None], mask=kmask[:, None] & nmask[None, :], other=0.0)   # [BK, BN]
                if F32DOT:
                    acc += tl.dot(a.to(tl.float32), w.to(tl.float32), input_precision="ieee")
                else:
                    acc += tl.dot(a, w)
            acc = acc * tl.load(ws_ptr + rows, mask=rmask, other=0.0).to(tl.float32)[:, None]   # routing weight
            tl.store(y_ptr + rows[:, None].to(tl.int64) * sym + cols[None, :], acc.to(y_ptr.dtype.element_ty),
                     mask=rmask[:, None] & nmask[None, :])

    return triton, gate_up_kernel, down_kernel


def moe_block_rows(rows: int, experts: int) -> int:
    """BM for `moe` by the mean rows per expert: 16 for decoding-sized groups (a 26B-A4B denoiser step at batch 1
    sends ~16 rows to each expert), 64 / 128 for large batches (~2,000 rows per expert). Untuned: thresholds
    and tile sizes wait for a GPU run."""
    per = rows / max(1, experts)
    return 16 if per <= 32 else 64 if per <= 512 else 128


def moe(xs: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, offs: torch.Tensor, w_slot: torch.Tensor,
        block_m: int | None = None) -> torch.Tensor:
    """The experts' MLP on rows sorted by expert, in two kernels (no host sync: CUDA-graph capturable).
    xs [M, H]; gate_up [E, 2I, H] (rows [0, I) gate, [I, 2I) up); down [E, H, I]; offs [E] each expert's group
    end in xs; w_slot [M] each row's routing weight. -> y [M, H] in xs's dtype,
        y_r = w_r * down_e(gelu_tanh(gate_e xs_r) * up_e xs_r)   for row r of expert e.
    Numerics: fp32 accumulation; gelu_tanh(gate) * up in fp32, rounded once to xs's dtype as h [M, I]; the
    down projection's fp32 sum is multiplied by the fp32 weight and rounded once (torch._grouped_mm rounds the
    projections and the GELU product separately, then multiplies the rounded y by w: not bit-identical).
    block_m overrides the rows per block (tests)."""
    triton, gate_up_kernel, down_kernel = _moe_kernels()
    M, H = xs.shape
    E, I = down.shape[0], down.shape[2]
    assert gate_up.shape == (E, 2 * I, H) and down.shape == (E, H, I), (gate_up.shape, down.shape)
    assert gate_up.dtype == down.dtype == xs.dtype, "activations and weights share one dtype"
    y = torch.empty(M, H, dtype=xs.dtype, device=xs.device)                    # [M, H]
    if M == 0:
        return y
    xs, gate_up, down = xs.contiguous(), gate_up.contiguous(), down.contiguous()   # no-ops for parameters
    ends = offs.to(device=xs.device, dtype=torch.int32)                          # [E]
    BM = block_m or moe_block_rows(M, E)
    BN, BK = 64, 64                       # untuned (as are num_warps and the stages): pick on a GPU run
    warps = 4 if BM <= 64 else 8
    blk_e, blk_row = _blocks(ends, M, BM)                                        # [nb], [nb]
    f32dot = xs.dtype == torch.float32 or _interpreted()
    h = torch.empty(M, I, dtype=xs.dtype, device=xs.device)                      # [M, I]
    gate_up_kernel[(blk_e.shape[0], triton.cdiv(I, BN))](
        xs, gate_up, h, blk_e, blk_row, ends, I, H, E, xs.stride(0), gate_up.stride(0), gate_up.stride(1),
        h.stride(0), F32DOT=f32dot, BM=BM, BN=BN, BK=BK, num_warps=warps)
    down_kernel[(blk_e.shape[0], triton.cdiv(H, BN))](
        h, down, w_slot.contiguous(), y, blk_e, blk_row, ends, H, I, E, h.stride(0), down.stride(0),
        down.stride(1), y.stride(0), F32DOT=f32dot, BM=BM, BN=BN, BK=BK, num_warps=warps)
    return y
