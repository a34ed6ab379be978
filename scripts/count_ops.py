"""Count the work launches of one denoiser pass, one denoising step (dynamic, and static as the GPU's CUDA graphs
run it) and one AR step, with and without the fused Triton kernels (DGEMMA_FUSED), on the CPU; and what an Engine
step launches besides its denoising step, at 1, 8 and 32 rows.

What is counted: every aten operation that does work (views and allocations excluded), plus one per Triton kernel
launch (Triton's interpreter runs them here; what happens inside a launch is not counted), and one per RMSNorm
(one F.rms_norm kernel on CUDA, a chain of ops on the CPU), plus three for each attention call given a bool mask
(torch turns it into an additive bias inside the call: about three small kernels on CUDA, by torch version; the
CPU dispatch shows the call as one op). On a GPU each counted operation is about one kernel
launch, so the counts estimate the kernels per step before and after fusing; they are not a GPU profile
(scripts/gpu_profile.py measures that) and they say nothing about time. The experts and MLPs run as on a GPU:
with DGEMMA_FUSED=moe / mlp their Triton kernels (here in fp32, which the GPU path does not take), without it
torch._grouped_mm (one launch per projection, as on a GPU; the CPU runs it too at these widths) and the
combine the GPU uses (model.gather_sum, not the CPU's one index_add_).

Usage:  TRITON_INTERPRET=1 PYTHONPATH=src python scripts/count_ops.py [--shape small] [--layers 6]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dgemma import kernels, sampling
from dgemma import model as model_module
from dgemma.config import preset
from dgemma.engine import Engine
from dgemma.generate import denoise_step
from dgemma.model import DiffusionGemma, Experts, GatedMLP

FREE = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "lift_fresh", "detach", "detach_",
        "alias"}


class Launches(TorchDispatchMode):
    """Counts the aten operations that do work while active and not paused."""

    def __init__(self) -> None:
        super().__init__()
        self.ops, self.paused = Counter(), 0

    @contextlib.contextmanager
    def pause(self):
        """Count nothing inside (work counted as one launch by the caller, or left out)."""
        self.paused += 1
        try:
            yield
        finally:
            self.paused -= 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self.paused and not func.is_view and name not in FREE:
            self.ops[name] += 1
            mask = (kwargs or {}).get("attn_mask", args[3] if len(args) > 3 else None)
            if name == "scaled_dot_product_attention" and mask is not None and mask.dtype == torch.bool:
                self.ops["sdpa bool mask -> bias"] += 3   # CUDA: 0 / -inf made from it (3 kernels, by torch version)
        return func(*args, **(kwargs or {}))


class Counted:
    """A Triton kernel whose launches count one each (the interpreter's own work inside is not counted)."""

    def __init__(self, kernel, mode: Launches) -> None:
        self.kernel, self.mode = kernel, mode

    def __getitem__(self, grid):
        def launch(*args, **kw):
            if not self.mode.paused:
                self.mode.ops["triton:" + self.kernel.fn.__name__] += 1
            with self.mode.pause():
                return self.kernel[grid](*args, **kw)
        return launch


def count(fn, mode: Launches) -> dict[str, int]:
    """The launches of fn() (a fresh count)."""
    mode.ops.clear()
    with mode:
        fn()
    return dict(mode.ops)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="small")
    ap.add_argument("--layers", type=int, default=6, help="layers (5 sliding + 1 full at 6)")
    ap.add_argument("--batch", type=int, default=1)
    a = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        raise SystemExit("run with TRITON_INTERPRET=1 (the fused kernels need Triton's interpreter on the CPU)")
    cfg = preset(a.shape, num_hidden_layers=a.layers, layer_types=[])
    model = DiffusionGemma(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.dim() >= 2 else p.fill_(1.0)
    mode = Launches()
    real = kernels._kernels()
    proxy = type("K", (), {n: Counted(getattr(real, n), mode) for n in dir(real) if n.endswith("_kernel")})
    kernels._kernels = lambda: proxy
    Experts._fused_ok = lambda self, x: not torch.is_grad_enabled() and kernels.fused("moe", x)   # fp32 here
    GatedMLP._fused_ok = lambda self, x: not torch.is_grad_enabled() and kernels.fused("mlp", x)
    combine = Experts.combine
    Experts.combine = staticmethod(lambda y, order, tok, idx, cuda: combine(y, order, tok, idx, True))
    with torch.no_grad():
        grouped = model.layers[0].experts._grouped_ok(torch.empty(1, cfg.hidden_size))
    if not grouped:
        raise SystemExit("this shape's expert widths do not suit torch._grouped_mm: the counts would not be a GPU's")
    rms_norm = model_module.rms_norm

    def rms_norm_once(*args):                            # one fused kernel on CUDA (F.rms_norm), ~8 ops here
        if not mode.paused:
            mode.ops["rms_norm"] += 1
        with mode.pause():
            return rms_norm(*args)
    model_module.rms_norm = rms_norm_once

    B, C, V = a.batch, cfg.canvas_length, cfg.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, V, (B, 40), generator=g)
    canvas = torch.randint(0, V, (B, C), generator=g)
    uniform, renoise = torch.rand(B * C, generator=g), torch.randint(0, V, (B, C), generator=g)
    temp = torch.tensor(0.5)
    out = {"shape": a.shape, "layers": a.layers, "batch": B, "canvas": C, "note": __doc__.split("\n\n")[1]}
    for fused in ("", "qkv", "rope", "norms", "rope,norms", "moe,mlp", "sampler", "all"):
        os.environ["DGEMMA_FUSED"] = fused
        with torch.inference_mode():
            cache = model.new_cache(B, 40 + 2 * C)
            model.encode(ids, cache)
            den = count(lambda: model.denoise(canvas, cache), mode)
            step = count(lambda: denoise_step(model, cache, canvas, None, temp, 1.0, sampling.rows_per_chunk(V),
                                              uniform=uniform, renoise=renoise), mode)
            graph = count(lambda: denoise_step(model, cache, canvas, None, temp, 1.0, sampling.rows_per_chunk(V),
                                               static=True, uniform=uniform, renoise=renoise), mode)
            ar = count(lambda: model.head(model.encode_step(ids[:, -1:], cache)[:, -1]), mode)
        out[fused or "eager"] = {"denoiser_pass": sum(den.values()), "per_layer": sum(den.values()) / a.layers,
                                 "denoising_step": sum(step.values()), "graph_step": sum(graph.values()),
                                 "ar_step": sum(ar.values()),
                                 "denoiser_pass_ops": den, "graph_step_ops": graph, "ar_step_ops": ar}
        print(f"{fused or 'eager':>11}: denoiser pass {sum(den.values()):4d} ({sum(den.values()) / a.layers:.1f} per "
              f"layer), denoising step {sum(step.values()):4d} (static, as a graph replays it: "
              f"{sum(graph.values()):4d}), AR step {sum(ar.values()):4d}")
    os.environ.pop("DGEMMA_FUSED")
    # the request-level Engine: what its step launches besides the denoising step (one graph replay on a GPU),
    # issued after the previous step's host sync while the device waits
    out["engine_step_outside_graph"] = {}
    for rows in (1, 8, 32):
        eng = Engine(model, max_batch=rows, sampler="fast", cuda_graphs=True)
        for i in range(rows):
            eng.submit(ids[0].tolist(), seed=i, max_new_tokens=C, stability_threshold=1, confidence_threshold=0.005)
        eng.step()                                       # prompts encoded, first step

        def replayed(*inputs, step=eng._fast_step):
            mode.ops["graph replay"] += 1
            with mode.pause():
                return step(*inputs)
        eng._fast_step = replayed
        with torch.inference_mode():
            ops = count(eng.step, mode)
        n = sum(ops.values())
        out["engine_step_outside_graph"][rows] = {"launches": n, "ops": ops}
        print(f"engine step at {rows:2d} rows: {n} launches besides the denoising step (counted as 1)")
    path = os.path.join(os.environ.get("OUT", "bench_out"), "count_ops.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
    print("wrote", path)


if __name__ == "__main__":
    main()
