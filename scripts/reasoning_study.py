"""Issue 9, part 3: does parallel (diffusion) decoding lose reasoning accuracy against AR on the same weights?

A synthetic task family with a written-out chain of steps, e.g.

    Q: 7+5*3-4=? A: 7+5=12; 12*3=36; 36-4=32; #32

(operations applied left to right, so every step needs the previous result). A DiffusionGemma-architecture model
trained on it (`scripts/reasoning_study.sh`) answers held-out problems it never saw in training, decoded
  * AR: greedy, one token per forward through the causal encoder;
  * diffusion: the canvas denoised in S = C, C/2, C/4, C/8, C/16 fixed steps (C / S tokens per forward, no early
    stop), accepted positions taking the argmax (Engine greedy rows).
Scored by exact match of the number after '#'.

    python scripts/reasoning_study.py data OUT_DIR [--train N] [--heldout N]
    python scripts/reasoning_study.py eval --model RUN/checkpoint --heldout OUT_DIR/heldout.jsonl [--n N] [--json F]
"""
from __future__ import annotations

import argparse
import json
import random
import re
import time
from pathlib import Path

OPS = "+-*"


def problem(r: random.Random) -> tuple[str, str, int] | None:
    """(question, worked answer, result), or None when an intermediate leaves 0..999."""
    n = r.randint(2, 4)
    nums = [r.randint(1, 9) for _ in range(n + 1)]
    ops = [r.choice(OPS) for _ in range(n)]
    acc, steps = nums[0], []
    for o, b in zip(ops, nums[1:]):
        new = acc + b if o == "+" else acc - b if o == "-" else acc * b
        if not 0 <= new <= 999:
            return None
        steps.append(f"{acc}{o}{b}={new}")
        acc = new
    q = str(nums[0]) + "".join(o + str(b) for o, b in zip(ops, nums[1:]))
    return f"Q: {q}=?", f" A: {'; '.join(steps)}; #{acc}", acc


def held_out(question: str) -> bool:
    """A fixed 10% of all possible questions never appear in training (a deterministic split)."""
    import hashlib
    return hashlib.sha256(question.encode()).digest()[0] < 26


def cmd_data(a: argparse.Namespace) -> None:
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    r = random.Random(a.seed)
    train, held, seen = [], [], set()
    while len(train) < a.train or len(held) < a.heldout:
        p = problem(r)
        if p is None:
            continue
        q, ans, val = p
        if held_out(q):
            if len(held) < a.heldout and q not in seen:
                seen.add(q)
                held.append({"question": q, "answer": ans, "value": val})
        elif len(train) < a.train:
            train.append(q + ans)
    # one problem per line, blank-line separated paragraphs = documents for `dgemma train`
    (out / "train.txt").write_text("\n\n".join(train) + "\n")
    (out / "heldout.jsonl").write_text("".join(json.dumps(h) + "\n" for h in held))
    assert not seen & {t.split(" A:")[0] for t in train}
    print(f"wrote {len(train)} training and {len(held)} held-out problems to {out}")


_ANSWER = re.compile(r"#(-?\d+)")


def answer(text: str) -> int | None:
    m = _ANSWER.search(text)
    return int(m.group(1)) if m else None


def cmd_eval(a: argparse.Namespace) -> None:
    import torch

    import dgemma
    from dgemma.engine import Engine

    model = dgemma.load(a.model, dtype="float32")
    tok = dgemma.load_tokenizer(a.model)
    C = model.config.canvas_length
    items = [json.loads(line) for line in Path(a.heldout).read_text().splitlines()][: a.n]
    prompts = [tok.encode_prompt(it["question"]) for it in items]
    eos = model.sampler_config.eos_token_id

    def score(texts: list[str]) -> float:
        return sum(answer(t) == it["value"] for t, it in zip(texts, items)) / len(items)

    rows = []
    t0 = time.perf_counter()
    ar_texts = []
    for p in prompts:
        out = model.generate_ar(torch.tensor([p]), max_new_tokens=C, temperature=0.0)
        ar_texts.append(tok.decode(out.sequences[0, len(p):].tolist(), skip_special_tokens=True))
    rows.append({"decoder": "AR (greedy)", "tokens_per_forward": 1.0, "accuracy": score(ar_texts),
                 "seconds": time.perf_counter() - t0, "example": ar_texts[0]})
    steps_list = [s for s in (C, C // 2, C // 4, C // 8, C // 16) if s >= 1]
    for steps in steps_list:
        eng = Engine(model, max_batch=16, sampler="exact")
        t0 = time.perf_counter()
        ids = [eng.submit(p, seed=i, greedy=True, max_new_tokens=C, max_denoising_steps=steps,
                          stability_threshold=None, eos_token_id=eos) for i, p in enumerate(prompts)]
        res = eng.run()
        texts = [tok.decode(res[i].tokens, skip_special_tokens=True) for i in ids]
        passes = sum(res[i].decoder_passes for i in ids)
        rows.append({"decoder": f"diffusion, {steps} steps", "steps": steps,
                     "tokens_per_forward": C * len(ids) / passes, "accuracy": score(texts),
                     "seconds": time.perf_counter() - t0, "example": texts[0]})
    print(f"model {a.model}: canvas {C}, {len(items)} held-out problems (first: {items[0]['question']}"
          f"{items[0]['answer']})")
    print("| decoder | tokens / forward | exact-match accuracy | example |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['decoder']} | {r['tokens_per_forward']:.2f} | {r['accuracy']:.3f} | `{r['example'][:60]}` |")
    if a.json:
        Path(a.json).write_text(json.dumps({"model": a.model, "canvas": C, "n": len(items), "rows": rows}, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("data")
    d.add_argument("out")
    d.add_argument("--train", type=int, default=200_000)
    d.add_argument("--heldout", type=int, default=500)
    d.add_argument("--seed", type=int, default=0)
    e = sub.add_parser("eval")
    e.add_argument("--model", required=True)
    e.add_argument("--heldout", required=True)
    e.add_argument("--n", type=int, default=200)
    e.add_argument("--json")
    a = ap.parse_args()
    cmd_data(a) if a.cmd == "data" else cmd_eval(a)


if __name__ == "__main__":
    main()
