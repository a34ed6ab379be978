"""Preallocated encoder KV cache.

Knows: where each layer's keys/values live, which slots are valid (padding), which position each slot
holds, and the attention masks that follow. Sliding layers keep a ring of the last W-1 positions
(slot = position % (W-1)); their K and V buffers are views of one stacked tensor, so a one-token step commits
every sliding layer's new token in one scatter. Full layers keep every position (slot = position) up to a
capacity that grows on demand. Every layer buffer has `scratch` slots behind the cached part: the denoiser writes the
canvas K/V there, so a denoising step attends over one slice and allocates nothing.
Rows may hold different lengths (the engine batches requests of different ages); only rows [:n] take
part in a pass, so finished rows cost nothing once the engine compacts them away.
Two kinds of plans: dynamic (host lengths, exact key ranges; the CPU path) and static (`begin_decode(static=True)`,
`begin_step`): computed on the device from `lens_dev`, shapes fixed by (rows, canvas, power-of-two key slots),
so a pass can be captured once in a CUDA graph and replayed as the lengths grow.
Does not know: weights, the sampler, or text.
"""
from __future__ import annotations

import copy

import torch

from .config import ModelConfig


class KVCache:
    def __init__(self, cfg: ModelConfig, batch: int, capacity: int, device: torch.device | str,
                 dtype: torch.dtype, scratch: int | None = None) -> None:
        self.cfg, self.device, self.dtype = cfg, torch.device(device), dtype
        self.ring = cfg.sliding_window - 1          # sliding layers keep the last W-1 positions
        self.scratch = scratch or cfg.canvas_length   # room for one canvas
        # full-layer positions we can hold before growing: a power of two, so that a static plan's key slots
        # (a power of two >= what the rows need) never hit the buffer's end, and results do not depend on it
        self.capacity = _pow2(max(int(capacity), 1))
        self.batch = batch                          # rows allocated
        self.n = batch                              # rows taking part in passes: [:n]
        self.lengths = [0] * batch                  # positions encoded per row (host ints: no syncs)
        # sliding layers' K and V: views of one [2, layers, B, Hkv, ring + scratch, D] buffer (they share their
        # shape), so that end_step moves every sliding layer's new token into its ring in one scatter
        sliding = [i for i in range(cfg.num_hidden_layers) if cfg.is_sliding(i)]
        self.sliding = torch.zeros((2, len(sliding), batch, cfg.layer_kv_heads(sliding[0]), self.ring + self.scratch,
                                    cfg.layer_head_dim(sliding[0])), device=self.device, dtype=dtype) \
            if sliding else None
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        for i in range(cfg.num_hidden_layers):
            if cfg.is_sliding(i):
                j = sliding.index(i)
                self.k.append(self.sliding[0, j])
                self.v.append(self.sliding[1, j])
                continue
            shape = (batch, cfg.layer_kv_heads(i), self.capacity + self.scratch, cfg.layer_head_dim(i))
            self.k.append(torch.zeros(shape, device=self.device, dtype=dtype))
            self.v.append(torch.zeros(shape, device=self.device, dtype=dtype))
        dev = self.device
        self.ring_pos = torch.full((batch, self.ring), -1, dtype=torch.long, device=dev)   # [B, ring]
        self.ring_valid = torch.zeros(batch, self.ring, dtype=torch.bool, device=dev)      # [B, ring]
        self.full_valid = torch.zeros(batch, self.capacity, dtype=torch.bool, device=dev)  # [B, cap]
        self.lens_dev = torch.zeros(batch, dtype=torch.long, device=dev)   # `lengths` on the device (static plans)
        self.padded = False                         # some encoded slot is padding
        self._plan: dict = {}

    def reset(self) -> "KVCache":
        """Forget every position (a new conversation). Buffers keep their memory and addresses; stale K/V is
        never read, since every plan only looks at valid slots of the current lengths."""
        self.n, self.lengths, self.padded, self._plan = self.batch, [0] * self.batch, False, {}
        self.lens_dev.zero_()
        self.ring_pos.fill_(-1)
        self.ring_valid.zero_()
        self.full_valid.zero_()
        return self

    def clone(self) -> "KVCache":
        """An independent copy (its own buffers, the same positions): to continue one conversation in two ways,
        e.g. to try a turn again, since `generate(..., cache=c)` extends `c` in place."""
        new = copy.copy(self)
        new.lengths, new._plan = list(self.lengths), {}
        new.sliding = None if self.sliding is None else self.sliding.clone()
        new.k, new.v, j = [], [], 0
        for i in range(self.cfg.num_hidden_layers):
            if self.cfg.is_sliding(i):                  # views of the copied sliding buffer, as in __init__
                new.k.append(new.sliding[0, j])
                new.v.append(new.sliding[1, j])
                j += 1
            else:
                new.k.append(self.k[i].clone())
                new.v.append(self.v[i].clone())
        for name in ("ring_pos", "ring_valid", "full_valid", "lens_dev"):
            setattr(new, name, getattr(self, name).clone())
        return new

    def _lengths_changed(self) -> None:
        """Mirror the host `lengths` on the device (read by the static plans, which must not sync)."""
        self.lens_dev.copy_(torch.tensor(self.lengths, dtype=torch.long), non_blocking=False)

    @property
    def length(self) -> int:
        """Encoded positions, when every active row has the same number (the generate() case)."""
        if not self._uniform():
            raise ValueError("rows of this cache hold different lengths")
        return self.lengths[0]

    def tensors(self) -> list[torch.Tensor]:
        """Every device buffer of the cache (a captured graph's key holds their addresses)."""
        return [*self.k, *self.v, self.ring_pos, self.ring_valid, self.full_valid, self.lens_dev]

    def _uniform(self) -> bool:
        return len(set(self.lengths[: self.n])) == 1

    # ---- capacity / rows -----------------------------------------------------------------------
    def reserve(self, total_positions: int) -> None:
        """Make room for `total_positions` positions per row on full layers (amortised doubling)."""
        if total_positions <= self.capacity:
            return
        new_cap = _pow2(max(total_positions, 2 * self.capacity))
        used = max(self.lengths)
        for i in range(self.cfg.num_hidden_layers):
            if self.cfg.is_sliding(i):
                continue
            for buf in (self.k, self.v):
                old = buf[i]
                new = old.new_zeros(old.shape[0], old.shape[1], new_cap + self.scratch, old.shape[3])
                new[:, :, :used] = old[:, :, :used]
                buf[i] = new
        fv = self.full_valid.new_zeros(self.batch, new_cap)
        fv[:, :used] = self.full_valid[:, :used]
        self.full_valid, self.capacity = fv, new_cap

    def copy_row(self, dst: int, src_cache: "KVCache", src: int = 0) -> None:
        """Copy row `src` of `src_cache` (same model) into row `dst` of this cache."""
        L = src_cache.lengths[src]
        self.reserve(L)
        for i in range(self.cfg.num_hidden_layers):
            n = src_cache.ring if self.cfg.is_sliding(i) else L
            self.k[i][dst, :, :n] = src_cache.k[i][src, :, :n]
            self.v[i][dst, :, :n] = src_cache.v[i][src, :, :n]
        self.ring_pos[dst] = src_cache.ring_pos[src]
        self.ring_valid[dst] = src_cache.ring_valid[src]
        self.full_valid[dst].zero_()
        self.full_valid[dst, :L] = src_cache.full_valid[src, :L]
        self.lengths[dst] = L
        self._lengths_changed()
        self.padded = self.padded or src_cache.padded

    def clear_row(self, b: int) -> None:
        """Forget every position of row b (its K/V stays in memory, never read again: no plan looks past a
        row's valid slots)."""
        self.ring_pos[b] = -1
        self.ring_valid[b] = False
        self.full_valid[b] = False
        self.lengths[b] = 0
        self._lengths_changed()

    def select_rows(self, rows: list[int]) -> "KVCache":
        """Keep only `rows` (in that order) as the active rows [:len(rows)]; returns self."""
        idx = torch.tensor(rows, dtype=torch.long, device=self.device)
        for bufs in (self.k, self.v):
            for t in bufs:
                t[: len(rows)] = t.index_select(0, idx)   # gathered first, so any order is safe
        for t in (self.ring_pos, self.ring_valid, self.full_valid):
            t[: len(rows)] = t.index_select(0, idx)
        self.lengths[: len(rows)] = [self.lengths[r] for r in rows]
        self.n = len(rows)
        self._lengths_changed()
        return self

    # ---- encoder pass: causal, writes ----------------------------------------------------------
    def begin_encode(self, n_new: int, valid: torch.Tensor | None, rows: list[int] | None = None) -> torch.Tensor:
        """Prepare masks for encoding `n_new` positions on `rows` (default: the active rows [:n]);
        valid: [r, S] (False = padding). Returns positions [S] (rows equally long) or [r, S]."""
        rows = list(range(self.n)) if rows is None else list(rows)
        r, W, dev = len(rows), self.cfg.sliding_window, self.device
        lens = [self.lengths[b] for b in rows]
        self.reserve(max(lens) + n_new)
        if valid is None:
            valid = torch.ones(r, n_new, dtype=torch.bool, device=dev)
        valid = valid.to(dev, torch.bool)
        self.padded = self.padded or not bool(valid.all())
        sel = slice(0, r) if rows == list(range(r)) else torch.tensor(rows, device=dev)
        qpos = torch.tensor(lens, device=dev)[:, None] + torch.arange(n_new, device=dev)[None]   # [r, S]
        n_ring = min(max(lens), self.ring)     # ring slots >= n_ring are empty in every row
        diag = torch.eye(n_new, dtype=torch.bool, device=dev)                           # a query sees itself
        kpos_s = torch.cat([self.ring_pos[sel, :n_ring], qpos], 1)                      # [r, n_ring+S]
        kval_s = torch.cat([self.ring_valid[sel, :n_ring], valid], 1)
        self_s = torch.cat([torch.zeros(n_new, n_ring, dtype=torch.bool, device=dev), diag], 1)
        k_s, q_s = kpos_s[:, None, :], qpos[:, :, None]            # 0 <= q - k < W, as bool [r, S, n_ring+S] only
        m_s = (k_s <= q_s) & (k_s > q_s - W) & (kval_s[:, None, :] | self_s[None])   # (no int64 [r, S, L] tensor)
        Lf = max(lens) + n_new
        for b, l, vb in zip(rows, lens, valid):
            self.full_valid[b, l:l + n_new] = vb
        kpos_f = torch.arange(Lf, device=dev)
        own = kpos_f[None, None, :] == qpos[:, :, None]
        m_f = (kpos_f[None, None, :] <= qpos[:, :, None]) & (self.full_valid[sel, None, :Lf] | own)
        self._plan = {"n_new": n_new, "valid": valid, "n_ring": n_ring, "rows": rows, "sel": sel, "lens": lens,
                      "Lf": Lf, "mask_s": self._bias(m_s[:, None]), "mask_f": self._bias(m_f[:, None])}
        return qpos[0] if len(set(lens)) == 1 else qpos

    def _bias(self, mask: torch.Tensor) -> torch.Tensor:
        """A plan's bool mask as the additive bias attention takes (attention_bias), made once per plan: every
        layer of the pass shares it. No query row is ever fully masked (each position sees itself), so -inf never
        leaves a row without keys."""
        return attention_bias(mask, self.dtype)

    def _write(self, buf: torch.Tensor, new: torch.Tensor, ring: bool) -> None:
        """buf[row, :, slot(len_row + t)] = new[j, :, t] for the planned rows."""
        p, S = self._plan, new.shape[2]
        if not ring and isinstance(p["sel"], slice) and len(set(p["lens"])) == 1:
            buf[p["sel"], :, p["lens"][0]:p["lens"][0] + S] = new
            return
        keep = min(S, self.ring) if ring else S
        for j, (b, s0) in enumerate(zip(p["rows"], p["lens"])):
            slots = torch.arange(s0 + S - keep, s0 + S, device=self.device)
            buf[b, :, slots % self.ring if ring else slots] = new[j, :, S - keep:]

    def encode_layer(self, i: int, k: torch.Tensor, v: torch.Tensor):
        """k, v: [r, Hkv, S, D] for the new positions -> (keys, values, mask [r,1,S,L]) to attend over."""
        p = self._plan
        if self.cfg.is_sliding(i):
            keys = torch.cat([self.k[i][p["sel"], :, :p["n_ring"]], k], dim=2)
            vals = torch.cat([self.v[i][p["sel"], :, :p["n_ring"]], v], dim=2)
            self._write(self.k[i], k, ring=True)
            self._write(self.v[i], v, ring=True)
            return keys, vals, p["mask_s"]
        self._write(self.k[i], k, ring=False)
        self._write(self.v[i], v, ring=False)
        return self.k[i][p["sel"], :, :p["Lf"]], self.v[i][p["sel"], :, :p["Lf"]], p["mask_f"]

    def end_encode(self) -> None:
        p = self._plan
        S = p["n_new"]
        keep = min(S, self.ring)
        for j, (b, l) in enumerate(zip(p["rows"], p["lens"])):
            pos = torch.arange(l + S - keep, l + S, device=self.device)
            self.ring_pos[b, pos % self.ring] = pos
            self.ring_valid[b, pos % self.ring] = p["valid"][j, S - keep:]
            self.lengths[b] = l + S
        self._lengths_changed()
        self._plan = {}

    # ---- denoiser pass: bidirectional, reads -------------------------------------------------
    def key_slots(self, n_new: int, static: bool) -> tuple[int, int]:
        """Key slots (sliding, full) a pass over `n_new` positions after rows [:n] attends over: exactly what
        the longest row needs, or (static) the next power of two, capped by the buffers, so that a captured
        graph serves many lengths."""
        lens = self.lengths[: self.n]
        need = (min(max(lens), self.ring) + n_new, max(lens) + n_new)
        if not static:
            return need
        return (min(self.ring + self.scratch, _pow2(need[0])), min(self.capacity + self.scratch, _pow2(need[1])))

    def begin_decode(self, n_canvas: int, static: bool = False) -> torch.Tensor:
        """Plan a denoiser pass over rows [:n]; returns canvas positions [C] or [n, C].

        static: every tensor of the plan is computed on the device from `lens_dev` with shapes that depend
        only on (n, C, key_slots): the pass can be captured in a CUDA graph and replayed at other lengths."""
        n, dev = self.n, self.device
        if n_canvas > self.scratch:
            raise ValueError(f"canvas of {n_canvas} tokens does not fit the cache's {self.scratch} scratch slots")
        L_s, L_f = self.key_slots(n_canvas, static)
        plan = {"C": n_canvas, "L_s": L_s, "L_f": L_f, "mask_s": None, "mask_f": None}
        self._plan = plan
        if not static and self._uniform() and not self.padded:   # one slice per layer, no mask
            plan["off_s"], plan["off_f"] = min(self.lengths[0], self.ring), self.lengths[0]
            return torch.arange(n_canvas, device=dev) + self.lengths[0]
        lens = self.lens_dev[:n]
        ar = torch.arange(n_canvas, device=dev)
        for kind, off, valid, L in (("s", lens.clamp(max=self.ring), self.ring_valid, L_s),
                                    ("f", lens, self.full_valid, L_f)):
            o = off[:, None]                                                            # [n, 1]
            j = torch.arange(L, device=dev)[None]                                       # [1, L]
            cached = torch.zeros(n, L, dtype=torch.bool, device=dev)
            w = min(valid.shape[1], L)
            cached[:, :w] = valid[:n, :w]
            mask = ((j < o) & cached) | ((j >= o) & (j < o + n_canvas))
            plan["mask_" + kind] = self._bias(mask[:, None, None])                     # [n, 1, 1, L]
            plan["idx_" + kind] = o + ar                                               # [n, C] canvas slots
            plan["first_" + kind] = off                                                # [n] first canvas slot
        return lens[:, None] + ar

    def kv_slots(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Where the planned denoiser pass or one-token step puts layer i's new K/V: (k buffer, v buffer
        [n, Hkv, slots, D], first slot per row [n] int64), for a kernel that writes them itself (then
        decode_layer / step_layer get k = v = None); None for encoder passes (their slots wrap around the ring)."""
        p, n, sliding = self._plan, self.n, self.cfg.is_sliding(i)
        if p.get("step") and not sliding:                                   # one-token step, full layer
            first = p["pos"]
        elif "C" in p or p.get("step"):         # denoiser pass; one-token step, sliding layer (scratch slot)
            kind = "s" if sliding else "f"
            key = "first_" + kind
            if key not in p:    # a host int (the unmasked plan's offset, the scratch slot): one tensor per pass
                off = self.ring if p.get("step") else p["off_" + kind]
                p[key] = torch.full((n,), off, dtype=torch.long, device=self.device)
            first = p[key]
        else:
            return None
        return self.k[i][:n], self.v[i][:n], first

    def decode_layer(self, i: int, k: torch.Tensor | None, v: torch.Tensor | None):
        """Write the canvas K/V (k, v: [n, Hkv, C, D]; None: already written to `kv_slots`) into scratch; return
        ([cache ; canvas] keys, values, mask or None)."""
        p, n = self._plan, self.n
        kind = "s" if self.cfg.is_sliding(i) else "f"
        L = p["L_" + kind]
        if k is not None and p["mask_" + kind] is None:
            o = p["off_" + kind]
            self.k[i][:n, :, o:o + p["C"]] = k
            self.v[i][:n, :, o:o + p["C"]] = v
        elif k is not None:
            idx = p["idx_" + kind][:, None, :, None].expand_as(k)
            self.k[i][:n].scatter_(2, idx, k)
            self.v[i][:n].scatter_(2, idx, v)
        return self.k[i][:n, :, :L], self.v[i][:n, :, :L], p["mask_" + kind]

    # ---- one-token encoder step with a static plan (AR decoding; CUDA-graph safe) ----------------
    def begin_step(self) -> torch.Tensor:
        """Plan a causal pass of one new token on rows [:n], computed on the device from `lens_dev` (no host
        sync, fixed shapes). The new token's K/V goes to scratch slot `ring` on sliding layers (moved into
        the ring by `end_step`) and to its own slot on full layers. Returns positions [n, 1]."""
        n, dev, W = self.n, self.device, self.cfg.sliding_window
        if max(self.lengths[:n]) + 1 > self.capacity:
            raise ValueError("begin_step: reserve() room for the new token first")
        pos = self.lens_dev[:n]                                                         # [n]
        L_f = self.step_slots()
        in_window = self.ring_valid[:n] & (pos[:, None] - self.ring_pos[:n] < W)        # [n, ring]
        mask_s = torch.cat([in_window, torch.ones(n, 1, dtype=torch.bool, device=dev)], 1)
        self.full_valid[:n].scatter_(1, pos[:, None], True)
        j = torch.arange(L_f, device=dev)[None]
        mask_f = (j <= pos[:, None]) & self.full_valid[:n, :L_f]
        self._plan = {"step": True, "pos": pos, "L_f": L_f, "mask_s": self._bias(mask_s[:, None, None]),
                      "mask_f": self._bias(mask_f[:, None, None])}
        return pos[:, None]

    def step_slots(self) -> int:
        """Full-layer key slots of a `begin_step` pass: a power of two, so one captured graph serves many steps."""
        return min(self.capacity, _pow2(max(self.lengths[: self.n]) + 1))

    def step_layer(self, i: int, k: torch.Tensor | None, v: torch.Tensor | None):
        """k, v: [n, Hkv, 1, D] of the new token (None: already written to `kv_slots`) -> (keys, values, mask) for
        a `begin_step` plan."""
        p, n = self._plan, self.n
        if self.cfg.is_sliding(i):
            if k is not None:
                self.k[i][:n, :, self.ring:self.ring + 1] = k
                self.v[i][:n, :, self.ring:self.ring + 1] = v
            return self.k[i][:n, :, :self.ring + 1], self.v[i][:n, :, :self.ring + 1], p["mask_s"]
        if k is not None:
            idx = p["pos"][:, None, None, None].expand_as(k)
            self.k[i][:n].scatter_(2, idx, k)
            self.v[i][:n].scatter_(2, idx, v)
        return self.k[i][:n, :, :p["L_f"]], self.v[i][:n, :, :p["L_f"]], p["mask_f"]

    def end_step(self) -> None:
        """Device half of committing the token: move sliding K/V into the ring, advance `lens_dev`. The host
        half (`lengths`) is `advance_host`, kept apart so a captured graph can replay this one."""
        n, pos = self.n, self._plan["pos"]
        slot = (pos % self.ring)[:, None]                                               # [n, 1]
        if self.sliding is not None:   # every sliding layer's K and V at once: [2, layers, n, Hkv, slots, D]
            s = self.sliding[:, :, :n]
            idx = slot.view(1, 1, n, 1, 1, 1).expand(*s.shape[:4], 1, s.shape[5])
            s.scatter_(4, idx, s[..., self.ring:self.ring + 1, :].clone())
        self.ring_pos[:n].scatter_(1, slot, pos[:, None].clone())
        self.ring_valid[:n].scatter_(1, slot, True)
        self.lens_dev[:n] += 1
        self._plan = {}

    def advance_host(self) -> None:
        """The host half of `end_step`: one more position on every active row."""
        for b in range(self.n):
            self.lengths[b] += 1


def attention_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool mask [.., L] (True: attend) -> the additive bias SDPA adds to the scores, 0 or -inf in `dtype`. SDPA
    makes this itself from a bool mask on every call (about three small kernels on CUDA). Its rows are 16-element
    aligned (a view of [.., L rounded up to 16]), as torch's memory-efficient kernel wants them: else it pads a
    copy on every call."""
    L = mask.shape[-1]
    bias = torch.zeros(*mask.shape[:-1], -(-L // 16) * 16, dtype=dtype, device=mask.device)[..., :L]
    return bias.masked_fill_(~mask, float("-inf"))


def _pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()
