"""Record docs/chat.svg: a terminal screenshot of `dgemma chat --show-denoising` in the middle of a reply.

Plays a short conversation with the shipped model in this process (CPU, seeded) into a recording rich Console,
then draws the live region as it looked halfway through a canvas of the last reply, and saves it as SVG.
Usage: python scripts/record_chat.py [--out docs/chat.svg] [--seed N] [--steps N]
"""
from __future__ import annotations

import argparse
import io
from pathlib import Path

from rich.console import Console

from dgemma.chat import PROMPT, CtrlC, Local, Options, UI, view


class Recorder(UI):
    """A UI that keeps the reply's text and every frame (with the text committed before it) instead of drawing."""

    def begin(self, show: bool) -> None:
        self.text, self.live, self.shots = "", object(), []

    def delta(self, s: str) -> None:
        self.text += s

    def frame(self, f: dict) -> None:
        self.shots.append((self.text, f))

    def end(self) -> None:
        self.live = None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "chat.svg"))
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--steps", type=int, default=16)
    args = ap.parse_args()
    console = Console(record=True, width=120, force_terminal=True, color_system="truecolor", file=io.StringIO())
    chat = Local(argparse.Namespace(model=None, device="cpu", dtype=None), None)
    ui, opt = Recorder(console), Options(steps=args.steps, seed=args.seed, max_new_tokens=96, show=True)
    console.print(f"dgemma chat with {chat.label}. /help for commands, Ctrl-D to leave.", style="dim")
    turns = ["Hello! Who are you?", "Tell me about the sea and the ships."]
    for i, msg in enumerate(turns):
        console.print(PROMPT + msg, markup=False, highlight=False)
        ui.begin(True)
        with CtrlC(False) as ctrl:
            stats = chat.reply(msg, opt, ui, ctrl)
        if i < len(turns) - 1:
            console.print(ui.text, markup=False, highlight=False)
            console.print(stats.line(), style="dim", markup=False, highlight=False)
    last = max(f["canvas"] for _, f in ui.shots)                 # halfway through the last canvas
    mid = [s for s in ui.shots if s[1]["canvas"] == last and not s[1]["final"]]
    text, frame = mid[len(mid) // 2]
    console.print(view(text, frame))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    console.save_svg(args.out, title="dgemma chat --show-denoising")
    print(f"wrote {args.out} (canvas {frame['canvas'] + 1}, step {frame['step'] + 1})")


if __name__ == "__main__":
    main()
