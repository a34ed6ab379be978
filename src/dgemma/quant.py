"""Weight-only quantization: int8 and fp8 (e4m3) with one scale per output row, int4 with a scale and a zero
per group of G inputs; the embedding (tied head) is always int8.

Knows: how a weight is quantized and stored (the layout below), which layers are quantized, and which matmul
runs a quantized weight on this device and batch size:
  * CPU, bf16 activations: torch's packed kernels (`_weight_int8pack_mm` for few rows, where it beats a dense
    matmul; `_weight_int4pack_mm_for_cpu` always for int4); for many rows int8/fp8 codes are converted and run
    through the dense bf16 (AMX) matmul, the row scale applied to the output;
  * CUDA: one Triton kernel (`kernels.qmm`) that dequantizes in registers, grouped over experts;
  * anything else: `fallback` — dequantize a slice of rows at a time (never the whole weight, let alone the
    model) and matmul. Each path taken is counted in `PATHS`, and a fallback on a GPU warns once.
Does not know: files (checkpoint.py reads and writes the tensors), the forward math beyond "x @ W^T".

Layout (safetensors names: the weight's own name for the codes, `<name>_scale`, `<name>_zero`):
  int8  codes I8 [.., N, K], q in [-127, 127]; scale F32 [.., N]; w = q * scale
  fp8   codes F8_E4M3 [.., N, K];             scale F32 [.., N]; w = q * scale
  int4  codes U8 [.., N, K/2], two per byte, even k in the low nibble, q in [0, 15];
        scale and zero BF16 [.., N, K/G];     w = (q - 8) * scale + zero
`config.json` records the scheme as `quantization_config` = {"quant_method": "dgemma", "weights": ...,
"group_size": G or null, "embedding": "int8", "format_version": 1}.
"""
from __future__ import annotations

import math
import warnings
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .config import ConfigError

SCHEMES = ("int8", "int4", "fp8")
INT4_GROUPS = (32, 64, 128, 256)        # the group sizes torch's int4 CPU kernel takes
DEFAULT_GROUP = 64
FEW_ROWS = 16                           # CPU: up to this many rows the packed int8 kernel beats a dense matmul
CHUNK = 1 << 24                         # fallback: dequantize at most this many weights at a time
PATHS: Counter = Counter()              # matmul path -> calls (read by tests and `dgemma bench`)
_warned: set = set()


@dataclass(frozen=True)
class QuantConfig:
    """A quantization scheme: `weights` for every linear layer and expert, int8 for the embedding."""
    weights: str
    group_size: int | None = None       # int4 only

    @classmethod
    def make(cls, weights: str, group_size: int | None = None) -> "QuantConfig":
        if weights not in SCHEMES:
            raise ConfigError(f"unknown quantization {weights!r} (choose from {', '.join(SCHEMES)})")
        if weights != "int4":
            if group_size is not None:
                raise ConfigError(f"a group size applies to int4 only ({weights} has one scale per output row)")
            return cls(weights)
        g = DEFAULT_GROUP if group_size is None else group_size
        if g not in INT4_GROUPS:
            raise ConfigError(f"int4 group size must be one of {', '.join(map(str, INT4_GROUPS))} (got {g})")
        return cls(weights, g)

    def to_hf(self) -> dict:
        return {"quant_method": "dgemma", "weights": self.weights, "group_size": self.group_size,
                "embedding": "int8", "format_version": 1}

    @classmethod
    def from_hf(cls, d: dict | None) -> "QuantConfig | None":
        if not d:
            return None
        if d.get("quant_method") != "dgemma" or d.get("format_version") != 1:
            raise ConfigError(f"quantization_config {d.get('quant_method')!r} is not one dgemma reads "
                              "(quantize the bf16 checkpoint with `dgemma quantize` instead)")
        return cls.make(d.get("weights"), d.get("group_size"))


# ---- quantize / dequantize (pure tensor functions, row-chunked so a big weight never exists in fp32) ---------
def quantize(w: torch.Tensor, weights: str, group: int | None = None) -> dict[str, torch.Tensor]:
    """w [.., N, K] (any float dtype) -> {"qdata", "scale"[, "zero"]} in the stored layout (CPU tensors)."""
    lead, (N, K) = w.shape[:-2], w.shape[-2:]
    if weights == "int4" and K % group:
        raise ConfigError(f"int4 group size {group} does not divide the input width {K}")
    flat = w.reshape(-1, K)
    parts: dict[str, list[torch.Tensor]] = {}
    step = max(1, CHUNK // (4 * K))
    for r in range(0, flat.shape[0], step):
        for k, v in _quantize_rows(flat[r:r + step].float(), weights, group).items():
            parts.setdefault(k, []).append(v)
    return {k: torch.cat(v).reshape(*lead, N, -1) if v[0].dim() == 2 else torch.cat(v).reshape(*lead, N)
            for k, v in parts.items()}


def _quantize_rows(w: torch.Tensor, weights: str, group: int | None) -> dict[str, torch.Tensor]:
    if weights in ("int8", "fp8"):
        top = 127.0 if weights == "int8" else 448.0
        # scales are rounded to bf16 first: the CPU kernels take them in the activation dtype, exactly
        scale = (w.abs().amax(-1) / top).clamp_min(1e-12).bfloat16().float()
        x = w / scale[:, None]
        q = x.round().clamp_(-127, 127).to(torch.int8) if weights == "int8" else \
            x.clamp_(-448, 448).to(torch.float8_e4m3fn)
        return {"qdata": q, "scale": scale}
    g = w.view(w.shape[0], -1, group)                                    # [n, K/G, G]
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp_min(1e-8).bfloat16()
    zero = (lo + 8 * scale.float()).bfloat16()
    q = ((g - zero.float()[..., None]) / scale.float()[..., None] + 8).round_().clamp_(0, 15).to(torch.uint8)
    q = q.view(w.shape[0], -1)
    return {"qdata": q[:, 0::2] | (q[:, 1::2] << 4), "scale": scale, "zero": zero}


def dequantize(t: dict[str, torch.Tensor], weights: str, dtype: torch.dtype) -> torch.Tensor:
    """The stored layout (one expert or a 2-D slice of rows) -> w [.., N, K] in dtype (computed in fp32)."""
    q = t["qdata"]
    if weights in ("int8", "fp8"):
        return (q.float() * t["scale"].float()[..., None]).to(dtype)
    u = torch.stack((q & 15, q >> 4), -1).flatten(-2).float()           # [.., N, K]
    g = u.unflatten(-1, (t["scale"].shape[-1], -1))                      # [.., N, K/G, G]
    return ((g - 8) * t["scale"].float()[..., None] + t["zero"].float()[..., None]).flatten(-2).to(dtype)


# ---- the module that holds one quantized weight ---------------------------------------------------------------
class QWeight(nn.Module):
    """One quantized weight of logical shape [(E,) N, K]: buffers `qdata`, `scale` (, `zero`), and `linear`."""

    def __init__(self, shape: tuple[int, ...], weights: str, group: int | None, dtype: torch.dtype) -> None:
        super().__init__()
        self.shape, self.weights, self.group, self.dtype = tuple(shape), weights, group, dtype
        *lead, N, K = shape
        code = {"int8": (torch.int8, K), "fp8": (torch.float8_e4m3fn, K), "int4": (torch.uint8, K // 2)}[weights]
        self.register_buffer("qdata", torch.empty(*lead, N, code[1], dtype=code[0]))
        sdim = [*lead, N] if weights != "int4" else [*lead, N, K // group]
        self.register_buffer("scale", torch.empty(sdim, dtype=torch.float32 if weights != "int4" else torch.bfloat16))
        self.register_buffer("zero", torch.empty(sdim, dtype=torch.bfloat16) if weights == "int4" else None)
        self.cpu_int4 = False           # qdata/scale hold torch's int4 CPU kernel layout (see `for_device`)

    def _apply(self, fn, recurse=True):
        """.to() / .cuda() / .half() on the model: moves keep the stored dtypes (the codes and scales); a cast
        changes only the compute dtype."""
        probe = fn(torch.empty(0, dtype=self.dtype, device=self.qdata.device))
        if self.cpu_int4 and (probe.device.type != "cpu" or probe.dtype not in (torch.bfloat16, torch.float32)):
            raise RuntimeError("int4 weights packed for the CPU kernel stay on the CPU and compute in bf16 or fp32: "
                               "load the model again with the device and dtype you want")
        self.dtype = probe.dtype
        for k, t in list(self._buffers.items()):
            if t is None:
                continue
            new = fn(t)
            self._buffers[k] = new if new.dtype == t.dtype else t.to(new.device)
        if self.cpu_int4:
            self.scale = self.scale.to(self.dtype)
        return self

    def extra_repr(self) -> str:
        return f"{list(self.shape)}, {self.weights}" + (f", group {self.group}" if self.group else "")

    def stored(self, e: int | None = None) -> dict[str, torch.Tensor]:
        t = {"qdata": self.qdata, "scale": self.scale, **({"zero": self.zero} if self.zero is not None else {})}
        return t if e is None else {k: v[e] for k, v in t.items()}

    def set(self, tensors: dict[str, torch.Tensor], device: torch.device) -> None:
        """Take the stored tensors (as `quantize` makes them or as read from a file), then lay them out for
        the device's kernel."""
        for k, v in tensors.items():
            want = getattr(self, k)
            if tuple(v.shape) != tuple(want.shape) or v.dtype != want.dtype:
                raise ConfigError(f"quantized tensor {k}: {list(v.shape)} {v.dtype}, expected "
                                  f"{list(want.shape)} {want.dtype}")
            setattr(self, k, v.to(device))
        self.for_device()

    def for_device(self) -> None:
        """CPU int4 with bf16/fp32 activations: repack the codes once into torch's kernel layout (rows in
        blocks of 16) with scale and zero as [.., K/G, N, 2] in the activation dtype."""
        N, K = self.shape[-2:]
        if not (self.weights == "int4" and self.qdata.device.type == "cpu" and N % 16 == 0 and K % 2 == 0
                and self.dtype in (torch.bfloat16, torch.float32)):
            return
        q = self.qdata.reshape(-1, N, K // 2)
        packed = torch.stack([torch._convert_weight_to_int4pack_for_cpu(
            torch.stack((p & 15, p >> 4), -1).flatten(-2).to(torch.int32), 1) for p in q])
        sz = torch.stack((self.scale, self.zero), -1).to(self.dtype).transpose(-3, -2).contiguous()
        self.qdata, self.scale, self.zero = packed.reshape(self.qdata.shape), sz, None
        self.cpu_int4 = True

    # ---- matmuls ----------------------------------------------------------------------------------------
    def linear(self, x: torch.Tensor, e: int | None = None) -> torch.Tensor:
        """x [M, K] @ W^T (expert e of a 3-D weight) -> [M, N] in x's dtype, by the fastest path here."""
        path = self.path(x)
        PATHS[path] += 1
        t = self.stored(e)
        if path == "int4pack":
            return torch._weight_int4pack_mm_for_cpu(x.contiguous(), t["qdata"], self.group, t["scale"])
        if path == "int8pack":
            return torch._weight_int8pack_mm(x.contiguous(), t["qdata"], t["scale"].to(x.dtype))
        if path == "triton":
            return kernels.qmm(x, t, self.weights, self.group, None)
        return fallback(x, t, self.weights)          # "convert" runs the same code: int8/fp8 codes, row scales

    def grouped(self, xs: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        """xs [T, K] rows sorted by expert, offs [E] group ends -> [T, N] (each group through its expert)."""
        if self.path(xs) == "triton":
            PATHS["triton"] += 1
            return kernels.qmm(xs, self.stored(), self.weights, self.group, offs)
        out = xs.new_empty(xs.shape[0], self.shape[-2])
        start = 0
        for e, end in enumerate(offs.tolist()):
            if end > start:
                out[start:end] = self.linear(xs[start:end], e)
            start = end
        return out

    def path(self, x: torch.Tensor) -> str:
        if self.cpu_int4:
            return "int4pack"
        if x.is_cuda:
            fp8_ok = self.weights != "fp8" or torch.cuda.get_device_capability(x.device) >= (8, 9)
            if kernels.available() and fp8_ok:
                return "triton"
            if not fp8_ok:
                _warn_once("cuda-fp8", "this GPU has no fp8 (compute capability < 8.9): fp8 weights are dequantized "
                                       "a slice at a time before a dense matmul (slow); use int8 or int4 here")
                return "fallback"
            _warn_once("cuda", "Triton is not installed: quantized matmuls dequantize slices of each weight "
                               "before a dense matmul (slow); pip install triton")
            return "fallback"
        if self.weights == "int8" and x.dtype == torch.bfloat16 and x.shape[0] <= FEW_ROWS and self.shape[-1] % 16 == 0:
            return "int8pack"            # (the kernel reads rows in blocks of 16 inputs: wrong or a crash otherwise)
        if self.weights != "int4" and x.dtype in (torch.bfloat16, torch.float32):
            return "convert"   # many rows: converting the codes for the dense (AMX) matmul beats the packed kernel
        _warn_once(f"cpu-{self.weights}-{x.dtype}", f"no CPU kernel for {self.weights} weights of shape "
                   f"{list(self.shape)} with {x.dtype} activations: dequantizing slices of each weight (slow)")
        return "fallback"

    def dequantized(self) -> torch.Tensor:
        """The whole weight in the compute dtype (tests and conversions only; never on a forward path)."""
        if self.cpu_int4:   # the kernel's layout is private: run it on the identity
            eye = torch.eye(self.shape[-1], dtype=self.dtype)
            codes = self.qdata.reshape(-1, *self.qdata.shape[-2:])
            sz = self.scale.reshape(-1, *self.scale.shape[-3:])
            return torch.stack([torch._weight_int4pack_mm_for_cpu(eye, c, self.group, s).T
                                for c, s in zip(codes, sz)]).reshape(self.shape)
        return dequantize(self.stored(), self.weights, self.dtype)


def fallback(x: torch.Tensor, t: dict[str, torch.Tensor], weights: str) -> torch.Tensor:
    """x [M, K] @ W^T for a weight in the stored layout, a slice of output rows at a time: int8 / fp8 codes
    are converted to x's dtype and their row scale applied to the output; int4 slices are dequantized."""
    N, K = t["qdata"].shape[0], x.shape[-1]
    step = max(1, CHUNK // K)
    if step >= N:
        return _slice(x, t, weights)
    return torch.cat([_slice(x, {k: v[r:r + step] for k, v in t.items()}, weights) for r in range(0, N, step)], -1)


def _slice(x: torch.Tensor, t: dict[str, torch.Tensor], weights: str) -> torch.Tensor:
    if weights == "int4":
        return F.linear(x, dequantize(t, weights, x.dtype))
    return F.linear(x, t["qdata"].to(x.dtype)) * t["scale"].to(x.dtype)


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, stacklevel=3)


# ---- the modules that replace nn.Linear and nn.Embedding ------------------------------------------------------
class QLinear(nn.Module):
    """nn.Linear without bias, weight quantized (`self.weight` is a QWeight)."""

    def __init__(self, weight: QWeight) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight.linear(x.reshape(-1, x.shape[-1])).view(*x.shape[:-1], -1)


class QEmbedding(nn.Module):
    """The tied embedding / head in int8 with one scale per vocabulary row. Same methods as model.Embedding."""

    def __init__(self, weight: QWeight) -> None:
        super().__init__()
        self.weight = weight

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        w = self.weight
        return (w.qdata[ids].float() * w.scale[ids, None].float()).to(w.dtype)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """h [.., H] -> h @ E^T [.., V] in h's dtype."""
        return self.weight.linear(h.reshape(-1, h.shape[-1])).view(*h.shape[:-1], -1)

    def mix(self, p: torch.Tensor) -> torch.Tensor:
        """p [.., V] -> p @ E [.., H] in the compute dtype, a slice of the vocabulary at a time."""
        w, V = self.weight, p.shape[-1]
        step = max(1, CHUNK // w.shape[-1])
        out = None
        for r in range(0, V, step):
            part = torch.matmul((p[..., r:r + step] * w.scale[r:r + step].to(p.dtype)).to(w.dtype),
                                w.qdata[r:r + step].to(w.dtype))
            out = part.float() if out is None else out.add_(part)   # sums of the slices in fp32, one rounding
        return out.to(w.dtype)


def quantizable(model: nn.Module) -> list[tuple[str, tuple[int, ...], bool]]:
    """(parameter name, shape, is the embedding) of every weight a scheme quantizes: all nn.Linear layers
    except the routers (small, and they pick the experts), the experts' 3-D weights, the embedding."""
    from .model import Experts
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Embedding):
            out.append((f"{name}.weight", tuple(mod.weight.shape), True))
        elif isinstance(mod, nn.Linear) and not name.endswith("router.proj"):
            out.append((f"{name}.weight", tuple(mod.weight.shape), False))
        elif isinstance(mod, Experts):
            out += [(f"{name}.{p}", tuple(getattr(mod, p).shape), False) for p in ("gate_up_proj", "down_proj")]
    return out


def plan(model: nn.Module, q: QuantConfig, dtype: torch.dtype = torch.bfloat16) -> dict[str, QWeight]:
    """Parameter name -> the empty (meta) QWeight that weight becomes under `q`: the embedding int8, the rest
    q's scheme. Its buffers are the stored layout (what a folder holds, what memory estimates count). Checks
    that an int4 group size divides every input width (one ConfigError naming the weight)."""
    out = {}
    for name, shape, is_embed in quantizable(model):
        weights, group = ("int8", None) if is_embed else (q.weights, q.group_size)
        if weights == "int4" and shape[-1] % group:
            raise ConfigError(f"int4 group size {group} does not divide the input width {shape[-1]} of {name}; "
                              f"choose a group size from {', '.join(map(str, INT4_GROUPS))} that does")
        with torch.device("meta"):
            out[name] = QWeight(shape, weights, group, dtype)
    return out


def stored_name(key: str, part: str) -> str:
    """The file name of one stored tensor of the weight named `key`: the codes keep the name, then _scale, _zero."""
    return key if part == "qdata" else f"{key}_{part}"


def prepare(model: nn.Module, q: QuantConfig, dtype: torch.dtype) -> dict[str, QWeight]:
    """Swap the quantizable weights of a (meta) model for empty QWeights (`plan`). -> parameter name -> QWeight."""
    made = plan(model, q, dtype)
    for name, qw in made.items():
        mod_name, _, attr = name.rpartition(".")
        mod = model.get_submodule(mod_name)
        if isinstance(mod, nn.Embedding):
            _replace(model, mod_name, QEmbedding(qw))
        elif attr == "weight":
            _replace(model, mod_name, QLinear(qw))
        else:                                   # experts: the parameter becomes a submodule of the same name
            del mod._parameters[attr]
            mod.add_module(attr, qw)
    return made


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)


def model_bytes(cfg, q: QuantConfig | None, dtype_bytes: int) -> tuple[int, int]:
    """(bytes of the weights a scheme quantizes, bytes of all other weights at dtype_bytes) for a config."""
    from .model import DiffusionGemma
    with torch.device("meta"):
        m = DiffusionGemma(cfg)
    total = sum(p.numel() for p in m.parameters()) + sum(b.numel() for b in m.buffers())
    if q is None:
        return 0, total * dtype_bytes
    layout = plan(m, q).values()
    qb = sum(t.numel() * t.element_size() for qw in layout for t in qw.buffers())
    return qb, (total - sum(math.prod(qw.shape) for qw in layout)) * dtype_bytes
