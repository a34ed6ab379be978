"""Helpers for in-process server tests: a tokenizer with Gemma 4's reply marks (special tokens) and a chat template
in Gemma 4's style that takes tools, and a scripted worker that commits chosen token ids (no model here can be made
to write a tool call or think), with the app around them."""
from __future__ import annotations

import shutil
import threading
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import openai
from fastapi.testclient import TestClient
from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer

import dgemma
from dgemma.engine import CanvasEvent, Result
from dgemma.serve.app import Metrics, ServeConfig, State, create_app
from dgemma.serve.markup import END, QUOTE, START, THINK, THOUGHT_END
from dgemma.tokenizer import Tokenizer

RESPONSE = "<|tool_response>"
# a test template in Gemma 4's style: declarations in a system turn, calls after the model's text, results as
# tool_response blocks (arguments through tojson here: the reader only has to read what a model writes)
TEMPLATE = (
    "{{ bos_token }}{% if enable_thinking %}<|think|>{% endif %}"
    "{% if tools %}<start_of_turn>system\n{% for t in tools %}<|tool>declaration:"
    "{{ t['function']['name'] }}{description:<|\"|>{{ t['function'].get('description', '') }}<|\"|>}<tool|>"
    "{% endfor %}<end_of_turn>\n{% endif %}"
    "{% for m in messages %}{% if m['role'] == 'tool' %}<|tool_response>response:{{ m['name'] }}"
    "{value:<|\"|>{{ m['content'] }}<|\"|>}<tool_response|>"
    "{% else %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] or '' }}"
    "{% for c in m.get('tool_calls') or [] %}<|tool_call>call:{{ c['function']['name'] }}{{ '{' }}"
    "{% for k, v in c['function']['arguments'] | dictsort %}{{ k }}:{{ v | tojson }}{% if not loop.last %},"
    "{% endif %}{% endfor %}}<tool_call|>{% endfor %}<end_of_turn>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")

def tool_tokenizer(d: Path) -> Tokenizer:
    """The shipped model's tokenizer plus Gemma 4's marks (special tokens) and TEMPLATE, saved in `d`."""
    src = Path(dgemma.default_model_path())
    hf = HFTokenizer.from_file(str(src / "tokenizer.json"))
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t in (START, END, QUOTE, RESPONSE, THINK, THOUGHT_END)])
    hf.save(str(d / "tokenizer.json"))
    shutil.copy(src / "tokenizer_config.json", d)
    (d / "chat_template.jinja").write_text(TEMPLATE)
    return Tokenizer.from_dir(d)


class ScriptedWorker:
    """Takes the place of serve.worker.Worker: each request commits `script` (token ids) in canvases of 8, then
    ends with EOS; it records the prompts and the warmed ids."""

    def __init__(self) -> None:
        self.script: list[int] = []
        self.prompts: list[list[int]] = []
        self.warmed: list[list[int]] = []
        self.waiting = 0
        self.finish = "eos"                 # how each request ends ("length": cut at its token limit)
        self.canvas = 8                     # tokens per committed canvas

    def submit_all(self, requests, limit=None) -> bool:
        for rid, prompt, sink, kwargs in requests:
            self.prompts.append(list(prompt))
            threading.Thread(target=self._play, args=(rid, prompt, sink), daemon=True).start()
        return True

    def _play(self, rid, prompt, sink) -> None:
        ids, c = self.script, self.canvas
        for i in range(0, len(ids), c):
            last, part = i + c >= len(ids), ids[i:i + c]
            sink("canvas", CanvasEvent(rid, part, last, self.finish if last else None, passes=i // c + 1,
                                       logprobs=[-0.5] * len(part), top_logprobs=[[]] * len(part)))
        sink("done", Result(rid, list(prompt), list(ids), self.finish, len(ids) // c + 1, float(c)))

    def cancel(self, rid) -> None:
        pass

    def alive(self) -> bool:
        return True

    def warm(self, ids) -> None:
        self.warmed.append(list(ids))


@contextmanager
def scripted_app(tool_tok):
    """(the app's State, an openai client talking to the app in this process); a context manager."""
    cfg = SimpleNamespace(canvas_length=8, max_position_embeddings=4096, vocab_size=tool_tok.vocab_size)
    sampler = SimpleNamespace(max_new_tokens=64, t_min=0.4, t_max=0.8)
    st = State(ServeConfig("unused", "m"), ready=True, tok=tool_tok, metrics=Metrics(), worker=ScriptedWorker(),
               model=SimpleNamespace(config=cfg, sampler_config=sampler),
               engine=SimpleNamespace(settings=lambda **kw: None), chat_eos=[tool_tok.token_to_id(RESPONSE)])
    with TestClient(create_app(st), raise_server_exceptions=False) as http:    # (a 500, as a client sees it)
        yield st, openai.OpenAI(base_url="http://testserver/v1", api_key="none", http_client=http, max_retries=0)


