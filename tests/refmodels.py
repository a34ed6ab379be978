"""Tiny random DiffusionGemma checkpoints written by the reference (transformers), for parity tests."""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
            sliding_window=8, num_experts=8, top_k_experts=2, moe_intermediate_size=32,
            use_bidirectional_attention="vision")


def reference_model(seed: int = 0, canvas_length: int = 16, **text_overrides):
    """A randomly initialised reference DiffusionGemmaForBlockDiffusion (fp32, eager kernels) in eval mode."""
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    tc = {**TINY, **text_overrides}
    vc = dict(model_type="gemma4_vision", hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
              intermediate_size=32, head_dim=16)
    cfg = DiffusionGemmaConfig(text_config=tc, vision_config=vc, canvas_length=canvas_length,
                               eos_token_id=[1, 106, 50])
    cfg._attn_implementation = "eager"
    cfg.text_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = DiffusionGemmaForBlockDiffusion(cfg)
    # non-trivial values for parameters the reference initialises to constants
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm.weight") or "router.scale" in name or "per_expert_scale" in name:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
        for name, b in m.named_buffers():
            if name.endswith("layer_scalar"):
                b.fill_(0.5 + torch.rand(1, generator=g).item())
        # encoder and decoder scalars are separate buffers that a converter sets equal
        enc = m.model.encoder.language_model.layers
        for i, layer in enumerate(m.model.decoder.layers):
            enc[i].layer_scalar.copy_(layer.layer_scalar)
    return m.eval()


def save_reference(m, path: Path) -> Path:
    m.save_pretrained(str(path))
    return path
