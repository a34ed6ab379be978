"""The one block-diffusion generate loop (spec section 4).

Knows: the outer loop over canvases (encode the prompt or the last committed canvas, denoise a fresh
random canvas, commit its argmax, EOS/pad rules) and the inner denoising loop; chunking the head and
the sampler over canvas rows so no [B, C, V] fp32 tensor is ever materialised.
Does not know: text (token ids only), checkpoints, HTTP.

Padding: pass `attention_mask` [B, L] (1 = token, 0 = pad) for prompts of different lengths. Padded
positions are masked out as keys everywhere; positions are not shifted (as in the reference), which
changes nothing because RoPE only sees relative distances. Left padding is the natural layout.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from . import graphs, kernels, sampling
from .cache import KVCache
from .config import SamplerConfig

_UNSET: Any = object()


@dataclass
class GenerateOutput:
    sequences: torch.Tensor          # [B, prompt + new]; new tokens come in whole canvases
    tokens_per_forward: torch.Tensor  # [B] non-pad new tokens / decoder passes of that row
    decoder_passes: torch.Tensor     # [B] decoder passes counted for each row
    cache: KVCache                   # encoder K/V of everything except the last canvas (for continuing)
    stop_fired: torch.Tensor | None = None    # [B] canvases of each row on which the stable-and-confident rule fired
    # [B, new] fp32: each new token's log-probability under the distribution of the step its canvas converged at
    # (the last, or where the stop rule froze the row; temperature and top_k / top_p applied); 0 where pad replaced
    # the token (after EOS, rows already finished)
    logprobs: torch.Tensor | None = None


def check_penalties(presence: float, frequency: float) -> None:
    """Presence / frequency penalties are numbers in [-MAX_BIAS, MAX_BIAS] (OpenAI's range is -2 to 2)."""
    for name, x in (("presence_penalty", presence), ("frequency_penalty", frequency)):
        if isinstance(x, bool) or not (isinstance(x, (int, float)) and abs(x) <= sampling.MAX_BIAS):
            raise ValueError(f"{name} must be a number in [-{sampling.MAX_BIAS:g}, {sampling.MAX_BIAS:g}]")


def check_positions(cfg, context: int, new: int) -> None:
    """Refuse a request whose positions would pass max_position_embeddings."""
    if context + new > cfg.max_position_embeddings:
        raise ValueError(f"{context} context + {new} new tokens exceed max_position_embeddings "
                         f"({cfg.max_position_embeddings})")


PROMPT_CHUNK = 4096       # prompt tokens per encoder pass at most (prefill)
MASK_PAIRS = 1 << 26      # and (query, key) pairs per pass once the context is long (~8 bytes of masks a pair)


def pass_tokens(context: int) -> int:
    """New tokens per prompt pass after `context` cached ones: PROMPT_CHUNK, fewer (down to 256) once
    (context + PROMPT_CHUNK) * PROMPT_CHUNK would pass MASK_PAIRS, i.e. beyond 12,288 cached tokens."""
    return min(PROMPT_CHUNK, max(256, MASK_PAIRS // (context + PROMPT_CHUNK)))


def prefill(model, ids: torch.Tensor, cache: KVCache, valid: torch.Tensor | None = None) -> torch.Tensor:
    """model.encode over a prompt ids [B, L] (valid: its [B, L] attention mask) in passes of `pass_tokens` tokens.
    A pass over S new tokens after c cached ones builds [B, S, c + S] masks; one pass over a 32k-token prompt
    built ~20 GB of them. So a long prompt is encoded chunk after chunk, each reading the cache the ones before
    it wrote. That is the same sums up to rounding, and a prompt of up to PROMPT_CHUNK tokens after at most 12,288
    cached ones is one pass, the reference's, bit for bit. -> the hidden states of the last pass [B, S, H]."""
    L, s = ids.shape[1], 0
    while True:
        S = pass_tokens(max(cache.lengths[:cache.n], default=0))
        h = model.encode(ids[:, s:s + S], cache, None if valid is None else valid[:, s:s + S])
        s += S
        if s >= L:
            return h


def resolve_settings(model, **given: Any) -> SamplerConfig:
    """Sampler settings: explicit arguments over the checkpoint's generation_config.json."""
    base = model.sampler_config
    vals = {k: (getattr(base, k) if v is _UNSET else v) for k, v in given.items()}
    cfg = SamplerConfig(**vals)
    cfg.validate()
    return cfg


@torch.inference_mode()
def generate(model, input_ids, *, attention_mask: torch.Tensor | None = None,
             max_new_tokens: int = _UNSET, max_denoising_steps: int = _UNSET, entropy_bound: float = _UNSET,
             t_min: float = _UNSET, t_max: float = _UNSET, stability_threshold: int | None = _UNSET,
             confidence_threshold: float | None = _UNSET, eos_token_id: int | list[int] | None = _UNSET,
             pad_token_id: int | None = _UNSET, seed: int | None = None, cache: KVCache | None = None,
             on_canvas: Callable[[torch.Tensor], None] | None = None,
             sampler: str = "auto", row_chunk: int | None = None,
             cuda_graphs: bool | None = None, top_k: int = 0, top_p: float = 1.0,
             presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
             logit_bias: dict[int, float] | None = None) -> GenerateOutput:
    """Generate whole canvases after `input_ids` [B, L].

    Arguments left out come from generation_config.json; `eos_token_id=None` / `pad_token_id=None` /
    `stability_threshold=None` disable that rule, as in the reference. With `seed`, a private generator
    is used and a CPU fp32 run equals the reference's `generate` after `torch.manual_seed(seed)`.
    `cache`: continue a conversation; `input_ids` must then hold only uncached tokens (the previous
    output's last canvas plus the new turn). The cache is extended in place (the output's `cache` is the same
    object): to continue from one point twice (try a turn again), pass `cache.clone()`.
    `on_canvas(tokens [B, C])` is called after each commit.
    `sampler`: "exact" draws random numbers exactly like the reference (the seeded contract); "fast"
    samples the same distribution with one uniform per position (see sampling.sample_rows); "auto" (the
    default) is exact on the CPU in fp32 and fast elsewhere.
    `cuda_graphs`: run each fast-sampler denoising step as one replayed CUDA graph (default: with the fast
    sampler where the model is capturable: CUDA, bf16). The step then uses the cache's static plan; where the
    model is not capturable, True runs that same path eagerly.
    `top_k` / `top_p` (0 / 1: off): each position's distribution truncated before the temperature, as the
    reference does with transformers' TopKLogitsWarper / TopPLogitsWarper as its `logits_processor`
    (sampling.dropped); every step sorts its logits then, and runs eagerly (no CUDA graph, no fused sampler).
    `presence_penalty` / `frequency_penalty` / `logit_bias` (OpenAI's): every step adds to each position's logits,
    before truncation and temperature, logit_bias {token id: value} less the penalties of the tokens each row has
    committed in earlier canvases (sampling.penalised); such steps run eagerly too.
    """
    sampler = sampling.resolve_sampler(sampler, model.device, model.dtype)
    s = resolve_settings(model, max_new_tokens=max_new_tokens, max_denoising_steps=max_denoising_steps,
                         entropy_bound=entropy_bound, t_min=t_min, t_max=t_max,
                         stability_threshold=stability_threshold, confidence_threshold=confidence_threshold,
                         eos_token_id=eos_token_id, pad_token_id=pad_token_id, top_k=top_k, top_p=top_p)
    trunc = sampling.truncation(s.top_k, s.top_p, model.config.vocab_size)
    check_penalties(presence_penalty, frequency_penalty)
    bias = sampling.logit_bias_vector(logit_bias, model.config.vocab_size, model.device)
    ids = model._ids(input_ids)
    B, L = ids.shape
    if L == 0 and (cache is None or cache.length == 0):
        raise ValueError("generate needs at least one prompt token")
    cfg, dev = model.config, model.device
    CL, V = cfg.canvas_length, cfg.vocab_size
    row_chunk = row_chunk or default_row_chunk(model, sampler)
    gen = torch.Generator(device=dev).manual_seed(int(seed)) if seed is not None else None
    n_canvas = math.ceil(s.max_new_tokens / CL)
    if cache is not None and cache.n != B:
        raise ValueError(f"cache holds {cache.n} rows but input_ids has {B}")
    cur_len = (0 if cache is None else cache.length) + L
    check_positions(cfg, cur_len, n_canvas * CL)       # before any memory is taken for them
    if cache is None:
        cache = model.workspace_cache(B, L + n_canvas * CL)
    cache.reserve(cur_len + n_canvas * CL)
    # the reference's MaxLengthCriteria: len(input_ids) >= max_new_tokens + cached + prompt. It fires on the last
    # canvas at the latest (never when continuing from a cache, since input_ids excludes the cached part)
    max_length = s.max_new_tokens + cur_len
    eos = torch.tensor(s.eos_token_id, device=dev) if s.eos_token_id is not None else None
    valid = None if attention_mask is None else torch.as_tensor(attention_mask, device=dev).bool()
    if valid is not None and valid.shape != ids.shape:
        raise ValueError(f"attention_mask shape {tuple(valid.shape)} != input_ids shape {tuple(ids.shape)}")
    if valid is not None and L:          # a row with no token and no cached history has nothing to go on
        empty = ~valid.any(-1) & (torch.tensor(cache.lengths[:B], device=dev) == 0 if cache is not None else True)
        if bool(empty.any()):
            raise ValueError(f"attention_mask row {int(empty.nonzero()[0])} has no token")
    rule = sampling.stop_rule(s.stability_threshold, s.confidence_threshold)

    finished = torch.zeros(B, dtype=torch.bool, device=dev)
    passes = torch.zeros(B, dtype=torch.int32, device=dev)
    fired = torch.zeros(B, dtype=torch.int32, device=dev)
    noise = torch.empty(min(row_chunk, B * CL), V, device=dev) if sampler == "exact" else None
    if cuda_graphs is None:
        cuda_graphs = sampler == "fast" and model.graph_safe()
    if cuda_graphs and sampler != "fast":
        raise ValueError("cuda_graphs needs sampler='fast' (the exact sampler's random stream runs eagerly)")
    fast = _FastStep(model, cache, row_chunk, s.entropy_bound, cuda_graphs, trunc) if sampler == "fast" else None
    # T(n) for n = N..1, computed on the CPU exactly as the reference does, moved to the device once
    temps = torch.tensor(sampling.temperatures(s.max_denoising_steps, s.t_min, s.t_max), dtype=torch.float32,
                         device=dev)
    seq, logprobs = ids, []
    counts = torch.zeros(B, V, device=dev) if presence_penalty or frequency_penalty else None   # committed tokens
    for c in range(n_canvas):
        step_bias = sampling.penalised(bias, counts, presence_penalty, frequency_penalty)    # [V], [B, V] or None
        step_bias = step_bias.expand(B, V) if step_bias is not None else None
        if c == 0 and L:   # encode the prompt, then each committed canvas at the positions it had
            prefill(model, seq, cache, valid)
        elif c:
            model.encode(seq[:, -CL:], cache)
        canvas = sampling.init_canvas(B, CL, V, dev, gen)
        argmax, soft, lp = canvas, None, torch.zeros(B, CL, device=dev)
        frozen = torch.zeros(B, dtype=torch.bool, device=dev)
        n_frozen = 0                                     # rows of `frozen` set (read once a step)
        stopper = sampling.StableAndConfident(*rule, B, CL, dev) if rule else None
        for i in range(s.max_denoising_steps):
            passes += ~(frozen | finished)
            temp = temps[i]
            if fast is not None:
                new_canvas, new_argmax, ent, new_soft, new_lp = fast(canvas, soft, temp, gen, step_bias)
            else:
                new_canvas, new_argmax, ent, new_soft, new_lp = denoise_step(
                    model, cache, canvas, soft, temp, s.entropy_bound, row_chunk,
                    exponentials=lambda r0, r1: noise[:r1 - r0].exponential_(1, generator=gen),
                    renoise=lambda: sampling.init_canvas(B, CL, V, dev, gen), truncation=trunc, bias=step_bias)
            if stopper is not None:
                if n_frozen:      # frozen rows keep canvas, argmax, its log-probs and self-conditioning input
                    new_argmax = torch.where(frozen[:, None], argmax, new_argmax)
                    new_lp = torch.where(frozen[:, None], lp, new_lp)
                    new_canvas = torch.where(frozen[:, None], canvas, new_canvas)
                    new_soft = torch.where(frozen[:, None, None], soft, new_soft)
                frozen |= stopper(new_argmax, ent)
            canvas, argmax, soft, lp = new_canvas, new_argmax, new_soft, new_lp
            if stopper is not None:                      # the only per-step host sync, and only if asked
                n_frozen = int(frozen.sum())
                if n_frozen == B:
                    break
        if stopper is not None:
            fired += frozen & ~finished                  # rows the rule stopped (rows done earlier: not counted)
        seq = torch.cat([seq, argmax], dim=1)
        finished = _finalize(seq, finished, CL, eos, s.pad_token_id, max_length)
        if counts is not None:                           # (pad after an EOS: counted for rows already done)
            counts.scatter_add_(1, seq[:, -CL:], torch.ones(B, CL, device=dev))
        logprobs.append(torch.where(seq[:, -CL:] == argmax, lp, 0.0))
        if on_canvas is not None:
            on_canvas(seq[:, -CL:])
        if bool(finished.all()):
            break
    new = seq[:, L:]
    n_valid = (new != s.pad_token_id).sum(-1) if s.pad_token_id is not None else torch.full_like(passes, new.shape[1])
    return GenerateOutput(seq, n_valid / passes, passes, cache, fired, torch.cat(logprobs, dim=1))


def default_row_chunk(model, sampler: str) -> int:
    """Canvas rows per sampler chunk when the caller names none: sampling.rows_per_chunk, with the fused
    kernel's larger chunks where denoise_step will use it (the fast sampler with DGEMMA_FUSED=sampler)."""
    fused = sampler == "fast" and kernels.fused("sampler", torch.empty(0, device=model.device))
    return sampling.rows_per_chunk(model.config.vocab_size, fused)


def denoise_step(model, cache: KVCache, canvas: torch.Tensor, soft: torch.Tensor | None, temp: torch.Tensor,
                 bound: float | torch.Tensor, row_chunk: int, *, static: bool = False,
                 exponentials: Callable[[int, int], torch.Tensor] | None = None,
                 uniform: torch.Tensor | None = None,
                 renoise: torch.Tensor | Callable[[], torch.Tensor] | None = None,
                 greedy: torch.Tensor | None = None, truncation: tuple | None = None, alternatives: int = 0,
                 bias: torch.Tensor | None = None):
    """One denoising step of the rows in `canvas` [B, C] (generate's batch or the engine's requests):
    denoiser pass, then head and sampler chunk by chunk over the B*C canvas rows, then entropy-bound
    acceptance. -> (next canvas, argmax, entropy [B, C], soft [B, C, H], the argmax's log-probability [B, C]).

    temp: a scalar tensor or [B*C, 1]; bound: a float or [B, 1] fp32 tensor.
    exact: `exponentials(r0, r1)` returns the Exp(1) draws [r1 - r0, V] for canvas rows r0..r1 and `renoise()`
    the [B, C] renoise ids, called in the reference's order (each chunk's draws before its sampling, renoise
    after all of them). fast: `uniform` [B*C] and `renoise` [B, C] tensors drawn by the caller, which makes the
    step a pure function of its tensors: what lets CUDA graphs capture it.
    greedy: [B] bool; those rows' accepted positions take the argmax instead of the sample.
    truncation: (top_k, top_p) for sampling.dropped, each a number or a [B*C] tensor; None: off. Its sort about
    doubles a chunk's memory: the fast sampler's chunks are then at most half the plain sampler's rows (the
    exact sampler's stay the caller's, whose exponentials(r0, r1) may expect whole canvases); with a bias, at
    most the plain sampler's.
    alternatives: N > 0 adds two outputs, each position's N most likely tokens [B, C, N] and their log-probabilities
    [B, C, N] (sampling.sample_rows), under the same distribution as the argmax's log-probability.
    bias: [B, V] fp32 added to every position's softcapped logits of that row before truncation and temperature
    (the engine's logit_bias and presence / frequency penalties); None: nothing added."""
    B, C = canvas.shape
    if exponentials is None and (truncation is not None or bias is not None):   # the torch sampler, not the fused
        row_chunk = max(1, min(row_chunk, sampling.rows_per_chunk(model.config.vocab_size)   # kernel's larger chunks
                               // (2 if truncation is not None else 1)))
    h = model.denoise(canvas, cache, soft, static=static).reshape(B * C, -1)     # [B*C, H]
    emb, scale = model.embed_tokens, model.embed_scale()
    fused = exponentials is None and truncation is None and bias is None and kernels.fused("sampler", h)
    parts = []
    for r in range(0, B * C, row_chunk):
        hr = h[r:r + row_chunk]                                                 # [rows, H]
        t = temp if temp.dim() == 0 else temp[r:r + row_chunk]
        cut = {} if truncation is None else dict(zip(("top_k", "top_p"), (
            x[r:r + row_chunk] if isinstance(x, torch.Tensor) else x for x in truncation)))
        if fused:     # one Triton kernel over the raw logits [rows, V] (sampling.fused_rows)
            parts.append(sampling.fused_rows(emb.logits(hr), t, model.config.final_logit_softcapping,
                                             uniform[r:r + row_chunk], emb, scale, alternatives))
            continue
        logits = model.head(hr)                                                 # fp32 softcapped [rows, V]
        if bias is not None:                                                    # each canvas row its batch row's
            logits += bias.index_select(0, torch.arange(r, r + hr.shape[0], device=bias.device) // C)
        noise = exponentials(r, r + hr.shape[0]) if exponentials is not None else None
        parts.append(sampling.sample_rows(logits, t, noise, emb, scale, None if noise is not None else
                                          uniform[r:r + row_chunk], **cut, alternatives=alternatives))
    res = sampling.RowResult.cat(parts, B, C)
    accept = sampling.entropy_bound_accept(res.entropy, bound)
    renoise = renoise() if callable(renoise) else renoise
    sample = res.sample if greedy is None else torch.where(greedy[:, None], res.argmax, res.sample)
    out = torch.where(accept, sample, renoise), res.argmax, res.entropy, res.soft, res.logprob
    return out + (res.top_ids, res.top_logprobs) if alternatives else out


class _FastStep:
    """The fast sampler's denoising step as one function of tensors (canvas, soft, temperature, uniforms,
    renoise ids), so that on CUDA it can be captured once and replayed (graphs.StepGraphs). Random numbers
    are drawn before the step: B*C uniforms, then the renoise ids."""

    def __init__(self, model, cache: KVCache, row_chunk: int, bound: float, static: bool,
                 truncation: tuple | None = None) -> None:
        self.model, self.cache, self.row_chunk, self.bound, self.static = model, cache, row_chunk, bound, static
        self.truncation = truncation
        self.graphs = graphs.for_model(model) if static and truncation is None else None   # (a sort: eager)

    def __call__(self, canvas: torch.Tensor, soft: torch.Tensor | None, temp: torch.Tensor, gen,
                 bias: torch.Tensor | None = None):
        m, (B, C) = self.model, canvas.shape
        dev = canvas.device
        uniform = torch.rand(B * C, device=dev, generator=gen)
        renoise = sampling.init_canvas(B, C, m.config.vocab_size, dev, gen)
        if self.graphs is None or bias is not None:     # (a bias: an eager step)
            return self.step(canvas, soft, temp, uniform, renoise, bias)
        if soft is None:   # a zero signal gives exactly the no-signal embedding: one graph for every step
            soft = torch.zeros(B, C, m.config.hidden_size, dtype=m.dtype, device=dev)
        key = ("denoise", B, C, self.cache.n, self.cache.key_slots(C, True), self.row_chunk, self.bound,
               graphs.buffer_key(*self.cache.tensors()))
        return self.graphs.run(key, self.step, canvas, soft, temp, uniform, renoise)

    def step(self, canvas, soft, temp, uniform, renoise, bias=None):
        return denoise_step(self.model, self.cache, canvas, soft, temp, self.bound, self.row_chunk,
                            static=self.static, uniform=uniform, renoise=renoise, truncation=self.truncation,
                            bias=bias)


def _finalize(seq: torch.Tensor, finished: torch.Tensor, CL: int, eos: torch.Tensor | None,
              pad: int | None, max_length: int) -> torch.Tensor:
    """Apply the end-of-canvas rules in place on seq's last canvas; returns the new `finished` [B]."""
    new = seq[:, -CL:]
    done_now = torch.zeros_like(finished) if eos is None else torch.isin(new, eos).any(-1)
    done_now |= seq.shape[1] >= max_length
    was = finished
    finished = was | done_now
    if pad is not None and bool(finished.any()):
        new[was] = pad                                   # rows finished earlier: all pad
        if eos is not None and bool(done_now.any()):     # after the first EOS: pad
            is_eos = torch.isin(new, eos)
            cum = is_eos.cumsum(-1)
            new[(cum > 0) & ~((cum == 1) & is_eos)] = pad
    return finished


@dataclass
class AROutput:
    sequences: torch.Tensor          # [B, prompt + max_new_tokens]; pad after EOS
    tokens_per_forward: torch.Tensor  # [B] (at most 1: one encoder pass per token)
    step_logits: torch.Tensor | None  # [B, new, V] the logits each token was chosen from (if asked)


@torch.inference_mode()
def generate_ar(model, input_ids, *, max_new_tokens: int = 256, temperature: float = 0.0,
                eos_token_id: int | list[int] | None = _UNSET, pad_token_id: int | None = _UNSET,
                seed: int | None = None, return_logits: bool = False,
                on_token: Callable[[torch.Tensor], None] | None = None,
                cuda_graphs: bool | None = None) -> AROutput:
    """Autoregressive decoding through the causal encoder with the same weights and cache: the honest
    baseline for "how much faster is diffusion". temperature 0 = greedy.
    `cuda_graphs` (default: where the model is capturable: CUDA, bf16): each one-token step is a replayed CUDA
    graph over the cache's static plan (`KVCache.begin_step`); elsewhere True runs that same path eagerly."""
    s = resolve_settings(model, max_new_tokens=max_new_tokens, max_denoising_steps=_UNSET,
                         entropy_bound=_UNSET, t_min=_UNSET, t_max=_UNSET, stability_threshold=_UNSET,
                         confidence_threshold=_UNSET, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    ids = model._ids(input_ids)
    B, L = ids.shape
    if L == 0:
        raise ValueError("generate_ar needs at least one prompt token")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    check_positions(model.config, L, s.max_new_tokens)
    dev = model.device
    gen = torch.Generator(device=dev).manual_seed(int(seed)) if seed is not None else None
    cache = model.workspace_cache(B, L + s.max_new_tokens, scratch=1)
    eos = torch.tensor(s.eos_token_id or [], device=dev)
    finished = torch.zeros(B, dtype=torch.bool, device=dev)
    logits = model.head(prefill(model, ids, cache)[:, -1])                      # [B, V]
    store = graphs.for_model(model) if (model.graph_safe() if cuda_graphs is None else cuda_graphs) else None

    def one_token(tok: torch.Tensor) -> tuple[torch.Tensor]:                   # tok [B, 1] -> ([B, V],)
        return (model.head(model.encode_step(tok, cache)[:, -1]),)

    def next_logits(tok: torch.Tensor) -> torch.Tensor:
        if store is None:
            return model.head(model.encode(tok[:, None], cache)[:, -1])
        key = ("ar", B, cache.n, cache.step_slots(), graphs.buffer_key(*cache.tensors()))
        (out,) = store.run(key, one_token, tok[:, None])
        cache.advance_host()
        return out
    out, kept = [], []
    for _ in range(s.max_new_tokens):
        if return_logits:
            kept.append(logits)
        if temperature > 0:
            tok = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=gen)[:, 0]
        else:
            tok = logits.argmax(-1)
        if s.pad_token_id is not None:
            tok = torch.where(finished, torch.full_like(tok, s.pad_token_id), tok)
        out.append(tok)
        finished |= torch.isin(tok, eos)
        if on_token is not None:
            on_token(tok)
        if len(out) == s.max_new_tokens or (eos.numel() and bool(finished.all())):   # (no EOS: no host sync)
            break
        logits = next_logits(tok)
    new = torch.stack(out, 1)
    if len(out) < s.max_new_tokens:
        fill = s.pad_token_id if s.pad_token_id is not None else 0
        new = torch.cat([new, new.new_full((B, s.max_new_tokens - len(out)), fill)], 1)
    n_valid = (new != s.pad_token_id).sum(-1) if s.pad_token_id is not None else torch.full((B,), len(out))
    return AROutput(torch.cat([ids, new], 1), n_valid / len(out),
                    torch.stack(kept, 1) if return_logits else None)
