"""The OpenAI request and response shapes the server accepts and sends (pydantic models = the OpenAPI schema).

Knows: which OpenAI fields exist, which of them dgemma honours, which it rejects unless they carry their
neutral value (`response_format` other than text, `suffix`, ...), the OpenAI tool-call shapes, the
diffusion controls that ride along as extra body fields, and the OpenAI error body. Unknown fields are rejected
(400), as OpenAI does. `temperature` scales the checkpoint's temperature schedule: T(step) = temperature *
(t_min + (t_max - t_min) * steps_left / steps); 0 means greedy (accepted positions take the argmax).
Does not know: the engine, tokens, HTTP routing.
"""
from __future__ import annotations

import time
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .markup import NAME, ArgumentError, as_template_call


class APIError(Exception):
    """An error with an OpenAI-shaped body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.kind, self.param, self.code)


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class _Strict(BaseModel):
    """Unknown fields, values of the wrong JSON type ("5" for 5, 1 for true) and NaN / Infinity are refused."""
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)   # other part types: named in a 400 by the request check
    type: str = Field(description='only "text" is supported')
    text: Optional[str] = None


class FunctionCall(_Strict):
    name: str = Field(max_length=64)
    arguments: str = Field(description="a JSON object, as a string")


class ToolCall(_Strict):
    index: Optional[int] = Field(None, description="accepted and ignored (a streamed call's)")
    id: str = Field(max_length=256)
    type: Literal["function"]
    function: FunctionCall


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"] = Field(
        description='"developer" is treated as "system"; the chat template decides how a system turn renders')
    content: Union[str, list[TextPart], None] = Field(None, description=(
        "a string, or a list of text parts (joined with newlines); other part types are rejected; may be null "
        "only in an assistant message with tool_calls"))
    name: Optional[str] = Field(None, max_length=256, description="accepted; the chat template does not use it")
    tool_calls: Optional[list[ToolCall]] = Field(None, description=(
        "an assistant message's calls (as this API returns them); needs a model whose chat template takes tools"))
    tool_call_id: Optional[str] = Field(None, max_length=256, description=(
        'a "tool" message: the id of the call it answers'))
    reasoning_content: Optional[str] = Field(None, description=(
        "an assistant message's thinking, as this API returns it; given to the chat template (Gemma 4's shows it "
        "only with tool calls after the last user turn)"))
    # what an assistant message from this API carries back (the openai client's model_dump() sends them all)
    refusal: Optional[str] = Field(None, description="only null")
    function_call: Optional[Any] = Field(None, description="only null")
    audio: Optional[Any] = Field(None, description="only null")
    annotations: Optional[list[Any]] = Field(None, description="accepted and ignored")

    def text(self) -> str | None:
        c = self.content
        return c if c is None or isinstance(c, str) else "\n".join(p.text or "" for p in c)


class FunctionDef(_Strict):
    name: str = Field(pattern=rf"^{NAME}$")
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = Field(None, description="a JSON schema, shown to the model")
    strict: Optional[bool] = Field(None, description="accepted; dgemma does not hold arguments to the schema")


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class FunctionName(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: FunctionName


class StreamOptions(_Strict):
    include_usage: bool = False


class ResponseFormat(_Strict):
    type: Literal["text"] = Field(description='only "text" (json_object / json_schema are not supported)')


class DiffusionControls(_Strict):
    """Extra body fields (diffusion sampler), each overriding the checkpoint's generation_config.json."""
    max_denoising_steps: Optional[int] = Field(None, ge=1, le=1024,
                                               description="maximum denoiser passes per canvas")
    entropy_bound: Optional[float] = Field(None, gt=0, le=1e6, description=(
        "per step, accept the lowest-entropy positions while their summed entropy stays within this bound"))
    t_min: Optional[float] = Field(None, gt=0, le=100, description=(
        "temperature of the last denoising step (at least 1e-4)"))
    t_max: Optional[float] = Field(None, gt=0, le=100, description="temperature of the first denoising step")
    confidence_threshold: Optional[float] = Field(None, ge=0, le=1e6, description=(
        "a canvas commits early once its argmax is stable and its mean entropy is below this"))
    top_k: Optional[int] = Field(None, ge=0, le=2 ** 31, description=(
        "keep only the k most likely tokens of each position's distribution at every denoising step (0: off); "
        "applied before top_p"))
    denoising_frames: Optional[bool] = Field(None, description=(
        "with stream=true: also send the canvas after each denoiser pass, as chunks with empty `choices` and a "
        "`dgemma_frame` object {canvas, step, final, tokens, pieces, state (0 noise, 1 accepted, 2 committed), "
        "entropy, accepted, mean_entropy}; the last frame of each canvas (final) holds the committed tokens"))
    frame_interval_ms: Optional[int] = Field(None, ge=0, le=60000, description=(
        "at most one frame per this many milliseconds (default 50; final frames are always sent)"))


class _Common(DiffusionControls):
    model: str
    max_tokens: Optional[int] = Field(None, ge=1, le=2 ** 31, description=(
        "exact upper bound on generated tokens (default: the checkpoint's max_new_tokens, less where the "
        "context ends sooner)"))
    temperature: Optional[float] = Field(None, ge=0, le=2, description=(
        "scales the denoising temperature schedule; 0 = greedy argmax (default 1); a scaled temperature below "
        "1e-4 is held there (fp32 logits / T must stay finite)"))
    top_p: Optional[float] = Field(None, ge=0, le=1, description=(
        "nucleus truncation of each position's distribution at every denoising step (1: off), before the "
        "temperature schedule; the entropies that decide acceptance are those of the truncated distribution"))
    n: Optional[int] = Field(None, ge=1, le=128, description=(
        "choices to generate: n requests for one prompt, denoised side by side (up to the server's --max-batch "
        "rows; the rest wait in its queue); choice i is the request with seed + i modulo 2^64 (choice 0 is what "
        "n=1 gives)"))
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[str, list[str]]] = Field(None, description=(
        "up to 4 strings; the text ends before the first one generated"))
    seed: Optional[int] = Field(None, ge=-(2 ** 63), le=2 ** 64 - 1, description=(
        "the same request with the same seed gives the same text, batched with others or not"))
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2, description=(
        "subtracted, at every denoising step, from the logits of each token the request has already committed "
        "(whole canvases; the canvas being denoised is not counted)"))
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2, description=(
        "likewise, times how often the token was committed"))
    logit_bias: Optional[dict[str, float]] = Field(None, description=(
        "token id (a string) -> a value in [-100, 100] added to that token's logits at every denoising step"))
    user: Optional[str] = Field(None, description="accepted, not logged")

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        if v is None:
            return v
        stops = [v] if isinstance(v, str) else v
        if len(stops) > 4 or any(not s or len(s) > 256 for s in stops):
            raise ValueError("stop must be up to 4 non-empty strings of at most 256 characters")
        return v

    def stops(self) -> list[str]:
        return [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def neutral_checks(self) -> None:
        """Reject field combinations dgemma cannot honour."""
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options is only allowed with stream=true", "stream_options")
        if self.denoising_frames and not self.stream:
            raise APIError(400, "denoising_frames needs stream=true", "denoising_frames")


class ChatCompletionRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1, le=2 ** 31, description="same as max_tokens")
    logprobs: Optional[bool] = Field(None, description=(
        "each generated token's log-probability, under the distribution of the denoising step its canvas converged "
        "at (temperature and top_k / top_p applied); the committed token is that step's argmax"))
    top_logprobs: Optional[int] = Field(None, ge=0, le=20, description=(
        "with logprobs=true: also this many most likely tokens of each position, under the same distribution"))
    response_format: Optional[ResponseFormat] = None
    tools: Optional[list[Tool]] = Field(None, max_length=128, description=(
        "functions the model may call (a model whose chat template takes tools: Gemma 4's does); its calls come "
        "back as message.tool_calls, with finish_reason \"tool_calls\""))
    tool_choice: Optional[Union[Literal["none", "auto", "required"], NamedToolChoice]] = Field(None, description=(
        '"auto" (the default with tools): the model decides; "none": the tools are not shown to it; "required" '
        "or a named function: the reply is made to open a call (of that function); the model writes the rest, "
        "so a reply that does not finish a call comes back as content"))
    parallel_tool_calls: Optional[bool] = Field(None, description="false: only the reply's first call is returned")
    chat_template_kwargs: Optional[dict[str, Any]] = Field(None, description=(
        'extra chat template variables, e.g. {"enable_thinking": true} for Gemma 4 (its thinking comes back as '
        "message.reasoning_content)"))
    functions: Optional[list[Any]] = Field(None, description="not supported")
    function_call: Optional[Any] = Field(None, description="not supported")

    def checks(self) -> None:
        self.neutral_checks()
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", "top_logprobs")
        for name in ("functions", "function_call"):
            if getattr(self, name):
                raise APIError(400, f"{name} are not supported by dgemma (use tools)", name, "unsupported_parameter")
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) < len(names):
            raise APIError(400, "tools must have distinct names", "tools")
        if self.tool_choice is not None and not self.tools:
            raise APIError(400, "tool_choice needs tools", "tool_choice")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise APIError(400, f"tool_choice names {self.tool_choice.function.name!r}, which is not among the tools",
                           "tool_choice")
        template_kwargs_check(self.chat_template_kwargs)
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise APIError(400, "max_tokens and max_completion_tokens disagree", "max_completion_tokens")
        calls: set[str] = set()
        for i, m in enumerate(self.messages):
            for name in ("refusal", "function_call", "audio"):
                if getattr(m, name):
                    raise APIError(400, f"messages[{i}].{name} is not supported by dgemma (only null)",
                                   f"messages[{i}].{name}", "unsupported_parameter")
            if m.tool_calls and m.role != "assistant":
                raise APIError(400, f"messages[{i}]: only an assistant message has tool_calls", f"messages[{i}]")
            if m.content is None and not (m.role == "assistant" and m.tool_calls):
                raise APIError(400, f"messages[{i}] has no content", f"messages[{i}].content")
            if (m.role == "tool") != (m.tool_call_id is not None):
                raise APIError(400, f"messages[{i}]: a tool message, and only one, has a tool_call_id",
                               f"messages[{i}].tool_call_id")
            if m.role == "tool" and m.tool_call_id not in calls:
                raise APIError(400, f"messages[{i}] answers call {m.tool_call_id!r}, which no assistant message "
                                    "before it made", f"messages[{i}].tool_call_id")
            for j, c in enumerate(m.tool_calls or []):
                calls.add(c.id)
                try:
                    as_template_call(c.model_dump())
                except ArgumentError as e:
                    raise APIError(400, f"messages[{i}].tool_calls[{j}]: {e}",
                                   f"messages[{i}].tool_calls[{j}].function.arguments") from None
            if isinstance(m.content, list):
                for j, part in enumerate(m.content):
                    if part.type != "text":
                        raise APIError(400, f"content part type {part.type!r} is not supported (only text)",
                                       f"messages[{i}].content[{j}].type", "unsupported_content")
                    if not isinstance(part.text, str):
                        raise APIError(400, "a text content part needs a 'text' string",
                                       f"messages[{i}].content[{j}].text")

    def uses_tools(self) -> bool:
        """Whether the chat template is given tools or tool messages (the model must support them)."""
        return bool(self.tools and self.tool_choice != "none") or \
            any(m.tool_calls or m.role == "tool" for m in self.messages)

    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def chat(self) -> list[dict]:
        """Messages as chat templates take them: text parts joined, developer -> system, tool calls' arguments
        as dicts, a tool message also with the name of the function whose call it answers."""
        out, names = [], {}
        for m in self.messages:
            msg: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            if m.tool_calls:
                msg["tool_calls"] = [as_template_call(c.model_dump()) for c in m.tool_calls]
                names.update((c.id, c.function.name) for c in m.tool_calls)
            if m.role == "tool":
                msg.update(tool_call_id=m.tool_call_id, name=names[m.tool_call_id])
            if m.reasoning_content is not None:
                msg["reasoning_content"] = m.reasoning_content
            out.append(msg)
        return out

    def template_tools(self) -> list[dict] | None:
        """The tools as the chat template takes them (None with tool_choice "none": not shown)."""
        if not self.tools or self.tool_choice == "none":
            return None
        return [t.model_dump(exclude_none=True) for t in self.tools]

    def template_vars(self) -> dict[str, Any]:
        """Every variable the chat template gets besides the messages: chat_template_kwargs and the tools."""
        return {**(self.chat_template_kwargs or {}), "tools": self.template_tools()}


# variables that the template gets from the request itself, or the tokenizer
_RESERVED = {"self", "messages", "tools", "add_generation_prompt", "tokenize", "bos_token", "eos_token", "pad_token",
             "unk_token", "raise_exception", "strftime_now",
             "range", "dict", "lipsum", "cycler", "joiner", "namespace"}    # (jinja's own globals)


def template_kwargs_check(kwargs: dict[str, Any] | None) -> None:
    for k in kwargs or {}:
        if not k.isidentifier() or k in _RESERVED:
            raise APIError(400, f"chat_template_kwargs: {k[:40]!r} cannot be set (names: identifiers other than "
                                f"{', '.join(sorted(_RESERVED))})", "chat_template_kwargs")


MAX_PROMPTS = 256                            # prompts in one completions request


class CompletionRequest(_Common):
    prompt: Union[str, list[str], list[int], list[list[int]]] = Field(description=(
        "a string or a list of token ids, or a batch of either (a list of strings, or of token-id lists): "
        f"choice `index` = prompt * n + choice (up to {MAX_PROMPTS} prompts)"))
    max_tokens: Optional[int] = Field(None, ge=0, le=2 ** 31, description=(
        "exact upper bound on generated tokens (default: the checkpoint's max_new_tokens, less where the "
        "context ends sooner); 0 with echo and logprobs scores the prompt without generating"))
    echo: Optional[bool] = Field(None, description=(
        "the text starts with the prompt; with logprobs, so do the log-probabilities: the prompt tokens' under the "
        "model's causal encoder (temperature 1) given the tokens before them, null for the first"))
    best_of: Optional[int] = Field(None, description="only n (no picking among more choices than returned)")
    logprobs: Optional[int] = Field(None, ge=0, le=20, description=(
        "each token's log-probability (generated tokens: under the distribution of the denoising step its canvas "
        "converged at) and this many most likely alternatives, as tokens / token_logprobs / top_logprobs / "
        "text_offset (where each token's text starts in `text`)"))
    suffix: Optional[str] = Field(None, description="not supported")

    def checks(self) -> None:
        self.neutral_checks()
        for name, ok in (("best_of", self.best_of in (None, self.n or 1)),  # = n: no pick
                         ("suffix", self.suffix is None)):
            if not ok:
                raise APIError(400, f"{name} is not supported by dgemma", name, "unsupported_parameter")

    def limit(self) -> int | None:
        return self.max_tokens

    def prompts(self) -> list[str | list[int]]:
        """The request's prompts, each a string or a non-empty list of token ids."""
        p = self.prompt
        batch = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
        if not batch or any(not x for x in batch):
            raise APIError(400, "a prompt must be a non-empty string or list of token ids", "prompt")
        if len(batch) > MAX_PROMPTS:
            raise APIError(400, f"at most {MAX_PROMPTS} prompts per request", "prompt")
        return batch


class TokenizeRequest(_Strict):
    """vLLM's /tokenize: a text prompt or chat messages -> token ids."""
    model: Optional[str] = None
    prompt: Optional[str] = Field(None, description="a text, encoded as /v1/completions encodes a string prompt "
                                                    "(with add_special_tokens: bos in front)")
    messages: Optional[list[Message]] = Field(None, min_length=1, description=(
        "a chat, rendered as /v1/chat/completions does"))
    tools: Optional[list[Tool]] = Field(None, max_length=128, description="with messages: as the chat route's")
    chat_template_kwargs: Optional[dict[str, Any]] = Field(None, description="with messages: as the chat route's")
    add_special_tokens: bool = True
    add_generation_prompt: bool = True

    def checks(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise APIError(400, "give exactly one of prompt and messages", "prompt")
        for name in ("tools", "chat_template_kwargs"):
            if getattr(self, name) and self.messages is None:
                raise APIError(400, f"{name} go with messages", name)


class DetokenizeRequest(_Strict):
    """vLLM's /detokenize: token ids -> their text, special tokens included (decoding is lossless)."""
    model: Optional[str] = None
    tokens: list[int]


def usage(prompt: int, completion: int, cached: int, reasoning: int | None = None) -> dict[str, Any]:
    """OpenAI's usage; `reasoning`: the completion tokens spent thinking (given where the reply can think)."""
    out = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
           "prompt_tokens_details": {"cached_tokens": cached}}
    if reasoning is not None:
        out["completion_tokens_details"] = {"reasoning_tokens": reasoning}
    return out


def now() -> int:
    return int(time.time())
