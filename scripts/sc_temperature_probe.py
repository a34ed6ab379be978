#!/usr/bin/env python3
"""Diagnostic, not a sampler option: run `dgemma ...` with the self-conditioning input built from the logits at a
fixed temperature SC_T instead of the sampler's temperature-scaled logits (spec 4.2, step 7).

A model trained with the spec's recipe sees pass 1's raw logits (temperature 1) as its self-conditioning input,
while the sampler feeds it logits divided by T = 0.1-0.3 (the shipped settings): much sharper distributions than
any it was trained on. This probe measures what that mismatch costs (docs/NOTES.md, "Self-conditioning
temperature"). Only the exact sampler (the CPU fp32 default) is patched.

    SC_T=1.0 python scripts/sc_temperature_probe.py eval --quality --prompts 15 --tasks 0 --max-new-tokens 64 \
        --steps 8 --seed 0 --out q_sc1
"""
import dataclasses
import os
import sys

import torch

from dgemma import cli, sampling

SC_T = float(os.environ.get("SC_T", "1.0"))
_sample_rows = sampling.sample_rows


def sample_rows(logits, temp, noise=None, embedding=None, embed_scale=None, uniform=None):
    """sampling.sample_rows, with the soft embedding taken from softmax(logits / SC_T)."""
    if noise is None:
        raise SystemExit("the probe patches the exact sampler only (CPU, fp32: --sampler exact)")
    soft = None
    if embedding is not None:   # before the call below, which divides the logits in place
        soft = embedding.mix(torch.softmax(logits / SC_T, dim=-1, dtype=torch.float32)) * embed_scale
    return dataclasses.replace(_sample_rows(logits, temp, noise, None, None, uniform), soft=soft)


sampling.sample_rows = sample_rows
sys.exit(cli.main(sys.argv[1:]))
