"""`dgemma chat`: a multi-turn terminal chat that can show each canvas denoise live.

Knows: a read-eval loop with slash commands; two backends with one interface, `Local` (the model in this
process, on an `Engine` with whole-prompt reuse) and `Remote` (a running `dgemma serve`, streamed SSE chunks,
`dgemma_frame`s and usage); keeping a local conversation as token ids, so turn N+1's prompt is turn N's prompt +
the reply's ids + the template's tail for the new user turn and only that tail is encoded (when the rendered
template does not extend the ids' text, the whole conversation is re-rendered, and the stats say so); Ctrl-C
(stops a reply between engine steps, exits at the prompt); drawing a canvas with rich (noise dim, accepted bright,
committed plain); plain text without control codes when stdout is not a terminal.
Does not know: the model math, HTTP routes other than chat completions and the model list, tool calls, images.
rich draws the canvas in a terminal (imported only there).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any

STYLES = {0: "dim", 1: "bold bright_white", 2: ""}      # frame state -> style: noise, accepted, committed
PROMPT = "you> "
HELP = """/reset        start a new conversation
/steps N      at most N denoising steps per canvas
/bound X      entropy bound (higher: more positions accepted per step)
/seed N|off   seed the following replies (default: unseeded)
/top_k K      sample each position from its K likeliest tokens (0: all)
/top_p P      sample each position from its likeliest tokens holding probability P (1: all)
/presence X   penalise tokens the reply has already committed (-2 to 2; 0: off): less repetition
/show         toggle the live canvas (terminal only)
/save FILE    write the conversation as JSON messages
/help         this text
/quit         leave (also Ctrl-D). Ctrl-C stops a reply; at the prompt it leaves"""


@dataclass
class Options:
    steps: int | None = None
    bound: float | None = None
    seed: int | None = None
    max_new_tokens: int | None = None
    show: bool = False
    top_k: int | None = None
    top_p: float | None = None
    presence: float | None = None

    def settings(self) -> dict[str, Any]:
        """The sampler settings given (engine / request field names)."""
        given = {"max_denoising_steps": self.steps, "entropy_bound": self.bound, "top_k": self.top_k,
                 "top_p": self.top_p, "presence_penalty": self.presence}
        return {k: v for k, v in given.items() if v is not None}


@dataclass
class Stats:
    new: int
    seconds: float
    first: float | None          # seconds to the first committed canvas
    prompt: int
    cached: int
    tpf: float | None = None     # tokens per forward (in-process only; the server does not report passes)
    note: str = ""

    def line(self) -> str:
        parts = [f"{self.new} new tokens", f"{self.new / max(self.seconds, 1e-9):.1f} tokens/s"]
        if self.tpf is not None:
            parts.append(f"{self.tpf:.2f} tokens/forward")
        parts.append("first canvas " + (f"{self.first:.2f} s" if self.first is not None else "-"))
        parts.append(f"prompt {self.prompt}: {self.prompt - self.cached} encoded, {self.cached} reused")
        return "[" + " | ".join(parts) + "]" + (f" ({self.note})" if self.note else "")


# ---- drawing ---------------------------------------------------------------------------------------------
def _visible(piece: str) -> str:
    return "".join("↵" if c == "\n" else c if c.isprintable() else "·" for c in piece)


def canvas_text(pieces: list[str], state: list[int]):
    """One canvas as rich Text: each token piece styled by its state (STYLES)."""
    from rich.text import Text
    text = Text()
    for piece, s in zip(pieces, state):
        text.append(_visible(piece), STYLES[s])
    return text


def view(committed: str, frame: dict, lines: int = 6):
    """The live region: the reply's last lines of committed text, the canvas after it, a status line."""
    from rich.console import Group
    from rich.text import Text
    tail = "\n".join(committed.split("\n")[-lines:])[-lines * 80:]
    status = "committed" if frame["final"] else f"step {frame['step'] + 1}"
    return Group(Text(tail).append_text(canvas_text(frame["pieces"], frame["state"])),
                 Text(f"canvas {frame['canvas'] + 1} | {status} | accepted {frame['accepted']}/"
                      f"{len(frame['state'])} | mean entropy {frame['mean_entropy']:.2f}", style="cyan"))


class UI:
    """Where a reply goes. In a terminal: text streams to stdout, or (show) a rich Live region redraws the canvas
    and the text is printed when the reply ends; chrome is styled. Otherwise plain text only: replies on stdout,
    everything else on stderr, frames ignored."""

    def __init__(self, console: Any = None) -> None:
        self.console = console
        if console is None and sys.stdout.isatty() and os.environ.get("TERM") != "dumb":
            try:
                from rich.console import Console
                self.console = Console(highlight=False)
            except ImportError:
                pass
        self.live: Any = None
        self.text, self.drawn = "", 0.0

    def info(self, msg: str, style: str = "dim") -> None:
        if self.console is not None:
            self.console.print(msg, style=style, markup=False, highlight=False, soft_wrap=True)
        else:
            print(msg, file=sys.stderr, flush=True)

    def begin(self, show: bool) -> None:
        self.text = ""
        if show and self.console is not None:
            from rich.live import Live
            self.live = Live(console=self.console, auto_refresh=False, transient=True)
            self.live.start()

    def delta(self, s: str) -> None:
        self.text += s
        if self.live is None and s:
            sys.stdout.write(s)
            sys.stdout.flush()

    def frame(self, f: dict) -> None:
        now = time.monotonic()
        if self.live is not None and (f["final"] or now - self.drawn >= 1 / 30):   # at most ~30 redraws/s
            self.drawn = now
            self.live.update(view(self.text, f), refresh=True)

    def end(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None
            sys.stdout.write(self.text)
        sys.stdout.write("\n")
        sys.stdout.flush()


class CtrlC:
    """While a reply runs: the first Ctrl-C sets `hit` (immediate=True: raises KeyboardInterrupt), the second
    raises KeyboardInterrupt (leave)."""

    def __init__(self, immediate: bool) -> None:
        self.immediate, self.hit = immediate, False

    def __enter__(self) -> "CtrlC":
        self.old = signal.signal(signal.SIGINT, self._on)
        return self

    def _on(self, *_: Any) -> None:
        again, self.hit = self.hit, True
        if again or self.immediate:
            raise KeyboardInterrupt

    def __exit__(self, *_: Any) -> None:
        signal.signal(signal.SIGINT, self.old)


# ---- backends ---------------------------------------------------------------------------------------------
class Local:
    """The model in this process. The conversation is `messages` (text) and `ids` (exactly what was encoded)."""
    immediate = False

    def __init__(self, args: argparse.Namespace, system: str | None) -> None:
        import dgemma
        from dgemma.checkpoint import resolve_device
        from dgemma.cli import _device, _model_dir, load_model
        from dgemma.engine import Engine
        path, dev = _model_dir(args.model), resolve_device(_device(args.device))
        self.model = load_model(path, args, dev)
        self.tok = dgemma.load_tokenizer(self.model.path)
        sc = self.model.sampler_config
        self.end_turn = self.tok.token_to_id("<end_of_turn>")
        self.eos = self.tok.chat_eos(sc.eos_token_id)
        self.pad = sc.pad_token_id
        self.eng = Engine(self.model, max_batch=1, exact_reuse=False)
        self.label = f"{path.name} ({self.model.device}, {str(self.model.dtype).replace('torch.', '')})"
        self.system, self.pieces = system, {}
        self.reset()
        self.tok.apply_chat_template(self.messages + [{"role": "user", "content": "hi"}])  # template errors: now

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.ids: list[int] = []

    def prompt(self, user: str) -> tuple[list[int], str]:
        """The next prompt's ids: the conversation's ids + the template's tail, or (note) a full re-render."""
        text = self.tok.apply_chat_template(self.messages + [{"role": "user", "content": user}])
        if not self.ids:
            return self.tok.encode(text), ""
        have = self.tok.decode(self.ids, skip_special_tokens=False)
        if text.startswith(have):
            return self.ids + self.tok.encode(text[len(have):]), ""
        return self.tok.encode(text), "re-rendered: the template does not extend the conversation's tokens"

    def _frame(self, f: Any) -> dict:
        from dgemma.serve.text import frame_json
        return frame_json(f, self.tok, self.pieces)

    def reply(self, user: str, opt: Options, ui: UI, ctrl: CtrlC) -> Stats | None:
        from dgemma.serve.text import TextStream
        ids, note = self.prompt(user)
        cfg, C = self.model.config, self.model.config.canvas_length
        room = (cfg.max_position_embeddings - len(ids)) // C * C
        if room < 1:
            raise ValueError(f"the conversation ({len(ids)} tokens) fills the model's context: /reset")
        limit = min(opt.max_new_tokens or self.model.sampler_config.max_new_tokens, room)
        t0, first, stream = time.perf_counter(), None, TextStream(self.tok, [])
        rid = self.eng.submit(ids, seed=opt.seed, frames=ui.live is not None, max_new_tokens=limit,
                              eos_token_id=self.eos, **opt.settings())
        while (res := self.eng.collect(rid)) is None:
            if ctrl.hit:
                self.eng.cancel(rid)
                return None
            events = self.eng.step()
            for f in self.eng.take_frames():
                ui.frame(self._frame(f))
            for ev in events:
                first = first or time.perf_counter()
                ui.delta(stream.push(ev.tokens, final=ev.finished))
        seconds = time.perf_counter() - t0
        kept = [t for t in res.tokens if t != self.pad]
        if kept and kept[-1] in self.eos and kept[-1] != self.end_turn:
            kept.pop()                                  # the template closes the turn itself
        self.messages += [{"role": "user", "content": user},
                          {"role": "assistant", "content": self.tok.decode(kept, skip_special_tokens=True)}]
        self.ids = ids + kept
        if len(self.ids) < cfg.max_position_embeddings and self.eng.warm(self.ids):
            while self.eng.warming and not ctrl.hit:    # encode the reply now, so the next turn finds it
                self.eng.step()
            self.eng.drop_warm()
        return Stats(len(kept), seconds, first and first - t0, len(ids), res.cached_tokens, res.tokens_per_forward,
                     note)


class Remote:
    """A running `dgemma serve`: the whole message list is sent each turn; the server reuses prefixes."""
    immediate = True

    def __init__(self, args: argparse.Namespace, system: str | None) -> None:
        import httpx
        from dgemma.cli import UsageError
        key = args.api_key or os.environ.get("DGEMMA_API_KEY")
        self.url = args.url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, timeout=httpx.Timeout(30, read=600),
                                 headers={"Authorization": f"Bearer {key}"} if key else {})
        try:
            r = self.http.get("/v1/models")
            r.raise_for_status()
            served = [m["id"] for m in r.json()["data"]]
            self.name = args.model or served[0]
        except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as e:
            raise UsageError(f"cannot use the server at {self.url}: {e}") from None
        if self.name not in served:
            raise UsageError(f"the server at {self.url} serves {', '.join(map(repr, served))}, not {self.name!r}")
        self.label, self.system = f"{self.name} at {self.url}", system
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def reply(self, user: str, opt: Options, ui: UI, ctrl: CtrlC) -> Stats | None:
        import httpx
        msgs = self.messages + [{"role": "user", "content": user}]
        body: dict[str, Any] = {"model": self.name, "messages": msgs, "stream": True, "seed": opt.seed,
                                "stream_options": {"include_usage": True}, "max_tokens": opt.max_new_tokens,
                                **opt.settings()}
        body = {k: v for k, v in body.items() if v is not None} | ({"denoising_frames": True} if ui.live else {})
        t0, first, text, usage = time.perf_counter(), None, "", None
        try:
            with self.http.stream("POST", "/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    r.read()
                    raise ValueError(f"server: {_error(r)}")
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        raise ValueError(f"server: {chunk['error'].get('message')}")
                    if chunk.get("dgemma_frame"):
                        ui.frame(chunk["dgemma_frame"])
                    for ch in chunk.get("choices") or []:
                        delta = (ch.get("delta") or {}).get("content") or ""
                        if delta:
                            first = first or time.perf_counter()
                            text += delta
                            ui.delta(delta)
                    usage = chunk.get("usage") or usage
        except KeyboardInterrupt:                       # leaving the `with` closes the stream: the server cancels
            return None
        except httpx.HTTPError as e:
            raise ValueError(f"server: {e}") from None
        self.messages = msgs + [{"role": "assistant", "content": text}]
        usage = usage or {}
        cached = ((usage.get("prompt_tokens_details") or {}).get("cached_tokens")) or 0
        return Stats(usage.get("completion_tokens", 0), time.perf_counter() - t0, first and first - t0,
                     usage.get("prompt_tokens", 0), cached)


def _error(r: Any) -> str:
    try:
        return r.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return f"HTTP {r.status_code}"


# ---- the loop ---------------------------------------------------------------------------------------------
USAGE = {"steps": "/steps N (a positive integer)", "bound": "/bound X (a number > 0)",
         "seed": "/seed N (an integer) or /seed off", "save": "/save FILE", "top_k": "/top_k K (an integer >= 0)",
         "top_p": "/top_p P (a number in [0, 1])", "presence": "/presence X (a number in [-2, 2])"}


def _check(value: Any, ok: Any) -> Any:
    if not ok(value):
        raise ValueError
    return value


def command(line: str, chat: Local | Remote, opt: Options, ui: UI) -> bool:
    """Run one slash command; False: leave."""
    name, _, arg = line[1:].strip().partition(" ")
    arg = arg.strip()
    try:
        if name in ("quit", "exit", "q"):
            return False
        elif name == "reset":
            chat.reset()
            ui.info("(new conversation)")
        elif name in ("steps", "bound", "seed", "top_k", "top_p", "presence"):
            from dgemma.cli import _fraction, _non_negative, _penalty, _positive, seed   # (the flags' own parsers)
            if name == "steps":
                opt.steps = _positive(arg)
            elif name == "bound":
                opt.bound = _check(float(arg), lambda x: 0 < x < math.inf)
            elif name == "top_k":
                opt.top_k = _non_negative(arg)
            elif name == "top_p":
                opt.top_p = _fraction(arg)
            elif name == "presence":
                opt.presence = _penalty(arg) or None
            else:
                opt.seed = None if arg == "off" else seed(arg)
            ui.info(f"(steps {opt.steps or 'default'}, bound {opt.bound or 'default'}, seed {opt.seed}, "
                    f"top_k {opt.top_k or 'off'}, top_p {opt.top_p if opt.top_p is not None else 'off'}, "
                    f"presence {opt.presence or 'off'})")
        elif name == "show" and ui.console is None:
            ui.info("/show: the live canvas needs a terminal (and rich)")
        elif name == "show":
            opt.show = not opt.show
            ui.info(f"(live canvas {'on' if opt.show else 'off'})")
        elif name == "save":
            with open(_check(arg, bool), "w", encoding="utf-8") as fh:
                json.dump(chat.messages, fh, ensure_ascii=False, indent=2)
            ui.info(f"(saved {len(chat.messages)} messages to {arg})")
        elif name == "help":
            ui.info(HELP, style="")
        else:
            ui.info(f"unknown command /{name} (/help lists them)", style="red")
    except (ValueError, argparse.ArgumentTypeError):
        ui.info(f"usage: {USAGE[name]}", style="red")
    except OSError as e:
        ui.info(f"/save: {e.strerror or e}: {arg}", style="red")
    return True


def run(chat: Local | Remote, opt: Options, ui: UI) -> int:
    try:
        import readline  # noqa: F401  (line editing and history at the prompt)
    except ImportError:
        pass
    ui.info(f"dgemma chat with {chat.label}. /help for commands, Ctrl-D to leave.")
    while True:
        try:
            line = input(PROMPT if sys.stdin.isatty() else "").strip()
        except EOFError:
            if sys.stdin.isatty():
                print(flush=True)
            return 0
        except KeyboardInterrupt:
            print(flush=True)
            return 130
        if not line:
            continue
        if line.startswith("/"):
            if not command(line, chat, opt, ui):
                return 0
            continue
        ui.begin(opt.show)
        try:
            with CtrlC(chat.immediate) as ctrl:
                try:
                    stats = chat.reply(line, opt, ui, ctrl)
                finally:
                    ui.end()
        except KeyboardInterrupt:                       # a second Ctrl-C during a reply: leave
            return 130
        except ValueError as e:
            ui.info(f"error: {e}", style="red")
            continue
        ui.info(stats.line() if stats is not None else "(stopped; this turn is not kept)")


def add_chat(sub: Any) -> None:
    from dgemma.cli import _fraction, _non_negative, _penalty, _positive, add_weights_args, seed
    p = sub.add_parser("chat", help="chat in the terminal, watching the canvas denoise",
                       description="Chat in the terminal with a model in this process (default: the shipped model) "
                                   "or a running `dgemma serve` (--url). Slash commands: /help.")
    p.add_argument("--model", metavar="PATH_OR_ID", help="checkpoint folder or Hub id; with --url the served name")
    p.add_argument("--url", help="talk to a running `dgemma serve` at URL instead of loading the model")
    p.add_argument("--api-key", metavar="KEY", help="with --url: the server's key (default: $DGEMMA_API_KEY)")
    p.add_argument("--device", metavar="DEV", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    add_weights_args(p)
    p.add_argument("--steps", type=_positive, metavar="N", help="max denoising steps per canvas")
    p.add_argument("--bound", type=float, metavar="X", help="entropy bound")
    p.add_argument("--seed", type=seed, metavar="N", help="seed every reply (default: unseeded)")
    p.add_argument("--top-k", type=_non_negative, metavar="K", help="sample each position from its K likeliest tokens")
    p.add_argument("--top-p", type=_fraction, metavar="P",
                   help="sample each position from its likeliest tokens holding probability P (nucleus)")
    p.add_argument("--presence-penalty", type=_penalty, metavar="X",
                   help="penalise tokens a reply has already committed, -2 to 2 (less repetition)")
    p.add_argument("--max-new-tokens", type=_positive, metavar="N", help="at most N tokens per reply")
    p.add_argument("--system", metavar="TEXT", help="a system message at the start of the conversation")
    p.add_argument("--show-denoising", action="store_true", help="redraw the canvas at every denoising pass")
    p.set_defaults(run=cmd_chat)


def cmd_chat(args: argparse.Namespace) -> int:
    from dgemma.cli import UsageError
    if args.url is None and args.api_key:
        raise UsageError("--api-key needs --url")
    if args.url is not None and (args.device or args.dtype != "auto" or args.quantize or args.group_size):
        raise UsageError("--device, --dtype, --quantize and --group-size are for the in-process model, not --url")
    if args.bound is not None and not 0 < args.bound < math.inf:
        raise UsageError("--bound must be a number > 0")
    ui = UI()
    show = args.show_denoising and ui.console is not None
    if args.show_denoising and not show and sys.stdout.isatty():
        ui.info("(--show-denoising needs rich: pip install rich)")
    opt = Options(args.steps, args.bound, args.seed, args.max_new_tokens, show, args.top_k, args.top_p,
                  args.presence_penalty or None)
    chat = (Remote if args.url else Local)(args, args.system)
    return run(chat, opt, ui)
