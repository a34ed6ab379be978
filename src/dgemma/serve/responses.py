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

from pydantic import Discriminator, Field, Tag, ValidationError

from .protocol import APIError, ChatCompletionRequest, DiffusionControls, _Strict


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


class FunctionCallIn(_Strict):
    type: Literal["function_call"]
    call_id: str = Field(max_length=256)
    name: str = Field(max_length=64)
    arguments: str = Field(description="a JSON object, as a string")
    id: Optional[str] = None
    status: Optional[str] = None


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


def _item_kind(v: Any) -> str:
    kind = v.get("type", "message") if isinstance(v, dict) else getattr(v, "type", None) or "message"
    return f"item[{kind}]"                   # (a tag the error handler leaves out of the parameter's name)


InputItem = Annotated[Union[Annotated[MessageIn, Tag("item[message]")],
                            Annotated[FunctionCallIn, Tag("item[function_call]")],
                            Annotated[FunctionOutputIn, Tag("item[function_call_output]")],
                            Annotated[ReasoningIn, Tag("item[reasoning]")]], Discriminator(_item_kind)]


class FunctionTool(_Strict):
    type: Literal["function"] = Field(description="only function tools")
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = Field(None, description="accepted; dgemma does not hold arguments to the schema")


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

    def checks(self) -> None:
        for name, ok in (("previous_response_id", self.previous_response_id is None), ("include", not self.include),
                         ("reasoning", self.reasoning is None), ("background", not self.background),
                         ("top_logprobs", self.top_logprobs is None),
                         ("denoising_frames", not self.denoising_frames)):
            if not ok:
                raise APIError(400, f"{name} is not supported by dgemma's /v1/responses", name,
                               "unsupported_parameter")

    def to_chat(self) -> ChatCompletionRequest:
        """The same request as a chat completion (a 400 naming this request's fields where it cannot be one)."""
        messages, origin = [], []            # origin: which input item each message comes from (-1: instructions)
        if self.instructions is not None:
            messages.append({"role": "system", "content": self.instructions})
            origin.append(-1)
        items = [MessageIn(role="user", content=self.input)] if isinstance(self.input, str) else self.input
        thought = None                       # a reasoning item's text, for the next assistant message
        for i, it in enumerate(items):
            if isinstance(it, MessageIn):
                msg: dict[str, Any] = {"role": it.role, "content": _text(it.content)}
            elif isinstance(it, FunctionCallIn):
                call = {"id": it.call_id, "type": "function", "function": {"name": it.name, "arguments": it.arguments}}
                if messages and messages[-1]["role"] == "assistant":
                    messages[-1].setdefault("tool_calls", []).append(call)   # calls join the assistant turn before
                    continue
                msg = {"role": "assistant", "content": None, "tool_calls": [call]}
            elif isinstance(it, FunctionOutputIn):
                msg = {"role": "tool", "tool_call_id": it.call_id, "content": _text(it.output)}
            else:
                thought = "\n".join(t.text for t in (it.content or it.summary))
                continue
            if msg["role"] == "assistant" and thought is not None:
                msg["reasoning_content"], thought = thought, None
            messages.append(msg)
            origin.append(i)
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
            loc = e.errors()[0].get("loc", ())
            raise APIError(400, f"input: {e.errors()[0].get('msg', 'invalid')}", _renamed(loc, origin)) from None
        except APIError as e:                # (named as this request names things)
            e.param = _renamed(tuple(re.findall(r"[A-Za-z_]+|\d+", e.param or "")), origin)
            e.message = re.sub(r"messages\[(\d+)\](\.[\w.\[\]]+)?",
                               lambda m: _renamed(("messages", m.group(1)), origin) or "input", e.message)
            e.message = e.message.replace("max_completion_tokens", "max_output_tokens")
            raise
        return chat


def _text(content: Union[str, list[TextIn]]) -> str:
    return content if isinstance(content, str) else "\n".join(p.text for p in content)


def _renamed(loc: tuple, origin: list[int]) -> str | None:
    """A chat request's parameter (as a loc) named as this request's: messages[k] -> input[i] / instructions;
    max_completion_tokens -> max_output_tokens; tool_choice / tools as they are."""
    if not loc:
        return None
    head = str(loc[0])
    if head == "messages":
        if len(loc) > 1 and str(loc[1]).isdigit() and int(loc[1]) < len(origin):
            i = origin[int(loc[1])]
            return "instructions" if i < 0 else f"input[{i}]"
        return "input"
    if head == "tools" and len(loc) > 1 and str(loc[1]).isdigit():
        return f"tools[{loc[1]}]"
    return {"max_completion_tokens": "max_output_tokens"}.get(head, head)


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
                "metadata": req.metadata or {}, "store": False, "previous_response_id": None,
                "text": {"format": {"type": "text"}}, "truncation": "disabled", "user": req.user}

    def _event(self, kind: str, **fields) -> dict:
        self.seq += 1                        # (a copy: the items go on changing after the event)
        return {"type": kind, "sequence_number": self.seq - 1, **copy.deepcopy(fields)}

    def start(self) -> list[dict]:
        return [self._event("response.created", response=self.response()),
                self._event("response.in_progress", response=self.response())]

    def _close(self) -> list[dict]:
        item, self.open = self.open, None
        if item is None:
            return []
        at = self.output.index(item)
        item["status"] = "completed"
        if item["type"] == "reasoning":
            done = [self._event("response.reasoning_text.done", item_id=item["id"], output_index=at,
                                content_index=0, text=item["content"][0]["text"])]
        else:
            part = item["content"][0]
            done = [self._event("response.output_text.done", item_id=item["id"], output_index=at, content_index=0,
                                text=part["text"], logprobs=[]),
                    self._event("response.content_part.done", item_id=item["id"], output_index=at,
                                content_index=0, part=part)]
        return done + [self._event("response.output_item.done", output_index=at, item=item)]

    def _add(self, item: dict) -> list[dict]:
        self.output.append(item)
        return [self._event("response.output_item.added", output_index=len(self.output) - 1, item=item)]

    def reasoning(self, delta: str) -> list[dict]:
        out = []
        if self.open is None or self.open["type"] != "reasoning":
            out = self._close()
            self.open = {"type": "reasoning", "id": _id("rs"), "summary": [], "status": "in_progress",
                         "content": []}
            out += self._add(self.open)
            self.open["content"].append({"type": "reasoning_text", "text": ""})
        self.open["content"][0]["text"] += delta
        return out + [self._event("response.reasoning_text.delta", item_id=self.open["id"],
                                  output_index=len(self.output) - 1, content_index=0, delta=delta)]

    def text(self, delta: str) -> list[dict]:
        out = []
        if self.open is None or self.open["type"] != "message":
            out = self._close()
            self.open = {"type": "message", "id": _id("msg"), "role": "assistant", "status": "in_progress",
                         "content": []}
            out += self._add(self.open)
            self.open["content"].append({"type": "output_text", "text": "", "annotations": []})
            out.append(self._event("response.content_part.added", item_id=self.open["id"],
                                   output_index=len(self.output) - 1, content_index=0,
                                   part=self.open["content"][0]))
        self.open["content"][0]["text"] += delta
        return out + [self._event("response.output_text.delta", item_id=self.open["id"],
                                  output_index=len(self.output) - 1, content_index=0, delta=delta, logprobs=[])]

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

    def end(self, finish: str, usage: dict) -> list[dict]:
        """Close the open item; the last event (response.completed, or .incomplete when max_output_tokens ended
        it)."""
        out = self._close()
        if not self.output:                 # an empty reply is still a message
            out += self.text("") + self._close()
        details = usage.get("completion_tokens_details", {})
        self.usage = {"input_tokens": usage["prompt_tokens"],
                      "input_tokens_details": {"cached_tokens": usage["prompt_tokens_details"]["cached_tokens"]},
                      "output_tokens": usage["completion_tokens"],
                      "output_tokens_details": {"reasoning_tokens": details.get("reasoning_tokens", 0)},
                      "total_tokens": usage["total_tokens"]}
        if finish == "length":                # (the last text or thinking was cut off; a call is whole)
            self.status, self.incomplete = "incomplete", {"reason": "max_output_tokens"}
            if self.output[-1]["type"] != "function_call":
                self.output[-1]["status"] = "incomplete"
        else:
            self.status = "completed"
        return out + [self._event(f"response.{self.status}", response=self.response())]


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"
