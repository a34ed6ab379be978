"""Model and sampler configuration, read from (and written to) the published HF files.

Knows: the keys of `config.json` (top level + `text_config`) and `generation_config.json` for
DiffusionGemma, which of them we support, and how to turn them into one flat dataclass.
Does not know: tensors, devices or anything about running the model.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable


class ConfigError(ValueError):
    """A config value we cannot run (one message, naming the setting)."""


SLIDING, FULL = "sliding_attention", "full_attention"


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v: Any) -> bool:
    return (_int(v) or isinstance(v, float)) and math.isfinite(v)


# kind -> (test, what the value must be)
_KINDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "pos_int": (lambda v: _int(v) and v > 0, "a positive integer"),
    "id": (lambda v: _int(v) and v >= 0, "an integer >= 0"),
    "ids": (lambda v: isinstance(v, (list, tuple)) and all(_int(x) and x >= 0 for x in v), "a list of integers >= 0"),
    "pos_num": (lambda v: _num(v) and v > 0, "a positive number"),
    "num": (lambda v: _num(v) and v >= 0, "a number >= 0"),
    "unit": (lambda v: _num(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "strs": (lambda v: isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v), "a list of strings"),
    "dict": (lambda v: isinstance(v, dict), "a JSON object"),
}


def check(name: str, value: Any, kind: str) -> Any:
    """`value` if it is of `kind` (a key of _KINDS; a trailing "?" also allows None), else a ConfigError
    naming `name` (e.g. "config.json: text_config.hidden_size")."""
    if value is None and kind.endswith("?"):
        return value
    test, what = _KINDS[kind.rstrip("?")]
    if not test(value):
        raise ConfigError(f"{name} must be {what} (got {value!r})")
    return value


# ModelConfig fields -> kind (see `check`)
_FIELD_KINDS = {
    **dict.fromkeys(("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "global_head_dim", "num_global_key_value_heads",
                     "sliding_window", "num_experts", "top_k_experts", "moe_intermediate_size",
                     "max_position_embeddings", "canvas_length"), "pos_int"),
    **dict.fromkeys(("rope_local_theta", "rope_global_theta", "global_partial_rotary_factor", "rms_norm_eps"),
                    "pos_num"),
    "final_logit_softcapping": "num?", "layer_types": "strs", "pad_token_id": "id", "bos_token_id": "id",
    "eos_token_id": "ids", "dtype": "str",
}


@dataclass
class ModelConfig:
    """Text-path hyper-parameters of a DiffusionGemma checkpoint (names follow the HF text config)."""

    vocab_size: int = 262144
    hidden_size: int = 2816
    intermediate_size: int = 2112           # dense "shared" MLP, also the self-conditioning MLP width
    num_hidden_layers: int = 30
    num_attention_heads: int = 16
    num_key_value_heads: int = 8            # sliding layers
    head_dim: int = 256                     # sliding layers
    global_head_dim: int = 512              # full-attention layers
    num_global_key_value_heads: int = 2     # full-attention layers (k = v there)
    sliding_window: int = 1024              # W: a sliding query sees keys i-W < j <= i
    layer_types: list[str] = field(default_factory=list)
    rope_local_theta: float = 10000.0
    rope_global_theta: float = 1000000.0
    global_partial_rotary_factor: float = 0.25
    num_experts: int = 128
    top_k_experts: int = 8
    moe_intermediate_size: int = 704
    rms_norm_eps: float = 1e-6
    final_logit_softcapping: float | None = 30.0
    max_position_embeddings: int = 262144
    canvas_length: int = 256                # CL: tokens denoised in parallel per block
    pad_token_id: int = 0
    bos_token_id: int = 2
    eos_token_id: list[int] = field(default_factory=lambda: [1, 106, 50])
    dtype: str = "bfloat16"                 # dtype the checkpoint was saved in
    extra: dict[str, Any] = field(default_factory=dict, repr=False)  # untouched top-level keys (vision...)

    def __post_init__(self) -> None:
        if isinstance(self.eos_token_id, int):
            self.eos_token_id = [self.eos_token_id]
        for name, kind in _FIELD_KINDS.items():
            check(name, getattr(self, name), kind)
        if not self.layer_types:
            self.layer_types = [FULL if (i + 1) % 6 == 0 else SLIDING for i in range(self.num_hidden_layers)]
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is {self.num_hidden_layers}"
            )
        self.layer_types = list(self.layer_types)
        self.layer_types[-1] = FULL  # the reference forces the last layer to full attention
        for t in self.layer_types:
            if t not in (SLIDING, FULL):
                raise ConfigError(f"layer_types: unsupported layer type {t!r}")
        if self.top_k_experts > self.num_experts:
            raise ConfigError(f"top_k_experts ({self.top_k_experts}) > num_experts ({self.num_experts})")
        if self.num_attention_heads % self.num_key_value_heads or \
                self.num_attention_heads % self.num_global_key_value_heads:
            raise ConfigError("num_attention_heads must be a multiple of the key/value head counts")
        if self.sliding_window < 2:
            raise ConfigError(f"sliding_window must be >= 2 (got {self.sliding_window})")

    # ---- derived -------------------------------------------------------------------------------
    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING

    def layer_head_dim(self, layer: int) -> int:
        return self.head_dim if self.is_sliding(layer) else self.global_head_dim

    def layer_kv_heads(self, layer: int) -> int:
        return self.num_key_value_heads if self.is_sliding(layer) else self.num_global_key_value_heads

    def num_parameters(self) -> dict[str, int]:
        """Unique text parameters (tied head counted once) and parameters active per token."""
        H, E = self.hidden_size, self.num_experts
        dense = 3 * H * self.intermediate_size
        expert = 3 * H * self.moe_intermediate_size
        total = active = self.vocab_size * H + H + 3 * H * self.intermediate_size + H  # embed, norm, self-cond
        for i in range(self.num_hidden_layers):
            hd, kv = self.layer_head_dim(i), self.layer_kv_heads(i)
            attn = H * self.num_attention_heads * hd * 2 + H * kv * hd * (2 if self.is_sliding(i) else 1) + 2 * hd
            common = attn + dense + 7 * H + E * H + H + E + 1
            total += common + E * expert
            active += common + self.top_k_experts * expert
        return {"total": total, "active": active}

    # ---- HF files ------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> "ModelConfig":
        """Build from a parsed `config.json` (the top-level DiffusionGemma dict, or a bare text config)."""
        check("config.json", cfg, "dict")
        if cfg.get("model_type") not in (None, "diffusion_gemma", "diffusion_gemma_text"):
            raise ConfigError(f"model_type {cfg.get('model_type')!r} is not a DiffusionGemma checkpoint")
        text = dict(check("config.json: text_config", cfg.get("text_config"), "dict?") or cfg)
        top = {k: v for k, v in cfg.items() if k != "text_config"} if "text_config" in cfg else {}

        def get(key: str, default: Any = None, kind: str | None = None, src: dict = text,
                at: str = "text_config.") -> Any:
            """src[key], checked as `kind` (default: the field's kind); missing or null: `default` (None: an error)."""
            if src.get(key) is None:
                if default is None:
                    raise ConfigError(f"config.json: {at}{key} is missing")
                return default
            return check(f"config.json: {at}{key}", src[key], kind or _FIELD_KINDS[key])

        act = text.get("hidden_activation", "gelu_pytorch_tanh")
        if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ConfigError(f"hidden_activation={act!r} is not supported (only gelu_pytorch_tanh)")
        if get("attention_bias", False, "bool"):
            raise ConfigError("attention_bias=true is not supported")
        if text.get("use_bidirectional_attention") == "all":
            raise ConfigError("use_bidirectional_attention='all' is not supported (text encoder must be causal)")
        if get("tie_word_embeddings", get("tie_word_embeddings", True, "bool", top, ""), "bool") is False:
            raise ConfigError("tie_word_embeddings=false is not supported (the head is the embedding)")
        if text.get("hidden_size_per_layer_input"):
            raise ConfigError("hidden_size_per_layer_input (per-layer embeddings) is not supported")
        n_layers = get("num_hidden_layers")
        layer_types = list(get("layer_types", []))
        if layer_types and layer_types[-1] != FULL:
            layer_types = list(layer_types[:-1]) + [FULL]

        # Full-layer overrides: published files use global_head_dim/num_global_key_value_heads,
        # transformers' save_pretrained writes per_layer_config {idx: {head_dim, num_key_value_heads}}.
        kv, hd = get("num_key_value_heads"), get("head_dim", 256)
        tmp_types = layer_types or [FULL if (i + 1) % 6 == 0 else SLIDING for i in range(n_layers)]
        tmp_types = list(tmp_types[:-1]) + [FULL]
        if "per_layer_config" in text:  # written by transformers' save_pretrained; a missing key = base value
            plc = {}
            for k, over in get("per_layer_config", {}, "dict").items():
                if not str(k).isdigit():
                    raise ConfigError(f"config.json: text_config.per_layer_config: {k!r} is not a layer index")
                plc[int(k)] = check(f"config.json: text_config.per_layer_config.{k}", over, "dict")
            shapes = set()
            for i, t in enumerate(tmp_types):
                over = plc.get(i, {})
                if set(over) - {"head_dim", "num_key_value_heads"}:
                    raise ConfigError(f"per_layer_config[{i}]: unsupported keys {sorted(set(over))}")
                if t == SLIDING and over:
                    raise ConfigError(f"per_layer_config[{i}]: overrides on sliding layers are not supported")
                if t == FULL:
                    at = f"text_config.per_layer_config.{i}."
                    shapes.add((get("head_dim", hd, "pos_int", over, at),
                                get("num_key_value_heads", kv, "pos_int", over, at)))
            if len(shapes) != 1:
                raise ConfigError("per_layer_config: full-attention layers with different shapes are not supported")
            g_hd, g_kv = shapes.pop()
        else:  # published config.json: plain keys, with the reference's defaults
            g_hd = get("global_head_dim", 512)
            g_kv = get("num_global_key_value_heads", kv)
        rope = get("rope_parameters", {}, "dict")
        at = "text_config.rope_parameters."
        loc = get(SLIDING, {"rope_type": "default", "rope_theta": 10000.0}, "dict", rope, at)
        glo = get(FULL, {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6}, "dict",
                  rope, at)
        if loc.get("rope_type", "default") != "default" or loc.get("partial_rotary_factor", 1.0) != 1.0:
            raise ConfigError(f"rope_parameters.sliding_attention={loc} is not supported (only 'default')")
        if glo.get("rope_type") not in ("proportional", "default"):
            raise ConfigError(f"rope_parameters.full_attention.rope_type={glo.get('rope_type')!r} is not supported")
        eos = next((v for v in (top.get("eos_token_id"), text.get("eos_token_id")) if v is not None), 1)
        tdtype = top.get("dtype") or top.get("torch_dtype") or text.get("dtype") or "bfloat16"
        return cls(
            vocab_size=get("vocab_size"),
            hidden_size=get("hidden_size"),
            intermediate_size=get("intermediate_size"),
            num_hidden_layers=n_layers,
            num_attention_heads=get("num_attention_heads"),
            num_key_value_heads=kv,
            head_dim=hd,
            global_head_dim=g_hd,
            num_global_key_value_heads=g_kv,
            sliding_window=get("sliding_window", 512),
            layer_types=layer_types,
            rope_local_theta=float(get("rope_theta", 10000.0, "pos_num", loc, at + SLIDING + ".")),
            rope_global_theta=float(get("rope_theta", 1e6, "pos_num", glo, at + FULL + ".")),
            global_partial_rotary_factor=float(
                get("partial_rotary_factor", 1.0, "pos_num", glo, at + FULL + ".")
                if glo.get("rope_type") == "proportional" else 1.0
            ),
            num_experts=get("num_experts"),
            top_k_experts=get("top_k_experts"),
            moe_intermediate_size=get("moe_intermediate_size"),
            rms_norm_eps=get("rms_norm_eps", 1e-6),
            final_logit_softcapping=check("config.json: text_config.final_logit_softcapping",
                                          text.get("final_logit_softcapping", 30.0), "num?"),
            max_position_embeddings=get("max_position_embeddings", 131072),
            canvas_length=get("canvas_length", get("canvas_length", 256), src=top, at=""),
            pad_token_id=get("pad_token_id", 0),
            bos_token_id=get("bos_token_id", 2),
            eos_token_id=check("config.json: eos_token_id", [eos] if _int(eos) else eos, "ids"),
            dtype=str(tdtype).replace("torch.", ""),
            extra=top,
        )

    def to_hf(self) -> dict[str, Any]:
        """The `config.json` dict (DiffusionGemma top level with a text_config), loadable by transformers."""
        text = {
            "model_type": "diffusion_gemma_text",
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim, "global_head_dim": self.global_head_dim,
            "num_global_key_value_heads": self.num_global_key_value_heads,
            "sliding_window": self.sliding_window, "layer_types": self.layer_types,
            "rope_parameters": {
                SLIDING: {"rope_type": "default", "rope_theta": self.rope_local_theta},
                FULL: {"rope_type": "proportional", "partial_rotary_factor": self.global_partial_rotary_factor,
                       "rope_theta": self.rope_global_theta},
            },
            "num_experts": self.num_experts, "top_k_experts": self.top_k_experts,
            "moe_intermediate_size": self.moe_intermediate_size, "rms_norm_eps": self.rms_norm_eps,
            "final_logit_softcapping": self.final_logit_softcapping,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_activation": "gelu_pytorch_tanh", "attention_bias": False, "attention_dropout": 0.0,
            "tie_word_embeddings": True, "use_bidirectional_attention": "vision",
            "pad_token_id": self.pad_token_id, "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id[0] if self.eos_token_id else None,
        }
        out = {k: v for k, v in self.extra.items() if k not in ("text_config",)}
        out.update({
            "architectures": ["DiffusionGemmaForBlockDiffusion"], "model_type": "diffusion_gemma",
            "canvas_length": self.canvas_length, "eos_token_id": self.eos_token_id,
            "tie_word_embeddings": True, "dtype": self.dtype, "text_config": text,
        })
        return out

    @classmethod
    def from_dir(cls, path: str | Path) -> "ModelConfig":
        p = Path(path) / "config.json"
        if not p.is_file():
            raise ConfigError(f"{p} not found (is {path} a DiffusionGemma checkpoint folder?)")
        try:
            return cls.from_hf(json.loads(p.read_text()))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{p} is not valid JSON: {e}") from None


# The lowest temperature a sampler setting may give: logits / T must stay finite in fp32 (softcapped logits are at
# most 30: 3e5 at this floor; a denormal such as 5e-324 is 0 in fp32, and logits / 0 made NaN entropies and log-
# probabilities). Greedy decoding is the server's temperature 0, or top_k=1.
MIN_TEMPERATURE = 1e-4

# SamplerConfig fields -> kind (see `check`); None disables stability, confidence, eos and pad
_SAMPLER_KINDS = {"max_new_tokens": "pos_int", "max_denoising_steps": "pos_int", "entropy_bound": "pos_num",
                  "t_min": "pos_num", "t_max": "pos_num", "stability_threshold": "id?", "confidence_threshold": "num?",
                  "eos_token_id": "ids?", "pad_token_id": "id?", "top_k": "id", "top_p": "unit"}


@dataclass
class SamplerConfig:
    """Block-diffusion sampler settings (the reference's generation_config.json)."""

    max_new_tokens: int = 256
    max_denoising_steps: int = 48
    entropy_bound: float = 0.1
    t_min: float = 0.4
    t_max: float = 0.8
    stability_threshold: int = 1
    confidence_threshold: float = 0.005
    eos_token_id: list[int] | None = None
    pad_token_id: int | None = 0
    # dgemma's own: truncate each position's distribution (sampling.dropped; 0 / 1 = off), per call. Not part of
    # generation_config.json: the reference's generation config has no such keys (it refuses a file with them; its
    # only logits processor is the temperature schedule), so they are neither read nor written there
    top_k: int = 0
    top_p: float = 1.0

    def validate(self) -> "SamplerConfig":
        """Check every setting (a ConfigError starting with its name); an int eos_token_id becomes a list."""
        if _int(self.eos_token_id):
            self.eos_token_id = [self.eos_token_id]
        for name, kind in _SAMPLER_KINDS.items():
            check(name, getattr(self, name), kind)
        if self.t_max < self.t_min:
            raise ConfigError(f"t_max ({self.t_max}) must be >= t_min ({self.t_min})")
        if self.t_min < MIN_TEMPERATURE:
            raise ConfigError(f"t_min ({self.t_min}) must be >= {MIN_TEMPERATURE} (lower temperatures overflow "
                              "fp32 logits)")
        return self

    @classmethod
    def from_hf(cls, gen: dict[str, Any], model: ModelConfig | None = None) -> "SamplerConfig":
        """Read `generation_config.json`. Null or missing sampler keys take the reference's global defaults;
        eos/pad come from the file alone (missing = none, as the reference does); without a file, from the
        model config."""
        check("generation_config.json", gen, "dict")
        out = cls(eos_token_id=gen.get("eos_token_id"), pad_token_id=gen.get("pad_token_id"))
        if not gen and model is not None:
            out.eos_token_id, out.pad_token_id = list(model.eos_token_id), model.pad_token_id
        sc = check("generation_config.json: sampler_config", gen.get("sampler_config"), "dict?")
        if sc is not None:
            name = sc.get("_cls_name", "EntropyBoundSamplerConfig")
            if name != "EntropyBoundSamplerConfig":
                raise ConfigError(f"generation_config.json: sampler_config {name!r} is not supported")
            if sc.get("entropy_bound") is not None:
                out.entropy_bound = sc["entropy_bound"]
        for key in ("max_new_tokens", "max_denoising_steps", "t_min", "t_max", "stability_threshold",
                    "confidence_threshold"):
            if gen.get(key) is not None:
                setattr(out, key, gen[key])
        if gen.get("cache_implementation") not in (None, "dynamic"):
            raise ConfigError(
                f"generation_config.json: cache_implementation={gen['cache_implementation']!r} is not supported"
            )
        try:
            return out.validate()
        except ConfigError as e:
            raise ConfigError(f"generation_config.json: {e}") from None

    def to_hf(self) -> dict[str, Any]:
        d = asdict(self)
        del d["top_k"], d["top_p"]                  # dgemma's own (the reference refuses a file that has them)
        d["sampler_config"] = {"entropy_bound": d.pop("entropy_bound"), "_cls_name": "EntropyBoundSamplerConfig"}
        d["return_dict_in_generate"] = True
        return d

    @classmethod
    def from_dir(cls, path: str | Path, model: ModelConfig | None = None) -> "SamplerConfig":
        p = Path(path) / "generation_config.json"
        if not p.is_file():
            return cls.from_hf({}, model)
        try:
            return cls.from_hf(json.loads(p.read_text()), model)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{p} is not valid JSON: {e}") from None


# Named shapes (text path only). "26b-a4b" is the published model; the others are for tests, benchmarks and
# the small model that ships with the package.
PRESETS: dict[str, dict[str, Any]] = {
    "26b-a4b": dict(vocab_size=262144, hidden_size=2816, intermediate_size=2112, num_hidden_layers=30,
                    num_attention_heads=16, num_key_value_heads=8, head_dim=256, global_head_dim=512,
                    num_global_key_value_heads=2, sliding_window=1024, num_experts=128, top_k_experts=8,
                    moe_intermediate_size=704, canvas_length=256),
    "100m": dict(vocab_size=32768, hidden_size=512, intermediate_size=1024, num_hidden_layers=12,
                 num_attention_heads=8, num_key_value_heads=4, head_dim=64, global_head_dim=128,
                 num_global_key_value_heads=2, sliding_window=512, num_experts=8, top_k_experts=2,
                 moe_intermediate_size=384, canvas_length=256),
    "small": dict(vocab_size=4096, hidden_size=192, intermediate_size=384, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=48, global_head_dim=96,
                  num_global_key_value_heads=1, sliding_window=64, num_experts=8, top_k_experts=2,
                  moe_intermediate_size=192, canvas_length=32, max_position_embeddings=4096),
    # the CPU measurement in the spec (section 7): H=128, 6 layers (5 sliding, W=64), 16 experts top-4, V=4096
    "tiny": dict(vocab_size=4096, hidden_size=128, intermediate_size=256, num_hidden_layers=6,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=32, global_head_dim=64,
                 num_global_key_value_heads=1, sliding_window=64, num_experts=16, top_k_experts=4,
                 moe_intermediate_size=64, canvas_length=256),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown shape {name!r} (choose from {', '.join(PRESETS)})")
    return ModelConfig(**{**PRESETS[name], **overrides})
