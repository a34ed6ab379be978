"""The Triton kernels themselves (module-level @triton.jit functions, so that kernels can call helpers in the
interpreter too). Imported only by kernels.py, on first use: importing dgemma never imports triton.
Knows: the tile maths. Does not know: shapes, launch grids, when a kernel is used (kernels.py).
"""

import triton
import triton.language as tl


QUICK_TILES = ((16, 128, 4, 4), (32, 64, 4, 4), (32, 128, 4, 4), (64, 64, 4, 3), (64, 64, 8, 4), (128, 64, 8, 3))


def moe_configs() -> list[triton.Config]:
    """The tile shapes the MoE kernels choose from (triton.autotune, once per (N, K, BM) on first use, on the GPU
    at hand): output-column tiles BN, reduction tiles BK, warps and pipeline stages. BN 16 / 32 give a decoding
    step (one to a few rows per expert, ~100 tiles of BN 64 for 132 SMs) more programs to stream its weights
    with, as split-K would, without a second pass. Autotuning skips those `keep_unspilled` drops for the BM at
    hand. By DGEMMA_AUTOTUNE (kernels.autotune_choice): unset, empty or "quick", the 6 of QUICK_TILES (BN, BK,
    warps, stages), narrow and wide, at most 6 a shape after pruning; "full", all 24 (each is compiled and timed
    at first use: ~13 shapes in a batch-1 run of the 26B, ~200 compiles, minutes); "0", and under Triton's
    interpreter, only the untuned default (BN 64, BK 64, 4 warps): nothing to time there, and one config is what
    tests check."""
    from .kernels import _interpreted, autotune_choice
    choice = autotune_choice()
    if _interpreted() or choice == "0":
        return [triton.Config({"BN": 64, "BK": 64}, num_warps=4)]
    tiles = QUICK_TILES if choice == "quick" else [
        (bn, bk, w, st) for bn in (16, 32, 64, 128) for bk in (64, 128) for w in (4, 8) for st in (3, 4)
        if not (bn <= 32 and w == 8)]
    return [triton.Config({"BN": bn, "BK": bk}, num_warps=w, num_stages=st) for bn, bk, w, st in tiles]


def bench_config(fn, quantiles):
    """triton.autotune's timing of one tile configuration: 5 ms of warm-up and 20 of repetitions (Triton's own
    default, 25 + 100, is 5x as long: hundreds of runs of a kernel of tens of microseconds either way)."""
    from triton.testing import do_bench
    return do_bench(fn, warmup=5, rep=20, quantiles=quantiles)


def footprint(cfg: triton.Config, BM: int, accumulators: int) -> float:
    """Values per thread of a tile's fp32 accumulators and its two operand tiles,
    (acc BM BN + BM BK + acc BK BN) / (32 x warps threads): a register estimate. Calibrated on sm_90 cubins of both MoE
    kernels (scripts/compile_kernels.py, Triton 3.9, every configuration at BM 16 and 64, 192 launches): <= 64
    never spilled (64 launches), 80-96 spilled in 16 of 52 by at most 248 bytes, >= 112 in all 76 (296 B to
    5.4 KB of stack per thread)."""
    BN, BK = cfg.kwargs["BN"], cfg.kwargs["BK"]
    return (accumulators * BM * BN + BM * BK + accumulators * BK * BN) / (32 * cfg.num_warps)


def keep_unspilled(accumulators: int, limit: float = 96):
    """triton.autotune's early_config_prune: drop the tiles whose footprint says they spill (so autotuning
    neither compiles nor times them); the first config if none is left."""
    def prune(configs, named_args, **kwargs):
        BM = kwargs.get("BM", named_args.get("BM"))
        return [c for c in configs if footprint(c, BM, accumulators) <= limit] or configs[:1]
    return prune


@triton.jit
def block_of(ends_ptr, E, M, BM: tl.constexpr, BE: tl.constexpr, DENSE: tl.constexpr):
    """Which block of rows this program (program_id(0)) owns, computed here from the group ends (no host sync, no
    extra launches): rows [0, M) sorted by expert, expert e's rows ending at ends[e] (E of them, BE >= E a power
    of two), cut into blocks of up to BM rows of one expert, numbered expert by expert. -> (e, r0, r1): the
    block's expert (>= E: a spare block, which does nothing), its first row and its expert's row end.
    DENSE: one matrix, no groups (e = 0, blocks of BM rows of [0, M))."""
    b = tl.program_id(0)
    if DENSE:
        e = b * 0
        r0 = b * BM
        r1 = M
    else:
        es = tl.arange(0, BE)
        em = es < E
        ends = tl.load(ends_ptr + es, mask=em, other=0)                   # [BE]
        starts = tl.load(ends_ptr + es - 1, mask=em & (es > 0), other=0)  # [BE]
        nblk = tl.where(em, (ends - starts + BM - 1) // BM, 0)            # [BE] blocks per expert
        blk_end = tl.cumsum(nblk, 0)                                      # [BE]
        e = tl.sum((blk_end <= b).to(tl.int32), 0)                        # searchsorted(blk_end, b, right=True)
        sel = es == e
        r0 = tl.sum(tl.where(sel, starts + (b - blk_end + nblk) * BM, 0), 0)
        r1 = tl.sum(tl.where(sel, ends, 0), 0)
    return e, r0, r1


@triton.jit
def block_tile(r0, r1, N, BM: tl.constexpr, BN: tl.constexpr):
    """A block's tile: rows [BM] from r0 (masked at r1), cols [BN] of program_id(1) in [0, N), and their masks."""
    rows = r0 + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    return rows, cols, rows < r1, cols < N


@triton.jit
def qmm_kernel(x_ptr, q_ptr, s_ptr, z_ptr, out_ptr, ends_ptr, M, N, K, E, sxm, sqe, sqn, sse, ssn, som,
               INT4: tl.constexpr, F32DOT: tl.constexpr, G: tl.constexpr, DENSE: tl.constexpr, BE: tl.constexpr,
               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    e, r0, r1 = block_of(ends_ptr, E, M, BM, BE, DENSE)
    if e < E:                                                             # else a spare block
        rows, cols, rmask, nmask = block_tile(r0, r1, N, BM, BN)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            ks = k0 + tl.arange(0, BK)
            kmask = ks < K
            a = tl.load(x_ptr + rows[:, None].to(tl.int64) * sxm + ks[None, :], mask=rmask[:, None] & kmask[None, :],
                        other=0.0)
            wmask = kmask[:, None] & nmask[None, :]
            if INT4:
                byte = tl.load(q_ptr + e.to(tl.int64) * sqe + cols[None, :] * sqn + (ks // 2)[:, None], mask=wmask, other=0)
                code = (byte.to(tl.int32) >> ((ks % 2) * 4)[:, None]) & 15
                soff = e.to(tl.int64) * sse + cols[None, :] * ssn + (ks // G)[:, None]
                s = tl.load(s_ptr + soff, mask=wmask, other=0.0).to(tl.float32)
                z = tl.load(z_ptr + soff, mask=wmask, other=0.0).to(tl.float32)
                w = (code.to(tl.float32) - 8.0) * s + z
            else:
                w = tl.load(q_ptr + e.to(tl.int64) * sqe + cols[None, :] * sqn + ks[:, None], mask=wmask, other=0.0)
                w = w.to(tl.float32)
            if F32DOT:   # fp32 inputs, or the interpreter (whose bf16 dot is wrong)
                acc += tl.dot(a.to(tl.float32), w, input_precision="ieee")   # not TF32
            else:        # tensor cores: codes dequantized to the activation dtype
                acc += tl.dot(a, w.to(a.dtype))
        if not INT4:   # one scale per output row of the weight: applied once, after the sum
            acc = acc * tl.load(s_ptr + e.to(tl.int64) * sse + cols, mask=nmask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + rows[:, None].to(tl.int64) * som + cols[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=rmask[:, None] & nmask[None, :])


# ---- the unquantized MLPs: the experts (rows grouped by expert) and the dense MLP (DENSE) ----
@triton.autotune(configs=moe_configs(), key=["I", "K", "BM", "DENSE"], do_bench=bench_config,
                 prune_configs_by={"early_config_prune": keep_unspilled(accumulators=2)})
@triton.jit
def gate_up_kernel(x_ptr, wg_ptr, wu_ptr, h_ptr, order_ptr, ends_ptr, M, I, K, E, KTOP, sxm, swe, swn, shm,
                   DENSE: tl.constexpr, F32DOT: tl.constexpr, BE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                   BK: tl.constexpr):
    """h[rows, cols] = gelu_tanh(x W_gate^T) * (x W_up^T) for a block of one expert's rows (W_gate = wg[e],
    W_up = wu[e], [I, K] each). Row r of the sorted order reads token order[r] // KTOP of x (DENSE: row r)."""
    e, r0, r1 = block_of(ends_ptr, E, M, BM, BE, DENSE)
    if e < E:
        rows, cols, rmask, nmask = block_tile(r0, r1, I, BM, BN)         # [BM], [BN] in [0, I)
        if DENSE:
            src = rows
        else:                                                             # the token each sorted row stands for
            src = tl.load(order_ptr + rows, mask=rmask, other=0) // KTOP
        xp = x_ptr + src[:, None].to(tl.int64) * sxm                      # [BM, 1]
        wg = wg_ptr + e.to(tl.int64) * swe + cols[None, :] * swn          # [1, BN] gate rows of W
        wu = wu_ptr + e.to(tl.int64) * swe + cols[None, :] * swn          # the matching up rows
        gate = tl.zeros((BM, BN), dtype=tl.float32)
        up = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            ks = k0 + tl.arange(0, BK)                                    # [BK]
            kmask = ks < K
            a = tl.load(xp + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)   # [BM, BK]
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


@triton.autotune(configs=moe_configs(), key=["N", "K", "BM", "DENSE"], do_bench=bench_config,
                 prune_configs_by={"early_config_prune": keep_unspilled(accumulators=1)})
@triton.jit
def down_kernel(h_ptr, w_ptr, ws_ptr, y_ptr, order_ptr, ends_ptr, M, N, K, E, shm, swe, swn, sym,
                DENSE: tl.constexpr, F32DOT: tl.constexpr, BE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                BK: tl.constexpr):
    """For a block of one expert's rows: y[order[r], cols] = (h[r] W^T) * ws[order[r]], W = w[e] [N, K]: each
    row goes back to its (token, k) slot with its routing weight. DENSE: y[r] = h[r] W^T."""
    e, r0, r1 = block_of(ends_ptr, E, M, BM, BE, DENSE)
    if e < E:
        rows, cols, rmask, nmask = block_tile(r0, r1, N, BM, BN)         # [BM], [BN] in [0, N)
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
        if DENSE:
            dst = rows
        else:
            dst = tl.load(order_ptr + rows, mask=rmask, other=0)                           # the rows' slots
            acc = acc * tl.load(ws_ptr + dst, mask=rmask, other=0.0).to(tl.float32)[:, None]   # routing weight
        tl.store(y_ptr + dst[:, None].to(tl.int64) * sym + cols[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=rmask[:, None] & nmask[None, :])


@triton.jit
def stable_rank(keys, pos):
    """Each entry's place when entries [n] are sorted by key, ties in position order (a stable sort): the count of
    entries with a smaller key, or the same key at an earlier position. -> [n] int32."""
    before = (keys[None, :] < keys[:, None]) | ((keys[None, :] == keys[:, None]) & (pos[None, :] < pos[:, None]))
    return tl.sum(before.to(tl.int32), 1)


@triton.jit
def ordered_sum(y_ptr, idx_ptr, t, cols, cmask, sym, dt, KTOP: tl.constexpr, BK: tl.constexpr):
    """Token t's KTOP slot rows y[t * KTOP + j] (columns cols), added in ascending expert order idx[t, j], each
    partial sum rounded to dt (what index_add_ over expert-sorted rows does). -> fp32 [len(cols)], dt-exact."""
    js = tl.arange(0, BK)
    ex = tl.load(idx_ptr + t * KTOP + js, mask=js < KTOP, other=2147483647).to(tl.int32)   # [BK] (distinct)
    rank = stable_rank(ex, js)                                            # [BK] place of slot j in expert order
    acc = tl.zeros(cols.shape, dtype=tl.float32)
    for r in tl.static_range(KTOP):
        j = tl.sum(tl.where(rank == r, js, 0), 0)                         # the slot with the r-th smallest expert
        term = tl.load(y_ptr + (t * KTOP + j).to(tl.int64) * sym + cols, mask=cmask, other=0.0).to(tl.float32)
        if r == 0:
            acc = term
        else:
            acc = (acc + term).to(dt).to(tl.float32)
    return acc


@triton.jit
def combine_kernel(y_ptr, idx_ptr, out_ptr, H, sym, som, KTOP: tl.constexpr, BK: tl.constexpr, BH: tl.constexpr):
    """out[t, cols] = token t's KTOP slot rows of y in ascending expert order (ordered_sum)."""
    t = tl.program_id(0)
    cols = tl.program_id(1) * BH + tl.arange(0, BH)
    cmask = cols < H
    acc = ordered_sum(y_ptr, idx_ptr, t, cols, cmask, sym, out_ptr.dtype.element_ty, KTOP, BK)
    tl.store(out_ptr + t.to(tl.int64) * som + cols, acc.to(out_ptr.dtype.element_ty), mask=cmask)


# ---- the fast sampler's pass over a chunk of logits ----
@triton.jit
def scaled_logits(x, inv_t, cap, CAP: tl.constexpr):
    """lam = softcap(x) / T in fp32: cap * tanh(x / cap), written tanh(y) = 2 sigmoid(2y) - 1, if CAP."""
    x = x.to(tl.float32)
    if CAP:
        x = cap * (2.0 * tl.sigmoid(x * (2.0 / cap)) - 1.0)
    return x * inv_t


@triton.jit
def below(x):
    """The largest fp32 smaller than x (x > 0): one step down in the bit pattern, as torch.nextafter(x, 0)."""
    return (x.to(tl.int32, bitcast=True) - 1).to(tl.float32, bitcast=True)


@triton.jit
def sampler_rows_kernel(x_ptr, temp_ptr, e_ptr, amax_ptr, z_ptr, ent_ptr, bsum_ptr, V, sx, se, sb, cap,
                        CAP: tl.constexpr, BV: tl.constexpr, BS: tl.constexpr):
    """One program per row of raw logits x [n, V]: lam = softcap(x) / T (cap * tanh(x / cap), if CAP).
    Pass 1: max and first argmax. Pass 2: e = exp(lam - max), stored in e's dtype, with fp32 Z = sum e,
    S = sum e (lam - max) and the sums of e over blocks of BS entries; entropy = log Z - S / Z."""
    row = tl.program_id(0).to(tl.int64)
    inv_t = 1.0 / tl.load(temp_ptr + row)
    xr = x_ptr + row * sx
    best = tl.full((BV,), float("-inf"), tl.float32)                      # per-lane max and its index
    where = tl.zeros((BV,), tl.int32)
    for v0 in range(0, V, BV):
        vs = v0 + tl.arange(0, BV)
        lam = scaled_logits(tl.load(xr + vs, mask=vs < V, other=0.0), inv_t, cap, CAP)
        lam = tl.where(vs < V, lam, float("-inf"))
        better = lam > best                                               # strict: the first index wins
        best = tl.where(better, lam, best)
        where = tl.where(better, vs, where)
    mx = tl.max(best, axis=0)
    tl.store(amax_ptr + row, tl.min(tl.where(best == mx, where, V), axis=0))
    z = tl.zeros((BV,), tl.float32)
    sl = tl.zeros((BV,), tl.float32)
    for v0 in range(0, V, BV):
        vs = v0 + tl.arange(0, BV)
        d = scaled_logits(tl.load(xr + vs, mask=vs < V, other=0.0), inv_t, cap, CAP) - mx   # lam - max <= 0
        e = tl.where(vs < V, tl.exp(d), 0.0)
        z += e
        sl += tl.where(vs < V, e * d, 0.0)
        tl.store(e_ptr + row * se + vs, e.to(e_ptr.dtype.element_ty), mask=vs < V)
        bs = v0 // BS + tl.arange(0, BV // BS)
        tl.store(bsum_ptr + row * sb + bs, tl.sum(tl.reshape(e, (BV // BS, BS)), axis=1),
                 mask=bs * BS < V)
    zt = tl.sum(z, axis=0)
    tl.store(z_ptr + row, zt)
    tl.store(ent_ptr + row, tl.log(zt) - tl.sum(sl, axis=0) / zt)


@triton.jit
def sample_search_kernel(x_ptr, temp_ptr, amax_ptr, bsum_ptr, u_ptr, out_ptr, V, nb, sx, sb, cap,
                         CAP: tl.constexpr, NB: tl.constexpr, BS: tl.constexpr):
    """One program per row: the inverse-CDF draw of sampling.two_level_search from sampler_rows_kernel's block
    sums. Cumulative block sums find the block holding t = u Z (kept below Z), then that block's e, recomputed
    from the raw logits x as exp(lam - lam[argmax]), finds the entry (searchsorted right=True: the count of
    cumulative sums <= the target)."""
    row = tl.program_id(0).to(tl.int64)
    inv_t = 1.0 / tl.load(temp_ptr + row)
    bi = tl.arange(0, NB)
    cb = tl.cumsum(tl.load(bsum_ptr + row * sb + bi, mask=bi < nb, other=0.0), axis=0)   # [NB]
    z = tl.sum(tl.where(bi == nb - 1, cb, 0.0), axis=0)
    t = tl.minimum(tl.load(u_ptr + row) * z, below(z))
    b = tl.sum(((cb <= t) & (bi < nb)).to(tl.int32), axis=0)                  # the target's block
    before = tl.sum(tl.where(bi == b - 1, cb, 0.0), axis=0)
    xr = x_ptr + row * sx
    top = scaled_logits(tl.load(xr + tl.load(amax_ptr + row)), inv_t, cap, CAP)
    cols = b * BS + tl.arange(0, BS)
    lam = scaled_logits(tl.load(xr + cols, mask=cols < V, other=0.0), inv_t, cap, CAP)
    inner = tl.cumsum(tl.where(cols < V, tl.exp(lam - top), 0.0), axis=0)    # [BS]
    last = tl.sum(tl.where(tl.arange(0, BS) == BS - 1, inner, 0.0), axis=0)
    t_in = tl.minimum(tl.maximum(t - before, 0.0), below(last))
    tl.store(out_ptr + row, b * BS + tl.sum((inner <= t_in).to(tl.int32), axis=0))


# ---- the attention's q / k / v epilogue ----
@triton.jit
def norm_rope_head(src, dst, w_ptr, cs, sn, D, eps, WEIGHT: tl.constexpr, ROPE: tl.constexpr,
                   BH: tl.constexpr):
    """One head vector [D] at src -> dst: RMSNorm in fp32 (times w if WEIGHT), rounded to the input dtype as
    the eager path does, then (ROPE) x cos + rotate_half(x) sin in fp32, rounded once."""
    half = D // 2
    i = tl.arange(0, BH)
    m = i < half
    a = tl.load(src + i, mask=m, other=0.0)                              # first half [BH]
    b = tl.load(src + half + i, mask=m, other=0.0)                       # second half
    af, bf = a.to(tl.float32), b.to(tl.float32)
    r = 1.0 / tl.sqrt((tl.sum(af * af, axis=0) + tl.sum(bf * bf, axis=0)) / D + eps)
    af, bf = af * r, bf * r
    if WEIGHT:
        af = af * tl.load(w_ptr + i, mask=m, other=0.0).to(tl.float32)
        bf = bf * tl.load(w_ptr + half + i, mask=m, other=0.0).to(tl.float32)
    af, bf = af.to(a.dtype).to(tl.float32), bf.to(b.dtype).to(tl.float32)
    if ROPE:   # rotate_half(x) = [-x2, x1]
        ca = tl.load(cs + i, mask=m, other=0.0).to(tl.float32)
        cb = tl.load(cs + half + i, mask=m, other=0.0).to(tl.float32)
        sa = tl.load(sn + i, mask=m, other=0.0).to(tl.float32)
        sb = tl.load(sn + half + i, mask=m, other=0.0).to(tl.float32)
        af, bf = af * ca - bf * sa, bf * cb + af * sb
    tl.store(dst + i, af.to(dst.dtype.element_ty), mask=m)
    tl.store(dst + half + i, bf.to(dst.dtype.element_ty), mask=m)


@triton.jit
def norm_rope_kernel(q_ptr, k_ptr, v_ptr, wq_ptr, wk_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr, vo_ptr, slot_ptr,
                     S, HQ, D, eps, sq, sk, sv, scb, scs, sqo, sob, soh, sos,
                     BH: tl.constexpr, SLOTS: tl.constexpr):
    """Program (token t, head j): j < HQ normalises and ropes q head j; else kv head j - HQ: k normalised and
    roped, v normalised without a weight (v_ptr may be k_ptr: full layers use the raw k as v). Token s of row b
    goes to ko / vo at b * sob + h * soh + (slot[b] + s) * sos (SLOTS; else slot 0): a KV cache's slots."""
    t = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    cs = cos_ptr + (t // S) * scb + (t % S) * scs
    sn = sin_ptr + (t // S) * scb + (t % S) * scs
    if j < HQ:
        norm_rope_head(q_ptr + t * sq + j * D, qo_ptr + t * sqo + j * D, wq_ptr, cs, sn, D, eps,
                       True, True, BH)
    else:
        h = j - HQ
        b = t // S
        s = t % S
        if SLOTS:
            s += tl.load(slot_ptr + b)
        o = b * sob + h * soh + s * sos
        norm_rope_head(k_ptr + t * sk + h * D, ko_ptr + o, wk_ptr, cs, sn, D, eps, True, True, BH)
        norm_rope_head(v_ptr + t * sv + h * D, vo_ptr + o, wk_ptr, cs, sn, D, eps, False, False, BH)


# ---- the layer's norms, residual adds and router maths ----
@triton.jit
def row_offsets(H, BH: tl.constexpr):
    """This program's row of a contiguous [rows, H] tensor: element offsets [BH], columns [BH] and their mask."""
    c = tl.arange(0, BH)
    return tl.program_id(0).to(tl.int64) * H + c, c, c < H


@triton.jit
def inv_rms(x, H, eps):
    """1 / sqrt(mean(x^2) + eps) of an fp32 row x (masked entries 0)."""
    return 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / H + eps)


@triton.jit
def rms_normed(x, w_ptr, c, m, H, eps):
    """RMSNorm of an fp32 row x [BH] (masked entries 0) times the weight w [H] (columns c, mask m), in fp32."""
    return x * inv_rms(x, H, eps) * tl.load(w_ptr + c, mask=m, other=0.0).to(tl.float32)


@triton.jit
def post_attention_kernel(h_ptr, a_ptr, w_pa_ptr, w1_ptr, w2_ptr, ws_ptr, r_ptr, x1_ptr, x2_ptr, z_ptr,
                          H, eps, root, BH: tl.constexpr):
    """Row t: r = h + norm(a; w_pa); then x1 = norm(r; w1), x2 = norm(r; w2), z = norm(r) * ws * root (the
    router's input). Every norm in fp32; each value rounded to the row dtype where the eager ops round."""
    o, c, m = row_offsets(H, BH)
    h = tl.load(h_ptr + o, mask=m, other=0.0)
    dt = h.dtype
    a = tl.load(a_ptr + o, mask=m, other=0.0).to(tl.float32)
    a = rms_normed(a, w_pa_ptr, c, m, H, eps).to(dt)
    r = (h.to(tl.float32) + a.to(tl.float32)).to(dt).to(tl.float32)
    n = r * inv_rms(r, H, eps)
    tl.store(r_ptr + o, r.to(dt), mask=m)
    tl.store(x1_ptr + o, (n * tl.load(w1_ptr + c, mask=m, other=0.0).to(tl.float32)).to(dt), mask=m)
    tl.store(x2_ptr + o, (n * tl.load(w2_ptr + c, mask=m, other=0.0).to(tl.float32)).to(dt), mask=m)
    z = (n.to(dt).to(tl.float32) * tl.load(ws_ptr + c, mask=m, other=0.0).to(tl.float32)).to(dt)
    tl.store(z_ptr + o, (z.to(tl.float32) * root).to(dt), mask=m)


@triton.jit
def post_ffn_kernel(r_ptr, m1_ptr, m2_ptr, w1_ptr, w2_ptr, w_ptr, s_ptr, out_ptr, wn_ptr, xn_ptr, idx_ptr, H, eps,
                    NEXT: tl.constexpr, KTOP: tl.constexpr, BK: tl.constexpr, BH: tl.constexpr):
    """Row t: out = (r + norm(norm(m1; w1) + norm(m2; w2); w)) * s, norms in fp32, rounded as the eager ops round;
    NEXT: also xn = norm(out; wn), the next layer's input (from the rounded out). KTOP > 0: m2 holds the experts'
    KTOP weighted rows per token (slot t * KTOP + j for expert idx[t, j]), added here as combine_kernel adds them."""
    o, c, m = row_offsets(H, BH)
    r = tl.load(r_ptr + o, mask=m, other=0.0)
    dt = r.dtype
    m1 = tl.load(m1_ptr + o, mask=m, other=0.0).to(tl.float32)
    if KTOP > 0:
        m2 = ordered_sum(m2_ptr, idx_ptr, tl.program_id(0).to(tl.int64), c, m, H, dt, KTOP, BK)
    else:
        m2 = tl.load(m2_ptr + o, mask=m, other=0.0).to(tl.float32)
    m1 = rms_normed(m1, w1_ptr, c, m, H, eps).to(dt)
    m2 = rms_normed(m2, w2_ptr, c, m, H, eps).to(dt)
    x = (m1.to(tl.float32) + m2.to(tl.float32)).to(dt).to(tl.float32)
    x = rms_normed(x, w_ptr, c, m, H, eps).to(dt)
    out = (r.to(tl.float32) + x.to(tl.float32)).to(dt)
    out = (out.to(tl.float32) * tl.load(s_ptr).to(tl.float32)).to(dt)
    tl.store(out_ptr + o, out, mask=m)
    if NEXT:
        tl.store(xn_ptr + o, rms_normed(out.to(tl.float32), wn_ptr, c, m, H, eps).to(dt), mask=m)


@triton.jit
def route_rows(x_ptr, pes_ptr, w_ptr, idx_ptr, t0, T, E, K: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr,
               BK: tl.constexpr):
    """Rows t0 .. t0 + BT - 1 (those < T) of router logits [T, E], as one [BT, BE] tile: p = softmax (fp32), the K
    largest (first index on ties, in descending order), w = p_top / sum(p_top) * per_expert_scale[idx], stored
    at w[t], idx[t] ([T, K] each). -> how many of these rows' slots each expert got, [BE] int32."""
    t = t0 + tl.arange(0, BT)
    tm = t < T
    c = tl.arange(0, BE)
    p = tl.load(x_ptr + t[:, None].to(tl.int64) * E + c[None, :], mask=tm[:, None] & (c < E)[None, :],
                other=float("-inf")).to(tl.float32)                     # [BT, BE]
    p = tl.where(tm[:, None], p, 0.0)                                     # (rows past T: finite, never stored)
    p = tl.exp(p - tl.max(p, axis=1)[:, None])
    p = p / tl.sum(p, axis=1)[:, None]
    p = tl.where(p == p, p, -1.0)                                         # NaN logits: below every probability
    slot = tl.arange(0, BK)
    vals = tl.zeros((BT, BK), tl.float32)
    ids = tl.zeros((BT, BK), tl.int32)
    hist = tl.zeros((BE,), tl.int32)
    for i in tl.static_range(K):
        best = tl.max(p, axis=1)                                          # [BT]
        j = tl.min(tl.where(p == best[:, None], c[None, :], BE), axis=1)  # first index of each row's max
        vals = tl.where(slot[None, :] == i, best[:, None], vals)
        ids = tl.where(slot[None, :] == i, j[:, None], ids)
        hit = c[None, :] == j[:, None]                                    # [BT, BE]
        hist += tl.sum((hit & tm[:, None]).to(tl.int32), axis=0)
        p = tl.where(hit, float("-inf"), p)                               # taken: below everything
    m = tm[:, None] & (slot < K)[None, :]
    w = vals / tl.sum(vals, axis=1)[:, None] * tl.load(pes_ptr + ids, mask=m, other=0.0).to(tl.float32)
    o = t[:, None].to(tl.int64) * K + slot[None, :]
    tl.store(w_ptr + o, w, mask=m)
    tl.store(idx_ptr + o, ids.to(tl.int64), mask=m)
    return hist


@triton.jit
def route_kernel(x_ptr, pes_ptr, w_ptr, idx_ptr, hist_ptr, T, E, K: tl.constexpr, BT: tl.constexpr,
                 BE: tl.constexpr, BK: tl.constexpr, HIST: tl.constexpr):
    """Program p routes tokens p * BT .. p * BT + BT - 1 (route_rows); HIST: and stores how many of their slots
    each expert got at hist[p] ([programs, E])."""
    hist = route_rows(x_ptr, pes_ptr, w_ptr, idx_ptr, tl.program_id(0) * BT, T, E, K, BT, BE, BK)
    if HIST:
        c = tl.arange(0, BE)
        tl.store(hist_ptr + tl.program_id(0) * E + c, hist, mask=c < E)


@triton.jit
def place_kernel(idx_ptr, hist_ptr, order_ptr, offs_ptr, M, E, NC, CH, BC: tl.constexpr, BE: tl.constexpr,
                 BMS: tl.constexpr):
    """The M routing slots (expert ids idx [M]) sorted by expert, stably, in chunks of CH slots, one per program,
    from route_kernel's per-chunk counts hist [NC, E]: slot s of chunk p goes to place = (slots of smaller experts)
    + (slots of its expert in earlier chunks) + (slots of its expert earlier in this chunk). order[place] = s;
    program 0 also writes offs[e] = the slots with expert <= e. (What torch.sort(stable=True) and searchsorted
    give, in one parallel launch after the routing.)"""
    p = tl.program_id(0)
    ch = tl.arange(0, BC)
    e = tl.arange(0, BE)
    hist = tl.load(hist_ptr + ch[:, None] * E + e[None, :], mask=(ch < NC)[:, None] & (e < E)[None, :], other=0)
    total = tl.sum(hist, axis=0)                                          # [BE] slots per expert
    base = tl.cumsum(total, 0) - total + tl.sum(tl.where((ch < p)[:, None], hist, 0), axis=0)   # [BE]
    r = tl.arange(0, BMS)
    s = p * CH + r
    sm = (r < CH) & (s < M)
    ex = tl.load(idx_ptr + s, mask=sm, other=0).to(tl.int32)              # [BMS]
    first = tl.sum(tl.where(ex[:, None] == e[None, :], base[None, :], 0), axis=1)   # [BMS] base of its expert
    same = (ex[None, :] == ex[:, None]) & (r[None, :] < r[:, None]) & sm[None, :]
    place = first + tl.sum(same.to(tl.int32), axis=1)
    tl.store(order_ptr + place, s.to(tl.int64), mask=sm)
    if p == 0:
        tl.store(offs_ptr + e, tl.cumsum(total, 0), mask=e < E)


@triton.jit
def sort_slots(ex, s, sm, order_ptr, offs_ptr, E, BE: tl.constexpr):
    """Routing slots s [BMS] (valid where sm) with expert ids ex, sorted by expert, stably: order[r] = the slot at
    sorted place r (what torch.sort(stable=True) returns), offs[e] = the number of slots with expert <= e
    (searchsorted(sorted, arange(E), right=True)), by counting (stable_rank; [BE, BMS])."""
    ex = tl.where(sm, ex, 2147483647)                                     # (padding sorts last)
    place = stable_rank(ex, s)                                            # [BMS] sorted place of each slot
    tl.store(order_ptr + place, s.to(tl.int64), mask=sm)
    e = tl.arange(0, BE)
    ends = tl.sum(((ex[None, :] <= e[:, None]) & sm[None, :]).to(tl.int32), 1)   # [BE]
    tl.store(offs_ptr + e, ends, mask=e < E)


@triton.jit
def route_order_kernel(idx_ptr, order_ptr, offs_ptr, M, E, BMS: tl.constexpr, BE: tl.constexpr):
    """One program sorts M <= BMS routing slots (expert ids idx [M], slot s = t * k + j) by expert: sort_slots."""
    s = tl.arange(0, BMS)
    sm = s < M
    sort_slots(tl.load(idx_ptr + s, mask=sm, other=0).to(tl.int32), s, sm, order_ptr, offs_ptr, E, BE)


@triton.jit
def route_sorted_kernel(x_ptr, pes_ptr, w_ptr, idx_ptr, order_ptr, offs_ptr, T, E, K: tl.constexpr,
                        BT: tl.constexpr, BE: tl.constexpr, BK: tl.constexpr, BMS: tl.constexpr):
    """One program for a decoding step's T <= BT tokens (T * K <= BMS): route_rows for all of them at once, then
    (after a barrier, so that every thread sees the ids the others stored) their slots sorted by expert
    (sort_slots)."""
    route_rows(x_ptr, pes_ptr, w_ptr, idx_ptr, 0, T, E, K, BT, BE, BK)
    tl.debug_barrier()
    s = tl.arange(0, BMS)
    sm = s < T * K
    ex = tl.load(idx_ptr + s, mask=sm, other=0, volatile=True).to(tl.int32)
    sort_slots(ex, s, sm, order_ptr, offs_ptr, E, BE)
