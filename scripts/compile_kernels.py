"""Compile every Triton kernel for a GPU target on a machine without one (Triton's ahead-of-time path, down to
the cubin through the ptxas that Triton's wheel ships), with the arguments kernels.py passes at 26B-A4B widths.

Why: Triton's interpreter (how the tests run the kernels on the CPU) accepts code that the compiler refuses
(types that differ between branches, ops a backend lacks, shared memory beyond the chip's), so a kernel that
passes every CPU test can still fail at its first launch on a GPU. This compiles each launch that the
wrappers in kernels.py make (bf16 activations, the quantized layouts, both attention kinds, a decoding step and a
batch of canvases) for an sm_90 (H100 / H200) target, every tile configuration the MoE kernels autotune over
included (those its early_config_prune drops are marked "pruned"), and reports registers, stack (spilled
registers) and shared memory per kernel. Nothing runs: the
wrappers are called on "meta" tensors (shapes and dtypes only) and their launches are recorded instead of executed.

Usage:  PYTHONPATH=src python scripts/compile_kernels.py [--arch 90] [--quick] [--json OUT]
        (--quick: the first and last MoE tile configurations only; exit status 1 if any kernel fails)
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)     # compile for real (the interpreter compiles nothing)
os.environ.setdefault("DGEMMA_AUTOTUNE", "full")   # every tile configuration autotuning may try (quick's are in it)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")   # Triton's current default, stated (silences its warning)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from dgemma import kernels  # noqa: E402

TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int8: "i8", torch.uint8: "u8",
         torch.int32: "i32", torch.int64: "i64", torch.float8_e4m3fn: "fp8e4nv"}
OPTIONS = ("num_warps", "num_stages")


class Recorder:
    """Stands in for the kernels module: `name[grid](*args, **kw)` records the launch instead of running it."""

    def __init__(self, real) -> None:
        self.real, self.launches = real, []

    def __getattr__(self, name: str):
        kernel = getattr(self.real, name)

        class Launch:
            def __getitem__(_, grid):
                return lambda *args, **kw: self.launches.append((name, kernel, args, kw))
        return Launch()


def meta(*shape: int, dtype=torch.bfloat16) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def record_launches() -> list[tuple]:
    """Every launch kernels.py makes for the 26B-A4B shapes (E 128, k 8, H 2816, expert I 704, dense I 2112,
    sliding heads 16 x 256 with 8 KV heads, global heads 16 x 512 with 2, V 262144): a decoding step (1 token),
    a batch-1 denoiser step (256 tokens) and 32 canvases (8192)."""
    rec = Recorder(kernels._kernels())
    real = kernels._kernels
    kernels._kernels = lambda: rec
    try:
        E, k, H, I, Id, V = 128, 8, 2816, 704, 2112, 262144
        for T in (1, 256, 8192):
            x = meta(T, H)
            idx, w = meta(T, k, dtype=torch.int64), meta(T, k, dtype=torch.float32)
            order, offs = meta(T * k, dtype=torch.int64), meta(E, dtype=torch.int64)
            kernels.moe(x, meta(E, 2 * I, H), meta(E, H, I), idx, w, order, offs)
            if T == 256:          # batch 1: 32 rows per block, which scripts/gpu_profile.py times beside 16 and 64
                kernels.moe(x, meta(E, 2 * I, H), meta(E, H, I), idx, w, order, offs, block_m=32)
            kernels.mlp(x, meta(Id, H), meta(Id, H), meta(H, Id))
            for weights, q, s in (("int8", meta(E, 2 * I, H, dtype=torch.int8), meta(E, 2 * I, 1)),
                                  ("fp8", meta(E, 2 * I, H, dtype=torch.float8_e4m3fn), meta(E, 2 * I, 1)),
                                  ("int4", meta(E, 2 * I, H // 2, dtype=torch.uint8), meta(E, 2 * I, H // 64))):
                t = {"qdata": q, "scale": s, **({"zero": meta(*s.shape)} if weights == "int4" else {})}
                kernels.qmm(meta(T * k, H), t, weights, 64 if weights == "int4" else None, offs)
                dense = {n: v[0] for n, v in t.items()}
                kernels.qmm(x, dense, weights, 64 if weights == "int4" else None, None)
            r = meta(T, H)
            kernels.post_attention(r, r, *(meta(H) for _ in range(4)), H ** -0.5, 1e-6)
            kernels.post_ffn(r, r, r, meta(H), meta(H), meta(H), meta(1), 1e-6)
            kernels.post_ffn(r, r, r, meta(H), meta(H), meta(H), meta(1), 1e-6, meta(H))   # + the next layer's norm
            kernels.post_ffn(r, r, meta(T * k, H), meta(H), meta(H), meta(H), meta(1), 1e-6, meta(H), idx)  # + combine
            kernels.route(meta(T, E), k, meta(E))
            kernels.route(meta(T, E), k, meta(E), sort=True)   # (+ the sort: in one program, or place_kernel)
            if T * k <= kernels.ROUTE_ORDER_MAX:
                kernels.route_order(idx, E)
        kernels.route_order(meta(16, k, dtype=torch.int64), E)  # the most slots it sorts (an AR step, batch 16)
        kernels.route(meta(16, E), k, meta(E), sort=True)
        for T in (1, 16):                                 # a decoding step's q/k/v (packed), o, router projections
            for n, kk in ((16 * 256 + 2 * 8 * 256, H), (H, 16 * 256), (16 * 512 + 2 * 512, H), (H, 16 * 512), (E, H)):
                kernels.linear(meta(T, kk), meta(n, kk))
        for S in (1, 256):                                     # one token; a canvas
            for hq, hkv, D, v in ((16, 8, 256, True), (16, 2, 512, False)):
                q, kk = meta(1, S, hq, D), meta(1, S, hkv, D)
                cs = meta(S, D)
                kernels.norm_rope(q, kk, meta(1, S, hkv, D) if v else None, meta(D), meta(D), cs, cs, 1e-6)
                slots = (meta(1, hkv, 4096, D), meta(1, hkv, 4096, D), meta(1, dtype=torch.int64))
                kernels.norm_rope(q, kk, meta(1, S, hkv, D) if v else None, meta(D), meta(D), cs, cs, 1e-6, slots)
        for n in (256, 1024):                                   # sampler chunks (fused: 4x the torch rows)
            x, t = meta(n, V), meta(n, dtype=torch.float32)
            amax, _, _, _, bsum = kernels.sampler_rows(x, t, 30.0, 256, torch.bfloat16)
            kernels.sample_search(x, t, 30.0, amax, bsum, meta(n, dtype=torch.float32), 256)
    finally:
        kernels._kernels = real
    return rec.launches


def signature(fn, args: tuple, kw: dict) -> tuple[dict, dict, dict]:
    """(signature, constexprs, options) of one launch of JITFunction fn."""
    sig, const, opts = {}, {}, {k: v for k, v in kw.items() if k in OPTIONS}
    values = dict(zip(fn.arg_names, args)) | {k: v for k, v in kw.items() if k not in OPTIONS}
    for p in fn.params:
        v = values[p.name]
        if p.is_constexpr:
            sig[p.name], const[p.name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[p.name] = "*" + TYPES[v.dtype]
        elif isinstance(v, bool):
            sig[p.name] = "i1"
        elif isinstance(v, int):
            sig[p.name] = "i32" if -2 ** 31 <= v < 2 ** 31 else "i64"
        else:
            sig[p.name] = "fp32"
    return sig, const, opts


def usage(compiled) -> dict:
    """Registers and stack bytes per thread (spilled registers live on the stack) from cuobjdump's resource
    usage (Triton's wheel ships the tool), and the shared memory the launch asks for (Triton's metadata)."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    found = dict(re.findall(r"(REG|STACK):(\d+)", out))
    return {"registers": int(found.get("REG", -1)), "stack_bytes": int(found.get("STACK", 0)),
            "shared_bytes": int(compiled.metadata.shared)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability x 10 (90: H100 / H200)")
    ap.add_argument("--quick", action="store_true", help="the first and last MoE tile configurations only")
    ap.add_argument("--json", help="write the per-kernel results here")
    a = ap.parse_args()
    target = GPUTarget("cuda", a.arch, 32)
    jobs, seen = [], set()
    for name, kernel, args, kw in record_launches():
        configs, fn, kept = [None], kernel, [None]
        if isinstance(kernel, triton.runtime.autotuner.Autotuner):   # every tile it may choose on a GPU
            configs = kernel.configs[:: max(1, len(kernel.configs) - 1)] if a.quick else kernel.configs
            fn = kernel.fn
            prune = kernel.early_config_prune        # what autotuning would keep (the rest are compiled too)
            kept = prune(kernel.configs, dict(zip(fn.arg_names, args)), **kw) if prune else kernel.configs
        for cfg in configs:
            ckw = dict(kw) if cfg is None else {**kw, **cfg.kwargs, "num_warps": cfg.num_warps,
                                                "num_stages": cfg.num_stages}
            sig, const, opts = signature(fn, args, ckw)
            key = (name, json.dumps(sig, sort_keys=True), json.dumps(const, sort_keys=True, default=str),
                   json.dumps(opts, sort_keys=True))
            if key not in seen:
                seen.add(key)
                jobs.append((name, fn, sig, const, opts, cfg in kept))
    results, failed, t0 = [], 0, time.time()
    for name, fn, sig, const, opts, autotuned in jobs:
        row = {"kernel": name, "constexprs": {k: str(v) for k, v in const.items()}, **opts, "autotuned": autotuned}
        try:
            compiled = triton.compile(ASTSource(fn, sig, constexprs=const), target=target, options=opts)
            row.update(usage(compiled))
            row["ok"] = True
        except Exception as e:                          # report every failure, then exit 1
            row["ok"], row["error"] = False, f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}"
            failed += 1
        results.append(row)
        flags = ",".join([f"{k}={v}" for k, v in row["constexprs"].items() if k in ("DENSE", "BM", "BN", "BK",
                                                                                     "INT4", "SLOTS", "KTOP", "BV")]
                         + [f"w{opts.get('num_warps', 4)}s{opts.get('num_stages', 3)}"])
        print(f"{'ok  ' if row['ok'] else 'FAIL'} {name:22s} {flags:44s} {'' if autotuned else '(pruned) '}"
              + (f"regs {row['registers']:3d} stack {row['stack_bytes']:5d} B shared {row['shared_bytes']:6d} B"
                 if row["ok"] else row["error"]), flush=True)
    print(f"{len(jobs)} launches compiled for sm_{a.arch} with triton {triton.__version__} in "
          f"{time.time() - t0:.0f} s; {failed} failed")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"arch": a.arch, "triton": triton.__version__, "kernels": results}, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
