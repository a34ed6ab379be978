"""The `dgemma` command line, run in-process on a tiny random checkpoint with a word-level tokenizer."""
from __future__ import annotations

import io
import json
import re
import signal
import subprocess
import sys

import pytest
import torch

import dgemma
from dgemma import cli

V = 64
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]  # pad 0, eos 1, bos 2
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }} {{ m['content'] }}<end_of_turn>"
            "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model {% endif %}")
WORD = re.compile(r"^w\d+$")


def tiny_config() -> dgemma.ModelConfig:
    return dgemma.ModelConfig(
        vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, global_head_dim=16, num_global_key_value_heads=1, sliding_window=8,
        num_experts=4, top_k_experts=2, moe_intermediate_size=16, canvas_length=8, dtype="float32",
        eos_token_id=[1])


def write_tokenizer(path) -> None:
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors
    vocab = {t: i for i, t in enumerate(SPECIALS + [f"w{i}" for i in range(len(SPECIALS), V)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(s, special=True) for s in SPECIALS])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
        "chat_template": TEMPLATE}))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A tiny model gains nothing from threads, and on a busy machine they make each pass 100x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = dgemma.DiffusionGemma(tiny_config())
    with torch.no_grad():
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.02)
    path = dgemma.save(model, tmp_path_factory.mktemp("cli") / "tiny")
    write_tokenizer(path)
    return str(path)


def run(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_user_error(rc, out, err, fragment):
    assert rc == 2
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and err.startswith("dgemma: error: ")
    assert fragment in err


def test_generate_prints_continuation(model_dir, capsys):
    rc, out, err = run(capsys, "generate", "--model", model_dir, "--seed", "0", "--max-new-tokens", 20, "w10 w11")
    assert rc == 0 and err == ""
    assert out.endswith("\n")
    words = out.split()
    assert 0 < len(words) <= 20 and all(WORD.match(w) for w in words)   # no specials, no pad, no prompt echo
    assert not out.startswith("w10 w11 ")
    rc2, out2, _ = run(capsys, "generate", "--model", model_dir, "--seed", "0", "--max-new-tokens", 20, "w10 w11")
    assert rc2 == 0 and out2 == out                                    # seeded: reproducible


def test_generate_fast_sampler(model_dir, capsys):
    rc, out, err = run(capsys, "generate", "--model", model_dir, "--sampler", "fast", "--seed", "0",
                       "--max-new-tokens", 20, "w10 w11")
    assert rc == 0 and err == "" and all(WORD.match(w) for w in out.split())
    rc, out, err = run(capsys, "generate", "--model", model_dir, "--sampler", "gumbel", "w10")
    assert_user_error(rc, out, err, "--sampler")


def test_generate_top_k_top_p(model_dir, capsys):
    args = ("generate", "--model", model_dir, "--seed", "0", "--max-new-tokens", 20)
    _, plain, _ = run(capsys, *args, "w10 w11")
    rc, cut, err = run(capsys, *args, "--top-k", "2", "--top-p", "0.5", "w10 w11")
    assert rc == 0 and err == "" and cut != plain
    assert run(capsys, *args, "--top-k", "0", "--top-p", "1", "w10 w11")[1] == plain      # 0 / 1: off


def test_generate_penalties(model_dir, capsys):
    """--presence-penalty / --frequency-penalty reach generate (the same text as the Python call); 0 is off."""
    import torch
    args = ("generate", "--model", model_dir, "--seed", "0", "--max-new-tokens", 24)
    _, plain, _ = run(capsys, *args, "w10 w11")
    rc, pen, err = run(capsys, *args, "--presence-penalty", "2", "--frequency-penalty", "1", "w10 w11")
    assert rc == 0 and err == "" and pen != plain
    assert run(capsys, *args, "--presence-penalty", "0", "w10 w11")[1] == plain
    m, tok = dgemma.load(model_dir), dgemma.load_tokenizer(model_dir)
    ids = tok.encode_prompt("w10 w11")
    out = m.generate(torch.tensor([ids]), seed=0, max_new_tokens=24, presence_penalty=2.0, frequency_penalty=1.0)
    assert pen.strip() == tok.decode(out.sequences[0, len(ids):].tolist()).strip()


def test_generate_chat(model_dir, capsys):
    rc, out, err = run(capsys, "generate", "--model", model_dir, "--chat", "--seed", "1", "--max-new-tokens", 16,
                       "--steps", 4, "w20 w21")
    assert rc == 0 and err == ""
    assert out.endswith("\n") and all(WORD.match(w) for w in out.split())


def test_generate_verbose_stats(model_dir, capsys):
    rc, out, err = run(capsys, "generate", "--model", model_dir, "-v", "--seed", "0", "--max-new-tokens", 8,
                       "--dtype", "float32", "--device", "cpu", "w5")
    assert rc == 0
    assert "tokens/s" in err and "tokens per forward" in err and "decoder passes" in err
    assert "first canvas" in err and "Traceback" not in err
    rc, out, err = run(capsys, "generate", "--model", model_dir, "-v", "--seed", "0", "--max-new-tokens", 3,
                       "--dtype", "float32", "--device", "cpu", "w5")
    shown = int(err.split(" new tokens")[0].rsplit(" ", 1)[1])
    assert rc == 0 and shown <= 3                          # the tokens printed, not the whole canvas


def test_info(model_dir, capsys):
    rc, out, err = run(capsys, "info", "--model", model_dir, "--context", 100, "--batch", 2)
    assert rc == 0 and err == ""
    n = tiny_config().num_parameters()
    assert f"{n['total']:,} total" in out and f"{n['active']:,} active per token" in out
    assert "2 (1 sliding, 1 full attention)" in out and "canvas 8" in out and "vocab        64" in out
    assert "checkpoint   float32" in out and "kv cache" in out and "batch 2" in out
    # kv: batch 2 * 4 bytes * K and V * 1 head * 16 dims * ((8-1)+8 sliding slots + (100+8) full slots)
    assert f"kv cache   {2 * 4 * 2 * 16 * (15 + 108) / 1024:.1f} KiB" in out


class FakeTok:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(f"<{i}>" for i in ids if not (skip_special_tokens and i < 3))


def test_stream_stops_at_eos_skips_pad_and_flushes_per_canvas():
    buf = io.StringIO()
    s = cli.Stream(FakeTok(), eos={1}, pad=0, limit=None, out=buf)
    s(torch.tensor([[5, 6, 0, 7]]))
    assert buf.getvalue() == "<5><6><7>"                  # printed as soon as the canvas is committed
    s(torch.tensor([[8, 1, 0, 0]]))
    s(torch.tensor([[9, 9, 9, 9]]))                        # after EOS: nothing more
    assert buf.getvalue() == "<5><6><7><8>" and s.first_at is not None
    buf = io.StringIO()
    s = cli.Stream(FakeTok(), eos={1}, pad=0, limit=3, out=buf)
    s(torch.tensor([[5, 6, 7, 8]]))
    assert buf.getvalue() == "<5><6><7>"


@pytest.mark.parametrize("argv, fragment", [
    (["generate", "--model", "{missing}", "hi"], "does not exist"),
    (["generate", "--model", "{model}", "--max-new-tokens", "0", "hi"], "--max-new-tokens"),
    (["generate", "--model", "{model}", "--steps", "x", "hi"], "--steps"),
    (["generate", "--model", "{model}", "--seed", str(10 ** 23), "hi"], "--seed"),
    (["generate", "--model", "{model}", "--top-k", "-1", "hi"], "--top-k"),
    (["generate", "--model", "{model}", "--top-p", "1.2", "hi"], "--top-p"),
    (["generate", "--model", "{model}", "--presence-penalty", "3", "hi"], "--presence-penalty"),
    (["generate", "--model", "{model}", "--frequency-penalty", "nan", "hi"], "--frequency-penalty"),
    (["generate", "--model", "{model}", "--dtype", "int8", "hi"], "--dtype"),
    (["generate", "--model", "{model}", "--device", "nosuchdevice", "hi"], "unknown device"),
    (["generate", "--model", "{model}", "  "], "empty prompt"),
    (["info", "--model", "{missing}"], "does not exist"),
    (["info", "--model", "{model}", "--context", "-5"], "--context"),
    (["info", "--model", "{empty}"], "config.json"),
    (["frobnicate"], "invalid choice"),
])
def test_user_errors(model_dir, tmp_path, capsys, argv, fragment):
    subs = {"{missing}": str(tmp_path / "nope"), "{model}": model_dir, "{empty}": str(tmp_path)}
    assert_user_error(*run(capsys, *[subs.get(a, a) for a in argv]), fragment)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_unavailable(model_dir, capsys):
    assert_user_error(*run(capsys, "generate", "--model", model_dir, "--device", "cuda", "hi"), "not available")


def test_missing_shipped_model(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(dgemma, "default_model_path", lambda: str(tmp_path / "default_model"))
    assert_user_error(*run(capsys, "generate", "hi"), "pass --model")


def test_missing_tokenizer_and_interrupt(model_dir, tmp_path, monkeypatch, capsys):
    import shutil
    bare = tmp_path / "bare"
    shutil.copytree(model_dir, bare)
    (bare / "tokenizer.json").unlink()
    assert_user_error(*run(capsys, "generate", "--model", bare, "hi"), "tokenizer.json")

    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setitem(cli.COMMANDS, "info", ("info", cli.add_info_args, interrupted))
    rc, out, err = run(capsys, "info", "--model", model_dir)
    assert rc == 130 and err == ""


def test_console_script_has_no_traceback(tmp_path):
    cmd = [sys.executable, "-m", "dgemma.cli"]
    r = subprocess.run(cmd + ["generate", "--model", str(tmp_path / "nope"), "hi"], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [f"dgemma: error: model folder {str(tmp_path / 'nope')!r} does not exist"]
    r = subprocess.run(cmd + ["--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "generate" in r.stdout and "info" in r.stdout


CTRL_C_AT_IMPORT = """
import builtins, sys
sys.argv[0] = sys.argv[1]
real = builtins.__import__
def ctrl_c(name, globals=None, locals=None, fromlist=(), level=0):   # Ctrl-C while dgemma imports torch & co
    if name == "checkpoint" and level == 1:
        raise KeyboardInterrupt
    return real(name, globals, locals, fromlist, level)
builtins.__import__ = ctrl_c
import dgemma.cli
"""


def test_ctrl_c_while_the_command_starts_is_quiet():
    """The `dgemma` command exits 130 without a traceback; `import dgemma` elsewhere still raises."""
    for argv0, rc in (("/venv/bin/dgemma", 130), ("python-program", -signal.SIGINT)):   # (python's own exit)
        r = subprocess.run([sys.executable, "-c", CTRL_C_AT_IMPORT, argv0], capture_output=True, text=True)
        assert r.returncode == rc and ("KeyboardInterrupt" in r.stderr) == (rc != 130), r.stderr


def test_plugin_commands(monkeypatch, capsys):
    import types
    mod = types.ModuleType("fake_plugin")

    def add_hello(sub):
        p = sub.add_parser("hello", help="say hello")
        p.add_argument("--times", type=int, default=1)
        p.set_defaults(func=lambda args: print("hello " * args.times) or 0)
    mod.add_hello = add_hello
    monkeypatch.setitem(sys.modules, "fake_plugin", mod)
    monkeypatch.setattr(cli, "PLUGINS", ["fake_plugin:add_hello"])
    rc, out, err = run(capsys, "hello", "--times", 2)
    assert rc == 0 and out.split() == ["hello", "hello"]


def _header(obj) -> bytes:
    raw = json.dumps(obj).encode()
    return len(raw).to_bytes(8, "little") + raw


@pytest.mark.parametrize("command, name, content, fragment", [
    ("info", "config.json", b"[1, 2]", "config.json must be a JSON object"),
    ("info", "config.json", None, "text_config.hidden_size must be a positive integer (got 'abc')"),
    ("generate", "generation_config.json", b'{"t_min": "0.1"}', "generation_config.json: t_min must be a positive"),
    ("generate", "model.safetensors", bytes(range(256)) * 4, "is not a safetensors file (header length"),
    ("info", "model.safetensors", bytes(range(256)) * 4, "is not a safetensors file (header length"),
    ("info", "model.safetensors", _header([1, 2, 3]), "header is not a JSON object"),
    ("info", "model.safetensors.index.json", b'{"weight_map": ["a"]}', "weight_map must be a JSON object"),
], ids=["config-list", "config-type", "gen-type", "generate-random", "info-random", "info-list", "index"])
def test_broken_files_are_one_line(model_dir, tmp_path, capsys, command, name, content, fragment):
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    if content is None:                                   # config.json with one value of the wrong type
        cfg = json.loads((broken / name).read_text())
        cfg["text_config"]["hidden_size"] = "abc"
        content = json.dumps(cfg).encode()
    (broken / name).write_bytes(content)
    assert_user_error(*run(capsys, command, "--model", broken, *(["hi"] if command == "generate" else [])), fragment)


def test_info_counts_only_the_model_files(model_dir, tmp_path, capsys):
    import shutil
    run_dir = tmp_path / "checkpoint"                     # a training run's checkpoint folder
    shutil.copytree(model_dir, run_dir)
    shutil.copy(run_dir / "model.safetensors", run_dir / "optimizer.safetensors")
    rc, out, err = run(capsys, "info", "--model", model_dir)
    rc2, out2, err2 = run(capsys, "info", "--model", run_dir)
    line = next(x for x in out.splitlines() if x.startswith("checkpoint"))
    assert rc == rc2 == 0 and "in 1 file(s)" in line and line in out2


def test_empty_paths_and_file_outputs(model_dir, tmp_path, capsys):
    assert_user_error(*run(capsys, "info", "--model", ""), "empty model path")
    (tmp_path / "afile").write_text("x")
    assert_user_error(*run(capsys, "quantize", model_dir, tmp_path / "afile", "--weights", "int8"),
                      "afile is an existing file")


def test_readme_memory_figures_are_the_code_s():
    """README's 26B-A4B weight sizes are what `dgemma info --quantize ...` prints (quant.model_bytes)."""
    from pathlib import Path
    from dgemma.config import preset
    from dgemma.quant import QuantConfig, model_bytes
    cfg = preset("26b-a4b")
    size = {w: sum(model_bytes(cfg, QuantConfig.make(w, None) if w else None, 2)) for w in (None, "int8", "int4")}
    readme = " ".join((Path(__file__).parents[1] / "README.md").read_text().split())
    assert (f"needs about {size[None] / 2**30:.0f} GiB in bf16, {cli._size(size['int8'])} in int8/fp8 and "
            f"{cli._size(size['int4'])} in int4") in readme
