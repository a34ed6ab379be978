"""dgemma: a compact, fast, pure-PyTorch DiffusionGemma.

Public API:
    dgemma.load(path, *, device=None, dtype="auto", quantize=None, group_size=None) -> DiffusionGemma
        (path: a folder or a Hub id `owner/name`; quantize: "int8" | "int4" | "fp8")
    model.encoder_logits(input_ids) -> [B, T, V]
    model.denoise_logits(context_ids, canvas_ids, self_conditioning_logits=None) -> [B, C, V]
    model.generate(input_ids, ...) -> GenerateOutput(.sequences, .tokens_per_forward, ...)
    dgemma.load_tokenizer(path) -> Tokenizer
    dgemma.default_model_path() -> the small model shipped with the package
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

try:                     # imports torch: about a second
    from .checkpoint import CheckpointError, load, resolve_model, save
    from .config import ConfigError, ModelConfig, SamplerConfig
    from .generate import GenerateOutput
    from .model import DiffusionGemma
except KeyboardInterrupt:
    if Path(sys.argv[0]).name == "dgemma":   # Ctrl-C while the `dgemma` command starts: exit as its handler does
        raise SystemExit(130) from None
    raise

__version__ = "0.1.0"


def _settle_mkl_dispatch() -> None:
    """Call torch's MKL-backed (VML) float unary ops once, on one element, before anything runs them on many.

    oneMKL 2024.2 (what torch's CPU wheels link) picks each VML function's kernel on its first call; when that
    first call comes from several intra-op threads at once, one thread's chunk can run a low-accuracy kernel
    (pytorch/pytorch#188792). Seen here: the first torch.tanh over a [7, 3000] fp32 tensor, in 6 of 24 fresh
    processes, with absolute errors of 4e-5 on the second thread's rows (1e-7 otherwise), which moved the
    softcapped logits by 3e-3. One call on one element settles the choice; it costs microseconds."""
    import torch
    if not torch.backends.mkl.is_available():
        return
    for dtype in (torch.float32, torch.float64):
        x = torch.full((1,), 0.5, dtype=dtype)
        for op in (torch.tanh, torch.exp, torch.expm1, torch.log, torch.log1p, torch.log2, torch.log10,
                   torch.sqrt, torch.rsqrt, torch.sin, torch.cos, torch.tan, torch.asin, torch.acos, torch.atan,
                   torch.sinh, torch.cosh, torch.erf, torch.erfc, torch.erfinv, torch.sigmoid, torch.trunc):
            op(x)


_settle_mkl_dispatch()


def default_model_path() -> str:
    """Folder of the small DiffusionGemma-architecture model that ships inside the package."""
    return str(Path(__file__).parent / "default_model")


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer of a checkpoint folder or Hugging Face Hub model id (`owner/name`)."""
    from .tokenizer import Tokenizer
    return Tokenizer.from_dir(resolve_model(path))


__all__ = ["load", "save", "load_tokenizer", "resolve_model", "default_model_path", "DiffusionGemma", "ModelConfig",
           "SamplerConfig", "GenerateOutput", "ConfigError", "CheckpointError", "__version__"]
