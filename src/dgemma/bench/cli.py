"""`dgemma bench`: dgemma vs the reference (transformers, when installed) vs AR decoding, same weights.

Each system runs in its own process (peak memory is per system); results go to OUT/bench.json and
OUT/bench.png. Knows: orchestration and reporting. The measurements themselves are in worker.py.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def add_bench(sub) -> None:
    p = sub.add_parser("bench", help="time dgemma against the reference and against AR decoding")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--model", help="checkpoint folder (default: the shipped model unless --shape)")
    g.add_argument("--shape", help="random weights of a named shape: tiny, small, 100m, 26b-a4b")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--canvases", type=int, default=1)
    p.add_argument("--steps", type=int, default=16, help="denoising steps per canvas")
    p.add_argument("--adaptive", action="store_true", help="allow the stable-and-confident early stop")
    p.add_argument("--ar-tokens", type=int, default=64, help="tokens to decode in AR mode")
    p.add_argument("--systems", default="dgemma,dgemma-fast,reference,ar",
                   help="comma-separated subset: dgemma (exact sampler), dgemma-fast, reference, ar, "
                        "engine (the request-level Engine, default sampler)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", help="every system computes in it; auto (default): what dgemma.load "
                   "picks for the model and device, and for --shape bfloat16 (float32 when the reference runs on "
                   "the CPU)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--malloc", choices=("tuned", "default"), default="tuned",
                   help="glibc malloc settings of every system's process: tuned (default; what dgemma.load sets on "
                        "the CPU: freed memory stays in the heap) or glibc's defaults")
    p.add_argument("--quantize", choices=("int8", "int4", "fp8"),
                   help="dgemma systems (and AR) run with weights quantized this way; the reference stays unquantized")
    p.add_argument("--group-size", type=int, default=None, help="int4: inputs per scale (default 64)")
    p.add_argument("--out", default="bench_out")
    p.set_defaults(func=run_bench)


# glibc's malloc settings for every system's process (see checkpoint.tune_malloc): the same for all of them
MALLOC_ENV = {"tuned": {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1)},
              "default": {"DGEMMA_TUNE_MALLOC": "0"}}


def _run(system: str, args: dict, malloc: str = "tuned") -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | MALLOC_ENV[malloc]
    r = subprocess.run([sys.executable, "-m", "dgemma.bench.worker", json.dumps({**args, "system": system})],
                       capture_output=True, text=True, env=env)
    last = (r.stdout.strip().splitlines() or [""])[-1]
    if r.returncode != 0:     # the worker prints {"error": ...} for an exception; else (killed...) stderr's end
        return json.loads(last) if last.startswith('{"error"') else \
            {"error": " | ".join(r.stderr.strip().splitlines()[-3:]) or f"exit code {r.returncode}"}
    return json.loads(last)


def run_bench(a: argparse.Namespace) -> int:
    from tqdm import tqdm

    for name in ("batch", "prompt_len", "canvases", "steps", "ar_tokens"):
        if getattr(a, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be positive")
    systems = [s for s in a.systems.split(",") if s]
    unknown = set(systems) - {"dgemma", "dgemma-fast", "reference", "ar", "engine"}
    if unknown or not systems:
        raise ValueError(f"--systems: unknown {', '.join(sorted(unknown)) or 'empty list'} "
                         "(choose from dgemma, dgemma-fast, reference, ar, engine)")
    if a.threads is not None and a.threads < 1:
        raise ValueError("--threads must be positive")
    from ..checkpoint import _parse_dtype, auto_dtype, resolve_device, stored_dtype
    from ..config import PRESETS, ModelConfig, preset
    device = resolve_device(a.device)
    dtype = None if a.dtype == "auto" else _parse_dtype(a.dtype)
    from ..cli import check_weights_args
    check_weights_args(a)
    if a.shape:
        if a.shape not in PRESETS:
            raise ValueError(f"--shape: unknown {a.shape!r} (choose from {', '.join(PRESETS)})")
        cfg = preset(a.shape)
    else:
        from ..cli import _model_dir
        path = _model_dir(a.model)
        cfg = ModelConfig.from_dir(path)
    for what, new in (("--canvases", a.canvases * cfg.canvas_length), ("--ar-tokens", a.ar_tokens)):
        if (what == "--canvases" or "ar" in systems) and a.prompt_len + new > cfg.max_position_embeddings:
            raise ValueError(f"--prompt-len {a.prompt_len} + {new} new tokens ({what}) exceed the model's context "
                             f"of {cfg.max_position_embeddings}")
    if "reference" in systems:
        why = "transformers is not installed" if importlib.util.find_spec("transformers") is None else \
            "this transformers has no DiffusionGemma (it needs 5.23 or later)" \
            if importlib.util.find_spec("transformers.models.diffusion_gemma") is None else \
            "transformers cannot read a dgemma-quantized folder" if cfg.extra.get("quantization_config") else None
        if why:
            print(f"{why}: skipping the reference", file=sys.stderr)
            systems.remove("reference")
    if not systems:
        raise ValueError("--systems: nothing left to run")
    if a.quantize:
        dtype = dtype or _parse_dtype("bfloat16")   # quantized systems and the reference compute in the same dtype
    if dtype is None:           # one dtype for every system: what a user's load picks; for a shape bf16 (fp32 with
        dtype = auto_dtype(device, stored_dtype(path), cfg, bool(cfg.extra.get("quantization_config"))) \
            if not a.shape else _parse_dtype("float32" if "reference" in systems and device.type == "cpu"
                                             else "bfloat16")       # the reference on the CPU)
    a.dtype = str(dtype).removeprefix("torch.")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    common = {"device": a.device, "dtype": a.dtype, "batch": a.batch, "prompt_len": a.prompt_len,
              "canvases": a.canvases, "steps": a.steps, "adaptive": a.adaptive, "ar_tokens": a.ar_tokens,
              "threads": a.threads, "path": None, "shape": a.shape, "quantize": a.quantize,
              "group_size": a.group_size, "malloc": a.malloc}
    tmp = None
    # on the CPU both systems read the same random weights from a folder; on a GPU (where the 26B shape would
    # be a 50 GB folder) the reference builds its own random weights of the shape on the device
    if a.shape and "reference" in systems and device.type == "cpu":
        import torch

        from .. import save
        from .worker import build
        tmp = tempfile.TemporaryDirectory(prefix="dgemma-bench-")
        m = build({**common, "device": "cpu", "dtype": a.dtype, "quantize": None})   # saved unquantized
        save(m, Path(tmp.name) / a.shape)
        common.update(path=str(Path(tmp.name) / a.shape), dtype=a.dtype)
        del m, torch
    elif not a.shape:
        common["path"] = str(path)
    results = {}
    for s in tqdm(systems, desc="bench", unit="system"):
        results[s] = _run(s, common, a.malloc)
        # written after each system: a run cut short (a timeout, a crash) keeps what it measured
        report = _report(common, a, results)
        (out / "bench.json").write_text(json.dumps(report, indent=2))
    if tmp is not None:
        tmp.cleanup()
    for s, r in results.items():
        if "error" in r:
            print(f"{s:12s} error: {r['error']}")
            continue
        extra = f"  sampler {100 * r['sampler_fraction']:.0f}% of a step" if "sampler_fraction" in r else ""
        if r.get("bandwidth_fraction"):
            extra += f"  {100 * r['bandwidth_fraction']:.0f}% of the memory-bandwidth limit"
        if r.get("decode_step_ms") is not None:
            extra += f"  one-token step {r['decode_step_ms']:.2f} ms"
        print(f"{s:12s} {r['tokens_per_s']:9.1f} tok/s  step {r['step_ms']:8.1f} ms  "
              f"tpf {r['tokens_per_forward']:.2f}  peak {r['peak_gib']:.2f} GiB{extra}")
    for k in ("speedup_vs_reference", "fast_speedup_vs_reference", "memory_ratio_vs_reference",
              "fast_memory_ratio_vs_reference", "speedup_vs_ar", "fast_speedup_vs_ar"):
        if k in report:
            print(f"{k}: {report[k]:.2f}x")
    _plot(results, out / "bench.png")
    print(f"wrote {out / 'bench.json'}")
    return 1 if any("error" in r for r in results.values()) else 0


def _report(common: dict, a: argparse.Namespace, results: dict) -> dict:
    """bench.json's content for the systems run so far: setup, per-system results, ratios between them."""
    report = {"setup": {k: v for k, v in common.items() if k != "path"} | {"model": a.model or a.shape or
              "default"}, "results": results}
    ref, ours = results.get("reference", {}), results.get("dgemma", {})
    fast = results.get("dgemma-fast", {})
    if "tokens_per_s" in ref and "tokens_per_s" in ours:
        report["speedup_vs_reference"] = ours["tokens_per_s"] / ref["tokens_per_s"]
        report["memory_ratio_vs_reference"] = ours["peak_gib"] / ref["peak_gib"]
    if "tokens_per_s" in ref and "tokens_per_s" in fast:
        report["fast_speedup_vs_reference"] = fast["tokens_per_s"] / ref["tokens_per_s"]
    if "tokens_per_s" in ref and "peak_gib" in fast:
        report["fast_memory_ratio_vs_reference"] = fast["peak_gib"] / ref["peak_gib"]
    if "tokens_per_s" in results.get("ar", {}) and "tokens_per_s" in ours:
        report["speedup_vs_ar"] = ours["tokens_per_s"] / results["ar"]["tokens_per_s"]
    if "tokens_per_s" in results.get("ar", {}) and "tokens_per_s" in fast:
        report["fast_speedup_vs_ar"] = fast["tokens_per_s"] / results["ar"]["tokens_per_s"]
    return report


def _plot(results: dict, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    ok = {k: v for k, v in results.items() if "tokens_per_s" in v}
    if not ok:
        return
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    ax[0].bar(list(ok), [v["tokens_per_s"] for v in ok.values()], color="tab:blue")
    ax[0].set_ylabel("tokens / s")
    ax[1].bar(list(ok), [v["peak_gib"] for v in ok.values()], color="tab:orange")
    ax[1].set_ylabel("peak memory (GiB)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
