"""Preallocated encoder KV cache.

Knows: where each layer's keys/values live, which slots are valid (padding), the positions the slots
hold, and the attention masks that follow from them. Sliding layers keep a ring of the last W-1
positions; full layers keep every position up to a capacity that grows on demand. Every layer buffer
has `canvas_length` scratch slots behind the cached part: the denoiser writes the canvas K/V there, so
a denoising step attends over one contiguous slice and allocates nothing.
Does not know: weights, the sampler, or text.
"""
from __future__ import annotations

import torch

from .config import ModelConfig


class KVCache:
    def __init__(self, cfg: ModelConfig, batch: int, capacity: int, device: torch.device | str,
                 dtype: torch.dtype, scratch: int | None = None) -> None:
        self.cfg, self.batch, self.device, self.dtype = cfg, batch, torch.device(device), dtype
        self.ring = cfg.sliding_window - 1          # sliding layers keep the last W-1 positions
        self.scratch = scratch or cfg.canvas_length   # room for one canvas
        self.capacity = max(int(capacity), 1)       # full-layer positions we can hold before growing
        self.length = 0                             # positions encoded so far (same for every row)
        self.has_padding = False
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        for i in range(cfg.num_hidden_layers):
            slots = (self.ring if cfg.is_sliding(i) else self.capacity) + self.scratch
            shape = (batch, cfg.layer_kv_heads(i), slots, cfg.layer_head_dim(i))
            self.k.append(torch.zeros(shape, device=self.device, dtype=dtype))
            self.v.append(torch.zeros(shape, device=self.device, dtype=dtype))
        # per-slot metadata, shared by all layers of a kind; positions are the same for every row
        self.ring_pos = torch.full((self.ring,), -1, dtype=torch.long, device=self.device)   # [ring]
        self.ring_valid = torch.zeros(batch, self.ring, dtype=torch.bool, device=self.device)  # [B, ring]
        self.full_valid = torch.zeros(batch, self.capacity, dtype=torch.bool, device=self.device)  # [B, cap]
        self._plan: dict = {}

    # ---- capacity / batch surgery ------------------------------------------------------------
    def reserve(self, total_positions: int) -> None:
        """Make room for `total_positions` encoded positions on full layers (amortised doubling)."""
        if total_positions <= self.capacity:
            return
        new_cap = max(total_positions, 2 * self.capacity)
        for i in range(self.cfg.num_hidden_layers):
            if self.cfg.is_sliding(i):
                continue
            for buf in (self.k, self.v):
                old = buf[i]
                new = old.new_zeros(old.shape[0], old.shape[1], new_cap + self.scratch, old.shape[3])
                new[:, :, : self.length] = old[:, :, : self.length]
                buf[i] = new
        fv = self.full_valid.new_zeros(self.batch, new_cap)
        fv[:, : self.length] = self.full_valid[:, : self.length]
        self.full_valid, self.capacity = fv, new_cap

    def select_rows(self, rows: torch.Tensor) -> "KVCache":
        """Keep only `rows` (a LongTensor of row indices), in place; returns self."""
        self.k = [t.index_select(0, rows) for t in self.k]
        self.v = [t.index_select(0, rows) for t in self.v]
        self.ring_valid = self.ring_valid.index_select(0, rows)
        self.full_valid = self.full_valid.index_select(0, rows)
        self.batch = int(rows.numel())
        self._update_padding_flag()
        return self

    def _update_padding_flag(self) -> None:
        n = min(self.length, self.ring)
        self.has_padding = bool((~self.full_valid[:, : self.length]).any() or (~self.ring_valid[:, :n]).any())

    # ---- encoder pass: causal, writes ----------------------------------------------------------
    def begin_encode(self, n_new: int, valid: torch.Tensor | None) -> None:
        """Prepare masks for encoding `n_new` positions; valid: [B, n_new] bool (False = padding)."""
        c, W = self.length, self.cfg.sliding_window
        self.reserve(c + n_new)
        dev = self.device
        if valid is None:
            valid = torch.ones(self.batch, n_new, dtype=torch.bool, device=dev)
        valid = valid.to(dev, torch.bool)
        qpos = torch.arange(c, c + n_new, device=dev)                                   # [S]
        n_ring = min(c, self.ring)
        kpos_s = torch.cat([self.ring_pos[:n_ring], qpos])                              # [n_ring+S]
        kval_s = torch.cat([self.ring_valid[:, :n_ring], valid], dim=1)                 # [B, n_ring+S]
        m_s = (kpos_s[None, :] <= qpos[:, None]) & (kpos_s[None, :] > qpos[:, None] - W)  # [S, n_ring+S]
        m_s = m_s[None] & kval_s[:, None, :]                                            # [B, S, n_ring+S]
        kpos_f = torch.arange(c + n_new, device=dev)
        kval_f = torch.cat([self.full_valid[:, :c], valid], dim=1)                      # [B, c+S]
        m_f = (kpos_f[None, :] <= qpos[:, None])[None] & kval_f[:, None, :]             # [B, S, c+S]
        self._plan = {"n_new": n_new, "valid": valid, "n_ring": n_ring,
                      "mask_s": m_s[:, None], "mask_f": m_f[:, None]}

    def encode_layer(self, i: int, k: torch.Tensor, v: torch.Tensor):
        """k, v: [B, Hkv, S, D] for the new positions -> (keys, values, mask [B,1,S,L]) to attend over."""
        p, c = self._plan, self.length
        S = p["n_new"]
        if self.cfg.is_sliding(i):
            n_ring = p["n_ring"]
            keys = torch.cat([self.k[i][:, :, :n_ring], k], dim=2)
            vals = torch.cat([self.v[i][:, :, :n_ring], v], dim=2)
            keep = min(S, self.ring)                    # only the last W-1 new positions survive
            slots = torch.arange(c + S - keep, c + S, device=self.device) % self.ring
            self.k[i][:, :, slots] = k[:, :, S - keep:]
            self.v[i][:, :, slots] = v[:, :, S - keep:]
            return keys, vals, p["mask_s"]
        self.k[i][:, :, c:c + S] = k
        self.v[i][:, :, c:c + S] = v
        return self.k[i][:, :, :c + S], self.v[i][:, :, :c + S], p["mask_f"]

    def end_encode(self) -> None:
        p, c = self._plan, self.length
        S = p["n_new"]
        keep = min(S, self.ring)
        new_pos = torch.arange(c + S - keep, c + S, device=self.device)
        slots = new_pos % self.ring
        self.ring_pos[slots] = new_pos
        self.ring_valid[:, slots] = p["valid"][:, S - keep:]
        self.full_valid[:, c:c + S] = p["valid"]
        self.length = c + S
        self.has_padding = self.has_padding or not bool(p["valid"].all())
        self._plan = {}

    # ---- denoiser pass: bidirectional, reads -------------------------------------------------
    def decode_masks(self, n_canvas: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Key-padding masks [B,1,1,L] for (sliding, full) layers, or None when nothing is padded."""
        if not self.has_padding:
            return None, None
        n_ring, c = min(self.length, self.ring), self.length
        ones = torch.ones(self.batch, n_canvas, dtype=torch.bool, device=self.device)
        m_s = torch.cat([self.ring_valid[:, :n_ring], ones], 1)[:, None, None]
        m_f = torch.cat([self.full_valid[:, :c], ones], 1)[:, None, None]
        return m_s, m_f

    def decode_layer(self, i: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the canvas K/V (k, v: [B, Hkv, C, D]) into scratch; return [cache ; canvas] keys and values."""
        off = min(self.length, self.ring) if self.cfg.is_sliding(i) else self.length
        n = k.shape[2]
        if n > self.scratch:
            raise ValueError(f"canvas of {n} tokens does not fit the cache's {self.scratch} scratch slots")
        self.k[i][:, :, off:off + n] = k
        self.v[i][:, :, off:off + n] = v
        return self.k[i][:, :, :off + n], self.v[i][:, :, :off + n]
