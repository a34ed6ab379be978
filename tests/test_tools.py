"""Gemma 4's reply markup, tool calls and the thinking channel, read back from token ids (serve.markup), and the
chat route with tools and thinking, driven by the `openai` client against the app in this process, with a scripted
worker that commits chosen token ids (no model here can be made to write a call) and a tokenizer that has Gemma 4's
marks as special tokens."""
from __future__ import annotations

import json

import openai
import pytest
from scripted import RESPONSE, scripted_app, tool_tokenizer

import dgemma
from dgemma.serve.markup import (END, QUOTE, START, THINK, THOUGHT_END, ArgumentError, CallReader, ThoughtReader,
                                 parse_call, unsupported)
from dgemma.tokenizer import Tokenizer

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "the weather in a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}}}}}


@pytest.fixture(scope="module")
def tool_tok(tmp_path_factory) -> Tokenizer:
    return tool_tokenizer(tmp_path_factory.mktemp("tooltok"))


@pytest.fixture()
def app(tool_tok):
    with scripted_app(tool_tok) as pair:
        yield pair


def call_ids(tok, name: str, body: str) -> list[int]:
    return tok.encode(f"{START}call:{name}{{{body}}}{END}")


# ---- the format --------------------------------------------------------------------------------------------------
def test_parse_call_reads_every_kind_of_value():
    q = QUOTE
    name, args = parse_call(f"call:plan{{city:{q}Paris, {{not}} a: [key]{q},days:3,ratio:-0.5,big:1e3,"
                            f"ok:true,no:false,none:null,tags:[{q}a{q}, {q}b,c{q}],where:{{lat:48.8,lon:2.3}},"
                            f"{q}odd key{q}:{q}line\nbreak{q},pad:{q} kept {q},empty:{{}},list:[],word:celsius}}")
    assert name == "plan"
    assert args == {"city": "Paris, {not} a: [key]", "days": 3, "ratio": -0.5, "big": 1000.0, "ok": True,
                    "no": False, "none": None, "tags": ["a", "b,c"], "where": {"lat": 48.8, "lon": 2.3},
                    "odd key": "line\nbreak", "pad": " kept ", "empty": {}, "list": [], "word": "celsius"}
    assert type(args["days"]) is int and json.loads(json.dumps(args)) == args
    assert parse_call(" call:a.b-c_1{ } ") == ("a.b-c_1", {})


@pytest.mark.parametrize("text", [
    "call:f{a:1", "call:f{a:1}}", "call:f{a 1}", "call:f{a:}", "call:f{:1}", 'call:f{a:<|"|>x}', "f{a:1}",
    "call:f{a:1 b:2}", "call:f{a:[1,2}", "call:f{a:NaN}x", "call:{a:1}", "call:f{a:1}trailing"])
def test_parse_call_refuses_what_is_not_one_call(text):
    with pytest.raises(ArgumentError):
        parse_call(text)


def test_bare_words_that_are_not_json_numbers_stay_strings():
    assert parse_call("call:f{a:NaN,b:Infinity,c:01,d:1.,e:1e999,f:-1e400}")[1] == {
        "a": "NaN", "b": "Infinity", "c": "01", "d": "1.", "e": "1e999", "f": "-1e400"}   # (no inf in JSON)


def test_what_python_cannot_read_is_not_a_call():
    with pytest.raises(ArgumentError, match="nested"):
        parse_call("call:f{a:" + "[" * 100 + "]" * 100 + "}")
    assert parse_call("call:f{a:" + "[" * 63 + "]" * 63 + "}")[1]["a"] == eval("[" * 63 + "]" * 63)
    with pytest.raises(ArgumentError, match="too long"):
        parse_call("call:f{a:" + "1" * 5000 + "}")


def test_reader_splits_content_from_calls_across_canvases(tool_tok):
    tok = tool_tok
    content = tok.encode("Let me look.")
    ids = content + call_ids(tok, "get_weather", f"city:{QUOTE}Paris{QUOTE}") + tok.encode("\n") + \
        call_ids(tok, "get_time", "zone:1") + [tok.token_to_id(RESPONSE)]
    for cut in range(1, len(ids)):                        # every split into two canvases
        r = CallReader(tok)
        a, calls_a = r.push(ids[:cut])
        b, calls_b = r.push(ids[cut:])
        assert a + b == content
        calls = calls_a + calls_b
        assert [(c["index"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == \
            [(0, "get_weather", {"city": "Paris"}), (1, "get_time", {"zone": 1})]
        assert r.leftover() == ""
        assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    first = CallReader(tok, parallel=False)
    assert [c["function"]["name"] for c in first.push(ids)[1]] == ["get_weather"]


def test_reader_gives_back_what_is_not_a_call(tool_tok):
    tok = tool_tok
    r = CallReader(tok)
    text, calls = r.push(tok.encode("Hi") + call_ids(tok, "f", "a:1") + tok.encode(" then") +
                         call_ids(tok, "g", "broken") + tok.encode(f"{START}call:h{{x:"))
    assert tok.decode(text) == "Hi" and [c["function"]["name"] for c in calls] == ["f"]
    assert r.leftover() == f" then{START}call:g{{broken}}{END}{START}call:h{{x:"
    # forced ids (tool_choice) belong to the prompt: the reply's ids finish the call
    forced = tok.encode(f"{START}call:f{{")
    r = CallReader(tok, forced)
    assert r.push(tok.encode("a:2}") + [tok.token_to_id(END)]) == ([], [r.calls[0]])
    assert json.loads(r.calls[0]["function"]["arguments"]) == {"a": 2}


def test_a_call_is_found_by_token_not_by_text(tool_tok):
    """Text that spells the marks without being the special tokens is content, as typed, and a spelled quote
    mark inside a string is part of the string."""
    tok = tool_tok

    def spelled(text: str) -> list[int]:
        return [t for ch in text for t in tok.encode(ch)]                 # character by character
    plain = spelled("<|tool_call>call:f{}<tool_call|>")
    assert tok.token_to_id(START) not in plain
    r = CallReader(tok)
    assert r.push(plain) == (plain, []) and r.leftover() == ""
    q = tok.token_to_id(QUOTE)
    ids = tok.encode(f"{START}call:f{{note:") + [q] + spelled('say <|"|>hi') + [q] + tok.encode(f"}}{END}")
    assert json.loads(CallReader(tok).push(ids)[1][0]["function"]["arguments"]) == {"note": 'say <|"|>hi'}


def test_parallel_false_reads_no_further(tool_tok):
    tok = tool_tok
    r = CallReader(tok, parallel=False)
    made = r.push(call_ids(tok, "f", "a:1") + tok.encode(" then ") + call_ids(tok, "g", "broken"))[1]
    assert [c["function"]["name"] for c in made] == ["f"] and r.leftover() == ""


def test_unsupported_names_what_is_missing(tool_tok):
    shipped = dgemma.load_tokenizer(dgemma.default_model_path())
    assert "<|tool_call>" in unsupported(shipped)
    assert unsupported(tool_tok) is None
    no_template = Tokenizer(tool_tok._tok, bos_token="<bos>", chat_template="{{ messages[0]['content'] }}")
    assert "template" in unsupported(no_template)


# ---- the chat route ------------------------------------------------------------------------------------------
def ask(c, **kw):
    kw.setdefault("messages", [{"role": "user", "content": "Weather in Paris?"}])
    return c.chat.completions.create(model="m", **kw)


def test_chat_returns_the_calls_streamed_or_not(app, tool_tok):
    st, c = app
    tok = tool_tok
    st.worker.script = tok.encode("Checking.") + call_ids(tok, "get_weather", f"city:{QUOTE}Paris{QUOTE}") + \
        call_ids(tok, "get_weather", f"city:{QUOTE}Rome{QUOTE}") + [tok.token_to_id(RESPONSE)]
    r = ask(c, tools=[WEATHER])
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Checking."
    assert [(t.function.name, json.loads(t.function.arguments)) for t in choice.message.tool_calls] == \
        [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})]
    assert len({t.id for t in choice.message.tool_calls}) == 2
    prompt = tok.decode(st.worker.prompts[-1], skip_special_tokens=False)
    assert "declaration:get_weather{description:" in prompt and prompt.endswith("<start_of_turn>model\n")
    assert r.usage.completion_tokens == len(st.worker.script)

    calls, text, finish = {}, "", None
    for ch in ask(c, tools=[WEATHER], stream=True):
        d = ch.choices[0].delta
        text += d.content or ""
        for t in d.tool_calls or []:
            calls.setdefault(t.index, [t.function.name, ""])[1] += t.function.arguments
        finish = ch.choices[0].finish_reason or finish
    assert (text, finish) == ("Checking.", "tool_calls")
    assert [(n, json.loads(a)) for n, a in calls.values()] == [("get_weather", {"city": "Paris"}),
                                                              ("get_weather", {"city": "Rome"})]
    one = ask(c, tools=[WEATHER], parallel_tool_calls=False).choices[0].message.tool_calls
    assert [json.loads(t.function.arguments) for t in one] == [{"city": "Paris"}]


def test_the_conversation_goes_on_with_the_results(app, tool_tok):
    """The reply's message and a tool message go back in: rendered through the template, with the function's
    name found from the call id; the warmed turn is a prefix of that next prompt."""
    st, c = app
    tok = tool_tok
    st.worker.script = call_ids(tok, "get_weather", f"city:{QUOTE}Paris{QUOTE}") + [tok.token_to_id(RESPONSE)]
    first = [{"role": "user", "content": "Weather in Paris?"}]
    r = ask(c, messages=first, tools=[WEATHER])
    msg = r.choices[0].message
    assert msg.content is None
    follow = first + [msg.model_dump(exclude_none=True),
                      {"role": "tool", "tool_call_id": msg.tool_calls[0].id, "content": "sunny, 21 C"}]
    st.worker.script = tok.encode("It is sunny.") + [tok.token_to_id(RESPONSE)]
    r2 = ask(c, messages=follow, tools=[WEATHER])
    assert r2.choices[0].finish_reason == "stop" and r2.choices[0].message.content == "It is sunny."
    assert r2.choices[0].message.tool_calls is None
    prompt = st.worker.prompts[-1]
    text = tok.decode(prompt, skip_special_tokens=False)
    assert f'{START}call:get_weather{{city:"Paris"}}{END}<end_of_turn>\n' in text
    assert f"{RESPONSE}response:get_weather{{value:{QUOTE}sunny, 21 C{QUOTE}}}" in text
    warmed = st.worker.warmed[0]
    assert prompt[:len(warmed)] == warmed and len(warmed) > len(st.worker.prompts[0])


def test_tool_choice(app, tool_tok):
    st, c = app
    tok = tool_tok
    # named: the prompt ends by opening that call, and the reply finishes it
    st.worker.script = tok.encode(f"city:{QUOTE}Oslo{QUOTE}}}") + [tok.token_to_id(END), tok.token_to_id(RESPONSE)]
    r = ask(c, tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert tok.decode(st.worker.prompts[-1], skip_special_tokens=False).endswith(
        f"<start_of_turn>model\n{START}call:get_weather{{")
    assert r.choices[0].finish_reason == "tool_calls"
    assert json.loads(r.choices[0].message.tool_calls[0].function.arguments) == {"city": "Oslo"}
    # required: the model picks the function
    st.worker.script = tok.encode("get_weather{}") + [tok.token_to_id(END), tok.token_to_id(RESPONSE)]
    r = ask(c, tools=[WEATHER], tool_choice="required")
    assert tok.decode(st.worker.prompts[-1], skip_special_tokens=False).endswith(f"model\n{START}call:")
    assert r.choices[0].message.tool_calls[0].function.name == "get_weather"
    # a forced call the model does not finish comes back as content, marks spelled out
    st.worker.script = tok.encode("no idea") + [tok.token_to_id(RESPONSE)]
    r = ask(c, tools=[WEATHER], tool_choice="required")
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.tool_calls is None
    assert r.choices[0].message.content == f"{START}call:no idea"          # (the turn's end token left out)
    # none: the tools are not shown, and nothing is read as a call
    st.worker.script = call_ids(tok, "get_weather", "") + [tok.token_to_id(RESPONSE)]
    r = ask(c, tools=[WEATHER], tool_choice="none")
    assert "declaration" not in tok.decode(st.worker.prompts[-1], skip_special_tokens=False)
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.tool_calls is None


@pytest.mark.parametrize("kw, param", [
    (dict(tool_choice="auto"), "tool_choice"),
    (dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice"),
    (dict(tools=[WEATHER, WEATHER]), "tools"),
    (dict(tools=[{"type": "function", "function": {"name": "has space"}}]), "tools[0].function.name"),
    (dict(messages=[{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]),
     "messages[1].tool_calls[0].function.arguments"),
    (dict(messages=[{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "f", "arguments": "[1]"}}]}]),
     "messages[1].tool_calls[0].function.arguments"),
    (dict(messages=[{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "f", "arguments": '{"a": ' + "1" * 5000 + "}"}}]}]),
     "messages[1].tool_calls[0].function.arguments"),
    (dict(messages=[{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "f", "arguments": "[" * 5000}}]}]),
     "messages[1].tool_calls[0].function.arguments"),
    (dict(messages=[{"role": "tool", "tool_call_id": "zz", "content": "x"}]), "messages[0].tool_call_id"),
    (dict(messages=[{"role": "user", "content": "x", "tool_call_id": "a"}]), "messages[0].tool_call_id"),
    (dict(messages=[{"role": "user"}]), "messages[0].content"),
    (dict(messages=[{"role": "user", "content": "x", "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]), "messages[0]"),
])
def test_bad_tool_requests_are_400s_naming_the_field(app, kw, param):
    _, c = app
    with pytest.raises(openai.BadRequestError) as e:
        ask(c, **kw)
    assert e.value.body["param"] == param, e.value.body


def test_a_model_without_tool_support_refuses_tools(app):
    st, c = app
    st.tok = dgemma.load_tokenizer(dgemma.default_model_path())
    with pytest.raises(openai.BadRequestError) as e:
        ask(c, tools=[WEATHER])
    assert e.value.body["param"] == "tools" and "<|tool_call>" in e.value.body["message"]
    st.worker.script = st.tok.encode("fine") + [1]
    assert ask(c, tools=[WEATHER], tool_choice="none").choices[0].finish_reason == "stop"   # not shown: fine


# ---- thinking -------------------------------------------------------------------------------------------------
def test_thought_reader_splits_and_drops_the_label(tool_tok):
    tok = tool_tok
    think, done = tok.token_to_id(THINK), tok.token_to_id(THOUGHT_END)
    inner = tok.encode("thought\nWhy?")
    ids = [think] + inner + [done] + tok.encode("Because.")
    for cut in range(len(ids)):
        r = ThoughtReader.make(tok)
        a, b = r.push(ids[:cut]), r.push(ids[cut:])
        assert a[0] + b[0] == inner and a[1] + [cut + i for i in b[1]] == list(range(len(inner) + 2, len(ids)))
    assert ThoughtReader.make(dgemma.load_tokenizer(dgemma.default_model_path())) is None
    shown = ThoughtReader.shown
    assert [shown(t, False) for t in ("thou", "thought", "thought\n", "thought\nWhy", "though it")] == \
        ["", "", "", "Why", "though it"]
    assert shown("thou", True) == "thou"


def test_chat_returns_the_thinking_apart(app, tool_tok):
    st, c = app
    tok = tool_tok
    think, done = tok.token_to_id(THINK), tok.token_to_id(THOUGHT_END)
    st.worker.script = [think] + tok.encode("thought\nThe user wants the weather.") + [done] + \
        tok.encode("I will check.") + call_ids(tok, "get_weather", f"city:{QUOTE}Paris{QUOTE}") + \
        [tok.token_to_id(RESPONSE)]
    r = ask(c, tools=[WEATHER], extra_body={"chat_template_kwargs": {"enable_thinking": True}}, logprobs=True)
    msg = r.choices[0].message
    assert tok.decode(st.worker.prompts[-1], skip_special_tokens=False).startswith("<bos><|think|>")
    assert msg.reasoning_content == "The user wants the weather." and msg.content == "I will check."
    assert msg.tool_calls[0].function.name == "get_weather" and r.choices[0].finish_reason == "tool_calls"
    assert len(r.choices[0].logprobs.content) == r.usage.completion_tokens == len(st.worker.script)
    assert r.usage.completion_tokens_details.reasoning_tokens == len(tok.encode("thought\nThe user wants the "
                                                                              "weather.")) + 2
    thought, text, calls = "", "", []
    for ch in ask(c, tools=[WEATHER], stream=True):
        d = ch.choices[0].delta
        thought += getattr(d, "reasoning_content", None) or ""
        text += d.content or ""
        calls += d.tool_calls or []
    assert (thought, text, len(calls)) == ("The user wants the weather.", "I will check.", 1)
    # the warmed turn: rendered with the same template variables (<|think|> first)
    assert tok.decode(st.worker.warmed[0], skip_special_tokens=False).startswith("<bos><|think|>")


@pytest.mark.parametrize("kwargs", [{"tools": []}, {"messages": 1}, {"add_generation_prompt": False}, {"a b": 1},
                                    {"bos_token": "x"}, {"self": 1}, {"namespace": 1}])
def test_chat_template_kwargs_cannot_replace_the_request(app, kwargs):
    _, c = app
    with pytest.raises(openai.BadRequestError) as e:
        ask(c, extra_body={"chat_template_kwargs": kwargs})
    assert e.value.body["param"] == "chat_template_kwargs"


def test_a_stop_string_after_thinking_counts_the_thinking_tokens(app, tool_tok):
    st, c = app
    tok = tool_tok
    inner, content = tok.encode("thought\nHmm."), tok.encode("Hello there. STOP and more words")
    st.worker.script = [tok.token_to_id(THINK)] + inner + [tok.token_to_id(THOUGHT_END)] + content
    cut = tok.decode(content).index("STOP")
    m = next(k for k in range(len(content) + 1) if len(tok.decode(content[:k])) >= cut)
    for stream in (False, True):
        r = ask(c, stop=["STOP"], logprobs=True, stream=stream, stream_options={"include_usage": True} if stream
                else None)
        if stream:
            chunks = list(r)
            usage = chunks[-1].usage
            n_logprobs = sum(len(ch.choices[0].logprobs.content) for ch in chunks
                             if ch.choices and ch.choices[0].logprobs)
            text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        else:
            usage, n_logprobs, text = r.usage, len(r.choices[0].logprobs.content), r.choices[0].message.content
        assert text == "Hello there. "
        assert usage.completion_tokens == n_logprobs == len(inner) + 2 + m
        assert usage.completion_tokens_details.reasoning_tokens == len(inner) + 2


def test_stop_strings_end_the_reply_before_any_call(app, tool_tok):
    st, c = app
    tok = tool_tok
    st.worker.script = tok.encode("Ok STOP") + call_ids(tok, "get_weather", "") + [tok.token_to_id(RESPONSE)]
    for size in (4, 64):                     # the call in a later canvas, or in the stop string's own
        st.worker.canvas = size
        r = ask(c, tools=[WEATHER], stop=["STOP"])
        assert (r.choices[0].message.content, r.choices[0].message.tool_calls) == ("Ok ", None)
        assert r.choices[0].finish_reason == "stop"
    # text after a call is cut at a stop string too
    st.worker.script = call_ids(tok, "get_weather", "") + tok.encode(" after STOP secret") + \
        [tok.token_to_id(RESPONSE)]
    r = ask(c, tools=[WEATHER], stop=["STOP"])
    assert r.choices[0].message.content == " after " and len(r.choices[0].message.tool_calls) == 1


def test_a_stop_string_at_the_content_start_still_counts_the_thinking(app, tool_tok):
    st, c = app
    tok = tool_tok
    inner = tok.encode("thought\nHmm.")
    st.worker.script = [tok.token_to_id(THINK)] + inner + [tok.token_to_id(THOUGHT_END)] + tok.encode("STOP more")
    r = ask(c, stop=["STOP"], logprobs=True)
    assert r.choices[0].message.content == "" and r.choices[0].message.reasoning_content == "Hmm."
    assert r.usage.completion_tokens == len(r.choices[0].logprobs.content) == len(inner) + 2
    assert r.usage.completion_tokens_details.reasoning_tokens == len(inner) + 2


def test_a_failure_inside_a_reply_is_an_error_not_a_cut_stream(app, tool_tok):
    st, c = app
    st.worker.script = tool_tok.encode("Hi")
    st.worker._play = lambda rid, prompt, sink: sink("canvas", None)    # (a malformed event: a bug)
    with pytest.raises(openai.InternalServerError):
        ask(c)
    with pytest.raises(openai.APIError, match="internal server error"):
        list(ask(c, stream=True))


def test_the_text_before_a_call_is_streamed_before_it(app, tool_tok):
    """Text held back while it could still begin a stop string goes out once a call starts (the content is
    whole then), not after the call."""
    st, c = app
    tok = tool_tok
    st.worker.script = tok.encode("Hello ST") + call_ids(tok, "get_weather", "") + tok.encode("          ") + \
        [tok.token_to_id(RESPONSE)]
    st.worker.canvas = 4
    kinds = []
    for ch in ask(c, tools=[WEATHER], stop=["STOPX"], stream=True):
        d = ch.choices[0].delta if ch.choices else None
        if d is not None and d.content:
            kinds.append(("text", d.content))
        if d is not None and d.tool_calls:
            kinds.append(("call", d.tool_calls[0].function.name))
    assert "".join(t for k, t in kinds if k == "text") == "Hello ST"
    assert kinds[-1] == ("call", "get_weather")
