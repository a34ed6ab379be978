"""Training: the objective reads the same context as inference, losses fall, resume after kill -9, DDP."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import dgemma
from dgemma.config import ModelConfig
from dgemma.model import DiffusionGemma
from dgemma.sampling import EXP_FLOOR
from dgemma.train.data import Example, pack
from dgemma.train.loop import TrainConfig, TrainError, init_weights, train
from dgemma.train.objective import ObjectiveConfig, _denoiser_pass, _encoder_pass, losses

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=2,
            num_key_value_heads=1, head_dim=16, global_head_dim=16, num_global_key_value_heads=1,
            sliding_window=6, num_experts=4, top_k_experts=2, moe_intermediate_size=16, canvas_length=8,
            dtype="float32", eos_token_id=[1])


def tiny_model(seed=0):
    return init_weights(DiffusionGemma(ModelConfig(**TINY)), seed, std=0.3).eval()


def test_objective_denoiser_matches_inference_context():
    m = tiny_model()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 64, (2, 4 + 3 * 8), generator=g)
    canvas = torch.randint(0, 64, (2, 8), generator=g)
    with torch.no_grad():
        h, kv = _encoder_pass(m, ids)
        assert torch.allclose(m.head(h), m.encoder_logits(ids), atol=1e-5)
        start = torch.tensor([4 + 8, 4 + 16])                # different canvas per row, beyond the window
        soft = torch.randn(2, 8, 32, generator=g)
        out = _denoiser_pass(m, canvas, start, kv, soft)
        for b in range(2):
            s = int(start[b])
            ref = m.head(m.denoise(canvas[b:b + 1], _cache_for(m, ids[b:b + 1, :s]), soft[b:b + 1]))
            assert torch.allclose(out[b:b + 1], ref, atol=1e-5), b


def _cache_for(m, ctx):
    cache = m.new_cache(1, ctx.shape[1])
    m.encode(ctx, cache)
    return cache


def _fit(cfg: ObjectiveConfig, steps: int):
    """Train a tiny model on a repetitive language; -> (first, last) (ar, diffusion) losses."""
    torch.manual_seed(0)
    m = tiny_model()
    m.train().requires_grad_(True)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    ids = torch.tensor([[(3 + (i * 7 + r) % 11) for i in range(4 + 2 * 8)] for r in range(8)])
    score = torch.ones_like(ids, dtype=torch.bool)
    g = torch.Generator().manual_seed(0)
    hist = []
    for _ in range(steps):
        out = losses(m, ids, score, cfg, g)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        hist.append((out["ar"].item(), out["diffusion"].item()))
    return hist[0], hist[-1]


def test_losses_fall_from_scratch():
    first, last = _fit(ObjectiveConfig(context_length=4), 40)
    assert last[0] < 0.5 * first[0]
    assert last[1] < 0.7 * first[1]


def test_prompt_tokens_are_not_scored():
    m = tiny_model()
    ids = torch.randint(3, 64, (2, 4 + 8))
    score = torch.zeros_like(ids, dtype=torch.bool)
    out = losses(m, ids, score, ObjectiveConfig(context_length=4))
    assert out["ar"].item() == 0 and out["diffusion"].item() == 0


def test_grouped_and_loop_experts_agree():
    m = tiny_model()
    x = torch.randn(2, 8, 32)
    layer = m.layers[0]
    w, idx = layer.router(x.reshape(-1, 32))
    with torch.no_grad():
        grouped = layer.experts(x.reshape(-1, 32), w, idx)
    x.requires_grad_(True)
    loop = layer.experts(x.reshape(-1, 32), w, idx)           # grad enabled -> loop path
    assert torch.allclose(grouped, loop.detach(), atol=1e-5)


def _data(n=64, seq=4 + 2 * 8):
    exs = [Example([(3 + (i * 5 + r) % 13) for i in range(seq)], [True] * seq) for r in range(n)]
    return pack(exs, seq, 0)


def test_checkpoint_loads_and_new_run_refuses_overwrite(tmp_path):
    cfg = TrainConfig(out=str(tmp_path / "run"), steps=4, batch_size=4, eval_every=2, save_every=2, warmup=1,
                      objective=ObjectiveConfig(context_length=4))
    ckpt = train(cfg, ModelConfig(**TINY), _data(), _data(8), progress=False)
    m = dgemma.load(ckpt)
    assert m.config.hidden_size == 32
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == 4 and "val_ar" in state["history"][-1]
    with pytest.raises(TrainError, match="already exists"):
        train(cfg, ModelConfig(**TINY), _data(), _data(8), progress=False)



def test_saves_delete_only_their_own_checkpoint_folders(tmp_path):
    out = tmp_path / "run"
    for name in ("ckpt-00000003-keep", "ckpt-notes", "ckpt-1"):
        (out / name).mkdir(parents=True)
        (out / name / "mine.txt").write_text("keep me")
    cfg = TrainConfig(out=str(out), steps=4, batch_size=2, eval_every=0, save_every=2, warmup=1,
                      objective=ObjectiveConfig(context_length=4))
    train(cfg, ModelConfig(**TINY), _data(), _data(8), progress=False)
    assert sorted(p.name for p in out.glob("ckpt-*")) == ["ckpt-00000003-keep", "ckpt-00000004", "ckpt-1",
                                                        "ckpt-notes"]
    assert all((out / n / "mine.txt").read_text() == "keep me" for n in ("ckpt-00000003-keep", "ckpt-notes"))



def _failing_losses(monkeypatch, at: int, how: str) -> None:
    """Make call `at` of the objective return a NaN loss or raise KeyboardInterrupt, or step `at` use lr = inf."""
    import dgemma.train.loop as loop
    real, calls = loop.losses, []
    if how == "lr=inf":
        monkeypatch.setattr(loop, "lr_at", lambda step, cfg: float("inf") if step == at - 1 else cfg.lr)
        return

    def fake(model, *a, **k):
        out = real(model, *a, **k)
        calls.append(1)
        if len(calls) == at:
            if how == "ctrl-c":
                raise KeyboardInterrupt
            out = {**out, "loss": out["loss"] * float("nan")}
        return out
    monkeypatch.setattr(loop, "losses", fake)


def _step_of(out):
    return json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"]


@pytest.mark.parametrize("how, msg", [("nan", "step 3: the loss is nan"),
                                      ("lr=inf", "step 3: the weights are no longer finite")])
def test_divergence_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys, how, msg):
    _failing_losses(monkeypatch, 3, how)
    out = tmp_path / "run"
    cfg = TrainConfig(out=str(out), steps=8, batch_size=2, eval_every=0, save_every=1, warmup=1,
                      objective=ObjectiveConfig(context_length=4))
    with pytest.raises(TrainError, match=msg):
        train(cfg, ModelConfig(**TINY), _data(), _data(8), progress=True)
    assert _step_of(out) == 2 and [p.name for p in out.glob("ckpt-*")] == ["ckpt-00000002"]
    assert all(torch.isfinite(p).all() for p in dgemma.load(out / "checkpoint").parameters())
    assert capsys.readouterr().err.endswith("\n")          # the progress bar's line is ended before the error


def test_ctrl_c_saves_the_current_step(tmp_path, monkeypatch, capsys):
    _failing_losses(monkeypatch, 4, "ctrl-c")
    out = tmp_path / "run"
    cfg = TrainConfig(out=str(out), steps=6, batch_size=2, eval_every=0, save_every=100, warmup=1,
                      objective=ObjectiveConfig(context_length=4))
    with pytest.raises(KeyboardInterrupt):
        train(cfg, ModelConfig(**TINY), _data(), _data(8), progress=True)
    assert _step_of(out) == 3
    assert capsys.readouterr().err.endswith(f"\ninterrupted at step 3; saved {out / 'checkpoint'} "
                                            "(resume with --resume)\n")
    monkeypatch.undo()
    train(cfg, ModelConfig(**TINY), _data(), _data(8), resume=True, progress=False)
    assert _step_of(out) == 6


def test_ctrl_c_waits_for_the_end_of_the_optimiser_step():
    from dgemma.train.loop import _hold_ctrl_c
    done = []
    with pytest.raises(KeyboardInterrupt):
        with _hold_ctrl_c():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            done.append(1)
    assert done == [1] and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)       # a process that ignores Ctrl-C keeps ignoring it
    try:
        with _hold_ctrl_c():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
    finally:
        signal.signal(signal.SIGINT, old)


def test_data_without_a_scored_canvas_token_is_refused(tmp_path):
    ids, score = _data()
    score[:, 4:] = False                                       # e.g. one short document padded to a sequence
    cfg = TrainConfig(out=str(tmp_path / "run"), steps=2, objective=ObjectiveConfig(context_length=4))
    with pytest.raises(TrainError, match="nothing to train on"):
        train(cfg, ModelConfig(**TINY), (ids, score), _data(8), progress=False)
    assert not (tmp_path / "run").exists()


SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_train import TINY, _data
from dgemma.config import ModelConfig
from dgemma.train.loop import TrainConfig, train
from dgemma.train.objective import ObjectiveConfig
cfg = TrainConfig(out={out!r}, steps={steps}, batch_size=4, eval_every=0, save_every=1, warmup=1,
                  objective=ObjectiveConfig(context_length=4))
train(cfg, ModelConfig(**TINY), _data(), _data(8), resume={resume}, progress=False)
"""


def _run(out, steps, resume, slow_after=None):
    code = SCRIPT.format(tests=str(Path(__file__).parent), out=str(out), steps=steps, resume=resume)
    return subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_resume_after_kill_9(tmp_path):
    out = tmp_path / "run"
    # reference: an uninterrupted run of 6 steps
    assert _run(tmp_path / "straight", 6, False).wait() == 0
    # interrupted: kill -9 once a checkpoint exists, then resume to 6 steps
    p = _run(out, 6, False)
    deadline = time.time() + 120
    while not (out / "checkpoint" / "trainer_state.json").exists() and time.time() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    step = json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"]
    assert 1 <= step <= 6
    assert _run(out, 6, True).wait() == 0
    a = dgemma.load(out / "checkpoint")
    b = dgemma.load(tmp_path / "straight" / "checkpoint")
    for (n, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.allclose(x, y, atol=1e-5), n


def test_ddp_two_processes(tmp_path):
    """torchrun with two CPU processes (gloo): both finish and the checkpoint loads."""
    code = SCRIPT.format(tests=str(Path(__file__).parent), out=str(tmp_path / "ddp"), steps=3, resume=False)
    script = tmp_path / "ddp_train.py"
    script.write_text(code)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
                        str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    m = dgemma.load(tmp_path / "ddp" / "checkpoint")
    assert json.loads((tmp_path / "ddp" / "checkpoint" / "trainer_state.json").read_text())["step"] == 3
    assert m.config.num_hidden_layers == 3


def test_block_causal_pass_equals_single_canvas_passes():
    m = tiny_model()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 64, (2, 4 + 3 * 8), generator=g)
    noisy = torch.randint(0, 64, (2, 3 * 8), generator=g)
    soft = torch.randn(2, 3 * 8, 32, generator=g)
    with torch.no_grad():
        _, kv = _encoder_pass(m, ids)
        start = torch.tensor([[4, 12, 20]] * 2)
        together = _denoiser_pass(m, noisy, start, kv, soft)
        for k in range(3):
            sl = slice(8 * k, 8 * (k + 1))
            alone = _denoiser_pass(m, noisy[:, sl], start[:, k], kv, soft[:, sl])
            assert torch.allclose(together[:, sl], alone, atol=1e-5), k


def test_all_canvases_objective_trains():
    first, last = _fit(ObjectiveConfig(context_length=4, all_canvases=True), 30)
    assert last[1] < 0.7 * first[1]


def test_noise_level_schedule():
    """t_power 1 is the spec's uniform t (mean 1/2); t_power 0.5 leans to heavy noise (mean 2/3); both one-canvas
    and all-canvases corruption follow it, and validation always measures at uniform t."""
    from dgemma.train.objective import _noise_all_canvases, _noise_one_canvas
    V, n, C = 1 << 20, 4, 64                 # replacements almost never equal the clean token
    ids = torch.zeros(256, n * C, dtype=torch.long)
    score = torch.ones(256, n, C, dtype=torch.bool)
    for power, mean in ((1.0, 0.5), (0.5, 2 / 3), (0.25, 0.8)):
        cfg = ObjectiveConfig(context_length=0, t_power=power)
        g = torch.Generator().manual_seed(0)
        _, x0, _, noisy, t = _noise_one_canvas(ids, score, V, cfg, g)
        assert abs((noisy != x0).float().mean().item() - mean) < 0.03, power
        assert t.shape == x0.shape and bool((t == t[:, :1]).all())      # one level per canvas
        _, x0, _, noisy, t = _noise_all_canvases(ids, score, V, cfg, g)
        assert abs((noisy != x0).float().mean().item() - mean) < 0.03, power
        assert abs(t.mean().item() - mean) < 0.03 and bool((t.view(256, n, C) == t.view(256, n, C)[..., :1]).all())
    m = tiny_model()
    ids = torch.randint(3, 64, (4, 4 + 2 * 8), generator=torch.Generator().manual_seed(1))
    score = torch.ones_like(ids, dtype=torch.bool)
    from dgemma.train.loop import evaluate
    assert evaluate(m, ids, score, ObjectiveConfig(context_length=4, t_power=0.25), 2, 2) == \
        evaluate(m, ids, score, ObjectiveConfig(context_length=4), 2, 2)


def test_sc_temperature_scales_the_self_conditioning_logits(monkeypatch):
    """--sc-temperature LO HI: pass 2's soft embedding is built from pass 1's logits divided by LO + (HI - LO) * t
    of each canvas (the sampler's temperature at that noise level); None keeps the raw logits; validation always
    uses the raw ones."""
    import dgemma.train.objective as obj
    m = tiny_model()
    ids = torch.randint(3, 64, (3, 4 + 2 * 8), generator=torch.Generator().manual_seed(2))
    score = torch.ones_like(ids, dtype=torch.bool)
    seen = []
    real_soft = m.soft_embedding
    monkeypatch.setattr(m, "soft_embedding", lambda logits: seen.append(logits) or real_soft(logits))
    levels = []
    real_noise = obj._noise_all_canvases
    monkeypatch.setattr(obj, "_noise_all_canvases", lambda *a: levels.append(real_noise(*a)) or levels[-1])
    out = {}
    for temps in (None, (0.1, 0.3)):
        cfg = ObjectiveConfig(context_length=4, all_canvases=True, sc_prob=1.0, sc_temperature=temps)
        with torch.no_grad():
            out[temps] = losses(m, ids, score, cfg, torch.Generator().manual_seed(5))
    raw, scaled = seen
    t = levels[1][4]                                                    # [B, n*C] noise level per position
    # on the CPU both come shifted by their max and floored at sampling.EXP_FLOOR (the exp cliff): the same softmax
    assert torch.allclose(scaled.softmax(-1), (raw / (0.1 + 0.2 * t)[..., None]).softmax(-1), atol=1e-6)
    assert float(scaled.amax(-1).abs().max()) == 0 and float(scaled.min()) == EXP_FLOOR
    assert not torch.allclose(out[None]["diffusion"], out[(0.1, 0.3)]["diffusion"])
    from dgemma.train.loop import evaluate
    cfg = ObjectiveConfig(context_length=4, all_canvases=True)
    monkeypatch.undo()
    assert evaluate(m, ids, score, replace_cfg(cfg, sc_temperature=(0.1, 0.3)), 3, 1) == evaluate(m, ids, score, cfg, 3, 1)


def test_sampler_step_keeps_accepted_samples_and_renoises_the_rest():
    """_sampler_step = one sampler step (spec 4.2, steps 3-5) per canvas: a position's sample is kept where the
    entropy bound accepts it (the lowest-entropy position always), a uniform random id elsewhere."""
    from dgemma.train.objective import _sampler_step
    from dgemma.sampling import entropy, entropy_bound_accept
    B, n, C, V = 8, 2, 8, 50
    g = torch.Generator().manual_seed(0)
    lam = torch.randn(B, n * C, V, generator=g)                     # entropy ~ 2: not accepted (but the first) ...
    lam[..., 0] += 5                                                # (a sample is token 0 over half the time)
    sure = torch.rand(B, n * C, generator=g) < 0.4                  # ... except the first; peaked ones are
    lam[sure] = torch.nn.functional.one_hot(torch.arange(int(sure.sum())) % V, V).float() * 40
    out = _sampler_step(lam, C, bound=0.05, generator=torch.Generator().manual_seed(1))
    accept = entropy_bound_accept(entropy(lam).view(B * n, C), 0.05).view(B, n * C)
    assert bool((accept >= sure).all())                             # every peaked position is accepted
    assert torch.equal(out[sure], lam[sure].argmax(-1))             # and keeps its (certain) sample
    assert bool(accept.view(B * n, C).any(-1).all())                # at least one per canvas
    rest = ~accept
    assert int(rest.sum()) > 40 and int((out[rest] == 0).sum()) <= 6        # renoised uniformly, not sampled
    again = _sampler_step(lam, C, bound=0.05, generator=torch.Generator().manual_seed(2))
    assert torch.equal(again[sure], out[sure]) and not torch.equal(again[rest], out[rest])


SOME_UNROLLED = 0   # a seed whose unroll_prob=0.5 draw unrolls some of 4 examples, not all (checked)


def test_unroll_feeds_pass_two_one_sampler_step_of_pass_one(monkeypatch):
    """--unroll P: for those examples the trained pass's canvas is _sampler_step of pass 1's (scaled) logits, and
    they always get pass 1 as self-conditioning; the other examples keep the noisy canvas; 0 leaves the
    objective (and its random stream) exactly as before; validation never unrolls."""
    import dgemma.train.objective as obj
    m = tiny_model()
    ids = torch.randint(3, 64, (4, 4 + 2 * 8), generator=torch.Generator().manual_seed(2))
    score = torch.ones_like(ids, dtype=torch.bool)
    canvases, stepped, softs = [], [], []
    real_pass, real_step = obj._denoiser_pass, obj._sampler_step
    monkeypatch.setattr(obj, "_denoiser_pass", lambda mo, c, st, kv, soft: canvases.append(c) or softs.append(soft)
                        or real_pass(mo, c, st, kv, soft))
    monkeypatch.setattr(obj, "_sampler_step", lambda *a: stepped.append(real_step(*a)) or stepped[-1])
    cfg = ObjectiveConfig(context_length=4, all_canvases=True, sc_prob=0.0, sc_temperature=(0.1, 0.3))
    with torch.no_grad():
        base = losses(m, ids, score, cfg, torch.Generator().manual_seed(5))
        assert len(canvases) == 1 and softs == [None] and not stepped                 # no sc, no unroll: one pass
        canvases.clear(), softs.clear()
        full = losses(m, ids, score, replace_cfg(cfg, unroll_prob=1.0), torch.Generator().manual_seed(5))
    noisy, second = canvases
    assert torch.equal(second, stepped[0]) and not torch.equal(second, noisy)
    assert softs[1] is not None and bool((softs[1].abs().sum(-1) > 0).all())      # every example self-conditioned
    assert not torch.allclose(full["diffusion"], base["diffusion"])
    canvases.clear(), stepped.clear()
    with torch.no_grad():                       # some examples unrolled: the sampler step runs for those only
        losses(m, ids, score, replace_cfg(cfg, unroll_prob=0.5), torch.Generator().manual_seed(SOME_UNROLLED))
    noisy, second = canvases
    changed = (second != noisy).any(-1)                                 # the unrolled examples
    assert 0 < int(changed.sum()) < ids.shape[0] and torch.equal(second[changed], stepped[0])
    with torch.no_grad():                                            # the same draws as before with unroll_prob 0
        again = losses(m, ids, score, replace_cfg(cfg, unroll_bound=5.0), torch.Generator().manual_seed(5))
    assert torch.equal(again["loss"], base["loss"])
    from dgemma.train.loop import evaluate
    monkeypatch.undo()
    assert evaluate(m, ids, score, replace_cfg(cfg, unroll_prob=1.0), 2, 2) == evaluate(m, ids, score, cfg, 2, 2)


def replace_cfg(cfg, **kw):
    import dataclasses
    return dataclasses.replace(cfg, **kw)


def test_noise_profile_against_inference_paths():
    """dgemma eval's denoiser-vs-encoder profile: the encoder's CE equals the inference encoder's; at t = 0 every
    token is clean and its CE is the inference denoiser's on the clean canvas; at t = 1 every token is corrupted."""
    import torch.nn.functional as F
    from dgemma.train.loop import noise_profile
    m = tiny_model()
    P, C = 4, 8
    ids = torch.randint(3, 64, (6, P + 2 * C), generator=torch.Generator().manual_seed(2))
    score = torch.ones_like(ids, dtype=torch.bool)
    prof = noise_profile(m, ids, score, P, batch=4, n_batches=2, levels=(0.0, 1.0))
    with torch.no_grad():
        enc = F.cross_entropy(m.encoder_logits(ids[:, :P + 1])[:, P - 1], ids[:, P])
        den = m.denoise_logits(ids[:, :P], ids[:, P:P + C])
    assert abs(prof["encoder_next"] - enc.item()) < 1e-4
    assert abs(prof["t=0/clean"] - F.cross_entropy(den.flatten(0, 1), ids[:, P:P + C].flatten()).item()) < 1e-4
    assert "t=0/first" not in prof and "t=1/clean" not in prof                                  # nothing to score
    assert prof["t=1/corrupted"] > prof["t=0/clean"]
