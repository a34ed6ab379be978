"""Gemma 4's markup in a reply, read back from its token ids: the thinking channel (OpenAI-style
`reasoning_content`) and tool calls (OpenAI's `tool_calls`); whether a checkpoint can take tools; the text that
forces a call.

Knows: that Gemma 4 thinks in `<|channel>thought\n...<channel|>` before it answers (with the chat template's
`enable_thinking`); how it writes a call, `<|tool_call>call:NAME{key:value,...}<tool_call|>`, with strings between
`<|"|>` marks, bare numbers / true / false / null, and nested `{...}` / `[...]`; that all these marks are single
special tokens, so they are found by token id and text a user typed can never pass for one; OpenAI's tool_calls
shape (`arguments` a JSON string).
Does not know: HTTP, the engine, how a declaration or a tool's result is rendered (the checkpoint's chat template
does that, from the `tools` and messages it is given).
"""
from __future__ import annotations

import json
import re
import uuid
from typing import Any

START, END, QUOTE = "<|tool_call>", "<tool_call|>", '<|"|>'
THINK, THOUGHT_END, LABEL = "<|channel>", "<channel|>", "thought\n"
NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_NUMBER = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")


def unsupported(tok) -> str | None:
    """Why this tokenizer cannot take tools (None: it can): it needs the call marks as tokens and a chat template
    that reads `tools`."""
    missing = [m for m in (START, END, QUOTE) if tok.token_to_id(m) is None]
    if missing:
        return f"this model's tokenizer has no {' / '.join(missing)} token, so it cannot write tool calls"
    if tok.chat_template is None or "tool" not in tok.chat_template:
        return "this model's chat template does not render tools"
    return None


def forced_text(choice: Any) -> str:
    """The text a reply is made to start with for OpenAI's tool_choice: "required" opens a call, a named function
    opens a call of it (the model writes the rest: arguments are not held to the schema); "" otherwise."""
    if choice == "required":
        return START + "call:"
    if isinstance(choice, str) or choice is None:
        return ""
    return START + "call:" + choice.function.name + "{"


class ArgumentError(ValueError):
    pass


def parse_call(text: str) -> tuple[str, dict]:
    """`call:NAME{...}` (the text between the marks, `<|"|>` included) -> (NAME, arguments); ArgumentError if it
    is not one call."""
    m = re.match(r"\s*call:([A-Za-z0-9_.\-]{1,64})\s*\{", text)
    if not m:
        raise ArgumentError("not call:NAME{...}")
    args, i = _object(text, m.end())
    if text[i:].strip():
        raise ArgumentError(f"text after the arguments: {text[i:i + 20]!r}")
    return m.group(1), args


def _space(s: str, i: int) -> int:
    while i < len(s) and s[i] in " \t\r\n":
        i += 1
    return i


def _quoted(s: str, i: int) -> tuple[str, int]:
    end = s.find(QUOTE, i + len(QUOTE))
    if end < 0:
        raise ArgumentError("a string without its closing mark")
    return s[i + len(QUOTE):end], end + len(QUOTE)


def _object(s: str, i: int) -> tuple[dict, int]:
    """Members after an opening `{` at s[i - 1] up to its `}`; (the dict, the index after `}`)."""
    out: dict[str, Any] = {}
    i = _space(s, i)
    if s.startswith("}", i):
        return out, i + 1
    while True:
        i = _space(s, i)
        if s.startswith(QUOTE, i):
            key, i = _quoted(s, i)
        else:
            j = i
            while j < len(s) and s[j] not in ':{}[],' and not s.startswith(QUOTE, j):
                j += 1
            key, i = s[i:j].strip(), j
            if not key:
                raise ArgumentError(f"a key was expected at {s[i:i + 20]!r}")
        i = _space(s, i)
        if not s.startswith(":", i):
            raise ArgumentError(f"':' was expected after {key!r}")
        out[key], i = _value(s, i + 1)
        i = _space(s, i)
        if s.startswith(",", i):
            i += 1
        elif s.startswith("}", i):
            return out, i + 1
        else:
            raise ArgumentError(f"',' or '}}' was expected at {s[i:i + 20]!r}")


def _array(s: str, i: int) -> tuple[list, int]:
    out: list[Any] = []
    i = _space(s, i)
    if s.startswith("]", i):
        return out, i + 1
    while True:
        v, i = _value(s, i)
        out.append(v)
        i = _space(s, i)
        if s.startswith(",", i):
            i += 1
        elif s.startswith("]", i):
            return out, i + 1
        else:
            raise ArgumentError(f"',' or ']' was expected at {s[i:i + 20]!r}")


def _value(s: str, i: int) -> tuple[Any, int]:
    i = _space(s, i)
    if s.startswith(QUOTE, i):
        return _quoted(s, i)
    if s.startswith("{", i):
        return _object(s, i + 1)
    if s.startswith("[", i):
        return _array(s, i + 1)
    j = i
    while j < len(s) and s[j] not in ",}]:{[" and not s.startswith(QUOTE, j):
        j += 1
    word = s[i:j].strip()
    if not word:
        raise ArgumentError(f"a value was expected at {s[i:i + 20]!r}")
    if word in ("true", "false", "null"):
        return {"true": True, "false": False, "null": None}[word], j
    if _NUMBER.fullmatch(word):
        return (int(word) if word.lstrip("-").isdigit() else float(word)), j
    return word, j                                  # a bare word: taken as the string it spells


class CallReader:
    """One reply's token ids -> its content ids (those before the first `<|tool_call>`) and its calls, as the
    canvases commit. The reply may begin with forced ids (`forced_text`, encoded), which are the prompt's, not
    the reply's. A call that does not parse, an unfinished one, and text after the first call are not lost:
    `leftover` gives their text back (the calls' marks spelled out) to show as content."""

    def __init__(self, tok, forced: list[int] | None = None, parallel: bool = True) -> None:
        self.tok, self.parallel = tok, parallel
        self.start, self.end = tok.token_to_id(START), tok.token_to_id(END)
        self.ids: list[int] = []
        self.first: int | None = None      # index of the first <|tool_call> in ids
        self.scanned = 0                   # (once first is known) ids before this are sorted: calls or rest
        self.calls: list[dict] = []
        self.rest: list[tuple[list[int], bool]] = []     # after the first call: (ids, an unparsed call?)
        self.push(list(forced or []))

    def push(self, ids: list[int]) -> tuple[list[int], list[dict]]:
        """Add committed ids; returns (the new content ids, the calls completed by them)."""
        at = len(self.ids)
        self.ids += ids
        if self.first is not None:
            return [], self._scan()
        if self.start not in ids:
            return ids, []
        self.first = self.scanned = at + ids.index(self.start)
        return ids[:self.first - at], self._scan()

    def _scan(self) -> list[dict]:
        new = []
        while self.first is not None:
            try:
                s = self.ids.index(self.start, self.scanned)
            except ValueError:
                break
            if s > self.scanned:                          # text between calls
                self.rest.append((self.ids[self.scanned:s], False))
                self.scanned = s
            try:
                e = self.ids.index(self.end, s + 1)
            except ValueError:
                break                                     # unfinished: wait for more ids (or leftover)
            body = self.tok.decode(self.ids[s + 1:e], skip_special_tokens=False)
            try:
                name, args = parse_call(body)
            except ArgumentError:
                self.rest.append((self.ids[s:e + 1], True))
            else:
                if self.parallel or not self.calls:
                    call = {"index": len(self.calls), "id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                            "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}
                    self.calls.append(call)
                    new.append(call)
            self.scanned = e + 1
        return new

    def leftover(self) -> str:
        """The reply's text after its first call that is not a parsed call: unparsed and unfinished calls with
        their marks, other text without special tokens; "" if that is only white space."""
        if self.first is None:
            return ""
        parts = [self.tok.decode(ids, skip_special_tokens=not raw) for ids, raw in self.rest]
        tail = self.ids[self.scanned:]
        if tail:
            raw = tail[0] == self.start
            parts.append(self.tok.decode(tail, skip_special_tokens=not raw))
        text = "".join(parts)
        return text if text.strip() else ""


def as_template_call(call: dict) -> dict:
    """An OpenAI tool call (ours or a client's, `arguments` a JSON string of an object) as chat templates take it
    (arguments a dict); ArgumentError if the arguments are not a JSON object."""
    fn = call["function"]
    try:
        args = json.loads(fn["arguments"])
    except json.JSONDecodeError as e:
        raise ArgumentError(f"arguments are not JSON ({e.msg})") from None
    if not isinstance(args, dict):
        raise ArgumentError("arguments must be a JSON object")
    return {"id": call["id"], "type": "function", "function": {"name": fn["name"], "arguments": args}}


class ThoughtReader:
    """Splits a reply's token ids into its thinking (the ids inside `<|channel>` ... `<channel|>`, marks left out)
    and the rest, as the canvases commit; `shown` gives the thinking's text (decoded by the caller) as shown,
    less the channel's `thought` label. None from `make` for a tokenizer without the channel marks."""

    def __init__(self, start: int, end: int) -> None:
        self.start, self.end = start, end
        self.inside = False

    @classmethod
    def make(cls, tok) -> "ThoughtReader | None":
        start, end = tok.token_to_id(THINK), tok.token_to_id(THOUGHT_END)
        return None if start is None or end is None else cls(start, end)

    def push(self, ids: list[int]) -> tuple[list[int], list[int]]:
        """(the thinking ids, where in `ids` the other ids are) of the next committed ids."""
        thought, rest = [], []
        for i, t in enumerate(ids):
            if t == self.start and not self.inside:
                self.inside = True
            elif t == self.end:
                self.inside = False
            elif self.inside:
                thought.append(t)
            else:
                rest.append(i)
        return thought, rest

    @staticmethod
    def shown(text: str, final: bool) -> str:
        """The thinking's text as shown: without the leading label; "" while the text so far could still be the
        start of it (unless final)."""
        if text.startswith(LABEL):
            return text[len(LABEL):]
        return "" if LABEL.startswith(text) and not final else text
