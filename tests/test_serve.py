"""`dgemma serve` as a real process on a loopback port, driven by the official `openai` client: every route
streamed and not, usage, exact max_tokens, stop strings, seeds with and without batching, cancel on
disconnect, 429, 401, bad input (400/404 naming the parameter), prefix-reuse exactness, graceful shutdown."""
from __future__ import annotations

import json
import math
import signal
import threading
import time

import httpx
import openai
import pytest

import dgemma
from serving import ServerProcess

KEY = "test-key"
NAME = "dgemma-default"
FAST = {"max_denoising_steps": 4}          # keeps each canvas cheap on the CPU


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = open(tmp_path_factory.mktemp("serve") / "server.log", "wb")
    srv = ServerProcess("--api-key", KEY, "--max-batch", "4", "--max-queue", "16", "--prefill-chunk", "32",
                        log=log).wait_ready()
    yield srv
    assert srv.stop() == 0


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """One row, one queue slot, no prefix cache: for 429s, the cold side of reuse, and shutdown."""
    srv = ServerProcess("--max-batch", "1", "--max-queue", "1", "--prefill-chunk", "32", "--prefix-cache-mb", "0",
                        env={"DGEMMA_API_KEY": KEY}).wait_ready()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def tok():
    return dgemma.load_tokenizer(dgemma.default_model_path())


def client(srv, key=KEY, **kw):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0, **kw)


def chat(c, content="Tell me about the sea.", **kw):
    kw.setdefault("max_tokens", 40)
    kw.setdefault("extra_body", FAST)
    return c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": content}], **kw)


def streamed(stream):
    """Concatenated deltas, finish_reason, usage (from the include_usage chunk)."""
    text, finish, usage, chunks = "", None, None, 0
    for ch in stream:
        chunks += 1
        if ch.choices:
            d = ch.choices[0]
            text += (d.delta.content or "") if hasattr(d, "delta") else (d.text or "")
            finish = d.finish_reason or finish
        if ch.usage is not None:
            usage = ch.usage
    return text, finish, usage, chunks


def test_models_and_health(server):
    c = client(server)
    assert [m.id for m in c.models.list().data] == [NAME]
    assert c.models.retrieve(NAME).id == NAME
    assert httpx.get(server.url + "/health").status_code == 200
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("nope")


def test_chat_usage_and_stream_equals_nonstream(server, tok):
    c = client(server)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    r = c.chat.completions.create(model=NAME, messages=msgs, max_tokens=45, seed=7, extra_body=FAST)
    n_prompt = len(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True))
    u = r.usage
    assert (u.prompt_tokens, u.total_tokens) == (n_prompt, n_prompt + u.completion_tokens)
    assert u.prompt_tokens_details.cached_tokens == 0
    assert r.choices[0].finish_reason in ("stop", "length") and r.choices[0].message.role == "assistant"
    if r.choices[0].finish_reason == "length":
        assert u.completion_tokens == 45
    s = c.chat.completions.create(model=NAME, messages=msgs, max_tokens=45, seed=7, extra_body=FAST, stream=True,
                                  stream_options={"include_usage": True})
    text, finish, usage, chunks = streamed(s)
    assert text == r.choices[0].message.content and finish == r.choices[0].finish_reason
    assert usage.completion_tokens == u.completion_tokens and usage.prompt_tokens == n_prompt
    assert chunks >= 4     # role, >= 2 canvases of text (45 tokens > one 32-token canvas), finish, usage


def test_message_name_is_accepted(server):
    r = client(server).chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi", "name": "bo"}],
                                               max_tokens=4, extra_body=FAST)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_content_parts_equal_a_string(server):
    c = client(server)
    a = chat(c, "Hello\nworld", seed=3)
    b = c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": [
        {"type": "text", "text": "Hello"}, {"type": "text", "text": "world"}]}], max_tokens=40, seed=3,
        extra_body=FAST)
    assert a.choices[0].message.content == b.choices[0].message.content


def test_responses_route_on_the_model(server, tok):
    """/v1/responses through the real engine: the chat's tokens, streamed or not."""
    c = client(server)
    r = c.responses.create(model=NAME, input="Tell me about the sea.", max_output_tokens=40, extra_body={
        **FAST, "seed": 5})
    chat_r = chat(c, seed=5)
    assert r.output_text == chat_r.choices[0].message.content
    assert r.usage.output_tokens == chat_r.usage.completion_tokens and r.status in ("completed", "incomplete")
    assert (r.status == "incomplete") == (chat_r.choices[0].finish_reason == "length")
    events = list(c.responses.create(model=NAME, input="Tell me about the sea.", max_output_tokens=40, stream=True,
                                     extra_body={**FAST, "seed": 5}))
    assert events[-1].response.output_text == r.output_text


def test_completions_routes(server):
    c = client(server)
    r = c.completions.create(model=NAME, prompt="The old house", max_tokens=33, seed=1, extra_body=FAST)
    assert r.object == "text_completion" and r.choices[0].finish_reason in ("stop", "length")
    if r.choices[0].finish_reason == "length":
        assert r.usage.completion_tokens == 33
    text, finish, usage, _ = streamed(c.completions.create(model=NAME, prompt="The old house", max_tokens=33,
                                                           seed=1, extra_body=FAST, stream=True,
                                                           stream_options={"include_usage": True}))
    assert (text, finish, usage.completion_tokens) == (r.choices[0].text, r.choices[0].finish_reason,
                                                       r.usage.completion_tokens)
    ids = c.completions.create(model=NAME, prompt=[2, 100, 200], max_tokens=5, seed=1, extra_body=FAST)
    assert ids.usage.prompt_tokens == 3


@pytest.mark.parametrize("n", [1, 7, 32, 50])
def test_max_tokens_is_exact(server, n):
    # a huge confidence threshold never stops a canvas early; the model rarely says EOS: length is typical
    r = client(server).completions.create(model=NAME, prompt="Once", max_tokens=n, seed=n, extra_body=FAST)
    assert r.usage.completion_tokens <= n
    if r.choices[0].finish_reason == "length":
        assert r.usage.completion_tokens == n


def test_stop_strings(server):
    c = client(server)
    full = c.completions.create(model=NAME, prompt="The road", max_tokens=64, seed=11, extra_body=FAST)
    text = full.choices[0].text
    word = next(w for w in text.split()[3:] if len(w) >= 3)
    cut = text.index(word)
    r = c.completions.create(model=NAME, prompt="The road", max_tokens=64, seed=11, stop=[word, "zzzq"],
                             extra_body=FAST)
    assert r.choices[0].text == text[:cut] and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < full.usage.completion_tokens        # only the tokens up to the stop
    s, finish, _, _ = streamed(c.completions.create(model=NAME, prompt="The road", max_tokens=64, seed=11,
                                                    stop=word, extra_body=FAST, stream=True))
    assert s == text[:cut] and finish == "stop"


def test_n_choices_are_the_requests_with_seeds_counted_up(server):
    c = client(server)
    kw = dict(max_tokens=40, extra_body=FAST)
    alone = [chat(c, "Three ways to say it", seed=s, **kw) for s in (5, 6, 7)]
    r = chat(c, "Three ways to say it", seed=5, n=3, **kw)
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    assert [ch.message.content for ch in r.choices] == [a.choices[0].message.content for a in alone]
    assert [ch.finish_reason for ch in r.choices] == [a.choices[0].finish_reason for a in alone]
    assert len({ch.message.content for ch in r.choices}) == 3
    assert r.usage.prompt_tokens == alone[0].usage.prompt_tokens
    assert r.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # streamed: each choice's deltas under its index, one role chunk and one finish each, the usage once at the end
    texts, finish, roles, usages = ["", "", ""], [None] * 3, 0, []
    for ch in chat(c, "Three ways to say it", seed=5, n=3, stream=True, stream_options={"include_usage": True},
                   **kw):
        for d in ch.choices:
            texts[d.index] += d.delta.content or ""
            roles += d.delta.role == "assistant"
            finish[d.index] = d.finish_reason or finish[d.index]
        if ch.usage is not None:
            usages.append(ch.usage)
    assert texts == [ch.message.content for ch in r.choices] and roles == 3
    assert finish == [ch.finish_reason for ch in r.choices]
    assert len(usages) == 1 and usages[0].completion_tokens == r.usage.completion_tokens
    # text completions too; a seed at the top of its range wraps (choice 1: seed 0)
    top = c.completions.create(model=NAME, prompt="The old house", max_tokens=20, seed=2 ** 64 - 1, n=2,
                               extra_body=FAST)
    zero = c.completions.create(model=NAME, prompt="The old house", max_tokens=20, seed=0, extra_body=FAST)
    assert [ch.index for ch in top.choices] == [0, 1] and top.choices[1].text == zero.choices[0].text
    # best_of picks the best of more choices than it returns: only best_of = n (nothing to pick) is honoured
    two = c.completions.create(model=NAME, prompt="Hi", max_tokens=4, n=2, best_of=2, extra_body=FAST)
    assert len(two.choices) == 2
    for best_of in (1, 3):
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(model=NAME, prompt="Hi", max_tokens=4, n=2, best_of=best_of, extra_body=FAST)
        assert e.value.body["param"] == "best_of"


def test_chat_logprobs(server):
    c = client(server)
    r = chat(c, "Say something", seed=6, logprobs=True)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens and all(e.logprob <= 0 for e in content)
    assert any(e.logprob < -1e-3 for e in content) and all(e.top_logprobs == [] for e in content)
    assert "".join(e.token for e in content).startswith(r.choices[0].message.content[:20])
    assert b"".join(bytes(e.bytes) for e in content).decode("utf-8").startswith(r.choices[0].message.content)
    assert chat(c, "Say something", seed=6).choices[0].logprobs is None          # only when asked
    assert chat(c, "Say something", seed=6, logprobs=True, top_logprobs=0).choices[0].logprobs.content == content
    streamed = []
    for ch in chat(c, "Say something", seed=6, logprobs=True, stream=True):
        for d in ch.choices:
            streamed += d.logprobs.content if d.logprobs else []
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    # top_logprobs: the same tokens, each with its 3 most likely alternatives, itself first
    top = chat(c, "Say something", seed=6, logprobs=True, top_logprobs=3).choices[0].logprobs.content
    assert [(e.token, e.logprob) for e in top] == [(e.token, e.logprob) for e in content]
    assert all(len(e.top_logprobs) == 3 and (e.top_logprobs[0].token, e.top_logprobs[0].logprob) == (e.token, e.logprob)
               and e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob >= e.top_logprobs[2].logprob
               and e.top_logprobs[2].bytes is not None for e in top)
    assert any(e.top_logprobs[1].logprob > -20 for e in top)
    # a stop string: the entries of the tokens up to it, as many as usage counts
    word = next(w for w in r.choices[0].message.content.split()[2:] if len(w) >= 3)
    cut = chat(c, "Say something", seed=6, logprobs=True, stop=word)
    assert cut.choices[0].finish_reason == "stop"
    assert len(cut.choices[0].logprobs.content) == cut.usage.completion_tokens < len(content)
    n = cut.usage.completion_tokens
    assert [e.logprob for e in cut.choices[0].logprobs.content] == [e.logprob for e in content][:n]
    # a stop string across a canvas boundary (this model's canvases: 8 tokens): no entries past it
    C = dgemma.ModelConfig.from_dir(dgemma.default_model_path()).canvas_length
    across = "".join(e.token for e in content[C - 2:C + 2])
    assert across.strip() and "".join(e.token for e in content).find(across) == len("".join(
        e.token for e in content[:C - 2]))                                   # (first seen there)
    cut = chat(c, "Say something", seed=6, logprobs=True, stop=across)
    assert cut.choices[0].finish_reason == "stop"
    assert len(cut.choices[0].logprobs.content) == cut.usage.completion_tokens <= C - 1


def test_text_stream_counts_the_tokens_whose_text_went_out(tok):
    """TextStream.covered: the tokens whose text is sent, so logprob entries never run ahead of the text; a stop
    string across two canvases ends them at `used` (what usage counts), not at the first canvas's end."""
    from dgemma.serve.text import TextStream
    a, b = tok.encode("Hello there. The STO"), tok.encode("P sign is red.")
    ts = TextStream(tok, ["STOP"])
    sent, c = ts.push(a), ts.covered()
    assert sent == "Hello there. The " and len(tok.decode(a[:c])) <= len(sent) < len(tok.decode(a[:c + 1]))
    assert ts.push(b) == "" and ts.stopped and ts.covered() == ts.used < len(a)
    assert tok.decode((a + b)[:ts.used]).startswith("Hello there. The") and "STO" not in tok.decode((a + b)[:ts.used])
    whole = TextStream(tok, [])
    whole.push(a)
    whole.push(b, final=True)
    assert whole.covered() == len(a + b)


def test_text_stream_covered_is_the_definition_in_linear_time(tok):
    """covered() from the decoded lengths CharOffsets keeps, against its definition (the most m whose decode
    ids[:m] fits in the text sent; a part of a character counts 1) for canvases that split characters; and a
    2,000-token reply in 8-token canvases, covered() after each, in well under the 0.34 s it took by decoding."""
    import random

    from dgemma.serve.text import TextStream
    ids = tok.encode("Hi 😀 Köln, 日本語 and € signs. " * 8)
    rng = random.Random(0)
    for trial in range(20):
        ts, at = TextStream(tok, ["日本"] if trial % 2 else []), 0
        while at < len(ids) and not ts.stopped:
            step = rng.randint(1, 9)
            ts.push(ids[at:at + step], final=at + step >= len(ids))
            at += step
            fits = [m for m in range(len(ts.ids) + 1) if len(tok.decode(ts.ids[:m])) <= len(ts.text)]
            assert ts.covered() == (ts.used if ts.stopped else max(fits)), (trial, at)
    long = tok.encode("A smile 😀 and 日本語 again. " * 200)[:2000]
    ts, t0 = TextStream(tok, []), time.perf_counter()
    for k in range(0, len(long), 8):
        ts.push(long[k:k + 8])
        ts.covered()
    assert ts.offsets.exact and time.perf_counter() - t0 < 0.3


def test_top_k_top_p_truncate_and_stay_seeded(server):
    c = client(server)
    plain = chat(c, "Tell me about the hills", seed=4).choices[0].message.content
    cut = [chat(c, "Tell me about the hills", seed=4, top_p=0.3, extra_body={**FAST, "top_k": 2}).choices[0]
           .message.content for _ in range(2)]
    assert cut[0] == cut[1] and cut[0] != plain
    r = chat(c, "Tell me about the hills", seed=4, top_p=0.0)            # 0: the likeliest token alone
    assert r.choices[0].finish_reason in ("stop", "length")


def test_seed_is_reproducible_while_batched(server):
    c = client(server)
    alone = chat(c, "A seeded request", seed=123, max_tokens=64).choices[0].message.content
    out: dict = {}

    def other(i):
        out[i] = chat(c, f"Some other request number {i}", seed=i, max_tokens=64).choices[0].message.content

    threads = [threading.Thread(target=other, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.05)
    text, _, _, _ = streamed(chat(c, "A seeded request", seed=123, max_tokens=64, stream=True))
    for t in threads:
        t.join()
    assert text == alone and len(out) == 3
    unseeded = {chat(c, "A seeded request", max_tokens=64).choices[0].message.content for _ in range(2)}
    assert len(unseeded) == 2                 # no seed: a fresh random stream each time


def test_temperature_zero_is_greedy_and_deterministic(server):
    c = client(server)
    a = chat(c, "Greedy please", temperature=0, seed=1).choices[0].message.content
    b = chat(c, "Greedy please", temperature=0, seed=2).choices[0].message.content
    assert isinstance(a, str) and a and b
    # without a seed too: the starting canvas and renoise draws are random, so greedy fixes them (seed 0)
    unseeded = {chat(c, "Greedy please", temperature=0).choices[0].message.content for _ in range(2)}
    assert unseeded == {chat(c, "Greedy please", temperature=0, seed=0).choices[0].message.content}


def _requests(srv, route: str, status: str) -> float:
    want = f'dgemma_requests_total{{route="{route}",status="{status}"}}'
    return sum(float(line.rsplit(" ", 1)[1]) for line in httpx.get(srv.url + "/metrics").text.splitlines()
               if line.startswith(want + " "))


# n = 3: every canvas runs all its 256 steps (no entropy is below 0), so no choice ends by itself in 5 s
@pytest.mark.parametrize("n,more", [(1, {"max_denoising_steps": 32}),
                                    (3, {"max_denoising_steps": 256, "confidence_threshold": 0})])
def test_cancel_on_disconnect_frees_the_row(server, n, more):
    before = [_requests(server, "/v1/chat/completions", s) for s in ("200", "499")]
    with httpx.stream("POST", server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": NAME, "messages": [{"role": "user", "content": "Go on and on"}],
                            "max_tokens": 3000, "stream": True, "n": n, **more,
                            "seed": 8}, timeout=30) as r:   # seed 8: ~1,000 tokens (unseeded, some end at once)
        for line in r.iter_lines():
            if '"content": "' in line and '"content": ""' not in line:
                break                                    # first committed text: now hang up
    t0 = time.time()
    while server.metric("dgemma_active_rows") > 0:
        # n = 3: well within one 256-step canvas (~2 s), after which Python's clean-up of the abandoned event
        # streams would free the other choices' rows even if hanging up cancelled only the first
        assert time.time() - t0 < (5 if n == 1 else 1.5), "the disconnected request kept its rows"
        time.sleep(0.05)
    # counted as a client that went away, not as a 200
    assert [_requests(server, "/v1/chat/completions", s) for s in ("200", "499")] == [before[0], before[1] + 1]


def test_auth(server):
    with pytest.raises(openai.AuthenticationError):
        client(server, key="wrong").models.list()
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": NAME, "messages": []})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.post(server.url + "/v1/chat/completions", content=b"{not json",      # the key before the body
                   headers={"content-type": "application/json"})
    assert r.status_code == 401


BAD = [  # (body changes, status, param)
    ({"messages": []}, 400, "messages"),
    ({"foo": 1}, 400, "foo"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, 400, "response_format.type"),
    ({"logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ({"top_logprobs": 0}, 400, "top_logprobs"),
    ({"n": 0}, 400, "n"),
    ({"n": 129}, 400, "n"),
    ({"n": 17}, 400, "n"),                # more than this server's --max-queue 16
    ({"top_p": 1.5}, 400, "top_p"),
    ({"top_k": -1}, 400, "top_k"),
    ({"top_k": 2.5}, 400, "top_k"),
    ({"temperature": 3}, 400, "temperature"),
    ({"max_tokens": 0}, 400, "max_tokens"),
    ({"max_tokens": 10 ** 9}, 400, "max_tokens"),
    ({"max_tokens": 10 ** 400}, 400, "max_tokens"),
    ({"stop": "x" * 300}, 400, "stop"),
    ({"t_min": 2.0, "t_max": 1.0}, 400, "t_max"),
    ({"t_min": 5e-324}, 400, "t_min"),    # 0 in fp32: logits / 0 gave NaN log-probabilities (a 500)
    ({"t_min": 2e-5, "temperature": 0.5}, 400, "t_min"),
    ({"max_denoising_steps": 0}, 400, "max_denoising_steps"),
    ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "messages[0].content[0].type"),
    ({"messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].tool_call_id"),
    ({"messages": [{"role": "user", "content": "word " * 5000}]}, 400, "messages"),
    ({"model": "gpt-4"}, 404, "model"),
    # JSON of the wrong type is refused, not converted
    ({"max_tokens": "5"}, 400, "max_tokens"),
    ({"max_tokens": True}, 400, "max_tokens"),
    ({"max_tokens": 5.0}, 400, "max_tokens"),
    ({"stream": 1}, 400, "stream"),
    ({"seed": "7"}, 400, "seed"),
    ({"temperature": "0.5"}, 400, "temperature"),
    ({"temperature": float("nan")}, 400, "temperature"),
    ({"entropy_bound": float("inf")}, 400, "entropy_bound"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, 400, "messages[0].content[0].text"),
    ({"messages": [{"role": "assistant", "content": "x", "tool_calls": [{"id": "1"}]},
                   {"role": "user", "content": "hi"}]}, 400, "messages[0].tool_calls[0].type"),
    # a well-formed call in the history, but the shipped model's template cannot render it
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "user", "content": "hi"}]}, 400, "messages"),
]


@pytest.mark.parametrize("change,status,param", BAD, ids=[str(b[0])[:40] for b in BAD])
def test_bad_requests_are_named(server, change, status, param):
    body = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, **change}
    r = httpx.post(server.url + "/v1/chat/completions", content=json.dumps(body),     # json.dumps: NaN too
                   headers={"Authorization": f"Bearer {KEY}", "content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and err["type"]
    if any(isinstance(v, float) and v != v or v in (float("inf"),) for v in change.values()):
        assert "finite" in err["message"]


def test_an_assistant_message_as_the_openai_client_dumps_it(server):
    c = client(server)
    first = chat(c, "Hello", max_tokens=8)
    msgs = [{"role": "user", "content": "Hello"}, first.choices[0].message.model_dump(),   # refusal: None, ...
            {"role": "user", "content": "More"}]
    assert {"refusal", "tool_calls", "annotations"} <= set(msgs[1])
    r = c.chat.completions.create(model=NAME, messages=msgs, max_tokens=8, extra_body=FAST)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_malformed_json_and_unknown_routes(server):
    h = {"Authorization": f"Bearer {KEY}", "content-type": "application/json"}
    r = httpx.post(server.url + "/v1/completions", content=b"{not json", headers=h)
    assert r.status_code == 400 and "error" in r.json()
    for bad in (["a", ""], [], [[2, 3], []], ["a", [2, 3]], [[2, -1]], ["a"] * 257):
        r = httpx.post(server.url + "/v1/completions", json={"model": NAME, "prompt": bad}, headers=h)
        assert r.status_code == 400 and r.json()["error"]["param"].startswith("prompt"), bad   # (prompt[1]: its part)
    for bad in ({"logprobs": 21}, {"logprobs": True}, {"max_tokens": -1}, {"echo": 1}, {"logit_bias": {"x": 1}},
                {"logit_bias": {"1" * 5000: 1}}, {"logit_bias": {"0" * 5000: 1}},
                {"logit_bias": {"-1": 1}}, {"logit_bias": {"99999": 1}}, {"logit_bias": {"5": 101}},
                {"logit_bias": {"٣": 1}}, {"presence_penalty": 2.5}, {"frequency_penalty": -3}):
        r = httpx.post(server.url + "/v1/completions", json={"model": NAME, "prompt": "a", **bad}, headers=h)
        assert r.status_code == 400 and r.json()["error"]["param"] == next(iter(bad)), bad
    r = httpx.get(server.url + "/v1/nothing", headers=h)
    assert r.status_code == 404 and "error" in r.json()


def test_queue_full_is_429(small):
    c = client(small)
    errors, done = [], []

    def go(i):
        try:
            chat(c, f"request {i}", max_tokens=200, extra_body={"max_denoising_steps": 64, "confidence_threshold": 0})
            done.append(i)
        except openai.RateLimitError as e:
            errors.append(e.response.headers.get("retry-after"))

    threads = [threading.Thread(target=go, args=(i,)) for i in range(5)]
    for t in threads:
        t.start()
        time.sleep(0.1)
    for t in threads:
        t.join()
    assert errors and all(h for h in errors) and done
    # a burst that reaches the handlers together (one event-loop tick): still one row and one waiting request
    import asyncio

    async def burst() -> list[int]:
        ac = openai.AsyncOpenAI(base_url=small.url + "/v1", api_key=KEY, max_retries=0, timeout=120)

        async def one(i: int) -> int:
            try:
                await ac.chat.completions.create(model=NAME, messages=[{"role": "user", "content": f"q {i}"}],
                                                 max_tokens=200, extra_body={"max_denoising_steps": 64,
                                                                             "entropy_bound": 0.001})
                return 200
            except openai.RateLimitError:
                return 429
        return await asyncio.gather(*[one(i) for i in range(6)])
    codes = asyncio.run(burst())
    assert 1 <= codes.count(200) <= 2 and codes.count(429) == 6 - codes.count(200), codes


def _conversation(tok):
    # a history longer than the sliding window (64) and several prefill chunks (32)
    long = " ".join(f"item{i}" for i in range(60))
    return [{"role": "user", "content": f"Here is a list: {long}. Remember it."}]


def test_second_turn_reuses_the_prefix_exactly(server, small, tok):
    c, cold = client(server), client(small)
    msgs = _conversation(tok)
    r1 = c.chat.completions.create(model=NAME, messages=msgs, max_tokens=40, seed=5, extra_body=FAST)
    msgs2 = msgs + [{"role": "assistant", "content": r1.choices[0].message.content},
                    {"role": "user", "content": "And now?"}]
    n2 = len(tok.apply_chat_template(msgs2, add_generation_prompt=True, tokenize=True))
    time.sleep(1.0)                                           # the finished turn is encoded in idle time
    warm = c.chat.completions.create(model=NAME, messages=msgs2, max_tokens=70, seed=6, extra_body=FAST)
    ref = cold.chat.completions.create(model=NAME, messages=msgs2, max_tokens=70, seed=6, extra_body=FAST)
    cached = warm.usage.prompt_tokens_details.cached_tokens
    assert ref.usage.prompt_tokens_details.cached_tokens == 0
    assert cached >= len(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)) // 32 * 32
    assert n2 - cached < 32 + 8                               # only the new turn (+ < one chunk) is encoded
    assert warm.choices[0].message.content == ref.choices[0].message.content
    assert warm.usage.completion_tokens == ref.usage.completion_tokens
    assert server.metric("dgemma_prefix_cache_hit_tokens_total") >= cached


def test_a_turn_ended_by_a_stop_string_warms_the_next(server, tok):
    c = client(server)
    msgs = [{"role": "user", "content": "Tell me a long story about a lighthouse keeper."}]
    kw = dict(model=NAME, max_tokens=120, seed=31, extra_body={**FAST, "confidence_threshold": 0})
    full = c.chat.completions.create(messages=msgs, **kw).choices[0].message.content
    words = [w for w in full.split() if len(w) >= 3]
    stop = words[len(words) * 3 // 4]                     # late in the reply: the turn adds > one 32-token chunk
    r = c.chat.completions.create(messages=msgs, stop=stop, **kw)
    reply = r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop" and reply == full[:full.index(stop)]
    msgs2 = msgs + [{"role": "assistant", "content": reply}, {"role": "user", "content": "Go on."}]
    turn = len(tok.apply_chat_template(msgs2[:2], add_generation_prompt=False, tokenize=True))
    prompt = len(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True))
    assert turn // 32 > prompt // 32 + 1
    time.sleep(1.0)                                       # the finished turn is encoded in idle time
    r2 = c.chat.completions.create(messages=msgs2, **{**kw, "max_tokens": 8})
    assert r2.usage.prompt_tokens_details.cached_tokens >= turn // 32 * 32


def test_a_port_in_use_is_one_line(server):
    import subprocess
    import sys
    p = subprocess.run([sys.executable, "-m", "dgemma.cli", "serve", "--port", str(server.port)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr + p.stdout
    assert p.stderr.strip() == f"dgemma: error: cannot listen on 127.0.0.1:{server.port}: Address already in use"


def test_metrics(server):
    text = httpx.get(server.url + "/metrics").text
    for name in ("dgemma_requests_total", "dgemma_queue_depth", "dgemma_active_rows",
                 "dgemma_time_to_first_canvas_seconds", "dgemma_decoder_pass_seconds", "dgemma_tokens_per_forward",
                 "dgemma_prefix_cache_hit_tokens_total", "dgemma_generated_tokens_total"):
        assert name in text, name


def test_graceful_shutdown_ends_streams_and_exits_0(small):
    events: list[str] = []

    def stream():
        # 256 passes for the first canvas (~1 s here): the request is mid-canvas when the signal comes
        body = {"model": NAME, "prompt": "Long story", "max_tokens": 3000, "stream": True,
                "max_denoising_steps": 256, "confidence_threshold": 0}
        try:
            with httpx.stream("POST", small.url + "/v1/completions", timeout=60, json=body,
                              headers={"Authorization": f"Bearer {KEY}"}) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
        except httpx.HTTPError as e:
            events.append(f"transport error {e}")

    t = threading.Thread(target=stream)
    t.start()
    t0 = time.time()
    while small.metric("dgemma_active_rows") < 1:
        assert time.time() - t0 < 30
        time.sleep(0.02)
    small.proc.send_signal(signal.SIGTERM)
    assert small.proc.wait(30) == 0
    t.join(10)
    errors = [json.loads(e) for e in events if e.startswith('{"error"')]
    assert errors and "shutting down" in errors[0]["error"]["message"] and events[-1] == "[DONE]", events[-3:]


def test_denoising_frames_stream(server, tok):
    c = client(server)
    kw = dict(max_tokens=40, seed=21)
    plain = chat(c, "Show me", stream=True, **kw)
    text_plain, _, _, _ = streamed(plain)
    s = chat(c, "Show me", stream=True, extra_body={**FAST, "denoising_frames": True, "frame_interval_ms": 0}, **kw)
    text, frames = "", []
    for ch in s:                                  # the official client: frames are chunks with no choices
        if ch.choices:
            text += ch.choices[0].delta.content or ""
        else:
            frames.append(ch.model_extra["dgemma_frame"])
    assert text == text_plain
    finals = [f for f in frames if f["final"]]
    assert finals and tok.decode([t for f in finals for t in f["tokens"]], skip_special_tokens=True) == text
    assert all(len(f["pieces"]) == len(f["tokens"]) == len(f["state"]) for f in frames)
    assert len(frames) > len(finals)              # intermediate passes too
    r = httpx.post(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": NAME, "messages": [{"role": "user", "content": "x"}], "denoising_frames": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "denoising_frames"


def _encoder_logprobs(ids: list[int]):
    """The shipped model's causal-encoder log-probabilities of each of `ids` given the ones before ([L - 1]), and the
    log-softmax rows they come from ([L - 1, V]): what echo + logprobs reports for a prompt."""
    import torch
    m = dgemma.load(dgemma.default_model_path())
    with torch.inference_mode():
        h = m.encode(torch.tensor([ids]), m.new_cache(1, len(ids), scratch=1))[0]
        lsm = m.head(h[:-1]).log_softmax(-1)
    return lsm.gather(1, torch.tensor(ids[1:])[:, None])[:, 0], lsm


def test_completions_scoring_as_lm_eval_asks(server, tok):
    """lm-evaluation-harness's loglikelihood request (local-completions: token ids, max_tokens 1, logprobs 1, echo,
    temperature 0) and its parsing: the continuation's summed log-probability and whether it is greedy come out as
    the shipped model's causal encoder gives them; max_tokens 0 scores without generating; a batch of prompts
    gives each its own choice."""
    c = client(server)
    ctx, cont = tok.encode_prompt("The old house stood at the end"), tok.encode(" of the road")
    want, lsm = _encoder_logprobs(ctx + cont)
    body = {"model": NAME, "prompt": [ctx + cont], "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234,
            "echo": True}
    r = httpx.post(server.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}).json()
    ch = r["choices"][0]["logprobs"]
    assert len(ch["token_logprobs"]) == len(ctx) + len(cont) + 1 and ch["token_logprobs"][0] is None
    got = ch["token_logprobs"][len(ctx):-1]                          # lm-eval: [ctxlen:-1]
    assert abs(sum(got) - float(want[len(ctx) - 1:].sum())) < 1e-3
    greedy = all(t == max(top.values()) for t, top in zip(got, ch["top_logprobs"][len(ctx):-1]))
    assert greedy == bool((lsm.argmax(-1)[len(ctx) - 1:] == torch_tensor(cont)).all())
    assert r["usage"] == {"prompt_tokens": len(ctx) + len(cont), "completion_tokens": 1,
                          "total_tokens": len(ctx) + len(cont) + 1, "prompt_tokens_details": {"cached_tokens": 0}}
    # scoring only, two prompts in one request (strings): no token generated, each prompt's own scores
    s = c.completions.create(model=NAME, prompt=["The old house stood at the end of the road", "Hello"],
                             max_tokens=0, echo=True, logprobs=2)
    assert [x.index for x in s.choices] == [0, 1] and s.usage.completion_tokens == 0
    first = s.choices[0]
    assert first.text == "The old house stood at the end of the road" and first.finish_reason == "length"
    assert first.logprobs.token_logprobs[:len(ctx) + len(cont)] == ch["token_logprobs"][:len(ctx) + len(cont)]
    assert all(len(t) in (2, 3) for t in first.logprobs.top_logprobs[1:])   # 2 alternatives (+ the token itself)
    assert [t for t in first.logprobs.tokens] == [tok.decode([i], skip_special_tokens=False) for i in ctx + cont]
    assert s.choices[1].text == "Hello" and s.usage.prompt_tokens == len(ctx) + len(cont) + len(
        tok.encode_prompt("Hello"))


def torch_tensor(x):
    import torch
    return torch.tensor(x)


def test_completions_echo_logprobs_batches_and_streams(server, tok):
    """echo + logprobs N with generation: the prompt's entries then the generated ones (the same as without echo),
    text_offset indexing the text, each top_logprobs with N alternatives and the token; a batch of prompts with n=2
    gives choice p * n + j the text of prompt p alone with seed + j; the stream says the same."""
    c = client(server)
    kw = dict(model=NAME, max_tokens=12, seed=3, extra_body=FAST)
    plain = c.completions.create(prompt="The road", logprobs=2, **kw).choices[0]
    r = c.completions.create(prompt="The road", logprobs=2, echo=True, **kw).choices[0]
    n_prompt = len(tok.encode_prompt("The road"))
    assert r.text == "The road" + plain.text
    lp = r.logprobs
    assert lp.token_logprobs[n_prompt:] == plain.logprobs.token_logprobs and lp.token_logprobs[0] is None
    assert lp.tokens[n_prompt:] == plain.logprobs.tokens and lp.top_logprobs[0] is None
    for i, (t, p, top) in enumerate(zip(lp.tokens, lp.token_logprobs, lp.top_logprobs)):
        if i:
            assert t in top and top[t] == p and len(top) <= 3 and max(top.values()) >= p
    shown = [tok.decode([i], skip_special_tokens=True) for i in tok.encode_prompt("The road")]
    assert [r.text[a:a + len(w)] for a, w in zip(lp.text_offset, shown)] == shown
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[n_prompt] == len("The road")
    # a batch of token-id prompts, n = 2
    prompts = [[2, 100, 200], [2, 300]]
    both = c.completions.create(prompt=prompts, n=2, **kw)
    assert [x.index for x in both.choices] == [0, 1, 2, 3]
    for p, ids in enumerate(prompts):
        for j in range(2):
            alone = c.completions.create(prompt=ids, **{**kw, "seed": 3 + j}).choices[0].text
            assert both.choices[p * 2 + j].text == alone, (p, j)
    assert both.usage.prompt_tokens == 5
    # streamed: the echo first, then the rest; the same logprobs
    text, tokens, offsets = "", [], []
    for ch in c.completions.create(prompt="The road", logprobs=2, echo=True, stream=True, **kw):
        for d in ch.choices:
            text += d.text
            if d.logprobs:
                tokens += d.logprobs.tokens
                offsets += d.logprobs.text_offset
    assert (text, tokens, offsets) == (r.text, lp.tokens, lp.text_offset)
    # text_offset in a text whose characters are split across byte tokens: each token's text where its offset says
    # (a token holding part of a character starts where the character does)
    odd = "Ein Café in Köln: 日本語 😀 and"
    r = c.completions.create(prompt=odd, logprobs=0, echo=True, **kw).choices[0]
    ids = tok.encode_prompt(odd) + tok.encode(r.text[len(odd):])
    assert r.text.startswith(odd) and len(r.logprobs.text_offset) >= len(tok.encode_prompt(odd))
    offs = r.logprobs.text_offset
    assert offs == sorted(offs) and offs[0] == 0 and offs[-1] <= len(r.text)     # (an EOS: empty, at the end)
    pieces = [tok.decode([i], skip_special_tokens=True) for i in ids]
    whole = [(o, p) for o, p in zip(offs, pieces) if "\ufffd" not in p]
    assert len(whole) > 10 and all(r.text[o:o + len(p)] == p for o, p in whole)
    split = [o for o, p in zip(offs, pieces) if p == "\ufffd"]
    assert split and all(r.text[o] in "éö日本語😀" for o in split)


def test_tokenizer_routes(server, tok):
    """vLLM's /tokenize, /detokenize and /tokenizer_info (lm-evaluation-harness's remote tokenizer): the ids the
    completion and chat routes would encode, a lossless round trip, the special tokens; errors named; the key
    required."""
    h = {"Authorization": f"Bearer {KEY}"}

    def post(route, body, headers=h):
        return httpx.post(server.url + route, json=body, headers=headers)
    text = "The old house <bos> stood"
    r = post("/tokenize", {"prompt": text}).json()
    assert r["tokens"] == tok.encode_prompt(text) and r["count"] == len(r["tokens"]) and r["max_model_len"] > 0
    assert post("/tokenize", {"model": NAME, "prompt": text, "add_special_tokens": False}).json()["tokens"] == \
        tok.encode(text)
    msgs = [{"role": "user", "content": "Hello"}]
    assert post("/tokenize", {"messages": msgs}).json()["tokens"] == tok.apply_chat_template(
        msgs, add_generation_prompt=True, tokenize=True)
    assert post("/tokenize", {"messages": msgs, "add_generation_prompt": False}).json()["tokens"] == \
        tok.apply_chat_template(msgs, add_generation_prompt=False, tokenize=True)
    ids = tok.encode_prompt(text)
    back = post("/detokenize", {"tokens": ids}).json()["prompt"]
    assert back == tok.decode(ids, skip_special_tokens=False) and tok.encode(back) == ids   # (bos kept: lossless)
    info = httpx.get(server.url + "/tokenizer_info", headers=h).json()
    assert (info["eos_token"], info["bos_token"]) == (tok.eos_token, tok.bos_token) and info["chat_template"]
    for route, body, param in (("/tokenize", {}, "prompt"), ("/tokenize", {"messages": []}, "messages"), ("/tokenize", {"prompt": "a", "messages": msgs}, "prompt"),
                               ("/tokenize", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
                                "messages[0].content[0].type"),
                               ("/tokenize", {"prompt": 5}, "prompt"), ("/tokenize", {"prompt": "a", "model": "x"},
                                                                        "model"),
                               ("/detokenize", {"tokens": [1, 10 ** 6]}, "tokens"), ("/detokenize", {}, "tokens")):
        r = post(route, body)
        assert r.status_code in (400, 404) and r.json()["error"]["param"] == param, (route, body)
    assert post("/tokenize", {"prompt": "a"}, headers={}).status_code == 401
    assert httpx.get(server.url + "/tokenizer_info").status_code == 401


def test_logit_bias_and_penalties(server, tok):
    """logit_bias and presence / frequency penalties reach the engine: +100 on one token makes every token that one;
    penalties are accepted (their definition is tested in test_engine) and a greedy request is repeatable with them."""
    c = client(server)
    word = tok.encode(" river")[0]
    r = c.completions.create(model=NAME, prompt="The road", max_tokens=12, seed=1, logit_bias={str(word): 100},
                             extra_body=FAST)
    assert r.choices[0].text == " river" * 12
    kw = dict(max_tokens=24, temperature=0, presence_penalty=1.5, frequency_penalty=0.5)
    a, b = chat(c, "Tell me a story", **kw), chat(c, "Tell me a story", **kw)
    assert a.choices[0].message.content == b.choices[0].message.content and a.usage.completion_tokens > 0


def test_a_tiny_temperature_is_held_at_the_floor(server):
    """temperature x t_min below MIN_TEMPERATURE (1e-4; a denormal is 0 in fp32, and logits / 0 gave NaN
    log-probabilities, a 500) runs at the floor: finite log-probabilities, the same text for 1e-300 and 1e-6."""
    c = client(server)
    texts = []
    for t in (1e-300, 1e-6):
        r = chat(c, "Say something", seed=6, temperature=t, logprobs=True, top_logprobs=2)
        assert all(math.isfinite(e.logprob) for e in r.choices[0].logprobs.content)
        texts.append(r.choices[0].message.content)
    assert texts[0] == texts[1]


def test_char_offsets_are_exact_and_linear(tok):
    """CharOffsets: each token's offset in the decoded text, in chunks as canvases arrive: where characters split
    across byte tokens (a partial token starts at its character), after a literal U+FFFD, past special tokens; in
    time linear in the tokens (an 8,000-token reply with emoji in 8-token canvases: 0.02 s, where one decode per
    token took 4.3 s); a tokenizer whose decode does more than join bytes falls back to decoding."""
    from dgemma.serve.text import CharOffsets
    text = "a\ufffd b 😀 Köln 日本語. " * 3
    ids = [tok.bos_token_id] + tok.encode(text)

    def whole(ids):              # the definition, in one go: the complete characters of the bytes before each token
        raw = [b"" if tok.is_special(t) else tok.token_bytes(t) for t in ids]
        return [len(b"".join(raw[:i]).decode("utf-8", errors="ignore")) for i in range(len(ids))]
    co = CharOffsets(tok)
    got = [o for k in range(0, len(ids), 5) for o in co.extend(ids[k:k + 5])]
    assert co.exact and got == whole(ids) and tok.decode(ids) == text
    for t, o in zip(ids, got):                          # a token with whole characters: its text is there
        own = tok.decode([t])
        assert "\ufffd" in own or text[o:o + len(own)] == own
    assert got[ids.index(tok.encode(" b")[0])] == 2                              # (after the literal U+FFFD)
    long = tok.encode("A smile 😀 and 日本語 again. " * 600)[:8000]
    t0, co = time.perf_counter(), CharOffsets(tok)
    assert [o for k in range(0, len(long), 8) for o in co.extend(long[k:k + 8])][-1] > 6000 and co.exact
    assert time.perf_counter() - t0 < 0.5               # (measured 0.02 s; one decode per token: 4.3 s)

    class Stripping:                                    # a decoder that drops the text's leading space
        def __getattr__(self, name):
            return getattr(tok, name)

        def decode(self, ids, skip_special_tokens=True):
            return tok.decode(ids, skip_special_tokens=skip_special_tokens).lstrip(" ")
    ids = tok.encode(" Hello there")
    co = CharOffsets(Stripping())
    assert co.extend(ids) == [0] + [len(tok.decode(ids[:i]).lstrip(" ")) for i in range(1, len(ids))]
    assert not co.exact
