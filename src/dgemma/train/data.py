"""Training data: plain text files/folders and JSONL (`text`, or chat `messages`) -> packed token windows.

Knows: file formats, the tokenizer's encode and chat template, packing into sequences of
context + canvases with a `score` mask (which tokens are trained on), the deterministic train/validation
split (by a hash of each document). Does not know: the model or the objective.
"""
from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

TEXT_SUFFIXES = {".txt", ".md", ".text"}


class DataError(ValueError):
    """Unusable training data (one message naming the file)."""


@dataclass
class Example:
    ids: list[int]
    score: list[bool]   # False for prompt tokens (fine-tuning on chats)


def iter_documents(paths: list[str | Path]):
    """Yield ('text', str, where) or ('chat', messages, where) from files and folders (recursively), in sorted
    order; `where` is "file:line" (JSONL) or "file" for error messages."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix in TEXT_SUFFIXES | {".jsonl"})
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"data path {str(p)!r} does not exist")
    if not files:
        raise DataError(f"no .txt/.md/.jsonl files found in {', '.join(map(str, paths))}")
    for f in files:
        if f.suffix == ".jsonl":
            for n, raw in enumerate(f.read_bytes().splitlines(), 1):   # JSON Lines: lines end at \n (or \r\n)
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{f}:{n}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1})") \
                        from None
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{f}:{n}: invalid JSON ({e.msg})") from None
                if isinstance(rec, dict) and isinstance(rec.get("messages"), list):
                    yield "chat", rec["messages"], f"{f}:{n}"
                elif isinstance(rec, dict) and isinstance(rec.get("text"), str):
                    yield "text", rec["text"], f"{f}:{n}"
                else:
                    raise DataError(f"{f}:{n}: each JSONL line needs a 'text' string or a 'messages' list")
        else:
            for para in f.read_text(encoding="utf-8", errors="replace").split("\n\n"):
                if para.strip():
                    yield "text", para.strip(), str(f)


def is_validation(doc: str | list, val_percent: float) -> bool:
    """Deterministic split: a document goes to validation iff crc32(document) % 10000 < val_percent * 100."""
    key = doc if isinstance(doc, str) else json.dumps(doc, sort_keys=True)
    return zlib.crc32(key.encode("utf-8")) % 10000 < val_percent * 100


def encode_documents(paths, tokenizer, val_percent: float = 1.0) -> tuple[list[Example], list[Example]]:
    """Tokenize every document; text gets bos ... eos and is fully scored; chats score only the reply."""
    train, val = [], []
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    for kind, doc, where in iter_documents(paths):
        if kind == "text":
            ids = ([bos] if bos is not None else []) + tokenizer.encode(doc) + ([eos] if eos is not None else [])
            ex = Example(ids, [True] * len(ids))
        else:
            try:
                ex = _chat_example(doc, tokenizer)
            except ValueError as e:                 # DataError, or the tokenizer's TokenizerError
                raise DataError(f"{where}: {e}") from None
        (val if is_validation(doc, val_percent) else train).append(ex)
    return train, val


def _chat_example(doc: list, tokenizer) -> Example:
    """A chat (list of messages): only the last message, the assistant's reply, is scored."""
    if len(doc) < 2 or not all(isinstance(m, dict) for m in doc) or doc[-1].get("role") not in ("assistant", "model"):
        raise DataError("a chat example needs at least two messages ({'role': ..., 'content': ...} objects) and "
                        "must end with the assistant")
    prompt = tokenizer.apply_chat_template(doc[:-1], add_generation_prompt=True, tokenize=True)
    full = tokenizer.apply_chat_template(doc, add_generation_prompt=False, tokenize=True)
    if full[:len(prompt)] != prompt:
        raise DataError("chat template renders the prompt differently inside the full conversation")
    ids = list(full) + ([eos] if (eos := tokenizer.eos_token_id) is not None else [])
    return Example(ids, [False] * len(prompt) + [True] * (len(ids) - len(prompt)))


def pack(examples: list[Example], seq_len: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate examples into one stream and cut it into [N, seq_len] windows (ids, score)."""
    if not examples:
        return torch.zeros(0, seq_len, dtype=torch.long), torch.zeros(0, seq_len, dtype=torch.bool)
    ids = np.fromiter((t for e in examples for t in e.ids), dtype=np.int64)
    score = np.fromiter((s for e in examples for s in e.score), dtype=bool)
    n = max(1, len(ids) // seq_len)
    if len(ids) < n * seq_len:  # too little data for one window: pad (unscored)
        extra = n * seq_len - len(ids)
        ids = np.concatenate([ids, np.full(extra, pad_id)])
        score = np.concatenate([score, np.zeros(extra, dtype=bool)])
    return (torch.from_numpy(ids[: n * seq_len].reshape(n, seq_len)),
            torch.from_numpy(score[: n * seq_len].reshape(n, seq_len)))
