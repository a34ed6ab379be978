"""Request-level engine: submit / step / collect, with continuous batching at canvas boundaries.

Knows: a queue of requests (token ids + sampler settings), which cache row each active request owns,
each row's denoising state, when a row's canvas is done (stable-and-confident stop or steps used up),
committing it (EOS/pad rules), admitting waiting requests into free rows and compacting finished rows
away so they cost nothing. Every request draws from its own seeded generator in the reference's order,
so a request's tokens do not depend on what else is in the batch: with one request in flight the engine
reproduces `generate(..., seed=s)` of batch 1 exactly. A step is `generate.denoise_step` over the active
rows (per-row temperatures and entropy bounds); with the fast sampler on CUDA it is a replayed graph, one per
number of active rows.
Does not know: text, HTTP. The server sits on `submit`, `step` and `collect`.
"""
from __future__ import annotations

import itertools
import math
from collections import deque
from dataclasses import dataclass, field

import torch

from . import graphs, sampling
from .config import SamplerConfig
from .generate import check_positions, denoise_step, resolve_settings


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
    def __init__(self, model, max_batch: int = 8, row_chunk: int | None = None, sampler: str = "auto",
                 cuda_graphs: bool | None = None) -> None:
        """sampler: "exact" (the reference's random stream per request), "fast" (same distribution, one
        uniform per position; see sampling.sample_rows) or "auto" (exact on the CPU, fast elsewhere).
        cuda_graphs (default: where the model is capturable, i.e. CUDA and bf16): the fast sampler's step runs
        on the cache's static plan and is captured once per number of active rows, then replayed."""
        sampler = sampling.resolve_sampler(sampler, model.device)
        cfg = model.config
        self.C, self.V = cfg.canvas_length, cfg.vocab_size
        self.model, self.max_batch, self.sampler = model, max_batch, sampler
        # canvas rows per sampler chunk: whole requests, so each request's draws stay together
        self.row_chunk = max(1, (row_chunk or sampling.rows_per_chunk(self.V)) // self.C) * self.C
        self.cache = model.new_cache(max_batch, 1024)
        self.cache.n = 0
        self.rows: list[_Row] = []
        self.waiting: deque[_Request] = deque()
        self.done: dict[str, Result] = {}
        self._ids = itertools.count()
        self._noise = torch.empty(self.row_chunk, self.V, device=model.device) if sampler == "exact" else None
        # CUDA graphs for the fast sampler's step (one per number of active rows), where the model allows them
        # (off CUDA, cuda_graphs=True runs the same static step eagerly)
        if cuda_graphs and sampler != "fast":
            raise ValueError("cuda_graphs needs sampler='fast' (the exact sampler's random streams run eagerly)")
        store = graphs.for_model(model) if sampler == "fast" else None
        use = store is not None and (store.capturable if cuda_graphs is None else cuda_graphs)
        self.graphs = store if use else None

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
        m, C, n, dev = self.model, self.C, len(self.rows), self.model.device
        canvas = torch.stack([r.canvas for r in self.rows])                                   # [n, C]
        soft = None
        if self.graphs is not None or any(r.soft is not None for r in self.rows):
            zero = torch.zeros(C, m.config.hidden_size, dtype=m.dtype, device=dev)   # = no signal, exactly
            soft = torch.stack([r.soft if r.soft is not None else zero for r in self.rows])   # [n, C, H]
        temp = torch.stack([sampling.temperature(r.left, r.req.s.max_denoising_steps, r.req.s.t_min,
                                                 r.req.s.t_max) for r in self.rows])
        temp = temp.repeat_interleave(C)[:, None].to(dev)                                     # [n*C, 1]
        bound = torch.tensor([[r.req.s.entropy_bound] for r in self.rows], dtype=torch.float32, device=dev)
        if self.sampler == "exact":                           # each request's own stream, the reference's order
            def exponentials(r0: int, r1: int) -> torch.Tensor:
                q = self._noise[: r1 - r0]
                for j in range(r0 // C, r1 // C):
                    q[j * C - r0:(j + 1) * C - r0].exponential_(1, generator=self.rows[j].req.gen)
                return q

            new_canvas, argmax, ent, soft_new = denoise_step(
                m, self.cache, canvas, soft, temp, bound, self.row_chunk, exponentials=exponentials,
                renoise=lambda: torch.stack([sampling.init_canvas(1, C, self.V, dev, r.req.gen)[0]
                                             for r in self.rows]))
        else:                                                 # per request: C uniforms, then C renoise ids
            uniform = torch.cat([torch.rand(C, device=dev, generator=r.req.gen) for r in self.rows])
            renoise = torch.stack([sampling.init_canvas(1, C, self.V, dev, r.req.gen)[0] for r in self.rows])
            inputs = (canvas, soft, temp, bound, uniform, renoise)
            if self.graphs is None:
                new_canvas, argmax, ent, soft_new = self._fast_step(*inputs)
            else:
                key = ("engine", n, C, self.row_chunk, self.cache.key_slots(C, True),
                       graphs.buffer_key(*self.cache.tensors()))
                new_canvas, argmax, ent, soft_new = self.graphs.run(key, self._fast_step, *inputs)
        commit = []
        for b, r in enumerate(self.rows):
            r.canvas, r.argmax, r.soft = new_canvas[b], argmax[b], soft_new[b]
            r.left -= 1
            r.req.passes += 1
            stop = bool(r.stopper(argmax[b:b + 1], ent[b:b + 1])[0]) if r.stopper is not None else False
            if stop or r.left == 0:
                commit.append(b)
        return self._commit(commit) if commit else []

    def _fast_step(self, canvas, soft, temp, bound, uniform, renoise):
        """The fast sampler's step as a function of tensors (captured per active-row count on CUDA)."""
        return denoise_step(self.model, self.cache, canvas, soft, temp, bound, self.row_chunk,
                            static=self.graphs is not None, uniform=uniform, renoise=renoise)

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
