"""Committed token ids -> text deltas for one reply: incremental detokenizing and stop strings; frames as JSON.

Knows: that a byte-level tokenizer may end a canvas in the middle of a UTF-8 character (held back until its other
bytes arrive), that a stop string may straddle two canvases (text that could begin one is held back), and
where the reply ends when a stop string appears (before it). Decoding always starts from the reply's first
token, so word pieces are never split or repeated.
Does not know: the engine, HTTP, the chat template.
"""
from __future__ import annotations

import bisect
import codecs


class TextStream:
    def __init__(self, tokenizer, stops: list[str]) -> None:
        self.tok, self.stops = tokenizer, stops
        self.offsets = CharOffsets(tokenizer)   # (covered's: the decoded length after each token, kept up by it)
        self.ids: list[int] = []
        self.text = ""          # everything sent so far
        self.stopped = False    # a stop string was found: the reply ends here
        self.used = 0           # tokens up to the stop string (the fewest whose text reaches it), once stopped

    def push(self, ids: list[int], final: bool = False) -> str:
        """Add committed ids; returns the new text that is safe to send (may be empty)."""
        if self.stopped:
            return ""
        self.ids += ids
        full = self.tok.decode(self.ids, skip_special_tokens=True)
        if not final:
            full = full.rstrip("\ufffd")           # a character split across canvases: wait for its bytes
        start = max(0, len(self.text) - max((len(s) for s in self.stops), default=0))
        hits = [i for i in (full.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            end, self.stopped = min(hits), True
            lo, hi = 0, len(self.ids)                  # fewest tokens whose text reaches the stop string
            while lo < hi:
                mid = (lo + hi) // 2
                if len(self.tok.decode(self.ids[:mid], skip_special_tokens=True)) >= end:
                    hi = mid
                else:
                    lo = mid + 1
            self.used = lo
        elif final:
            end = len(full)
        else:                                      # hold back a tail that may be the start of a stop string
            end = len(full) - max((k for s in self.stops for k in range(1, len(s))
                                   if full.endswith(s[:k])), default=0)
        if not full.startswith(self.text):         # a decoder that rewrote earlier text: send only what is new
            common = 0
            while common < min(len(full), len(self.text)) and full[common] == self.text[common]:
                common += 1
            self.text = self.text[:common]
        new = full[len(self.text):max(end, len(self.text))]
        self.text += new
        return new

    def covered(self) -> int:
        """How many of the ids pushed so far have all their text sent (`used` once stopped): the most m whose
        decoded prefix ids[:m] fits in the text sent."""
        if self.stopped:
            return self.used
        if self.offsets.exact:                     # (else it would decode per token: decode below instead)
            self.offsets.extend(self.ids[len(self.offsets.ids):])
        if self.offsets.exact:                     # the decoded lengths are known: no decoding here
            return bisect.bisect_right(self.offsets.after, len(self.text))
        lo, hi = 0, len(self.ids)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if len(self.tok.decode(self.ids[:mid], skip_special_tokens=True)) <= len(self.text):   # (U+FFFD: 1)
                lo = mid
            else:
                hi = mid - 1
        return lo


def token_text(tokenizer, pieces: dict[int, str], token: int, shown: bool = False) -> str:
    """One token's own text, special tokens included, through `pieces` (a cache of id -> text kept by the caller);
    shown: as a reply's text shows it (special tokens empty; cached under ~id)."""
    key = ~token if shown else token
    if key not in pieces:
        pieces[key] = tokenizer.decode([token], skip_special_tokens=shown)
    return pieces[key]


class CharOffsets:
    """Where each token's text starts in the text of a token sequence (decoded with special tokens skipped, as a
    reply's text is), kept as tokens arrive, in time linear in the tokens: each token's bytes go through an
    incremental UTF-8 decoder, so a token holding part of a character starts where the character does. Each call
    checks its new text against the tokenizer's own decode of the tokens from the last boundary between whole
    characters (all of them the first time); where they differ (a decoder that does more than join bytes), each
    token from then on gets the length of the decoded text before it, less a trailing part of a character (one
    decode per token)."""

    def __init__(self, tokenizer) -> None:
        self.tok, self.ids, self.parts, self.chars = tokenizer, [], [], 0
        self.after: list[int] = []             # (while exact) the decoded length of the tokens up to each one
        #                                        (a part of a character counting 1, as U+FFFD)
        self.dec = codecs.getincrementaldecoder("utf-8")("replace")
        self.safe = 0                          # a token index where no character was left part-way
        self.exact = True                      # the bytes have decoded to the tokenizer's text so far

    def extend(self, ids: list[int]) -> list[int]:
        """The offsets of `ids`, the sequence's next tokens."""
        start, out = len(self.ids), []
        self.ids += ids
        if self.exact:
            safe = self.safe
            for i, t in enumerate(ids, start):
                raw = b"" if self.tok.is_special(t) else self.tok.token_bytes(t)
                out.append(self.chars)
                text = self.dec.decode(raw or b"")
                self.parts.append(text)
                self.chars += len(text)
                pending = bool(self.dec.getstate()[0])
                self.after.append(self.chars + pending)
                if not pending:
                    safe = i + 1
            pending = codecs.getincrementaldecoder("utf-8")("replace")
            pending.setstate(self.dec.getstate())
            self.exact = "".join(self.parts[self.safe:]) + pending.decode(b"", final=True) == \
                self.tok.decode(self.ids[self.safe:], skip_special_tokens=True)
            if self.exact:
                self.safe = safe
                return out
        return [len(self.tok.decode(self.ids[:i], skip_special_tokens=True).rstrip("\ufffd"))
                for i in range(start, len(self.ids))]


def frame_json(frame, tokenizer, pieces: dict[int, str]) -> dict:
    """An engine `Frame` as the JSON the server streams and the terminal chat draws: token ids plus each one's
    text (`token_text`), states, entropies (4 decimals)."""
    return {"canvas": frame.canvas, "step": frame.step, "final": frame.final, "tokens": frame.tokens,
            "pieces": [token_text(tokenizer, pieces, t) for t in frame.tokens], "state": frame.state,
            "entropy": [round(e, 4) for e in frame.entropy], "accepted": frame.accepted,
            "mean_entropy": round(frame.mean_entropy, 4)}
