"""The Responses API (`POST /v1/responses`) as a view of a chat: a request becomes a chat request (messages, tools,
settings), and the parts of a reply as the chat route reads them (thinking, text, tool calls, its end) become
output items, streamed as the API's events or returned as one response object, built by the same `Builder` so
that both agree.

Knows: the Responses shapes (input items: messages, function_call, function_call_output, reasoning; output items:
reasoning, message, function_call; the stream's events; usage names); which of its fields dgemma honours or
refuses (nothing is stored: no previous_response_id; no logprobs; function tools only).
Does not know: the engine, tokens, HTTP.
"""
from __future__ import annotations

import copy
import re
import uuid
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import Discriminator, Field, PrivateAttr, Tag, ValidationError

from .protocol import APIError, ChatCompletionRequest, DiffusionControls, FunctionDef, _Strict


class TextIn(_Strict):
    type: Literal["input_text", "output_text"]
    text: str
    annotations: Optional[list[Any]] = Field(None, description="accepted and ignored")
    logprobs: Optional[list[Any]] = Field(None, description="accepted and ignored")


class MessageIn(_Strict):
    type: Optional[Literal["message"]] = None
    role: Literal["user", "assistant", "system", "developer"]
    content: Union[str, list[TextIn]] = Field(description="a string or text parts (input_text / output_text)")
    id: Optional[str] = None
    status: Optional[str] = None
    phase: Optional[Any] = Field(None, description="accepted and ignored")


class FunctionCallIn(_Strict):
    type: Literal["function_call"]
    call_id: str = Field(max_length=256)
    name: str = Field(max_length=64)
    arguments: str = Field(description="a JSON object, as a string")
    id: Optional[str] = None
    status: Optional[str] = None
    namespace: Optional[Any] = Field(None, description="accepted and ignored")
    caller: Optional[Any] = Field(None, description="accepted and ignored")
    is_async: Optional[Any] = Field(None, alias="async", description="accepted and ignored")
    async_: Optional[Any] = Field(None, description="accepted and ignored (the openai package's model_dump())")


class FunctionOutputIn(_Strict):
    type: Literal["function_call_output"]
    call_id: str = Field(max_length=256)
    output: Union[str, list[TextIn]]
    id: Optional[str] = None
    status: Optional[str] = None


class ReasoningText(_Strict):
    type: Literal["reasoning_text", "summary_text"]
    text: str


class ReasoningIn(_Strict):
    type: Literal["reasoning"]
    id: Optional[str] = None
    summary: list[ReasoningText] = Field(default_factory=list)
    content: Optional[list[ReasoningText]] = Field(None, description="given to the next assistant turn's template")
    status: Optional[str] = None
    encrypted_content: Optional[str] = Field(None, description="accepted and ignored (dgemma sends none)")


def _item_kind(v: Any) -> str:
    kind = v.get("type", "message") if isinstance(v, dict) else getattr(v, "type", None) or "message"
    return f"item[{kind}]"                   # (a tag the error handler leaves out of the parameter's name)


InputItem = Annotated[Union[Annotated[MessageIn, Tag("item[message]")],
                            Annotated[FunctionCallIn, Tag("item[function_call]")],
                            Annotated[FunctionOutputIn, Tag("item[function_call_output]")],
                            Annotated[ReasoningIn, Tag("item[reasoning]")]], Discriminator(_item_kind)]


class FunctionTool(_Strict):
    """A function tool, flat (the chat API nests these fields under `function`; `type` first: a tool of another
    type is named by it)."""
    type: Literal["function"] = Field(description="only function tools")
    name: str = FunctionDef.model_fields["name"]
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = FunctionDef.model_fields["strict"]


class NamedFunction(_Strict):
    type: Literal["function"]
    name: str


class TextFormat(_Strict):
    type: Literal["text"] = Field(description='only "text"')


class TextOptions(_Strict):
    format: Optional[TextFormat] = None


class ResponsesRequest(DiffusionControls):
    model: str
    input: Union[str, list[InputItem]] = Field(description="a user message, or a list of input items")
    instructions: Optional[str] = Field(None, description="a system message before the input")
    max_output_tokens: Optional[int] = Field(None, ge=1, le=2 ** 31, description="as chat's max_completion_tokens")
    temperature: Optional[float] = Field(None, ge=0, le=2, description="as chat's")
    top_p: Optional[float] = Field(None, ge=0, le=1, description="as chat's")
    tools: Optional[list[FunctionTool]] = Field(None, max_length=128, description="function tools, as chat's tools")
    tool_choice: Optional[Union[Literal["none", "auto", "required"], NamedFunction]] = None
    parallel_tool_calls: Optional[bool] = None
    stream: Optional[bool] = False
    store: Optional[bool] = Field(None, description="accepted; nothing is stored")
    metadata: Optional[dict[str, str]] = Field(None, description="returned as given")
    text: Optional[TextOptions] = None
    truncation: Optional[Literal["disabled"]] = None
    user: Optional[str] = None
    seed: Optional[int] = Field(None, ge=-(2 ** 63), le=2 ** 64 - 1, description="as chat's (an extra field)")
    chat_template_kwargs: Optional[dict[str, Any]] = Field(None, description="as chat's (an extra field)")
    # refused unless neutral
    previous_response_id: Optional[str] = Field(None, description="not supported: nothing is stored")
    include: Optional[list[str]] = Field(None, description="only empty")
    reasoning: Optional[dict[str, Any]] = Field(None, description=(
        'not supported: use chat_template_kwargs {"enable_thinking": true} (Gemma 4)'))
    background: Optional[bool] = Field(None, description="only false")
    top_logprobs: Optional[int] = Field(None, description="not supported")
    max_tool_calls: Optional[int] = Field(None, description="not supported")
    # accepted and ignored
    prompt_cache_key: Optional[str] = Field(None, description="accepted; the prefix cache needs no key")
    safety_identifier: Optional[str] = Field(None, description="accepted, not logged")
    service_tier: Optional[Literal["auto", "default"]] = None
    stream_options: Optional[dict[str, Any]] = Field(None, description="accepted and ignored")
    _origin: dict = PrivateAttr(default_factory=dict)   # (to_chat) chat message (and call) -> input item

    def checks(self) -> None:
        for name, ok in (("previous_response_id", self.previous_response_id is None), ("include", not self.include),
                         ("reasoning", self.reasoning is None), ("background", not self.background),
                         ("top_logprobs", self.top_logprobs is None), ("max_tool_calls", self.max_tool_calls is None),
                         ("denoising_frames", not self.denoising_frames)):
            if not ok:
                raise APIError(400, f"{name} is not supported by dgemma's /v1/responses", name,
                               "unsupported_parameter")

    def to_chat(self) -> ChatCompletionRequest:
        """The same request as a chat completion (a 400 naming this request's fields where it cannot be one).
        A reasoning item goes with the assistant output that follows it (a message, or calls), else nowhere."""
        messages: list[dict] = []
        self._origin = {}                    # (message, call or None) -> the input item (-1: instructions)
        if self.instructions is not None:
            messages.append({"role": "system", "content": self.instructions})
            self._origin[(0, None)] = -1
        items = [MessageIn(role="user", content=self.input)] if isinstance(self.input, str) else self.input
        thought: list[str] = []              # reasoning items' text since the last message
        for i, it in enumerate(items):
            if isinstance(it, ReasoningIn):
                thought.append("\n".join(t.text for t in (it.content or it.summary)))
                continue
            if isinstance(it, FunctionCallIn):
                call = {"id": it.call_id, "type": "function", "function": {"name": it.name, "arguments": it.arguments}}
                if not (messages and messages[-1]["role"] == "assistant"):    # else: joins the turn before
                    messages.append({"role": "assistant", "content": None})
                    self._origin[(len(messages) - 1, None)] = i
                msg = messages[-1]
                msg.setdefault("tool_calls", []).append(call)
                self._origin[(len(messages) - 1, len(msg["tool_calls"]) - 1)] = i
            else:
                msg = {"role": it.role, "content": _text(it.content)} if isinstance(it, MessageIn) else \
                    {"role": "tool", "tool_call_id": it.call_id, "content": _text(it.output)}
                messages.append(msg)
                self._origin[(len(messages) - 1, None)] = i
            if msg["role"] == "assistant" and thought:
                msg["reasoning_content"] = "\n".join([msg.get("reasoning_content") or "", *thought]).lstrip("\n")
            thought = []
        if not messages:
            raise APIError(400, "the input has no message", "input")
        body: dict[str, Any] = dict(
            model=self.model, messages=messages, max_completion_tokens=self.max_output_tokens,
            temperature=self.temperature, top_p=self.top_p, stream=self.stream, seed=self.seed,
            tools=[{"type": "function", "function": t.model_dump(exclude_none=True, exclude={"type"})}
                   for t in self.tools] if self.tools else None,
            tool_choice=self.tool_choice if isinstance(self.tool_choice, str) or self.tool_choice is None else
            {"type": "function", "function": {"name": self.tool_choice.name}},
            parallel_tool_calls=self.parallel_tool_calls, chat_template_kwargs=self.chat_template_kwargs,
            **self.model_dump(include=set(DiffusionControls.model_fields)))
        try:
            chat = ChatCompletionRequest.model_validate({k: v for k, v in body.items() if v is not None})
            chat.checks()
        except ValidationError as e:
            err = max(e.errors(), key=lambda x: len(x.get("loc", ())))
            loc = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in err["loc"]).lstrip(".")
            raise self.renamed(APIError(400, f"{loc}: {err.get('msg', 'invalid')}", loc)) from None
        except APIError as e:
            raise self.renamed(e) from None
        return chat

    def renamed(self, e: APIError) -> APIError:
        """An error about the chat request behind this one, with the parameter and the message naming this
        request's fields: messages[k] (and its tool_calls[j]) -> input[i] or instructions, max_completion_tokens
        -> max_output_tokens."""
        def name(k: str, j: str | None) -> str:
            i = self._origin.get((int(k), None if j is None else int(j)), self._origin.get((int(k), None)))
            return "input" if i is None else "instructions" if i < 0 else f"input[{i}]"

        def rename(text: str) -> str:
            text = re.sub(r"messages\[(\d+)\](?:\.tool_calls\[(\d+)\])?(?:\.[\w.\[\]]+)?",
                          lambda m: name(m.group(1), m.group(2)), text)
            return re.sub(r"\bmessages\b", "input", text).replace("max_completion_tokens", "max_output_tokens")
        e.param = rename(e.param) if e.param else e.param
        e.message = rename(e.message)
        return e


def _text(content: Union[str, list[TextIn]]) -> str:
    return content if isinstance(content, str) else "\n".join(p.text for p in content)


class Builder:
    """A response's output items and stream events from a reply's parts, in the order they come: `reasoning`
    (thinking text), `text`, `calls` (the chat route's tool calls), then `end`. Each method returns the stream
    events it makes (dicts with a sequence_number); `response` is the response object so far."""

    def __init__(self, rid: str, created: int, model: str, req: ResponsesRequest) -> None:
        self.req, self.seq, self.output = req, 0, []
        self.open: dict | None = None        # the reasoning or message item being written
        self.head = {"id": rid, "object": "response", "created_at": created, "model": model}
        self.status, self.usage, self.incomplete = "in_progress", None, None

    def response(self) -> dict:
        req = self.req
        return {**self.head, "status": self.status, "output": self.output, "usage": self.usage,
                "incomplete_details": self.incomplete, "error": None, "instructions": req.instructions,
                "max_output_tokens": req.max_output_tokens, "temperature": req.temperature, "top_p": req.top_p,
                "tools": [t.model_dump(exclude_none=True) for t in req.tools or []],
                "tool_choice": req.tool_choice.model_dump() if isinstance(req.tool_choice, NamedFunction)
                else req.tool_choice or "auto", "parallel_tool_calls": req.parallel_tool_calls is not False,
                "metadata": req.metadata or {}, "previous_response_id": None,
                "text": {"format": {"type": "text"}}, "truncation": "disabled", "user": req.user}

    def _event(self, kind: str, **fields) -> dict:
        self.seq += 1                        # (a copy: the items go on changing after the event)
        return {"type": kind, "sequence_number": self.seq - 1, **copy.deepcopy(fields)}

    def start(self) -> list[dict]:
        return [self._event("response.created", response=self.response()),
                self._event("response.in_progress", response=self.response())]

    def _close(self, status: str = "completed") -> list[dict]:
        item, self.open = self.open, None
        if item is None:
            return []
        at, part = self.output.index(item), item["content"][0]
        item["status"] = status
        if item["type"] == "reasoning":
            done = [self._event("response.reasoning_text.done", item_id=item["id"], output_index=at,
                                content_index=0, text=part["text"])]
        else:
            done = [self._event("response.output_text.done", item_id=item["id"], output_index=at, content_index=0,
                                text=part["text"], logprobs=[])]
        return done + [self._event("response.content_part.done", item_id=item["id"], output_index=at,
                                   content_index=0, part=part),
                       self._event("response.output_item.done", output_index=at, item=item)]

    def _add(self, item: dict) -> list[dict]:
        self.output.append(item)
        return [self._event("response.output_item.added", output_index=len(self.output) - 1, item=item)]

    def reasoning(self, delta: str) -> list[dict]:
        return self._write(delta, "rs", {"type": "reasoning", "summary": []},
                           {"type": "reasoning_text", "text": ""}, "response.reasoning_text.delta")

    def text(self, delta: str) -> list[dict]:
        return self._write(delta, "msg", {"type": "message", "role": "assistant"},
                           {"type": "output_text", "text": "", "annotations": []}, "response.output_text.delta",
                           logprobs=[])

    def _write(self, delta: str, prefix: str, item: dict, part: dict, kind: str, **extra) -> list[dict]:
        """Add `delta` to the open item if it is of `item`'s type, else to a new `item` (its id: `prefix`_...)
        with one content `part` (the item before it closed); the events that makes."""
        out = []
        if self.open is None or self.open["type"] != item["type"]:
            out = self._close()
            self.open = {**item, "id": _id(prefix), "status": "in_progress", "content": []}
            out += self._add(self.open)
            self.open["content"].append(part)
            out.append(self._event("response.content_part.added", item_id=self.open["id"],
                                   output_index=len(self.output) - 1, content_index=0, part=part))
        self.open["content"][0]["text"] += delta
        return out + [self._event(kind, item_id=self.open["id"], output_index=len(self.output) - 1,
                                  content_index=0, delta=delta, **extra)]

    def calls(self, calls: list[dict]) -> list[dict]:
        out = self._close()
        for c in calls:
            fn = c["function"]
            item = {"type": "function_call", "id": _id("fc"), "call_id": c["id"], "name": fn["name"],
                    "arguments": "", "status": "in_progress"}
            out += self._add(item)
            at = len(self.output) - 1
            item["arguments"], item["status"] = fn["arguments"], "completed"
            out += [self._event("response.function_call_arguments.delta", item_id=item["id"], output_index=at,
                                delta=fn["arguments"]),
                    self._event("response.function_call_arguments.done", item_id=item["id"], output_index=at,
                                name=fn["name"], arguments=fn["arguments"]),
                    self._event("response.output_item.done", output_index=at, item=item)]
        return out

    def end(self, finish: str, usage: dict, stored: int) -> list[dict]:
        """Close the open item (incomplete when max_output_tokens cut it: a call is whole); the last event
        (response.completed, or .incomplete). `stored`: prompt tokens the request added to the prefix cache."""
        cut = finish == "length"
        if not self.output and self.open is None:   # an empty reply is still a message
            out = self.text("")
        else:
            out = []
        out += self._close("incomplete" if cut else "completed")
        details = usage.get("completion_tokens_details", {})
        self.usage = {"input_tokens": usage["prompt_tokens"],
                      "input_tokens_details": {"cached_tokens": usage["prompt_tokens_details"]["cached_tokens"],
                                               "cache_write_tokens": stored},
                      "output_tokens": usage["completion_tokens"],
                      "output_tokens_details": {"reasoning_tokens": details.get("reasoning_tokens", 0)},
                      "total_tokens": usage["total_tokens"]}
        self.status, self.incomplete = ("incomplete", {"reason": "max_output_tokens"}) if cut else ("completed", None)
        return out + [self._event(f"response.{self.status}", response=self.response())]


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"
