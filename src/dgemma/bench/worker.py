"""One measurement in a fresh process (so peak memory belongs to one system): prints one JSON line.

    python -m dgemma.bench.worker '{"system": "dgemma"|"reference"|"ar", "path": ..., ...}'
"""
from __future__ import annotations

import json
import resource
import sys
import time

import torch


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _peak(dev: torch.device) -> float:
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # KiB -> GiB


def _start(dev: torch.device) -> float:
    """Wait for queued work, reset the peak-memory counter (so peaks belong to the timed call), start the clock."""
    _sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    return time.perf_counter()


def _settings(a: dict, canvas: int) -> dict:
    """generate / Engine settings of a run: fixed step count unless --adaptive, no EOS."""
    kw = dict(max_new_tokens=a["canvases"] * canvas, max_denoising_steps=a["steps"], eos_token_id=None)
    if not a["adaptive"]:
        kw["stability_threshold"] = None                     # fixed step count: no early stop
    return kw


def _copy_tb_s(dev: torch.device) -> float:
    """Device-to-device copy bandwidth (bytes read + written), the ceiling a weight-reading step can reach."""
    x = torch.empty(2**30, dtype=torch.uint8, device=dev)          # 1 GiB
    y = torch.empty_like(x)
    y.copy_(x)
    _sync(dev)
    t = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    _sync(dev)
    return 2 * 10 * x.numel() / (time.perf_counter() - t) / 1e12


def _prompt(vocab: int, batch: int, length: int) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(0))


def build(a: dict):
    """The checkpoint at a["path"], or random weights of a named shape built directly on the device."""
    import dgemma
    if a.get("path"):
        return dgemma.load(a["path"], device=a["device"], dtype=a["dtype"], quantize=a.get("quantize"),
                           group_size=a.get("group_size"))
    from dgemma.checkpoint import _parse_dtype, resolve_device
    from dgemma.config import preset
    from dgemma.quant import QuantConfig, prepare, quantize
    dev = resolve_device(a["device"])
    cfg = preset(a["shape"], **a.get("overrides", {}))
    dtype = _parse_dtype(a["dtype"] if a["dtype"] != "auto" else None) or torch.bfloat16
    with torch.device("meta"):
        m = dgemma.DiffusionGemma(cfg).to(dtype)                 # cast on meta: one allocation
    q = QuantConfig.make(a["quantize"], a.get("group_size")) if a.get("quantize") else None
    qws = prepare(m, q, dtype) if q else {}
    m = m.to_empty(device=dev)
    inside = {id(t) for qw in qws.values() for t in qw.buffers()}
    torch.manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.02) if p.dim() >= 2 else p.fill_(1.0)
        for b in m.buffers():
            if id(b) not in inside:
                b.fill_(1.0)
        for qw in qws.values():    # one random weight at a time, quantized: the full-precision model never exists
            qw.set(quantize(torch.empty(qw.shape, dtype=dtype, device=dev).normal_(0, 0.02), qw.weights, qw.group), dev)
    m.quantization = q
    return m.eval().requires_grad_(False)


def run_dgemma(a: dict) -> dict:
    from dgemma import sampling
    m = build(a)
    dev, C, V = m.device, m.config.canvas_length, m.config.vocab_size
    ids = _prompt(V, a["batch"], a["prompt_len"]).to(dev)
    kw = _settings(a, C)
    sampler = a.get("sampler", "exact")
    # warm-up with the same shapes (so CUDA graphs are captured before the clock starts), two steps a canvas
    m.generate(ids, **{**kw, "max_denoising_steps": 2}, seed=1, sampler=sampler)
    stamps = []
    t0 = _start(dev)
    out = m.generate(ids, **kw, seed=0, sampler=sampler,
                     on_canvas=lambda c: (_sync(dev), stamps.append(time.perf_counter())))
    total = time.perf_counter() - t0
    peak = _peak(dev)                                        # of generate itself (CUDA: reset just before)
    passes = int(out.decoder_passes.max())
    # the sampler's share of a step: the forward (denoiser + head, chunk by chunk as generate does) vs the
    # sampler on one chunk of logits, times the number of chunks
    cache = m.new_cache(a["batch"], a["prompt_len"] + C)
    rows, rc = a["batch"] * C, sampling.rows_per_chunk(V)
    with torch.inference_mode():
        m.encode(ids, cache)
        canvas = torch.randint(0, V, (a["batch"], C), device=dev)
        reps = 3
        _sync(dev)
        t1 = time.perf_counter()
        for _ in range(reps):
            h = m.denoise(canvas, cache).reshape(rows, -1)
            for r in range(0, rows, rc):
                logits = m.head(h[r:r + rc])
        _sync(dev)
        t_fwd = (time.perf_counter() - t1) / reps
        logits = m.head(h[:rc])
        noise = torch.empty_like(logits)
        temp = sampling.temperature(1, 2, 0.4, 0.8)
        copies = [logits.clone() for _ in range(reps)]      # sample_rows works in place
        _sync(dev)
        t2 = time.perf_counter()
        for x in copies:
            q = noise.exponential_(1) if sampler == "exact" else None
            u = None if q is not None else torch.rand(x.shape[0], device=dev)
            r = sampling.sample_rows(x, temp, q, m.embed_tokens, m.embed_scale(), u)
            sampling.entropy_bound_accept(r.entropy[None], 0.1)
        _sync(dev)
        t_samp = (time.perf_counter() - t2) / reps * -(-rows // rc)
        del copies, logits, noise
    new = a["batch"] * out.sequences[:, ids.shape[1]:].shape[1]
    extra = {}
    if dev.type == "cuda":   # a canvas routes to (nearly) every expert: a step reads all the weights once
        weight_bytes = sum(t.numel() * t.element_size() for t in (*m.parameters(), *m.buffers()))   # codes too
        step_s = total / passes                          # whole generate (encoder, sampler) per decoder pass
        copy = _copy_tb_s(dev)
        extra = {"gpu": torch.cuda.get_device_name(dev), "weights_gb": weight_bytes / 1e9,
                 "weight_read_ms": 1000 * weight_bytes / (copy * 1e12), "copy_tb_s": copy,
                 "bandwidth_fraction": weight_bytes / step_s / (copy * 1e12),
                 "graphs_captured": m._runtime.graphs.captures if m._runtime.graphs else 0,
                 "peak_over_weights": peak * 2**30 / weight_bytes}
    return {**extra, "tokens_per_s": new / total, "total_s": total, "decoder_passes": passes,
            "step_ms": 1000 * total / passes, "first_canvas_s": stamps[0] - t0,
            "tokens_per_forward": float(out.tokens_per_forward.mean()), "peak_gib": peak,
            "forward_ms": 1000 * t_fwd, "sampler_ms": 1000 * t_samp,
            "sampler_fraction": t_samp / (t_samp + t_fwd)}


def run_engine(a: dict) -> dict:
    """The request-level Engine (what a server runs): `batch` requests submitted at once, each with its own
    seed, the default sampler, the same settings as the dgemma system."""
    from dgemma.engine import Engine
    m = build(a)
    dev, C = m.device, m.config.canvas_length
    prompts = _prompt(m.config.vocab_size, a["batch"], a["prompt_len"]).tolist()
    kw = _settings(a, C)
    eng = Engine(m, max_batch=a["batch"])

    def run_all(steps: int) -> dict:
        ids = [eng.submit(p, seed=i, **{**kw, "max_denoising_steps": steps}) for i, p in enumerate(prompts)]
        res = eng.run()
        return {i: res[i] for i in ids}

    run_all(2)                                               # warm-up (captures the step's graph on CUDA)
    t0 = _start(dev)
    res = run_all(a["steps"])
    _sync(dev)
    total = time.perf_counter() - t0
    new = sum(len(r.tokens) for r in res.values())
    passes = max(r.decoder_passes for r in res.values())
    return {"tokens_per_s": new / total, "total_s": total, "decoder_passes": passes,
            "step_ms": 1000 * total / passes, "tokens_per_forward": new / a["batch"] / passes,
            "peak_gib": _peak(dev), "sampler": eng.sampler}


def run_ar(a: dict) -> dict:
    m = build(a)
    dev = m.device
    ids = _prompt(m.config.vocab_size, a["batch"], a["prompt_len"]).to(dev)
    n = a["ar_tokens"]
    m.generate_ar(ids, max_new_tokens=n, eos_token_id=None)      # warm-up, same shapes (captures the graph)
    first: list[float] = []

    def on_token(tok: torch.Tensor) -> None:   # the first token (from the prompt's pass) is out: the clock of the
        if not first:                          # one-token steps starts (one sync, before any step is queued)
            _sync(dev)
            first.append(time.perf_counter())
    t0 = _start(dev)
    m.generate_ar(ids, max_new_tokens=n, eos_token_id=None, on_token=on_token)
    _sync(dev)
    end = time.perf_counter()
    total = end - t0
    return {"tokens_per_s": a["batch"] * n / total, "total_s": total, "step_ms": 1000 * total / n,
            "decode_step_ms": 1000 * (end - first[0]) / (n - 1) if n > 1 else None,
            "tokens_per_forward": 1.0, "peak_gib": _peak(dev)}


def run_reference(a: dict) -> dict:
    """The reference's generate with dgemma's dtype (bench's orchestrator names it) and sampler settings
    (the checkpoint's generation_config.json, or the defaults for a shape), so the two do the same work."""
    from transformers import DiffusionGemmaForBlockDiffusion
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig
    from transformers.utils import logging

    from dgemma.checkpoint import _parse_dtype
    from dgemma.config import SamplerConfig
    logging.set_verbosity_error()
    dtype = _parse_dtype(a["dtype"])
    s = SamplerConfig.from_dir(a["path"]) if a.get("path") else SamplerConfig()
    dev = torch.device(a["device"])
    if a.get("path"):
        m = DiffusionGemmaForBlockDiffusion.from_pretrained(a["path"], dtype=dtype).to(dev).eval()
    else:        # random weights of a named shape, initialised by the reference itself on the device
        m = reference_from_shape(a["shape"], dtype, dev)
    C, V = m.config.canvas_length, m.config.text_config.vocab_size
    ids = _prompt(V, a["batch"], a["prompt_len"]).to(dev)
    kw = dict(max_new_tokens=a["canvases"] * C, max_denoising_steps=a["steps"], eos_token_id=None,
              sampler_config=EntropyBoundSamplerConfig(entropy_bound=s.entropy_bound), t_min=s.t_min,
              t_max=s.t_max, confidence_threshold=s.confidence_threshold,
              stability_threshold=s.stability_threshold if a["adaptive"] else None, pad_token_id=0)
    stamps = []

    class Streamer:
        def put(self, value):
            _sync(dev)
            stamps.append(time.perf_counter())

        def end(self):
            pass

    with torch.inference_mode():
        m.generate(ids, **{**kw, "max_new_tokens": C, "max_denoising_steps": 2})          # warm-up
        torch.manual_seed(0)                                   # the same random stream as dgemma's seed=0
        t0 = _start(dev)
        out = m.generate(ids, **kw, streamer=Streamer())
        total = time.perf_counter() - t0
    new = a["batch"] * out.sequences[:, ids.shape[1]:].shape[1]
    passes = round(new / a["batch"] / float(out.tokens_per_forward.mean()))
    return {"tokens_per_s": new / total, "total_s": total, "decoder_passes": passes,
            "step_ms": 1000 * total / passes, "first_canvas_s": stamps[1] - t0,
            "tokens_per_forward": float(out.tokens_per_forward.mean()), "peak_gib": _peak(dev)}


def reference_from_shape(shape: str, dtype: torch.dtype, dev: torch.device):
    """The reference model with the text shape of our preset `shape`, built directly on `dev`."""
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    from dgemma.config import PRESETS
    text = dict(PRESETS[shape])
    canvas = text.pop("canvas_length")
    vision = dict(model_type="gemma4_vision", hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=32, head_dim=16)
    cfg = DiffusionGemmaConfig(text_config={**text, "use_bidirectional_attention": "vision"},
                               vision_config=vision, canvas_length=canvas, eos_token_id=[1])
    with torch.device(dev):
        return DiffusionGemmaForBlockDiffusion._from_config(cfg, dtype=dtype).eval()


if __name__ == "__main__":
    args = json.loads(sys.argv[1])
    torch.set_num_threads(args.get("threads") or torch.get_num_threads())
    if args["system"] == "dgemma-fast":
        args.update(system="dgemma", sampler="fast")
    fn = {"dgemma": run_dgemma, "reference": run_reference, "ar": run_ar, "engine": run_engine}[args["system"]]
    try:
        result = fn(args)
    except Exception as e:                   # the orchestrator prints this line; the traceback goes to stderr
        print(json.dumps({"error": f"{type(e).__name__}: {' '.join(str(e).split())}"}))
        raise
    if args.get("quantize"):                 # which quantized matmul paths ran (quant.py), and how often
        from dgemma.quant import PATHS
        result["quant_paths"] = dict(PATHS)
    print(json.dumps(result))
