"""FastAPI routes of `dgemma serve`: OpenAI-compatible chat and text completions and responses on the engine
worker, and vLLM-style tokenizer routes.

Knows: HTTP, the OpenAI shapes (protocol.py), the chat template and tokenizer (text lives here, not in the
engine), turning a request into engine settings (exact max_tokens, temperature, stop strings, seed, diffusion
extras), SSE streaming of committed text, cancelling on disconnect, 401/404/429/503 and OpenAI-shaped errors
(never a traceback), warming the prefix cache with a finished chat turn, Prometheus metrics.
Does not know: the model math; it talks to the engine only through `worker.Worker`.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import re
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from .protocol import (APIError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest,
                       error_body, now, usage)
from .text import CharOffsets, TextStream, frame_json, token_text
from .markup import CallReader, ThoughtReader, as_template_call, forced_text, unsupported
from .responses import Builder, ResponsesRequest

log = logging.getLogger("dgemma.serve")


@dataclass
class ServeConfig:
    model_path: str
    model_name: str
    api_key: str | None = None
    device: str | None = None
    dtype: str = "auto"
    quantize: str | None = None
    group_size: int | None = None
    max_batch: int = 8
    max_queue: int = 64
    sampler: str = "fast"
    prefill_chunk: int = 256
    prefix_cache_bytes: int = 1 << 30
    max_steps: int = 256                     # cap on max_denoising_steps per canvas (bounds one request's work)


@dataclass
class State:
    cfg: ServeConfig
    ready: bool = False
    failed: str | None = None
    model: Any = None
    tok: Any = None
    engine: Any = None
    worker: Any = None
    metrics: Any = None
    chat_eos: list[int] = field(default_factory=list)
    pieces: dict[int, str] = field(default_factory=dict)     # token id -> its text, for frames


class Metrics:
    """Prometheus metrics in a private registry (so two apps in one process do not collide)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        r = self.registry = CollectorRegistry()
        fast = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5)
        slow = (.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60)
        self.requests = Counter("dgemma_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.queue = Gauge("dgemma_queue_depth", "requests waiting for a batch row", registry=r)
        self.rows = Gauge("dgemma_active_rows", "batch rows denoising", registry=r)
        self.ttfc = Histogram("dgemma_time_to_first_canvas_seconds", "submit to first committed canvas",
                              buckets=slow, registry=r)
        self.pass_s = Histogram("dgemma_decoder_pass_seconds", "one engine step's denoiser pass and sampling",
                                buckets=fast, registry=r)
        self.prefill_s = Histogram("dgemma_prefill_seconds", "prompt encoding per engine step", buckets=fast,
                                   registry=r)
        self.tpf = Histogram("dgemma_tokens_per_forward", "generated tokens per decoder pass, per request",
                             buckets=(.25, .5, 1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.hit_tokens = Counter("dgemma_prefix_cache_hit_tokens", "prompt tokens served from the prefix cache",
                                  registry=r)
        self.prompt_tokens = Counter("dgemma_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.generated = Counter("dgemma_generated_tokens", "tokens generated", registry=r)

    def observe(self, kind: str, value: float) -> None:   # the worker's hook
        {"pass_seconds": self.pass_s.observe, "prefill_seconds": self.prefill_s.observe,
         "queue_depth": self.queue.set, "active_rows": self.rows.set}[kind](value)


def load_state(state: State) -> None:
    """Load model, tokenizer, engine and start the worker (run in a background thread at start-up)."""
    try:
        import torch
        import dgemma
        from dgemma.checkpoint import resolve_device
        from dgemma.engine import Engine
        from .worker import Worker
        cfg = state.cfg
        dev = resolve_device(cfg.device)
        model = dgemma.load(cfg.model_path, device=dev, dtype=cfg.dtype, quantize=cfg.quantize,
                            group_size=cfg.group_size)
        tok = dgemma.load_tokenizer(model.path)
        state.chat_eos = tok.chat_eos(model.sampler_config.eos_token_id)
        state.model, state.tok = model, tok
        state.engine = Engine(model, max_batch=cfg.max_batch, sampler=cfg.sampler,
                              prefill_chunk=cfg.prefill_chunk, prefix_cache_bytes=cfg.prefix_cache_bytes)
        state.worker = Worker(state.engine, state.metrics.observe).start()
        state.ready = True
        log.info("model %s ready (%s, %s, max batch %d)", cfg.model_name, model.device,
                 str(model.dtype).replace("torch.", ""), cfg.max_batch)
        del torch
    except Exception as e:                                      # reported by /health and the CLI
        state.failed = f"{type(e).__name__}: {e}"
        log.error("could not load the model: %s", state.failed)


@dataclass
class Job:
    """One accepted request, ready for the worker."""
    rid: str
    ids: list[int]
    kwargs: dict[str, Any]
    stops: list[str]
    chat: list[dict] | None
    include_usage: bool
    frame_interval: float | None = None      # seconds between frames; None: no frames
    events: asyncio.Queue | None = None      # the worker's (kind, payload) events, once submitted
    done: bool = False                       # finished, failed or cancelled: nothing left to cancel
    index: int = 0                           # the choice's index (prompt * n + choice)
    logprobs: bool = False                   # send each token's log-probability (chat: logprobs=true)
    top: int = 0                             # ... with this many alternatives
    echo: str | None = None                  # completions' echo: the prompt's text, sent first
    offsets: bool = False                    # completions' logprobs: each entry with its text_offset
    template: dict = field(default_factory=dict)   # chat: the template's variables besides the messages
    tools: "Tools | None" = None             # chat with tools: the reply's calls are read back
    thinking: bool = False                   # chat: the reply's thinking channel goes to reasoning_content


@dataclass
class Tools:
    """A chat request's tool calling: the ids forced at the reply's start (tool_choice), whether more than one
    call is returned."""
    forced: list[int]
    parallel: bool


SEEDS = 2 ** 64                              # seeds are taken modulo this (the API's range is -2^63 .. 2^64 - 1)


def _choices(job: Job, n: int, first: int = 0) -> list[Job]:
    """One prompt's n choices as engine requests, indexed from `first`: the job itself for n = 1; else n copies,
    choice i with seed + i (choice 0 is what the request gives with n = 1), ids `<id>-<i>`, and no prefix warming
    afterwards (which reply the conversation goes on with is the client's choice)."""
    if n == 1:
        return [replace(job, index=first)]
    seed = job.kwargs["seed"]
    return [replace(job, rid=f"{job.rid}-{i}", index=first + i, chat=None,
                    kwargs={**job.kwargs, "seed": None if seed is None else seed if i == 0 else (seed + i) % SEEDS})
            for i in range(n)]


def create_app(state: State) -> FastAPI:
    app = FastAPI(title="dgemma", version=_version(), description=(
        "OpenAI-compatible server for DiffusionGemma models. Diffusion controls (max_denoising_steps, "
        "entropy_bound, t_min, t_max, confidence_threshold) are extra body fields; temperature scales the "
        "denoising temperature schedule (0 = greedy)."))
    app.state.dgemma = state
    app.openapi = lambda: _openapi(app)

    # ---- errors: always the OpenAI body -----------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return _error_response(request, e.status, e.body(), e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        if not authorized(request):          # the body is parsed before the key is checked: a 401 comes first
            return await _api_error(request, _bad_key())
        # the deepest error: in a union (a string or a list of parts, ...) the branch the body was meant for
        err = max(e.errors(), key=lambda x: len(x.get("loc", ())), default={})
        loc = [str(x) for x in err.get("loc", ()) if x != "body" and not _UNION_TAG.match(str(x))]
        param = "".join(f"[{x}]" if x.isdigit() else f".{x}" for x in loc).lstrip(".") or None
        if err.get("type") == "extra_forbidden":
            msg = f"Unrecognized request argument supplied: {param}"
        elif err.get("type") == "json_invalid" or param is None:
            msg, param = "the request body must be a JSON object", None
        else:
            msg = f"{param}: {err.get('msg', 'invalid value')}"
        return _error_response(request, 400, error_body(msg, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return _error_response(request, e.status_code, error_body(str(e.detail), kind), dict(e.headers or {}))

    @app.exception_handler(Exception)
    async def _crash(request: Request, e: Exception):
        log.exception("unhandled error")
        return _error_response(request, 500, error_body("internal server error", "server_error"))

    def ready() -> State:
        if not state.ready:
            msg = f"the model failed to load: {state.failed}" if state.failed else "the model is still loading"
            raise APIError(503, msg, kind="server_error", code="not_ready", headers={"Retry-After": "5"})
        if not state.worker.alive():
            raise APIError(503, state.worker.stopping or "the engine stopped", kind="server_error",
                           code="shutting_down")
        return state

    def accept(req) -> State:
        """A completion request the server can take: model loaded, fields honourable, the model it names."""
        st = ready()
        req.checks()
        _check_model(st, req.model)
        return st

    def authorized(request: Request) -> bool:
        key = state.cfg.api_key
        if not key:
            return True
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())

    async def auth(request: Request) -> None:
        if not authorized(request):
            raise _bad_key()

    # ---- routes -----------------------------------------------------------------------------------
    @app.get("/health", summary="200 once the model is loaded and the engine runs, else 503")
    async def health():
        if state.ready and state.worker.alive():
            return {"status": "ok"}
        return JSONResponse({"status": "failed" if state.failed else "loading", "error": state.failed}, 503)

    @app.get("/", summary="the playground: a chat page that shows the canvas denoise", response_class=Response)
    async def playground():
        page = Path(__file__).parent / "static" / "index.html"
        if not page.is_file():
            raise APIError(404, "the playground page is not installed", kind="not_found_error")
        return Response(page.read_bytes(), media_type="text/html; charset=utf-8")

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon():                     # none: a 204 keeps the browser from logging a 404 on every page load
        return Response(status_code=204)

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def model_card() -> dict:
        return {"id": state.cfg.model_name, "object": "model", "created": STARTED, "owned_by": "dgemma"}

    @app.get("/v1/models", dependencies=[Depends(auth)])
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(auth)])
    async def one_model(model_id: str):
        _check_model(state, model_id)
        return model_card()

    @app.post("/v1/chat/completions", dependencies=[Depends(auth)], response_model=None,
              responses={200: {"description": "a chat.completion, or with stream=true an SSE stream of "
                                              "chat.completion.chunk events ending with `data: [DONE]`"}})
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        st = accept(req)
        return await _respond(st, [_chat_job(st, req, "chatcmpl")], req.n or 1, request, bool(req.stream),
                              chat=True)

    @app.post("/v1/responses", dependencies=[Depends(auth)], response_model=None,
              responses={200: {"description": "a response, or with stream=true an SSE stream of its events"}})
    async def responses(req: ResponsesRequest, request: Request):
        st = accept(req)
        chat = req.to_chat()
        try:
            job = _chat_job(st, chat, "resp")
        except APIError as e:
            raise req.renamed(e) from None
        return await _respond_items(st, req, job, request)

    @app.post("/v1/completions", dependencies=[Depends(auth)], response_model=None,
              responses={200: {"description": "a text_completion, or with stream=true an SSE stream of "
                                              "text_completion events ending with `data: [DONE]`"}})
    async def completions(req: CompletionRequest, request: Request):
        st = accept(req)
        jobs = []
        for p in req.prompts():
            if isinstance(p, str):
                ids = _encoded(st, p, "prompt")
            else:
                ids = _token_ids(st, p, "prompt")
            echo = (p if isinstance(p, str) else st.tok.decode(ids, skip_special_tokens=True)) if req.echo else None
            jobs.append(_job(st, req, ids, "cmpl", "prompt", None, echo))
        return await _respond(st, jobs, req.n or 1, request, bool(req.stream), chat=False)

    # ---- tokenizer routes (as vLLM serves them; lm-evaluation-harness's remote tokenizer uses them) -------------
    def tokenizer_state(model: str | None) -> State:
        st = ready()
        if model is not None:
            _check_model(st, model)
        return st

    @app.post("/tokenize", dependencies=[Depends(auth)], summary="a prompt or chat -> token ids")
    async def tokenize(req: TokenizeRequest):
        st = tokenizer_state(req.model)
        req.checks()
        from dgemma.tokenizer import TokenizerError
        try:
            if req.messages is not None:
                as_chat = ChatCompletionRequest(model=st.cfg.model_name, messages=req.messages, tools=req.tools,
                                                chat_template_kwargs=req.chat_template_kwargs)
                as_chat.checks()                                 # (text parts only, as the chat route)
                _tool_support(st, as_chat)
                ids = st.tok.apply_chat_template(as_chat.chat(), add_generation_prompt=req.add_generation_prompt,
                                                 tokenize=True, **as_chat.template_vars())
            else:
                ids = st.tok.encode_prompt(req.prompt) if req.add_special_tokens else st.tok.encode(req.prompt)
        except TokenizerError as e:
            raise APIError(400, str(e), "messages" if req.messages is not None else "prompt") from None
        return {"count": len(ids), "max_model_len": st.model.config.max_position_embeddings, "tokens": ids}

    @app.post("/detokenize", dependencies=[Depends(auth)], summary="token ids -> text (special tokens kept)")
    async def detokenize(req: DetokenizeRequest):
        st = tokenizer_state(req.model)
        return {"prompt": st.tok.decode(_token_ids(st, req.tokens, "tokens"), skip_special_tokens=False)}

    @app.get("/tokenizer_info", dependencies=[Depends(auth)], summary="special tokens, chat template, context")
    async def tokenizer_info():
        st = tokenizer_state(None)
        t = st.tok
        return {"tokenizer_class": "dgemma.Tokenizer", "bos_token": t.bos_token, "eos_token": t.eos_token,
                "pad_token": t.pad_token, "unk_token": t.unk_token, "chat_template": t.chat_template,
                "model_max_length": st.model.config.max_position_embeddings, "vocab_size": t.vocab_size}

    return app


STARTED = now()


def _bad_key() -> APIError:
    return APIError(401, "invalid or missing API key (Authorization: Bearer KEY)", code="invalid_api_key")


_ERRORS = {400: "invalid request (the error names the parameter)", 401: "missing or wrong API key",
           404: "unknown model or route", 429: "queue full (see Retry-After)",
           503: "model loading or server shutting down"}


def _openapi(app: FastAPI) -> dict:
    """FastAPI's schema with the responses this server really sends: OpenAI error bodies instead of 422, and the
    SSE stream of the completion routes."""
    if app.openapi_schema:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    err = {"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["message", "type"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}
    for path, ops in schema.get("paths", {}).items():
        for op in ops.values():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            if path.startswith("/v1/") or path in ("/tokenize", "/detokenize", "/tokenizer_info"):
                for code, text in _ERRORS.items():
                    responses[str(code)] = {"description": text, "content": {"application/json": {"schema": err}}}
            if path in ("/v1/chat/completions", "/v1/completions", "/v1/responses"):
                responses["200"]["content"] = {"application/json": {"schema": {"type": "object"}},
                                               "text/event-stream": {"schema": {}}}
    app.openapi_schema = schema
    return schema
# pydantic's names of union branches in an error's location (our fields are lower case; models' names are not)
_UNION_TAG = re.compile(r"^(str|int|float|bool|list\[.*\]|dict\[.*\]|[a-z-]+\[.*\]|[A-Z][A-Za-z0-9]*)$")


def _version() -> str:
    from dgemma import __version__
    return __version__


def _error_response(request: Request, status: int, body: dict, headers: dict | None = None) -> JSONResponse:
    st: State = request.app.state.dgemma
    if st.metrics is not None:
        st.metrics.requests.labels(request.url.path if status != 404 else "other", str(status)).inc()
    return JSONResponse(body, status, headers=headers)


def _token_ids(st: State, ids: list[int], param: str) -> list[int]:
    """The ids, if all lie in the vocabulary; else a 400 naming `param`."""
    V = st.model.config.vocab_size
    if ids and (min(ids) < 0 or max(ids) >= V):
        raise APIError(400, f"token ids must lie in [0, {V})", param)
    return ids


def _encoded(st: State, text: str, param: str) -> list[int]:
    """A completions prompt's ids; a 400 naming `param` for text that cannot be encoded (a lone surrogate)."""
    from dgemma.tokenizer import TokenizerError
    try:
        return st.tok.encode_prompt(text)
    except TokenizerError as e:
        raise APIError(400, str(e), param) from None


def _chat_job(st: State, req: ChatCompletionRequest, prefix: str) -> Job:
    """A chat request as a job: the messages rendered with the template's variables (tools, chat_template_kwargs)
    and the ids that tool_choice forces, and what reading the reply back needs (tool calls, thinking)."""
    from dgemma.tokenizer import TokenizerError
    messages, extra = req.chat(), req.template_vars()
    _tool_support(st, req)
    forced = st.tok.encode(forced_text(req.tool_choice)) if extra["tools"] else []
    try:
        ids = st.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **extra)
    except TokenizerError as e:
        raise APIError(400, str(e), "messages") from None
    job = _job(st, req, ids + forced, prefix, "messages", messages)
    job.template, job.thinking = extra, ThoughtReader.make(st.tok) is not None
    if extra["tools"]:
        job.tools = Tools(forced, req.parallel_tool_calls is not False)
    return job


def _tool_support(st: State, req: ChatCompletionRequest) -> None:
    """A 400 for tools or tool messages that this model's tokenizer and chat template cannot take."""
    if req.uses_tools() and (why := unsupported(st.tok)):
        raise APIError(400, why, "tools" if req.tools else "messages", "unsupported_parameter")


def _check_model(st: State, name: str) -> None:
    if name != st.cfg.model_name:
        raise APIError(404, f"the model {name!r} does not exist (this server has {st.cfg.model_name!r})",
                       "model", "model_not_found")


# request fields handed to the engine settings as they are (an engine error naming one names it as the parameter)
_PASSED_ON = ("max_denoising_steps", "entropy_bound", "confidence_threshold", "top_k", "top_p")


def _job(st: State, req, ids: list[int], prefix: str, prompt_param: str, chat: list[dict] | None,
         echo: str | None = None) -> Job:
    """Request -> engine settings; every refusal is a 400/429 naming the parameter."""
    cfg, base = st.model.config, st.model.sampler_config
    C, room = cfg.canvas_length, cfg.max_position_embeddings - len(ids)
    fit = room // C * C                                            # whole canvases that still fit
    limit = req.limit()
    if limit == 0 and room < 0:                                    # scoring only: the prompt alone must fit
        raise APIError(400, f"the prompt has {len(ids)} tokens, more than the model's context of "
                            f"{cfg.max_position_embeddings}", prompt_param, "context_length_exceeded")
    if fit < 1 and limit != 0:
        raise APIError(400, f"the prompt has {len(ids)} tokens; with one {C}-token canvas it does not fit "
                            f"the model's context of {cfg.max_position_embeddings}", prompt_param,
                       "context_length_exceeded")
    if limit is None:
        limit = min(base.max_new_tokens, fit)
    elif -(-limit // C) * C > room:
        param = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) else "max_tokens"
        raise APIError(400, f"{len(ids)} prompt tokens + {limit} new tokens (in {C}-token canvases) exceed the "
                            f"model's context of {cfg.max_position_embeddings}", param, "context_length_exceeded")
    if req.max_denoising_steps is not None and req.max_denoising_steps > st.cfg.max_steps:
        raise APIError(400, f"max_denoising_steps must be <= {st.cfg.max_steps} on this server", "max_denoising_steps")
    tau = 1.0 if req.temperature is None else req.temperature
    t_min = req.t_min if req.t_min is not None else base.t_min
    t_max = req.t_max if req.t_max is not None else base.t_max
    from dgemma.config import MIN_TEMPERATURE
    if req.t_min is not None and req.t_min < MIN_TEMPERATURE:       # (named with the value the client sent)
        raise APIError(400, f"t_min ({req.t_min}) must be >= {MIN_TEMPERATURE}", "t_min")
    scaled = [t * (tau or 1.0) for t in (t_min, t_max)]
    if tau > 0 and t_min >= MIN_TEMPERATURE:       # a tiny temperature: the schedule held at the floor (near greedy)
        scaled = [max(t, MIN_TEMPERATURE) for t in scaled]
    kwargs: dict[str, Any] = dict(max_new_tokens=limit, t_min=scaled[0], t_max=scaled[1])
    for name in _PASSED_ON:
        if getattr(req, name) is not None:
            kwargs[name] = getattr(req, name)
    if chat is not None:
        kwargs["eos_token_id"] = st.chat_eos
    try:
        st.engine.settings(**kwargs)
    except ValueError as e:
        msg = str(e)
        param = next((p for p in ("t_max", "t_min", *_PASSED_ON) if msg.startswith(p)), "temperature")
        raise APIError(400, msg, param) from None
    seed = 0 if req.seed is None and tau == 0 else req.seed      # greedy is repeatable: the canvas noise too
    kwargs.update(seed=seed, greedy=tau == 0, frames=bool(req.denoising_frames))
    # chat: logprobs true / top_logprobs N; completions: logprobs N (each token's own and N alternatives)
    logprobs = bool(req.logprobs) if chat is not None else req.logprobs is not None
    top = (req.top_logprobs if chat is not None else req.logprobs) or 0
    if logprobs and top:
        kwargs["top_logprobs"] = top
    if logprobs and echo is not None:
        kwargs["prompt_logprobs"] = top
    if req.presence_penalty or req.frequency_penalty:
        kwargs.update(presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0)
    if req.logit_bias:
        kwargs["logit_bias"] = _logit_bias(req.logit_bias, cfg.vocab_size)
    include = bool(req.stream_options and req.stream_options.include_usage)
    interval = (50 if req.frame_interval_ms is None else req.frame_interval_ms) / 1000 if req.denoising_frames \
        else None
    return Job(f"{prefix}-{uuid.uuid4().hex[:24]}", list(ids), kwargs, req.stops(), chat, include, interval,
               logprobs=logprobs, top=top, echo=echo, offsets=logprobs and chat is None)


def _logit_bias(given: dict[str, float], vocab: int) -> dict[int, float]:
    """OpenAI's logit_bias (token-id strings -> [-100, 100]) as the engine takes it; a 400 naming it otherwise."""
    out = {}
    for k, v in given.items():
        if not (k.isascii() and k.isdigit() and len(k) <= 12 and int(k) < vocab):   # (int() of 5,000 digits: error)
            raise APIError(400, f"logit_bias keys are token ids in [0, {vocab}) (got {k[:20]!r})", "logit_bias")
        if not -100 <= v <= 100:
            raise APIError(400, f"logit_bias values lie in [-100, 100] (got {v})", "logit_bias")
        out[int(k)] = float(v)
    return out


def _submit(st: State, jobs: list[Job], prompts: int) -> None:
    """Hand the jobs (a request's choices, for its `prompts` prompts) to the worker now, in the handler, all
    together; or refuse them with a 429 when they would take the requests waiting past --max-queue (a 400 when
    there are more than it allows)."""
    loop, limit = asyncio.get_running_loop(), st.cfg.max_queue
    asked = f"n={len(jobs)}" if prompts == 1 else f"{prompts} prompts x n={len(jobs) // prompts}"
    if len(jobs) > limit:
        raise APIError(400, f"{asked} is more than this server queues at once (--max-queue {limit})",
                       "n" if prompts == 1 else "prompt")

    def sink_for(q: asyncio.Queue):
        def sink(kind: str, payload: Any) -> None:               # called on the engine thread
            loop.call_soon_threadsafe(q.put_nowait, (kind, payload))
        return sink

    queues = [asyncio.Queue() for _ in jobs]
    if not st.worker.submit_all([(j.rid, j.ids, sink_for(q), j.kwargs) for j, q in zip(jobs, queues)], limit=limit):
        more = f" and this one asks for {asked}" if len(jobs) > 1 else ""
        raise APIError(429, f"{st.worker.waiting} requests are waiting{more} (--max-queue {limit}); retry "
                            "later", kind="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
    for j, q in zip(jobs, queues):
        j.events = q


def _drop(st: State, *jobs: Job) -> None:
    """Cancel submitted jobs nobody will read any more (client gone); nothing for those that already ended."""
    for job in jobs:
        if not job.done:
            job.done = True
            st.worker.cancel(job.rid)
            log.info("%s cancelled (client gone)", job.rid)


async def _merged(st: State, jobs: list[Job]) -> AsyncIterator[tuple[int, tuple]]:
    """Every job's events (_events) as they come, each with its job's choice index. An error in one ends them
    all: the others are cancelled."""
    its = [_events(st, j) for j in jobs]
    pending = {asyncio.ensure_future(anext(it)): i for i, it in enumerate(its)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for t in sorted(done, key=pending.get):               # (same-time events in choice order)
                i = pending.pop(t)
                try:
                    ev = t.result()
                except StopAsyncIteration:
                    continue
                pending[asyncio.ensure_future(anext(its[i]))] = i
                yield jobs[i].index, ev
    finally:
        _drop(st, *jobs)         # first: the awaits below can themselves be cancelled (anyio cancels again)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


async def _events(st: State, job: Job) -> AsyncIterator[tuple[str, Any]]:
    """Yield the submitted job's ("text", delta, logprob entries of the tokens it counts) as canvases commit (with
    job.logprobs also for a canvas whose text is held back; with job.echo the prompt first), then ("end",
    finish_reason, usage). An entry: (token id, log-probability or None, [(id, log-probability)] alternatives,
    where its text starts in the choice's text (with job.offsets; else 0)).
    Cancels the request if the consumer goes away (client disconnect) or a stop string ends it."""
    worker, m, q = st.worker, st.metrics, job.events
    text, n_tokens, t0, first = TextStream(st.tok, job.stops), 0, time.perf_counter(), True
    last_frame, entries, sent = -1e9, [], 0            # every token's entry; how many went out
    offsets, at = CharOffsets(st.tok), []               # (completions' logprobs) where each token's text starts
    calls = CallReader(st.tok, job.tools.forced, job.tools.parallel) if job.tools else None
    thought = ThoughtReader.make(st.tok) if job.thinking else None
    thinking, shown_thought = TextStream(st.tok, []), 0   # the thinking's text; how much of it went out
    where: list[int] = []            # the place in the reply of each id given to `text` (thinking and calls are not)
    n_thought = 0                    # reply tokens in the thinking channel

    def through(k: int) -> int:      # how many reply tokens come up to the k-th of those (0: those before the first)
        return where[k - 1] + 1 if k else where[0] if where else 0
    try:
        while True:
            kind, p = await q.get()
            if kind == "error":
                job.done = True
                raise APIError(503, p, kind="server_error", code="request_ended")
            if kind == "frame":
                t = time.perf_counter()
                if p.final or t - last_frame >= job.frame_interval:
                    last_frame = t
                    yield "frame", frame_json(p, st.tok, st.pieces)
                continue
            if kind == "canvas":
                if first:
                    m.ttfc.observe(time.perf_counter() - t0)
                    first = False
                    if job.echo is not None:     # (a prompt's scores come with its first canvas)
                        echo_at = [min(o, len(job.echo)) for o in CharOffsets(st.tok).extend(job.ids)] \
                            if job.offsets else [0] * len(job.ids)   # (a prompt spelling a special token: clipped)
                        yield "text", job.echo, list(zip(job.ids, p.prompt_logprobs, p.prompt_top_logprobs,
                                                         echo_at)) if job.logprobs else []
                base, kept = n_tokens, range(len(p.tokens))
                n_tokens += len(p.tokens)
                if thought:                               # the thinking channel: its own text
                    inner, kept = thought.push(p.tokens)
                    n_thought += len(p.tokens) - len(kept)   # (with its marks)
                    thinking.push(inner, final=p.finished)
                    said = thought.shown(thinking.text, p.finished)
                    if len(said) > shown_thought:
                        yield "reasoning", said[shown_thought:]
                        shown_thought = len(said)
                ids = [p.tokens[i] for i in kept]
                shown, made = calls.push(ids) if calls else (ids, [])    # (text stops at a tool call)
                where += [base + i for i in kept[:len(shown)]]
                delta = text.push(shown, final=p.finished or calls is not None and calls.first is not None)
                out = []
                if job.logprobs:     # the tokens whose text went out (all at the end; up to a stop string)
                    entries += zip(p.tokens, p.logprobs, p.top_logprobs)
                    upto = len(entries) if p.finished and not text.stopped else through(text.covered())
                    if job.offsets:
                        at += [len(job.echo or "") + o for o in offsets.extend(p.tokens)]
                    out = [(*e, at[i] if job.offsets else 0) for i, e in enumerate(entries[sent:upto], sent)]
                    sent = max(sent, upto)
                if delta or out:
                    yield "text", delta, out
                if made and not text.stopped:             # (a call after a stop string is past the reply's end)
                    yield "calls", made
                if text.stopped:                          # count the tokens up to the stop string
                    worker.cancel(job.rid)
                    job.done = True
                    used = through(text.used)
                    yield "end", "stop", _finish(st, job, used, p.cached_tokens, p.passes, t0,
                                                 min(n_thought, used) if thought else None), p.stored_tokens
                    _warm(st, job, text.text, [], thinking.text)
                    return
            elif kind == "done":
                job.done = True
                reason = "stop" if p.finish_reason == "eos" else "length"
                rest = calls.leftover() if calls else ""        # text after a call that is not a call: shown
                cut = min((i for i in (rest.find(s) for s in job.stops) if i >= 0), default=-1)
                if cut >= 0:                                    # (up to a stop string: the reply ends there)
                    rest, reason = rest[:cut], "stop"
                if rest:
                    yield "text", rest, []
                if calls and calls.calls and reason == "stop":  # (cut at max_tokens: still "length")
                    reason = "tool_calls"
                yield "end", reason, _finish(st, job, n_tokens, p.cached_tokens, p.decoder_passes, t0,
                                             n_thought if thought else None), p.stored_tokens
                _warm(st, job, text.text + rest, calls.calls if calls else [], thinking.text)
                return
    finally:
        _drop(st, job)


def _chat_logprobs(st: State, entries: list[tuple]) -> list[dict]:
    """OpenAI's chat logprobs content: each token's text, log-probability (of the step its canvas converged at),
    UTF-8 bytes and its alternatives (top_logprobs; truncated-away ones, at -inf, left out)."""
    def one(t: int, lp: float) -> dict:
        raw = st.tok.token_bytes(t)                 # (a piece of a UTF-8 character decodes to U+FFFD)
        return {"token": token_text(st.tok, st.pieces, t), "logprob": lp, "bytes": None if raw is None else list(raw)}
    return [{**one(t, lp), "top_logprobs": [one(a, alp) for a, alp in alts if math.isfinite(alp)]}
            for t, lp, alts, _ in entries]


def _text_logprobs(st: State, entries: list[tuple]) -> dict:
    """The completions API's logprobs object for entries (see _events; text_offset: where each token's text starts
    in the choice's text). top_logprobs: per token a {text: log-probability} of its alternatives and itself (None
    where the token has no log-probability: a prompt's first)."""
    tokens, tops = [], []
    for t, lp, alts, _ in entries:
        tokens.append(token_text(st.tok, st.pieces, t))
        if lp is None:
            tops.append(None)
            continue
        top: dict[str, float] = {}
        for a, alp in alts:
            if math.isfinite(alp):
                top.setdefault(token_text(st.tok, st.pieces, a), alp)
        top.setdefault(tokens[-1], lp)
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": [e[1] for e in entries], "top_logprobs": tops,
            "text_offset": [e[3] for e in entries]}


def _finish(st: State, job: Job, n_tokens: int, cached: int, passes: int, t0: float,
            reasoning: int | None = None) -> dict:
    m = st.metrics
    m.prompt_tokens.inc(len(job.ids))
    m.generated.inc(n_tokens)
    m.hit_tokens.inc(cached)
    if passes:
        m.tpf.observe(n_tokens / passes)
    log.info("%s done: %d prompt tokens (%d cached), %d new, %d passes, %.2f s", job.rid, len(job.ids), cached,
             n_tokens, passes, time.perf_counter() - t0)
    return usage(len(job.ids), n_tokens, cached, reasoning)


def _warm(st: State, job: Job, reply: str, calls: list[dict], thinking: str) -> None:
    """Encode a finished chat turn (its messages and the `reply`, tool `calls` and `thinking` sent back) as the
    next request will render it, in the engine's idle time."""
    if job.chat is None:
        return
    answer: dict[str, Any] = {"role": "assistant", "content": reply}
    if calls:
        answer["tool_calls"] = [as_template_call(c) for c in calls]
    if thinking:
        answer["reasoning_content"] = ThoughtReader.shown(thinking, True)
    try:
        ids = st.tok.apply_chat_template(job.chat + [answer], add_generation_prompt=False, tokenize=True,
                                         **job.template)
    except Exception as e:                    # (best effort: the reply is already out)
        log.info("%s: the finished turn was not warmed (%s)", job.rid, e)
        return
    if len(ids) < st.model.config.max_position_embeddings:
        st.worker.warm(ids)


async def _respond(st: State, base: list[Job], n: int, request: Request, stream: bool, chat: bool):
    """Run a request's jobs (one per prompt; completions may have several), n choices each, and answer: one body,
    or an SSE stream."""
    job = base[0]                                       # (the request-wide fields: id, logprobs, usage)
    created, name, route, rid = now(), st.cfg.model_name, request.url.path, job.rid
    jobs = [c for p, b in enumerate(base) for c in _choices(b, n, p * n)]

    def logprobs(entries: list | None) -> dict | None:
        if not job.logprobs or entries is None:
            return None
        return {"content": _chat_logprobs(st, entries)} if chat else _text_logprobs(st, entries)

    if chat:
        def piece(i: int, delta: dict, finish: str | None, entries: list | None = None) -> dict:
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": name,
                    "choices": [{"index": i, "delta": delta, "logprobs": logprobs(entries),
                                 "finish_reason": finish}]}
    else:
        def piece(i: int, delta: dict, finish: str | None, entries: list | None = None) -> dict:
            return {"id": rid, "object": "text_completion", "created": created, "model": name,
                    "choices": [{"index": i, "text": delta.get("content", ""), "logprobs": logprobs(entries),
                                 "finish_reason": finish}]}

    _submit(st, jobs, len(base))
    if stream:
        async def sse() -> AsyncIterator[str]:
            status, usages = "499", [None] * len(jobs)          # 499 until the last event went out
            try:
                if chat:
                    for j in jobs:
                        yield _sse(_with_usage(piece(j.index, {"role": "assistant", "content": ""}, None), job))
                async for i, ev in _merged(st, jobs):
                    if ev[0] == "text":
                        yield _sse(_with_usage(piece(i, {"content": ev[1]}, None, ev[2]), job))
                    elif ev[0] == "calls":
                        yield _sse(_with_usage(piece(i, {"tool_calls": ev[1]}, None), job))
                    elif ev[0] == "reasoning":
                        yield _sse(_with_usage(piece(i, {"reasoning_content": ev[1]}, None), job))
                    elif ev[0] == "frame":
                        yield _sse({**piece(i, {}, None), "choices": [], "dgemma_frame": {**ev[1], "index": i}})
                    else:
                        yield _sse(_with_usage(piece(i, {}, ev[1]), job))
                        usages[i] = ev[2]
                if job.include_usage:
                    yield _sse({**piece(0, {}, None), "choices": [], "usage": _total(usages, n)})
                yield "data: [DONE]\n\n"
                status = "200"
            except Exception as exc:                    # server stopping (or a bug): a clear error event
                e = _api_error(exc)
                status = str(e.status)
                yield _sse(e.body())
                yield "data: [DONE]\n\n"
            finally:
                st.metrics.requests.labels(route, status).inc()
        return _streamed(st, sse(), jobs)

    async def collect() -> dict:
        parts: list[list[str]] = [[] for _ in jobs]
        entries: list[list[dict]] = [[] for _ in jobs]
        calls: list[list[dict]] = [[] for _ in jobs]
        thoughts: list[list[str]] = [[] for _ in jobs]
        ends: list[tuple] = [()] * len(jobs)
        async for i, ev in _merged(st, jobs):
            if ev[0] == "text":
                parts[i].append(ev[1])
                entries[i] += ev[2]
            elif ev[0] == "calls":
                calls[i] += ev[1]
            elif ev[0] == "reasoning":
                thoughts[i].append(ev[1])
            elif ev[0] == "end":
                ends[i] = ev
        choices = []
        for i, end in enumerate(ends):
            choice: dict[str, Any] = {"index": i, "logprobs": logprobs(entries[i]), "finish_reason": end[1]}
            if chat:
                choice["message"] = {"role": "assistant", "content": "".join(parts[i])}
                if thoughts[i]:
                    choice["message"]["reasoning_content"] = "".join(thoughts[i])
                if calls[i]:
                    choice["message"].update(content=choice["message"]["content"] or None, tool_calls=[
                        {k: v for k, v in c.items() if k != "index"} for c in calls[i]])   # (index: streams only)
            else:
                choice["text"] = "".join(parts[i])
            choices.append(choice)
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": name, "choices": choices, "usage": _total([e[2] for e in ends], n),
                "system_fingerprint": None}

    return await _body(st, collect(), request)


def _streamed(st: State, events: AsyncIterator[str], jobs: list[Job]) -> StreamingResponse:
    """An SSE response of `events`; the jobs are dropped however it ends (a background task: it runs even when
    the client left before the first chunk)."""
    return StreamingResponse(events, media_type="text/event-stream", background=BackgroundTask(_drop, st, *jobs),
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _body(st: State, collect, request: Request):
    """Await a request's whole answer (the `collect` coroutine); a client that goes away cancels it (499)."""
    route = request.url.path
    task = asyncio.ensure_future(collect)
    while not task.done():
        await asyncio.wait([task], timeout=0.1)
        if not task.done() and await request.is_disconnected():
            task.cancel()
            st.metrics.requests.labels(route, "499").inc()
            return Response(status_code=499)
    body = task.result()                                        # re-raises APIError (handled above)
    st.metrics.requests.labels(route, "200").inc()
    return body


async def _respond_items(st: State, req: ResponsesRequest, job: Job, request: Request):
    """Run a /v1/responses request (one job) and answer with its output items: one response object, or an SSE
    stream of the Responses events (built by responses.Builder either way)."""
    b = Builder(job.rid, now(), st.cfg.model_name, req)

    def events(ev: tuple) -> list[dict]:
        kind = ev[0]
        if kind == "text":
            return b.text(ev[1]) if ev[1] else []
        if kind == "reasoning":
            return b.reasoning(ev[1])
        if kind == "calls":
            return b.calls(ev[1])
        return b.end(ev[1], ev[2], ev[3]) if kind == "end" else []

    _submit(st, [job], 1)
    if req.stream:
        async def sse() -> AsyncIterator[str]:
            status = "499"
            try:
                for e in b.start():
                    yield _sse(e, e["type"])
                async for _, ev in _merged(st, [job]):
                    for e in events(ev):
                        yield _sse(e, e["type"])
                status = "200"
            except Exception as exc:
                e = _api_error(exc)
                status = str(e.status)
                yield _sse({"type": "error", "code": e.code, "message": e.message, "param": e.param,
                            "sequence_number": b.seq}, "error")
            finally:
                st.metrics.requests.labels(request.url.path, status).inc()
        return _streamed(st, sse(), [job])

    async def collect() -> dict:
        async for _, ev in _merged(st, [job]):
            events(ev)
        return b.response()
    return await _body(st, collect(), request)


def _api_error(e: Exception) -> APIError:
    """What a stream says when it ends on an exception: the APIError itself, or (a bug) a logged 500."""
    if isinstance(e, APIError):
        return e
    log.error("unhandled error in a stream", exc_info=e)
    return APIError(500, "internal server error", kind="server_error")


def _total(usages: list[dict], n: int) -> dict:
    """One usage for a request's choices (in index order, n per prompt): each prompt once (its cached tokens: the
    fewest any of its choices had), the completion tokens of all of them."""
    prompts = [usages[p:p + n] for p in range(0, len(usages), n)]
    thought = [u["completion_tokens_details"]["reasoning_tokens"] for u in usages if "completion_tokens_details" in u]
    return usage(sum(g[0]["prompt_tokens"] for g in prompts), sum(u["completion_tokens"] for u in usages),
                 sum(min(u["prompt_tokens_details"]["cached_tokens"] for u in g) for g in prompts),
                 sum(thought) if thought else None)


def _with_usage(chunk: dict, job: Job) -> dict:
    if job.include_usage:
        chunk["usage"] = None
    return chunk


def _sse(obj: dict, event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def start_loading(state: State) -> threading.Thread:
    t = threading.Thread(target=load_state, args=(state,), name="dgemma-load", daemon=True)
    t.start()
    return t
