"""Chunked prefill and prefix reuse in the engine: a request served from a stored prefix gives exactly the cold
request's tokens (histories longer than the sliding window, conversations diverging in the middle), the store
stays inside its byte budget, a long prompt does not stall rows already denoising, max_new_tokens is exact."""
import torch

from dgemma.engine import Engine
from dgemma.prefix import PrefixStore, cache_bytes

KW = dict(max_new_tokens=32, max_denoising_steps=6, stability_threshold=1, confidence_threshold=4.0,
          eos_token_id=[5, 7], pad_token_id=0)
K = 16        # prefill chunk; the test model has window 8 and canvas 16


def _ids(n, seed):
    return torch.randint(20, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _run(eng, prompt, seed, **kw):
    rid = eng.submit(prompt, seed=seed, **{**KW, **kw})
    while eng.has_work():
        eng.step()
    return eng.collect(rid)


def _cold(m, prompt, seed, **kw):
    return _run(Engine(m, max_batch=2, prefill_chunk=K), prompt, seed, **kw)


def test_second_turn_reuses_the_first_exactly(peaky_model):
    m = peaky_model
    eng = Engine(m, max_batch=2, prefill_chunk=K)
    turn1 = _ids(45, 0)                                   # > window, not a multiple of K
    r1 = _run(eng, turn1, 1)
    assert r1.cached_tokens == 0 and len(eng.prefix) == 1   # snapshot of the first 32 tokens
    history = turn1 + r1.tokens + _ids(7, 2)              # the client resends everything (+ template tail)
    assert eng.warm(history)                              # idle-time encoding of the finished turn
    while eng.warming:
        eng.step()
    turn2 = history + _ids(40, 3)
    warm = _run(eng, turn2, 4)
    assert warm.cached_tokens == len(history) // K * K > 45
    assert r1.stored_tokens == 32 and warm.stored_tokens == len(turn2) // K * K - warm.cached_tokens > 0  # (new)
    cold = _cold(m, turn2, 4)
    assert cold.cached_tokens == 0 and cold.stored_tokens == len(turn2) // K * K
    assert warm.tokens == cold.tokens and warm.decoder_passes == cold.decoder_passes


def test_snapshot_is_bit_identical_to_cold_encoding(peaky_model):
    m = peaky_model
    a, b = Engine(m, prefill_chunk=K), Engine(m, prefill_chunk=K)
    p = _ids(70, 5)
    a.warm(p[:40]), b.warm(p)
    while a.warming or b.warming:
        a.step(), b.step()
    (_, sa), = a.prefix.entries.items()
    sb = b.prefix.entries[tuple(p[:64])]
    assert sa.lengths == [32] and sb.lengths == [64]
    c = Engine(m, prefill_chunk=K)
    c.prefix.insert(p[:32], sa)                           # continue a's 32-token snapshot to 64 tokens
    c.warm(p)
    while c.warming:
        c.step()
    sc = c.prefix.entries[tuple(p[:64])]
    for i in range(m.config.num_hidden_layers):
        n = sb.ring if m.config.is_sliding(i) else 64
        assert torch.equal(sb.k[i][:, :, :n], sc.k[i][:, :, :n]) and torch.equal(sb.v[i][:, :, :n], sc.v[i][:, :, :n])
    assert torch.equal(sb.ring_pos, sc.ring_pos) and torch.equal(sb.full_valid[:, :64], sc.full_valid[:, :64])


def test_diverging_conversation_falls_back_to_a_shorter_prefix(peaky_model):
    m = peaky_model
    eng = Engine(m, prefill_chunk=K)
    base = _ids(40, 6)
    _run(eng, base, 1)                                    # stores base[:32]
    _run(eng, base + _ids(30, 7), 1)                      # stores 64 tokens
    edited = base[:35] + _ids(35, 8)                      # diverges at 35: inside the 64-token snapshot
    got = _run(eng, edited, 9)
    assert got.cached_tokens == 32
    assert got.tokens == _cold(m, edited, 9).tokens


def test_store_respects_its_budget_lru():
    class Snap:                                           # what the store reads of a cache
        def __init__(self, n):
            self.lengths, self.t = [n], torch.zeros(n, dtype=torch.uint8)

        def tensors(self):
            return [self.t]
    s = PrefixStore(budget_bytes=100, chunk=10)
    assert s.insert(list(range(40)), Snap(40)) and s.insert(list(range(1, 41)), Snap(40))
    assert s.lookup(list(range(45)))[0] == 40             # the first is now most recently used
    assert s.insert(list(range(2, 32)), Snap(30))         # evicts the second
    assert s.bytes <= 100 and s.evictions == 1
    assert s.lookup(list(range(1, 41)))[0] == 0 and s.lookup(list(range(40)))[0] == 40
    assert not s.insert(list(range(200)), Snap(200))      # larger than the whole budget: not kept
    assert cache_bytes(Snap(7)) == 7


def test_budget_zero_disables_reuse(peaky_model):
    eng = Engine(peaky_model, prefill_chunk=K, prefix_cache_bytes=0)
    p = _ids(40, 1)
    _run(eng, p, 1)
    assert eng.prefix is None and _run(eng, p + [30], 1).cached_tokens == 0


def test_long_prompt_is_encoded_between_steps(peaky_model):
    m = peaky_model
    eng = Engine(m, max_batch=2, prefill_chunk=K)
    a = eng.submit(_ids(10, 1), seed=1, **{**KW, "max_new_tokens": 64})
    eng.step()
    b = eng.submit(_ids(100, 2), seed=2, **KW)                # 7 chunks: encoded over 7 steps
    steps_b = 0
    while b not in [r.req.id for r in eng.rows]:
        assert eng.stats.rows == 1                                     # a's row keeps denoising meanwhile
        eng.step()
        steps_b += 1
        assert 0 < eng.stats.prefill_tokens <= K
    assert steps_b == 7
    while eng.has_work():
        eng.step()
    assert eng.collect(a).tokens == _cold(m, _ids(10, 1), 1, max_new_tokens=64).tokens
    assert eng.collect(b).tokens == _cold(m, _ids(100, 2), 2).tokens


def test_max_new_tokens_is_exact(peaky_model):
    eng = Engine(peaky_model, prefill_chunk=K)
    for n in (1, 5, 16, 21):
        res = _run(eng, _ids(6, n), n, max_new_tokens=n, eos_token_id=None)
        assert len(res.tokens) == n and res.finish_reason == "length"


def test_cancel_while_encoding(peaky_model):
    eng = Engine(peaky_model, max_batch=2, prefill_chunk=K)
    first = eng.submit(_ids(10, 1), seed=1, **KW)
    eng.step()                                            # a row denoises: later prompts go a chunk per step
    rid = eng.submit(_ids(80, 3), seed=1, **KW)
    eng.step()
    assert eng.prefilling and len(eng.rows) == 1
    eng.cancel(rid)
    assert not eng.prefilling and eng.pre is None         # its prefill row (and the idle prefill cache) given back
    assert set(eng.run()) == {first}


def test_cancel_outside_inference_mode_after_the_cache_grew(peaky_model):
    eng = Engine(peaky_model, max_batch=2, prefill_chunk=K)
    a = eng.submit(_ids(10, 1), seed=1, **{**KW, "max_new_tokens": 2000, "eos_token_id": None})
    b = eng.submit(_ids(1100, 2), seed=2, **KW)           # grows the shared cache past its first capacity
    while len(eng.rows) < 2:
        eng.step()
    eng.cancel(a)                                         # called from plain code (a server thread)
    assert [r.req.id for r in eng.rows] == [b]


def test_warm_jobs_wait_until_the_engine_is_idle(peaky_model):
    eng = Engine(peaky_model, max_batch=2, prefill_chunk=K)
    eng.submit(_ids(10, 1), seed=1, **KW)
    eng.warm(_ids(64, 2))
    while eng.has_work():                                  # the request's own prompt is shorter than a chunk
        eng.step()
        assert len(eng.prefix) == 0 and len(eng.warming) == 1   # nothing warmed while it runs
    while eng.warming:
        eng.step()
    assert tuple(_ids(64, 2)) in eng.prefix.entries


def test_many_short_warm_jobs_then_a_burst(peaky_model):
    """Inexact reuse warms whole prompts, shorter than a chunk too: however many wait, one at a time holds the
    prefill cache's spare row, a burst that arrives mid-warm still gets its rows, and every job ends up stored."""
    eng = Engine(peaky_model, max_batch=1, prefill_chunk=K, exact_reuse=False)
    prompts = [_ids(5 + i, 10 + i) for i in range(6)]
    for p in prompts:
        assert eng.warm(p)
    eng.step()
    assert len(eng.warming) < 6 and sum(w.row is not None for w in eng.warming) <= 1
    ids = [eng.submit(_ids(40, 20 + i), seed=i, **KW) for i in range(3)]   # more than max_batch
    res = eng.run()
    assert set(ids) <= set(res)
    while eng.warming:
        eng.step()
    assert all(tuple(p) in eng.prefix.entries for p in prompts) and eng.pre is None


def test_prefill_rows_grow_under_a_prompt_in_flight(peaky_model):
    """The prefill cache starts with one row and doubles as prompts arrive, carrying a half-encoded prompt over;
    every request still gets its cold tokens."""
    m = peaky_model
    eng = Engine(m, max_batch=4, prefill_chunk=K)
    first = eng.submit(_ids(10, 1), seed=1, **KW)
    eng.step()                                            # a row denoises: prompts now go a chunk per step
    a = eng.submit(_ids(70, 2), seed=2, **KW)
    eng.step()
    assert eng.pre.batch == 1 and 0 < eng.prefilling[0].pos < 70
    b, c = eng.submit(_ids(40, 3), seed=3, **KW), eng.submit(_ids(20, 4), seed=4, **KW)
    eng.step()
    assert eng.pre.batch == 4 and len(eng.prefilling) == 3     # grown 1 -> 2 -> 4 with a's row carried over
    res = eng.run()
    for rid, (n, seed) in ((first, (10, 1)), (a, (70, 2)), (b, (40, 3)), (c, (20, 4))):
        assert res[rid].tokens == _cold(m, _ids(n, seed), seed).tokens, rid
    assert eng.pre is None


def test_warm_jobs_already_stored_or_dropped_part_way(peaky_model):
    """A warm job whose prompt the store already holds whole encodes nothing (and does not fail); warm jobs
    dropped part-way (the chat's Ctrl-C, the server's failure path) give their prefill rows back."""
    eng = Engine(peaky_model, max_batch=1, prefill_chunk=K)
    p = _ids(40, 1)
    _run(eng, p, 1)                                       # leaves a snapshot of the first 32 tokens
    assert eng.warm(p + _ids(5, 2)) and eng.warm(p[:32])  # both snapshot at 32: stored already
    while eng.warming:
        eng.step()
    assert eng.pre is None and len(eng.prefix) == 1
    for turn in range(3):                                 # one row, so a leaked one would stop the next request
        assert eng.warm(_ids(64, 10 + turn))
        eng.step()
        assert eng.warming and eng.pre is not None        # part-way through
        eng.drop_warm()
        assert not eng.warming and eng.pre is None
        assert _run(eng, _ids(20, 20 + turn), turn).tokens
