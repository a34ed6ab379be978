"""Quality suite for `dgemma eval --quality`: how good is the generated text, diffusion vs AR on the same weights.

Knows: how to continue a fixed set of prompts with autoregressive decoding (the reference point) and with each
block-diffusion setting, and how to measure the continuations:
  * perplexity of the continuation given its prompt under a scorer (default: the model's own causal encoder,
    `model.encoder_logits`; or `TextScorer`, any causal LM folder transformers loads, scoring the text);
    scoring stops at the first EOS (the EOS itself is scored, pad never is). The
    suite reports the geometric mean over prompts of the per-prompt perplexities (each prompt weighs the same),
    and each run's ratio to the AR run's (`perplexity_vs_ar`: the "diffusion within 1.5x of AR" measure);
  * distinct-1/2 (unique n-grams / n-grams of one continuation, token ids, averaged over prompts) and the longest
    repeated n-gram (longest token n-gram occurring twice, overlaps allowed, max over prompts), so that degenerate
    loops, which a self-scorer likes, cannot look good;
  * tokens per forward (new non-pad tokens / decoder passes, as generate reports it; AR is at most 1) and
    tokens per second (new non-pad tokens / wall time of generation alone, one prompt at a time), and the stop
    rate (canvases on which the stable-and-confident rule fired / canvases denoised, from generate's stop_fired);
  * exact-match accuracy on seeded integer arithmetic and two-step word problems (first integer of the answer).
Diffusion emits whole canvases; its continuations are cut to `max_new_tokens` before they are measured, so both
decoders are judged on the same length.

Does not know: whether the text is true, fluent or on-topic beyond what the scorer's probabilities say. A model
scoring its own samples favours the decoder that samples from that same distribution (AR): the perplexity gap
between AR and diffusion is an upper bound on what the encoder "dislikes" about diffusion text, not a human
judgement. Prompts are run one at a time (B=1) so that no padding can change a result; that is slow but exact.
"""
from __future__ import annotations

import math
import random
import re
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Hashable, Iterable, Sequence

import torch

Scorer = Callable[[torch.Tensor], torch.Tensor]   # ids [1, T] -> next-token logits [1, T, V]

# the keys of every entry of run_suite(...)["runs"]
RUN_KEYS = ("name", "decoder", "perplexity", "perplexity_vs_ar", "distinct_1", "distinct_2", "longest_repeat",
            "tokens_per_forward", "tokens_per_second", "task_accuracy", "mean_new_tokens", "stop_rate", "samples")
SETTING_KEYS = ("max_denoising_steps", "entropy_bound", "t_min", "t_max")

# ---- perplexity ----------------------------------------------------------------------------------------------


def _eos_ids(model) -> set[int]:
    e = model.sampler_config.eos_token_id
    return set() if e is None else ({int(e)} if isinstance(e, int) else {int(x) for x in e})


def _trim(cont: Sequence[int], eos: Iterable[int], pad: int | None) -> list[int]:
    """The continuation up to and including its first EOS, without pad."""
    eos, out = set(eos), []
    for t in map(int, cont):
        if pad is not None and t == pad:
            continue
        out.append(t)
        if t in eos:
            break
    return out


def continuation_nll(model, prompt_ids: Sequence[int], cont_ids: Sequence[int],
                     scorer: Scorer | None = None) -> tuple[float, int]:
    """Sum of -log p(continuation token | prompt, earlier continuation tokens) and the number of tokens scored.

    Scoring stops after the first EOS (which is scored) and skips pad. `scorer(ids [1, T]) -> logits [1, T, V]`
    (default: `model.encoder_logits`, the causal encoder of the same weights). An empty continuation -> (0.0, 0)."""
    prompt = [int(t) for t in prompt_ids]
    pad = model.sampler_config.pad_token_id
    cont = _trim(cont_ids, _eos_ids(model), pad)
    if not cont:
        return 0.0, 0
    if not prompt:
        raise ValueError("continuation_nll needs at least one prompt token")
    ids = torch.tensor([prompt + cont], dtype=torch.long)
    logits = (scorer or model.encoder_logits)(ids)[0].float()           # [T, V]
    L = len(prompt)
    logp = torch.log_softmax(logits[L - 1:L - 1 + len(cont)], dim=-1)    # logits at t predict token t+1
    target = torch.tensor(cont, dtype=torch.long, device=logp.device)
    nll = -logp.gather(1, target[:, None]).sum()
    return float(nll), len(cont)


def perplexity(model, prompt_ids: Sequence[int], cont_ids: Sequence[int], scorer: Scorer | None = None) -> float:
    """exp(mean NLL) of the continuation given the prompt (see continuation_nll); nan if nothing was scored."""
    s, n = continuation_nll(model, prompt_ids, cont_ids, scorer)
    return math.exp(s / n) if n else float("nan")


class TextScorer:
    """An independent scorer: a causal LM in a local folder, scoring text, so it does not need the model's
    tokenizer: perplexity of the continuation's own tokens given the prompt's. Either a transformers causal LM
    (config, weights, tokenizer; e.g. a small GPT-2 or Llama; transformers is an optional extra), or another
    DiffusionGemma checkpoint, whose causal encoder scores (one fixed scorer for several models' text, instead of
    each model scoring itself)."""

    def __init__(self, path: str, device: str = "cpu") -> None:
        import json
        from pathlib import Path
        if not Path(path).is_dir():
            raise ValueError(f"scorer {path!r} is not a folder (a causal LM with its tokenizer)")
        self.device, self.name = device, path
        cfg = Path(path) / "config.json"
        if cfg.is_file() and str(json.loads(cfg.read_text()).get("model_type", "")).startswith("diffusion_gemma"):
            import dgemma
            model = dgemma.load(path, dtype=torch.float32, device=device)
            tok = dgemma.load_tokenizer(path)
            self.encode = lambda text: tok.encode(text, add_special_tokens=True)
            self.logits, self.bos = model.encoder_logits, tok.bos_token_id
            return
        try:
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError:
            raise ValueError("an independent scorer needs transformers: pip install transformers") from None
        try:
            tok = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"scorer {path!r} could not be loaded as a transformers causal LM: "
                             f"{' '.join(str(e).split())[:300] or type(e).__name__}") from None
        self.encode = lambda text: tok(text)["input_ids"]
        self.logits, self.bos = (lambda ids: model(ids).logits), tok.bos_token_id

    @torch.inference_mode()
    def perplexity(self, prompt: str, cont: str) -> float:
        """exp(mean NLL) of the tokens `prompt + cont` has beyond those it shares with `prompt` alone (a token
        that straddles the boundary is scored as continuation); nan for an empty continuation."""
        p, full = self.encode(prompt), self.encode(prompt + cont)
        k = 0
        while k < min(len(p), len(full)) and p[k] == full[k]:
            k += 1
        if not cont or k >= len(full):
            return float("nan")
        if k == 0:                        # the first scored token needs a context: the scorer's BOS, if it has one
            if self.bos is None:
                return float("nan") if len(full) == 1 else self._score(full, 1)
            full, k = [self.bos] + full, 1
        return self._score(full, k)

    def _score(self, full: list[int], k: int) -> float:
        ids = torch.tensor([full], device=self.device)
        logp = torch.log_softmax(self.logits(ids)[0, k - 1:-1].float(), dim=-1)
        nll = -logp.gather(1, ids[0, k:, None]).mean()
        return float(torch.exp(nll))


def geometric_mean(values: Iterable[float]) -> float:
    """Geometric mean of the finite positive values; nan when there are none."""
    v = [x for x in values if math.isfinite(x) and x > 0]
    return math.exp(sum(map(math.log, v)) / len(v)) if v else float("nan")

# ---- repetition ----------------------------------------------------------------------------------------------


def _ngrams(seq: Sequence[Hashable], n: int) -> list[tuple]:
    return [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]


def distinct_n(seq: Sequence[Hashable], n: int) -> float:
    """Unique n-grams / total n-grams of `seq` (token ids or words); 0.0 when `seq` has no n-gram."""
    if n <= 0:
        raise ValueError(f"distinct_n: n must be positive (got {n})")
    grams = _ngrams(list(seq), n)
    return len(set(grams)) / len(grams) if grams else 0.0


def longest_repeat(seq: Sequence[Hashable], min_n: int = 1) -> int:
    """Length of the longest n-gram (n >= min_n) that occurs at least twice in `seq` (overlaps allowed); 0 if none."""
    if min_n <= 0:
        raise ValueError(f"longest_repeat: min_n must be positive (got {min_n})")
    seq, best = list(seq), 0
    n = min_n
    while n < len(seq):                      # a repeat of length n implies one of length n-1: stop at the first miss
        grams = _ngrams(seq, n)
        if len(set(grams)) == len(grams):
            break
        best, n = n, n + 1
    return best

# ---- tasks ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    prompt: str
    answer: int
    kind: str


_NAMES = ("Tom", "Mia", "Ravi", "Lena", "Omar", "Sofia", "Ken", "Ada", "Luis", "Nora")
_THINGS = ("apples", "marbles", "stickers", "pencils", "cookies", "coins", "books", "shells")
TASK_KINDS = ("arithmetic", "word", "mixed")


def _arithmetic(r: random.Random) -> Task:
    op = r.choice("+-*")
    if op == "*":
        a, b = r.randint(2, 12), r.randint(2, 12)
    else:
        a, b = r.randint(10, 99), r.randint(10, 99)
    ans = a + b if op == "+" else a - b if op == "-" else a * b
    return Task(f"What is {a} {op} {b}? Answer:", ans, "arithmetic")


def _word(r: random.Random) -> Task:
    name, thing = r.choice(_NAMES), r.choice(_THINGS)
    if r.random() < 0.5:
        a, b = r.randint(2, 20), r.randint(2, 20)
        c = r.randint(1, a + b)
        text = (f"{name} has {a} {thing} and buys {b} more, then gives away {c}. "
                f"How many {thing} does {name} have? Answer:")
        return Task(text, a + b - c, "word")
    a, b, c = r.randint(2, 9), r.randint(2, 9), r.randint(1, 9)
    text = (f"{name} has {a} boxes with {b} {thing} in each, then finds {c} more {thing}. "
            f"How many {thing} does {name} have? Answer:")
    return Task(text, a * b + c, "word")


def make_tasks(n: int, seed: int = 0, kind: str = "mixed") -> list[Task]:
    """`n` seeded problems with integer answers: "arithmetic" (a op b), "word" (two-step) or "mixed" (alternating)."""
    if kind not in TASK_KINDS:
        raise ValueError(f"task kind must be one of {', '.join(TASK_KINDS)} (got {kind!r})")
    if n < 0:
        raise ValueError(f"number of tasks must be >= 0 (got {n})")
    r = random.Random(seed)
    make = {"arithmetic": lambda i: _arithmetic(r), "word": lambda i: _word(r),
            "mixed": lambda i: (_arithmetic if i % 2 == 0 else _word)(r)}[kind]
    return [make(i) for i in range(n)]


_INT = re.compile(r"(?<!\d)-?\d+")


def first_integer(text: str) -> int | None:
    m = _INT.search(text)
    return int(m.group()) if m else None


def score_answer(text: str, answer: int) -> bool:
    """Exact match of the first integer in `text` with `answer` ("The answer is 12." -> 12); False when none."""
    got = first_integer(text)
    return got is not None and got == int(answer)

# ---- prompts -------------------------------------------------------------------------------------------------


PROSE_PROMPTS = (
    "The old lighthouse keeper climbed the stairs one last time and",
    "When the rain finally stopped, the children ran out into the street",
    "In the small village at the foot of the mountains, every spring",
    "She opened the letter slowly, because she already knew",
    "The market was loud and crowded, and the smell of fresh bread",
    "After years of silence, the two brothers met again at",
    "The first thing you notice about the city at night is",
    "He had never been good with words, so instead he",
    "On the morning of the festival, the baker woke before dawn and",
    "The river had changed its course during the winter, and now",
    "Nobody in the house could explain why the clock",
    "It was the kind of quiet afternoon when",
)
CHAT_PROMPTS = (
    "Write two sentences about why people enjoy walking in the woods.",
    "Tell me a short story about a cat who learns to swim.",
    "Explain in simple words what a shadow is.",
)


def prompt_set(tok) -> list[tuple[str, list[int]]]:
    """(label, ids) of the fixed prompts: prose openings, with a chat prompt after every three when the tokenizer
    has a chat template (rendered with it, generation prompt added)."""
    prose = [(p, tok.encode_prompt(p)) for p in PROSE_PROMPTS]
    chat = []
    if getattr(tok, "chat_template", None):
        chat = [(f"[chat] {p}", tok.apply_chat_template([{"role": "user", "content": p}], tokenize=True))
                for p in CHAT_PROMPTS]
    out = []
    for i in range(0, len(prose), 3):
        out += prose[i:i + 3]
        if i // 3 < len(chat):
            out.append(chat[i // 3])
    return out

# ---- the suite -----------------------------------------------------------------------------------------------


def _setting_name(s: dict) -> str:
    return (f"diffusion steps={s['max_denoising_steps']} bound={s['entropy_bound']:g} "
            f"t={s['t_min']:g}..{s['t_max']:g}")


def _resolve_setting(model, s: dict) -> dict:
    bad = set(s) - set(SETTING_KEYS)
    if bad:
        raise ValueError(f"unknown diffusion setting(s) {sorted(bad)}; known: {', '.join(SETTING_KEYS)}")
    base = model.sampler_config
    return {k: s.get(k, getattr(base, k)) for k in SETTING_KEYS}


def run_suite(model, tok, settings_list: list[dict], *, ar_temperature: float = 1.0, n_prompts: int = 8,
              n_tasks: int = 8, max_new_tokens: int = 64, seed: int = 0, task_kind: str = "mixed",
              sampler: str = "auto", scorer: Scorer | None = None, text_scorer: TextScorer | None = None,
              n_samples: int = 3,
              progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Continue `n_prompts` fixed prompts and answer `n_tasks` seeded problems with AR (temperature `ar_temperature`,
    0 = greedy) and with each diffusion setting (dicts over SETTING_KEYS; left-out keys come from the model's
    generation_config). Prompt i uses seed `seed + i` (task j: `seed + 10_000 + j`) in every run.

    -> {"model", "max_new_tokens", "n_prompts", "n_tasks", "seed", "ar_temperature", "sampler", "perplexity_mean",
    "runs": [AR first, then one per setting]}; each run has RUN_KEYS (plus its settings). `progress(label)` is called
    after each generation (n_prompts + n_tasks per run)."""
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive (got {max_new_tokens})")
    if ar_temperature < 0:
        raise ValueError(f"ar_temperature must be >= 0 (got {ar_temperature})")
    prompts = prompt_set(tok)
    if not 0 < n_prompts <= len(prompts):
        raise ValueError(f"number of prompts must be between 1 and {len(prompts)} (got {n_prompts})")
    prompts = prompts[:n_prompts]
    tasks = make_tasks(n_tasks, seed, task_kind)
    task_ids = [tok.encode_prompt(t.prompt) for t in tasks]
    settings = [_resolve_setting(model, s) for s in settings_list]
    pad = model.sampler_config.pad_token_id
    eos = _eos_ids(model)

    C = model.config.canvas_length

    def decode_ar(ids: list[int], sd: int):
        out = model.generate_ar(torch.tensor([ids]), max_new_tokens=max_new_tokens, temperature=ar_temperature,
                                seed=sd)
        return out.sequences[0, len(ids):].tolist(), float(out.tokens_per_forward[0]), (0, 0)

    def decoder_for(s: dict):
        def decode(ids: list[int], sd: int):
            out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, seed=sd, sampler=sampler, **s)
            new = out.sequences[0, len(ids):].tolist()
            canvases = len(new) // C         # one row: generate stops at the canvas where it finished
            return new, float(out.tokens_per_forward[0]), (int(out.stop_fired[0]), canvases)
        return decode

    # warm-up (first-call allocations must not count against the first run's tokens/s)
    warm = prompts[0][1]
    model.generate_ar(torch.tensor([warm]), max_new_tokens=1, temperature=0.0)
    model.generate(torch.tensor([warm]), max_new_tokens=1, max_denoising_steps=1, seed=0, sampler=sampler)

    runs = [("ar", {"decoder": "ar", "temperature": ar_temperature}, decode_ar)]
    runs += [(_setting_name(s), {"decoder": "diffusion", **s}, decoder_for(s)) for s in settings]
    results = []
    for name, info, decode in runs:
        ppl, d1, d2, rep, tpf, lens, samples = [], [], [], [], [], [], []
        n_tok, secs, stops = 0, 0.0, [0, 0]
        for i, (label, ids) in enumerate(prompts):
            t0 = time.perf_counter()
            new, tf, (fired, canvases) = decode(ids, seed + i)
            secs += time.perf_counter() - t0
            stops[0] += fired
            stops[1] += canvases
            n_tok += sum(1 for t in new if t != pad)
            cont = _trim(new[:max_new_tokens], eos, pad)
            if text_scorer is not None:
                body_text = tok.decode([t for t in cont if t not in eos])
                ppl.append(text_scorer.perplexity(tok.decode(ids, skip_special_tokens=True), body_text))
            else:
                ppl.append(perplexity(model, ids, cont, scorer))
            body = [t for t in cont if t not in eos]
            d1.append(distinct_n(body, 1))
            d2.append(distinct_n(body, 2))
            rep.append(longest_repeat(body))
            tpf.append(tf)
            lens.append(len(cont))
            if len(samples) < n_samples:
                samples.append({"prompt": label, "text": tok.decode(cont)})
            if progress:
                progress(name)
        correct = 0
        for j, (t, ids) in enumerate(zip(tasks, task_ids)):
            new, _, _ = decode(ids, seed + 10_000 + j)
            correct += score_answer(tok.decode(_trim(new[:max_new_tokens], eos, pad)), t.answer)
            if progress:
                progress(name)
        results.append({"name": name, **info, "perplexity": geometric_mean(ppl),
                        "distinct_1": sum(d1) / len(d1), "distinct_2": sum(d2) / len(d2),
                        "longest_repeat": max(rep), "tokens_per_forward": sum(tpf) / len(tpf),
                        "tokens_per_second": n_tok / secs if secs > 0 else float("nan"),
                        "task_accuracy": correct / len(tasks) if tasks else float("nan"),
                        "mean_new_tokens": sum(lens) / len(lens), "per_prompt_perplexity": ppl,
                        "stop_rate": stops[0] / stops[1] if stops[1] else float("nan"),
                        "samples": samples})
    for r in results:   # the goal's measure: each decoder's perplexity over the AR reference's (AR runs first)
        r["perplexity_vs_ar"] = r["perplexity"] / results[0]["perplexity"]
    return {"max_new_tokens": max_new_tokens, "n_prompts": n_prompts, "n_tasks": n_tasks, "seed": seed,
            "ar_temperature": ar_temperature, "sampler": sampler, "task_kind": task_kind,
            "perplexity_mean": "geometric mean over prompts of exp(mean NLL) under " + (
                f"the independent scorer {text_scorer.name}" if text_scorer else "the model's causal encoder"),
            "tasks": [asdict(t) for t in tasks], "runs": results}


def format_table(results: dict) -> str:
    """The runs as a fixed-width text table."""
    head = (f"{'run':<40} {'ppl':>9} {'vs AR':>6} {'dist1':>6} {'dist2':>6} {'rep':>4} {'tok/fwd':>8} {'tok/s':>8} "
            f"{'stop':>5} {'acc':>5}")
    lines = [head, "-" * len(head)]
    for r in results["runs"]:
        lines.append(f"{r['name']:<40} {r['perplexity']:>9.2f} {r.get('perplexity_vs_ar', float('nan')):>5.2f}x "
                     f"{r['distinct_1']:>6.3f} {r['distinct_2']:>6.3f} "
                     f"{r['longest_repeat']:>4d} {r['tokens_per_forward']:>8.2f} {r['tokens_per_second']:>8.1f} "
                     f"{r.get('stop_rate', float('nan')):>5.2f} {r['task_accuracy']:>5.2f}")
    return "\n".join(lines)


def plot_frontier(results: dict, png: str, x: str = "tokens_per_forward") -> None:
    """Speed/quality frontier: x = tokens per forward (or "tokens_per_second"), y = perplexity (log scale); one
    point per diffusion setting, AR as a marked point with a dashed horizontal reference line."""
    if x not in ("tokens_per_forward", "tokens_per_second"):
        raise ValueError(f"x must be tokens_per_forward or tokens_per_second (got {x!r})")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    diff = [r for r in results["runs"] if r["decoder"] == "diffusion" and math.isfinite(r["perplexity"])]
    ax.scatter([r[x] for r in diff], [r["perplexity"] for r in diff], label="diffusion", zorder=3)
    for r in diff:
        ax.annotate(f"{r['max_denoising_steps']}st b{r['entropy_bound']:g}", (r[x], r["perplexity"]),
                    fontsize=7, xytext=(3, 3), textcoords="offset points")
    for r in results["runs"]:
        if r["decoder"] == "ar" and math.isfinite(r["perplexity"]):
            ax.axhline(r["perplexity"], ls="--", color="gray", lw=1)
            ax.scatter([r[x]], [r["perplexity"]], marker="*", s=120, color="black",
                       label=f"AR (T={r['temperature']:g})", zorder=3)
    ax.set_yscale("log")
    ax.set_xlabel(x.replace("_", " "))
    ax.set_ylabel("perplexity of continuation (own encoder, log)")
    ax.set_title(f"quality vs speed, {results.get('n_prompts')} prompts, {results.get('max_new_tokens')} new tokens")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
