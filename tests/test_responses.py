"""`POST /v1/responses` (serve.responses): the Responses API as a view of the chat route, driven by the `openai`
client's `responses` resource against the app in this process with a scripted worker (tests/scripted.py): text,
instructions, tool calls and their outputs going back in, thinking, incomplete replies, the stream's events
against the response object, and refusals naming this API's own fields."""
from __future__ import annotations

import json

import openai
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter
from scripted import RESPONSE, scripted_app, tool_tokenizer

import dgemma

from dgemma.serve.markup import END, QUOTE, START, THINK, THOUGHT_END
from dgemma.serve.responses import ResponsesRequest

WEATHER = {"type": "function", "name": "get_weather", "description": "the weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tool_tokenizer(tmp_path_factory.mktemp("tooltok"))


@pytest.fixture()
def app(tok):
    with scripted_app(tok) as pair:
        yield pair


def prompt(st, tok) -> str:
    return tok.decode(st.worker.prompts[-1], skip_special_tokens=False)


def streamed(c, **kw) -> tuple[list, object]:
    """(every event, the response of the last one)."""
    events = list(c.responses.create(model="m", stream=True, **kw))
    return events, events[-1].response


def same(a, b) -> bool:
    """Two responses alike but for their ids (call ids too) and times."""
    def plain(r):
        d = r.model_dump(exclude_none=True)
        for k in ("id", "created_at"):
            d.pop(k)
        for item in d["output"]:
            item.pop("id")
            item.pop("call_id", None)
        return d
    return plain(a) == plain(b)


def test_text_and_instructions(app, tok):
    st, c = app
    st.worker.script = tok.encode("Hello world.") + [tok.token_to_id(RESPONSE)]
    r = c.responses.create(model="m", input="Hi", instructions="Be brief.")
    assert (r.status, r.output_text, r.incomplete_details) == ("completed", "Hello world.", None)
    assert [o.type for o in r.output] == ["message"] and r.output[0].content[0].type == "output_text"
    assert prompt(st, tok) == tok.apply_chat_template([{"role": "system", "content": "Be brief."},
                                                       {"role": "user", "content": "Hi"}])
    assert (r.usage.input_tokens, r.usage.output_tokens) == (len(st.worker.prompts[-1]), len(st.worker.script))
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.usage.output_tokens_details.reasoning_tokens == 0

    events, final = streamed(c, input="Hi", instructions="Be brief.")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "Hello world."
    assert same(final, r)
    added = [e.item for e in events if e.type == "response.output_item.added"]
    assert [a.id for a in added] == [e.item.id for e in events if e.type == "response.output_item.done"] == \
        [final.output[0].id]
    assert added[0].content == [] and added[0].status == "in_progress"     # (as it was then, not as it ended)
    part = next(e for e in events if e.type == "response.content_part.added").part
    assert part.text == "" and events[0].response.output == [] and events[0].response.status == "in_progress"


def test_message_items_and_text_parts(app, tok):
    st, c = app
    st.worker.script = tok.encode("ok") + [tok.token_to_id(RESPONSE)]
    c.responses.create(model="m", input=[
        {"role": "developer", "content": "Rules."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "a"},
                                                        {"type": "input_text", "text": "b"}]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "c", "annotations": []}]},
        {"role": "user", "content": "d"}])
    assert prompt(st, tok) == tok.apply_chat_template([
        {"role": "system", "content": "Rules."}, {"role": "user", "content": "a\nb"},
        {"role": "assistant", "content": "c"}, {"role": "user", "content": "d"}])


def test_function_calls_and_their_outputs(app, tok):
    st, c = app
    call = tok.encode(f"{START}call:get_weather{{city:{QUOTE}Paris{QUOTE}}}{END}")
    st.worker.script = tok.encode("Checking.") + call + [tok.token_to_id(RESPONSE)]
    r = c.responses.create(model="m", input="Weather in Paris?", tools=[WEATHER])
    assert [o.type for o in r.output] == ["message", "function_call"] and r.output_text == "Checking."
    fc = r.output[1]
    assert (fc.name, json.loads(fc.arguments), fc.status) == ("get_weather", {"city": "Paris"}, "completed")
    assert "declaration:get_weather" in prompt(st, tok)
    events, final = streamed(c, input="Weather in Paris?", tools=[WEATHER])
    assert same(final, r)
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert [(e.name, e.arguments) for e in done] == [("get_weather", fc.arguments)]

    st.worker.script = tok.encode("Sunny.") + [tok.token_to_id(RESPONSE)]
    back = [{"role": "user", "content": "Weather in Paris?"}] + [o.model_dump(exclude_none=True) for o in r.output] \
        + [{"type": "function_call_output", "call_id": fc.call_id, "output": "21 C"}]
    r2 = c.responses.create(model="m", input=back, tools=[WEATHER])
    assert r2.output_text == "Sunny."
    text = prompt(st, tok)
    assert f'Checking.{START}call:get_weather{{city:"Paris"}}{END}' in text      # one assistant turn: text + call
    assert f"{RESPONSE}response:get_weather{{value:{QUOTE}21 C{QUOTE}}}" in text
    st.worker.script = tok.encode("city:") + [tok.token_to_id(END)]
    named = c.responses.create(model="m", input="x", tools=[WEATHER],
                               tool_choice={"type": "function", "name": "get_weather"})
    assert prompt(st, tok).endswith(f"{START}call:get_weather{{") and named.output[0].type == "message"


def test_thinking_is_a_reasoning_item(app, tok):
    st, c = app
    inner = tok.encode("thought\nLet me see.")
    st.worker.script = [tok.token_to_id(THINK)] + inner + [tok.token_to_id(THOUGHT_END)] + tok.encode("Yes.") + \
        [tok.token_to_id(RESPONSE)]
    kw = dict(input="Is it?", extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    r = c.responses.create(model="m", **kw)
    assert [o.type for o in r.output] == ["reasoning", "message"]
    assert r.output[0].content[0].text == "Let me see." and r.output_text == "Yes."
    assert r.usage.output_tokens_details.reasoning_tokens == len(inner) + 2
    events, final = streamed(c, **kw)
    assert same(final, r)
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == "Let me see."
    # the reasoning item goes back with the assistant turn after it
    back = ResponsesRequest(model="m", input=[{"role": "user", "content": "Is it?"},
                                              *[o.model_dump(exclude_none=True) for o in r.output]]).to_chat()
    assert back.chat()[-1] == {"role": "assistant", "content": "Yes.", "reasoning_content": "Let me see."}
    st.worker.script = tok.encode("ok") + [tok.token_to_id(RESPONSE)]
    c.responses.create(model="m", input=[{"role": "user", "content": "Is it?"},
                                         *[o.model_dump(exclude_none=True) for o in r.output],
                                         {"role": "user", "content": "Sure?"}])
    assert "Yes." in prompt(st, tok)


def test_a_reply_cut_at_max_output_tokens_is_incomplete(app, tok):
    st, c = app
    st.worker.script, st.worker.finish = tok.encode("one two three four five six seven eight nine"), "length"
    r = c.responses.create(model="m", input="Count.", max_output_tokens=8)
    assert (r.status, r.incomplete_details.reason, r.output[0].status) == ("incomplete", "max_output_tokens",
                                                                          "incomplete")
    events, final = streamed(c, input="Count.", max_output_tokens=8)
    assert events[-1].type == "response.incomplete" and same(final, r)


@pytest.mark.parametrize("kw, param", [
    (dict(previous_response_id="resp_1"), "previous_response_id"),
    (dict(reasoning={"effort": "high"}), "reasoning"),
    (dict(include=["reasoning.encrypted_content"]), "include"),
    (dict(tools=[{"type": "web_search"}]), "tools[0].type"),
    (dict(tool_choice="required"), "tool_choice"),
    (dict(max_output_tokens=0), "max_output_tokens"),
    (dict(input=[{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]),
     "input[0].content[0].type"),
    (dict(input=[{"type": "item_reference", "id": "x"}]), "input[0]"),
    (dict(input=[{"role": "user", "content": "x"}, {"type": "function_call_output", "call_id": "nope",
                                                    "output": "1"}]), "input[1]"),
    (dict(input=[{"role": "user", "content": "x"}, {"type": "function_call", "call_id": "a", "name": "f",
                                                    "arguments": "{bad"}]), "input[1]"),
    (dict(input=[{"type": "reasoning", "summary": []}]), "input"),
    (dict(text={"format": {"type": "json_object"}}), "text.format.type"),
    (dict(extra_body={"denoising_frames": True}), "denoising_frames"),
])
def test_refusals_name_this_apis_fields(app, kw, param):
    _, c = app
    kw.setdefault("input", "x")
    with pytest.raises(openai.BadRequestError) as e:
        c.responses.create(model="m", **kw)
    assert e.value.body["param"] == param, e.value.body
    assert "messages" not in e.value.body["message"] and "max_completion" not in e.value.body["message"]


def test_bodies_and_events_validate_against_the_openai_types(app, tok):
    """Parsed by the openai package's own models, strictly (the client itself builds them without checking)."""
    st, c = app
    st.worker.script = [tok.token_to_id(THINK)] + tok.encode("thought\nHm.") + [tok.token_to_id(THOUGHT_END)] + \
        tok.encode("Checking.") + tok.encode(f"{START}call:get_weather{{city:{QUOTE}Oslo{QUOTE}}}{END}") + \
        [tok.token_to_id(RESPONSE)]
    kw = dict(model="m", input="Weather?", tools=[WEATHER])
    raw = c.responses.with_raw_response.create(**kw).http_response.json()
    Response.model_validate(raw, strict=True)
    assert [o["type"] for o in raw["output"]] == ["reasoning", "message", "function_call"]
    assert raw["usage"]["input_tokens_details"] == {"cached_tokens": 0, "cache_write_tokens": 0}
    events = TypeAdapter(ResponseStreamEvent)
    http = c.responses.with_raw_response.create(stream=True, **kw).http_response
    http.read()
    stream = http.text
    data = [json.loads(line[6:]) for line in stream.splitlines() if line.startswith("data: ")]
    for d in data:
        events.validate_python(d)
    kinds = [d["type"] for d in data]
    for item in ("reasoning", "message"):       # each text-bearing item: its content part opened and closed
        at = next(i for i, d in enumerate(data) if d["type"] == "response.output_item.added" and
                  d["item"]["type"] == item)
        assert kinds[at + 1] == "response.content_part.added"
        assert data[at + 1]["part"]["type"] == ("reasoning_text" if item == "reasoning" else "output_text")
    assert kinds.count("response.content_part.done") == 2


def test_an_incomplete_item_says_so_in_the_stream_too(app, tok):
    st, c = app
    st.worker.script, st.worker.finish = tok.encode("one two three four five six seven"), "length"
    events = list(c.responses.create(model="m", input="Count.", max_output_tokens=8, stream=True))
    done = [e.item.status for e in events if e.type == "response.output_item.done"]
    assert done == ["incomplete"] and events[-1].response.output[0].status == "incomplete"


def test_input_conversion_places_reasoning_and_calls(tok):
    def chat(items):
        return ResponsesRequest(model="m", input=items).to_chat().chat()
    user, a = {"role": "user", "content": "q"}, {"role": "assistant", "content": "A"}
    think = [{"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": t}]}
             for t in ("one", "two")]
    call = {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"}
    # reasoning before a user turn belongs to no answer: not carried past it
    assert chat([user, think[0], user, a])[-1] == {"role": "assistant", "content": "A"}
    # two in a row: both, in order
    assert chat([user, *think, a])[-1]["reasoning_content"] == "one\ntwo"
    # after an assistant message, before its call: the same turn's
    turn = chat([user, a, think[0], call])[-1]
    assert (turn["content"], turn["reasoning_content"], turn["tool_calls"][0]["id"]) == ("A", "one", "c1")


def test_refusals_name_the_input_item_at_fault(app, tok):
    st, c = app
    call = {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"}
    cases = [(dict(max_output_tokens=5000), "max_output_tokens"),             # past the 4,096-token context
             (dict(input=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "A"},
                          {**call, "arguments": "{bad"}]), "input[2]"),       # a call joining the turn before
             (dict(input=[{"role": "user", "content": "q"}, call, {**call, "call_id": "c2", "arguments": "[1]"}]),
              "input[2]"),
             (dict(tools=[WEATHER], tool_choice={}), "tool_choice.type"),
             (dict(input=[{"role": "user", "content": "q"}, 5]), "input[1]")]
    for kw, param in cases:
        kw.setdefault("input", "x")
        with pytest.raises(openai.BadRequestError) as e:
            c.responses.create(model="m", **kw)
        assert e.value.body["param"] == param, (kw, e.value.body)
        assert "messages" not in e.value.body["message"] and "max_completion" not in e.value.body["message"]
    r = c._client.post("/v1/responses", content=b'{"model": "m", "input": "a\\ud800b"}',   # (JSON's escape)
                       headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input"
    r = c._client.post("/v1/completions", content=b'{"model": "m", "prompt": "a\\ud800b"}',    # (the same fix)
                       headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    st.tok = dgemma.load_tokenizer(dgemma.default_model_path())       # a model that cannot take tool calls
    with pytest.raises(openai.BadRequestError) as e:
        c.responses.create(model="m", input=[{"role": "user", "content": "q"}, call])
    assert e.value.body["param"] == "input"


def test_output_items_go_back_as_the_client_dumps_them(app, tok):
    st, c = app
    st.worker.script = tok.encode("Checking.") + \
        tok.encode(f"{START}call:get_weather{{city:{QUOTE}Oslo{QUOTE}}}{END}") + [tok.token_to_id(RESPONSE)]
    r = c.responses.create(model="m", input="Weather?", tools=[WEATHER])
    back = [{"role": "user", "content": "Weather?"}, *[o.model_dump() for o in r.output],
            {"type": "function_call_output", "call_id": r.output[1].call_id, "output": "sunny"}]
    st.worker.script = tok.encode("Sunny.") + [tok.token_to_id(RESPONSE)]
    assert c.responses.create(model="m", input=back, tools=[WEATHER]).output_text == "Sunny."
