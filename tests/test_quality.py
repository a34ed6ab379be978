"""The quality suite (dgemma.train.quality, `dgemma eval --quality`): metrics on crafted inputs, the seeded task
generator and answer scoring, and smoke runs on the shipped model (shape of the results, not the model's scores)."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

import dgemma
from dgemma.cli import main
from dgemma.train import quality as q


def _fake_model(eos=(1,), pad=0):
    return SimpleNamespace(sampler_config=SimpleNamespace(eos_token_id=list(eos), pad_token_id=pad))


def _fixed_scorer(probs):
    """Every position predicts the same distribution `probs` over a len(probs) vocabulary."""
    row = torch.log(torch.tensor(probs, dtype=torch.float64)).float()
    return lambda ids: row.expand(ids.shape[0], ids.shape[1], len(probs)).clone()


def test_perplexity_known_distribution():
    m, sc = _fake_model(), _fixed_scorer([0.5, 0.25, 0.125, 0.125])
    s, n = q.continuation_nll(m, [2, 2], [2, 3], scorer=sc)
    assert n == 2 and s == pytest.approx(2 * math.log(8), rel=1e-6)
    assert q.perplexity(m, [2, 2], [2, 3], scorer=sc) == pytest.approx(8.0, rel=1e-6)
    # scoring stops after the first EOS (id 1, p=0.25, scored) and skips pad (id 0)
    assert q.continuation_nll(m, [2], [3, 1, 2, 2], scorer=sc)[1] == 2
    assert q.perplexity(m, [2], [3, 1, 2, 2], scorer=sc) == pytest.approx(math.sqrt(32), rel=1e-6)
    assert q.continuation_nll(m, [2], [0, 3, 0], scorer=sc)[1] == 1
    assert q.continuation_nll(m, [2], [], scorer=sc) == (0.0, 0)
    assert math.isnan(q.perplexity(m, [2], [0, 0], scorer=sc))


def test_perplexity_uses_the_logits_of_the_previous_position():
    V = 4

    def scorer(ids):      # position t puts p=0.7 on token (t+1) % V, 0.1 on each other token
        T = ids.shape[1]
        p = torch.full((1, T, V), 0.1)
        p[0, torch.arange(T), (torch.arange(T) + 1) % V] = 0.7
        return torch.log(p)
    m = _fake_model(eos=(), pad=None)
    assert q.perplexity(m, [3, 3], [2, 3], scorer=scorer) == pytest.approx(1 / 0.7, rel=1e-5)
    assert q.perplexity(m, [3, 3], [3, 2], scorer=scorer) == pytest.approx(10.0, rel=1e-5)


def test_perplexity_default_scorer_is_the_encoder():
    m = dgemma.load(dgemma.default_model_path(), dtype=torch.float32)
    prompt, cont = [2, 53, 3137], [535, 265, 649]
    logp = torch.log_softmax(m.encoder_logits(torch.tensor([prompt + cont]))[0], -1)
    want = -sum(float(logp[2 + i, t]) for i, t in enumerate(cont))
    s, n = q.continuation_nll(m, prompt, cont)
    assert n == 3 and s == pytest.approx(want, rel=1e-5)


def test_geometric_mean():
    assert q.geometric_mean([2.0, 8.0]) == pytest.approx(4.0)
    assert q.geometric_mean([4.0, float("nan")]) == pytest.approx(4.0)
    assert math.isnan(q.geometric_mean([]))


def test_distinct_n():
    assert q.distinct_n([1, 2, 3, 4], 1) == 1.0
    assert q.distinct_n([5, 5, 5, 5], 1) == 0.25
    assert q.distinct_n([1, 2, 1, 2, 1], 2) == pytest.approx(2 / 4)
    assert q.distinct_n("the cat saw the cat".split(), 1) == pytest.approx(3 / 5)
    assert q.distinct_n([1], 2) == 0.0 and q.distinct_n([], 1) == 0.0
    with pytest.raises(ValueError):
        q.distinct_n([1, 2], 0)


def test_longest_repeat():
    assert q.longest_repeat([1, 2, 3, 4]) == 0
    assert q.longest_repeat([1, 2, 3, 1, 2, 3]) == 3
    assert q.longest_repeat([7, 1, 2, 9, 1, 2, 8]) == 2
    assert q.longest_repeat([5, 5, 5, 5]) == 3            # overlapping occurrences count
    assert q.longest_repeat([1, 2, 1, 3], min_n=2) == 0
    assert q.longest_repeat([9, 1, 2, 3, 4, 1, 2, 3, 4, 9], min_n=2) == 4
    assert q.longest_repeat([]) == 0
    loop = [4, 5, 6] * 10
    assert q.longest_repeat(loop) == 27 and q.distinct_n(loop, 2) < 0.15


def test_tasks_are_seeded_and_correct():
    a, b = q.make_tasks(12, seed=3), q.make_tasks(12, seed=3)
    assert a == b and a != q.make_tasks(12, seed=4)
    assert {t.kind for t in a} == {"arithmetic", "word"}
    assert all(t.prompt.endswith("Answer:") for t in a)
    for t in q.make_tasks(30, seed=0, kind="arithmetic"):
        x, op, y = t.prompt.removeprefix("What is ").removesuffix("? Answer:").split()
        assert t.answer == eval(f"{x} {op} {y}")
    assert all(t.kind == "word" and t.answer >= 0 for t in q.make_tasks(30, seed=0, kind="word"))
    assert q.make_tasks(0) == []
    with pytest.raises(ValueError):
        q.make_tasks(2, kind="poems")


def test_score_answer():
    assert q.score_answer("The answer is 12.", 12)
    assert q.score_answer("12", 12)
    assert q.score_answer(" -3 apples", -3)
    assert not q.score_answer("-3", 3)
    assert not q.score_answer("no number here", 0)
    assert not q.score_answer("13 or 12", 12)                 # the first integer counts
    assert q.score_answer("x 5-3", 5)


def test_prompt_set():
    tok = dgemma.load_tokenizer(dgemma.default_model_path())
    ps = q.prompt_set(tok)
    assert len(ps) == len(q.PROSE_PROMPTS) + len(q.CHAT_PROMPTS)       # the shipped tokenizer has a chat template
    assert ps[3][0].startswith("[chat]") and all(len(ids) > 1 for _, ids in ps)


def test_run_suite_smoke():
    path = dgemma.default_model_path()
    model, tok = dgemma.load(path, dtype=torch.float32), dgemma.load_tokenizer(path)
    res = q.run_suite(model, tok, [{"max_denoising_steps": 2, "entropy_bound": 0.5}], n_prompts=2, n_tasks=2,
                      max_new_tokens=4, seed=1)
    assert [r["decoder"] for r in res["runs"]] == ["ar", "diffusion"]
    for r in res["runs"]:
        assert set(q.RUN_KEYS) <= set(r)
        assert r["perplexity"] > 1 and 0 <= r["distinct_1"] <= 1 and 0 <= r["task_accuracy"] <= 1
        assert 0 < r["mean_new_tokens"] <= 4 and r["tokens_per_second"] > 0
    ar, d = res["runs"]
    assert ar["tokens_per_forward"] <= 1 and d["max_denoising_steps"] == 2 and d["entropy_bound"] == 0.5
    assert d["t_min"] == model.sampler_config.t_min
    assert len(res["tasks"]) == 2 and "steps=2" in q.format_table(res)
    assert math.isnan(ar["stop_rate"]) and 0 <= d["stop_rate"] <= 1
    assert ar["perplexity_vs_ar"] == 1 and d["perplexity_vs_ar"] == pytest.approx(d["perplexity"] / ar["perplexity"])
    with pytest.raises(ValueError, match="unknown diffusion setting"):
        q.run_suite(model, tok, [{"steps": 2}], n_prompts=1, n_tasks=0, max_new_tokens=4)


def test_cli_quality_writes_json_and_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "q"
    assert main(["eval", "--quality", "--prompts", "2", "--tasks", "2", "--max-new-tokens", "8", "--steps", "2",
                 "--out", str(out)]) == 0
    res = json.loads((out / "quality.json").read_text())
    assert (out / "quality.png").stat().st_size > 1000
    assert len(res["runs"]) == 2 and res["runs"][1]["max_denoising_steps"] == 2
    assert "tok/fwd" in capsys.readouterr().out


@pytest.mark.parametrize("argv, msg", [
    (["eval"], "--data is required"),
    (["eval", "--quality", "--sweep", "--steps", "4"], "--sweep is its own grid"),
    (["eval", "--quality", "--prompts", "0"], "--prompts must be positive"),
    (["eval", "--quality", "--prompts", "99"], "fixed prompts"),
    (["eval", "--quality", "--steps", "0"], "--steps must be positive"),
    (["eval", "--quality", "--bound", "-1"], "--bound must be >= 0"),
    (["eval", "--quality", "--tasks", "-1"], "--tasks must be >= 0"),
    (["eval", "--quality", "--prompts", "1", "--tasks", "0", "--json", "."], "is a folder"),   # before the suite
    (["eval", "--data", "x.txt", "--sweep"], "only goes with --quality"),
    (["eval", "--data", "x.txt", "--val-percent", "150"], "--val-percent must be in (0, 100]"),
    (["eval", "--data", "x.txt", "--steps", "2", "4"], "one value without --quality"),
])
def test_cli_quality_errors(argv, msg, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("dgemma: error:") and msg in err and err.count("\n") == 1


@pytest.fixture(scope="module")
def uniform_scorer_dir(tmp_path_factory):
    """A tiny transformers causal LM (Llama) whose head is zero: every next token has probability 1 / V, so any
    text's perplexity is exactly V. Its tokenizer is the shipped model's tokenizer.json."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    path = tmp_path_factory.mktemp("scorer")
    tok = PreTrainedTokenizerFast(tokenizer_file=str(dgemma.default_model_path() + "/tokenizer.json"),
                                  bos_token="<bos>")
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    m = LlamaForCausalLM(cfg)
    with torch.no_grad():
        m.lm_head.weight.zero_()
    m.save_pretrained(path)
    tok.save_pretrained(path)
    return path, len(tok)


def test_text_scorer_known_perplexity(uniform_scorer_dir):
    path, V = uniform_scorer_dir
    s = q.TextScorer(str(path))
    assert s.perplexity("The old house", " stood empty for years.") == pytest.approx(V, rel=1e-4)
    assert math.isnan(s.perplexity("The old house", ""))


def test_cli_quality_with_an_independent_scorer(uniform_scorer_dir, tmp_path, capsys):
    path, V = uniform_scorer_dir
    assert main(["eval", "--quality", "--prompts", "1", "--tasks", "0", "--max-new-tokens", "8", "--steps", "2",
                 "--scorer", str(path), "--json", str(tmp_path / "q.json")]) == 0
    res = json.loads((tmp_path / "q.json").read_text())
    assert "independent scorer" in res["perplexity_mean"]
    assert all(r["perplexity"] == pytest.approx(V, rel=1e-4) for r in res["runs"])
    assert main(["eval", "--quality", "--scorer", str(tmp_path / "missing")]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_text_scorer_from_a_dgemma_checkpoint():
    """Another DiffusionGemma checkpoint scores text with its causal encoder: the same perplexity as the native
    scorer gives the same tokens."""
    path = dgemma.default_model_path()
    s = q.TextScorer(path)
    model, tok = dgemma.load(path, dtype=torch.float32), dgemma.load_tokenizer(path)
    prompt, cont = "The old house", " stood empty for years."
    p, full = tok.encode(prompt, add_special_tokens=True), tok.encode(prompt + cont, add_special_tokens=True)
    k = next(i for i, (a, b) in enumerate(zip(p, full)) if a != b) if full[:len(p)] != p else len(p)
    want = q.perplexity(model, full[:k], full[k:])
    assert 1 < want < model.config.vocab_size
    assert s.perplexity(prompt, cont) == pytest.approx(want, rel=1e-5)
