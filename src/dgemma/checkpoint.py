"""Read and write HF-format DiffusionGemma checkpoint folders (safetensors only, never pickle).

Knows: the file layout (`model.safetensors` or shards + `model.safetensors.index.json`, `config.json`,
`generation_config.json`), the mapping between HF tensor names and ours, and how to stream tensors one
at a time so a checkpoint never needs twice its size in memory. Vision tensors are never read.
Does not know: the forward math.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from .config import ConfigError, ModelConfig, SamplerConfig, check

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


# Hub repo ids look like `owner/name` (letters, digits, `_`, `-`, `.`); paths start with `/`, `.` or `~`.
_HUB_ID = re.compile(r"\w[\w.-]*/\w[\w.-]*")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt"]


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def resolve_model(name: str | os.PathLike) -> Path:
    """A checkpoint folder, or a Hugging Face Hub model id (`owner/name`) -> a local folder.

    Hub ids go through `huggingface_hub.snapshot_download` (only config, safetensors, tokenizer and template
    files), which honours HF_HUB_OFFLINE, HF_HOME / HF_HUB_CACHE, HF_TOKEN and the local cache. Every
    failure becomes one `CheckpointError` line naming the id.
    """
    text = os.fspath(name)
    if not text.strip():
        raise CheckpointError("empty model path (pass a checkpoint folder or a Hub id)")
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"model path {text!r} is not a folder")
    if not _HUB_ID.fullmatch(text):
        raise CheckpointError(f"model folder {text!r} does not exist")
    try:
        import huggingface_hub
        from huggingface_hub import constants as hub_constants
        from huggingface_hub.utils import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                           RepositoryNotFoundError)
    except ImportError:
        raise CheckpointError(f"model {text!r} is not a local folder; to use hub ids, pip install huggingface_hub "
                              "(or dgemma[serve])") from None
    version = tuple(int(p) for p in re.findall(r"\d+", huggingface_hub.__version__)[:2])
    cli = "hf download" if version >= (0, 34) else "huggingface-cli download"
    fetch = f"download it with `{cli} {text}` or pass a folder"
    try:
        return Path(huggingface_hub.snapshot_download(text, allow_patterns=HUB_PATTERNS))
    except LocalEntryNotFoundError as e:  # not cached (or partly) and the Hub cannot be asked
        if type(e).__name__ == "IncompleteSnapshotError":
            why = "its copy in the Hugging Face cache is incomplete and the Hub cannot be reached"
        elif getattr(hub_constants, "HF_HUB_OFFLINE", False):
            why = "is not in the Hugging Face cache (HF_HUB_OFFLINE is set)"
        else:
            why = "is not in the Hugging Face cache and the Hub cannot be reached"
        msg = f"model {text!r} is not a local folder and {why}; {fetch}"
    except GatedRepoError:
        msg = (f"model {text!r} is gated on the Hugging Face Hub; accept its terms at https://huggingface.co/{text} "
               "and log in (`hf auth login` or set HF_TOKEN), or pass a folder")
    except RepositoryNotFoundError:
        msg = (f"model {text!r} is neither a local folder nor a model on the Hugging Face Hub (if it is private, "
               "log in with `hf auth login` or set HF_TOKEN)")
    except (HfHubHTTPError, OSError) as e:
        msg = f"could not fetch model {text!r} from the Hugging Face Hub ({_first_line(e)}); {fetch}"
    except ValueError as e:  # HFValidationError: not a valid repo id
        msg = f"model {text!r} is neither a local folder nor a valid Hugging Face Hub id ({_first_line(e)})"
    except Exception as e:  # network library errors (httpx/requests) that are not OSErrors
        why = f"{type(e).__name__}: {_first_line(e)}"
        msg = f"could not fetch model {text!r} from the Hugging Face Hub ({why}); {fetch}"
    raise CheckpointError(msg)


def _parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """None, or a compute dtype: float32, bfloat16 or float16 (a torch dtype, its name, fp32, bf16 or fp16)."""
    if dtype is None:
        return None
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    name = str(dtype).removeprefix("torch.")
    if name not in table:
        raise ConfigError(f"unsupported dtype {dtype!r} (choose from float32, bfloat16, float16)")
    return table[name]


_ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64,
              "I64": torch.int64, "I32": torch.int32, "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8,
              "F8_E4M3": torch.float8_e4m3fn}
ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


def read_header(fn: Path) -> dict[str, dict]:
    """The JSON header of a safetensors file: name -> {dtype, shape, data_offsets, start} (no __metadata__).
    Checks the header's length and every entry's types and offsets (CheckpointError naming the file)."""
    with open(fn, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        raw = f.read(8)
        if len(raw) != 8:
            raise CheckpointError(f"{fn} is not a safetensors file (too short)")
        n = int.from_bytes(raw, "little")
        if n > size - 8:
            raise CheckpointError(f"{fn} is not a safetensors file (header length {n} > file size - 8)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{fn} is not a safetensors file (bad header)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{fn} is not a safetensors file (header is not a JSON object)")
    header.pop("__metadata__", None)
    for name, v in header.items():
        try:
            check(name, v, "dict")
            check(f"{name}: dtype", v.get("dtype"), "str")
            check(f"{name}: shape", v.get("shape"), "ids")
            offsets = check(f"{name}: data_offsets", v.get("data_offsets"), "ids")
        except ConfigError as e:
            raise CheckpointError(f"{fn} is not a safetensors file (header entry {e})") from None
        if len(offsets) != 2 or not offsets[0] <= offsets[1] <= size - 8 - n:
            raise CheckpointError(f"{fn} is truncated or corrupt (tensor {name}: data_offsets {offsets}, "
                                  f"{size - 8 - n} bytes of data)")
        v["start"] = 8 + n
    return header


def read_tensor(fn: Path, info: dict, dtype: torch.dtype | None, device: torch.device) -> torch.Tensor:
    """Read one tensor straight from the file into its own memory (no mmap, no second copy of the file);
    dtype None keeps the stored dtype."""
    st = _ST_DTYPES.get(info["dtype"])
    if st is None:
        raise CheckpointError(f"{fn}: unsupported tensor dtype {info['dtype']}")
    a, b = info["data_offsets"]
    if math.prod(info["shape"]) * st.itemsize != b - a:        # checked before allocating
        raise CheckpointError(f"{fn}: tensor byte size does not match its shape")
    t = torch.empty(info["shape"], dtype=st)
    if b > a:
        buf = t.view(-1).view(torch.uint8).numpy()
        with open(fn, "rb") as f:
            f.seek(info["start"] + a)
            if f.readinto(memoryview(buf)) != b - a:
                raise CheckpointError(f"{fn} is truncated")
    return t.to(device=device, dtype=dtype or t.dtype)


def _weight_files(path: Path) -> dict[str, Path]:
    """HF tensor name -> the safetensors file holding it."""
    if (path / INDEX).is_file():
        try:
            index = json.loads((path / INDEX).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path / INDEX} is not a valid safetensors index: {e}") from None
        wm = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(wm, dict) or not all(isinstance(k, str) and isinstance(f, str) for k, f in wm.items()):
            raise CheckpointError(f"{path / INDEX} is not a valid safetensors index: weight_map must be a JSON "
                                  "object of tensor name -> file name")
        missing = sorted({f for f in wm.values() if not (path / f).is_file()})
        if missing:
            raise CheckpointError(f"{path}: shard file(s) listed in {INDEX} are missing: {', '.join(missing)}")
        return {k: path / f for k, f in wm.items()}
    if (path / SINGLE).is_file():
        return {k: path / SINGLE for k in read_header(path / SINGLE)}
    if any(path.glob("*.bin")) or any(path.glob("*.pt")) or any(path.glob("*.pth")):
        raise CheckpointError(f"{path}: only safetensors checkpoints are read (pickle files are never loaded)")
    raise CheckpointError(f"{path}: no {SINGLE} or {INDEX} found")


def resolve_device(device: torch.device | str | None) -> torch.device:
    """None -> cuda if available, else cpu; otherwise a device that exists on this machine (ConfigError if not)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"unknown device {device!r} (e.g. cpu, cuda, cuda:1)") from None
    if dev.type != "cpu":
        backend = getattr(torch, dev.type, None)
        if backend is None or not hasattr(backend, "is_available") or not backend.is_available():
            raise ConfigError(f"device {device!r} requested but {dev.type} is not available on this machine")
        if dev.index is not None and dev.index >= backend.device_count():
            raise ConfigError(f"device {device!r} requested but only {backend.device_count()} {dev.type} "
                              "device(s) exist")
    return dev


@functools.cache
def cpu_has_bf16() -> bool:
    """Does this CPU multiply bf16 natively (AMX or AVX512-BF16)? Elsewhere bf16 matmuls are emulated: slow."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags.split() for f in ("amx_bf16", "avx512_bf16"))


@functools.cache
def tune_malloc() -> bool:
    """CPU inference allocates and frees tensors of tens of MB every step; glibc serves those with fresh mmaps
    whose pages fault in on first touch (a [256, 32768] fp32 tensor: ~9 ms of faults for ~2 ms of work). Keep
    freed memory in the heap instead (mmap threshold 1 GiB, no trimming), for this process. The cost: memory
    freed after the peak is not handed back to the OS. Off with DGEMMA_TUNE_MALLOC=0; glibc only."""
    if os.environ.get("DGEMMA_TUNE_MALLOC", "1") == "0":
        return False
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30) and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):
        return False


# CPU: bf16 (AMX) beats fp32 once the matmuls outweigh the per-op overhead; measured in docs/NOTES.md
# ("Cheaper hardware"): slower at hidden size 128-256, faster at 512
CPU_BF16_MIN_HIDDEN = 512


def auto_dtype(device: torch.device, stored: torch.dtype, cfg: ModelConfig, quantized: bool) -> torch.dtype:
    """What `dtype="auto"` picks: on a GPU the checkpoint's half dtype (for an fp32 one bf16, or fp16 where the GPU
    has no bf16); on the CPU bf16
    where the CPU has native bf16 and the model is large enough, or its weights are quantized (the packed CPU
    kernels take bf16 activations), else fp32."""
    if device.type == "cpu":
        fast = cpu_has_bf16() and (quantized or cfg.hidden_size >= CPU_BF16_MIN_HIDDEN)
        return torch.bfloat16 if fast else torch.float32
    if stored in (torch.bfloat16, torch.float16):
        return stored
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16                                 # GPUs before Ampere
    return torch.bfloat16


_NORM = _DECODER + "norm.weight"   # never quantized: its dtype is the checkpoint's


def stored_dtype(path: str | os.PathLike) -> torch.dtype:
    """The dtype a checkpoint folder stores its weights in (what `load(..., dtype=None)` computes in)."""
    files = _weight_files(Path(path))
    if _NORM not in files:
        raise CheckpointError(f"{path}: tensor {_NORM} is missing")
    return _ST_DTYPES.get(read_header(files[_NORM])[_NORM]["dtype"], torch.float32)


def load(path: str | os.PathLike, *, device: torch.device | str | None = None,
         dtype: torch.dtype | str | None = "auto", quantize: str | None = None, group_size: int | None = None):
    """Load a DiffusionGemma checkpoint folder or Hub model id -> `DiffusionGemma` in eval mode.

    path: a folder, or a Hugging Face Hub id (`owner/name`, see `resolve_model`); `model.path` is the local folder.

    device: None picks CUDA when available, else the CPU. dtype: the compute dtype; "auto" (default) picks the
    fastest one that keeps the model's behaviour (`auto_dtype`), None keeps the checkpoint's.
    quantize: "int8", "int4" or "fp8" quantizes the weights while loading (quant.py; group_size for int4);
    a folder written by `dgemma quantize` loads quantized without it.
    Tensors are read one by one from the files into their final memory (no mmap): loading needs about one
    copy of the (quantized) weights, plus one tensor in flight.
    """
    from .model import DiffusionGemma
    from .quant import QuantConfig, prepare, quantize as quantize_tensor, stored_name

    path = resolve_model(path)
    cfg = ModelConfig.from_dir(path)
    sampler = SamplerConfig.from_dir(path, cfg)
    dev = resolve_device(device)
    if dev.type == "cpu":
        tune_malloc()
    files = _weight_files(path)
    stored_q = QuantConfig.from_hf(cfg.extra.get("quantization_config"))
    asked_q = QuantConfig.make(quantize, group_size) if quantize else None
    if stored_q and asked_q and stored_q != asked_q:
        held = stored_q.weights + (f", groups of {stored_q.group_size}" if stored_q.group_size else "")
        raise CheckpointError(f"{path} is already quantized ({held}): load it as it is, or quantize its "
                              "unquantized checkpoint")
    if group_size is not None and not quantize:
        raise ConfigError("group_size needs quantize='int4'")
    q = stored_q or asked_q
    headers: dict[Path, dict] = {}

    def entry(key: str) -> tuple[Path, dict]:
        if key not in files:
            raise CheckpointError(f"{path}: tensor {key} is missing")
        fn = files[key]
        if fn not in headers:
            headers[fn] = read_header(fn)
        return fn, headers[fn][key]

    want = _parse_dtype(None if dtype == "auto" else dtype)
    if want is None:
        stored = _ST_DTYPES.get(entry(_NORM)[1]["dtype"], torch.float32)
        want = auto_dtype(dev, stored, cfg, q is not None) if dtype == "auto" else stored
    with torch.device("meta"):
        model = DiffusionGemma(cfg, sampler)
    qweights = prepare(model, q, want) if q else {}
    inside = {f"{n}.{b}" for n in qweights for b in ("qdata", "scale", "zero")}
    expected = {k: v for k, v in {**dict(model.named_parameters()), **dict(model.named_buffers())}.items()
                if k not in inside}
    for name, meta in expected.items():
        key = hf_name(name)
        if key not in files and name.endswith("encoder_layer_scalar"):
            key = hf_name(name.replace("encoder_layer_scalar", "layer_scalar"))  # fall back to the decoder's
        if key not in files:
            raise CheckpointError(f"{path}: tensor {key} is missing (expected shape {list(meta.shape)})")
        fn, info = entry(key)
        if list(info["shape"]) != list(meta.shape):
            raise CheckpointError(
                f"{path}: tensor {key} has shape {list(info['shape'])}, expected {list(meta.shape)} from config.json")
        _assign(model, name, read_tensor(fn, info, want, dev))
    for name, qw in qweights.items():              # one weight at a time: read, quantize, keep the codes
        key = hf_name(name)
        try:
            if stored_q:
                qw.set({p: read_tensor(*entry(stored_name(key, p)), None, dev) for p in qw.stored()}, dev)
            else:
                fn, info = entry(key)
                if list(info["shape"]) != list(qw.shape):
                    raise CheckpointError(f"{path}: tensor {key} has shape {list(info['shape'])}, expected "
                                          f"{list(qw.shape)} from config.json")
                qw.set(quantize_tensor(read_tensor(fn, info, None, dev), qw.weights, qw.group), dev)
        except ConfigError as e:
            raise CheckpointError(f"{path}: tensor {key}: {e}") from None
    model.path = str(path)
    model.quantization = q
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
    if getattr(model, "quantization", None):
        raise CheckpointError("dgemma.save writes unquantized models; save the original weights, then run "
                              "`dgemma quantize`")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
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
        umask = _umask()
        os.chmod(tmp, 0o777 & ~umask)                 # mkdtemp makes 0700; a model folder is shared
        for f in tmp.iterdir():
            os.chmod(f, 0o666 & ~umask)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():  # replace: move the old folder aside, then the new one in (a kill between the two
        # renames leaves both complete folders beside `path`; training uses a symlink swap instead)
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
        os.replace(path, old / "x")
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
    return path


# ---- quantized copies of a checkpoint folder ---------------------------------------------------------------------
def quantize_folder(src: str | os.PathLike, dst: str | os.PathLike, weights: str, group_size: int | None = None,
                    progress: bool = True) -> Path:
    """Write a quantized copy of the checkpoint folder `src` to `dst` (quant.py's layout, same shard files,
    `quantization_config` in config.json, every other file copied). Streams: one input tensor is in memory
    at a time, and the output is written tensor by tensor. Atomic: nothing appears at `dst` on failure."""
    from tqdm import tqdm

    from .model import DiffusionGemma
    from .quant import QuantConfig, plan, quantize, stored_name

    if not os.fspath(dst).strip():
        raise CheckpointError("empty output folder path")
    src, dst = resolve_model(src), Path(dst)
    q = QuantConfig.make(weights, group_size)
    cfg = ModelConfig.from_dir(src)
    if cfg.extra.get("quantization_config"):
        raise CheckpointError(f"{src} is already quantized: quantize its unquantized checkpoint")
    if dst.exists() and not dst.is_dir():
        raise CheckpointError(f"output folder {dst} is an existing file")
    if dst.is_dir() and any(dst.iterdir()):
        raise CheckpointError(f"output folder {dst} already exists and is not empty")
    files = _weight_files(src)
    with torch.device("meta"):
        meta = DiffusionGemma(cfg)
    try:
        layout = {hf_name(n): qw for n, qw in plan(meta, q).items()}     # the stored tensors of each weight
    except ConfigError as e:
        raise CheckpointError(f"{src}: {e}") from None
    headers = {fn: read_header(fn) for fn in sorted(set(files.values()))}
    for key, qw in layout.items():            # check every shape before writing anything
        if key not in files:
            raise CheckpointError(f"{src}: tensor {key} is missing")
        shape = headers[files[key]][key]["shape"]
        if list(shape) != list(qw.shape):
            raise CheckpointError(f"{src}: tensor {key} has shape {list(shape)}, expected {list(qw.shape)} from "
                                  "config.json")
    made = [p for p in dst.parents if not p.exists()]          # the folders this call creates, deepest first
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        total = sum(fn.stat().st_size for fn in headers)
        weight_map: dict[str, str] = {}
        with tqdm(total=total, unit="B", unit_scale=True, desc="quantize", disable=not progress) as bar:
            for fn, header in headers.items():
                names = sorted((k for k in header if k in files), key=lambda k: header[k]["data_offsets"][0])
                specs: list[tuple[str, str, list[int]]] = []
                for k in names:
                    if k in layout:
                        specs += [(stored_name(k, p), ST_NAMES[t.dtype], list(t.shape))
                                  for p, t in layout[k].stored().items()]
                    else:
                        specs.append((k, header[k]["dtype"], header[k]["shape"]))

                def tensors():
                    for k in names:
                        t = read_tensor(fn, header[k], None, torch.device("cpu"))
                        if k in layout:
                            out = quantize(t, layout[k].weights, layout[k].group)
                            yield from (out[p] for p in layout[k].stored())
                        else:
                            yield t
                        bar.update(header[k]["data_offsets"][1] - header[k]["data_offsets"][0])

                _write_safetensors(tmp / fn.name, specs, tensors())
                weight_map.update({name: fn.name for name, _, _ in specs})
        if (src / INDEX).is_file():
            size = sum((tmp / f).stat().st_size for f in set(weight_map.values()))
            (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": size}, "weight_map": weight_map}, indent=2))
        config = json.loads((src / "config.json").read_text())
        config["quantization_config"] = q.to_hf()
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        for f in src.iterdir():                # tokenizer, template, generation config, README...
            if f.is_file() and f.suffix != ".safetensors" and f.name not in (INDEX, "config.json"):
                shutil.copy2(f, tmp / f.name)
        os.chmod(tmp, 0o777 & ~_umask())
        if dst.exists():
            dst.rmdir()
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in made:
            try:
                folder.rmdir()
            except OSError:
                break
        raise
    return dst


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _write_safetensors(fn: Path, specs: list[tuple[str, str, list[int]]], tensors) -> None:
    """Write a safetensors file whose header is known in advance (name, dtype code, shape), then each tensor
    as `tensors` yields it, in order: the file never needs all of them in memory."""
    sizes = {"F32": 4, "BF16": 2, "F16": 2, "F64": 8, "I64": 8, "I32": 4, "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1}
    header, off = {"__metadata__": {"format": "pt"}}, 0
    for name, code, shape in specs:
        n = sizes[code]
        for d in shape:
            n *= d
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(fn, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for (name, code, shape), t in zip(specs, tensors, strict=True):
            if ST_NAMES[t.dtype] != code or list(t.shape) != list(shape):
                raise CheckpointError(f"internal: tensor {name} is {t.dtype} {list(t.shape)}, header says {code} {shape}")
            f.write(t.contiguous().view(-1).view(torch.uint8).numpy().data)
