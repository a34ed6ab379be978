"""The entropy-bound block-diffusion sampler as pure tensor code (spec section 4.2).

Knows: the temperature schedule, per-position sampling, entropy, argmax, entropy-bound acceptance,
the stable-and-confident stop rule, top-k / top-p truncation of each position's distribution. Every random
number is drawn in the reference's order
(canvas init: randint [B, C]; each step: the multinomial's exponential draws [B*C, V] row by row,
then the renoise randint [B, C]), so a seeded CPU run reproduces the reference token for token.
`torch.multinomial(p, 1)` on the CPU is exactly `argmax(p / Exp(1))` with the exponentials drawn row
after row, which lets us sample chunk by chunk without a [B*C, V] probability tensor.
Does not know: the model (it gets logits and, optionally, the embedding: anything with `.dtype` and
`.mix(p) -> p @ E`, model.Embedding or quant.QEmbedding).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


def resolve_sampler(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """"auto" -> "exact" where the seeded contract holds (CPU, fp32: the reference's tokens), else "fast";
    checks the name."""
    if name == "auto":
        return "exact" if torch.device(device).type == "cpu" and dtype == torch.float32 else "fast"
    if name not in ("exact", "fast"):
        raise ValueError(f"sampler must be 'auto', 'exact' or 'fast' (got {name!r})")
    return name


def temperature(steps_left: int, max_steps: int, t_min: float, t_max: float) -> torch.Tensor:
    """T(n) = t_min + (t_max - t_min) * n / N, computed in fp32 exactly as the reference does."""
    return t_min + ((t_max - t_min) * (torch.tensor(steps_left, dtype=torch.int32) / max_steps))


@functools.lru_cache(maxsize=256)
def temperatures(max_steps: int, t_min: float, t_max: float) -> tuple[float, ...]:
    """T(n) for n = N..1 (step i of a canvas uses entry i), each the float of its fp32 `temperature`, so
    torch.tensor(..., dtype=torch.float32) of them gives back those fp32 values exactly."""
    return tuple(float(temperature(n, max_steps, t_min, t_max)) for n in range(max_steps, 0, -1))


def init_canvas(batch: int, length: int, vocab: int, device, generator) -> torch.Tensor:
    """A canvas of uniform random ids over the whole vocabulary: [B, C]."""
    return torch.randint(0, vocab, (batch, length), device=device, generator=generator)


def entropy(lam: torch.Tensor, lse: torch.Tensor | None = None) -> torch.Tensor:
    """Entropy of softmax(lam) along the last dim, with the same fp32 ops as torch.distributions.Categorical
    (lse: lam.logsumexp(dim=-1, keepdim=True) when the caller has it)."""
    logp = lam - (lam.logsumexp(dim=-1, keepdim=True) if lse is None else lse)
    p = torch.softmax(logp, dim=-1)
    return -(logp.clamp_(min=torch.finfo(logp.dtype).min).mul_(p)).sum(-1)   # same values, no temporaries


CHUNK_ELEMENTS = 1 << 26   # logits per sampler chunk: ~256 MB per fp32 [rows, V] buffer
FUSED_CHUNK_FACTOR = 4     # the fused kernel's chunks: 4x the rows in less memory (rows_per_chunk)


def rows_per_chunk(vocab: int, fused: bool = False) -> int:
    """Canvas rows the sampler handles at once for a vocabulary of `vocab` tokens. The torch sampler keeps about
    six fp32 [rows, V] buffers alive (~1.5 GB per chunk); the fused kernel (fused_rows) keeps two 2-byte ones
    (bf16 logits and e), so it takes FUSED_CHUNK_FACTOR x the rows in less memory, and each chunk's two reads of
    the embedding (head, self-conditioning) serve that many more rows."""
    return max(1, CHUNK_ELEMENTS * (FUSED_CHUNK_FACTOR if fused else 1) // vocab)


@dataclass
class RowResult:
    sample: torch.Tensor     # [n] draw from softmax(lam)
    argmax: torch.Tensor     # [n] argmax of lam
    entropy: torch.Tensor    # [n] entropy of softmax(lam), fp32
    soft: torch.Tensor | None  # [n, H] self-conditioning soft embedding, when an embedding was given
    logprob: torch.Tensor | None = None   # [n] log-probability of the argmax under softmax(lam), fp32
    top_ids: torch.Tensor | None = None   # [n, N] the N most likely tokens (when asked: `alternatives`)
    top_logprobs: torch.Tensor | None = None   # [n, N] their log-probabilities, descending (-inf: truncated away)

    @staticmethod
    def cat(parts: list["RowResult"], B: int, C: int) -> "RowResult":
        """Chunk results in row order -> one result shaped [B, C] (soft: [B, C, H], top_*: [B, C, N]); one chunk:
        views of it."""
        def joined(name: str, *shape: int) -> torch.Tensor | None:
            xs = [getattr(p, name) for p in parts]
            if xs[0] is None:
                return None
            return (xs[0] if len(xs) == 1 else torch.cat(xs)).view(B, C, *shape)
        return RowResult(joined("sample"), joined("argmax"), joined("entropy"), joined("soft", -1),
                         joined("logprob"), joined("top_ids", -1), joined("top_logprobs", -1))


def alternatives_of(lam: torch.Tensor, n: int, log_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The n largest entries of each row of lam [rows, V] as (ids [rows, n], log-probabilities under softmax(lam)
    [rows, n], descending); log_norm [rows, 1]: lam's logsumexp."""
    vals, ids = lam.topk(n, dim=-1)
    return ids, vals - log_norm


def argmax_first(ids: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """topk's ids [rows, n] with each row's argmax [rows] first: where several entries tie for the max, topk may put
    another of them first (their values are equal, so the log-probabilities stand as they are)."""
    hit = ids == amax[:, None]
    where = torch.where(hit.any(dim=1), hit.int().argmax(dim=1), 0)      # amax's column (0: not among them)
    out = ids.clone()
    out[torch.arange(len(ids), device=ids.device), where] = ids[:, 0]    # the old first takes its place
    out[:, 0] = amax
    return out


def truncation_on(top_k: int | torch.Tensor, top_p: float | torch.Tensor) -> bool:
    """Does (top_k, top_p) drop anything? Numbers: top_k > 0 or top_p < 1; tensors (per-row values) always do."""
    return isinstance(top_k, torch.Tensor) or isinstance(top_p, torch.Tensor) or top_k > 0 or top_p < 1


def truncation(top_k: int, top_p: float | torch.Tensor, vocab: int) -> tuple[int, float | torch.Tensor] | None:
    """One request's (top_k, top_p) as the samplers take them: None when they drop nothing (top_k 0 or >= the
    vocabulary, top_p 1), so the step keeps its CUDA graph and fused sampler."""
    top_k = 0 if top_k >= vocab else top_k
    return (top_k, top_p) if truncation_on(top_k, top_p) else None


# The largest logit_bias value or penalty (OpenAI's ranges: 100 and 2): far past any logit, and small enough that
# the bias of 4,096 committed copies of a token, over the lowest temperature, stays finite in fp32.
MAX_BIAS = 1e4


def logit_bias_vector(bias: dict[int, float] | None, vocab: int, device) -> torch.Tensor | None:
    """OpenAI's logit_bias {token id: value} as a [V] fp32 vector to add to logits (None when empty); checks it."""
    if not bias:
        return None
    if not all(isinstance(t, int) and 0 <= t < vocab for t in bias):
        raise ValueError(f"logit_bias keys must be token ids in [0, {vocab})")
    if not all(isinstance(v, (int, float)) and abs(v) <= MAX_BIAS for v in bias.values()):
        raise ValueError(f"logit_bias values must be numbers in [-{MAX_BIAS:g}, {MAX_BIAS:g}]")
    out = torch.zeros(vocab, device=device)
    out[torch.tensor(list(bias), device=device)] = torch.tensor([float(v) for v in bias.values()], device=device)
    return out


def penalised(bias: torch.Tensor | None, counts: torch.Tensor | None, presence: float,
              frequency: float) -> torch.Tensor | None:
    """What a step adds to the logits of a request (or rows [B, V]): logit_bias (a [V] vector or None) less OpenAI's
    penalties of the committed-token counts (`counts` [..., V]; None: no penalty): presence if a token was
    committed, frequency x how often."""
    if counts is None:
        return bias
    pen = presence * (counts > 0) + frequency * counts
    return -pen if bias is None else bias - pen


def dropped(logits: torch.Tensor, top_k: int | torch.Tensor = 0,
            top_p: float | torch.Tensor = 1.0) -> torch.Tensor | None:
    """[n, V] bool: the entries top-k then top-p truncation removes from each row of logits [n, V], with the ops
    of transformers' TopKLogitsWarper then TopPLogitsWarper (min_tokens_to_keep 1), so ties fall as they do
    there: top-k drops what is below the k-th largest logit (ties kept); top-p sorts the survivors ascending and
    drops those whose cumulative softmax is <= 1 - top_p (the largest is always kept). top_k: a number or [n]
    ints (0: off); top_p: a number or [n] (1: off; a tensor in float64, so 1 - p rounds as Python's does).
    None when nothing is asked (a number top_k >= V keeps everything: no `topk` of the whole row)."""
    n, V = logits.shape
    if not isinstance(top_k, torch.Tensor):                  # (per-row values always truncate)
        if (kept := truncation(top_k, top_p, V)) is None:
            return None
        top_k = kept[0]
    drop = torch.zeros(n, V, dtype=torch.bool, device=logits.device)
    if isinstance(top_k, torch.Tensor) or top_k > 0:
        k = top_k.to(logits.device) if isinstance(top_k, torch.Tensor) else \
            torch.full((n,), top_k, device=logits.device)                                      # [n]
        top = torch.topk(logits, int(k.max().clamp(1, V)), dim=-1).values                  # [n, kmax] descending
        kth = top.gather(1, (k.clamp(1, top.shape[1]) - 1)[:, None])                          # [n, 1]
        drop = logits < torch.where(k[:, None] > 0, kth, -torch.inf)
    if isinstance(top_p, torch.Tensor):        # per-row values: sort only the rows that ask (one host read)
        rows = (top_p < 1).nonzero()[:, 0].to(logits.device)                                  # [m]
        if rows.numel():
            cut = (1 - top_p[top_p < 1]).to(torch.float32).to(logits.device)[:, None]          # [m, 1]
            drop[rows] |= _nucleus_drop(logits[rows].masked_fill(drop[rows], -torch.inf), cut)
    elif top_p < 1:
        drop |= _nucleus_drop(logits.masked_fill(drop, -torch.inf), 1 - top_p)    # (1 - p: the warper's float)
    return drop


def _nucleus_drop(x: torch.Tensor, cut: float | torch.Tensor) -> torch.Tensor:
    """TopPLogitsWarper's removal mask for logits x [m, V] (-inf where already dropped) and 1 - top_p (a number or
    [m, 1] fp32): sorted ascending, cumulative softmax <= cut, the largest kept."""
    srt, order = torch.sort(x, dim=-1)                                                       # ascending
    by_p = srt.softmax(dim=-1).cumsum(dim=-1) <= cut
    by_p[:, -1] = False
    return by_p.scatter(1, order, by_p)


def sample_rows(logits: torch.Tensor, temp: torch.Tensor, noise: torch.Tensor | None = None,
                embedding=None, embed_scale: torch.Tensor | None = None,
                uniform: torch.Tensor | None = None, top_k: int | torch.Tensor = 0,
                top_p: float | torch.Tensor = 1.0, alternatives: int = 0) -> RowResult:
    """One step's per-position work for n rows of fp32 logits [n, V] (overwritten in place).

    temp: a scalar or [n, 1] tensor. lam = logits / T; a sample from softmax(lam); argmax; entropy; and,
    with `embedding` (E [V, H]), the next step's self-conditioning input softmax_f32(lam in the embedding
    dtype) @ E * sqrt(H).
    * exact (`noise` given): noise is [n, V] Exp(1) draws filled by the caller, who owns the random stream;
      sample = argmax(softmax(lam) / noise), which is what torch.multinomial computes, and the entropy uses
      torch.distributions.Categorical's ops: the reference's decisions bit for bit.
    * fast (`uniform` [n] given): inverse-CDF sampling with one uniform per row (same distribution, V times
      fewer random numbers) and the entropy lse - sum(p * lam) from the same softmax (equal up to rounding).
    top_k / top_p (see `dropped`): truncate each row's distribution before the temperature, as the reference
    does with transformers' TopK / TopP warpers passed as its `logits_processor` (they run before its
    temperature schedule): the sample, the argmax, the entropy (so acceptance and the stop rule) and the
    self-conditioning input all see the truncated distribution.
    alternatives: also the N most likely tokens of each row's softmax(lam) and their log-probabilities
    (RowResult.top_ids / top_logprobs), for a server's top_logprobs.
    """
    drop = dropped(logits, top_k, top_p)
    if drop is not None and noise is not None:
        logits.masked_fill_(drop, -torch.inf)
    lam = logits.div_(temp.to(logits.device))
    if noise is None:
        return _fast_rows(lam, uniform, embedding, embed_scale, drop, alternatives)
    probs = torch.softmax(lam, dim=-1, dtype=torch.float32)
    sample = torch.argmax(torch.div(probs, noise, out=noise), dim=-1)
    soft = None
    if embedding is not None:
        p_sc = probs if embedding.dtype == torch.float32 else torch.softmax(
            lam.to(embedding.dtype), dim=-1, dtype=torch.float32)
        soft = embedding.mix(p_sc) * embed_scale
    amax, lse = torch.argmax(lam, dim=-1), lam.logsumexp(dim=-1, keepdim=True)            # [n], [n, 1]
    top_ids, top_lps = alternatives_of(lam, alternatives, lse) if alternatives else (None, None)   # (dropped: -inf)
    return RowResult(sample, amax, entropy(lam, lse), soft, (lam.gather(1, amax[:, None]) - lse)[:, 0],
                     None if top_ids is None else argmax_first(top_ids, amax), top_lps)


def _fast_rows(lam: torch.Tensor, uniform: torch.Tensor, embedding, embed_scale: torch.Tensor | None,
               drop: torch.Tensor | None = None, alternatives: int = 0) -> RowResult:
    """Few passes over the vocabulary: max and argmax together, e = exp(lam - max) once, which serves the
    sample (two-level inverse CDF), the entropy log Z - <e, lam - max> / Z and the soft embedding (e @ E) / Z.
    drop [n, V]: entries truncated away (e = 0 there; lam stays finite, so no 0 * inf in the entropy)."""
    top, amax = lam.max(dim=-1)                                   # (a row's max is never dropped)
    if alternatives:                                              # (before the CPU's floor below the max)
        alt_lam, alt_ids = lam.topk(alternatives, dim=-1)
    below_max(lam, top)                                           # lam - max, in place
    e = lam.exp()                                                 # unnormalised probabilities [n, V]
    if drop is not None:
        e.masked_fill_(drop, 0.0)
    sample, z = inverse_cdf(e, uniform.to(e.device).clamp_min(U_MIN))
    log_z = z.log()                                               # = -log p(argmax): its e is exp(0) = 1
    ent = log_z - torch.linalg.vecdot(e, lam) / z
    # (the reference rounds the logits to a bf16 embedding's dtype before this softmax; the fast sampler takes
    # the fp32 probabilities it already has: a second softmax over [n, V] was 40% of its CPU time)
    soft = None if embedding is None else (embedding.mix(e).float() / z[:, None] * embed_scale).to(embedding.dtype)
    res = RowResult(sample, amax, ent, soft, -log_z)
    if alternatives:                                              # lam - max - log Z (the max's: -log Z exactly)
        res.top_logprobs = alt_lam.sub_(top[:, None]).sub_(log_z[:, None])
        if drop is not None:
            res.top_logprobs.masked_fill_(drop.gather(1, alt_ids), -torch.inf)
        res.top_ids = argmax_first(alt_ids, amax)
    return res


# The fast sampler's floor under lam - max on the CPU. torch's vectorised CPU exp leaves its fast path for a whole
# vector as soon as one lane is below about -87.3 (a result under float32's smallest normal, 1.2e-38): 6-17x slower
# per element, and at a low temperature most of a trained model's logits are that far under the max. The tiny e
# that do come out make subnormal products in the self-conditioning matmul and the entropy's dot product, each of
# which then runs 2-4x slower in fp32. Measured on the shipped model's logits at T = 0.1 (scripts/bench_sampler_cpu.py,
# docs/NOTES.md). With the floor, e >= exp(-64) = 1.6e-28: at most V * 1.6e-28 of added mass (4e-23 at V = 262,144)
# beside the max entry's e = 1, far below float32's resolution of z, of the entropy and of the soft embedding. The
# draw: uniforms are kept >= U_MIN, so the target u * z is >= 2^-25 * z (z >= 1), and in the two-level search the
# target inside a block, u * z less the block sums before it, is 0 (an exact tie) or at least about one last bit of
# u * z, ~2^-48 * z. Floored entries add at most 256 * 1.6e-28 within a block, so they can be drawn only on such an
# exact tie. CUDA's exp has no cliff, so there is no floor there.
EXP_FLOOR = -64.0
# The fast sampler's smallest uniform: a draw of exactly 0 (1 in 2^24) would take the first entry with any weight
# at all, however tiny (token 0 with the floor), where it now takes the one at 2^-25 of the mass: the middle of
# its grid cell.
U_MIN = 2.0 ** -25
INVERSE_CDF_BLOCK = 256


def below_max(lam: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """lam - top in place (top [..]: lam's max over its last dim), floored at EXP_FLOOR on the CPU; -> lam."""
    lam.sub_(top[..., None])
    if lam.device.type == "cpu":
        lam.clamp_min_(EXP_FLOOR)
    return lam


def inverse_cdf(e: torch.Tensor, u: torch.Tensor, block: int = INVERSE_CDF_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Index j drawn with P(j) = e[j] / Z from uniforms u [n] in [0, 1): e [n, V] -> (ids [n], Z [n]).

    Two levels for large vocabularies (V >= 64 blocks, a multiple of `block`): cumulative sums of the block sums
    find the block holding u * Z, then one block's own cumulative sum finds the entry, so no [n, V]
    cumulative-sum tensor is written. Small vocabularies take one cumulative sum (fewer, cheaper ops).
    Each target is kept strictly below the total it is searched in, so rounding can never push it past the
    last entry onto an impossible (zero-probability) token."""
    n, V = e.shape
    if V % block or V < 64 * block:
        cdf = torch.cumsum(e, dim=-1)
        z = cdf[:, -1]
        t = torch.minimum((u * z)[:, None], _below(cdf[:, -1:])).contiguous()
        return torch.searchsorted(cdf, t, right=True)[:, 0], z
    blocks = e.view(n, V // block, block)                                          # [n, nb, block]
    return two_level_search(blocks.sum(dim=-1), u,
                            lambda b: blocks.gather(1, b[:, :, None].expand(n, 1, block))[:, 0])


def two_level_search(bsum: torch.Tensor, u: torch.Tensor, block_of) -> tuple[torch.Tensor, torch.Tensor]:
    """inverse_cdf's two levels from the block sums bsum [n, nb] of e: cumulative block sums find the block
    holding u * Z, `block_of(b [n, 1]) -> [n, block]` gives that block's e, whose cumulative sum finds the
    entry. -> (ids [n], Z [n])."""
    cb = torch.cumsum(bsum, dim=-1)                                                # [n, nb] cumulative block sums
    z = cb[:, -1]
    t = torch.minimum((u * z)[:, None], _below(cb[:, -1:])).contiguous()           # [n, 1] target mass
    b = torch.searchsorted(cb, t, right=True)                                      # [n, 1] its block
    before = torch.where(b > 0, cb.gather(1, (b - 1).clamp_(min=0)), torch.zeros_like(t))
    inner = torch.cumsum(block_of(b), dim=-1)                                      # [n, block]
    t_in = torch.minimum((t - before).clamp_(min=0), _below(inner[:, -1:])).contiguous()
    return (b * inner.shape[1] + torch.searchsorted(inner, t_in, right=True))[:, 0], z


def fused_rows(raw: torch.Tensor, temp: torch.Tensor, cap: float | None, uniform: torch.Tensor, embedding=None,
               embed_scale: torch.Tensor | None = None, alternatives: int = 0) -> RowResult:
    """The fast sampler (`_fast_rows`) on the head's raw logits [n, V], before the softcap, with the logits read
    twice and e written once, by one Triton kernel (kernels.sampler_rows; CUDA with DGEMMA_FUSED=sampler, or
    Triton's interpreter in tests), instead of ~10 passes of torch ops over fp32 [n, V] tensors. e is stored in
    the embedding's dtype, which is what the self-conditioning matmul reads; a second kernel
    (kernels.sample_search) draws the sample as two_level_search does: the first kernel's fp32 block sums,
    then one block's e recomputed in fp32 from the raw logits. Same outputs as
    sample_rows(head(raw), temp, uniform=...) up to rounding. alternatives: as sample_rows, from a torch topk of
    the raw logits (the softcap and the temperature keep their order)."""
    from . import kernels
    t = temp.to(device=raw.device, dtype=torch.float32).reshape(-1).expand(raw.shape[0]).contiguous()   # [n]
    amax, z, ent, e, bsum = kernels.sampler_rows(raw, t, cap, INVERSE_CDF_BLOCK,
                                                  torch.float32 if embedding is None else embedding.dtype)
    sample = kernels.sample_search(raw, t, cap, amax, bsum, uniform.to(raw.device).clamp_min(U_MIN), INVERSE_CDF_BLOCK)
    soft = None if embedding is None else (embedding.mix(e).float() / z[:, None] * embed_scale).to(embedding.dtype)
    res = RowResult(sample, amax, ent, soft, -z.log())
    if alternatives:
        def lam(x: torch.Tensor) -> torch.Tensor:                 # the kernel's lam of raw logits x [n, m]
            x = x.float()
            return (x if not cap else torch.tanh(x / cap) * cap) / t[:, None]
        vals, ids = raw.topk(alternatives, dim=-1)
        res.top_ids, res.top_logprobs = argmax_first(ids, amax), lam(vals) - lam(raw.gather(1, amax[:, None])) - \
            z.log()[:, None]
    return res


def _below(x: torch.Tensor) -> torch.Tensor:
    """The largest float smaller than x (x > 0)."""
    return torch.nextafter(x, torch.zeros_like(x))


def entropy_bound_accept(ent: torch.Tensor, bound: float | torch.Tensor) -> torch.Tensor:
    """[B, C] entropies -> [B, C] bool: accept the k lowest-entropy positions while sum_{j<k} h_(j) <= bound
    (a float, or a [B, 1] fp32 tensor of per-row bounds: the same fp32 comparison)."""
    sorted_h, order = torch.sort(ent, dim=-1, descending=False)
    keep = torch.cumsum(sorted_h, dim=-1) - sorted_h <= bound
    return torch.scatter(torch.zeros_like(keep), -1, order, keep)


NEVER = 1 << 62   # a stability no row reaches: rows without the stop rule in a batch with it (the engine)


def stop_rule(stability: int | None, confidence: float | None) -> tuple[int, float] | None:
    """The stable-and-confident rule's (stability, confidence), or None when either is None (the rule is off,
    as in the reference). A stability past NEVER, which no run reaches either, becomes NEVER (a tensor holds it)."""
    if stability is None or confidence is None:
        return None
    return min(stability, NEVER), confidence


def stable_and_confident(argmax: torch.Tensor, prev: torch.Tensor, run: torch.Tensor, ent: torch.Tensor,
                         stability: int | torch.Tensor, confidence: float | torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's StableAndConfidentStoppingCriteria for rows of argmax canvases [B, C] and entropies [B, C]:
    stop where the argmax is the same as at each of the last `stability` steps and the mean entropy is below
    `confidence` (numbers, or [B] tensors of per-row thresholds). The reference keeps a history of `stability`
    canvases; since equality is transitive, a count per row of steps in a row with an unchanged argmax
    (`run` [B], 0 at a canvas's start, with `prev` [B, C] = -1 there as the reference's history) decides the same,
    in a few kernels whatever the stability. -> (stop [B] bool, the new run [B])."""
    run = torch.where((argmax == prev).all(dim=-1), run + 1, 0)
    return (run >= stability) & (ent.mean(dim=-1) < confidence), run


class StableAndConfident:
    """`stable_and_confident` with its state, for a batch whose rows all start a canvas together (generate);
    stability and confidence as `stop_rule` gives them."""

    def __init__(self, stability: int, confidence: float, batch: int, length: int, device) -> None:
        self.stability, self.confidence = stability, confidence
        self.prev = torch.full((batch, length), -1, dtype=torch.long, device=device)
        self.run = torch.zeros(batch, dtype=torch.long, device=device)

    def __call__(self, argmax: torch.Tensor, ent: torch.Tensor) -> torch.Tensor:
        stop, self.run = stable_and_confident(argmax, self.prev, self.run, ent, self.stability, self.confidence)
        self.prev = argmax                  # (read only: the callers never write an argmax in place)
        return stop
