"""Triton kernels (CUDA; also run on the CPU by Triton's interpreter, TRITON_INTERPRET=1, for tests).

Knows: matmuls over rows sorted by expert with group ends `offs` (as model.Experts.group makes them). Each
program takes a block of up to BM rows of one expert and BN output columns; which expert and rows a block owns
each program works out itself from the group ends (triton_kernels.block_of: a cumsum over E entries; no host
sync, no extra launch, a launch grid fixed by the shapes), so a step that runs them can be captured in a CUDA graph.
  * `qmm`: one weight-only quantized matmul for dense layers and for experts; loads the int8 / fp8 / int4
    codes of its weight tile, dequantizes them in registers and accumulates in fp32.
  * `moe`: the unquantized (bf16 / fp16; fp32 for tests) mixture-of-experts MLP and the combine of each
    token's k outputs in three kernels: gate and up projections with GELU-tanh(gate) * up in the epilogue
    (reading each row's token from x itself), the down projection times each row's routing weight (written back
    to the row's (token, k) slot), then the sum of each token's k rows in ascending expert order. model.Experts
    uses it on CUDA with DGEMMA_FUSED=moe (or all), and two torch._grouped_mm calls and ~20 gathers / adds
    otherwise. `mlp`: the same first two kernels on one dense matrix (model.GatedMLP, DGEMMA_FUSED=mlp).
  * `sampler_rows`: the fast sampler's pass over a chunk of raw head logits (softcap, temperature, max / argmax,
    exp, normaliser, entropy, block sums for the inverse-CDF draw) in one kernel: two reads of the logits and
    one write of e, instead of ~10 torch passes over fp32 [rows, V]; then `sample_search`, the inverse-CDF
    draw from its block sums, in one more (instead of ~25 small torch ops). generate.denoise_step uses them
    (through sampling.fused_rows) with DGEMMA_FUSED=sampler.
  * `norm_rope`: the attention's q / k / v epilogue (RMSNorm of each head, RoPE on q and k, the weightless norm
    of v) in one kernel instead of 13 per layer; model.Attention uses it on CUDA with DGEMMA_FUSED=rope.
  * `route_order`: a decoding step's routing slots sorted by expert in one program (T * k <= 128); `route` can
    do the same sort in its own launch, or for up to 1,024 tokens in one more launch (`place_kernel`).
  * `post_attention`, `route`, `post_ffn`: the rest of a layer around its matmuls (post-attention norm and
    residual add, the three pre-norms, the router's softmax / top-k / renormalisation / expert scales, the
    post-FFN norms, residual add and layer scalar) in three kernels instead of 19; model.Layer uses them
    on CUDA with DGEMMA_FUSED=norms (with moe too, post_ffn also does the experts' combine).
  * `linear`: a decoding step's projections (at most 16 rows) through the dense down-projection kernel, one
    launch where cuBLAS runs a split-K GEMV and its reduction; model.linear uses it with DGEMMA_FUSED=gemv.
And one path without Triton: `qkv`, the q, k (and v) projections as one GEMM over weights packed back to back
(model.Attention.packed_weight). Every fused path is opt-in (`fused(name)`, DGEMMA_FUSED=moe,mlp,sampler,rope,
norms,qkv,gemv or all) until a GPU run has measured it.
Does not know: the stored layout's origin (quant.py), routing and when the fused paths apply (model.py), the
sampling rule (sampling.py).
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


FUSIBLE = ("moe", "mlp", "sampler", "rope", "norms", "qkv", "gemv")
TORCH_ONLY = ("qkv",)    # no Triton in them: they run wherever torch does (so `all` changes CPU rounding too)


def fused_choice() -> str:
    """The opt-in kernel choice as set now (DGEMMA_FUSED), for keys of anything that captures a path."""
    return os.environ.get("DGEMMA_FUSED", "")


def fused(name: str, x: torch.Tensor) -> bool:
    """Kernel `name` (one of FUSIBLE) is wanted and can run on x's device: named in DGEMMA_FUSED
    (comma-separated, or "all"), and (a Triton kernel) Triton installed and x on CUDA (or any device under
    Triton's interpreter); TORCH_ONLY names run anywhere. Every fused path is opt-in until a GPU run has
    measured it; read on every call, so one process can time both paths."""
    return name in fused_names(fused_choice()) and (
        name in TORCH_ONLY or (available() and (x.is_cuda or _interpreted())))


def autotune_choice() -> str:
    """DGEMMA_AUTOTUNE: "quick" (unset or empty: a short list of tiles), "full" (all of them) or "0" (the default
    tile, no autotuning); see triton_kernels.moe_configs. Anything else raises ValueError."""
    choice = os.environ.get("DGEMMA_AUTOTUNE") or "quick"
    if choice not in ("quick", "full", "0"):
        raise ValueError(f"DGEMMA_AUTOTUNE={choice!r}: quick (the default), full or 0")
    return choice


@functools.cache
def fused_names(want: str) -> frozenset[str]:
    """A DGEMMA_FUSED value parsed: "all", or names of FUSIBLE separated by commas (empty: none). A name it does
    not know raises ValueError: a typo would otherwise time or serve the default path without a word."""
    if want.strip() == "all":
        return frozenset(FUSIBLE)
    names = {w.strip() for w in want.split(",")} - {""}
    unknown = sorted(names - set(FUSIBLE))
    if unknown:
        raise ValueError(f"DGEMMA_FUSED={want!r}: unknown kernel {', '.join(unknown)} "
                         f"(a comma list of {', '.join(FUSIBLE)}; or all)")
    return frozenset(names)


def _pow2(n: int) -> int:
    """The block width for n entries: the next power of two, at least 16."""
    return max(16, 1 << (n - 1).bit_length())


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _spans(rows: int, BM: int, E: int) -> int:
    """Programs along the rows for `rows` rows in E expert groups cut into blocks of up to BM rows of one expert
    (triton_kernels.block_of numbers them): cdiv(rows, BM) + min(E, rows) bounds the blocks (each non-empty group
    adds at most one partial block) and depends only on shapes, so a launch grid made from it needs no host sync.
    E = 0: one dense matrix, cdiv(rows, BM) blocks."""
    return -(-rows // BM) + min(E, rows)


@functools.cache
def _kernels():
    """The Triton kernels (triton_kernels.py), imported on first use: importing this module does not import triton."""
    from . import triton_kernels
    return triton_kernels



def qmm(x: torch.Tensor, t: dict[str, torch.Tensor], weights: str, group: int | None,
        offs: torch.Tensor | None) -> torch.Tensor:
    """x [T, K] @ W_e^T per row group -> [T, N] in x's dtype. t: the stored layout (quant.py) of a 2-D weight
    (offs None) or of E experts [E, N, ..] with offs [E] the end of each expert's rows in x."""
    kernel = _kernels().qmm_kernel
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
    dense = offs is None
    ends = out if dense else offs.to(device=x.device, dtype=torch.int32)        # (dense: unused)
    BM = 16 if T <= 16 * E else 64
    BN, BK = 64, 64
    grid = (_spans(T, BM, 0 if dense else E), -(-N // BN))
    kernel[grid](x, q, s, z, out, ends, T, N, K, E, x.stride(0), q.stride(0), q.stride(1),
                 s.stride(0), s.stride(1), out.stride(0), INT4=weights == "int4",
                 F32DOT=x.dtype == torch.float32 or _interpreted(), G=group or 1, DENSE=dense, BE=_pow2(E),
                 BM=BM, BN=BN, BK=BK)
    return out


# ---- the unquantized MoE MLP --------------------------------------------------------------------------------
ROUTE_ORDER_MAX = 128     # routing slots route_order sorts in one program (an AR step up to batch 16 at k = 8)


def _by_expert(slots: int, experts: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty (order [slots] int64, offs [experts] int32): what the sorting kernels fill."""
    return (torch.empty(slots, dtype=torch.int64, device=device),
            torch.empty(experts, dtype=torch.int32, device=device))


def route_order(idx: torch.Tensor, experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing of a decoding step sorted by expert in one launch (instead of torch.sort, an arange and
    searchsorted): idx [T, k] with T * k <= ROUTE_ORDER_MAX -> order [T*k] int64 (the slots t * k + j sorted by
    expert, stable: torch.sort's), offs [E] int32 (each expert's group end)."""
    M = idx.numel()
    assert M <= ROUTE_ORDER_MAX, M
    order, offs = _by_expert(M, experts, idx.device)
    _kernels().route_order_kernel[(1,)](idx.contiguous(), order, offs, M, experts, BMS=_pow2(M), BE=_pow2(experts))
    return order, offs


def moe_block_rows(rows: int, experts: int) -> int:
    """BM for `moe` / `mlp` by the mean rows per expert: 16 for decoding-sized groups (a 26B-A4B denoiser step at
    batch 1 sends ~16 rows to each expert), 64 above. Not 128: compiled for sm_90 (scripts/compile_kernels.py),
    the gate/up kernel (two fp32 accumulators) spills registers in every one of its tile configurations at
    BM 128, and in all but 3 at BM 64. Untuned otherwise: thresholds and tile sizes wait for a GPU run."""
    per = rows / max(1, experts)
    return 16 if per <= 32 else 64


def moe(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, idx: torch.Tensor, w: torch.Tensor,
        order: torch.Tensor, offs: torch.Tensor, block_m: int | None = None, combined: bool = True) -> torch.Tensor:
    """The experts' MLP and the combine of each token's k expert outputs, in three kernels and no host sync (CUDA
    graphs can capture it). x [T, H]; gate_up [E, 2I, H] (rows [0, I) gate, [I, 2I) up); down [E, H, I];
    idx [T, k] each token's experts (distinct), w [T, k] their routing weights; order [T*k]: the (token, k) slots
    t * k + j sorted by expert (stable), offs [E] each expert's group end in that order (model.Experts.sort).
    -> [T, H] in x's dtype,
        y_tj = w_tj * down_e(gelu_tanh(gate_e x_t) * up_e x_t)   for e = idx[t, j],
        out_t = the y_tj added in ascending expert order, each partial sum rounded to x's dtype;
    or (combined=False) the rows y [T*k, H] at their slots t * k + j, for `post_ffn` to add (one launch fewer).
    The kernels: gate and up projections with gelu_tanh(gate) * up in the epilogue, reading each sorted row's
    token straight from x; the down projection times the routing weight, each row written back to its slot; the
    combine. Tiles: rows per block by moe_block_rows (or block_m, for tests), the rest autotuned on the GPU at
    first use (triton_kernels.moe_configs; DGEMMA_AUTOTUNE=0 pins the default).
    Numerics: fp32 accumulation; gelu_tanh(gate) * up in fp32, rounded once to x's dtype as h [T*k, I]; the down
    projection's fp32 sum times the fp32 weight, rounded once (torch._grouped_mm rounds the projections and
    the GELU product separately, then multiplies the rounded y by w: not bit-identical); the combine as
    model.gather_sum (bit for bit, given the same y)."""
    k = idx.shape[1]
    E, I = down.shape[0], down.shape[2]
    assert gate_up.shape[:2] == (E, 2 * I), (gate_up.shape, down.shape)
    y = _mlp(x, gate_up[:, :I], gate_up[:, I:], down, order, offs, w, k, block_m)   # [T*k, H] in slot order
    return combine(y, idx) if combined else y


def combine(y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Each token's k rows of y [T*k, H] (slot t * k + j for expert idx[t, j]) added in ascending expert order,
    each partial sum rounded to y's dtype, in one kernel: model.gather_sum's result (which takes the rows in expert
    order), bit for bit. -> [T, H]."""
    T, k = idx.shape
    H = y.shape[1]
    out = torch.empty(T, H, dtype=y.dtype, device=y.device)
    BH = min(_pow2(H), 1024)
    if T:
        _kernels().combine_kernel[(T, -(-H // BH))](y, idx.contiguous(), out, H, y.stride(0), out.stride(0),
                                                     KTOP=k, BK=_pow2(k), BH=BH)
    return out


def mlp(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """The dense gated MLP down(gelu_tanh(gate x) * up x) in two kernels (the experts' kernels on one matrix):
    x [T, H], gate and up [I, H], down [H, I] -> [T, H] in x's dtype; numerics as `moe` (h rounded once)."""
    return _mlp(x, gate[None], up[None], down[None], None, None, None, 1, None)


GEMV_MAX_ROWS = 16       # rows `linear` takes (a decoding step up to batch 16; one block of BM 16)


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [.., K] @ w^T for w [N, K] (rows contiguous, x's dtype), no bias, for at most GEMV_MAX_ROWS rows, in one
    launch: the dense down-projection kernel, whose narrow autotuned column tiles spread the weight stream over
    the SMs (where cuBLAS runs a split-K GEMV and a second kernel for its reduction). -> [.., N] in x's dtype."""
    K, N = x.shape[-1], w.shape[0]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    assert M <= GEMV_MAX_ROWS and w.shape[1] == K and w.stride(1) == 1 and w.dtype == x.dtype, (x.shape, w.shape)
    x2 = x2 if x2.stride(1) == 1 else x2.contiguous()
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)                      # [M, N]
    if M:
        _kernels().down_kernel[lambda meta: (1, -(-N // meta["BN"]))](
            x2, w, y, y, y, y, M, N, K, 1, x2.stride(0), w.numel(), w.stride(0), y.stride(0), DENSE=True,
            F32DOT=x.dtype == torch.float32 or _interpreted(), BE=16, BM=16)
    return y.view(*x.shape[:-1], N)


def _mlp(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, order: torch.Tensor | None,
         offs: torch.Tensor | None, w: torch.Tensor | None, k: int, block_m: int | None) -> torch.Tensor:
    """`moe` without the combine, or (order None) `mlp`: gate, up [E, I, H] (same strides), down [E, H, I]
    -> y [rows, H]: rows = T * k slot rows (each at its slot, weighted) or the T rows of x."""
    kern = _kernels()
    T, H = x.shape
    E, I = down.shape[0], down.shape[2]
    dense = order is None
    M = T if dense else T * k
    assert gate.shape == up.shape == (E, I, H) and gate.stride() == up.stride() and down.shape == (E, H, I)
    assert gate.dtype == down.dtype == x.dtype, "activations and weights share one dtype"
    assert gate.stride(2) == down.stride(2) == 1 and x.stride(1) == 1
    y = torch.empty(M, H, dtype=x.dtype, device=x.device)                       # [M, H]
    if M == 0:
        return y
    ends = y if dense else offs.to(device=x.device, dtype=torch.int32)           # [E] (dense: unused)
    order = y if dense else order.contiguous()
    ws = y if dense else w.reshape(-1).contiguous()                              # [T*k] slot order
    BM = block_m or moe_block_rows(M, E)
    nb = _spans(M, BM, 0 if dense else E)
    f32dot = x.dtype == torch.float32 or _interpreted()
    h = torch.empty(M, I, dtype=x.dtype, device=x.device)                       # [M, I] sorted order
    # BN, BK, warps and stages: triton.autotune picks them per (width, depth, BM) on first use (moe_configs)
    kern.gate_up_kernel[lambda meta: (nb, -(-I // meta["BN"]))](
        x, gate, up, h, order, ends, M, I, H, E, k, x.stride(0), gate.stride(0), gate.stride(1), h.stride(0),
        DENSE=dense, F32DOT=f32dot, BE=_pow2(E), BM=BM)
    kern.down_kernel[lambda meta: (nb, -(-H // meta["BN"]))](
        h, down, ws, y, order, ends, M, H, I, E, h.stride(0), down.stride(0), down.stride(1), y.stride(0),
        DENSE=dense, F32DOT=f32dot, BE=_pow2(E), BM=BM)
    return y


# ---- the fast sampler's pass over the logits ----------------------------------------------------------------
def sampler_rows(x: torch.Tensor, temp: torch.Tensor, cap: float | None, block: int,
                 e_dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Raw head logits x [n, V] (any float dtype, before the softcap) and temperatures temp [n] fp32, in one
    kernel that reads x twice and writes e once -> (argmax [n] int64, Z [n], entropy [n], e [n, V] in e_dtype,
    block sums [n, ceil(V / block)] fp32), all statistics of lam = softcap(x) / T in fp32:
    e = exp(lam - max lam), Z = sum e, entropy of softmax(lam), and the sums of e over blocks of `block`
    entries (what sampling.inverse_cdf searches first). The softcap's tanh is 2 sigmoid(2y) - 1, so values
    differ from torch.tanh by rounding."""
    k = _kernels()
    n, V = x.shape
    x = x.contiguous()
    BV = max(block, 2048)
    assert BV % block == 0 and block & (block - 1) == 0, "block must be a power of two"
    amax = torch.empty(n, dtype=torch.int32, device=x.device)
    z = torch.empty(n, dtype=torch.float32, device=x.device)
    ent = torch.empty(n, dtype=torch.float32, device=x.device)
    e = torch.empty(n, V, dtype=e_dtype, device=x.device)
    bsum = torch.empty(n, -(-V // block), dtype=torch.float32, device=x.device)
    if n:
        k.sampler_rows_kernel[(n,)](x, temp.float().contiguous(), e, amax, z, ent, bsum, V, x.stride(0), e.stride(0),
                             bsum.stride(0), float(cap or 1.0), CAP=bool(cap), BV=BV, BS=block, num_warps=8)
    return amax.long(), z, ent, e, bsum


def sample_search(x: torch.Tensor, temp: torch.Tensor, cap: float | None, amax: torch.Tensor, bsum: torch.Tensor,
                  u: torch.Tensor, block: int) -> torch.Tensor:
    """The draw of sampling.two_level_search in one kernel, from sampler_rows' outputs: raw logits x [n, V],
    temperatures temp [n] fp32, argmax [n], block sums bsum [n, nb] (blocks of `block` entries), uniforms u [n]
    -> sampled ids [n] int64 (the same formulas: cumulative block sums, then one block's e recomputed from x)."""
    n, V = x.shape
    nb = bsum.shape[1]
    out = torch.empty(n, dtype=torch.int32, device=x.device)
    if n:
        _kernels().sample_search_kernel[(n,)](
            x.contiguous(), temp.float().contiguous(), amax.contiguous(), bsum.contiguous(), u.float().contiguous(),
            out, V, nb, x.stride(0), bsum.stride(0), float(cap or 1.0), CAP=bool(cap), NB=_pow2(nb), BS=block)
    return out.long()


# ---- the attention's q / k / v epilogue ---------------------------------------------------------------------
def norm_rope(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, wq: torch.Tensor, wk: torch.Tensor,
              cos: torch.Tensor, sin: torch.Tensor, eps: float, slots: tuple | None = None):
    """q [B, S, Hq, D], k and v [B, S, Hkv, D] straight from their projections (v None: v = the raw k), head
    norm weights wq, wk [D], cos / sin [S, D] or [B, 1, S, D] -> q, k, v [B, H, S, D] (views of [B, S, H, D]
    tensors, the strides the eager path gives): q and k RMS-normed with their weights then roped, v normed
    without a weight. One kernel launch; fp32 inside, each output rounded where the eager path rounds.
    slots = (k_buf, v_buf, first) writes k and v straight into a KV cache instead: k_buf, v_buf [B, Hkv, L, D]
    (same strides), token s of row b at slot first[b] + s (first: [B] int64); then k and v are returned as None."""
    kern = _kernels()
    B, S, HQ, D = q.shape
    HKV = k.shape[2]
    assert D % 2 == 0 and k.shape == (B, S, HKV, D) and (v is None or v.shape == k.shape)
    q2, k2 = q.reshape(B * S, HQ * D), k.reshape(B * S, HKV * D)                # [B*S, H*D] row views
    v2 = k2 if v is None else v.reshape(B * S, HKV * D)
    for t in (q2, k2, v2):
        assert t.stride(1) == 1, "rows must be contiguous"
    cs, sn = cos.reshape(-1, S, D), sin.reshape(-1, S, D)                       # [1 or B, S, D]
    assert cs.stride(2) == 1 and cs.stride() == sn.stride()
    qo = torch.empty(q.shape, dtype=q.dtype, device=q.device)                   # [B, S, HQ, D] contiguous
    if slots is None:
        ko, vo = (torch.empty(k.shape, dtype=k.dtype, device=k.device) for _ in range(2))   # [B, S, HKV, D]
        first, (sob, sos, soh) = qo, ko.stride()[:3]                           # (first: unused)
    else:
        ko, vo, first = slots
        assert ko.shape[:2] == (B, HKV) and ko.shape[3] == D and ko.stride() == vo.stride() and ko.stride(3) == 1
        assert first.shape == (B,) and first.dtype == torch.int64
        sob, soh, sos = ko.stride()[:3]
    if B * S:
        kern.norm_rope_kernel[(B * S, HQ + HKV)](
            q2, k2, v2, wq, wk, cs, sn, qo, ko, vo, first, S, HQ, D, eps, q2.stride(0), k2.stride(0), v2.stride(0),
            cs.stride(0) if cs.shape[0] > 1 else 0, cs.stride(1), HQ * D, sob, soh, sos,
            BH=_pow2(D // 2), SLOTS=slots is not None)
    if slots is not None:
        return qo.transpose(1, 2), None, None
    return qo.transpose(1, 2), ko.transpose(1, 2), vo.transpose(1, 2)


# ---- the layer's norms, residual adds and router maths ------------------------------------------------------
def post_attention(h: torch.Tensor, a: torch.Tensor, w_pa: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                   w_router: torch.Tensor, root: float, eps: float) -> tuple[torch.Tensor, ...]:
    """After the attention's output projection a [.., H], for residual h [.., H], in one kernel:
    r = h + norm(a) * w_pa, and from r the dense MLP's input norm(r) * w1, the experts' input norm(r) * w2
    and the router's input norm(r) * w_router * root. -> (r, x1, x2, z), each [.., H] in h's dtype."""
    H = h.shape[-1]
    h, a = h.contiguous(), a.contiguous()
    r, x1, x2, z = (torch.empty_like(h) for _ in range(4))
    if h.numel():
        _kernels().post_attention_kernel[(h.numel() // H,)](h, a, w_pa, w1, w2, w_router, r, x1, x2, z, H, eps,
                                                              root, BH=_pow2(H), num_warps=8 if H > 1024 else 4)
    return r, x1, x2, z


def post_ffn(r: torch.Tensor, m1: torch.Tensor, m2: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
             w: torch.Tensor, scalar: torch.Tensor, eps: float, w_next: torch.Tensor | None = None,
             idx: torch.Tensor | None = None):
    """The layer's tail in one kernel: h = (r + norm(norm(m1) * w1 + norm(m2) * w2) * w) * scalar, [.., H] in r's
    dtype (m1: the dense MLP's output, m2: the experts', scalar: the layer scalar [1]). With idx [T, k] (T rows of
    r), m2 is instead the experts' k weighted rows per token [T*k, H] (`moe(..., combined=False)`), added here in
    ascending expert order exactly as `combine` adds them: one launch and one [T, H] round trip fewer.
    -> (h, norm(h) * w_next: the next layer's input norm (or the final norm) from the rounded h, as it would
    compute it; None without w_next)."""
    H = r.shape[-1]
    r, m1, m2 = r.contiguous(), m1.contiguous(), m2.contiguous()
    k = 0 if idx is None else idx.shape[1]
    want = r.shape if idx is None else (r.numel() // H * k, H)                  # [.., H], or [T*k, H] slot rows
    assert m2.shape == want and m2.dtype == r.dtype, (m2.shape, m2.dtype, r.shape, r.dtype)
    assert idx is None or idx.shape[0] == r.numel() // H, (idx.shape, r.shape)
    out = torch.empty_like(r)
    nxt = None if w_next is None else torch.empty_like(r)
    if r.numel():
        _kernels().post_ffn_kernel[(r.numel() // H,)](
            r, m1, m2, w1, w2, w, scalar, out, w if nxt is None else w_next, out if nxt is None else nxt,
            m2 if idx is None else idx.contiguous(), H, eps, NEXT=nxt is not None, KTOP=k, BK=_pow2(max(k, 1)),
            BH=_pow2(H), num_warps=8 if H > 1024 else 4)
    return out, nxt


ROUTE_PLACE_MAX = 64      # route programs (16 tokens each) whose slots place_kernel sorts: 1,024 tokens


def route(logits: torch.Tensor, k: int, per_expert_scale: torch.Tensor,
          sort: bool = False) -> tuple[torch.Tensor, torch.Tensor, tuple | None]:
    """Router logits [T, E] -> (weights [T, k] fp32, expert ids [T, k] int64, sorted), as model.Router computes
    them (softmax in fp32, top k in descending order, renormalised, times each expert's scale), in one kernel.
    sort: also the slots t * k + j sorted by expert, sorted = (order [T*k] int64, offs [E] int32), as
    route_order (torch.sort(stable=True) and searchsorted) gives them: with T * k <= ROUTE_ORDER_MAX in the same
    single-program launch; with up to ROUTE_PLACE_MAX * 16 tokens in one more launch (place_kernel, from counts the
    routing kernel keeps per 16 tokens); above that sorted = None (the caller sorts)."""
    T, E = logits.shape
    w = torch.empty(T, k, dtype=torch.float32, device=logits.device)
    idx = torch.empty(T, k, dtype=torch.int64, device=logits.device)
    if not T:
        return w, idx, None
    kern, logits = _kernels(), logits.contiguous()
    if sort and T * k <= ROUTE_ORDER_MAX:
        order, offs = _by_expert(T * k, E, logits.device)
        kern.route_sorted_kernel[(1,)](logits, per_expert_scale, w, idx, order, offs, T, E, K=k, BT=_pow2(T),
                                       BE=_pow2(E), BK=_pow2(k), BMS=_pow2(T * k), num_warps=8)
        return w, idx, (order, offs)
    BT = 16                                                                     # tokens per program
    n = -(-T // BT)
    place = sort and n <= ROUTE_PLACE_MAX
    hist = torch.empty(n, E, dtype=torch.int32, device=logits.device) if place else w      # [n, E] (else unused)
    kern.route_kernel[(n,)](logits, per_expert_scale, w, idx, hist, T, E, K=k, BT=BT, BE=_pow2(E), BK=_pow2(k),
                            HIST=place, num_warps=8)       # (8 warps: [16, 128] tiles in registers)
    if not place:
        return w, idx, None
    order, offs = _by_expert(T * k, E, logits.device)
    kern.place_kernel[(n,)](idx, hist, order, offs, T * k, E, n, BT * k, BC=_pow2(n), BE=_pow2(E),
                            BMS=_pow2(BT * k), num_warps=8)
    return w, idx, (order, offs)
