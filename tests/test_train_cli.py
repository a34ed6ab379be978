"""End to end through the CLI: tokenizer, training from scratch (losses fall), fine-tuning a chat JSONL
with a frozen router, evaluation."""
import json

import pytest

import torch

import dgemma
from dgemma.cli import main
from dgemma.tokenizer import Tokenizer
from dgemma.train.data import encode_documents, is_validation, pack

TEXT = "\n\n".join(
    f"The {a} {n} walked to the {p} and saw a {b} {m} near the old {q}."
    for a, n, p, b, m, q in zip(["quiet", "small", "tall", "brave", "old"] * 40, ["man", "girl", "dog", "cat"] * 50,
                                ["river", "house", "street", "market"] * 50, ["red", "green", "blue"] * 67,
                                ["boat", "cart", "bird", "tree", "door"] * 40, ["mill", "bridge", "church"] * 67))


def test_train_from_scratch_then_finetune_chat(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    (tmp_path / "corpus.txt").write_text(TEXT)
    chats = [{"messages": [{"role": "user", "content": f"Where did the {n} walk?"},
                           {"role": "assistant", "content": f"The {n} walked to the river."}]}
             for n in ("man", "girl", "dog", "cat") * 5]
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(c) for c in chats))
    assert main(["tokenizer", "train", "--data", str(tmp_path / "corpus.txt"), "--vocab-size", "300",
                 "--out", str(tmp_path / "tok")]) == 0
    tok = Tokenizer.from_dir(tmp_path / "tok")

    # data: chats score only the reply; the split is deterministic
    tr, va = encode_documents([tmp_path / "chat.jsonl"], tok, val_percent=0)
    ex = tr[0]
    prompt = tok.apply_chat_template(chats[0]["messages"][:1], add_generation_prompt=True, tokenize=True)
    assert not any(ex.score[:len(prompt)]) and all(ex.score[len(prompt):])
    assert is_validation("some text", 50) == is_validation("some text", 50)
    ids, score = pack(tr, 24, 0)
    assert ids.shape[1] == 24 and score.dtype == torch.bool

    shape = ["--shape", "small", "--canvas-length", "8", "--context", "8", "--canvases", "2"]
    run = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "corpus.txt"), "--tokenizer", str(tmp_path / "tok"),
                 "--out", str(run), *shape, "--steps", "40", "--batch-size", "8", "--lr", "3e-3",
                 "--warmup", "5", "--eval-every", "20", "--save-every", "20", "--val-percent", "10"]) == 0
    hist = json.loads((run / "checkpoint" / "trainer_state.json").read_text())["history"]
    first, last = hist[0], hist[-1]
    assert last["ar"] < 0.7 * first["ar"] and last["diffusion"] < 0.8 * first["diffusion"]
    assert "val_ar" in last
    # a new run in the same folder is refused, with one line and exit 2
    assert main(["train", "--data", str(tmp_path / "corpus.txt"), "--tokenizer", str(tmp_path / "tok"),
                 "--out", str(run), "--steps", "1"]) == 2

    # fine-tune on chats with a frozen router
    ft = tmp_path / "ft"
    assert main(["train", "--data", str(tmp_path / "chat.jsonl"), "--init-from", str(run / "checkpoint"),
                 "--out", str(ft), "--context", "24", "--canvases", "2", "--canvas-length", "4", "--steps", "4",
                 "--batch-size", "4", "--sc-temperature", "0.1", "0.3", "--unroll", "0.5",
                 "--freeze-router", "--eval-every", "0", "--save-every", "4", "--val-percent", "0"]) == 0
    state = json.loads((ft / "checkpoint" / "trainer_state.json").read_text())
    assert state["config"]["objective"]["sc_temperature"] == [0.1, 0.3]
    assert state["config"]["objective"]["unroll_prob"] == 0.5 and state["config"]["objective"]["unroll_bound"] == 1
    assert main(["train", "--data", str(tmp_path / "chat.jsonl"), "--init-from", str(run / "checkpoint"),
                 "--out", str(tmp_path / "ft2"), "--sc-temperature", "0.3", "0.1"]) == 2
    assert "--sc-temperature LO HI needs 0 < LO <= HI" in capsys.readouterr().err
    for bad, msg in ((["--unroll", "1.5"], "--unroll must be between 0 and 1"),
                     (["--unroll-bound", "0"], "--unroll-bound must be positive")):
        assert main(["train", "--data", str(tmp_path / "chat.jsonl"), "--init-from", str(run / "checkpoint"),
                     "--out", str(tmp_path / "ft2"), *bad]) == 2
        assert msg in capsys.readouterr().err
    a, b = dgemma.load(run / "checkpoint"), dgemma.load(ft / "checkpoint")
    assert torch.equal(a.layers[0].router.proj.weight, b.layers[0].router.proj.weight)
    assert not torch.equal(a.layers[0].mlp.up_proj.weight, b.layers[0].mlp.up_proj.weight)
    assert (a.config.canvas_length, b.config.canvas_length) == (8, 4)   # a fine-tune may change the canvas
    # resuming it at another canvas length is refused (its sequences would be packed for the wrong length)
    assert main(["train", "--data", str(tmp_path / "chat.jsonl"), "--out", str(ft), "--resume", "--steps", "6",
                 "--canvas-length", "8", "--context", "24", "--canvases", "2", "--val-percent", "0"]) == 2
    assert "trains canvases of 4 tokens, not 8" in capsys.readouterr().err

    out = tmp_path / "eval.json"
    assert main(["eval", "--model", str(run / "checkpoint"), "--data", str(tmp_path / "corpus.txt"), "--all",
                 "--context", "8", "--canvases", "2", "--batches", "2", "--prompts", "2", "--steps", "4",
                 "--json", str(out)]) == 0
    ev = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
    assert "t=1/clean" not in ev["by_noise"] and "nan" not in capsys.readouterr().out     # never an empty bucket
    assert ev["encoder_perplexity"] > 1 and 0 < ev["tokens_per_forward"] <= 8
    assert ev["by_noise"]["t=1/corrupted"] > ev["by_noise"]["t=0.2/clean"]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    (d / "corpus.txt").write_text(TEXT)
    assert main(["tokenizer", "train", "--data", str(d / "corpus.txt"), "--vocab-size", "300",
                 "--out", str(d / "tok")]) == 0
    return d / "tok"


@pytest.mark.parametrize("lines, msg", [
    ([b'{"messages": ["hi", "there"]}'], "x.jsonl:1: a chat example needs at least two messages"),
    ([b'{"text": "fine"}', b'{"text": "caf\xe9"}'], "x.jsonl:2: not UTF-8 text (byte 0xe9 at column 14)"),
    ([b'{"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}'],
     "x.jsonl:1: message 0 needs a string 'content'")])
def test_data_errors_name_the_file_and_line(tmp_path, tok_dir, capsys, lines, msg):
    (tmp_path / "x.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    assert main(["train", "--data", str(tmp_path / "x.jsonl"), "--tokenizer", str(tok_dir),
                 "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dgemma: error: ") and msg in err and str(tmp_path / "x.jsonl") in err, err


def _train(tmp_path, tok_dir, *extra: str) -> int:
    (tmp_path / "corpus.txt").write_text(TEXT)
    return main(["train", "--data", str(tmp_path / "corpus.txt"), "--tokenizer", str(tok_dir), *extra])


def _config(run):
    return json.loads((run / "checkpoint" / "trainer_state.json").read_text())["config"]


def test_resume_keeps_the_runs_settings_and_warns_about_changed_ones(tmp_path, tok_dir, capsys):
    run = tmp_path / "run"
    assert _train(tmp_path, tok_dir, "--out", str(run), "--canvas-length", "4", "--context", "4", "--canvases", "3",
                  "--batch-size", "2", "--warmup", "3", "--lr", "1e-3", "--steps", "1", "--eval-every", "0",
                  "--seed", "5", "--sc-prob", "0.25", "--all-canvases", "--val-percent", "0") == 0
    capsys.readouterr()
    assert _train(tmp_path, tok_dir, "--out", str(run), "--resume", "--steps", "2", "--lr", "1e-3",
                  "--batch-size", "3") == 0
    cfg, err = _config(run), capsys.readouterr().err
    assert (cfg["steps"], cfg["batch_size"], cfg["warmup"], cfg["lr"], cfg["seed"]) == (2, 3, 3, 1e-3, 5)
    assert (cfg["canvases"], cfg["val_percent"], cfg["objective"]["context_length"]) == (3, 0, 4)
    assert cfg["objective"]["sc_prob"] == 0.25 and cfg["objective"]["all_canvases"]
    assert [line for line in err.splitlines() if "warning" in line] == [
        "dgemma: warning: --resume: --steps 2 replaces the run's 1",
        "dgemma: warning: --resume: --batch-size 3 replaces the run's 2"]
    assert _train(tmp_path, tok_dir, "--out", str(run), "--resume", "--steps", "3", "--no-all-canvases") == 0
    assert not _config(run)["objective"]["all_canvases"]          # a switch can be turned off again
    assert "--all-canvases off replaces the run's on" in capsys.readouterr().err


def test_an_out_folder_that_cannot_be_written_fails_before_tokenizing(tmp_path, tok_dir, capsys):
    (tmp_path / "file").write_text("x")
    assert _train(tmp_path, tok_dir, "--out", str(tmp_path / "file" / "run"), "--steps", "1", "--save-every", "1",
                  "--canvas-length", "4", "--context", "4") == 2
    out, err = capsys.readouterr()
    assert "cannot be written" in err and "tokenizing" not in out


@pytest.mark.parametrize("bad, msg", [
    (["--t-power", "nan"], "--t-power must be positive and finite (got nan)"),
    (["--lr", "inf"], "--lr must be positive and finite (got inf)"),
    (["--sc-prob", "2"], "--sc-prob must be between 0 and 1 (got 2.0)"),
    (["--sc-prob", "-1"], "--sc-prob must be between 0 and 1"),
    (["--ar-weight", "-1"], "--ar-weight must be a finite number >= 0 (got -1.0)"),
    (["--diffusion-weight", "inf"], "--diffusion-weight must be a finite number >= 0"),
    (["--ar-weight", "0", "--diffusion-weight", "0"], "nothing to train"),
    (["--val-percent", "-5"], "--val-percent must be between 0 and 100"),
    (["--val-percent", "101"], "--val-percent must be between 0 and 100"),
    (["--warmup", "-5"], "--warmup must be a finite number >= 0 (got -5)"),
    (["--sc-temperature", "0.1", "inf"], "--sc-temperature LO HI needs 0 < LO <= HI"),
    (["--seed", "99999999999999999999"], "--seed must be between 0 and 2**63 - 1"),
    (["--seed", "-1"], "--seed must be between 0 and 2**63 - 1")])
def test_bad_values_are_refused_up_front(tmp_path, tok_dir, capsys, bad, msg):
    assert _train(tmp_path, tok_dir, "--out", str(tmp_path / "run"), "--steps", "1", "--canvas-length", "4",
                  "--context", "4", "--eval-every", "0", *bad) == 2
    out, err = capsys.readouterr()
    assert msg in err and "tokenizing" not in out, err


def test_short_data_is_refused(tmp_path, tok_dir, capsys):
    (tmp_path / "short.txt").write_text("Hello world.")
    assert main(["train", "--data", str(tmp_path / "short.txt"), "--tokenizer", str(tok_dir), "--out",
                 str(tmp_path / "run"), "--steps", "1", "--canvas-length", "4", "--context", "32"]) == 2
    assert "nothing to train on" in capsys.readouterr().err


def test_tokenizer_train_refuses_to_overwrite_and_says_what_is_wrong(tmp_path, tok_dir, capfd):
    (tmp_path / "corpus.txt").write_text(TEXT)
    argv = ["tokenizer", "train", "--data", str(tmp_path / "corpus.txt"), "--vocab-size", "300", "--out"]
    assert main([*argv, str(tmp_path / "tok")]) == 0
    assert capfd.readouterr().out == f"wrote {tmp_path / 'tok'}/tokenizer.json (300 tokens)\n"   # no blank lines
    before = {f: f.read_bytes() for f in (tmp_path / "tok").iterdir()}
    (tmp_path / "tok" / "tokenizer.json").unlink()
    assert main([*argv, str(tmp_path / "tok")]) == 2                    # any one of its files is enough to refuse
    assert "already holds tokenizer_config.json, chat_template.jinja" in capfd.readouterr().err
    assert all(f.read_bytes() == b for f, b in before.items() if f.exists())
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9 au lait\n")
    assert main(["tokenizer", "train", "--data", str(tmp_path / "latin1.txt"), "--out", str(tmp_path / "t2")]) == 2
    assert f"{tmp_path / 'latin1.txt'}: not UTF-8 text (byte 0xe9 at offset 3)" in capfd.readouterr().err
    assert main(["tokenizer"]) == 2
    assert "required: {train}" in capfd.readouterr().err
