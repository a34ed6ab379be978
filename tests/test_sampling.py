"""The lean sampler takes the reference sampler's decisions on fixed logits; the fast sampler samples the
same distribution."""
import pytest
import torch

from dgemma import sampling

transformers = pytest.importorskip("transformers")
from transformers.models.diffusion_gemma.generation_diffusion_gemma import (  # noqa: E402
    EntropyBoundSampler, EntropyBoundSamplerConfig, LinearTemperatureScheduleLogitsProcessor,
    StableAndConfidentStoppingCriteria)


def fixed_logits(B=3, C=64, V=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, V, generator=g) * torch.linspace(0.5, 12, C)[None, :, None]   # flat to peaked
    return torch.tanh(x / 30) * 30


@pytest.mark.parametrize("step", [16, 9, 1])
def test_exact_sampler_matches_reference_decisions(step):
    B, C, V, N = 3, 64, 1000, 16
    logits = fixed_logits(B, C, V)
    # reference: temperature processor, softmax + multinomial, argmax, entropy-bound accept, renoise, stop
    torch.manual_seed(5)
    lam = LinearTemperatureScheduleLogitsProcessor(0.4, 0.8, N)(None, logits.clone(),
                                                                  cur_step=torch.tensor(step, dtype=torch.int32))
    probs = torch.softmax(lam, dim=-1, dtype=torch.float32)
    ref_sample = torch.multinomial(probs.view(-1, V), 1).view(B, C)
    smp = EntropyBoundSampler(EntropyBoundSamplerConfig(entropy_bound=0.5), C, V, N)
    current = torch.zeros(B, C, dtype=torch.long)
    accepted = smp.accept_canvas(current, ref_sample, lam, step)
    ref_next = smp.renoise_canvas(accepted, step)
    stop = StableAndConfidentStoppingCriteria(0, 3.0)(lam.argmax(-1), lam)
    # ours, same seed
    g = torch.Generator().manual_seed(5)
    temp = sampling.temperature(step, N, 0.4, 0.8)
    q = torch.empty(B * C, V).exponential_(1, generator=g)
    r = sampling.sample_rows(logits.clone().view(B * C, V), temp, q)
    accept = sampling.entropy_bound_accept(r.entropy.view(B, C), 0.5)
    ours_next = torch.where(accept, r.sample.view(B, C), sampling.init_canvas(B, C, V, "cpu", g))
    ours_stop = sampling.StableAndConfident(0, 3.0, B, C, "cpu")(r.argmax.view(B, C), r.entropy.view(B, C))
    assert torch.equal(r.sample.view(B, C), ref_sample)
    assert torch.equal(accept, smp.accepted_token_mask)
    assert accept.sum() > B                          # more than the forced single token per row
    assert torch.equal(ours_next, ref_next)
    assert torch.equal(r.argmax.view(B, C), lam.argmax(-1))
    assert torch.equal(ours_stop, stop)


def test_fast_sampler_same_decisions_and_distribution():
    B, C, V = 2, 32, 50
    logits = fixed_logits(B, C, V, seed=1)
    temp = sampling.temperature(5, 8, 0.4, 0.8)
    q = torch.empty(B * C, V).exponential_(1)
    exact = sampling.sample_rows(logits.clone().view(-1, V), temp, q)
    fast = sampling.sample_rows(logits.clone().view(-1, V), temp, uniform=torch.rand(B * C))
    assert torch.equal(exact.argmax, fast.argmax)
    assert torch.allclose(exact.entropy, fast.entropy, atol=1e-4)
    logp = (logits.view(-1, V) / temp).log_softmax(-1).amax(-1)               # the argmax's log-probability
    assert torch.allclose(exact.logprob, logp, atol=1e-5) and torch.allclose(fast.logprob, logp, atol=1e-5)
    assert torch.equal(sampling.entropy_bound_accept(exact.entropy.view(B, C), 0.3),
                       sampling.entropy_bound_accept(fast.entropy.view(B, C), 0.3))
    # distribution: many draws from one flat-ish row vs its probabilities (chi-square, generous bound)
    row = logits.view(-1, V)[3:4]
    p = torch.softmax(row / temp, -1)[0]
    n = 20000
    draws = sampling.sample_rows(row.repeat(n, 1), temp, uniform=torch.rand(n, generator=torch.Generator()
                                                                             .manual_seed(0))).sample
    counts = torch.bincount(draws, minlength=V).float()
    expected = p * n
    keep = expected > 5
    chi2 = (((counts - expected) ** 2) / expected)[keep].sum().item()
    dof = int(keep.sum()) - 1
    assert chi2 < dof + 6 * (2 * dof) ** 0.5          # ~6 sigma: a wrong sampler fails by orders of magnitude
    assert counts[~keep].sum() < 0.01 * n + 50


def test_two_level_inverse_cdf_draws_like_the_full_cumsum():
    """Blocks of 256 (no [n, V] cumulative sum): the same index as the one-level inverse CDF for the same
    uniforms, and the right distribution, including rows with zero-probability entries."""
    g = torch.Generator().manual_seed(3)
    n, V = 2000, 64 * 256
    e = torch.rand(n, V, generator=g) ** 8
    e[:, ::7] = 0.0                                    # impossible tokens must never be drawn
    u = torch.rand(n, generator=g)
    two, z2 = sampling.inverse_cdf(e, u)
    one, z1 = sampling.inverse_cdf(e, u, block=V + 1)  # not a multiple: the one-level path
    assert (two == one).float().mean() > 0.995 and torch.allclose(z1, z2, rtol=1e-5)   # rounding at block edges
    assert (two % 7 != 0).all()
    row = e[:1].expand(20_000, V).contiguous()
    draws, _ = sampling.inverse_cdf(row, torch.rand(20_000, generator=g))
    blk = e[0].view(64, 256).sum(-1) / e[0].sum()      # per block: enough draws per cell for chi-square
    counts = torch.bincount(draws // 256, minlength=64).double()
    keep = blk * 20_000 > 5
    chi2 = float(((counts - 20_000 * blk) ** 2 / (20_000 * blk))[keep].sum())
    dof = int(keep.sum()) - 1
    assert chi2 < dof + 6 * (2 * dof) ** 0.5


def test_inverse_cdf_never_draws_impossible_tokens_at_block_edges():
    """Targets just below a block boundary, the block's last token impossible: rounding between the block sums and
    the in-block sums must not push a draw onto it (both paths)."""
    n, V = 4000, 64 * 256
    g = torch.Generator().manual_seed(5)
    e = torch.rand(1, V, generator=g).expand(n, V).contiguous()
    e[:, 255::256] = 0.0
    e[:, -1] = 0.0
    cb = torch.cumsum(e[0].view(64, 256).sum(-1), 0)
    edges = cb[torch.randint(0, 63, (n,), generator=g)] / cb[-1]
    u = (edges - torch.rand(n, generator=g) * 1e-6).clamp(0, 1 - 1e-7)
    for block in (256, V + 1):
        ids, _ = sampling.inverse_cdf(e, u, block=block)
        assert (e.gather(1, ids[:, None]) > 0).all()
    ids, _ = sampling.inverse_cdf(e, torch.full((n,), 1 - 2 ** -24))   # u as close to 1 as fp32 gets
    assert (e.gather(1, ids[:, None]) > 0).all()


def _spread_logits(n: int, V: int, seed: int) -> torch.Tensor:
    """Softcapped logits as a trained model gives them (most far under the max at a low temperature)."""
    g = torch.Generator().manual_seed(seed)
    return 30 * torch.tanh(torch.randn(n, V, generator=g) * 8 / 30)


def test_fast_sampler_keeps_the_cpu_exp_above_its_floor():
    """At T = 0.1 most of lam - max lies below -87.3, where torch's vectorised CPU exp (and the matmul and dot
    product after it, on subnormal e) leave their fast paths: the fast sampler floors lam - max at EXP_FLOOR
    on the CPU, so every exp it runs sees values >= EXP_FLOOR."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class ExpInputs(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ in ("exp", "exp_"):
                seen.append(float(args[0].min()))
            return func(*args, **(kwargs or {}))

    logits = _spread_logits(64, 4096, seed=0)
    assert float((logits / 0.1 - (logits / 0.1).max(-1, keepdim=True).values).min()) < -400   # far under
    with ExpInputs():
        sampling.sample_rows(logits.clone(), torch.tensor(0.1), uniform=torch.rand(64))
    assert seen and min(seen) >= sampling.EXP_FLOOR > -87.3


@pytest.mark.parametrize("V", [4096, 64 * 256])               # one cumulative sum; the two-level search
def test_exp_floor_changes_no_result(monkeypatch, V):
    """The floor's added mass (at most V * exp(EXP_FLOOR)) is far below float32's resolution: the same samples
    and argmax, entropy and soft embedding equal up to the last bits, against the fast sampler without it."""
    from dgemma.model import Embedding

    n, H = 128, 64
    emb = Embedding(V, H).requires_grad_(False)
    scale = torch.tensor(H ** 0.5)
    u = torch.rand(n, generator=torch.Generator().manual_seed(1))
    for T in (0.1, 0.5):
        logits = _spread_logits(n, V, seed=2)
        floored = sampling.sample_rows(logits.clone(), torch.tensor(T), None, emb, scale, u)
        monkeypatch.setattr(sampling, "EXP_FLOOR", float("-inf"))
        plain = sampling.sample_rows(logits.clone(), torch.tensor(T), None, emb, scale, u)
        monkeypatch.undo()
        assert torch.equal(floored.sample, plain.sample) and torch.equal(floored.argmax, plain.argmax)
        assert torch.allclose(floored.entropy, plain.entropy, rtol=1e-6, atol=1e-12)
        assert torch.allclose(floored.soft, plain.soft, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("V", [4096, 64 * 256])               # one cumulative sum; the two-level search
def test_a_zero_uniform_draws_from_the_middle_of_its_cell(V):
    """torch.rand gives exactly 0 once in 2^24 draws: the fast sampler keeps uniforms >= U_MIN, so such a draw
    takes the entry at 2^-25 of the mass, not the first entry with any weight (with EXP_FLOOR on the CPU every
    entry has some: token 0, whatever its probability)."""
    logits = _spread_logits(8, V, seed=4)
    logits[:, 0] = logits.min(-1).values                   # token 0: far under the max (floored at T = 0.1)
    for T in (0.1, 1.0):
        zero = sampling.sample_rows(logits.clone(), torch.tensor(T), uniform=torch.zeros(8)).sample
        low = sampling.sample_rows(logits.clone(), torch.tensor(T), uniform=torch.full((8,), sampling.U_MIN)).sample
        assert torch.equal(zero, low) and bool((zero != 0).all())


@pytest.mark.parametrize("stability", [0, 1, 2, 3])
def test_stop_rule_equals_reference_over_steps(stability):
    """Our run-length form of the stable-and-confident rule decides as the reference's history of canvases,
    step after step, as a batch and with per-row [B] thresholds (the engine's form)."""
    B, C, V = 4, 6, 5
    g = torch.Generator().manual_seed(stability)
    ref = StableAndConfidentStoppingCriteria(stability, 1.2)
    ours = sampling.StableAndConfident(stability, 1.2, B, C, "cpu")
    prev, run = torch.full((B, C), -1), torch.zeros(B, dtype=torch.long)
    argmax = torch.randint(0, V, (B, C), generator=g)
    fired = 0
    for step in range(14):
        # rows keep their argmax for a while, then change one position (row 0 never changes)
        change = torch.rand(B, generator=g) < 0.3
        change[0] = False
        argmax = argmax.clone()
        argmax[change, step % C] = (argmax[change, step % C] + 1) % V
        lam = torch.randn(B, C, V, generator=g) * torch.tensor([3.0, 0.5, 3.0, 0.5])[:, None, None]
        want = ref(argmax, lam)
        ent = sampling.entropy(lam)
        assert torch.equal(ours(argmax, ent), want), step
        stop, run = sampling.stable_and_confident(argmax, prev, run, ent, torch.full((B,), stability),
                                                  torch.full((B,), 1.2))
        prev = argmax
        assert torch.equal(stop, want), step
        fired += int(want.sum())
    assert fired                                  # the rule did fire (confident rows 0 and 2)


def test_stop_rule_with_a_stability_past_int64_never_fires():
    """A stability no run can reach (even one past int64, which a tensor cannot hold) is simply never met."""
    rule = sampling.StableAndConfident(*sampling.stop_rule(2**63, 1.0), 2, 3, "cpu")
    argmax = torch.zeros(2, 3, dtype=torch.long)
    for _ in range(4):
        assert not rule(argmax, torch.zeros(2, 3)).any()


CUTS = [(0, 0.9), (5, 1.0), (5, 0.8), (60, 0.5), (1, 1.0), (3, 0.0), (1000, 0.999), (0, 1.0), (1000, 1.0)]


def _warped(logits, k, p):
    """What transformers' warpers keep: TopK(k) then TopP(p) on 2-D scores (the -inf they write)."""
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper
    x = logits.clone()
    if k:
        x = TopKLogitsWarper(k)(None, x)
    if p < 1:
        x = TopPLogitsWarper(p)(None, x)
    return torch.isinf(x)


def test_dropped_equals_transformers_top_k_top_p():
    logits = fixed_logits(1, 12, 300, seed=3).view(12, 300)
    logits[0, :5] = logits[0].max()                     # a tie at the top: top-k keeps every tied entry
    for k, p in CUTS:
        want = _warped(logits, k, p)
        got = sampling.dropped(logits, k, p)
        assert (got is None) == (k in (0, 1000) and p == 1.0)     # (k = 1000 > V = 300 keeps every entry)
        assert torch.equal(got if got is not None else torch.zeros_like(want), want), (k, p)
    # a request's settings as the steps take them: None (graphs and the fused sampler kept) when nothing drops
    assert sampling.truncation(300, 1.0, 300) is None and sampling.truncation(0, 1.0, 300) is None
    assert sampling.truncation(300, 0.9, 300) == (0, 0.9) and sampling.truncation(299, 1.0, 300) == (299, 1.0)
    # per-row values (the engine's rows with different requests): each row as its own call would drop
    ks = torch.tensor([k for k, _ in CUTS] + [2] * 3)
    ps = torch.tensor([p for _, p in CUTS] + [0.3] * 3, dtype=torch.float64)
    got = sampling.dropped(logits, ks, ps)
    for i in range(12):
        assert torch.equal(got[i], _warped(logits[i:i + 1], int(ks[i]), float(ps[i]))[0]), i


@pytest.mark.parametrize("k,p", [(4, 1.0), (0, 0.7), (6, 0.6)])
def test_truncated_sampler_draws_only_kept_tokens(k, p):
    B, C, V = 2, 32, 60
    logits = fixed_logits(B, C, V, seed=4).view(-1, V)
    temp = sampling.temperature(5, 8, 0.4, 0.8)
    drop = sampling.dropped(logits, k, p)
    want = logits.masked_fill(drop, -torch.inf) / temp                   # the truncated distribution
    exact = sampling.sample_rows(logits.clone(), temp, torch.empty(B * C, V).exponential_(1), top_k=k, top_p=p)
    fast = sampling.sample_rows(logits.clone(), temp, uniform=torch.rand(B * C), top_k=k, top_p=p)
    for r in (exact, fast):
        assert not drop.gather(1, r.sample[:, None]).any()
        assert torch.equal(r.argmax, want.argmax(-1))
        assert torch.allclose(r.entropy, sampling.entropy(want.clone()), atol=1e-4)
        assert torch.allclose(r.logprob, want.log_softmax(-1).amax(-1), atol=1e-5)   # of the truncated distribution
    assert (exact.entropy < sampling.entropy(logits / temp) - 1e-3).any()    # it did truncate something
    # the fast draw follows the truncated distribution (one row, many draws)
    row, n = logits[7:8], 20000
    draws = sampling.sample_rows(row.repeat(n, 1), temp, uniform=torch.rand(n, generator=torch.Generator()
                                                                             .manual_seed(1)), top_k=k, top_p=p)
    counts = torch.bincount(draws.sample, minlength=V).float()
    expected = torch.softmax(want[7], -1) * n
    assert counts[expected == 0].sum() == 0
    keep = expected > 5
    chi2 = (((counts - expected) ** 2) / expected)[keep].sum().item()
    dof = max(int(keep.sum()) - 1, 1)
    assert chi2 < dof + 6 * (2 * dof) ** 0.5


@pytest.mark.parametrize("k,p", [(5, 1.0), (0, 0.7), (40, 0.5)])
def test_truncated_exact_sampler_matches_reference_decisions(k, p):
    """On the same logits: the reference with transformers' warpers before its temperature processor
    (softmax, multinomial, entropy-bound acceptance, the stop rule's entropies) = sample_rows(top_k, top_p)."""
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper
    B, C, V, N, step = 2, 32, 400, 8, 5
    logits = fixed_logits(B, C, V, seed=6)
    x = logits.clone().view(B * C, V)
    x = TopKLogitsWarper(k)(None, x) if k else x
    x = TopPLogitsWarper(p)(None, x) if p < 1 else x
    torch.manual_seed(5)
    lam = LinearTemperatureScheduleLogitsProcessor(0.4, 0.8, N)(None, x.view(B, C, V),
                                                                  cur_step=torch.tensor(step, dtype=torch.int32))
    ref_sample = torch.multinomial(torch.softmax(lam, -1, dtype=torch.float32).view(-1, V), 1).view(B, C)
    smp = EntropyBoundSampler(EntropyBoundSamplerConfig(entropy_bound=0.5), C, V, N)
    smp.accept_canvas(torch.zeros(B, C, dtype=torch.long), ref_sample, lam, step)
    g = torch.Generator().manual_seed(5)
    q = torch.empty(B * C, V).exponential_(1, generator=g)
    r = sampling.sample_rows(logits.clone().view(B * C, V), sampling.temperature(step, N, 0.4, 0.8), q,
                             top_k=k, top_p=p)
    assert torch.equal(r.sample.view(B, C), ref_sample)
    assert torch.equal(r.argmax.view(B, C), lam.argmax(-1))
    assert torch.equal(sampling.entropy_bound_accept(r.entropy.view(B, C), 0.5), smp.accepted_token_mask)
    assert torch.equal(r.entropy.view(B, C), torch.distributions.Categorical(logits=lam).entropy())


@pytest.mark.parametrize("k,p", [(0, 1.0), (3, 1.0), (0, 0.5)])
def test_alternatives_are_the_most_likely_tokens_of_the_distribution(k, p):
    """alternatives=N: each row's N most likely tokens and their log-probabilities under the distribution the
    argmax's log-probability is taken from (truncated, tempered), exact and fast sampler alike; truncated tokens
    -inf; exact where the fast sampler's CPU floor (EXP_FLOOR below the max) would cut lam."""
    B, C, V, N = 2, 32, 60, 5
    logits = fixed_logits(B, C, V, seed=6).view(-1, V)
    temp = torch.tensor(0.1)
    drop = sampling.dropped(logits, k, p)
    want = (logits if drop is None else logits.masked_fill(drop, -torch.inf)) / temp
    vals, ids = want.log_softmax(-1).topk(N)
    assert (vals < sampling.EXP_FLOOR).any() and (vals > -1).any()          # the floor's case is there
    kept = vals.isfinite()
    assert (~kept).any() == (k > 0 or p < 1)
    exact = sampling.sample_rows(logits.clone(), temp, torch.empty(B * C, V).exponential_(1), top_k=k, top_p=p,
                                 alternatives=N)
    fast = sampling.sample_rows(logits.clone(), temp, uniform=torch.rand(B * C), top_k=k, top_p=p, alternatives=N)
    plain = sampling.sample_rows(logits.clone(), temp, uniform=torch.rand(B * C), top_k=k, top_p=p)
    assert plain.top_ids is None and plain.top_logprobs is None
    for r in (exact, fast):
        assert r.top_ids.shape == r.top_logprobs.shape == (B * C, N)
        assert torch.equal(r.top_ids[kept], ids[kept])
        assert torch.allclose(r.top_logprobs[kept], vals[kept], atol=1e-4)
        assert (r.top_logprobs[~kept] == -torch.inf).all()
        assert torch.equal(r.top_ids[:, 0], r.argmax) and torch.equal(r.top_logprobs[:, 0], r.logprob)


def test_alternatives_put_the_argmax_first_on_ties():
    """Where several tokens tie for the max, the first alternative is the argmax the sampler commits (topk may order
    the tied ones differently), exact and fast alike; argmax_first keeps the rest of the ids."""
    V = 40
    logits = torch.randn(6, V, generator=torch.Generator().manual_seed(1))
    logits[:, [3, 17, 29]] = 9.0                     # a three-way tie for the max in every row
    temp = torch.tensor(0.5)
    for kw in (dict(noise=torch.empty(6, V).exponential_(1)), dict(uniform=torch.rand(6))):
        r = sampling.sample_rows(logits.clone(), temp, alternatives=2, **kw)
        assert torch.equal(r.top_ids[:, 0], r.argmax) and (r.argmax == 3).all()
        assert torch.equal(r.top_logprobs[:, 0], r.top_logprobs[:, 1])     # (both tied tokens)
    ids = torch.tensor([[17, 3, 29], [17, 29, 5], [3, 17, 29]])
    assert sampling.argmax_first(ids, torch.tensor([3, 3, 3])).tolist() == [[3, 17, 29], [3, 29, 5], [3, 17, 29]]
