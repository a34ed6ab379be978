"""Read and write HF-format DiffusionGemma checkpoint folders (safetensors only, never pickle).

Knows: the file layout (`model.safetensors` or shards + `model.safetensors.index.json`, `config.json`,
`generation_config.json`), the mapping between HF tensor names and ours, and how to stream tensors one
at a time so a checkpoint never needs twice its size in memory. Vision tensors are never read.
Does not know: the forward math.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ConfigError, ModelConfig, SamplerConfig

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint folder we cannot read (one message naming the file or tensor)."""


_DECODER = "model.decoder."
_ENC_SCALAR = re.compile(r"^layers\.(\d+)\.encoder_layer_scalar$")
_SC = re.compile(r"^self_conditioning\.mlp\.(\w+)\.weight$")


def hf_name(name: str) -> str:
    """Our parameter/buffer name -> the tensor name in a published checkpoint."""
    if m := _ENC_SCALAR.match(name):
        return f"model.encoder.language_model.layers.{m.group(1)}.layer_scalar"
    if m := _SC.match(name):
        return f"{_DECODER}self_conditioning.{m.group(1)}.weight"
    return _DECODER + name


def _parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if str(dtype) not in table:
        raise ConfigError(f"unsupported dtype {dtype!r} (choose from float32, bfloat16, float16)")
    return table[str(dtype)]


def _weight_files(path: Path) -> dict[str, Path]:
    """HF tensor name -> the safetensors file holding it."""
    if (path / INDEX).is_file():
        try:
            wm = json.loads((path / INDEX).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{path / INDEX} is not a valid safetensors index: {e}") from None
        missing = sorted({f for f in wm.values() if not (path / f).is_file()})
        if missing:
            raise CheckpointError(f"{path}: shard file(s) listed in {INDEX} are missing: {', '.join(missing)}")
        return {k: path / f for k, f in wm.items()}
    if (path / SINGLE).is_file():
        with safe_open(str(path / SINGLE), framework="pt") as f:
            return {k: path / SINGLE for k in f.keys()}
    if any(path.glob("*.bin")) or any(path.glob("*.pt")) or any(path.glob("*.pth")):
        raise CheckpointError(f"{path}: only safetensors checkpoints are read (pickle files are never loaded)")
    raise CheckpointError(f"{path}: no {SINGLE} or {INDEX} found")


def resolve_device(device: torch.device | str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"unknown device {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available")
    return dev


def load(path: str | os.PathLike, *, device: torch.device | str | None = None,
         dtype: torch.dtype | str | None = None):
    """Load a DiffusionGemma checkpoint folder -> `DiffusionGemma` in eval mode.

    device: None picks CUDA when available, else the CPU. dtype: None keeps the checkpoint's dtype.
    Tensors are streamed one by one straight to `device`; nothing is read twice into memory.
    """
    from .model import DiffusionGemma

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"model folder {str(path)!r} does not exist")
    cfg = ModelConfig.from_dir(path)
    sampler = SamplerConfig.from_dir(path, cfg)
    dev = resolve_device(device)
    files = _weight_files(path)
    want = _parse_dtype(dtype)
    if want is None:
        emb = files.get(_DECODER + "embed_tokens.weight")
        if emb is None:
            raise CheckpointError(f"{path}: tensor {_DECODER}embed_tokens.weight is missing")
        with safe_open(str(emb), framework="pt") as f:
            want = f.get_slice(_DECODER + "embed_tokens.weight").get_dtype()
        want = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}.get(want, torch.float32)
    with torch.device("meta"):
        model = DiffusionGemma(cfg, sampler)
    expected = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    handles: dict[Path, object] = {}
    try:
        for name, meta in expected.items():
            key = hf_name(name)
            if key not in files and name.endswith("encoder_layer_scalar"):
                key = hf_name(name.replace("encoder_layer_scalar", "layer_scalar"))  # fall back to the decoder's
            if key not in files:
                raise CheckpointError(f"{path}: tensor {key} is missing (expected shape {list(meta.shape)})")
            fn = files[key]
            if fn not in handles:
                handles[fn] = safe_open(str(fn), framework="pt", device=str(dev)).__enter__()
            sl = handles[fn].get_slice(key)
            shape = list(sl.get_shape())
            if shape != list(meta.shape):
                raise CheckpointError(
                    f"{path}: tensor {key} has shape {shape}, expected {list(meta.shape)} from config.json")
            t = handles[fn].get_tensor(key).to(want)
            _assign(model, name, t)
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)
    model.path = str(path)
    return model.eval().requires_grad_(False)


def _assign(model: torch.nn.Module, name: str, t: torch.Tensor) -> None:
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    if attr in mod._parameters:
        mod._parameters[attr] = torch.nn.Parameter(t, requires_grad=False)
    else:
        mod._buffers[attr] = t


def save(model, path: str | os.PathLike, *, max_shard_bytes: int = 4 << 30,
         extra_files: dict[str, bytes] | None = None) -> Path:
    """Write `model` as an HF-format folder (atomically: a temporary folder renamed into place).

    Tensors larger than one shard go alone in their shard; `extra_files` (name -> bytes) are copied in.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    state = {hf_name(k): v.detach().contiguous().cpu()
             for k, v in {**dict(model.named_parameters()), **dict(model.named_buffers())}.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in state.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(tmp / SINGLE), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fn = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(tmp / fn), metadata={"format": "pt"})
            weight_map.update({k: fn for k in shard})
        total = sum(v.numel() * v.element_size() for v in state.values())
        (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    cfg = dataclasses.replace(model.config, dtype=str(model.dtype).replace("torch.", ""))
    (tmp / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2))
    (tmp / "generation_config.json").write_text(json.dumps(model.sampler_config.to_hf(), indent=2))
    for name, data in (extra_files or {}).items():
        (tmp / name).write_bytes(data)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)                 # mkdtemp makes 0700; a model folder is shared
    for f in tmp.iterdir():
        os.chmod(f, 0o666 & ~umask)
    if path.exists():  # replace atomically: move the old folder aside first, then drop it
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
        os.replace(path, old / "x")
        os.replace(tmp, path)
        import shutil
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
    return path
