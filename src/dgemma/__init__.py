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
from pathlib import Path

from .checkpoint import CheckpointError, load, resolve_model, save
from .config import ConfigError, ModelConfig, SamplerConfig
from .generate import GenerateOutput
from .model import DiffusionGemma

__version__ = "0.1.0"


def default_model_path() -> str:
    """Folder of the small DiffusionGemma-architecture model that ships inside the package."""
    return str(Path(__file__).parent / "default_model")


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer of a checkpoint folder or Hugging Face Hub model id (`owner/name`)."""
    from .tokenizer import Tokenizer
    return Tokenizer.from_dir(resolve_model(path))


__all__ = ["load", "save", "load_tokenizer", "resolve_model", "default_model_path", "DiffusionGemma", "ModelConfig",
           "SamplerConfig", "GenerateOutput", "ConfigError", "CheckpointError", "__version__"]
