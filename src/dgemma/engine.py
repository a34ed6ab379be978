"""Request-level engine: submit / step / collect, with continuous batching at canvas boundaries.

Knows: a queue of requests (token ids + sampler settings), which cache row each active request owns,
each row's denoising state, when a row's canvas is done (stable-and-confident stop or steps used up),
committing it (EOS/pad rules), admitting waiting requests into free rows and compacting finished rows
away so they cost nothing. Every request draws from its own seeded generator in the reference's order,
so its random stream does not depend on what else is in the batch: with one request in flight the engine
reproduces `generate(..., seed=s)` of batch 1 exactly (prompts up to one prefill chunk). (The arithmetic of a
pass over several rows agrees with a lone row's only up to rounding, ~1e-5 relative in fp32 on the CPU, for
denoising and for prompt chunks encoded together alike, so a batched request's tokens can rarely differ.) A step is
`generate.denoise_step` over the active rows (per-row temperatures and entropy bounds); with the fast sampler on
CUDA it is a replayed graph, one per number of active rows.
Prompts are encoded in chunks of `prefill_chunk` tokens aligned to absolute positions, about one chunk's worth of
tokens per step, so a long prompt does not stall the rows already denoising (with none denoising, all at once),
each prompt in its own row of a prefill cache, chunks of equal length from several prompts in one batched pass;
each finished prompt leaves a snapshot at its last chunk boundary in the prefix store (`prefix.PrefixStore`), and
a later prompt that starts with a stored prefix (the next turn of a chat) encodes only the rest, with exactly the
cold request's tokens (bit for bit when both were encoded alone; up to rounding when either shared a pass).
`warm(ids)` encodes a prefix in idle time without generating (the server does it with a finished chat turn).
`max_new_tokens` is exact: the last canvas is cut, never overshot; 0 encodes the prompt only (with
`prompt_logprobs`: scoring a text). A request can ask for each committed token's most likely alternatives
(`top_logprobs`) and for its prompt tokens' log-probabilities under the causal encoder (`prompt_logprobs`), and
can bias its logits: `logit_bias`, and presence / frequency penalties on the tokens it has committed so far.
Does not know: text, HTTP. The server sits on `submit`, `step`, `cancel` and `collect`.
"""
from __future__ import annotations

import itertools
import math
import operator
import time
from collections import deque
from dataclasses import dataclass, field, replace

import torch

from . import graphs, sampling
from .cache import KVCache
from .config import SamplerConfig
from .generate import _UNSET, check_penalties, check_positions, default_row_chunk, denoise_step, resolve_settings
from .prefix import PrefixStore

Alternatives = list[tuple[int, float]]   # a position's most likely tokens and their log-probabilities, descending

SETTINGS = ("max_new_tokens", "max_denoising_steps", "entropy_bound", "t_min", "t_max", "stability_threshold",
            "confidence_threshold", "eos_token_id", "pad_token_id", "top_k", "top_p")


@dataclass
class CanvasEvent:
    """One committed canvas of one request (what `step` returns)."""
    request_id: str
    tokens: list[int]            # the canvas, cut after the first EOS (the EOS is kept)
    finished: bool
    finish_reason: str | None    # "eos" or "length" once finished
    passes: int = 0              # decoder passes of this request so far
    cached_tokens: int = 0       # prompt tokens served from the prefix cache
    logprobs: list[float] = field(default_factory=list)   # each token's log-probability (see GenerateOutput)
    top_logprobs: list[Alternatives] = field(default_factory=list)   # per token, if the request asked
    # on a request's first event, if it asked (prompt_logprobs): each prompt token's log-probability under the
    # causal encoder given the tokens before it (None for the first), and its alternatives
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[Alternatives] | None = None
    stored_tokens: int = 0       # prompt tokens this request added to the prefix cache


@dataclass
class Result:
    request_id: str
    prompt: list[int]
    tokens: list[int]            # every committed token (cut after EOS)
    finish_reason: str
    decoder_passes: int
    tokens_per_forward: float
    cached_tokens: int = 0       # prompt tokens served from the prefix cache (not encoded again)
    logprobs: list[float] = field(default_factory=list)   # one per token (see GenerateOutput.logprobs)
    top_logprobs: list[Alternatives] = field(default_factory=list)   # as CanvasEvent's
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[Alternatives] | None = None
    stored_tokens: int = 0       # as CanvasEvent's


@dataclass
class Frame:
    """One denoising pass of one request that asked for frames (`submit(frames=True)`): its canvas after the
    pass. state per position: 0 = noise (renoised this pass), 1 = accepted, 2 = committed (the canvas's last
    frame, `final`, whose tokens are exactly the committed ones)."""
    request_id: str
    canvas: int                  # which canvas of the request (0-based)
    step: int                    # pass within that canvas (0-based)
    final: bool
    tokens: list[int]
    state: list[int]
    entropy: list[float]         # per position, of the pass's distribution (nats)
    accepted: int
    mean_entropy: float


@dataclass
class StepStats:
    """What the last `step` did (for metrics): prompt tokens encoded, rows denoised, seconds of each."""
    prefill_tokens: int = 0
    prefill_s: float = 0.0
    rows: int = 0
    pass_s: float = 0.0


@dataclass(eq=False)
class _Request:
    id: str
    prompt: list[int]
    s: SamplerConfig
    gen: torch.Generator
    greedy: bool = False
    frames: bool = False
    last_entropy: list[float] | None = None  # entropies of this request's last frame
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    canvases: int = 0
    passes: int = 0
    cached: int = 0                       # prompt tokens taken from the prefix store
    stored: int = 0                       # prompt tokens it added to the prefix store (past those it took)
    pos: int = 0                          # prompt tokens encoded so far (into its prefill row)
    row: int | None = None                # its row of the engine's prefill cache while its prompt is encoded
    top: int = 0                          # alternatives per committed token (top_logprobs)
    prompt_top: int | None = None         # None: no prompt scoring; else alternatives per prompt token
    alternatives: list[Alternatives] = field(default_factory=list)
    prompt_lps: list[float | None] = field(default_factory=lambda: [None])   # the first token has no context
    prompt_alts: list[Alternatives] = field(default_factory=lambda: [[]])
    logit_bias: torch.Tensor | None = None    # [V] fp32 added to its logits (None: none)
    presence: float = 0.0                 # subtracted from the logits of every token it has committed
    frequency: float = 0.0                # ... times how often it has committed it
    counts: torch.Tensor | None = None    # [V] fp32 committed-token counts (with a penalty)
    bias: torch.Tensor | None = None      # [V] what the next steps add: logit_bias less the penalties

    def rebias(self) -> None:
        """`bias` from logit_bias and the penalties of the counts so far (at submit, and after each commit)."""
        self.bias = sampling.penalised(self.logit_bias, self.counts, self.presence, self.frequency)


@dataclass
class _Row:
    req: _Request
    canvas: torch.Tensor                     # [C] current (noisy) canvas
    argmax: torch.Tensor                     # [C] the last step's (all -1 before the canvas's first step)
    soft: torch.Tensor | None                # [C, H] self-conditioning input, None at a canvas's first step
    left: int                                # denoising steps left for this canvas
    run: torch.Tensor                        # [] steps in a row with this argmax (the stop rule's state)
    logprob: torch.Tensor | None = None      # [C] the argmax's log-probabilities (None before the first step)
    top: tuple | None = None                 # ([C, N] ids, [C, N] log-probabilities): the last step's alternatives


class Engine:
    def __init__(self, model, max_batch: int = 8, row_chunk: int | None = None, sampler: str = "auto",
                 cuda_graphs: bool | None = None, prefill_chunk: int = 256,
                 prefix_cache_bytes: int = 1 << 30, exact_reuse: bool = True) -> None:
        """sampler: "exact" (the reference's random stream per request), "fast" (same distribution, one
        uniform per position; see sampling.sample_rows) or "auto" (exact on the CPU in fp32, fast elsewhere).
        cuda_graphs (default: where the model is capturable, i.e. CUDA and bf16): the fast sampler's step runs
        on the cache's static plan and is captured once per number of active rows, then replayed.
        prefill_chunk: prompts are encoded in aligned chunks of this many tokens, about one chunk per step;
        also the granularity of prefix reuse. prefix_cache_bytes: memory for prompt snapshots (0: no reuse).
        exact_reuse=False snapshots whole prompts (not just chunk boundaries), so a chat's next turn encodes only
        its new tokens; its tokens then equal a cold request's only up to rounding (the terminal chat uses it)."""
        if prefill_chunk < 1:
            raise ValueError("prefill_chunk must be >= 1")
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        sampler = sampling.resolve_sampler(sampler, model.device, model.dtype)
        cfg = model.config
        self.C, self.V = cfg.canvas_length, cfg.vocab_size
        self.model, self.max_batch, self.sampler = model, max_batch, sampler
        # canvas rows per sampler chunk: whole requests, so each request's draws stay together
        self.row_chunk = max(1, (row_chunk or default_row_chunk(model, sampler)) // self.C) * self.C
        self.cache = model.new_cache(max_batch, 1024)
        self.cache.n = 0
        self.rows: list[_Row] = []
        self.waiting: deque[_Request] = deque()
        self.prefilling: list[_Request] = []           # prompts being encoded, each bound for a free row
        self.warming: deque[_Request] = deque()         # warm() jobs: encode in idle time, keep the snapshot
        self.pre: KVCache | None = None                 # prompts being encoded, a row each (grown as needed)
        self._pre_free: list[int] = []
        self.prefill_chunk = prefill_chunk
        self.exact_reuse = exact_reuse
        self.prefix = PrefixStore(prefix_cache_bytes, prefill_chunk if exact_reuse else 1) \
            if prefix_cache_bytes > 0 else None
        self.frames: list[Frame] = []               # frames of requests that asked for them (take_frames)
        self.stats = StepStats()
        self.done: dict[str, Result] = {}
        self._ended: list[CanvasEvent] = []         # requests that ended in _prefill (max_new_tokens 0)
        self._ids = itertools.count()
        self._noise = torch.empty(self.row_chunk, self.V, device=model.device) if sampler == "exact" else None
        self._unseen = torch.full((self.C,), -1, device=model.device)     # a fresh canvas's "last argmax"
        self._zero = torch.zeros((), dtype=torch.long, device=model.device)
        self._no_bias = torch.zeros(self.V, device=model.device)         # a row without bias in a biased step
        # CUDA graphs for the fast sampler's step (one per number of active rows), where the model allows them
        # (off CUDA, cuda_graphs=True runs the same static step eagerly)
        if cuda_graphs and sampler != "fast":
            raise ValueError("cuda_graphs needs sampler='fast' (the exact sampler's random streams run eagerly)")
        store = graphs.for_model(model) if sampler == "fast" else None
        use = store is not None and (store.capturable if cuda_graphs is None else cuda_graphs)
        self.graphs = store if use else None

    # ---- public API ---------------------------------------------------------------------------
    def settings(self, **settings) -> SamplerConfig:
        """Resolve and check request settings (as for `generate`) without submitting anything."""
        unknown = set(settings) - set(SETTINGS)
        if unknown:
            raise ValueError(f"unknown setting(s): {', '.join(sorted(unknown))}")
        if type(settings.get("max_new_tokens")) is int and settings["max_new_tokens"] == 0:   # encode only (submit)
            return replace(self.settings(**{**settings, "max_new_tokens": 1}), max_new_tokens=0)
        return resolve_settings(self.model, **{k: settings.get(k, _UNSET) for k in SETTINGS})

    def submit(self, prompt: list[int], *, seed: int | None = None, request_id: str | None = None,
               greedy: bool = False, frames: bool = False, top_logprobs: int = 0,
               prompt_logprobs: int | None = None, logit_bias: dict[int, float] | None = None,
               presence_penalty: float = 0.0, frequency_penalty: float = 0.0, **settings) -> str:
        """Queue a request (token ids); settings as for `generate` (max_new_tokens, max_denoising_steps, ...;
        max_new_tokens=0: encode the prompt, generate nothing).
        greedy: accepted positions take the argmax instead of a sample (temperatures still set the entropies).
        frames: record a `Frame` after every pass of this request (collect them with `take_frames`); requests
        without frames cost nothing extra.
        top_logprobs: each committed token's N most likely alternatives under the distribution its log-probability
        comes from (a top-N of the logits in every step while the request denoises).
        prompt_logprobs: score the prompt: each token's log-probability under the causal encoder (temperature 1)
        given the tokens before it, with N alternatives (0: none); such a prompt is encoded whole, never taken from
        the prefix store.
        logit_bias {token id: value}, presence_penalty, frequency_penalty (OpenAI's): every denoising step adds
        to each position's softcapped logits, before truncation and temperature, logit_bias and minus (presence if
        the request has committed the token + frequency x how often). A biased step runs eagerly (no CUDA graph,
        no fused sampler); requests without them are unaffected."""
        prompt = self._check_ids(prompt)
        for name, n in (("top_logprobs", top_logprobs), ("prompt_logprobs", prompt_logprobs)):
            if n is not None and not (isinstance(n, int) and 0 <= n <= self.V):
                raise ValueError(f"{name} must be an int in [0, {self.V}]")
        check_penalties(presence_penalty, frequency_penalty)
        s = self.settings(**settings)
        check_positions(self.model.config, len(prompt), math.ceil(s.max_new_tokens / self.C) * self.C)
        if request_id is not None and self._known(request_id):
            raise ValueError(f"request id {request_id!r} is already in use")
        gen = torch.Generator(device=self.model.device)
        gen.manual_seed(int(seed)) if seed is not None else gen.seed()
        rid = request_id
        while rid is None or self._known(rid):
            rid = f"req-{next(self._ids)}"
        req = _Request(rid, prompt, s, gen, greedy, frames, top=top_logprobs, prompt_top=prompt_logprobs,  # (a new
                       presence=float(presence_penalty), frequency=float(frequency_penalty))          # list)
        req.logit_bias = sampling.logit_bias_vector(logit_bias, self.V, self.model.device)
        if presence_penalty or frequency_penalty:
            req.counts = torch.zeros(self.V, device=self.model.device)
        req.rebias()
        self.waiting.append(req)
        return rid

    def take_frames(self) -> list[Frame]:
        """Frames recorded since the last call, in order."""
        out, self.frames = self.frames, []
        return out

    def warm(self, prompt: list[int], max_jobs: int = 16) -> bool:
        """Encode `prompt` when nothing else waits, only to leave its snapshot in the prefix store (a chat's
        next turn starts with it). Returns False when there is nothing to gain (no store, or shorter than a
        chunk). At most `max_jobs` wait; older ones are dropped."""
        prompt = self._check_ids(prompt)
        last = self._snapshot_point(len(prompt))         # nothing after the snapshot point
        if self.prefix is None or last == 0:
            return False
        check_positions(self.model.config, len(prompt), 0)
        self.warming.append(_Request(f"warm-{next(self._ids)}", list(prompt[:last]), self.model.sampler_config, None))
        while len(self.warming) > max_jobs:
            self._release(self.warming.popleft())
        return True

    def drop_warm(self) -> None:
        """Forget every warm job (one part-way through gives its prefill row back)."""
        for req in self.warming:
            self._release(req)
        self.warming.clear()

    def _snapshot_point(self, n: int) -> int:
        return n // self.prefill_chunk * self.prefill_chunk if self.exact_reuse else n

    def _check_ids(self, prompt) -> list[int]:
        """The prompt (a list or 1-D tensor of token ids) as a checked list of ints."""
        if isinstance(prompt, torch.Tensor):
            if prompt.dim() != 1 or prompt.is_floating_point():
                raise ValueError(f"a prompt tensor must hold 1-D token ids, got {prompt.dim()}-D {prompt.dtype}")
            prompt = prompt.tolist()
        try:
            if isinstance(prompt, (str, bytes)):
                raise TypeError
            prompt = [operator.index(t) for t in prompt]
        except TypeError:
            raise ValueError("a prompt is a list of token ids (tokenize the text first)") from None
        if not prompt:
            raise ValueError("a request needs at least one prompt token")
        if min(prompt) < 0 or max(prompt) >= self.V:
            raise ValueError(f"token ids must lie in [0, {self.V})")
        return prompt

    def _known(self, request_id: str) -> bool:
        """A request of this id is waiting, running or not yet collected."""
        return request_id in self.done or any(r.id == request_id for r in (*self.waiting, *self.prefilling)) \
            or any(row.req.id == request_id for row in self.rows)

    @torch.inference_mode()
    def cancel(self, request_id: str) -> None:
        """Forget a request wherever it is (waiting, encoding its prompt, or denoising: its row is freed)."""
        self.waiting = deque(r for r in self.waiting if r.id != request_id)
        for r in self.prefilling:
            if r.id == request_id:
                self._release(r)
        self.prefilling = [r for r in self.prefilling if r.id != request_id]
        keep = [i for i, r in enumerate(self.rows) if r.req.id != request_id]
        if len(keep) != len(self.rows):
            self._compact(keep)

    def has_work(self) -> bool:
        """Anything to do for submitted requests (warm jobs alone do not count; `step` runs them when idle)."""
        return bool(self.rows or self.waiting or self.prefilling)

    def queued(self) -> int:
        """Requests not yet denoising (waiting or encoding their prompt)."""
        return len(self.waiting) + len(self.prefilling)

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
        t0 = time.perf_counter()
        self.stats = StepStats(prefill_tokens=self._prefill())
        t1 = time.perf_counter()
        self.stats.prefill_s = t1 - t0
        ended, self._ended = self._ended, []
        if not self.rows:
            return ended
        self.stats.rows = len(self.rows)
        try:
            events = self._denoise()
        except BaseException:                 # (a failed step: the requests ended in _prefill still go out)
            self._ended[:0] = ended
            raise
        self.stats.pass_s = time.perf_counter() - t1
        return ended + events

    def _denoise(self) -> list[CanvasEvent]:
        m, C, n, dev = self.model, self.C, len(self.rows), self.model.device
        canvas = torch.stack([r.canvas for r in self.rows])                                   # [n, C]
        soft = None
        if self.graphs is not None or any(r.soft is not None for r in self.rows):
            zero = torch.zeros(C, m.config.hidden_size, dtype=m.dtype, device=dev)   # = no signal, exactly
            soft = torch.stack([r.soft if r.soft is not None else zero for r in self.rows])   # [n, C, H]
        temp = torch.tensor([sampling.temperatures(r.req.s.max_denoising_steps, r.req.s.t_min, r.req.s.t_max)
                             [r.req.s.max_denoising_steps - r.left] for r in self.rows], dtype=torch.float32)
        temp = temp.repeat_interleave(C)[:, None].to(dev)                                     # [n*C, 1]
        bound = torch.tensor([[r.req.s.entropy_bound] for r in self.rows], dtype=torch.float32, device=dev)
        greedy = torch.tensor([r.req.greedy for r in self.rows], device=dev)
        rules, trunc = self._stop_rules(), self._truncation()
        top = max(r.req.top for r in self.rows)                 # alternatives: as many as any row asks for
        bias = None if all(r.req.bias is None for r in self.rows) else torch.stack(
            [r.req.bias if r.req.bias is not None else self._no_bias for r in self.rows])   # [n, V]
        if self.sampler == "exact":                           # each request's own stream, the reference's order
            def exponentials(r0: int, r1: int) -> torch.Tensor:
                q = self._noise[: r1 - r0]
                for j in range(r0 // C, r1 // C):
                    q[j * C - r0:(j + 1) * C - r0].exponential_(1, generator=self.rows[j].req.gen)
                return q

            out = denoise_step(
                m, self.cache, canvas, soft, temp, bound, self.row_chunk, exponentials=exponentials,
                renoise=lambda: torch.stack([sampling.init_canvas(1, C, self.V, dev, r.req.gen)[0]
                                             for r in self.rows]), greedy=greedy, truncation=trunc, alternatives=top,
                bias=bias)
        else:                                                 # per request: C uniforms, then C renoise ids
            uniform = torch.cat([torch.rand(C, device=dev, generator=r.req.gen) for r in self.rows])
            renoise = torch.stack([sampling.init_canvas(1, C, self.V, dev, r.req.gen)[0] for r in self.rows])
            inputs = (canvas, soft, temp, bound, uniform, renoise, greedy)
            if self.graphs is None or trunc is not None or bias is not None:   # sort / bias: an eager step
                out = self._fast_step(*inputs, trunc, top, bias)
            else:
                key = ("engine", n, C, self.row_chunk, top, self.cache.key_slots(C, True),
                       graphs.buffer_key(*self.cache.tensors()))
                out = self.graphs.run(key, lambda *x: self._fast_step(*x, None, top), *inputs)
        new_canvas, argmax, ent, soft_new, lp = out[:5]
        alts = (out[5], out[6]) if top else None                # [n, C, N] each
        if any(r.req.frames for r in self.rows):
            self._record_frames(new_canvas, ent, bound)
        # every row's stop rule in one batch on the device (each request's own thresholds), one host sync
        flags, runs = [False] * n, [r.run for r in self.rows]
        if rules is not None:
            stop, run = sampling.stable_and_confident(
                argmax, torch.stack([r.argmax for r in self.rows]), torch.stack(runs), ent, *rules)
            flags, runs = stop.tolist(), run.unbind()
        commit = []
        for b, r in enumerate(self.rows):
            r.canvas, r.argmax, r.soft, r.run, r.logprob = new_canvas[b], argmax[b], soft_new[b], runs[b], lp[b]
            r.top = (alts[0][b, :, :r.req.top], alts[1][b, :, :r.req.top]) if alts and r.req.top else None
            r.left -= 1
            r.req.passes += 1
            if flags[b] or r.left == 0:
                commit.append(b)
        return self._commit(commit) if commit else []

    def _stop_rules(self) -> tuple | None:
        """The active rows' stop-rule thresholds for `sampling.stable_and_confident` (see _per_row): a row without
        the rule never stops by it."""
        return self._per_row([sampling.stop_rule(r.req.s.stability_threshold, r.req.s.confidence_threshold)
                              for r in self.rows], (sampling.NEVER, 0.0), torch.float32)

    def _truncation(self) -> tuple | None:
        """The active rows' (top_k, top_p) for denoise_step (see _per_row), one value per canvas position; top_p
        in float64 (see sampling.dropped)."""
        return self._per_row([sampling.truncation(r.req.s.top_k, r.req.s.top_p, self.V) for r in self.rows],
                             (0, 1.0), torch.float64, repeat=self.C)

    def _per_row(self, pairs: list[tuple | None], off: tuple, second: torch.dtype, repeat: int = 1) -> tuple | None:
        """Each active row's pair of settings (None: the row has it off): None when every row has it off, the pair
        itself when every row has the same (nothing to copy to the device), else two [n * repeat] tensors (the
        second of dtype `second`; made before the step, so that copying them to the device never waits for it),
        rows that have it off taking `off`."""
        if all(p is None for p in pairs):
            return None
        pairs = [p or off for p in pairs]
        if len(set(pairs)) == 1:
            return pairs[0]
        dev = self.model.device
        a = torch.tensor([x for x, _ in pairs], device=dev)
        b = torch.tensor([y for _, y in pairs], dtype=second, device=dev)
        return (a, b) if repeat == 1 else (a.repeat_interleave(repeat), b.repeat_interleave(repeat))

    def _record_frames(self, new_canvas: torch.Tensor, ent: torch.Tensor, bound: torch.Tensor) -> None:
        """Frames of this pass for the rows that asked (the same acceptance the step applied)."""
        accept = sampling.entropy_bound_accept(ent, bound)
        for b, r in enumerate(self.rows):
            if r.req.frames:
                acc, e = accept[b].tolist(), ent[b].float()
                r.req.last_entropy = e.tolist()
                self.frames.append(Frame(r.req.id, r.req.canvases, r.req.s.max_denoising_steps - r.left, False,
                                         new_canvas[b].tolist(), [int(a) for a in acc], r.req.last_entropy, sum(acc),
                                         float(e.mean())))

    def _fast_step(self, canvas, soft, temp, bound, uniform, renoise, greedy, truncation=None, alternatives=0,
                   bias=None):
        """The fast sampler's step as a function of tensors (captured per active-row count and alternatives on
        CUDA, when no row truncates or biases its distribution)."""
        return denoise_step(self.model, self.cache, canvas, soft, temp, bound, self.row_chunk,
                            static=self.graphs is not None, uniform=uniform, renoise=renoise, greedy=greedy,
                            truncation=truncation, alternatives=alternatives, bias=bias)

    # ---- internals ----------------------------------------------------------------------------
    def _new_canvas(self, req: _Request) -> _Row:
        canvas = sampling.init_canvas(1, self.C, self.V, self.model.device, req.gen)[0]
        return _Row(req, canvas, self._unseen, None, req.s.max_denoising_steps, self._zero)

    def _prefill(self) -> int:
        """Encode about `prefill_chunk` prompt tokens (at least one aligned chunk), or with no row denoising every
        prompt bound for a free row: requests first, in arrival order; warm jobs (a chunk per step) only when no
        request waits. Each round takes the next aligned chunk of every prompt with tokens left (while the budget
        lasts) and encodes chunks of one length together, one row each of the prefill cache; finished prompts
        join the batch. Returns the tokens encoded."""
        while self.waiting and len(self.rows) + len(self.prefilling) < self.max_batch:
            self.prefilling.append(self._start(self.waiting.popleft()))
        idle = not (self.waiting or self.rows)
        jobs = list(self.prefilling) or (list(self.warming) if idle else [])   # warm jobs: only when idle
        # no row is denoising: nothing to stall, so every prompt bound for a free row is encoded now and they all
        # start together (a burst of requests then runs in lock step, as one generate call would)
        K = self.prefill_chunk
        done, budget = 0, K if self.rows or not self.prefilling else math.inf
        while True:
            chunks: dict[int, list[tuple[_Request, int]]] = {}   # chunk length -> [(request, chunk end)]
            for req in jobs:
                if req.pos >= len(req.prompt) or done >= budget:
                    continue
                if req.row is None:                              # a warm job: one at a time (the spare row)
                    if any(w.row is not None for w in self.warming):
                        continue
                    self._start(req)
                    if req.pos >= len(req.prompt):               # stored whole already: nothing to encode
                        continue
                end = min(len(req.prompt), (req.pos // K + 1) * K)   # aligned: the cold request's chunks
                chunks.setdefault(end - req.pos, []).append((req, end))
                done += end - req.pos
            if not chunks:
                break
            for group in chunks.values():
                ids = torch.tensor([req.prompt[req.pos:end] for req, end in group], device=self.model.device)
                h = self.model.encode(ids, self.pre, rows=[req.row for req, _ in group])     # [G, S, H]
                for g, (req, end) in enumerate(group):
                    if req.prompt_top is not None:
                        self._score(req, h[g], end)
                    req.pos = end
                    last = self._snapshot_point(len(req.prompt))   # exact reuse: the last chunk boundary
                    if end == last and last > req.cached and self.prefix is not None:
                        snap = self.model.new_cache(1, last, scratch=1)
                        snap.copy_row(0, self.pre, req.row)
                        if self.prefix.insert(req.prompt[:last], snap):
                            req.stored = last - req.cached
        for req in jobs:
            if req.pos < len(req.prompt):
                continue                                         # budget spent; continue next step
            if req in self.warming:
                self.warming.remove(req)
                self._release(req)
                continue
            self.prefilling.remove(req)
            if req.s.max_new_tokens == 0:                        # encode only: done, no denoising row
                self._release(req)
                self._ended.append(self._end(req, [], [], [], "length"))
                continue
            b = len(self.rows)                                   # move into a free row
            self.cache.n = b + 1
            self.cache.copy_row(b, self.pre, req.row)
            self._release(req)
            self.rows.append(self._new_canvas(req))
        return done

    def _score(self, req: _Request, h: torch.Tensor, end: int) -> None:
        """The prompt's log-probabilities from one encoded chunk (h [S, H] at positions req.pos .. end - 1, each
        predicting the next prompt token), in pieces of the sampler's rows (fp32 [rows, V] logits)."""
        last = min(end, len(req.prompt) - 1)                     # the prompt's last position predicts no prompt token
        step = sampling.rows_per_chunk(self.V)
        for a in range(req.pos, last, step):
            b = min(last, a + step)
            logits = self.model.head(h[a - req.pos:b - req.pos])                                # [m, V] fp32
            lse = logits.logsumexp(dim=-1, keepdim=True)
            target = torch.tensor(req.prompt[a + 1:b + 1], device=logits.device)[:, None]
            req.prompt_lps += (logits.gather(1, target) - lse)[:, 0].tolist()
            if req.prompt_top:
                ids, lps = sampling.alternatives_of(logits, req.prompt_top, lse)
                req.prompt_alts += [list(zip(i, p)) for i, p in zip(ids.tolist(), lps.tolist())]
            else:
                req.prompt_alts += [[] for _ in range(b - a)]

    def _start(self, req: _Request) -> _Request:
        """Give a request a row of the prefill cache, starting from the longest stored prefix of its prompt."""
        if not self._pre_free:                # grow: rows double, up to one per request bound for the batch plus
            n = 0 if self.pre is None else self.pre.batch   # one for a warm job (no more are ever in use)
            assert n <= self.max_batch, "every prefill row is in use: one was not given back (_release)"
            grown = self.model.new_cache(min(max(1, 2 * n), self.max_batch + 1), self.prefill_chunk, scratch=1)
            for b in range(n):                # every row is in use: each keeps its place
                grown.copy_row(b, self.pre, b)
            self.pre, self._pre_free = grown, list(range(grown.batch - 1, n - 1, -1))
        req.row = self._pre_free.pop()
        self.pre.clear_row(req.row)
        n, snap = self.prefix.lookup(req.prompt) if self.prefix is not None and req.prompt_top is None else (0, None)
        if snap is not None:
            self.pre.copy_row(req.row, snap)
            req.pos = req.cached = n
        return req

    def _release(self, req: _Request) -> None:
        """Give back a request's prefill row; with none in use, the prefill cache's memory too."""
        if req.row is None:
            return
        self._pre_free.append(req.row)
        req.row = None
        if len(self._pre_free) == self.pre.batch:
            self.pre, self._pre_free = None, []

    def _commit(self, commit: list[int]) -> list[CanvasEvent]:
        events, keep, encode_rows, encode_ids = [], [], [], []
        ids = torch.stack([self.rows[b].argmax for b in commit])                                 # [m, C]
        lps = torch.stack([self.rows[b].logprob for b in commit])                               # [m, C]
        both = torch.cat([ids.double(), lps.double()], dim=1).tolist()       # one read (ids < 2^53: exact)
        canvases = {b: [int(t) for t in row[:self.C]] for b, row in zip(commit, both)}
        logprobs = {b: row[self.C:] for b, row in zip(commit, both)}
        alternatives = {b: [list(zip(i, p)) for i, p in zip(top[0].tolist(), top[1].tolist())]   # (reads only
                        for b in commit if (top := self.rows[b].top) is not None}                    # when asked)
        for b, r in enumerate(self.rows):
            if b not in commit:
                keep.append(b)
                continue
            req, s = r.req, r.req.s
            toks = canvases[b]
            req.canvases += 1
            eos = set(s.eos_token_id or [])
            cut = next((i for i, t in enumerate(toks) if t in eos), None)
            room = s.max_new_tokens - len(req.tokens)              # exact max_new_tokens: cut the last canvas
            if cut is not None and cut < room:
                toks, reason = toks[:cut + 1], "eos"
            else:
                toks = toks[:room]
                reason = "length" if len(toks) == room else None
            alts = alternatives.get(b, [[]] * self.C)[:len(toks)]
            if req.frames:                                        # the committed canvas closes its frames
                ent = (req.last_entropy or [0.0] * self.C)[:len(toks)]
                self.frames.append(Frame(req.id, req.canvases - 1, s.max_denoising_steps - r.left, True,
                                         list(toks), [2] * len(toks), ent, len(toks),
                                         sum(ent) / max(len(ent), 1)))
            events.append(self._end(req, toks, logprobs[b][:len(toks)], alts, reason))
            if reason is not None:
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

    def _end(self, req: _Request, toks: list[int], logprobs: list[float], alts: list[Alternatives],
             reason: str | None) -> CanvasEvent:
        """Add a committed canvas's tokens to the request (its first carries the prompt's scores) and make its
        event; with a finish `reason`, the request is done: its Result waits in `done`."""
        first = req.canvases <= 1
        if req.counts is not None and toks:                 # the penalties see every committed token
            req.counts += torch.bincount(torch.tensor(toks, device=req.counts.device), minlength=self.V)
            req.rebias()
        req.tokens += toks
        req.logprobs += logprobs
        req.alternatives += alts
        prompt = (req.prompt_lps, req.prompt_alts) if req.prompt_top is not None else (None, None)
        event = CanvasEvent(req.id, toks, reason is not None, reason, req.passes, req.cached, logprobs, alts,
                            *(prompt if first else (None, None)), stored_tokens=req.stored)
        if reason is not None:
            s = req.s
            n_valid = len(req.tokens) if s.pad_token_id is None else sum(t != s.pad_token_id for t in req.tokens)
            self.done[req.id] = Result(req.id, req.prompt, req.tokens, reason, req.passes,
                                       n_valid / max(req.passes, 1), req.cached, req.logprobs, req.alternatives,
                                       *prompt, stored_tokens=req.stored)
        return event

    def _compact(self, keep: list[int]) -> None:
        self.cache.select_rows(keep)
        self.rows = [self.rows[b] for b in keep]
