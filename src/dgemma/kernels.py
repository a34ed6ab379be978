"""Triton kernels (CUDA; also run on the CPU by Triton's interpreter, TRITON_INTERPRET=1, for tests).

Knows: `qmm`, one weight-only quantized matmul for dense layers and for experts. Rows arrive sorted by expert
with group ends `offs` (as model.Experts.group makes them); each program takes a block of up to BM rows of one
expert and BN output columns, loads the int8 / fp8 / int4 codes of its weight tile, dequantizes them in
registers and accumulates in fp32. Block ownership is computed on the device (no host sync), so a step with
quantized experts can be captured in a CUDA graph. Does not know: the stored layout's origin (quant.py).
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
    ends = (torch.full((1,), T, dtype=torch.int32, device=x.device) if offs is None
            else offs.to(device=x.device, dtype=torch.int32))
    BM = 16 if T <= 16 * E else 64
    BN, BK = 64, 64
    # block b of the padded groups -> its expert (E: none) and first row, computed on the device
    counts = ends - torch.cat([ends.new_zeros(1), ends[:-1]])
    nblk = (counts + BM - 1) // BM
    blk_end = torch.cumsum(nblk, 0)
    max_blocks = triton.cdiv(T, BM) + E
    b = torch.arange(max_blocks, device=x.device, dtype=torch.int32)
    blk_e = torch.searchsorted(blk_end, b, right=True).to(torch.int32)
    e_c = blk_e.clamp(max=E - 1).long()
    blk_row = (ends[e_c] - counts[e_c] + (b - (blk_end - nblk)[e_c]) * BM).to(torch.int32)
    out = torch.empty(T, N, dtype=x.dtype, device=x.device)
    grid = (max_blocks, triton.cdiv(N, BN))
    kernel[grid](x, q, s, z, out, blk_e, blk_row, ends, N, K, E, x.stride(0), q.stride(0), q.stride(1),
                 s.stride(0), s.stride(1), out.stride(0), INT4=weights == "int4",
                 F32DOT=x.dtype == torch.float32 or os.environ.get("TRITON_INTERPRET") == "1", G=group or 1, BM=BM, BN=BN, BK=BK)
    return out
