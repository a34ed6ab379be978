"""The `dgemma` command line: `dgemma generate`, `dgemma info` (and, later, commands from other modules).

Knows: argument parsing, turning user mistakes into one `dgemma: error: ...` line (exit 2), streaming text
as canvases are committed, and a config/memory summary read from config.json and safetensors headers.
Does not know: the model math. torch and the model are imported inside the commands (but note that
`dgemma/__init__.py` itself imports torch, which costs ~1 s on every invocation, `--help` included).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
ST_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64", "I64": "int64"}
SAMPLER_BUFFERS = 6  # fp32 [rows, V] buffers alive at once in the sampler


class UsageError(Exception):
    """A user mistake: reported as one line on stderr, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, like every other user error (no usage dump)
        self.exit(2, f"dgemma: error: {message} (see '{self.prog} --help')\n")


def seed(text: str) -> int:
    """A --seed value: an integer torch's generators take (-2^63 .. 2^64 - 1)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not -2**63 <= n < 2**64:
        raise argparse.ArgumentTypeError(f"must lie in -2^63 .. 2^64 - 1, got {text}")
    return n


def _argument(convert: Callable[[str], Any], ok: Callable[[Any], bool], what: str) -> Callable[[str], Any]:
    """An argparse `type`: convert(text) if that works and passes `ok`, else "expected <what>, got '<text>'"."""
    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return parse


_positive = _argument(int, lambda n: n >= 1, "a positive integer")
_non_negative = _argument(int, lambda n: n >= 0, "an integer >= 0")
_fraction = _argument(float, lambda x: 0 <= x <= 1, "a number in [0, 1]")       # (NaN fails the test)
_penalty = _argument(float, lambda x: -2 <= x <= 2, "a number in [-2, 2]")


def _model_dir(given: str | None) -> Path:
    """--model (a folder or a Hugging Face Hub id `owner/name`) -> a local folder; None: the shipped model."""
    from dgemma import default_model_path
    from dgemma.checkpoint import CheckpointError, resolve_model
    if given is None:
        path = Path(default_model_path())
        if not path.is_dir():
            raise UsageError(f"the shipped model is missing ({path}); pass --model PATH")
        return path
    try:
        return resolve_model(given)
    except CheckpointError as e:
        raise UsageError(str(e)) from None


def _device(name: str | None):
    """None (auto) or a torch.device that exists on this machine."""
    from .checkpoint import resolve_device
    return None if name is None else resolve_device(name)


def add_weights_args(p: argparse.ArgumentParser) -> None:
    """--dtype, --quantize, --group-size: how the model's weights are held (generate, serve, chat, eval)."""
    p.add_argument("--dtype", choices=["auto", *sorted(DTYPE_BYTES)], default="auto",
                   help="compute dtype; auto (default): bf16 on GPUs and on CPUs with native bf16 (AMX, AVX512-BF16) "
                        "for quantized or large models, else float32")
    p.add_argument("--quantize", choices=("int8", "int4", "fp8"),
                   help="quantize the weights while loading (a `dgemma quantize` folder needs no flag)")
    p.add_argument("--group-size", type=_positive, metavar="G", help="int4: inputs per scale (default 64)")


def check_weights_args(args: argparse.Namespace) -> None:
    from dgemma.quant import QuantConfig
    if args.group_size is not None and args.quantize != "int4":
        raise UsageError("--group-size needs --quantize int4")
    if args.quantize:
        QuantConfig.make(args.quantize, args.group_size)


def load_model(path, args: argparse.Namespace, device=None):
    """dgemma.load with the weights flags of `add_weights_args`."""
    import dgemma
    check_weights_args(args)
    return dgemma.load(path, device=device, dtype=args.dtype, quantize=args.quantize, group_size=args.group_size)


# ---- generate --------------------------------------------------------------------------------------------
def add_generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", metavar="PROMPT", help="text to continue (or the user message with --chat)")
    p.add_argument("--model", metavar="PATH",
                   help="checkpoint folder or Hugging Face Hub id (default: the model shipped with dgemma)")
    p.add_argument("--chat", action="store_true", help="wrap PROMPT as one user turn with the chat template")
    p.add_argument("--max-new-tokens", type=_positive, metavar="N", help="print at most N new tokens")
    p.add_argument("--steps", type=_positive, metavar="N", help="max denoising steps per canvas")
    p.add_argument("--seed", type=seed, metavar="N", help="random seed (same seed, same device: same text)")
    p.add_argument("--top-k", type=_non_negative, metavar="K",
                   help="sample each position from its K likeliest tokens (0: all, the default)")
    p.add_argument("--top-p", type=_fraction, metavar="P",
                   help="sample each position from its likeliest tokens holding probability P (nucleus)")
    p.add_argument("--presence-penalty", type=_penalty, metavar="X",
                   help="penalise tokens already committed, -2 to 2 (less repetition; 0: off, the default)")
    p.add_argument("--frequency-penalty", type=_penalty, metavar="X",
                   help="penalise tokens by how often they were committed, -2 to 2")
    p.add_argument("--device", metavar="DEV", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    add_weights_args(p)
    p.add_argument("--sampler", choices=("auto", "exact", "fast"), default="auto",
                   help="exact: the reference's random stream (seeded runs match it); fast: same distribution, "
                        "one random number per position, CUDA graphs on a GPU; auto (default): exact on the "
                        "CPU in float32, fast elsewhere")
    p.add_argument("-v", "--verbose", action="store_true", help="print speed statistics to stderr")


class Stream:
    """`on_canvas` callback: prints row 0 of each committed canvas as soon as it is ready.

    Stops at the first EOS (or after `limit` tokens), skips pad, prints only text not printed before.
    """

    def __init__(self, tok, eos: set[int], pad: int | None, limit: int | None, out=None) -> None:
        self.tok, self.eos, self.pad, self.limit, self.out = tok, eos, pad, limit, out or sys.stdout
        self.ids: list[int] = []
        self.n, self.text, self.done, self.first_at = 0, "", False, None

    def __call__(self, canvas) -> None:
        if self.first_at is None:
            self.first_at = time.perf_counter()
        if self.done:
            return
        for t in canvas[0].tolist():
            if t in self.eos or (self.limit is not None and self.n >= self.limit):
                self.done = True
                break
            self.n += 1
            if t != self.pad:
                self.ids.append(t)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if not self.done:
            text = text.rstrip("\ufffd")  # a character split across canvases: wait for its other bytes
        new, self.text = text[len(os.path.commonprefix([text, self.text])):], text
        if new:
            self.out.write(new)
            self.out.flush()


def cmd_generate(args: argparse.Namespace) -> int:
    path = _model_dir(args.model)
    if not args.prompt.strip():
        raise UsageError("empty prompt")
    device = _device(args.device)
    import torch
    from dgemma.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(path)
    if args.chat:
        ids = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                      tokenize=True)
    else:
        ids = tok.encode_prompt(args.prompt)
    t0 = time.perf_counter()
    model = load_model(path, args, device)
    t1 = time.perf_counter()
    sc = model.sampler_config
    eos = set(sc.eos_token_id or []) | ({tok.eos_token_id} - {None})
    stream = Stream(tok, eos, sc.pad_token_id, args.max_new_tokens)
    given = {"max_new_tokens": args.max_new_tokens, "max_denoising_steps": args.steps, "top_k": args.top_k,
             "top_p": args.top_p, "presence_penalty": args.presence_penalty,
             "frequency_penalty": args.frequency_penalty}
    out = model.generate(torch.tensor([ids]), seed=args.seed, on_canvas=stream, sampler=args.sampler,
                         **{k: v for k, v in given.items() if v is not None})
    t2 = time.perf_counter()
    sys.stdout.write("\n")
    sys.stdout.flush()
    if args.verbose:
        n_new, passes = len(stream.ids), int(out.decoder_passes[0])   # the tokens shown (--max-new-tokens cuts)
        first = (stream.first_at or t2) - t1
        print(f"dgemma: loaded {path} in {t1 - t0:.2f} s ({model.device}, {str(model.dtype).replace('torch.', '')})\n"
              f"dgemma: {len(ids)} prompt tokens, {n_new} new tokens in {t2 - t1:.2f} s: "
              f"{n_new / max(t2 - t1, 1e-9):.1f} tokens/s, {n_new / max(passes, 1):.2f} tokens per forward, "
              f"{passes} decoder passes, time to first canvas {first:.2f} s", file=sys.stderr)
    return 0


# ---- info ------------------------------------------------------------------------------------------------
def add_info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="PATH",
                   help="checkpoint folder or Hugging Face Hub id (default: the model shipped with dgemma)")
    p.add_argument("--dtype", choices=sorted(DTYPE_BYTES),
                   help="dtype for the memory estimate (default: the checkpoint's)")
    p.add_argument("--context", type=_positive, default=4096, metavar="N", help="prompt + new tokens (default 4096)")
    p.add_argument("--batch", type=_positive, default=1, metavar="B", help="sequences generated at once (default 1)")
    p.add_argument("--quantize", choices=("int8", "int4", "fp8"),
                   help="estimate the weights quantized this way (default: as stored)")
    p.add_argument("--group-size", type=_positive, metavar="G", help="int4: inputs per scale (default 64)")


def _count(n: float) -> str:
    for unit, d in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= d:
            return f"{n / d:.2f}{unit}"
    return str(int(n))


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def cmd_info(args: argparse.Namespace) -> int:
    from dgemma.checkpoint import _NORM, _weight_files, read_header
    from dgemma.config import ModelConfig
    path = _model_dir(args.model)
    cfg = ModelConfig.from_dir(path)
    files = sorted(set(_weight_files(path).values()))     # the model's files, as the loader reads them
    headers = [read_header(f) for f in files]
    by_dtype: dict[str, int] = {}
    for header in headers:
        for t in header.values():
            key = ST_DTYPES.get(t["dtype"], t["dtype"])
            by_dtype[key] = by_dtype.get(key, 0) + t["data_offsets"][1] - t["data_offsets"][0]
    ckpt_dtypes = sorted(by_dtype, key=by_dtype.get, reverse=True)
    norm = next((h[_NORM]["dtype"] for h in headers if _NORM in h), None)   # the compute dtype as stored
    dtype = args.dtype or (ST_DTYPES.get(norm) if ST_DTYPES.get(norm) in DTYPE_BYTES else "float32")
    nb, CL, W, V = DTYPE_BYTES[dtype], cfg.canvas_length, cfg.sliding_window, cfg.vocab_size
    L = cfg.num_hidden_layers
    n_sliding = sum(cfg.is_sliding(i) for i in range(L))
    params = cfg.num_parameters()
    # what KVCache allocates: K and V per layer; sliding layers a ring of W-1 positions, full layers the whole
    # context, every layer plus one canvas of scratch slots
    slots = [((W - 1) if cfg.is_sliding(i) else args.context) + CL for i in range(L)]
    kv = args.batch * nb * sum(2 * cfg.layer_kv_heads(i) * cfg.layer_head_dim(i) * slots[i] for i in range(L))
    from dgemma.quant import QuantConfig, model_bytes
    check_weights_args(args)
    q = QuantConfig.make(args.quantize, args.group_size) if args.quantize else \
        QuantConfig.from_hf(cfg.extra.get("quantization_config"))
    qbytes, rest = model_bytes(cfg, q, nb)
    weights = qbytes + rest
    scheme = (f"{q.weights}" + (f" (groups of {q.group_size})" if q.group_size else "") + ", embedding int8, "
              f"the rest {dtype}") if q else dtype
    from dgemma.sampling import rows_per_chunk
    sampler = min(rows_per_chunk(V), args.batch * CL) * V * 4 * SAMPLER_BUFFERS
    g, s = cfg.global_head_dim, cfg.head_dim
    print(f"model        {path}\n"
          f"layers       {L} ({n_sliding} sliding, {L - n_sliding} full attention)\n"
          f"hidden size  {cfg.hidden_size} (dense MLP {cfg.intermediate_size})\n"
          f"heads        {cfg.num_attention_heads} query; sliding {cfg.num_key_value_heads} kv x {s} dim, "
          f"full {cfg.num_global_key_value_heads} kv x {g} dim\n"
          f"experts      {cfg.num_experts}, top-{cfg.top_k_experts} per token "
          f"(expert MLP {cfg.moe_intermediate_size})\n"
          f"window       {W} (sliding attention), canvas {CL} tokens\n"
          f"vocab        {V}\n"
          f"parameters   {params['total']:,} total ({_count(params['total'])}), "
          f"{params['active']:,} active per token ({_count(params['active'])})\n"
          f"checkpoint   {' + '.join(ckpt_dtypes) or '?'}, {_size(sum(f.stat().st_size for f in files))} on disk "
          f"in {len(files)} file(s)\n"
          f"memory       ~{_size(weights + kv + sampler)} for inference in {dtype}, context {args.context}, "
          f"batch {args.batch}\n"
          f"  weights    {_size(weights)} ({scheme})\n"
          f"  kv cache   {_size(kv)}\n"
          f"  sampler    {_size(sampler)} (fp32 [rows, vocab] logits/sampler buffers; prompt-pass activations extra)")
    return 0


# ---- quantize --------------------------------------------------------------------------------------------
def add_quantize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", metavar="IN_FOLDER", help="checkpoint folder (or Hub id) with unquantized weights")
    p.add_argument("output", metavar="OUT_FOLDER", help="new folder to write (must not exist, or be empty)")
    p.add_argument("--weights", choices=("int8", "int4", "fp8"), required=True,
                   help="int8 / fp8: one scale per output row; int4: a scale and a zero per group of inputs")
    p.add_argument("--group-size", type=_positive, metavar="G", help="int4: inputs per scale (default 64)")


def cmd_quantize(args: argparse.Namespace) -> int:
    from dgemma.checkpoint import quantize_folder
    from dgemma.config import ModelConfig
    from dgemma.quant import QuantConfig
    if args.group_size is not None and args.weights != "int4":
        raise UsageError("--group-size needs --weights int4")
    out = quantize_folder(args.input, args.output, args.weights, args.group_size, progress=sys.stderr.isatty())
    cfg = ModelConfig.from_dir(out)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    q = QuantConfig.from_hf(cfg.extra["quantization_config"])
    print(f"wrote {out}: {q.weights}" + (f" (groups of {q.group_size})" if q.group_size else "")
          + f", {_size(size)} of tensors; load it with dgemma.load({str(out)!r}) or --model {out}")
    return 0


# ---- the command table -----------------------------------------------------------------------------------
# name -> (help, add_arguments(parser), run(args) -> exit code). Keep torch imports inside run() so
# `dgemma --help` stays fast.
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "generate": ("generate text with a DiffusionGemma checkpoint", add_generate_args, cmd_generate),
    "info": ("show a checkpoint's configuration, size and inference memory", add_info_args, cmd_info),
    "quantize": ("write an int8 / int4 / fp8 weight-quantized copy of a checkpoint folder", add_quantize_args,
                 cmd_quantize),
}
# Commands that live in other modules: "module:function", where function(subparsers) adds its own subparser(s)
# (nested ones too, e.g. `dgemma tokenizer train`) and sets `func` or `run` = callable(args) -> exit code.
# Example: "dgemma.train.cli:add_train". Imported only when the parser is built.
PLUGINS: list[str] = ["dgemma.train.cli:add_train", "dgemma.train.cli:add_eval", "dgemma.train.cli:add_tokenizer",
                      "dgemma.bench.cli:add_bench", "dgemma.serve.cli:add_serve", "dgemma.chat:add_chat"]


def build_parser() -> argparse.ArgumentParser:
    import importlib
    from dgemma import __version__
    parser = _Parser(prog="dgemma", description="DiffusionGemma (block-diffusion LM) in pure PyTorch.")
    parser.add_argument("--version", action="version", version=f"dgemma {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_, add_args, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_[:1].upper() + help_[1:] + ".")
        add_args(p)
        p.set_defaults(run=run)
    for spec in PLUGINS:
        module, _, func = spec.partition(":")
        getattr(importlib.import_module(module), func)(sub)
    return parser


def _is_user_error(e: BaseException) -> bool:
    # ConfigError, CheckpointError, TokenizerError, DataError and TrainError are ValueErrors; OSError covers
    # paths the user named (a file where a folder is expected, no permission, disk full)
    return isinstance(e, (UsageError, ValueError, OSError))


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors: return the code instead of exiting
        return e.code if isinstance(e.code, int) else 0
    try:
        if os.environ.get("DGEMMA_FUSED") or os.environ.get("DGEMMA_AUTOTUNE"):   # bad values: said now, not
            from dgemma import kernels                                              # at the first fused pass
            kernels.fused_names(kernels.fused_choice())
            kernels.autotune_choice()
        return (getattr(args, "run", None) or args.func)(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `dgemma generate ... | head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as e:
        oom = isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and any(
            m in str(e) for m in ("out of memory", "can't allocate memory")))      # CUDA's, the CPU allocator's
        if os.environ.get("DGEMMA_DEBUG") or not (_is_user_error(e) or oom):
            raise
        msg = f"{e.strerror}: {e.filename}" if isinstance(e, OSError) and e.filename else str(e)
        msg = " ".join(msg.split()) or type(e).__name__
        print(f"dgemma: error: {'out of memory: ' if oom else ''}{msg}", file=sys.stderr)
        return 1 if oom else 2


if __name__ == "__main__":   # `python -m dgemma.cli`: run the imported module's main, so that its error classes
    from dgemma.cli import main as _main   # are the ones plugins raise (this file would otherwise load twice)
    sys.exit(_main())
