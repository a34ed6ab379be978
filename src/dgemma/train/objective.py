"""The training objective (spec section 5): single-canvas form, and all canvases in one block-causal pass.

Per example: one causal encoder pass over the clean sequence gives next-token cross-entropy (the AR
loss) and the encoder K/V of every position. One canvas is chosen uniformly among the canvases that
hold scored tokens, its tokens are replaced by uniform random ids with probability t ~ U(eps, 1-eps),
and the denoiser (reading the encoder K/V of the clean context before that canvas: all of it on full
layers, the last W-1 positions on sliding layers, exactly as at inference) is scored by cross-entropy on
the canvas's scored tokens, corrupted or not. Self-conditioning with probability `sc_prob` per example:
a no-grad first denoiser pass gives logits whose soft embedding feeds the trained second pass; other
examples get an exactly zero signal (as at the first inference step).

Choices the spec leaves open (written down here):
  * losses are token means over the batch (not per-example means), each weighted 1 by default;
  * the self-conditioning logits fed to pass 2 are pass 1's raw logits (no temperature);
  * gradients of the denoiser loss flow into the encoder K/V (no stop-gradient on the cache);
  * a canvas is valid when it has at least one scored token; examples with none skip the denoiser loss;
  * optionally (`t_power` < 1) the noise level leans towards heavy noise, where the sampler spends most steps;
  * optionally (`sc_temperature` = (lo, hi)) pass 1's logits are divided by the temperature the sampler would
    use at that noise level, T = lo + (hi - lo) * t, before the soft embedding: at inference the self-conditioning
    input is the previous step's *temperature-scaled* logits (spec 4.2, step 7), so with the spec's raw logits a
    model trained at temperature 1 sees much sharper inputs when sampled at 0.1-0.3 (docs/NOTES.md measures it);
  * optionally (`unroll_prob` > 0) pass 2 of that fraction of examples denoises what one sampler step would make
    of pass 1 (an unrolled step, after SUNDAE, arXiv 2112.06749): its canvas holds pass 1's samples (at the
    sampler's temperature for that noise level with `sc_temperature`, else at 1) where the entropy bound
    `unroll_bound` accepts them and uniform random ids elsewhere (spec 4.2, steps 3-5), always with pass 1 as
    self-conditioning. At inference every step after the first sees such a canvas, whose kept tokens are the
    model's own guesses, not clean tokens.
Knows: the model's `embed`, `run_layers`, `self_conditioning`, `head`. Does not know: data or optimisers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..model import attention
from ..sampling import below_max, entropy, entropy_bound_accept, init_canvas


@dataclass
class ObjectiveConfig:
    context_length: int              # tokens before the first canvas in each training sequence
    ar_weight: float = 1.0
    diffusion_weight: float = 1.0
    sc_prob: float = 0.5
    t_eps: float = 1e-4
    t_power: float = 1.0             # t = u ** t_power, u ~ U(eps, 1-eps): 1 = the spec's uniform t
    all_canvases: bool = False       # score every canvas in one block-causal pass (else one per example)
    sc_temperature: tuple[float, float] | None = None   # (t_min, t_max) of the sampler; None = raw logits (spec)
    unroll_prob: float = 0.0         # fraction of examples whose pass 2 sees one sampler step's canvas
    unroll_bound: float = 1.0        # the entropy bound of that step (the shipped sampler's)


def _encoder_pass(model, ids: torch.Tensor):
    """Causal pass over clean ids [B, L] -> (hidden [B, L, H], per-layer (k, v) [B, Hkv, L, D])."""
    B, L = ids.shape
    W = model.config.sliding_window
    pos = torch.arange(L, device=ids.device)
    causal = pos[None, :] <= pos[:, None]                            # [L, L]
    window = causal & (pos[None, :] > pos[:, None] - W)
    kv: list[tuple[torch.Tensor, torch.Tensor]] = []

    def attend_for(i: int):
        mask = window if model.layers[i].sliding else causal

        def attend(q, k, v):
            kv.append((k, v))
            return attention(q, k, v, mask)
        return attend

    return model.run_layers(model.embed(ids), pos, attend_for, encoder=True), kv


def _denoiser_pass(model, canvas: torch.Tensor, start: torch.Tensor, kv, soft: torch.Tensor | None):
    """canvas [B, n*C]: n canvases, block k at positions start[b, k] + [0, C) (start: [B] or [B, n]).
    Block k reads the encoder K/V of positions < start[b, k] (the last W-1 of them on sliding layers) and
    attends bidirectionally within itself only; with n = 1 this is exactly one inference denoising step."""
    B = canvas.shape[0]
    start = start.view(B, -1)                                          # [B, n]
    n = start.shape[1]
    C = canvas.shape[1] // n
    L = kv[0][0].shape[2]
    W1 = model.config.sliding_window - 1
    dev = canvas.device
    kpos = torch.arange(L, device=dev)
    s = start[:, :, None]                                              # [B, n, 1]
    ctx_full = kpos[None, None, :] < s                                 # [B, n, L]
    ctx_slide = ctx_full & (kpos[None, None, :] >= s - W1)
    block = torch.eye(n, dtype=torch.bool, device=dev).repeat_interleave(C, 1)      # [n, n*C]
    if n == 1:   # one canvas: a key-padding mask [B, 1, 1, L+C]
        m_full = torch.cat([ctx_full[:, 0], block.expand(B, -1)], 1)[:, None, None]
        m_slide = torch.cat([ctx_slide[:, 0], block.expand(B, -1)], 1)[:, None, None]
    else:        # block-causal: query rows of block k [B, 1, n*C, L+n*C]
        own = block[None].expand(B, -1, -1)
        m_full = torch.cat([ctx_full, own], 2).repeat_interleave(C, 1)[:, None]
        m_slide = torch.cat([ctx_slide, own], 2).repeat_interleave(C, 1)[:, None]
    positions = (s + torch.arange(C, device=dev)[None, None]).reshape(B, n * C)    # [B, n*C]

    def attend_for(i: int):
        mask = m_slide if model.layers[i].sliding else m_full
        k_enc, v_enc = kv[i]

        def attend(q, k, v):
            keys, vals = torch.cat([k_enc, k], 2), torch.cat([v_enc, v], 2)
            return attention(q, keys, vals, mask)
        return attend

    h = model.self_conditioning(model.embed(canvas), soft)
    return model.head(model.run_layers(h, positions, attend_for, encoder=False))


def losses(model, ids: torch.Tensor, score: torch.Tensor, cfg: ObjectiveConfig,
           generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """ids [B, L] clean tokens, score [B, L] bool (tokens that are trained on; False for prompts/padding).

    L = context_length + n * canvas_length. Returns {'loss', 'ar', 'diffusion'}.
    """
    B, L = ids.shape
    CL, V, P = model.config.canvas_length, model.config.vocab_size, cfg.context_length
    n_canvas = (L - P) // CL
    if n_canvas < 1 or P + n_canvas * CL != L:
        raise ValueError(f"sequence length {L} is not context {P} + a whole number of {CL}-token canvases")
    dev = ids.device
    h, kv = _encoder_pass(model, ids)
    # AR loss: position i predicts token i+1, scored where token i+1 is scored
    ar_logits = model.head(h[:, :-1])
    tgt_mask = score[:, 1:]
    ar = F.cross_entropy(ar_logits[tgt_mask], ids[:, 1:][tgt_mask]) if tgt_mask.any() else h.sum() * 0

    canv_score = score[:, P:].reshape(B, n_canvas, CL)
    if cfg.all_canvases:
        start, x0, mask, noisy, t = _noise_all_canvases(ids, canv_score, V, cfg, generator)
    else:
        start, x0, mask, noisy, t = _noise_one_canvas(ids, canv_score, V, cfg, generator)
    use_sc = torch.rand(B, device=dev, generator=generator) < cfg.sc_prob
    unroll = torch.zeros_like(use_sc)
    if cfg.unroll_prob > 0:                 # (no draw otherwise: runs without it keep their random stream)
        unroll = torch.rand(B, device=dev, generator=generator) < cfg.unroll_prob
        use_sc = use_sc | unroll
    soft = None
    if bool(use_sc.any()):
        with torch.no_grad():
            first = _denoiser_pass(model, noisy, start, [(k.detach(), v.detach()) for k, v in kv], None)
            if cfg.sc_temperature is not None:   # the sampler's temperature at this noise level
                lo, hi = cfg.sc_temperature
                first = first / (lo + (hi - lo) * t)[..., None]           # fp32 [B, N, V] (head: fp32 logits)
                if first.device.type == "cpu":   # the CPU's exp cliff and subnormal products (sampling.EXP_FLOOR):
                    below_max(first, first.amax(-1))                      # same softmax to ~1e-28
            soft = model.soft_embedding(first) * use_sc[:, None, None].to(model.dtype)
            if bool(unroll.any()):               # a sampler step for the unrolled examples only
                noisy = noisy.clone()
                noisy[unroll] = _sampler_step(first[unroll], CL, cfg.unroll_bound, generator)
    logits = _denoiser_pass(model, noisy, start, kv, soft)
    diff = F.cross_entropy(logits[mask], x0[mask]) if mask.any() else logits.sum() * 0
    loss = cfg.ar_weight * ar + cfg.diffusion_weight * diff
    return {"loss": loss, "ar": ar.detach(), "diffusion": diff.detach()}


def _sampler_step(lam: torch.Tensor, CL: int, bound: float, generator) -> torch.Tensor:
    """One sampler step on fp32 temperature-scaled logits lam [B, n*C, V] (n canvases of C = CL): a sample per
    position, the entropy-bound acceptance within each canvas, uniform random ids where not accepted -> [B, n*C]."""
    B, N, V = lam.shape
    sample = torch.multinomial(torch.softmax(lam, -1).reshape(B * N, V), 1, generator=generator).view(B, N)
    accept = entropy_bound_accept(entropy(lam).reshape(B * N // CL, CL), bound).view(B, N)
    return torch.where(accept, sample, init_canvas(B, N, V, lam.device, generator))


def _noise_level(cfg: ObjectiveConfig, shape: tuple[int, ...], dev, generator) -> torch.Tensor:
    """Per-canvas corruption probability t = u ** t_power, u ~ U(eps, 1 - eps)."""
    u = cfg.t_eps + (1 - 2 * cfg.t_eps) * torch.rand(shape, device=dev, generator=generator)
    return u ** cfg.t_power


def _noise_one_canvas(ids, canv_score, V: int, cfg: ObjectiveConfig, generator):
    """One valid canvas per example, chosen uniformly, noised at level t (_noise_level).
    -> start [B], clean x0 [B, C], scored mask [B, C], noisy [B, C], noise level per position t [B, C]."""
    B, n, CL = canv_score.shape
    dev = ids.device
    valid = canv_score.any(-1)                                            # [B, n]
    r = torch.rand(B, n, device=dev, generator=generator)
    idx = torch.where(valid, r, torch.full_like(r, -1.0)).argmax(-1)      # [B]
    start = cfg.context_length + idx * CL
    x0 = ids.gather(1, start[:, None] + torch.arange(CL, device=dev)[None])
    mask = canv_score[torch.arange(B, device=dev), idx] & valid.any(-1)[:, None]
    t = _noise_level(cfg, (B, 1), dev, generator)
    noisy = torch.where(torch.rand(B, CL, device=dev, generator=generator) < t,
                        torch.randint(0, V, (B, CL), device=dev, generator=generator), x0)
    return start, x0, mask, noisy, t.expand(B, CL)


def _noise_all_canvases(ids, canv_score, V: int, cfg: ObjectiveConfig, generator):
    """Every canvas noised at its own level t (_noise_level; scored in one block-causal pass).
    -> start [B, n], clean x0 [B, n*C], scored mask [B, n*C], noisy [B, n*C], noise level per position [B, n*C]."""
    B, n, CL = canv_score.shape
    dev, P = ids.device, cfg.context_length
    start = P + torch.arange(n, device=dev)[None].expand(B, n) * CL
    x0 = ids[:, P:]
    t = _noise_level(cfg, (B, n, 1), dev, generator)
    flip = (torch.rand(B, n, CL, device=dev, generator=generator) < t).reshape(B, n * CL)
    noisy = torch.where(flip, torch.randint(0, V, (B, n * CL), device=dev, generator=generator), x0)
    return start, x0, canv_score.reshape(B, n * CL), noisy, t.expand(B, n, CL).reshape(B, n * CL)
