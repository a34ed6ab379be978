"""`dgemma train`, `dgemma eval` and `dgemma tokenizer train` (registered by dgemma.cli).

Knows: the command-line surface of training and evaluation and how it maps onto train/loop.py,
train/data.py and the tokenizer. Does not know: the math.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


# The options a run records: their defaults, and where trainer_state.json's "config" keeps them. They parse to None
# when not given, so that --resume takes them from the run (and warns about each given one that differs).
TRAIN_OPTIONS: dict[str, tuple[Any, str]] = {
    "steps": (1000, "steps"), "batch_size": (8, "batch_size"), "grad_accum": (1, "grad_accum"), "lr": (3e-3, "lr"),
    "warmup": (50, "warmup"), "context": (64, "objective.context_length"), "canvases": (2, "canvases"),
    "ar_weight": (1.0, "objective.ar_weight"), "diffusion_weight": (1.0, "objective.diffusion_weight"),
    "sc_prob": (0.5, "objective.sc_prob"), "all_canvases": (False, "objective.all_canvases"),
    "t_power": (1.0, "objective.t_power"), "sc_temperature": (None, "objective.sc_temperature"),
    "unroll": (0.0, "objective.unroll_prob"), "unroll_bound": (1.0, "objective.unroll_bound"),
    "freeze_router": (False, "freeze_router"), "eval_every": (100, "eval_every"), "save_every": (100, "save_every"),
    "val_percent": (1.0, "val_percent"), "seed": (0, "seed")}


def _tokenizer_files(folder: Path) -> dict[str, bytes]:
    return {n: (folder / n).read_bytes() for n in TOKENIZER_FILES if (folder / n).is_file()}


def add_train(sub) -> None:
    p = sub.add_parser("train", help="train or fine-tune a DiffusionGemma-architecture model")
    p.add_argument("--data", nargs="+", required=True, help="text files/folders and/or .jsonl files")
    p.add_argument("--out", required=True, help="run folder (checkpoints go to OUT/checkpoint)")
    p.add_argument("--tokenizer", help="folder with tokenizer.json (default: --init-from's folder)")
    p.add_argument("--shape", default="small", help="model shape when training from scratch (see config.PRESETS)")
    p.add_argument("--init-from", help="checkpoint folder to fine-tune from")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint (with its "
                   "settings, unless given again)")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--grad-accum", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--warmup", type=int)
    p.add_argument("--context", type=int, help="tokens of clean context before the canvases")
    p.add_argument("--canvases", type=int, help="canvases per training sequence")
    p.add_argument("--canvas-length", type=int, help="canvas length (default: the shape's, or --init-from's)")
    p.add_argument("--ar-weight", type=float)
    p.add_argument("--diffusion-weight", type=float)
    p.add_argument("--sc-prob", type=float, help="self-conditioning probability")
    p.add_argument("--all-canvases", action=argparse.BooleanOptionalAction, default=None,
                   help="score every canvas in one block-causal denoiser pass (default: one random canvas)")
    p.add_argument("--t-power", type=float,
                   help="noise level t = u**P, u uniform: 1 = uniform (the spec), < 1 favours heavy noise")
    p.add_argument("--sc-temperature", type=float, nargs=2, metavar=("LO", "HI"),
                   help="divide the self-conditioning logits by the sampler's temperature at the example's noise "
                        "level, LO + (HI - LO) * t (use the shipped t_min t_max); default: raw logits (the spec)")
    p.add_argument("--unroll", type=float, metavar="P",
                   help="fraction of examples whose trained pass denoises one sampler step's canvas made from the "
                        "first pass (samples where the entropy bound accepts them, random ids elsewhere); default 0")
    p.add_argument("--unroll-bound", type=float, metavar="B",
                   help="the entropy bound of that step (use the shipped sampler's; default 1.0)")
    p.add_argument("--freeze-router", action=argparse.BooleanOptionalAction, default=None,
                   help="keep the routers' weights fixed (default: trained)")
    p.add_argument("--eval-every", type=int)
    p.add_argument("--save-every", type=int)
    p.add_argument("--val-percent", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=run_train)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _shown(value: Any) -> str:
    """An option's value as a warning shows it: on / off for the switches, else as it is."""
    return ("on" if value else "off") if isinstance(value, bool) else str(value)


def _finite(v: float) -> bool:
    return isinstance(v, int) or math.isfinite(v)


def _positive(args, *names: str) -> None:
    for n in names:
        v = getattr(args, n)
        if v is not None and not (v > 0 and _finite(v)):                                 # NaN fails `v > 0`
            raise ValueError(f"{_flag(n)} must be positive{'' if _finite(v) else ' and finite'} (got {v})")


def _between(args, name: str, lo: float, hi: float = math.inf) -> None:
    v = getattr(args, name)
    if not (lo <= v <= hi and _finite(v)):                                            # NaN fails too
        raise ValueError(f"{_flag(name)} must be " + (f"between {lo:g} and {hi:g}" if hi < math.inf else
                                                       f"a finite number >= {lo:g}") + f" (got {v})")


def _resolve_train_options(args: argparse.Namespace) -> None:
    """Fill in the options not given: with --resume the run's own (from its trainer_state.json; a given one that
    differs from the run's is used, with a warning), else the defaults."""
    stored: dict[str, Any] = {}
    state = Path(args.out) / "checkpoint" / "trainer_state.json"
    if args.resume and state.is_file():
        try:
            cfg = json.loads(state.read_text())["config"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"--resume: {state} is not a trainer state ({e})") from None
        for name, (_, key) in TRAIN_OPTIONS.items():
            v = cfg
            for part in key.split("."):
                v = v.get(part) if isinstance(v, dict) else None
            if v is not None:
                stored[name] = v
    for name, (default, _) in TRAIN_OPTIONS.items():
        given = getattr(args, name)
        if given is None:
            setattr(args, name, stored.get(name, default))
        elif name in stored and given != stored[name]:
            print(f"dgemma: warning: --resume: {_flag(name)} {_shown(given)} replaces the run's "
                  f"{_shown(stored[name])}", file=sys.stderr)


def _check_writable(out: Path) -> None:
    """Create --out and write a file there now, not at the first save --save-every steps later."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as e:
        raise ValueError(f"--out {str(out)!r} cannot be written ({e.strerror or e})") from None


def run_train(args: argparse.Namespace) -> int:
    from ..config import ModelConfig, preset
    from ..tokenizer import Tokenizer
    from .data import encode_documents, pack
    from .loop import TrainConfig, refuse_quantized, train
    from .objective import ObjectiveConfig

    from ..checkpoint import resolve_device

    _resolve_train_options(args)
    _positive(args, "steps", "batch_size", "grad_accum", "lr", "context", "canvases", "canvas_length", "save_every",
              "t_power", "unroll_bound")
    if args.sc_temperature is not None and not (0 < args.sc_temperature[0] <= args.sc_temperature[1] < math.inf):
        raise ValueError(f"--sc-temperature LO HI needs 0 < LO <= HI (got {args.sc_temperature})")
    for name, hi in (("unroll", 1), ("sc_prob", 1), ("val_percent", 100), ("ar_weight", math.inf),
                     ("diffusion_weight", math.inf), ("warmup", math.inf)):
        _between(args, name, 0, hi)
    if args.ar_weight == 0 and args.diffusion_weight == 0:
        raise ValueError("--ar-weight and --diffusion-weight are both 0: nothing to train")
    if args.eval_every < 0:
        raise ValueError("--eval-every must be >= 0 (0 = never)")
    if not 0 <= args.seed < 2**63:
        raise ValueError(f"--seed must be between 0 and 2**63 - 1 (got {args.seed})")
    resolve_device(args.device)                       # fail now, not after tokenizing
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} exists and is not a folder")
    if args.init_from and not Path(args.init_from).is_dir():
        raise ValueError(f"--init-from folder {args.init_from!r} does not exist")
    if args.resume and not (out / "checkpoint").is_dir():
        raise ValueError(f"--resume: no checkpoint in {str(out)!r}")
    src = Path(args.init_from) if args.init_from else (out / "checkpoint" if args.resume else None)
    tok_dir = Path(args.tokenizer) if args.tokenizer else src
    if tok_dir is None or not (tok_dir / "tokenizer.json").is_file():
        raise ValueError("a tokenizer is needed: pass --tokenizer FOLDER (make one with `dgemma tokenizer train`)")
    tok = Tokenizer.from_dir(tok_dir)
    _check_writable(out)
    if src is not None:
        mcfg = ModelConfig.from_dir(src)
        refuse_quantized(src, (mcfg.extra.get("quantization_config") or {}).get("weights"))   # before tokenizing
        if args.canvas_length:                        # the weights do not depend on it: fine-tune at another length
            mcfg = dataclasses.replace(mcfg, canvas_length=args.canvas_length)
    else:
        over = {"vocab_size": tok.vocab_size}
        if args.canvas_length:
            over["canvas_length"] = args.canvas_length
        for name in ("pad_token_id", "bos_token_id"):
            if getattr(tok, name) is not None:
                over[name] = getattr(tok, name)
        if tok.eos_token_id is not None:
            over["eos_token_id"] = [tok.eos_token_id]
        mcfg = preset(args.shape, **over)
    if tok.vocab_size > mcfg.vocab_size:
        raise ValueError(f"tokenizer has {tok.vocab_size} tokens but the model only {mcfg.vocab_size}")
    seq_len = args.context + args.canvases * mcfg.canvas_length
    print(f"reading and tokenizing {' '.join(args.data)} ...", flush=True)
    t0 = time.time()
    tr, va = encode_documents(args.data, tok, args.val_percent)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    train_data, val_data = pack(tr, seq_len, pad), pack(va, seq_len, pad)
    print(f"{len(train_data[0])} training / {len(val_data[0])} validation sequences of {seq_len} tokens "
          f"({time.time() - t0:.0f}s)", flush=True)
    cfg = TrainConfig(out=str(out), steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
                      lr=args.lr, warmup=args.warmup, eval_every=args.eval_every, save_every=args.save_every,
                      seed=args.seed, freeze_router=args.freeze_router, canvases=args.canvases,
                      val_percent=args.val_percent,
                      objective=ObjectiveConfig(context_length=args.context, ar_weight=args.ar_weight,
                                                diffusion_weight=args.diffusion_weight, sc_prob=args.sc_prob,
                                                all_canvases=args.all_canvases, t_power=args.t_power,
                                                sc_temperature=args.sc_temperature and tuple(args.sc_temperature),
                                                unroll_prob=args.unroll, unroll_bound=args.unroll_bound))
    ckpt = train(cfg, mcfg, train_data, val_data, init_from=args.init_from, resume=args.resume,
                 device=args.device, extra_files=_tokenizer_files(tok_dir))
    print(f"checkpoint: {ckpt}")
    return 0


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="held-out encoder perplexity, denoiser loss and tokens per forward; "
                                    "--quality: generated-text quality, diffusion vs AR")
    p.add_argument("--model", help="checkpoint folder (default: the shipped model)")
    p.add_argument("--data", nargs="+", help="text files/folders and/or .jsonl files (required without --quality)")
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--canvases", type=int, default=2)
    p.add_argument("--batches", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--prompts", type=int, default=8, help="held-out prompts for tokens-per-forward "
                                                          "(--quality: fixed prompts to continue)")
    p.add_argument("--max-new-tokens", type=int, help="default: two canvases")
    p.add_argument("--steps", type=int, nargs="+", help="max denoising steps (default: generation_config.json); "
                                                         "--quality: a list to sweep")
    p.add_argument("--val-percent", type=float, default=1.0, help="same split as training: only held-out data")
    p.add_argument("--all", action="store_true", help="use every document, not only the held-out split")
    p.add_argument("--json", help="also write the numbers to this file")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="compute dtype (default float32)")
    p.add_argument("--quantize", choices=("int8", "int4", "fp8"), help="evaluate with weights quantized this way")
    p.add_argument("--group-size", type=int, help="int4: inputs per scale (default 64)")
    q = p.add_argument_group("quality suite (--quality)")
    q.add_argument("--quality", action="store_true",
                   help="measure generated text and task answers, AR vs each diffusion setting (no --data needed)")
    q.add_argument("--sweep", action="store_true",
                   help=f"sweep the default grid: steps {' '.join(map(str, SWEEP_STEPS))} x "
                        f"entropy bound {' '.join(map(str, SWEEP_BOUNDS))}")
    q.add_argument("--bound", type=float, nargs="+", help="entropy bounds to sweep (default: generation_config.json)")
    q.add_argument("--t-min", type=float, help="diffusion t_min (default: generation_config.json)")
    q.add_argument("--t-max", type=float, help="diffusion t_max (default: generation_config.json)")
    q.add_argument("--tasks", type=int, default=8, help="seeded arithmetic / word problems (0 = none)")
    q.add_argument("--ar-temperature", type=float, default=1.0, help="AR reference sampling temperature (0 = greedy)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--scorer", metavar="FOLDER", help="score text with this causal LM instead of the model's own "
                   "encoder: a local transformers folder with its tokenizer (needs transformers), or another "
                   "DiffusionGemma checkpoint (its encoder: one fixed scorer for several models)")
    q.add_argument("--out", help="folder for quality.json and quality.png (created if missing)")
    p.set_defaults(func=run_eval)


SWEEP_STEPS = (8, 16, 32)
SWEEP_BOUNDS = (0.1, 0.5, 2.0)


def run_eval(args: argparse.Namespace) -> int:
    import math

    from .. import default_model_path
    from ..tokenizer import Tokenizer
    from .data import encode_documents, pack
    from .loop import evaluate, noise_profile
    from .objective import ObjectiveConfig

    if args.quality:
        return run_quality(args)
    if not args.data:
        raise ValueError("--data is required (or pass --quality for the generated-text quality suite)")
    for flag in ("sweep", "bound", "t_min", "t_max", "out", "scorer"):
        if getattr(args, flag) not in (None, False):
            raise ValueError(f"--{flag.replace('_', '-')} only goes with --quality")
    if args.steps is not None and len(args.steps) != 1:
        raise ValueError("--steps takes one value without --quality")
    args.steps = args.steps[0] if args.steps else None
    _positive(args, "context", "canvases", "batches", "batch_size", "prompts", "max_new_tokens", "steps")
    if not 0 < args.val_percent <= 100:
        raise ValueError(f"--val-percent must be in (0, 100] (got {args.val_percent:g})")
    _check_json_path(args.json)
    path = Path(args.model or default_model_path())
    model = _load(args, path)
    tok = Tokenizer.from_dir(path)
    CL = model.config.canvas_length
    tr, va = encode_documents(args.data, tok, 100.0 if args.all else args.val_percent)
    held = va if not args.all else tr + va
    if not held:
        raise ValueError("no documents in --data" if args.all else
                         "no held-out documents in --data (use --all to evaluate on every document)")
    ids, score = pack(held, args.context + args.canvases * CL, tok.pad_token_id or 0)
    ocfg = ObjectiveConfig(context_length=args.context)
    v = evaluate(model, ids, score, ocfg, args.batch_size, args.batches)
    # tokens per forward: continue held-out prompts (the first `context` tokens of held-out sequences)
    n = min(args.prompts, len(ids))
    out = model.generate(ids[:n, : args.context], max_new_tokens=args.max_new_tokens or 2 * CL,
                         **({"max_denoising_steps": args.steps} if args.steps else {}), seed=0)
    res = {"model": str(path), "sequences": int(len(ids)), "encoder_loss": v["ar"],
           "encoder_perplexity": math.exp(v["ar"]), "denoiser_loss": v["diffusion"],
           "tokens_per_forward": float(out.tokens_per_forward.mean()),
           "max_denoising_steps": args.steps or model.sampler_config.max_denoising_steps}
    for k, val in res.items():
        print(f"{k}: {val:.4f}" if isinstance(val, float) else f"{k}: {val}")
    # the denoiser against the encoder, by noise level (first canvas after the context)
    res["by_noise"] = noise_profile(model, ids, score, args.context, args.batch_size, args.batches)
    for k, val in res["by_noise"].items():
        print(f"cross-entropy {k}: {val:.4f}")
    if args.json:
        Path(args.json).write_text(_strict_json(res))
    return 0


def _strict_json(obj: Any) -> str:
    """JSON that strict parsers read: a number that is not finite (NaN, inf) is written as null."""
    def clean(o: Any) -> Any:
        if isinstance(o, float) and not math.isfinite(o):
            return None
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items()}
        return [clean(v) for v in o] if isinstance(o, (list, tuple)) else o
    return json.dumps(clean(obj), indent=2, allow_nan=False)


def _load(args: argparse.Namespace, path: Path):
    from .. import load
    from ..cli import check_weights_args
    check_weights_args(args)
    return load(path, device=args.device, dtype=args.dtype, quantize=args.quantize, group_size=args.group_size)


def _quality_settings(args: argparse.Namespace) -> list[dict]:
    """Diffusion settings of --quality: --sweep's grid, or the product of the --steps and --bound lists."""
    if args.sweep and (args.steps or args.bound):
        raise ValueError("--sweep is its own grid: leave out --steps/--bound, or drop --sweep")
    steps = list(SWEEP_STEPS) if args.sweep else (args.steps or [None])
    bounds = list(SWEEP_BOUNDS) if args.sweep else (args.bound or [None])
    for s in steps:
        if s is not None and s <= 0:
            raise ValueError(f"--steps must be positive (got {s})")
    for b in bounds:
        if b is not None and b < 0:
            raise ValueError(f"--bound must be >= 0 (got {b})")
    out = []
    for s in steps:
        for b in bounds:
            d = {"max_denoising_steps": s, "entropy_bound": b, "t_min": args.t_min, "t_max": args.t_max}
            out.append({k: v for k, v in d.items() if v is not None})
    return out


def _check_json_path(json_path: str | None) -> None:
    """--json names a file that can be written: its folder exists and it is not a folder (checked before work)."""
    if json_path and Path(json_path).is_dir():
        raise ValueError(f"--json {json_path!r} is a folder: name a file")
    if json_path and not Path(json_path).resolve().parent.is_dir():
        raise ValueError(f"--json: folder {str(Path(json_path).parent)!r} does not exist")


def run_quality(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .. import default_model_path
    from ..generate import resolve_settings
    from ..tokenizer import Tokenizer
    from .quality import format_table, plot_frontier, prompt_set, run_suite

    if args.data:
        raise ValueError("--quality uses its own fixed prompts and tasks: leave out --data")
    _positive(args, "prompts", "max_new_tokens")
    if args.tasks < 0:
        raise ValueError(f"--tasks must be >= 0 (got {args.tasks})")
    if args.ar_temperature < 0:
        raise ValueError(f"--ar-temperature must be >= 0 (got {args.ar_temperature})")
    out = Path(args.out) if args.out else None
    if out is not None and out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} exists and is not a folder")
    _check_json_path(args.json)
    settings = _quality_settings(args)
    text_scorer = None
    if args.scorer:
        from .quality import TextScorer
        text_scorer = TextScorer(args.scorer)
    path = Path(args.model or default_model_path())
    model = _load(args, path)
    tok = Tokenizer.from_dir(path)
    if args.prompts > len(prompt_set(tok)):
        raise ValueError(f"--prompts: this tokenizer has {len(prompt_set(tok))} fixed prompts (got {args.prompts})")
    for s in settings:                                 # bad settings fail now, not after the AR run
        resolve_settings(model, max_new_tokens=1, **s)
    new = args.max_new_tokens or 2 * model.config.canvas_length
    total = (1 + len(settings)) * (args.prompts + args.tasks)
    with tqdm(total=total, desc="quality", unit="gen", leave=False) as bar:
        def step(name: str) -> None:
            bar.set_postfix_str(name[:40], refresh=False)
            bar.update(1)
        res = run_suite(model, tok, settings, ar_temperature=args.ar_temperature, n_prompts=args.prompts,
                        n_tasks=args.tasks, max_new_tokens=new, seed=args.seed, progress=step,
                        text_scorer=text_scorer)
    res = {"model": str(path), **res}
    print(format_table(res))
    text = _strict_json(res)
    if args.json:
        Path(args.json).write_text(text)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "quality.json").write_text(text)
        print(f"wrote {out / 'quality.json'}")
        try:
            plot_frontier(res, str(out / "quality.png"))
            print(f"wrote {out / 'quality.png'}")
        except ImportError:
            print("quality.png skipped: matplotlib is not installed (pip install 'dgemma[plot]')")
    return 0


def add_tokenizer(sub) -> None:
    p = sub.add_parser("tokenizer", help="tokenizer tools")
    tsub = p.add_subparsers(dest="tokenizer_cmd", metavar="{train}", required=True)   # the error names the choices
    t = tsub.add_parser("train", help="train a byte-level BPE tokenizer.json on text files")
    t.add_argument("--data", nargs="+", required=True)
    t.add_argument("--vocab-size", type=int, default=4096)
    t.add_argument("--out", required=True)
    t.set_defaults(func=run_tokenizer_train)


def run_tokenizer_train(args: argparse.Namespace) -> int:
    from ..tokenizer import train_bpe
    from .data import TEXT_SUFFIXES

    _positive(args, "vocab_size")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {args.out!r} exists and is not a folder")
    if clash := [n for n in TOKENIZER_FILES if (out / n).exists()]:
        raise ValueError(f"--out {args.out!r} already holds {', '.join(clash)}: choose a new folder (nothing was "
                         "overwritten)")
    files = []
    for d in map(Path, args.data):
        if d.is_dir():
            files += sorted(f for f in d.rglob("*") if f.suffix in TEXT_SUFFIXES)
        elif d.is_file():
            files.append(d)
        else:
            raise ValueError(f"data path {str(d)!r} does not exist")
    tok = train_bpe(files, args.vocab_size, args.out)
    print(f"wrote {args.out}/tokenizer.json ({tok.vocab_size} tokens)")
    return 0
