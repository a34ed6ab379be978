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
import math
import re
import uuid
from typing import Any

START, END, QUOTE = "<|tool_call>", "<tool_call|>", '<|"|>'
NAME = r"[A-Za-z0-9_.\-]{1,64}"              # a function's name, in a declaration or a call
THINK, THOUGHT_END, LABEL = "<|channel>", "<channel|>", "thought\n"
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


MAX_DEPTH = 64                               # nesting of {...} / [...] in a call's arguments


def parse_call(text: str, quote: str = QUOTE) -> tuple[str, dict]:
    """`call:NAME{...}` (the text between the marks, strings between `quote`s) -> (NAME, arguments); ArgumentError
    if it is not one call (also nested deeper than MAX_DEPTH, or a number Python will not read)."""
    m = re.match(rf"\s*call:({NAME})\s*\{{", text)
    if not m:
        raise ArgumentError("not call:NAME{...}")
    p = _Parser(text, quote)
    args, i = p.object(m.end(), 1)
    if text[i:].strip():
        raise ArgumentError(f"text after the arguments: {text[i:i + 20]!r}")
    return m.group(1), args


class _Parser:
    """Gemma 4's argument grammar over one text, by recursive descent (depth bounded)."""

    def __init__(self, s: str, quote: str) -> None:
        self.s, self.q = s, quote

    def space(self, i: int) -> int:
        while i < len(self.s) and self.s[i] in " \t\r\n":
            i += 1
        return i

    def quoted(self, i: int) -> tuple[str, int]:
        end = self.s.find(self.q, i + len(self.q))
        if end < 0:
            raise ArgumentError("a string without its closing mark")
        return self.s[i + len(self.q):end], end + len(self.q)

    def word(self, i: int) -> tuple[str, int]:
        """A bare key or value from s[i]: up to a mark, a quote or white space's end; (it stripped, its end)."""
        j = i
        while j < len(self.s) and self.s[j] not in ",:{}[]" and not self.s.startswith(self.q, j):
            j += 1
        return self.s[i:j].strip(), j

    def more(self, i: int, close: str) -> tuple[bool, int]:
        """After a member or an element: (whether another follows, the index after the ',' or the `close`)."""
        i = self.space(i)
        if self.s.startswith(",", i):
            return True, i + 1
        if self.s.startswith(close, i):
            return False, i + 1
        raise ArgumentError(f"',' or {close!r} was expected at {self.s[i:i + 20]!r}")

    def object(self, i: int, depth: int) -> tuple[dict, int]:
        """Members after an opening `{` at s[i - 1] up to its `}`; (the dict, the index after `}`)."""
        s, out = self.s, {}
        i = self.space(i)
        if s.startswith("}", i):
            return out, i + 1
        again = True
        while again:
            i = self.space(i)
            if s.startswith(self.q, i):
                key, i = self.quoted(i)
            else:
                key, i = self.word(i)
                if not key:
                    raise ArgumentError(f"a key was expected at {s[i:i + 20]!r}")
            i = self.space(i)
            if not s.startswith(":", i):
                raise ArgumentError(f"':' was expected after {key!r}")
            out[key], i = self.value(i + 1, depth)
            again, i = self.more(i, "}")
        return out, i

    def array(self, i: int, depth: int) -> tuple[list, int]:
        out: list[Any] = []
        i = self.space(i)
        if self.s.startswith("]", i):
            return out, i + 1
        again = True
        while again:
            v, i = self.value(i, depth)
            out.append(v)
            again, i = self.more(i, "]")
        return out, i

    def value(self, i: int, depth: int) -> tuple[Any, int]:
        s = self.s
        i = self.space(i)
        if s.startswith(self.q, i):
            return self.quoted(i)
        if s.startswith("{", i) or s.startswith("[", i):
            if depth >= MAX_DEPTH:
                raise ArgumentError(f"arguments nested deeper than {MAX_DEPTH}")
            return (self.object if s[i] == "{" else self.array)(i + 1, depth + 1)
        word, j = self.word(i)
        if not word:
            raise ArgumentError(f"a value was expected at {s[i:i + 20]!r}")
        if word in ("true", "false", "null"):
            return {"true": True, "false": False, "null": None}[word], j
        if _NUMBER.fullmatch(word):
            try:
                number = int(word) if word.lstrip("-").isdigit() else float(word)
            except ValueError:                        # (more digits than Python reads)
                raise ArgumentError(f"a number too long to read: {word[:20]}...") from None
            if math.isfinite(number):
                return number, j
        return word, j                   # a bare word (or a number past fp64): taken as the string it spells


class CallReader:
    """One reply's token ids -> its content ids (those before the first `<|tool_call>`) and its calls, as the
    canvases commit. The reply may begin with forced ids (`forced_text`, encoded), which are the prompt's, not
    the reply's. A call that does not parse, an unfinished one, and other text after the first call are not lost:
    `leftover` gives their text back (the call marks spelled out, other special tokens left out) to show as
    content. With parallel=False the reader stops at the first call: the rest of the reply is dropped."""

    def __init__(self, tok, forced: list[int] | None = None, parallel: bool = True) -> None:
        self.tok, self.parallel = tok, parallel
        self.start, self.end, self.quote = (tok.token_to_id(m) for m in (START, END, QUOTE))
        self.ids: list[int] = []
        self.first: int | None = None      # index of the first <|tool_call> in ids
        self.scanned = 0                   # (once first is known) ids before this are sorted: calls or rest
        self.calls: list[dict] = []
        self.rest: list[list[int]] = []    # after the first call: runs of ids that are not parsed calls
        self.push(list(forced or []))

    def push(self, ids: list[int]) -> tuple[list[int], list[int]]:
        """Add committed ids; returns (the new content ids, the calls completed by them)."""
        at = len(self.ids)
        self.ids += ids
        if self.first is not None:
            return [], self._scan()
        if self.start not in ids:
            return ids, []
        self.first = self.scanned = at + ids.index(self.start)
        return ids[:self.first - at], self._scan()

    def _text(self, ids: list[int], marks: dict[int, str]) -> str:
        """ids decoded with special tokens left out, but each of `marks` (id -> text) written as given."""
        out, run = [], []
        for t in ids + [None]:
            if t is None or t in marks:
                out.append(self.tok.decode(run, skip_special_tokens=True))
                out.append("" if t is None else marks[t])
                run = []
            else:
                run.append(t)
        return "".join(out)

    def _scan(self) -> list[dict]:
        new = []
        while self.first is not None and (self.parallel or not self.calls):
            try:
                s = self.ids.index(self.start, self.scanned)
            except ValueError:
                break
            if s > self.scanned:                          # text between calls
                self.rest.append(self.ids[self.scanned:s])
                self.scanned = s
            try:
                e = self.ids.index(self.end, s + 1)
            except ValueError:
                break                                     # unfinished: wait for more ids (or leftover)
            try:                                          # (a <|"|> token, not its spelling, quotes a string)
                name, args = parse_call(self._text(self.ids[s + 1:e], {self.quote: "\x00"}), quote="\x00")
            except ArgumentError:
                self.rest.append(self.ids[s:e + 1])
            else:
                call = {"index": len(self.calls), "id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                        "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}
                self.calls.append(call)
                new.append(call)
            self.scanned = e + 1
        return new

    def leftover(self) -> str:
        """The reply's text after its first call that is not a parsed call (call marks spelled out, other special
        tokens left out); "" if that is only white space, or with parallel=False once a call was read."""
        if self.first is None or not self.parallel and self.calls:
            return ""
        marks = {self.start: START, self.end: END, self.quote: QUOTE}
        text = "".join(self._text(ids, marks) for ids in self.rest + [self.ids[self.scanned:]])
        return text if text.strip() else ""


def as_template_call(call: dict) -> dict:
    """An OpenAI tool call (ours or a client's, `arguments` a JSON string of an object) as chat templates take it
    (arguments a dict); ArgumentError if the arguments are not a JSON object."""
    fn = call["function"]
    try:
        args = json.loads(fn["arguments"])
    except json.JSONDecodeError as e:
        raise ArgumentError(f"arguments are not JSON ({e.msg})") from None
    except (ValueError, RecursionError) as e:      # (a number of more digits than Python reads; deep nesting)
        raise ArgumentError(f"arguments cannot be read ({type(e).__name__})") from None
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
