"""The DiffusionGemma text network: one shared stack run two ways.

Knows: the forward math (spec section 2) — scaled embedding, sliding / full attention with k=v on full
layers and proportional partial RoPE, dense MLP in parallel with a top-k MoE whose router reads the raw
residual, per-layer scalars, self-conditioning, fp32 softcapped tied head.
  * encoder pass: causal, writes the KV cache (through a `KVCache`);
  * denoiser pass: bidirectional over [cache ; canvas], reads the cache and never writes it.
Does not know: sampling, checkpoints on disk, tokenizers. `generate` lives in `generate.py`.
"""
from __future__ import annotations

import os
import sys
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .cache import KVCache
from .config import ModelConfig, SamplerConfig
from .quant import QWeight


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm in fp32, scaled by `weight` itself (not 1 + weight), cast back to x's dtype. On CUDA one fused
    kernel (it computes in fp32 too); elsewhere the reference's op sequence."""
    if x.is_cuda and not torch.is_grad_enabled():
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    xf = x.float()
    y = xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + eps, -0.5)
    if weight is not None:
        y = y * weight.float()
    return y.type_as(x)


def linear(x: torch.Tensor, lin: nn.Module | torch.Tensor) -> torch.Tensor:
    """lin(x) for a bias-free nn.Linear (or x @ lin^T for a weight tensor); a quantized module runs itself. With
    DGEMMA_FUSED=gemv, for a decoding step's few rows (at most kernels.GEMV_MAX_ROWS, no autograd, a plain weight
    of x's dtype): one Triton kernel (kernels.linear) instead of cuBLAS's split-K GEMV and its reduction."""
    w = lin if isinstance(lin, torch.Tensor) else lin.weight if type(lin) is nn.Linear else None
    if (w is not None and not torch.is_grad_enabled() and w.dtype == x.dtype and w.stride(-1) == 1
            and x.numel() <= kernels.GEMV_MAX_ROWS * x.shape[-1] and kernels.fused("gemv", x)):
        return kernels.linear(x, w)
    return F.linear(x, lin) if isinstance(lin, torch.Tensor) else lin(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class Embedding(nn.Embedding):
    """The tied embedding and output head (quant.QEmbedding has the same methods for int8 weights)."""

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    def reset_parameters(self) -> None:
        """nn.Embedding's N(0, 1) init, skipped on the meta device (dgemma.load builds the model there, then reads
        every weight): a meta normal_ makes torch import torch._dynamo, ~1 s of every load's start."""
        if not self.weight.is_meta:
            super().reset_parameters()

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """h [.., H] -> h @ E^T [.., V] in h's dtype."""
        return F.linear(h, self.weight)

    def mix(self, p: torch.Tensor) -> torch.Tensor:
        """p [n, V] -> p @ E [n, H] in the embedding's dtype."""
        return torch.matmul(p.to(self.weight.dtype), self.weight)


class GatedMLP(nn.Module):
    """down(gelu_tanh(gate x) * up x), no biases."""

    def __init__(self, hidden: int, inner: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fused_ok(x):     # CUDA: two Triton kernels, the GELU product in the first one's epilogue
            H = x.shape[-1]
            y = kernels.mlp(x.reshape(-1, H), self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight)
            return y.view(x.shape)
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))

    def _fused_ok(self, x: torch.Tensor) -> bool:
        """kernels.mlp runs: CUDA, bf16 / fp16, plain weights, no autograd, Triton present, DGEMMA_FUSED=mlp."""
        return (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and not torch.is_grad_enabled()
                and all(type(m) is nn.Linear for m in (self.gate_proj, self.up_proj, self.down_proj))
                and kernels.fused("mlp", x))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def inv_frequencies(head_dim: int, theta: float, rotary_fraction: float, device: torch.device) -> torch.Tensor:
    """fp32 [head_dim/2]; proportional RoPE: n_rot = int(f*hd//2) frequencies over the full head_dim, rest 0."""
    n_rot = int(rotary_fraction * head_dim // 2)
    inv = 1.0 / (theta ** (torch.arange(0, 2 * n_rot, 2, dtype=torch.int64, device=device).float() / head_dim))
    return torch.cat([inv, torch.zeros(head_dim // 2 - n_rot, device=device)])


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.sliding = cfg.is_sliding(layer)
        self.head_dim, self.kv_heads = cfg.layer_head_dim(layer), cfg.layer_kv_heads(layer)
        self.heads, self.eps = cfg.num_attention_heads, cfg.rms_norm_eps
        H = cfg.hidden_size
        self.q_proj = nn.Linear(H, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(H, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(H, self.kv_heads * self.head_dim, bias=False) if self.sliding else None
        self.o_proj = nn.Linear(self.heads * self.head_dim, H, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slots: Callable[[], tuple] | None = None):
        """x: [B, S, H] -> q [B, Hq, S, D], k, v [B, Hkv, S, D] (k roped; full layers: v = raw k).
        slots: where a KV cache wants this pass's k and v (see KVCache.kv_slots); the fused kernel writes them
        there and returns k = v = None (the eager path ignores it)."""
        B, S, _ = x.shape
        w = self.packed_weight(x)
        if w is not None:         # one GEMM for q, k (and v): [B, S, Nq + Nk (+ Nv)], then views
            nq, nk = self.heads * self.head_dim, self.kv_heads * self.head_dim
            qkv = linear(x, w)
            q, k_raw = qkv[..., :nq], qkv[..., nq:nq + nk]
            v = qkv[..., nq + nk:] if self.v_proj is not None else None
        else:
            q, k_raw = linear(x, self.q_proj), linear(x, self.k_proj)
            v = linear(x, self.v_proj) if self.v_proj is not None else None
        q = q.view(B, S, self.heads, self.head_dim)
        k_raw = k_raw.view(B, S, self.kv_heads, self.head_dim)
        v = v.view(B, S, self.kv_heads, self.head_dim) if v is not None else None
        if not torch.is_grad_enabled() and kernels.fused("rope", x):   # norms and RoPE in one Triton kernel
            return kernels.norm_rope(q, k_raw, v, self.q_norm.weight, self.k_norm.weight, cos, sin, self.eps,
                                     slots() if slots is not None else None)
        v = k_raw if v is None else v
        q = self.q_norm(q).transpose(1, 2)
        k = self.k_norm(k_raw).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        v = rms_norm(v, None, self.eps).transpose(1, 2)
        return q, k, v

    def projections(self) -> list[nn.Module]:
        """The input projections in packed order: q, k, and v on sliding layers."""
        return [self.q_proj, self.k_proj] + ([self.v_proj] if self.v_proj is not None else [])

    def packed_weight(self, x: torch.Tensor) -> torch.Tensor | None:
        """With DGEMMA_FUSED=qkv (kernels.fused), in inference (no autograd): the q, k (and v) weights as one
        [Nq + Nk (+ Nv), H] matrix, a view, where they lie back to back in one buffer (DiffusionGemma packs them
        at its first such pass), for one GEMM instead of two or three. Else None."""
        if torch.is_grad_enabled() or not kernels.fused("qkv", x) or not self.packable() or not self.is_packed():
            return None
        ws = [m.weight for m in self.projections()]
        rows = sum(w.shape[0] for w in ws)
        return ws[0].as_strided((rows, ws[0].shape[1]), ws[0].stride())

    def packable(self) -> bool:
        """Plain (not quantized) projection weights."""
        return all(type(m) is nn.Linear for m in self.projections())

    def is_packed(self) -> bool:
        """The projection weights lie back to back in one buffer (`pack`)."""
        return _back_to_back([m.weight for m in self.projections()])

    def pack(self) -> None:
        """Move the q, k (and v) weights back to back into one new buffer (a plain tensor, even when called in
        inference mode, so that the weights stay trainable). Each Parameter stays the same object (an optimizer
        holding it is unaffected): its .data becomes a view of the buffer. Anything that makes new weight tensors
        (model.to, .half, a load with assign) leaves them apart again. Weights made in inference mode (a model
        built there, not trainable) get an inference tensor: torch refuses a plain .data under them."""
        ws = [m.weight for m in self.projections()]
        with torch.inference_mode(ws[0].is_inference()), torch.no_grad():
            buf = torch.cat([w.data for w in ws])                      # [Nq + Nk (+ Nv), H]
            start = 0
            for w in ws:
                w.data = buf[start:start + w.shape[0]]
                start += w.shape[0]


def _back_to_back(ws: list[torch.Tensor]) -> bool:
    """Contiguous 2-D tensors of one dtype and width, each starting where the previous one ends in one storage."""
    first = ws[0]
    if not all(w.is_contiguous() and w.dtype == first.dtype and w.shape[1:] == first.shape[1:] for w in ws):
        return False
    if any(w.untyped_storage().data_ptr() != first.untyped_storage().data_ptr() for w in ws):
        return False
    return all(b.data_ptr() == a.data_ptr() + a.numel() * a.element_size() for a, b in zip(ws, ws[1:]))


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.eps, self.k, self.root = cfg.rms_norm_eps, cfg.top_k_experts, cfg.hidden_size ** -0.5
        self.proj = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.scale = nn.Parameter(torch.ones(cfg.hidden_size))
        self.per_expert_scale = nn.Parameter(torch.ones(cfg.num_experts))

    def forward(self, r: torch.Tensor):
        """r: [T, H] raw residual -> weights [T, k] fp32, expert ids [T, k]."""
        z = rms_norm(r, None, self.eps) * self.scale * self.root
        probs = F.softmax(linear(z, self.proj), dim=-1, dtype=torch.float32)
        w, idx = torch.topk(probs, self.k, dim=-1)
        w = w / w.sum(dim=-1, keepdim=True)
        return w * self.per_expert_scale[idx], idx


class Experts(nn.Module):
    """Expert weights as 3-D tensors; tokens are grouped by expert and run through grouped matmuls (on CUDA
    torch._grouped_mm, or the fused Triton kernels of kernels.moe with DGEMMA_FUSED=moe)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        E, H, I = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, H))   # rows [0, I) gate, [I, 2I) up
        self.down_proj = nn.Parameter(torch.empty(E, H, I))

    def forward(self, x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """x: [T, H]; w, idx: [T, k] -> [T, H]. Slots are sorted by expert; each weighted term is cast to
        x's dtype and accumulated per token in ascending expert order (as the reference does)."""
        if self._fused_ok(x):     # CUDA: three Triton kernels, gathers, routing weights and combine inside
            return kernels.combine(self.fused_rows(x, w, idx), idx)
        xs, order, tok, offs = self.group(x, idx)
        if isinstance(self.down_proj, QWeight):   # quantized: per-expert kernels, or one grouped kernel on CUDA
            g, u = self.gate_up_proj.grouped(xs, offs).chunk(2, dim=-1)
            y = self.down_proj.grouped(F.gelu(g, approximate="tanh") * u, offs)
        elif self._grouped_ok(x):   # one grouped matmul per projection: no loop, no host sync
            y = self._grouped(xs, offs)
        else:                     # training / odd shapes: a loop over the experts that received tokens
            ys, start = [], 0
            for e, end in enumerate(offs.tolist()):
                if end > start:
                    g, u = F.linear(xs[start:end], self.gate_up_proj[e]).chunk(2, dim=-1)
                    ys.append(F.linear(F.gelu(g, approximate="tanh") * u, self.down_proj[e]))
                start = end
            y = torch.cat(ys)
        y = (y * w.reshape(-1)[order, None]).to(x.dtype)                # [T*k, H]
        return self.combine(y, order, tok, idx, x.is_cuda)

    def fused_rows(self, x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor,
                   by_expert: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Where _fused_ok: the k weighted expert outputs per token, uncombined, [T*k, H] at slots t * k + j
        (kernels.moe's first two kernels; the caller adds them: kernels.combine, or kernels.post_ffn).
        by_expert: the slots already sorted by expert, (order, offs) (kernels.route can give them); else sorted
        here (a decoding step's few slots in one kernel, kernels.route_order)."""
        if by_expert is None:
            E = self.gate_up_proj.shape[0]
            by_expert = kernels.route_order(idx, E) if idx.numel() <= kernels.ROUTE_ORDER_MAX else self.sort(idx)
        return kernels.moe(x, self.gate_up_proj, self.down_proj, idx, w, *by_expert, combined=False)

    @staticmethod
    def combine(y: torch.Tensor, order: torch.Tensor, tok: torch.Tensor, idx: torch.Tensor,
                cuda: bool) -> torch.Tensor:
        """Each token's k weighted rows of y [T*k, H] (expert-sorted) added in ascending expert order -> [T, H]:
        on the CPU a sequential index_add_ (the reference's rounding, bit for bit); on CUDA, where index_add_ uses
        atomics (run-to-run noise), gather_sum, which adds in the same order."""
        if not cuda:
            return torch.zeros(idx.shape[0], y.shape[1], dtype=y.dtype, device=y.device).index_add_(0, tok, y)
        return gather_sum(y, order, idx)

    def group(self, x: torch.Tensor, idx: torch.Tensor):
        """Sort the T*k (token, expert) slots by expert. -> xs [T*k, H] (the slots' token rows), order [T*k]
        (slot of each sorted row), tok [T*k] (its token), offs [E] (end of each expert's group)."""
        order, offs = self.sort(idx)
        tok = order // idx.shape[1]
        return x.index_select(0, tok), order, tok, offs

    def sort(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """idx [T, k] -> order [T*k] (the slots t * k + j sorted by expert, stable), offs [E] int32 (group ends)."""
        sorted_e, order = torch.sort(idx.reshape(-1), stable=True)
        # searchsorted, unlike bincount, never syncs with the host
        offs = torch.searchsorted(sorted_e, torch.arange(self.gate_up_proj.shape[0], device=idx.device), right=True,
                                  out_int32=True)                       # (the kernels' index type: no cast)
        return order, offs

    def _grouped(self, xs: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        """xs [T*k, H] grouped by expert, offs [E] int32 group ends -> [T*k, H]. (The transposed layout,
        W_e @ xs_e^T, would put the weights on the GEMM's M side, but torch's kernel then needs every group's
        token count to be a multiple of 8: a device-side assert otherwise.)"""
        gu = torch._grouped_mm(xs, self.gate_up_proj.transpose(1, 2), offs=offs)     # [T*k, 2I]
        g, u = gu.chunk(2, dim=-1)
        return torch._grouped_mm(F.gelu(g, approximate="tanh") * u, self.down_proj.transpose(1, 2), offs=offs)

    def _fused_ok(self, x: torch.Tensor) -> bool:
        """The fused Triton MoE (kernels.moe) runs: CUDA, bf16 / fp16, plain weights, no autograd, Triton
        present, and DGEMMA_FUSED=moe. (fp32 on CUDA keeps the exact per-expert loop.)"""
        return (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and not isinstance(self.down_proj, QWeight)
                and not (torch.is_grad_enabled() and (x.requires_grad or self.down_proj.requires_grad))
                and kernels.fused("moe", x))

    def _grouped_ok(self, x: torch.Tensor) -> bool:
        """torch._grouped_mm needs 16-byte aligned rows, takes only bf16 on CUDA, and has no reliable CPU
        backward."""
        if isinstance(self.down_proj, QWeight):   # graph-safe only where the grouped Triton kernel runs
            return self.down_proj.path(x) == "triton"
        if torch.is_grad_enabled() and (x.requires_grad or self.down_proj.requires_grad):
            return False
        if x.device.type == "cuda" and x.dtype != torch.bfloat16:
            return False
        align = 16 // x.element_size()
        return all(d % align == 0 for d in (self.down_proj.shape[1], self.down_proj.shape[2]))


def gather_sum(y: torch.Tensor, order: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """What zeros.index_add_(0, order // k, y) computes on the CPU, without atomics: each token's k terms
    (y [T*k, H], rows in expert-sorted slot order) added in ascending expert order. -> [T, H]."""
    T, k = idx.shape
    inv = torch.empty_like(order)
    inv[order] = torch.arange(order.numel(), device=order.device)      # sorted position of each slot
    pos = inv.view(T, k).gather(1, idx.argsort(dim=-1))                 # [T, k]
    terms = y[pos]                                                      # [T, k, H]
    out = terms[:, 0]
    for j in range(1, k):
        out = out + terms[:, j]
    return out


class Layer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        H, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.sliding = cfg.is_sliding(layer)
        self.self_attn = Attention(cfg, layer)
        self.mlp = GatedMLP(H, cfg.intermediate_size)
        self.router = Router(cfg)
        self.experts = Experts(cfg)
        for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm", "post_feedforward_layernorm_1",
                     "post_feedforward_layernorm_2", "pre_feedforward_layernorm_2"):
            setattr(self, name, RMSNorm(H, eps))
        # the checkpoint stores one scalar for the decoder side and one for the encoder side
        self.register_buffer("layer_scalar", torch.ones(1))
        self.register_buffer("encoder_layer_scalar", torch.ones(1))

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                encoder: bool, x: torch.Tensor | None = None,
                next_norm: RMSNorm | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """h: [B, S, H]; `attend(q, k, v) -> [B, Hq, S, D]` supplies keys/values and the mask (k = v = None:
        already in the cache slots that `attend.kv_slots()`, when it has one, named). x: input_layernorm(h) when
        the previous layer's fused tail computed it. -> (the new h, next_norm(new h) when the fused tail
        computed it (DGEMMA_FUSED=norms), else None)."""
        B, S, H = h.shape
        x = self.input_layernorm(h) if x is None else x
        q, k, v = self.self_attn.qkv(x, cos, sin, getattr(attend, "kv_slots", None))
        o = attend(q, k, v).transpose(1, 2).reshape(B, S, -1)
        if not torch.is_grad_enabled() and kernels.fused("norms", h):
            return self._fused_tail(h, linear(o, self.self_attn.o_proj), encoder, next_norm)
        h = h + self.post_attention_layernorm(linear(o, self.self_attn.o_proj))
        r = h
        m1 = self.post_feedforward_layernorm_1(self.mlp(self.pre_feedforward_layernorm(r)))
        flat = r.reshape(-1, H)
        w, idx = self.router(flat)
        m2 = self.experts(self.pre_feedforward_layernorm_2(flat), w, idx).view(B, S, H)
        m2 = self.post_feedforward_layernorm_2(m2)
        h = r + self.post_feedforward_layernorm(m1 + m2)
        return h * (self.encoder_layer_scalar if encoder else self.layer_scalar), None

    def _fused_tail(self, h: torch.Tensor, a: torch.Tensor, encoder: bool,
                    next_norm: RMSNorm | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """forward after the attention's output projection a [B, S, H], with the norms, residual adds, router
        softmax / top-k and layer scalar in three Triton kernels (kernels.post_attention, route, post_ffn), the
        last one also norming the new h for the next layer (or the final norm): the same maths, fp32 inside,
        rounded where the eager ops round. With the fused experts (DGEMMA_FUSED=moe) route also sorts the slots by
        expert (in its own launch for a decoding step, one more up to 1,024 tokens), and post_ffn adds each token's
        k expert rows itself: the experts' combine costs no launch of its own."""
        B, S, H = h.shape
        eps, router = self.router.eps, self.router
        r, x1, x2, z = kernels.post_attention(h, a, self.post_attention_layernorm.weight,
                                              self.pre_feedforward_layernorm.weight,
                                              self.pre_feedforward_layernorm_2.weight, router.scale, router.root, eps)
        x2 = x2.view(-1, H)
        fused = self.experts._fused_ok(x2)       # the experts' k rows per token stay apart for post_ffn to add
        logits = linear(z.view(-1, H), router.proj)                                    # [T, E]
        w, idx, by_expert = kernels.route(logits, router.k, router.per_expert_scale, sort=fused)
        m2 = self.experts.fused_rows(x2, w, idx, by_expert) if fused else self.experts(x2, w, idx).view(B, S, H)
        return kernels.post_ffn(r, self.mlp(x1), m2, self.post_feedforward_layernorm_1.weight,
                                self.post_feedforward_layernorm_2.weight, self.post_feedforward_layernorm.weight,
                                self.encoder_layer_scalar if encoder else self.layer_scalar, eps,
                                None if next_norm is None else next_norm.weight, idx if fused else None)


class SelfConditioning(nn.Module):
    """Adds an MLP of the previous step's soft embedding to the canvas embedding, then a scale-free norm."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.eps = cfg.rms_norm_eps
        self.pre_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, e: torch.Tensor, soft: torch.Tensor | None) -> torch.Tensor:
        if soft is not None:  # with a zero signal the MLP output is exactly zero: skip it
            e = e + self.mlp(self.pre_norm(soft))
        return rms_norm(e, None, self.eps)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              fold: bool | None = None) -> torch.Tensor:
    """Scaled dot-product attention with scale 1 (the q/k norms replace 1/sqrt(d)) and grouped query heads:
    q [B, Hq, S, D], k, v [B, Hkv, L, D], mask broadcastable to [B, 1, S, L] (bool, True: attend; or an additive
    bias in q's dtype) or None -> [B, Hq, S, D]; query head h reads K/V head h // g, g = Hq / Hkv.

    fold (default: on CUDA) makes it plain multi-head attention: with a mask of one row for every query (the
    denoiser's, an AR step's) or none, the g query heads that share a K/V head become one head of g*S queries;
    with a row per query (encoder passes, training), each K/V head is repeated g times (memory linear in L,
    where repeating the mask would be S x L). The same sums per query. Why: torch's fused CUDA kernels do not
    take enable_gqa with a mask at head_dim 512 (the 26B's global layers), so it ran them on its math path in
    fp32 (run 3's H200 profile: two fp32 GEMMs per global layer); its memory-efficient kernel takes plain
    multi-head attention at any head width. On the CPU this gains nothing (measured) and changes the rounding
    of one-query steps, so it stays off there. DGEMMA_FOLD=0 turns the default off (a switch for a GPU where the
    fold misbehaves: scripts/gpu_bench.sh sets it when the fold's GPU test fails)."""
    B, Hq, S, D = q.shape
    g = Hq // k.shape[1]
    if fold is None:
        fold = q.is_cuda and os.environ.get("DGEMMA_FOLD") != "0"
    if not fold or g == 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0, enable_gqa=g > 1)
    if mask is not None and mask.shape[-2] > 1:
        k, v = (t[:, :, None].expand(-1, -1, g, -1, -1).flatten(1, 2) for t in (k, v))   # [B, Hq, L, D]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
    o = F.scaled_dot_product_attention(q.reshape(B, Hq // g, g * S, D), k, v, attn_mask=mask, scale=1.0)
    return o.reshape(B, Hq, S, D)     # (a copy where the kernel's output is [B, g*S, Hkv, D] in memory, as CUDA's)


def _attention(layer_kv: Callable[[int, torch.Tensor, torch.Tensor], tuple],
               kv_slots: Callable[[int], tuple | None] | None = None) -> Callable[[int], Callable]:
    """`attend_for(i)` for run_layers over a KV cache: `layer_kv(i, k, v)` (one of the cache's per-layer methods)
    stores the new keys/values (None: already stored) and returns (keys, values, mask) to attend over; then
    `attention`. With `kv_slots` (the cache's), `attend.kv_slots()` tells the fused q/k/v kernel where to write
    k and v itself."""
    def attend_for(i: int):
        def attend(q, k, v):
            keys, vals, mask = layer_kv(i, k, v)
            return attention(q, keys, vals, mask)
        if kv_slots is not None:
            attend.kv_slots = lambda: kv_slots(i)
        return attend
    return attend_for


class _Runtime:
    """A model's inference state that is not the model: captured CUDA graphs and workspace caches. Graphs hold
    raw addresses of the weights, so moving or casting the model (`_apply`) starts a fresh one, and so does
    copying it."""

    def __init__(self) -> None:
        self.graphs = None                        # graphs.StepGraphs, made on first use
        self.workspaces: dict = {}                # (batch, capacity, scratch, device, dtype) -> KVCache
        self.probe = object()                     # held like a workspace: the reference count of a free one
        self.qkv_packed = False                   # DGEMMA_FUSED=qkv has packed the attention weights

    def __deepcopy__(self, memo) -> "_Runtime":
        return _Runtime()


class DiffusionGemma(nn.Module):
    """The model object `dgemma.load` returns. Shapes: B batch, S sequence, C canvas, V vocab, H hidden."""

    def __init__(self, cfg: ModelConfig, sampler: SamplerConfig | None = None) -> None:
        super().__init__()
        self.config = cfg
        self.sampler_config = sampler or SamplerConfig(eos_token_id=list(cfg.eos_token_id),
                                                       pad_token_id=cfg.pad_token_id)
        self.path: str | None = None
        self.quantization = None              # quant.QuantConfig when the weights are quantized
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Layer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_conditioning = SelfConditioning(cfg)
        self._rope_cache: dict = {}           # inv_freq and the embedding scale, per device
        self._runtime = _Runtime()

    def _apply(self, fn, recurse=True):
        # .to() / .cuda() / .half() move the weights: a fresh runtime, but the same graph store object, emptied
        # (an Engine or a generate loop may hold it: its graphs would read the old weights, and a later
        # _forget_graphs must reach it), and not capturable until graphs.for_model says again
        store = self._runtime.graphs if hasattr(self, "_runtime") else None
        self._forget_graphs()
        self._runtime = _Runtime()
        if store is not None:
            store.capturable = False
            self._runtime.graphs = store
        return super()._apply(fn, recurse)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """nn.Module's; with assign=True the weights become new tensors, so captured graphs (which read the old
        ones by address) are forgotten and q/k/v packing (DGEMMA_FUSED=qkv) is redone on the next pass."""
        out = super().load_state_dict(state_dict, strict=strict, assign=assign)
        if assign:
            self._forget_graphs()
            self._runtime.qkv_packed = False
        return out

    def _forget_graphs(self) -> None:
        """Drop every graph captured for this model, in place in its store (which an Engine or a generate loop may
        hold): they read the weights by address."""
        rt = getattr(self, "_runtime", None)
        if rt is not None and rt.graphs is not None:
            rt.graphs.entries.clear()

    def _pack_qkv(self, x: torch.Tensor) -> None:
        """DGEMMA_FUSED=qkv: every layer's q, k (and v) weights back to back (Attention.pack), once, where moving
        weights is safe: outside a CUDA graph capture and on the default stream (not a graph warm-up's side
        stream, whose memory the allocator keeps apart). Graphs captured before read the old weights: forgotten."""
        if x.is_cuda and (torch.cuda.is_current_stream_capturing()
                          or torch.cuda.current_stream(x.device) != torch.cuda.default_stream(x.device)):
            return
        todo = [L.self_attn for L in self.layers if L.self_attn.packable() and not L.self_attn.is_packed()]
        for attn in todo:
            attn.pack()
        if todo:
            self._forget_graphs()
        self._runtime.qkv_packed = True

    # ---- small helpers ----------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (weights may be stored quantized: see quant.py)."""
        return self.norm.weight.dtype

    def embed_scale(self) -> torch.Tensor:
        """sqrt(H) as the reference stores it: an fp32 scalar cast to the embedding dtype (53.0 in bf16),
        on the model's device (made once per device and dtype)."""
        return self._cached(("scale", self.device, self.dtype),
                            lambda: torch.tensor(self.config.hidden_size ** 0.5, device=self.device).to(self.dtype))

    def _cached(self, key, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        """self._rope_cache[key], made by make() on first use, as a plain tensor even in inference mode (training
        may follow inference: autograd cannot save inference tensors)."""
        if key not in self._rope_cache:
            with torch.inference_mode(False):
                self._rope_cache[key] = make()
        return self._rope_cache[key]

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(ids) * self.embed_scale()

    def rope(self, positions: torch.Tensor) -> dict[bool, tuple[torch.Tensor, torch.Tensor]]:
        """positions: [S] or [B, S] -> {sliding?: (cos, sin)} in the model dtype; inv_freq stays fp32."""
        cfg, out = self.config, {}
        for sliding in (True, False):
            inv = self._cached((sliding, positions.device), lambda: inv_frequencies(
                cfg.head_dim if sliding else cfg.global_head_dim,
                cfg.rope_local_theta if sliding else cfg.rope_global_theta,
                1.0 if sliding else cfg.global_partial_rotary_factor, positions.device))
            f = positions.float()[..., None] * inv
            emb = torch.cat((f, f), dim=-1)                                   # [S, D] or [B, S, D]
            if emb.dim() == 3:
                emb = emb[:, None]                                            # [B, 1, S, D]: per-row positions
            out[sliding] = (emb.cos().to(self.dtype), emb.sin().to(self.dtype))
        return out

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden [.., H] -> fp32 softcapped logits [.., V] through the tied embedding."""
        logits = self.embed_tokens.logits(h).float()
        cap = self.config.final_logit_softcapping
        if not cap:
            return logits
        if torch.is_grad_enabled() and logits.requires_grad:
            return torch.tanh(logits / cap) * cap
        return logits.div_(cap).tanh_().mul_(cap)          # same values, no [rows, V] temporaries

    def soft_embedding(self, sc_logits: torch.Tensor) -> torch.Tensor:
        """[B, C, V] self-conditioning logits -> softmax_f32 @ E * sqrt(H): [B, C, H]."""
        p = sc_logits.softmax(dim=-1, dtype=torch.float32).to(self.dtype)
        return self.embed_tokens.mix(p) * self.embed_scale()

    def run_layers(self, h: torch.Tensor, positions: torch.Tensor, attend_for: Callable[[int], Callable],
                   encoder: bool) -> torch.Tensor:
        if not self._runtime.qkv_packed and not torch.is_grad_enabled() and kernels.fused("qkv", h):
            self._pack_qkv(h)
        rope = self.rope(positions)
        x = None                               # the next layer's normed input, when a fused layer tail made it
        for i, layer in enumerate(self.layers):
            cos, sin = rope[layer.sliding]
            nxt = self.layers[i + 1].input_layernorm if i + 1 < len(self.layers) else self.norm
            h, x = layer(h, cos, sin, attend_for(i), encoder, x, nxt)
        return self.norm(h) if x is None else x

    def graph_safe(self) -> bool:
        """Can a step be captured in a CUDA graph? Yes on CUDA when the experts run as grouped matmuls (bf16,
        aligned widths); their fallback loop reads group sizes on the host."""
        probe = torch.empty(0, dtype=self.dtype, device=self.device)
        with torch.inference_mode():
            return self.device.type == "cuda" and self.layers[0].experts._grouped_ok(probe)

    def new_cache(self, batch: int, capacity: int, scratch: int | None = None) -> KVCache:
        return KVCache(self.config, batch, capacity, self.device, self.dtype, scratch)

    def workspace_cache(self, batch: int, capacity: int, scratch: int | None = None) -> KVCache:
        """An empty cache for a new conversation. The model keeps the last two it made and hands one out
        again (reset) once nothing else refers to it — the caller dropped the output that carried it — so its
        buffers keep their addresses and a CUDA graph captured over them is replayed instead of re-captured."""
        shape = (batch, capacity, scratch or self.config.canvas_length, self.device, self.dtype)
        kept = self._runtime.workspaces
        ws, probe = kept.get(shape), self._runtime.probe   # each held by one container and one local here
        if ws is not None and sys.getrefcount(ws) <= sys.getrefcount(probe):   # nobody else holds ws
            return ws.reset()
        ws = self.new_cache(batch, capacity, scratch)
        kept[shape] = ws
        while len(kept) > 2:
            kept.pop(next(iter(kept)))
        return ws

    # ---- the two passes ---------------------------------------------------------------------
    def encode(self, ids: torch.Tensor, cache: KVCache, valid: torch.Tensor | None = None,
               rows: list[int] | None = None) -> torch.Tensor:
        """Causal pass over ids [n, S] after each row's cached positions; writes the cache. -> [n, S, H]."""
        positions = cache.begin_encode(ids.shape[1], valid, rows)
        h = self.run_layers(self.embed(ids), positions, _attention(cache.encode_layer), encoder=True)
        cache.end_encode()
        return h

    def encode_step(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Causal pass of one new token per active row, ids [n, 1] -> [n, 1, H], with a device-side plan and
        fixed shapes (CUDA-graph safe). Writes the cache's device state; the caller then runs
        `cache.advance_host()` (outside any captured graph)."""
        positions = cache.begin_step()
        h = self.run_layers(self.embed(ids), positions, _attention(cache.step_layer, cache.kv_slots), encoder=True)
        cache.end_step()
        return h

    def denoise(self, canvas: torch.Tensor, cache: KVCache, soft: torch.Tensor | None = None,
                static: bool = False) -> torch.Tensor:
        """Bidirectional pass over canvas [B, C] after the cache; soft: [B, C, H] self-cond signal or None.
        static: fixed shapes and a device-side plan (see KVCache.begin_decode), for CUDA graphs."""
        h = self.self_conditioning(self.embed(canvas), soft)
        positions = cache.begin_decode(canvas.shape[1], static)
        return self.run_layers(h, positions, _attention(cache.decode_layer, cache.kv_slots), encoder=False)

    # ---- public API -------------------------------------------------------------------------
    def _ids(self, ids) -> torch.Tensor:
        ids = torch.as_tensor(ids, dtype=torch.long)
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2:
            raise ValueError(f"token ids must be [batch, length], got shape {tuple(ids.shape)}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size})")
        return ids.to(self.device)

    @torch.inference_mode()
    def encoder_logits(self, input_ids, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[B, T] ids -> [B, T, V] fp32 softcapped next-token logits of the causal encoder."""
        ids = self._ids(input_ids)
        cache = self.new_cache(ids.shape[0], ids.shape[1], scratch=1)
        valid = None if attention_mask is None else torch.as_tensor(attention_mask, device=self.device).bool()
        return self.head(self.encode(ids, cache, valid))

    @torch.inference_mode()
    def denoise_logits(self, context_ids, canvas_ids, self_conditioning_logits: torch.Tensor | None = None,
                       context_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Encode context [B, T], then denoise canvas [B, C] placed right after it -> [B, C, V] fp32 logits."""
        ctx, canvas = self._ids(context_ids), self._ids(canvas_ids)
        if ctx.shape[0] != canvas.shape[0]:
            raise ValueError(f"context batch {ctx.shape[0]} != canvas batch {canvas.shape[0]}")
        cache = self.new_cache(ctx.shape[0], ctx.shape[1], scratch=canvas.shape[1])
        if ctx.shape[1]:
            self.encode(ctx, cache, None if context_mask is None else
                        torch.as_tensor(context_mask, device=self.device).bool())
        soft = None
        if self_conditioning_logits is not None:
            soft = self.soft_embedding(self_conditioning_logits.to(self.device))
        return self.head(self.denoise(canvas, cache, soft))

    def generate(self, input_ids, **kwargs):
        """Block-diffusion generation; see `dgemma.generate.generate` for the arguments."""
        from .generate import generate
        return generate(self, input_ids, **kwargs)

    def generate_ar(self, input_ids, **kwargs):
        """Autoregressive decoding with the encoder; see `dgemma.generate.generate_ar`."""
        from .generate import generate_ar
        return generate_ar(self, input_ids, **kwargs)
