"""The KV cache: rows of different lengths, padding, rings past the window, growth."""
import torch

from dgemma.config import ModelConfig
from dgemma.model import DiffusionGemma
from dgemma.train.loop import init_weights

CFG = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=2,
           num_key_value_heads=1, head_dim=16, global_head_dim=16, num_global_key_value_heads=1,
           sliding_window=6, num_experts=4, top_k_experts=2, moe_intermediate_size=16, canvas_length=8,
           dtype="float32", eos_token_id=[1])


def model():
    torch.manual_seed(0)
    return init_weights(DiffusionGemma(ModelConfig(**CFG)), 0, std=0.3).eval()


def single(m, ctx, canvases):
    """Encode ctx, then for each canvas: denoise it, then encode it (commit). -> list of logits."""
    cache = m.new_cache(1, 4)
    m.encode(ctx, cache)
    out = []
    for c in canvases:
        out.append(m.head(m.denoise(c, cache)))
        m.encode(c, cache)
    return out


def two_row_cache(m, a, b, capacity: int = 64):
    """Prompts a [1, La] and b [1, Lb] prefilled alone, then copied into rows 0 and 1 of one cache (the engine's way)."""
    ca, cb = m.new_cache(1, 4), m.new_cache(1, 4)
    m.encode(a, ca)
    m.encode(b, cb)
    cache = m.new_cache(2, capacity)
    cache.copy_row(0, ca)
    cache.copy_row(1, cb)
    return cache


@torch.no_grad()
def test_rows_of_different_lengths_match_single_rows():
    m = model()
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(2, 64, (1, 3), generator=g), torch.randint(2, 64, (1, 13), generator=g)
    canv = [torch.randint(0, 64, (2, 8), generator=g) for _ in range(3)]
    ref_a = single(m, a, [c[:1] for c in canv])
    ref_b = single(m, b, [c[1:] for c in canv])
    cache = two_row_cache(m, a, b, capacity=4)   # grows as needed
    assert cache.lengths == [3, 13]
    for step, c in enumerate(canv):
        out = m.head(m.denoise(c, cache))
        assert torch.allclose(out[:1], ref_a[step], atol=1e-5)
        assert torch.allclose(out[1:], ref_b[step], atol=1e-5)
        m.encode(c, cache)                  # each row at its own positions, rings past the window


@torch.no_grad()
def test_left_padding_is_invisible():
    m = model()
    g = torch.Generator().manual_seed(1)
    a, b = torch.randint(2, 64, (1, 4), generator=g), torch.randint(2, 64, (1, 11), generator=g)
    canvas = torch.randint(0, 64, (2, 8), generator=g)
    ids = torch.cat([torch.cat([torch.zeros(1, 7, dtype=torch.long), a], 1), b])
    mask = torch.ones_like(ids)
    mask[0, :7] = 0
    both = m.denoise_logits(ids, canvas, context_mask=mask)
    assert torch.allclose(both[:1], m.denoise_logits(a, canvas[:1]), atol=1e-5)
    assert torch.allclose(both[1:], m.denoise_logits(b, canvas[1:]), atol=1e-5)
    enc = m.encoder_logits(ids, attention_mask=mask)
    assert torch.allclose(enc[0, 7:], m.encoder_logits(a)[0], atol=1e-5)


@torch.no_grad()
def test_select_rows_compacts_and_growth_keeps_contents():
    m = model()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(2, 64, (3, 5), generator=g)
    canvas = torch.randint(0, 64, (3, 8), generator=g)
    cache = m.new_cache(3, 5)
    m.encode(ids, cache)
    full = m.head(m.denoise(canvas, cache))
    cache.reserve(500)                      # regrow: contents must survive
    cache.select_rows([2, 0])
    out = m.head(m.denoise(canvas[[2, 0]], cache))
    assert torch.allclose(out, full[[2, 0]], atol=1e-5)


def test_long_prompts_are_encoded_in_chunks(monkeypatch):
    """generate and generate_ar encode a prompt of more than PROMPT_CHUNK tokens in passes of at most that many
    (a single pass builds masks quadratic in its length): the same cache and tokens as one pass (up to rounding),
    with left padding too, across the sliding window's ring; fewer tokens a pass once the context is long."""
    import dgemma.generate as gen
    m = model()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 64, (2, 40), generator=g)
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, :13] = 0                                     # row 1 left-padded past the first chunk's end
    seen = []
    real = m.encode
    monkeypatch.setattr(m, "encode", lambda ids, *a, **k: seen.append(ids.shape[1]) or real(ids, *a, **k))
    monkeypatch.setattr(gen, "pass_tokens", lambda context: gen.PROMPT_CHUNK)   # (its own sizing: tested below)

    def state(cache):                                    # what the cache holds (not the last canvas's scratch K/V)
        n = max(cache.lengths)
        kv = [t[:, :, :cache.ring if m.config.is_sliding(i % len(cache.k)) else n]
              for i, t in enumerate([*cache.k, *cache.v])]
        return kv + [cache.ring_pos, cache.ring_valid, cache.full_valid[:, :n]]

    kw = dict(attention_mask=mask, max_new_tokens=16, max_denoising_steps=3, seed=0, eos_token_id=None)
    one = m.generate(ids, **kw)
    assert seen[0] == 40
    monkeypatch.setattr(gen, "PROMPT_CHUNK", 12)
    seen.clear()
    chunked = m.generate(ids, **kw)
    assert seen[:4] == [12, 12, 12, 4] and max(seen) <= 12
    assert torch.equal(chunked.sequences, one.sequences) and chunked.cache.lengths == one.cache.lengths
    for a, b in zip(state(chunked.cache), state(one.cache)):
        assert torch.allclose(a.float(), b.float(), atol=1e-5)
    seen.clear()
    ar_chunked = gen.generate_ar(m, ids, max_new_tokens=6, eos_token_id=None)
    assert seen[:4] == [12, 12, 12, 4]
    monkeypatch.setattr(gen, "PROMPT_CHUNK", 4096)
    seen.clear()
    assert torch.equal(gen.generate_ar(m, ids, max_new_tokens=6, eos_token_id=None).sequences, ar_chunked.sequences)
    assert seen[0] == 40
    monkeypatch.undo()
    assert [gen.pass_tokens(c) for c in (0, 12288, 28672, 262144)] == [4096, 4096, 2048, 256]
    assert gen.pass_tokens(12289) < 4096 and (gen.pass_tokens(60000) + 60000) * gen.pass_tokens(60000) <= 1 << 26
