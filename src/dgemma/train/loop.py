"""The training loop: AdamW, warm-up + cosine, clipping, accumulation, validation, checkpoints, DDP.

Knows: optimisation, checkpoint/resume (an HF-format folder that `dgemma.load` reads, plus
`optimizer.safetensors` and `trainer_state.json`, written atomically), multi-process training under
`torchrun` (gradients averaged with all_reduce; gloo on CPU, nccl on GPU).
Does not know: the loss (objective.py) or file formats (data.py).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..checkpoint import load, save
from ..config import ModelConfig, SamplerConfig
from ..model import DiffusionGemma
from .objective import ObjectiveConfig, _denoiser_pass, _encoder_pass, losses

CKPT = "checkpoint"
CKPT_NAME = re.compile(r"ckpt-\d{8}")    # the folders _save writes (and deletes once superseded)


class TrainError(ValueError):
    """A training setup we refuse (one message)."""


@dataclass
class TrainConfig:
    out: str
    steps: int = 1000
    batch_size: int = 8                 # sequences per optimiser step per process (before accumulation)
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 50
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 8
    save_every: int = 100
    seed: int = 0
    freeze_router: bool = False
    canvases: int = 2                   # canvases per sequence and the validation share: how `dgemma train` packed
    val_percent: float = 1.0            # and split its data (kept for --resume; train() reads neither)
    objective: ObjectiveConfig = field(default_factory=lambda: ObjectiveConfig(context_length=64))


def init_weights(model: DiffusionGemma, seed: int, std: float = 0.02) -> DiffusionGemma:
    """Fresh weights: normal(0, std) matrices, ones for norms, router scales and layer scalars."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * std)
            else:
                p.fill_(1.0)
        for b in model.buffers():
            b.fill_(1.0)
    return model


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def _dist(dev: torch.device) -> tuple[int, int]:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _check_finite(model, step: int) -> None:
    """Refuse to save weights that are not finite (run on every rank, so all of them stop together)."""
    if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
        raise TrainError(f"step {step}: the weights are no longer finite (training diverged: lower --lr); not saved")


def _save(model, opt, step: int, cfg: TrainConfig, history: list, extra_files: dict[str, bytes]) -> None:
    state = {}
    groups = []
    params = [p for p in model.parameters()]
    for i, p in enumerate(params):
        for k, v in opt.state.get(p, {}).items():
            state[f"{i}.{k}"] = v.detach().cpu().reshape(-1) if v.dim() == 0 else v.detach().cpu()
    for g in opt.param_groups:
        groups.append({k: v for k, v in g.items() if k != "params"})
    trainer = {"step": step, "config": asdict(cfg), "param_groups": groups, "history": history}
    files = dict(extra_files)
    files["optimizer.safetensors"] = st_save(state)
    files["trainer_state.json"] = json.dumps(trainer, indent=1).encode()
    # Each save is a complete new folder; the `checkpoint` symlink is then switched to it atomically, so a
    # kill at any moment leaves `checkpoint` pointing at a complete checkpoint.
    out = Path(cfg.out)
    name = f"ckpt-{step:08d}"
    save(model, out / name, extra_files=files)
    tmp_link = out / f".{CKPT}.tmp"
    if tmp_link.is_symlink() or tmp_link.exists():
        tmp_link.unlink()
    tmp_link.symlink_to(name)
    os.replace(tmp_link, out / CKPT)
    for old in out.glob("ckpt-*"):          # only the trainer's own folders: never a user's `ckpt-notes`
        if old.name != name and CKPT_NAME.fullmatch(old.name) and old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _hold_ctrl_c():
    """Hold Ctrl-C until the block ends (an optimiser step is applied whole or not at all), then raise it."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:      # Ctrl-C ignored or handled
        yield
        return
    hit: list[int] = []
    old = signal.signal(signal.SIGINT, lambda *_: hit.append(1))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
    if hit:
        raise KeyboardInterrupt


def _restore(model, opt, path: Path) -> tuple[int, list]:
    trainer = json.loads((path / "trainer_state.json").read_text())
    state = st_load((path / "optimizer.safetensors").read_bytes())
    params = [p for p in model.parameters()]
    for key, v in state.items():
        i, name = key.split(".", 1)
        p = params[int(i)]
        opt.state[p][name] = v.reshape(()) if name == "step" else v.to(p.device)
    return trainer["step"], trainer["history"]


def evaluate(model, ids: torch.Tensor, score: torch.Tensor, ocfg: ObjectiveConfig, batch: int,
             n_batches: int, seed: int = 1234) -> dict[str, float]:
    """Mean AR and denoiser losses over the first n_batches validation batches (fixed noise seed; uniform noise
    level, raw self-conditioning logits and no unrolled step whatever the training recipe, so that runs stay
    comparable)."""
    ocfg = replace(ocfg, t_power=1.0, sc_temperature=None, unroll_prob=0.0)
    g = torch.Generator(device=ids.device).manual_seed(seed)
    tot = {"ar": 0.0, "diffusion": 0.0}
    n = 0
    was = model.training
    model.eval()
    with torch.no_grad():
        for s in range(0, min(len(ids), batch * n_batches), batch):
            out = losses(model, ids[s:s + batch], score[s:s + batch], ocfg, g)
            tot["ar"] += out["ar"].item()
            tot["diffusion"] += out["diffusion"].item()
            n += 1
    model.train(was)
    return {k: v / max(n, 1) for k, v in tot.items()}


NOISE_LEVELS = (1.0, 0.8, 0.5, 0.2)


@torch.no_grad()
def noise_profile(model, ids: torch.Tensor, score: torch.Tensor, context: int, batch: int, n_batches: int,
                  levels: tuple[float, ...] = NOISE_LEVELS, seed: int = 1234) -> dict[str, float]:
    """Where the denoiser stands against the encoder: the first canvas after `context` clean tokens, corrupted at
    fixed levels t (no self-conditioning, as at a canvas's first step). -> {"encoder_next": the encoder's CE on the
    canvas's first token, f"t={t}/first": the denoiser's CE on that token when it is corrupted, f"t={t}/corrupted",
    f"t={t}/clean": its CE on all corrupted / clean scored canvas tokens}. At t = 1 the denoiser sees what the
    encoder sees for the first token, so the gap between "encoder_next" and "t=1/first" is the context the
    denoiser fails to use. A bucket with no token to score is left out (t=1/clean and t=0/first always).
    Sequences must hold at least `context` + canvas_length tokens."""
    C, V = model.config.canvas_length, model.config.vocab_size
    g = torch.Generator(device=ids.device).manual_seed(seed)
    sums: dict[str, list[float]] = {}

    def add(key: str, ce: torch.Tensor) -> None:
        acc = sums.setdefault(key, [0.0, 0])
        acc[0], acc[1] = acc[0] + float(ce.sum()), acc[1] + ce.numel()

    was = model.training
    model.eval()
    for s in range(0, min(len(ids), batch * n_batches), batch):
        x, sc = ids[s:s + batch, :context + C], score[s:s + batch, :context + C]
        h, kv = _encoder_pass(model, x)
        x0, scored = x[:, context:], sc[:, context:]                                   # [b, C]
        ce_enc = F.cross_entropy(model.head(h[:, context - 1]), x0[:, 0], reduction="none")
        add("encoder_next", ce_enc[scored[:, 0]])
        start = torch.full((len(x),), context, device=x.device)
        for t in levels:
            flip = torch.rand(x0.shape, device=x.device, generator=g) < t
            noisy = torch.where(flip, torch.randint(0, V, x0.shape, device=x.device, generator=g), x0)
            logits = _denoiser_pass(model, noisy, start, kv, None)                     # [b, C, V]
            ce = F.cross_entropy(logits.flatten(0, 1), x0.flatten(), reduction="none").view(x0.shape)
            add(f"t={t:g}/first", ce[:, 0][flip[:, 0] & scored[:, 0]])
            add(f"t={t:g}/corrupted", ce[flip & scored])
            add(f"t={t:g}/clean", ce[~flip & scored])
    model.train(was)
    return {k: v / n for k, (v, n) in sums.items() if n}      # no empty buckets (t = 1 corrupts every token)


def refuse_quantized(path: str | os.PathLike, weights: str | None) -> None:
    """A TrainError for a checkpoint whose weights are quantized (`weights`: int8, int4, fp8; None: fine)."""
    if weights:
        raise TrainError(f"{path} holds quantized weights ({weights}), which cannot be trained: fine-tune its "
                         "unquantized checkpoint (and quantize the result)")


def train(cfg: TrainConfig, model_cfg: ModelConfig | None, train_data: tuple[torch.Tensor, torch.Tensor],
          val_data: tuple[torch.Tensor, torch.Tensor], *, init_from: str | None = None, resume: bool = False,
          device: str = "cpu", extra_files: dict[str, bytes] | None = None, progress: bool = True) -> Path:
    """Train and checkpoint into cfg.out/checkpoint; returns that folder. See `dgemma train --help`."""
    dev = torch.device(device)
    if dev.type == "cuda" and "LOCAL_RANK" in os.environ:   # torchrun: one GPU per process
        dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(dev)
    rank, world = _dist(dev)
    ids, score = train_data
    if len(ids) == 0:
        raise TrainError("no training sequences (is the data shorter than one sequence?)")
    ocfg = cfg.objective
    if not (score[:, ocfg.context_length:] if ocfg.diffusion_weight else score).any():
        raise TrainError(f"no training sequence has a scored token after its {ocfg.context_length}-token context, so "
                         f"there is nothing to train on: is the data shorter than one sequence ({ids.shape[1]} "
                         "tokens)? Add data, or lower --context / --canvases")
    out = Path(cfg.out)
    ckpt = out / CKPT
    if (ckpt.exists() or ckpt.is_symlink()) and not resume:
        raise TrainError(f"{ckpt} already exists: pass --resume to continue that run, or choose another --out")
    if resume and not ckpt.exists():
        raise TrainError(f"--resume: no checkpoint in {out}")
    if resume:
        model = load(ckpt, device=dev, dtype=torch.float32)
        if model_cfg is not None and model_cfg.canvas_length != model.config.canvas_length:
            raise TrainError(f"--resume: the run in {out} trains canvases of {model.config.canvas_length} tokens, "
                             f"not {model_cfg.canvas_length}")
    elif init_from:
        model = load(init_from, device=dev, dtype=torch.float32)
        refuse_quantized(init_from, model.quantization and model.quantization.weights)
        if model_cfg is not None:                   # a fine-tune may change the canvas length (no weight depends on it)
            model.config.canvas_length = model_cfg.canvas_length
    else:
        if model_cfg is None:
            raise TrainError("a model config or --init-from is needed")
        model_cfg.dtype = "float32"
        model = init_weights(DiffusionGemma(model_cfg, SamplerConfig(eos_token_id=list(model_cfg.eos_token_id),
                                                                     pad_token_id=model_cfg.pad_token_id)),
                             cfg.seed).to(dev)
    model.train().requires_grad_(True)
    for layer in model.layers:
        layer.router.requires_grad_(not cfg.freeze_router)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=cfg.betas)
    step, history = 0, []
    if resume:
        step, history = _restore(model, opt, ckpt)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast(
        "cpu", enabled=False)
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm
        bar = tqdm(total=cfg.steps, initial=step, desc="train", dynamic_ncols=True)
    t0, toks = time.time(), 0
    saved = step
    try:
        while step < cfg.steps:
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg)
            seed = ((cfg.seed * 1_000_003 + step) * 64 + rank) % 2**64   # batches and noise: only (seed, step)
            gen = torch.Generator(device=dev).manual_seed(seed)
            pick = torch.Generator().manual_seed(seed)
            opt.zero_grad(set_to_none=True)
            logs = {"loss": 0.0, "ar": 0.0, "diffusion": 0.0}
            for _ in range(cfg.grad_accum):
                rows = torch.randint(0, len(ids), (cfg.batch_size,), generator=pick)
                with autocast:
                    out_ = losses(model, ids[rows].to(dev), score[rows].to(dev), ocfg, gen)
                (out_["loss"] / cfg.grad_accum).backward()
                for k in logs:
                    logs[k] += out_[k].item() / cfg.grad_accum
                toks += int(cfg.batch_size * ids.shape[1])
            if world > 1:
                for p in params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    dist.all_reduce(p.grad)
                    p.grad /= world
            norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.clip))     # the same on every rank
            if not (math.isfinite(logs["loss"]) and math.isfinite(norm)):
                raise TrainError(f"step {step + 1}: the loss is {logs['loss']:g} (gradient norm {norm:g}): training "
                                 "diverged (lower --lr); stopped, " +
                                 (f"the checkpoint of step {saved} is kept" if saved else "nothing saved"))
            with _hold_ctrl_c():                       # Ctrl-C: after the whole update, counted and recorded
                opt.step()
                step += 1
                rec = {"step": step, **{k: round(v, 4) for k, v in logs.items()}, "lr": opt.param_groups[0]["lr"]}
                history.append(rec)
            if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps) and len(val_data[0]):
                v = evaluate(model, val_data[0].to(dev), val_data[1].to(dev), ocfg, cfg.batch_size, cfg.eval_batches)
                rec.update({"val_ar": round(v["ar"], 4), "val_diffusion": round(v["diffusion"], 4)})
            if bar is not None:
                bar.set_postfix(loss=f"{logs['loss']:.3f}", ar=f"{logs['ar']:.3f}", diff=f"{logs['diffusion']:.3f}",
                                tok_s=f"{toks * world / max(time.time() - t0, 1e-9):.0f}")
                bar.update(1)
            if step % cfg.save_every == 0 or step == cfg.steps:
                _check_finite(model, step)
                with _hold_ctrl_c():                   # Ctrl-C: after the save (not a second save of the same step)
                    if rank == 0:
                        _save(model, opt, step, cfg, history, extra_files or {})
                    saved = step
            if world > 1:
                dist.barrier()
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        if rank == 0 and step > saved:
            _check_finite(model, step)
            _save(model, opt, step, cfg, history, extra_files or {})
            saved = step
        if rank == 0:
            print(f"interrupted at step {step}; " + (f"saved {ckpt} (resume with --resume)" if saved else
                                                     "nothing saved yet"), file=sys.stderr, flush=True)
        raise
    finally:
        if bar is not None:             # end the bar's line, so that an error is not printed on it
            bar.close()
    return ckpt

