"""Prefix cache: encoder states of prompts the engine has encoded, for reuse by later prompts that start with
the same token ids (a multi-turn chat resends the whole conversation every turn).

Knows: token-id prefixes and one-row `KVCache` snapshots of them, their memory, least-recently-used eviction
under a byte budget, and the one rule that keeps reuse exact: snapshots are taken only at multiples of the
engine's prefill chunk K, because the engine encodes every prompt in chunks aligned to absolute positions
(0..K, K..2K, ...). A request served from a snapshot of its first m*K tokens then runs exactly the encoder calls
the cold request would run from position m*K on, on bit-identical cache contents, so it produces exactly the
cold request's tokens (when the engine encoded each alone: prompt chunks encoded together in one pass agree
with lone ones only up to rounding). (A snapshot can never be cut shorter: the sliding-window layers keep only a
ring of the last W-1 positions, so a snapshot is used whole or not at all; a conversation that diverges in the
middle falls back to the longest snapshot that still matches, e.g. an earlier turn's.)
Does not know: text, chat templates, the model, requests.
"""
from __future__ import annotations

from collections import OrderedDict

from .cache import KVCache


def cache_bytes(cache: KVCache) -> int:
    return sum(t.numel() * t.element_size() for t in cache.tensors())


class PrefixStore:
    """Token-id prefixes (multiples of `chunk`) -> one-row cache snapshots, LRU under `budget_bytes`.
    chunk=1: any length (the engine's inexact mode, for the terminal chat)."""

    def __init__(self, budget_bytes: int, chunk: int) -> None:
        self.budget, self.chunk = int(budget_bytes), int(chunk)
        self.entries: OrderedDict[tuple[int, ...], KVCache] = OrderedDict()
        self.bytes = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self.entries)

    def lookup(self, ids: list[int]) -> tuple[int, KVCache | None]:
        """The longest stored prefix of `ids` -> (its length, its snapshot), or (0, None)."""
        lengths = sorted({len(k) for k in self.entries if len(k) <= len(ids)}, reverse=True)
        for m in lengths:
            key = tuple(ids[:m])
            snap = self.entries.get(key)
            if snap is not None:
                self.entries.move_to_end(key)
                return m, snap
        return 0, None

    def insert(self, ids: list[int], snap: KVCache) -> bool:
        """Keep `snap` (the encoder state of exactly `ids`, a multiple of `chunk` long). Returns whether kept."""
        if not ids or len(ids) % self.chunk or snap.lengths[0] != len(ids):
            raise ValueError("a prefix snapshot must hold exactly its ids, a multiple of the chunk size")
        key, size = tuple(ids), cache_bytes(snap)
        if key in self.entries:
            self.entries.move_to_end(key)
            return True
        if size > self.budget:
            return False
        while self.bytes + size > self.budget:
            _, old = self.entries.popitem(last=False)
            self.bytes -= cache_bytes(old)
            self.evictions += 1
        self.entries[key] = snap
        self.bytes += size
        return True
