"""The request-level engine: continuous batching gives each request exactly its batch-1 `generate` tokens."""
import math

import pytest
import torch

import dgemma
from dgemma.engine import Engine

from refmodels import reference_model, save_reference

KW = dict(max_new_tokens=48, max_denoising_steps=8, stability_threshold=1, confidence_threshold=4.0,
          eos_token_id=[5, 7, 9, 11, 13, 17], pad_token_id=0)


def peaky(tmp_path, scale=8):
    ref = reference_model(0)
    with torch.no_grad():
        ref.model.decoder.embed_tokens.weight.mul_(scale)
    return dgemma.load(save_reference(ref, tmp_path / "m"), device="cpu")


def expected(m, prompt, seed, kw=KW):
    out = m.generate(torch.tensor([prompt]), seed=seed, **kw)
    new = out.sequences[0, len(prompt):].tolist()
    eos = set(KW["eos_token_id"])
    cut = next((i for i, t in enumerate(new) if t in eos), None)
    return (new[:cut + 1] if cut is not None else new), int(out.decoder_passes[0])


def test_engine_requests_equal_batch1_generate(tmp_path):
    m = peaky(tmp_path)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(20, 512, (n,), generator=g).tolist() for n in (3, 11, 7, 20, 5)]
    eng = Engine(m, max_batch=3)
    # request 2 becomes confident at once (stops early every canvas); 1 has stability 2 and 3 no stop rule (rows
    # keep their own thresholds; on this model only request 2's rule fires: test_engine_stop_rule_per_row_... below
    # makes rules fire at different steps)
    kws = [KW, dict(KW, stability_threshold=2), dict(KW, stability_threshold=0, confidence_threshold=7.0),
           dict(KW, stability_threshold=None), KW]
    ids = [eng.submit(p, seed=100 + i, **kws[i]) for i, p in enumerate(prompts[:4])]
    events = []
    for _ in range(3):                     # the last request arrives while others are mid-flight
        events += eng.step()
    ids.append(eng.submit(prompts[4], seed=104, **KW))
    while eng.has_work():
        assert len(eng.rows) <= 3
        events += eng.step()
    for i, rid in enumerate(ids):
        res = eng.collect(rid)
        toks, passes = expected(m, prompts[i], 100 + i, kws[i])
        assert res.tokens == toks, i
        assert res.decoder_passes == passes
        streamed = [t for e in events if e.request_id == rid for t in e.tokens]
        assert streamed == toks
    reasons = {e.finish_reason for e in events if e.finished}
    assert reasons <= {"eos", "length"} and reasons
    passes = [expected(m, p, 100 + i, kws[i])[1] for i, p in enumerate(prompts)]
    assert passes[2] < passes[3]           # the rule fired for request 2 (request 3 ran every step)


def test_engine_step_launches_two_ops_per_row(tmp_path):
    """Besides the denoiser step, an engine step dispatches a fixed number of ops plus each request's own two
    random draws, however many rows run (each is a kernel launch on a GPU, in series with the step's host sync)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not any(r.alias_info is not None for r in func._schema.returns):   # views launch nothing
                self.n += 1
            return func(*args, **(kwargs or {}))

    m = peaky(tmp_path)
    counts = []
    for rows in (2, 6):
        eng = Engine(m, max_batch=rows, sampler="fast", cuda_graphs=True)
        for i in range(rows):
            eng.submit([21, 22, 23], seed=i, **dict(KW, stability_threshold=i % 3 or None))
        eng.step()                                     # prompts encoded, first step
        mode = Count()
        mode.n = 0
        with mode:
            eng.step()
        counts.append(mode.n)
    assert counts[1] - counts[0] <= 2 * 4, counts


def test_engine_rejects_bad_requests(tmp_path):
    m = peaky(tmp_path)
    eng = Engine(m)
    for bad in ([], [10**6]):
        try:
            eng.submit(bad)
        except ValueError:
            pass
        else:
            raise AssertionError("accepted a bad prompt")
    try:
        eng.submit([5], temperature=3)
    except ValueError as e:
        assert "temperature" in str(e)
    for bad in ("some text", torch.ones(1, 3, dtype=torch.long), [1.5]):
        with pytest.raises(ValueError, match="token ids"):
            eng.submit(bad)
    with pytest.raises(ValueError, match="max_batch"):
        Engine(m, max_batch=0)
    for t in (5e-324, 1e-5):                 # 0 in fp32, or logits / T past fp32: NaN log-probabilities
        with pytest.raises(ValueError, match="t_min"):
            eng.submit([5], t_min=t)
        with pytest.raises(ValueError, match="t_min"):
            m.generate(torch.tensor([[5, 6]]), t_min=t, max_new_tokens=4)
    eng.submit([5], t_min=1e-4, t_max=1e-4, max_new_tokens=4, top_logprobs=2)   # the floor itself: finite
    res = next(iter(eng.run().values()))
    assert all(math.isfinite(lp) for lp in res.logprobs) and all(math.isfinite(p) for a in res.top_logprobs
                                                                 for _, p in a[:1])


def test_engine_takes_a_tensor_prompt_and_refuses_a_request_id_in_use(tmp_path):
    m = peaky(tmp_path)
    eng = Engine(m)
    a = eng.submit(torch.tensor([21, 22, 23]), seed=1, request_id="x", **KW)
    with pytest.raises(ValueError, match="already in use"):
        eng.submit([21, 22, 23], seed=1, request_id="x", **KW)
    eng.submit([21, 22, 23], seed=1, request_id="req-1", **KW)
    assert eng.submit([21], seed=2, **KW) not in ("x", "req-1")       # made-up ids skip the ones given
    while eng.has_work():
        eng.step()
    with pytest.raises(ValueError, match="already in use"):          # finished but not collected yet
        eng.submit([21], request_id="x", **KW)
    assert eng.collect(a).tokens == eng.collect("req-1").tokens
    assert eng.submit([21], request_id="x", **KW) == "x"             # collected: the id is free again


def test_generate_checks_positions_before_allocating_and_clone_gives_a_second_try(tmp_path):
    m = peaky(tmp_path)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        m.generate(torch.tensor([[21, 22]]), max_new_tokens=10 ** 9, seed=0)       # no 10^9-token cache first
    with pytest.raises(ValueError, match="row 1 has no token"):
        m.generate(torch.tensor([[21, 22], [0, 0]]), attention_mask=torch.tensor([[1, 1], [0, 0]]), seed=0)
    two = m.generate(torch.tensor([[21, 22], [23, 24]]), seed=0, **dict(KW, eos_token_id=None))
    m.generate(torch.tensor([[25, 26], [0, 0]]), attention_mask=torch.tensor([[1, 1], [0, 0]]), cache=two.cache,
               seed=0, **KW)                        # a row with nothing new still has its history
    kw = dict(KW, eos_token_id=None)
    first = m.generate(torch.tensor([[21, 22, 23]]), seed=1, **kw)
    nxt = torch.cat([first.sequences[:, -m.config.canvas_length:], torch.tensor([[30, 31]])], 1)
    saved = first.cache.clone()
    a = m.generate(nxt, seed=2, cache=first.cache, **kw)
    assert a.cache is first.cache and first.cache.length > saved.length   # extended in place, as documented
    b = m.generate(nxt, seed=2, cache=saved.clone(), **kw)
    assert torch.equal(a.sequences, b.sequences)
    c = m.generate(nxt, seed=2, cache=saved, **kw)
    assert torch.equal(c.sequences, b.sequences)


def test_fast_sampler_engine_equals_generate(tmp_path):
    m = peaky(tmp_path)
    prompt = list(range(20, 29))
    eng = Engine(m, sampler="fast")
    rid = eng.submit(prompt, seed=3, **KW)
    res = eng.run()[rid]
    out = m.generate(torch.tensor([prompt]), seed=3, sampler="fast", **KW)
    new = out.sequences[0, len(prompt):].tolist()
    assert res.tokens == new[:len(res.tokens)]
    assert all(t == 0 for t in new[len(res.tokens):])


@pytest.mark.parametrize("sampler,chunk", [("exact", None), ("fast", None), ("exact", 40), ("fast", 40)])
def test_truncating_requests_batched_equal_their_generate(tmp_path, monkeypatch, sampler, chunk):
    """Rows with different top_k / top_p (per-row values), with the same ones, and without, in one batch: each
    request gets its own batch-1 generate tokens. chunk: the sampler's chunks cut to 40 rows (2.5 canvases of
    16; halved to 20 where a truncating fast step halves them), as a large vocabulary does."""
    if chunk:
        monkeypatch.setattr("dgemma.sampling.CHUNK_ELEMENTS", chunk * 512)
    m = peaky(tmp_path)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(20, 512, (n,), generator=g).tolist() for n in (4, 9, 6, 12)]
    cuts = [dict(top_k=3), dict(top_p=0.6), dict(top_k=10, top_p=0.8), {}]
    eng = Engine(m, max_batch=4, sampler=sampler)
    ids = [eng.submit(p, seed=40 + i, **KW, **cuts[i]) for i, p in enumerate(prompts)]
    same = Engine(m, max_batch=2, sampler=sampler)           # two rows with the same cut: numbers, not tensors
    twins = [same.submit(prompts[i], seed=40 + i, **KW, top_p=0.6) for i in (1, 1)]
    done, twin = eng.run(), same.run()
    for i, rid in enumerate(ids):
        out = m.generate(torch.tensor([prompts[i]]), seed=40 + i, sampler=sampler, **KW, **cuts[i])
        new = out.sequences[0, len(prompts[i]):].tolist()
        assert done[rid].tokens == new[:len(done[rid].tokens)], i
        assert all(t == 0 for t in new[len(done[rid].tokens):])
    assert twin[twins[0]].tokens == twin[twins[1]].tokens == done[ids[1]].tokens
    plain = m.generate(torch.tensor([prompts[0]]), seed=40, sampler=sampler, **KW)
    assert plain.sequences[0, len(prompts[0]):].tolist()[:len(done[ids[0]].tokens)] != done[ids[0]].tokens


def test_engine_refuses_graphs_with_the_exact_sampler(tmp_path):
    with pytest.raises(ValueError, match="fast"):
        Engine(peaky(tmp_path), sampler="exact", cuda_graphs=True)


def test_cancel_frees_the_row(tmp_path):
    m = peaky(tmp_path)
    eng = Engine(m, max_batch=2)
    a = eng.submit(list(range(20, 30)), seed=1, **KW)
    b = eng.submit(list(range(30, 35)), seed=2, **KW)
    c = eng.submit(list(range(40, 44)), seed=3, **KW)
    eng.step()
    assert [r.req.id for r in eng.rows] == [a, b]
    eng.cancel(a)
    assert [r.req.id for r in eng.rows] == [b] and eng.cache.n == 1
    results = eng.run()
    assert set(results) == {b, c} and eng.collect(a) is None
    toks, _ = expected(m, list(range(40, 44)), 3)
    assert results[c].tokens == toks


def test_prompts_encoded_together_give_batch1_tokens(tmp_path):
    """A burst of equal-length prompts is encoded in one batched pass, and each request still gets exactly its
    batch-1 generate tokens."""
    m = peaky(tmp_path)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(20, 512, (9,), generator=g).tolist() for _ in range(3)]
    eng = Engine(m, max_batch=3)
    calls = []
    encode = m.encode
    m.encode = lambda ids, cache, *a, **k: calls.append(tuple(ids.shape)) or encode(ids, cache, *a, **k)
    try:
        ids = [eng.submit(p, seed=10 + i, **KW) for i, p in enumerate(prompts)]
        res = eng.run()
    finally:
        del m.encode
    assert calls[0] == (3, 9)                               # the three prompts in one pass
    for i, rid in enumerate(ids):
        assert res[rid].tokens == expected(m, prompts[i], 10 + i)[0], i


def test_a_burst_starts_together_and_a_late_prompt_is_encoded_a_chunk_per_step(tmp_path):
    """With no row denoising, every prompt bound for a free row is encoded in the first step (a burst then runs
    in lock step, as generate would); once rows denoise, a new prompt takes one chunk per step."""
    m = peaky(tmp_path)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(20, 512, (30,), generator=g).tolist() for _ in range(4)]
    eng = Engine(m, max_batch=4, prefill_chunk=8)
    for i, p in enumerate(prompts[:3]):
        eng.submit(p, seed=i, **KW)
    eng.step()
    assert len(eng.rows) == 3 and eng.stats.prefill_tokens == 90
    eng.submit(prompts[3], seed=3, **KW)
    for _ in range(3):                                      # 30 tokens at 8 per step: 4 steps to join
        eng.step()
        assert eng.stats.prefill_tokens == 8 and len(eng.rows) == 3
    eng.step()
    assert eng.stats.prefill_tokens == 6 and len(eng.rows) == 4
    assert len(eng.run()) == 4
    # the burst's prompts were still encoded in aligned chunks: each left its snapshot at its last boundary (24)
    rid = eng.submit(prompts[1] + [50, 51], seed=9, **KW)
    assert eng.run()[rid].cached_tokens == 24


def _run_engine(m, prompts, cuda_graphs, device="cpu"):
    """Four requests through one engine, the last arriving mid-flight; the second asks for 2 alternatives per token
    (its steps take the top-N graph). -> ([(tokens, alternatives' ids)], engine)."""
    eng = Engine(m, max_batch=3, sampler="fast", cuda_graphs=cuda_graphs)
    ids = [eng.submit(p, seed=50 + i, top_logprobs=2 if i == 1 else 0, **KW) for i, p in enumerate(prompts[:3])]
    eng.step()
    ids.append(eng.submit(prompts[3], seed=53, **KW))       # arrives mid-flight, rows of different lengths
    res = eng.run()
    return [(res[i].tokens, [[t for t, _ in a] for a in res[i].top_logprobs]) for i in ids], eng


def test_engine_static_step_equals_dynamic(tmp_path):
    """The engine's graph path (static plan; eager here on the CPU) gives the dynamic path's tokens."""
    m = peaky(tmp_path)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(20, 512, (n,), generator=g).tolist() for n in (3, 14, 6, 9)]
    dyn, _ = _run_engine(m, prompts, cuda_graphs=False)
    st, eng = _run_engine(m, prompts, cuda_graphs=True)
    assert eng.graphs is not None and dyn == st and len(st[1][1][0]) == 2 and st[0][1][0] == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_engine_graph_replay_on_cuda(tmp_path):
    m = peaky(tmp_path).to("cuda", torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(20, 512, (n,), generator=g).tolist() for n in (3, 14, 6, 9)]
    m._runtime.graphs = None
    replayed, eng = _run_engine(m, prompts, cuda_graphs=None)
    assert eng.graphs is not None and eng.graphs.captures >= 1
    eng.graphs.enabled = False
    eager, _ = _run_engine(m, prompts, cuda_graphs=True)
    assert replayed == eager


# (stability, confidence, settling step, peaked logits) per request
MIXED_RULES = [(0, 1.0, 0, True), (1, 1.0, 3, True), (2, 1.0, 1, True), (3, 1.0, 2, True), (2, 1.0, 1, False),
               (None, 1.0, 0, True), (1, None, 0, True), (3, 1.0, 4, True), (2**63, 1.0, 0, True)]   # past int64
ONE_RULE = [(2, 1.0, settle, peaked) for settle in (0, 1, 3, 5) for peaked in (True, False)]


@pytest.mark.parametrize("specs", [MIXED_RULES, ONE_RULE], ids=["mixed_rules", "one_rule"])
def test_engine_stop_rule_per_row_equals_reference(tmp_path, monkeypatch, specs):
    """Rows with different stop rules in one batch (stability 0 to 3, confident or not, no rule), or all with one
    rule, each stop where the reference's StableAndConfidentStoppingCriteria, run for that request alone, stops: a
    scripted denoiser gives each request its own argmax canvases (changing until a settling step, then fixed) and
    logits (peaked or flat)."""
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import StableAndConfidentStoppingCriteria

    from dgemma import engine as engine_module
    from dgemma import sampling
    m = peaky(tmp_path)
    C, V, N, H = m.config.canvas_length, 64, 8, m.config.hidden_size

    def script(j: int, canvas: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Request j's argmax canvas [C] and logits [C, V] at a step of one of its canvases."""
        token = 3 + 10 * canvas + min(step, specs[j][2])
        lam = torch.zeros(C, V)
        if specs[j][3]:
            lam[:, token] = 30.0                                  # entropy ~0: confident
        return torch.full((C,), token), lam

    def expected_passes(j: int, canvases: int) -> int:
        stab, conf = specs[j][:2]
        total = 0
        for k in range(canvases):
            rule = StableAndConfidentStoppingCriteria(stab, conf) if stab is not None and conf is not None \
                and stab < 2 * N else None                      # (a longer history than steps: never stable)
            for i in range(N):
                am, lam = script(j, k, i)
                if rule is not None and bool(rule(am[None], lam[None])[0]):
                    break
            total += i + 1
        return total

    eng = Engine(m, max_batch=3)

    def scripted_step(model, cache, canvas, soft, temp, bound, row_chunk, **kw):
        parts = [script(int(r.req.id[1:]), r.req.canvases, N - r.left) for r in eng.rows]
        am, lam = torch.stack([a for a, _ in parts]), torch.stack([x for _, x in parts])
        return am.clone(), am, sampling.entropy(lam), torch.zeros(len(parts), C, H), torch.zeros(len(parts), C)
    monkeypatch.setattr(engine_module, "denoise_step", scripted_step)
    kw = dict(max_new_tokens=2 * C, max_denoising_steps=N, eos_token_id=None)
    for j, (stab, conf, _, _) in enumerate(specs[:5]):
        eng.submit([21, 22, 23], seed=j, request_id=f"r{j}", stability_threshold=stab, confidence_threshold=conf, **kw)
    for _ in range(3):                                            # the rest arrive mid-flight
        eng.step()
    for j, (stab, conf, _, _) in enumerate(specs[5:], 5):
        eng.submit([21, 22, 23], seed=j, request_id=f"r{j}", stability_threshold=stab, confidence_threshold=conf, **kw)
    res = eng.run()
    passes = {j: res[f"r{j}"].decoder_passes for j in range(len(specs))}
    assert passes == {j: expected_passes(j, 2) for j in range(len(specs))}
    assert len(set(passes.values())) >= 4                         # the rule fired at different steps


@pytest.mark.parametrize("sampler", ["exact", "fast"])
def test_logprobs_are_the_converged_step_s(tmp_path, sampler):
    """generate's and the engine's per-token log-probabilities: with one step per canvas, log_softmax of the first
    canvas's denoiser logits at the temperature of that step, at its argmax; 0 under top_k=1 (one token left);
    0 where pad replaced a token; the engine's equal generate's."""
    from dgemma import sampling
    m = peaky(tmp_path)
    prompt, C, V = list(range(20, 29)), m.config.canvas_length, m.config.vocab_size
    kw = dict(KW, max_denoising_steps=1)
    out = m.generate(torch.tensor([prompt]), seed=5, sampler=sampler, **kw)
    canvas = sampling.init_canvas(1, C, V, "cpu", torch.Generator().manual_seed(5))   # generate's first draw
    s = m.sampler_config
    lam = m.denoise_logits(torch.tensor([prompt]), canvas)[0] / sampling.temperature(1, 1, s.t_min, s.t_max)
    assert out.logprobs.shape == (1, out.sequences.shape[1] - len(prompt))
    assert torch.allclose(out.logprobs[0, :C], lam.log_softmax(-1).amax(-1), atol=1e-5)
    assert (out.logprobs <= 0).all() and (out.logprobs < -1e-3).any()
    assert torch.equal(m.generate(torch.tensor([prompt]), seed=5, sampler=sampler, top_k=1, **kw).logprobs,
                       torch.zeros_like(out.logprobs))
    for seed in range(3, 60):                          # the first seed whose reply ends at an EOS before its end
        full = m.generate(torch.tensor([prompt]), seed=seed, sampler=sampler, **KW)
        new = full.sequences[0, len(prompt):].tolist()
        eos = next((i for i, t in enumerate(new) if t in KW["eos_token_id"]), len(new))
        if eos < len(new) - 1:
            break
    assert (full.logprobs[0, eos + 1:] == 0).all() and (full.logprobs[0, :eos + 1] < 0).any()
    eng = Engine(m, sampler=sampler)
    rid = eng.submit(prompt, seed=seed, **KW)
    res = eng.run()[rid]
    assert len(res.logprobs) == len(res.tokens) == eos + 1
    assert torch.allclose(torch.tensor(res.logprobs), full.logprobs[0, :eos + 1], atol=1e-6)


def test_generate_keeps_a_frozen_row_s_logprobs(tmp_path, monkeypatch):
    """Rows that the stop rule freezes at different steps keep the log-probabilities of their freeze step (the
    batch goes on denoising the others): checked against every step's own, recorded."""
    from dgemma import generate as gen_module, sampling
    m = peaky(tmp_path)
    kw = dict(KW, max_new_tokens=m.config.canvas_length, max_denoising_steps=10, stability_threshold=0,
              confidence_threshold=4.0)                 # this model and seed: rows stop after 7, 7, 7 and 6 steps
    steps, real = [], gen_module.denoise_step

    def recording(*a, **k):
        out = real(*a, **k)
        steps.append((out[1].clone(), out[2].clone(), out[4].clone()))          # argmax, entropy, logprob
        return out
    monkeypatch.setattr(gen_module, "denoise_step", recording)
    ids = torch.randint(20, 512, (4, 7), generator=torch.Generator().manual_seed(2))
    out = m.generate(ids, seed=1, **kw)
    stopper = sampling.StableAndConfident(0, 4.0, 4, m.config.canvas_length, "cpu")
    first = [None] * 4
    for i, (am, ent, _) in enumerate(steps):
        for r, f in enumerate(stopper(am, ent).tolist()):
            first[r] = i if f and first[r] is None else first[r]
    assert len(set(first)) > 1 and None not in first        # rows froze at different steps
    for r, f in enumerate(first):
        keep = out.sequences[r, 7:] == steps[f][0][r]       # (pad after an EOS: logprob 0 there)
        assert torch.equal(out.logprobs[r][keep], steps[f][2][r][keep]), r


@pytest.mark.parametrize("sampler", ["exact", "fast"])
def test_top_logprobs_and_prompt_scores(tmp_path, sampler):
    """top_logprobs=N: each committed token's N most likely alternatives, the token itself first with its own
    log-probability, and the same tokens as without. prompt_logprobs: the causal encoder's log-probabilities of
    each prompt token given the ones before, equal to one encoder pass over the prompt, also when it is encoded
    chunk by chunk, and never taken from the prefix store; max_new_tokens=0 scores without generating."""
    m = peaky(tmp_path)
    prompt = torch.randint(20, 512, (11,), generator=torch.Generator().manual_seed(3)).tolist()
    kw = dict(KW, max_new_tokens=20)
    runs = {}
    for name, extra in (("plain", {}), ("top", dict(top_logprobs=3))):
        eng = Engine(m, max_batch=2, sampler=sampler, prefill_chunk=4)
        runs[name] = eng.run() if eng.submit(prompt, seed=4, request_id="r", **kw, **extra) else None
    plain, top = runs["plain"]["r"], runs["top"]["r"]
    assert top.tokens == plain.tokens and top.logprobs == plain.logprobs
    assert plain.top_logprobs == [[]] * len(plain.tokens) and plain.prompt_logprobs is None
    assert len(top.top_logprobs) == len(top.tokens)
    for t, lp, alts in zip(top.tokens, top.logprobs, top.top_logprobs):
        assert len(alts) == 3 and alts[0][0] == t and abs(alts[0][1] - lp) < 1e-5
        assert alts[0][1] >= alts[1][1] >= alts[2][1] and len({a for a, _ in alts}) == 3
    assert any(a[1][1] > -30 for a in top.top_logprobs)            # not all alternatives are negligible
    with torch.inference_mode():                                    # the prompt's scores, from one pass
        h = m.encode(torch.tensor([prompt]), m.new_cache(1, len(prompt), scratch=1))[0]
        lsm = m.head(h).log_softmax(-1)                                                 # [L, V]
    want = lsm[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
    eng = Engine(m, max_batch=2, sampler=sampler, prefill_chunk=4)
    eng.submit(prompt, seed=4, request_id="warm", **kw)             # leaves its prompt's snapshots in the store
    eng.run()
    eng.submit(prompt, seed=4, request_id="again", **kw)
    eng.submit(prompt, request_id="score", prompt_logprobs=2, **dict(kw, max_new_tokens=0))
    eng.submit(prompt, seed=4, request_id="both", prompt_logprobs=0, **kw)
    events = []
    while eng.has_work():
        events += eng.step()
    res = {k: eng.collect(k) for k in ("again", "score", "both")}
    assert res["again"].cached_tokens == 8                          # the store had the prompt ...
    assert res["score"].cached_tokens == res["both"].cached_tokens == 0   # ... scoring encoded it all the same
    score = res["score"]
    assert score.tokens == [] and score.finish_reason == "length" and score.decoder_passes == 0
    assert score.prompt_logprobs[0] is None and len(score.prompt_logprobs) == len(prompt)
    assert torch.allclose(torch.tensor(score.prompt_logprobs[1:]), want, atol=1e-4)
    assert score.prompt_top_logprobs[0] == [] and all(len(a) == 2 for a in score.prompt_top_logprobs[1:])
    best = lsm[:-1].topk(2)
    assert [[t for t, _ in a] for a in score.prompt_top_logprobs[1:]] == best.indices.tolist()
    assert torch.allclose(torch.tensor([[p for _, p in a] for a in score.prompt_top_logprobs[1:]]), best.values,
                          atol=1e-4)
    both = res["both"]
    assert both.tokens == plain.tokens and both.prompt_logprobs == score.prompt_logprobs
    assert both.prompt_top_logprobs == [[]] * len(prompt)
    firsts = [e for e in events if e.request_id == "both"]
    assert firsts[0].prompt_logprobs == score.prompt_logprobs and all(e.prompt_logprobs is None for e in firsts[1:])
    assert [e for e in events if e.request_id == "score"][0].finished


def test_engine_rejects_bad_logprob_counts(tmp_path):
    m = peaky(tmp_path)
    eng = Engine(m)
    for bad in (dict(top_logprobs=-1), dict(prompt_logprobs=m.config.vocab_size + 1), dict(top_logprobs=1.5)):
        with pytest.raises(ValueError, match="logprobs must be an int"):
            eng.submit([21, 22], **bad)
    for bad in (-1, 0.0, False):                        # (0 encodes only; 0.0 and False are not 0)
        with pytest.raises(ValueError, match="max_new_tokens"):
            eng.submit([21, 22], max_new_tokens=bad)


def test_a_failed_step_keeps_the_requests_it_ended(tmp_path, monkeypatch):
    """A request that ended in the prompt phase (max_new_tokens 0) still comes out of the next step when the
    denoising part of the step that ended it raised."""
    eng = Engine(peaky(tmp_path), max_batch=2)
    eng.submit([21, 22, 23], seed=1, request_id="running", max_new_tokens=8)
    eng.step()                                          # "running" denoises from now on
    eng.submit([21, 22], request_id="scored", max_new_tokens=0, prompt_logprobs=0)
    real = eng._denoise
    monkeypatch.setattr(eng, "_denoise", lambda: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError):
        eng.step()
    monkeypatch.setattr(eng, "_denoise", real)
    assert [e.request_id for e in eng.step() if e.request_id == "scored"] == ["scored"]


@pytest.mark.parametrize("sampler", ["exact", "fast"])
def test_logit_bias_and_penalties(tmp_path, monkeypatch, sampler):
    """logit_bias moves each position's logits (+100: every token that one; -100: a token never seen again);
    presence / frequency penalties subtract from the logits of the tokens a request has committed, recounted at each
    commit (the bias each step gets, recorded, equals the definition); a request without them, batched with one
    that has them, gets its own tokens."""
    from dgemma import engine as engine_module
    m = peaky(tmp_path)
    V, prompt = m.config.vocab_size, [21, 22, 23, 24]
    kw = dict(KW, max_new_tokens=24, eos_token_id=None)

    def run(**extra):
        eng = Engine(m, max_batch=2, sampler=sampler)
        rid = eng.submit(prompt, seed=9, **kw, **extra)
        return eng.run()[rid].tokens
    plain = run()
    assert set(run(logit_bias={77: 100.0})) == {77}
    common = max(set(plain), key=plain.count)
    assert common not in run(logit_bias={common: -100.0})
    steps, real = [], engine_module.denoise_step

    def recording(*a, **k):
        steps.append((a[2].clone(), None if k.get("bias") is None else k["bias"].clone()))    # canvas, bias
        return real(*a, **k)
    monkeypatch.setattr(engine_module, "denoise_step", recording)
    if sampler == "fast":                               # (the fast path calls denoise_step through _fast_step)
        monkeypatch.setattr(engine_module.Engine, "_fast_step", lambda self, *a: recording(
            self.model, self.cache, *a[:4], self.row_chunk, uniform=a[4], renoise=a[5], greedy=a[6],
            truncation=a[7], alternatives=a[8], bias=a[9]))
    eng = Engine(m, max_batch=2, sampler=sampler)
    eng.submit(prompt, seed=9, request_id="pen", presence_penalty=1.5, frequency_penalty=2.0, **kw)
    eng.submit(prompt, seed=9, request_id="plain", **kw)
    res = eng.run()
    assert res["plain"].tokens == plain
    C, seen = m.config.canvas_length, torch.zeros(V)
    toks = res["pen"].tokens
    for i, (_, bias) in enumerate(steps):
        assert bias is not None and bias.shape == (2, V) and (bias[1] == 0).all()
        canvas = i // kw["max_denoising_steps"]       # (no stop rule fires before the last step: checked below)
        seen = torch.bincount(torch.tensor(toks[:canvas * C], dtype=torch.long), minlength=V).float()
        assert torch.equal(bias[0], -(1.5 * (seen > 0) + 2.0 * seen)), i
    assert len(steps) == kw["max_denoising_steps"] * -(-len(toks) // C) and (steps[-1][1][0] < 0).any()
    # generate's own loop applies the same: its tokens equal the engine's (batch 1), with logit_bias too
    for extra in (dict(presence_penalty=1.5, frequency_penalty=2.0), dict(logit_bias={77: 100.0}),
                  dict(presence_penalty=30.0, logit_bias={common: 5.0})):
        eng = Engine(m, max_batch=1, sampler=sampler)
        rid = eng.submit(prompt, seed=9, **kw, **extra)
        out = m.generate(torch.tensor([prompt]), seed=9, sampler=sampler, **kw, **extra)
        got = eng.run()[rid].tokens                     # (generate returns whole canvases: the engine cuts at 24)
        assert got == out.sequences[0, len(prompt):len(prompt) + len(got)].tolist(), extra
    strong = m.generate(torch.tensor([prompt]), seed=9, sampler=sampler, presence_penalty=30.0, **kw)
    new = strong.sequences[0, len(prompt):].tolist()
    assert new != plain and all(t not in new[:(i // C) * C] for i, t in enumerate(new))   # no token twice across
    for bad in (dict(presence_penalty=float("nan")), dict(frequency_penalty=True), dict(logit_bias={V: 1.0}),
                dict(presence_penalty=1e39), dict(logit_bias={5: 1e39}), dict(logit_bias={5: float("inf")})):
        with pytest.raises(ValueError):
            m.generate(torch.tensor([prompt]), seed=9, **kw, **bad)


def test_a_biased_step_uses_the_plain_sampler_s_chunks(tmp_path, monkeypatch):
    """A step with a bias (or truncation) runs the torch sampler, so it takes at most the torch sampler's rows per
    chunk, not the fused kernel's 4x larger ones the caller may have sized for (a 262k vocabulary: ~6 GB of fp32
    buffers instead of ~1.5 GB)."""
    from dgemma import sampling
    m = peaky(tmp_path)
    rows, real = [], sampling.sample_rows
    monkeypatch.setattr(sampling, "rows_per_chunk", lambda V, fused=False: 8 * (4 if fused else 1))
    monkeypatch.setattr(sampling, "sample_rows", lambda logits, *a, **k: rows.append(len(logits)) or real(
        logits, *a, **k))
    kw = dict(KW, max_new_tokens=m.config.canvas_length, max_denoising_steps=2)
    m.generate(torch.tensor([[21, 22, 23]]), seed=1, sampler="fast", row_chunk=32, **kw)
    assert max(rows) == min(32, m.config.canvas_length)           # the caller's chunks
    rows.clear()
    m.generate(torch.tensor([[21, 22, 23]]), seed=1, sampler="fast", row_chunk=32, presence_penalty=1.0, **kw)
    assert max(rows) == 8
