"""Logit agreement of each weight scheme with the unquantized model (docs/NOTES.md, "Cheaper hardware").

    python scripts/quant_quality.py [--model PATH] [--data FILES...] [--shape 100m]

On held-out text (the training corpus's held-out split when --data is given, else fixed sentences): encoder
logits over 8 x 128 tokens and denoiser logits for a noisy canvas after a 64-token context, each scheme in bf16
against the unquantized model in bf16 (KL(bf16 || scheme) per position, top-1 agreement). The first row, bf16
against fp32, is the rounding floor. --shape instead uses random weights of a named shape (their logits are
nearly flat: agreement there tests wiring, not quality).
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

import dgemma

SCHEMES = [("int8", None), ("fp8", None), ("int4", 32), ("int4", 64), ("int4", 128)]
FIXED = ["The old house at the end of the street had been empty for many years, and the children of the town "
         "said that strange lights moved behind its windows at night.",
         "And it came to pass in those days, that there went out a decree from the king, that all the people "
         "should be numbered, every man in his own city.",
         "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
         "want of a wife, however little known the feelings or views of such a man may be."]


def kl(a: torch.Tensor, b: torch.Tensor) -> float:
    """mean over positions of KL(b || a), logits [.., V]."""
    return float(F.kl_div(a.log_softmax(-1), b.log_softmax(-1), log_target=True, reduction="none").sum(-1).mean())


def top1(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.argmax(-1) == b.argmax(-1)).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=dgemma.default_model_path())
    ap.add_argument("--shape")
    ap.add_argument("--data", nargs="*")
    a = ap.parse_args()
    torch.manual_seed(0)
    tmp = None
    path = a.model
    if a.shape:
        from dgemma.bench.worker import build
        tmp = tempfile.TemporaryDirectory()
        path = str(Path(tmp.name) / a.shape)
        dgemma.save(build({"shape": a.shape, "device": "cpu", "dtype": "float32"}), path)
    base = dgemma.load(path, dtype="bfloat16")
    V = base.config.vocab_size
    if a.data:
        from dgemma.train.data import encode_documents, pack
        tok = dgemma.load_tokenizer(path)
        ids = pack(encode_documents(a.data, tok)[1], 128, tok.pad_token_id or 0)[0]
        ids = ids[torch.randperm(len(ids))[:8]]
    elif a.shape:
        ids = torch.randint(3, V, (8, 128))
    else:
        tok = dgemma.load_tokenizer(path)
        rows = [tok.encode(t) for t in FIXED]
        n = min(map(len, rows))
        ids = torch.tensor([r[:n] for r in rows])
    ctx = ids[:, :64]
    canvas = torch.where(torch.rand(ids.shape[0], min(64, base.config.canvas_length)) < 0.5,
                         torch.randint(3, V, (ids.shape[0], min(64, base.config.canvas_length))),
                         ids[:, 64:64 + min(64, base.config.canvas_length)]) if ids.shape[1] > 64 else ids[:, :16]
    ref = (base.encoder_logits(ids), base.denoise_logits(ctx, canvas))
    f32 = dgemma.load(path, dtype="float32")
    rows = [("bf16 vs fp32 (floor)", (f32.encoder_logits(ids), f32.denoise_logits(ctx, canvas)))]
    for w, g in SCHEMES:
        try:
            m = dgemma.load(path, dtype="bfloat16", quantize=w, group_size=g)
        except ValueError as e:
            print(f"{w} g{g}: {e}")
            continue
        rows.append((w + (f" (G={g})" if g else ""), (m.encoder_logits(ids), m.denoise_logits(ctx, canvas))))
    print(f"model {a.shape or path}, {ids.shape[0]} x {ids.shape[1]} tokens")
    print("| scheme | encoder KL | encoder top-1 | denoiser KL | denoiser top-1 |\n|---|---|---|---|---|")
    for name, (e, d) in rows:
        print(f"| {name} | {kl(e, ref[0]):.5f} | {top1(e, ref[0]):.3f} | {kl(d, ref[1]):.5f} | {top1(d, ref[1]):.3f} |")


if __name__ == "__main__":
    main()
