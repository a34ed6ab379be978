"""`dgemma chat`: driven through a pseudo-terminal (pexpect) and through pipes, in-process with the shipped model
and against a real `dgemma serve`: multi-turn token reuse, slash commands, Ctrl-C, plain output without a
terminal, the live canvas, and the frame renderer's styles."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest

pexpect = pytest.importorskip("pexpect")
pytest.importorskip("rich")

import dgemma  # noqa: E402
from dgemma.chat import PROMPT, STYLES, canvas_text, view  # noqa: E402
from dgemma.config import ModelConfig  # noqa: E402

FAST = ["--steps", "4", "--max-new-tokens", "40", "--seed", "0"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TERM": "xterm-256color"}
STATS = re.compile(r"\[(\d+) new tokens \| [\d.]+ tokens/s \| (?:([\d.]+) tokens/forward \| )?first canvas [^|]+\| "
                   r"prompt (\d+): (\d+) encoded, (\d+) reused\]")


def spawn(*args: str):
    # SIGINT back to its default in the child: a test run started in the background (`pytest &`) has it ignored,
    # which the child would inherit, and Python then installs no KeyboardInterrupt handler (Ctrl-C ignored)
    child = pexpect.spawn(sys.executable, ["-m", "dgemma.cli", "chat", *args], env=ENV, encoding="utf-8",
                          timeout=30, dimensions=(40, 200),
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    child.expect_exact(PROMPT)
    return child


def turn(child, text: str) -> tuple[int, float | None, int, int, int]:
    """Send a message; (new tokens, tokens/forward, prompt, encoded, reused) from its stats line."""
    child.sendline(text)
    child.expect(STATS)
    new, tpf, prompt, encoded, reused = child.match.groups()
    child.expect_exact(PROMPT)
    return int(new), tpf and float(tpf), int(prompt), int(encoded), int(reused)


def finish(child) -> None:
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert "Traceback" not in (child.before or "")


def test_second_turn_encodes_only_the_new_tokens():
    child = spawn(*FAST)
    new1, _, prompt1, enc1, reused1 = turn(child, "Hello there, who are you?")
    assert (enc1, reused1) == (prompt1, 0)
    new2, _, prompt2, enc2, reused2 = turn(child, "Tell me more.")
    assert reused2 == prompt1 + new1                    # the whole previous prompt and reply
    assert enc2 == prompt2 - reused2 and 0 < enc2 < 20  # only the template's tail and the new message
    finish(child)


def test_steps_command_changes_the_passes():
    C = ModelConfig.from_dir(dgemma.default_model_path()).canvas_length
    child = spawn(*FAST)
    new4, tpf4, *_ = turn(child, "Hello")
    child.sendline("/steps 0")
    child.expect_exact("usage: /steps N")
    child.sendline("/steps 2")
    new2, tpf2, *_ = turn(child, "Hello again")
    assert new2 == 40                                 # no EOS in this reply (the first one ends early)
    assert tpf2 > tpf4 and tpf2 >= 40 / (2 * -(-40 // C))   # its canvases x at most 2 passes
    finish(child)


def test_ctrl_c_stops_a_reply_and_the_chat_goes_on():
    child = spawn("--steps", "32", "--max-new-tokens", "2000", "--seed", "5")   # this seed: a reply of ~1,100 tokens
    child.sendline("Once upon a time")
    child.expect_exact("time\r\n")                    # the terminal's echo of the line
    child.expect(r"\S")                               # the reply's first text
    child.sendintr()
    child.expect_exact("(stopped")
    child.expect_exact(PROMPT)
    child.sendline("/steps 1")
    new, *_ = turn(child, "Hi")
    assert new > 0
    child.sendintr()                                  # Ctrl-C at the prompt: leave
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 130 and "Traceback" not in child.before


def test_piped_output_is_plain_text(tmp_path):
    save = tmp_path / "chat.json"
    cmd = [sys.executable, "-m", "dgemma.cli", "chat", *FAST, "--show-denoising", "--system", "Be brief."]
    out = subprocess.run(cmd, input=f"Hello\n/bogus\n/show\nAgain\n/save {save}\n", capture_output=True, text=True,
                         env=ENV, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "\x1b" not in out.stdout + out.stderr
    assert len(STATS.findall(out.stderr)) == 2 and "unknown command /bogus" in out.stderr
    assert out.stdout.count("\n") >= 2 and "you>" not in out.stdout
    assert [m["role"] for m in json.loads(save.read_text())] == ["system", "user", "assistant", "user", "assistant"]


def test_top_k_top_p_flags_and_commands(tmp_path):
    def replies(*flags, lines="Hello there\n"):
        save = tmp_path / "c.json"
        out = subprocess.run([sys.executable, "-m", "dgemma.cli", "chat", *FAST, *flags],
                             input=lines + f"/save {save}\n", capture_output=True, text=True, env=ENV, timeout=60)
        assert out.returncode == 0, out.stderr
        return [m["content"] for m in json.loads(save.read_text()) if m["role"] == "assistant"], out.stderr

    plain, _ = replies()
    cut, _ = replies("--top-k", "2", "--top-p", "0.4")
    assert cut == replies("--top-k", "2", "--top-p", "0.4")[0] and cut != plain
    # the same settings by command, after a refused value; then top_k back to 0 (off)
    by_cmd, err = replies(lines="/top_p 1.5\n/top_k 2\n/top_p 0.4\nHello there\n"
                                "/top_k 0\n/top_p 1\nHello there\n")
    assert "usage: /top_p P" in err and "top_k 2, top_p 0.4" in err
    assert by_cmd[0] == cut[0]
    assert subprocess.run([sys.executable, "-m", "dgemma.cli", "chat", "--top-p", "2"], capture_output=True,
                          text=True, env=ENV, timeout=60).returncode == 2


def test_show_denoising_redraws_the_canvas():
    child = spawn(*FAST, "--show-denoising")
    child.sendline("Hello")
    child.expect(STATS)
    drawn = child.before
    assert drawn.count("\x1b[2K") >= 4               # Live erases and redraws its region
    assert "\x1b[2m" in drawn and "mean entropy" in drawn and "canvas 2" in drawn
    child.expect_exact(PROMPT)
    child.sendline("/show")
    child.expect_exact("live canvas off")
    child.expect_exact(PROMPT)
    finish(child)


def test_frame_renderer_styles():
    text = canvas_text(["a", "b\n", "cc"], [0, 1, 2])
    assert text.plain == "ab↵cc"
    assert [(s.start, s.end, s.style) for s in text.spans] == [(0, 1, STYLES[0]), (1, 3, STYLES[1])]
    assert STYLES[0] == "dim" and "bold" in STYLES[1] and STYLES[2] == ""   # committed text: no style at all
    from rich.console import Console
    con = Console(record=True, width=80, file=open(os.devnull, "w"))
    con.print(view("Once upon", {"canvas": 1, "step": 2, "final": False, "pieces": [" a", " time"], "state": [1, 0],
                                 "accepted": 1, "mean_entropy": 1.234}))
    shown = con.export_text()
    assert "Once upon a time" in shown and "canvas 2 | step 3 | accepted 1/2 | mean entropy 1.23" in shown


def test_against_a_server(tmp_path):
    from serving import ServerProcess
    srv = ServerProcess("--prefill-chunk", "32", "--max-batch", "1", "--api-key", "k",
                        log=open(tmp_path / "server.log", "wb")).wait_ready()
    try:
        system = "You are a helpful assistant who answers questions about the sea, ships and sailors."
        out = subprocess.run([sys.executable, "-m", "dgemma.cli", "chat", "--url", srv.url, "--api-key", "k",
                              "--system", system, *FAST], input="Hello there\nAnd then?\n",
                             capture_output=True, text=True, env=ENV, timeout=60)
        wrong = subprocess.run([sys.executable, "-m", "dgemma.cli", "chat", "--url", srv.url, "--api-key", "k",
                                "--model", "nosuch"], input="Hello\n", capture_output=True, text=True, env=ENV,
                               timeout=60)
    finally:
        srv.stop()
    assert wrong.returncode == 2 and wrong.stderr.startswith("dgemma: error: ") and "'nosuch'" in wrong.stderr
    assert out.returncode == 0, out.stderr
    (n1, tpf1, p1, e1, r1), (n2, tpf2, p2, e2, r2) = STATS.findall(out.stderr)
    n1, p1, n2, p2, e2, r2 = map(int, (n1, p1, n2, p2, e2, r2))
    assert 0 < n1 <= 40 and 0 < n2 <= 40 and tpf1 == tpf2 == ""   # (a reply may end at EOS); no passes reported
    assert p1 >= 32 and r2 >= 32 and e2 == p2 - r2 and p2 > p1 + n1   # turn 1's chunks come from the cache


def test_next_prompt_extends_the_ids_or_re_renders():
    import argparse
    from dgemma.chat import Local
    chat = Local(argparse.Namespace(model=None, device="cpu", dtype="auto", quantize=None, group_size=None), "Be brief.")
    tok = chat.tok
    first, note = chat.prompt("Hi")
    assert note == "" and first == tok.apply_chat_template(chat.messages + [{"role": "user", "content": "Hi"}],
                                                           tokenize=True)
    reply = tok.encode("Hello, sailor.") + [chat.end_turn]           # as generated: the turn ends with its token
    chat.messages += [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, sailor."}]
    chat.ids = first + reply
    ids, note = chat.prompt("And?")
    full = chat.messages + [{"role": "user", "content": "And?"}]
    assert note == "" and ids[:len(chat.ids)] == chat.ids and ids == tok.apply_chat_template(full, tokenize=True)
    chat.ids = first + tok.encode("Hello,") + [tok.token_to_id("<start_of_turn>")] + tok.encode(" sailor.")
    ids, note = chat.prompt("And?")                                  # a special token the text does not show
    assert note.startswith("re-rendered") and ids == tok.apply_chat_template(full, tokenize=True)


def test_presence_penalty_flag_and_command(tmp_path):
    """--presence-penalty / /presence reach the engine: a reply with repeats loses them (more distinct tokens), the
    flag and the command give the same reply, a bad value is refused."""
    def replies(*flags, lines="Once upon a time\n"):                 # (this seed: 64 tokens, half of them repeats)
        save = tmp_path / "c.json"
        out = subprocess.run([sys.executable, "-m", "dgemma.cli", "chat", "--seed", "5", "--max-new-tokens", "64",
                              *flags], input=lines + f"/save {save}\n", capture_output=True, text=True, env=ENV,
                             timeout=60)
        assert out.returncode == 0, out.stderr
        return [m["content"] for m in json.loads(save.read_text()) if m["role"] == "assistant"], out.stderr

    tok = dgemma.load_tokenizer(dgemma.default_model_path())
    plain, _ = replies()
    pen, _ = replies("--presence-penalty", "2")
    ids = [tok.encode(t[0]) for t in (plain, pen)]
    assert len(set(ids[1])) / len(ids[1]) > len(set(ids[0])) / len(ids[0]) + 0.2     # fewer repeats
    by_cmd, err = replies(lines="/presence 3\n/presence 2\nOnce upon a time\n")
    assert "usage: /presence X" in err and "presence 2.0" in err and by_cmd == pen
    assert subprocess.run([sys.executable, "-m", "dgemma.cli", "chat", "--presence-penalty", "5"],
                          capture_output=True, text=True, env=ENV, timeout=60).returncode == 2
