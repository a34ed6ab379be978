"""Request-level engine: submit / step / collect, with continuous batching at canvas boundaries.

Knows: a queue of requests (token ids + sampler settings), which cache row each active request owns,
each row's denoising state, when a row's canvas is done (stable-and-confident stop or steps used up),
committing it (EOS/pad rules), admitting waiting requests into free rows and compacting finished rows
away so they cost nothing. Every request draws from its own seeded generator in the reference's order,
so a request's tokens do not depend on what else is in the batch: with one request in flight the engine
reproduces `generate(..., seed=s)` of batch 1 exactly.
Does not know: text, HTTP. The server sits on `submit`, `step` and `collect`.
"""
from __future__ import annotations

import itertools
import math
from collections import deque
from dataclasses import dataclass, field

import torch

from . import sampling
from .config import SamplerConfig
from .generate import check_positions, resolve_settings


@dataclass
class CanvasEvent:
    """One committed canvas of one request (what `step` returns)."""
    request_id: str
    tokens: list[int]            # the canvas, cut after the first EOS (the EOS is kept)
    finished: bool
    finish_reason: str | None    # "eos" or "length" once finished


@dataclass
class Result:
    request_id: str
    prompt: list[int]
    tokens: list[int]            # every committed token (cut after EOS)
    finish_reason: str
    decoder_passes: int
    tokens_per_forward: float


@dataclass
class _Request:
    id: str
    prompt: list[int]
    s: SamplerConfig
    gen: torch.Generator
    tokens: list[int] = field(default_factory=list)
    canvases: int = 0
    passes: int = 0


@dataclass
class _Row:
    req: _Request
    canvas: torch.Tensor                     # [C] current (noisy) canvas
    argmax: torch.Tensor                     # [C]
    soft: torch.Tensor | None                # [C, H] self-conditioning input, None at a canvas's first step
    left: int                                # denoising steps left for this canvas
    stopper: sampling.StableAndConfident | None


class Engine:
    def __init__(self, model, max_batch: int = 8, row_chunk: int | None = None, sampler: str = "auto") -> None:
        """sampler: "exact" (the reference's random stream per request), "fast" (same distribution, one
        uniform per position; see sampling.sample_rows) or "auto" (exact on the CPU, fast elsewhere). The
        engine's steps run eagerly (rows come and go between steps); CUDA graphs are generate()'s."""
        sampler = sampling.resolve_sampler(sampler, model.device)
        cfg = model.config
        self.C, self.V = cfg.canvas_length, cfg.vocab_size
        self.model, self.max_batch, self.sampler = model, max_batch, sampler
        self.row_chunk = max(self.C, row_chunk or sampling.rows_per_chunk(self.V))
        self.cache = model.new_cache(max_batch, 1024)
        self.cache.n = 0
        self.rows: list[_Row] = []
        self.waiting: deque[_Request] = deque()
        self.done: dict[str, Result] = {}
        self._ids = itertools.count()
        self._noise = torch.empty(self.row_chunk, self.V, device=model.device) if sampler == "exact" else None

    # ---- public API ---------------------------------------------------------------------------
    def submit(self, prompt: list[int], *, seed: int | None = None, request_id: str | None = None,
               **settings) -> str:
        """Queue a request (token ids); settings as for `generate` (max_new_tokens, max_denoising_steps, ...)."""
        if not prompt:
            raise ValueError("a request needs at least one prompt token")
        if min(prompt) < 0 or max(prompt) >= self.V:
            raise ValueError(f"token ids must lie in [0, {self.V})")
        from .generate import _UNSET
        keys = ("max_new_tokens", "max_denoising_steps", "entropy_bound", "t_min", "t_max", "stability_threshold",
                "confidence_threshold", "eos_token_id", "pad_token_id")
        unknown = set(settings) - set(keys)
        if unknown:
            raise ValueError(f"unknown setting(s): {', '.join(sorted(unknown))}")
        s = resolve_settings(self.model, **{k: settings.get(k, _UNSET) for k in keys})
        check_positions(self.model.config, len(prompt), math.ceil(s.max_new_tokens / self.C) * self.C)
        gen = torch.Generator(device=self.model.device)
        gen.manual_seed(int(seed)) if seed is not None else gen.seed()
        rid = request_id or f"req-{next(self._ids)}"
        self.waiting.append(_Request(rid, list(prompt), s, gen))
        return rid

    def cancel(self, request_id: str) -> None:
        self.waiting = deque(r for r in self.waiting if r.id != request_id)
        keep = [i for i, r in enumerate(self.rows) if r.req.id != request_id]
        if len(keep) != len(self.rows):
            self._compact(keep)

    def has_work(self) -> bool:
        return bool(self.rows or self.waiting)

    def collect(self, request_id: str) -> Result | None:
        """The finished request's result (and forget it), or None while it is still running."""
        return self.done.pop(request_id, None)

    def run(self) -> dict[str, Result]:
        """Step until every submitted request is finished; returns all results."""
        while self.has_work():
            self.step()
        out, self.done = self.done, {}
        return out

    @torch.inference_mode()
    def step(self) -> list[CanvasEvent]:
        """Admit waiting requests into free rows, run one denoiser pass over the active rows, sample,
        and commit every canvas that is done. Returns the canvases committed in this step."""
        self._admit()
        if not self.rows:
            return []
        m, C, n = self.model, self.C, len(self.rows)
        canvas = torch.stack([r.canvas for r in self.rows])                                   # [n, C]
        soft = None
        if any(r.soft is not None for r in self.rows):
            zero = torch.zeros(C, m.config.hidden_size, dtype=m.dtype, device=m.device)
            soft = torch.stack([r.soft if r.soft is not None else zero for r in self.rows])   # [n, C, H]
        h = m.denoise(canvas, self.cache, soft).reshape(n * C, -1)
        temps = torch.stack([sampling.temperature(r.left, r.req.s.max_denoising_steps, r.req.s.t_min,
                                                  r.req.s.t_max) for r in self.rows])
        per_chunk = max(1, self.row_chunk // C)               # whole requests per sampler chunk
        emb, scale = m.embed_tokens.weight, m.embed_scale()
        results = []
        for a in range(0, n, per_chunk):
            rows = self.rows[a:a + per_chunk]
            q = u = None
            if self.sampler == "exact":
                q = self._noise[: len(rows) * C]
                for j, r in enumerate(rows):                  # each request's own random stream
                    q[j * C:(j + 1) * C].exponential_(1, generator=r.req.gen)
            else:
                u = torch.cat([torch.rand(C, device=m.device, generator=r.req.gen) for r in rows])
            t = temps[a:a + len(rows)].repeat_interleave(C)[:, None]
            results.append(sampling.sample_rows(m.head(h[a * C:(a + len(rows)) * C]), t, q, emb, scale, u))
        res = sampling.RowResult.cat(results, n, C)
        sample, argmax, ent, soft_new = res.sample, res.argmax, res.entropy, res.soft
        commit = []
        for b, r in enumerate(self.rows):
            accept = sampling.entropy_bound_accept(ent[b:b + 1], r.req.s.entropy_bound)[0]
            renoise = sampling.init_canvas(1, C, self.V, m.device, r.req.gen)[0]
            r.canvas = torch.where(accept, sample[b], renoise)
            r.argmax, r.soft = argmax[b], soft_new[b]
            r.left -= 1
            r.req.passes += 1
            stop = bool(r.stopper(argmax[b:b + 1], ent[b:b + 1])[0]) if r.stopper is not None else False
            if stop or r.left == 0:
                commit.append(b)
        return self._commit(commit) if commit else []

    # ---- internals ----------------------------------------------------------------------------
    def _new_canvas(self, req: _Request) -> _Row:
        s, C = req.s, self.C
        canvas = sampling.init_canvas(1, C, self.V, self.model.device, req.gen)[0]
        stopper = None
        if s.stability_threshold is not None and s.confidence_threshold is not None:
            stopper = sampling.StableAndConfident(s.stability_threshold, s.confidence_threshold, 1, C,
                                                  self.model.device)
        return _Row(req, canvas, canvas, None, s.max_denoising_steps, stopper)

    def _admit(self) -> None:
        while self.waiting and len(self.rows) < self.max_batch:
            req = self.waiting.popleft()
            ids = torch.tensor([req.prompt], device=self.model.device)
            one = self.model.new_cache(1, ids.shape[1])
            self.model.encode(ids, one)                         # prefill alone, then move into a free row
            b = len(self.rows)
            self.cache.n = b + 1
            self.cache.copy_row(b, one)
            self.rows.append(self._new_canvas(req))

    def _commit(self, commit: list[int]) -> list[CanvasEvent]:
        events, keep, encode_rows, encode_ids = [], [], [], []
        for b, r in enumerate(self.rows):
            if b not in commit:
                keep.append(b)
                continue
            req, s = r.req, r.req.s
            toks = r.argmax.tolist()
            req.canvases += 1
            eos = set(s.eos_token_id or [])
            cut = next((i for i, t in enumerate(toks) if t in eos), None)
            if cut is not None:
                toks = toks[:cut + 1]
            req.tokens += toks
            reason = "eos" if cut is not None else (
                "length" if req.canvases * self.C >= s.max_new_tokens else None)
            events.append(CanvasEvent(req.id, toks, reason is not None, reason))
            if reason is not None:
                n_valid = len(req.tokens) if s.pad_token_id is None else sum(t != s.pad_token_id for t in req.tokens)
                self.done[req.id] = Result(req.id, req.prompt, req.tokens, reason, req.passes,
                                           n_valid / max(req.passes, 1))
                continue
            keep.append(b)
            encode_rows.append(b)
            encode_ids.append(r.argmax)
        if encode_rows:   # commit: encode the argmax canvases at the positions they had as canvases
            self.model.encode(torch.stack(encode_ids), self.cache, rows=encode_rows)
            for b in encode_rows:
                self.rows[b] = self._new_canvas(self.rows[b].req)
        if len(keep) != len(self.rows):
            self._compact(keep)
        return events

    def _compact(self, keep: list[int]) -> None:
        self.cache.select_rows(keep)
        self.rows = [self.rows[b] for b in keep]
