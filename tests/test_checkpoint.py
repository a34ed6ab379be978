"""Checkpoint folders: sharded round trip, clear errors, vision tensors never read, config validation."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import dgemma
from dgemma.checkpoint import CheckpointError
from dgemma.config import ConfigError, ModelConfig, SamplerConfig

from test_cache import model


@pytest.fixture
def folder(tmp_path):
    m = model()
    return dgemma.save(m, tmp_path / "m"), m


def test_sharded_round_trip(tmp_path):
    m = model()
    path = dgemma.save(m, tmp_path / "sharded", max_shard_bytes=20_000)
    assert (path / "model.safetensors.index.json").exists() and len(list(path.glob("*.safetensors"))) > 3
    back = dgemma.load(path)
    for (n, a), (_, b) in zip(m.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), n
    ids = torch.randint(2, 64, (1, 9))
    assert torch.equal(back.encoder_logits(ids), m.encoder_logits(ids))
    assert back.sampler_config == m.sampler_config


def test_generation_config_keeps_to_the_reference_keys(folder):
    """top_k / top_p are per-call settings: a saved generation_config.json has only the keys the reference's
    DiffusionGemmaGenerationConfig takes (it refuses others), which it then loads."""
    path, _ = folder
    gen = json.loads((path / "generation_config.json").read_text())
    assert "top_k" not in gen and "top_p" not in gen
    assert "top_k" not in SamplerConfig(top_k=5, top_p=0.5).to_hf()
    transformers = pytest.importorskip("transformers")
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import DiffusionGemmaGenerationConfig
    cfg = DiffusionGemmaGenerationConfig.from_pretrained(path)
    assert cfg.max_denoising_steps == SamplerConfig.from_dir(path).max_denoising_steps
    del transformers


def test_dtype_choice(folder):
    path, _ = folder
    assert dgemma.load(path).dtype == torch.float32
    assert dgemma.load(path, dtype="bfloat16").dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="unsupported dtype"):
        dgemma.load(path, dtype="int3")


def test_missing_and_misshaped_tensors(folder, tmp_path):
    path, m = folder
    from safetensors.torch import load_file
    sd = load_file(str(path / "model.safetensors"))
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    sd2 = dict(sd)
    del sd2["model.decoder.layers.1.mlp.up_proj.weight"]
    save_file(sd2, str(broken / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.decoder\.layers\.1\.mlp\.up_proj\.weight is missing"):
        dgemma.load(broken)
    sd3 = dict(sd)
    sd3["model.decoder.norm.weight"] = torch.ones(31)
    save_file(sd3, str(broken / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"norm\.weight has shape \[31\], expected \[32\]"):
        dgemma.load(broken)


def test_folder_errors(tmp_path, folder):
    with pytest.raises(CheckpointError, match="does not exist"):
        dgemma.load(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="config.json"):
        dgemma.load(empty)
    path, _ = folder
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(path / "config.json", pickled / "config.json")
    (pickled / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="never loaded"):
        dgemma.load(pickled)
    shards = tmp_path / "shards"
    shutil.copytree(path, shards)
    (shards / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "gone.safetensors"}}))
    with pytest.raises(CheckpointError, match="gone.safetensors"):
        dgemma.load(shards)


def test_vision_tensors_are_never_read(folder, monkeypatch):
    path, _ = folder
    from safetensors.torch import load_file
    sd = load_file(str(path / "model.safetensors"))
    sd["model.encoder.vision_tower.encoder.layers.0.mlp.up_proj.linear.weight"] = torch.randn(8, 8)
    sd["model.encoder.embed_vision.embedding_projection.weight"] = torch.randn(32, 8)
    save_file(sd, str(path / "model.safetensors"))
    import dgemma.checkpoint as ck
    read = []
    real = ck.read_tensor

    def spy(fn, info, dtype, device):
        read.append(info)
        return real(fn, info, dtype, device)

    monkeypatch.setattr(ck, "read_tensor", spy)
    n_text = len(ck.read_header(path / "model.safetensors")) - 2
    dgemma.load(path)
    assert len(read) == n_text            # every text tensor once, neither vision tensor


def test_unsupported_settings_name_the_setting():
    base = json.loads(json.dumps(ModelConfig(num_hidden_layers=2, layer_types=[]).to_hf()))
    for key, value, word in [("hidden_activation", "relu", "hidden_activation"),
                             ("use_bidirectional_attention", "all", "use_bidirectional_attention"),
                             ("num_experts", None, "num_experts"),
                             ("attention_bias", True, "attention_bias")]:
        cfg = json.loads(json.dumps(base))
        cfg["text_config"][key] = value
        with pytest.raises(ConfigError, match=word):
            ModelConfig.from_hf(cfg)
    with pytest.raises(ConfigError, match="sampler_config"):
        SamplerConfig.from_hf({"sampler_config": {"_cls_name": "TopKSamplerConfig"}})
    with pytest.raises(ConfigError, match="max_denoising_steps"):
        SamplerConfig.from_hf({"max_denoising_steps": 0})


def test_published_config_keys():
    """The published config.json stores global_head_dim / num_global_key_value_heads as plain keys."""
    cfg = {"model_type": "diffusion_gemma", "canvas_length": 256, "eos_token_id": [1, 106, 50],
           "text_config": {"vocab_size": 262144, "hidden_size": 2816, "intermediate_size": 2112,
                           "num_hidden_layers": 30, "num_attention_heads": 16, "num_key_value_heads": 8,
                           "head_dim": 256, "global_head_dim": 512, "num_global_key_value_heads": 2,
                           "sliding_window": 1024, "num_experts": 128, "top_k_experts": 8,
                           "moe_intermediate_size": 704, "use_bidirectional_attention": "vision"}}
    c = ModelConfig.from_hf(cfg)
    assert (c.global_head_dim, c.num_global_key_value_heads, c.layer_types.count("full_attention")) == (512, 2, 5)
    assert c.eos_token_id == [1, 106, 50] and c.num_parameters()["total"] == 25_250_986_782
    gen = SamplerConfig.from_hf({"max_new_tokens": 256, "max_denoising_steps": 48, "t_min": 0.4, "t_max": 0.8,
                                 "sampler_config": {"_cls_name": "EntropyBoundSamplerConfig",
                                                    "entropy_bound": 0.1},
                                 "stability_threshold": 1, "confidence_threshold": 0.005,
                                 "eos_token_id": [1, 106, 50], "pad_token_id": 0}, c)
    assert gen.entropy_bound == 0.1 and gen.max_denoising_steps == 48


def test_loading_needs_about_one_copy_of_the_weights(tmp_path):
    """Tensors are streamed one by one: peak memory stays near one copy of the checkpoint."""
    import subprocess
    import sys
    cfg = ModelConfig(vocab_size=32768, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, global_head_dim=64,
                      num_global_key_value_heads=1, sliding_window=64, num_experts=16, top_k_experts=2,
                      moe_intermediate_size=512, canvas_length=16, dtype="float32")
    with torch.device("meta"):
        m = dgemma.DiffusionGemma(cfg)
    m = m.to_empty(device="cpu")
    for p in m.parameters():
        p.data.normal_()
    path = dgemma.save(m, tmp_path / "big")
    size = (path / "model.safetensors").stat().st_size
    del m
    code = ("import sys, torch, dgemma\n"
            "def kb(key):\n"
            "    return int(open('/proc/self/status').read().split(key + ':')[1].split()[0])\n"
            f"cfg = dgemma.ModelConfig.from_dir({str(path)!r})\n"
            "with torch.device('meta'):\n"
            "    dgemma.DiffusionGemma(cfg)   # one-time torch start-up costs (~70 MB), not weights\n"
            "before = kb('VmRSS')\n"
            f"m = dgemma.load({str(path)!r})\n"
            "total = sum(float(p.sum()) for p in m.parameters())   # touch every weight\n"
            "print(kb('VmHWM') - before, kb('VmRSS') - before)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    peak, now = (int(x) * 1024 for x in out.stdout.split())
    assert size > 100e6
    assert now > 0.8 * size, (now / size)          # the measurement sees the weights
    assert peak < 1.2 * size, (peak / size)        # and never a second copy


def test_loading_does_not_import_torch_dynamo():
    """dgemma.load builds the model on the meta device: nn.Embedding's normal_ init there made torch import
    torch._dynamo (~1 s, most of the shipped model's load), so the embedding skips it on meta. A fresh process."""
    import subprocess
    import sys
    code = ("import sys, dgemma\n"
            "m = dgemma.load(dgemma.default_model_path(), device='cpu')\n"
            "print(sorted(k for k in sys.modules if k.startswith('torch._dynamo'))[:3])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
    with torch.device("meta"):
        meta = dgemma.model.Embedding(8, 4)
    torch.manual_seed(0)
    real = dgemma.model.Embedding(64, 32)                  # elsewhere the usual N(0, 1) init
    assert meta.weight.is_meta and 0.8 < float(real.weight.detach().std()) < 1.2


def changed(doc, key: str, value):
    """A copy of the JSON `doc` with the dotted `key` set to `value` (key "": the whole file is `value`)."""
    if not key:
        return value
    out = json.loads(json.dumps(doc))
    *parents, last = key.split(".")
    node = out
    for p in parents:
        node = node[p]
    node[last] = value
    return out


def shipped(name: str) -> dict:
    return json.loads((Path(dgemma.default_model_path()) / name).read_text())


@pytest.mark.parametrize("key, value, message", [
    ("", [1, 2], "config.json must be a JSON object (got [1, 2])"),
    ("text_config", 5, "config.json: text_config must be a JSON object (got 5)"),
    ("text_config.hidden_size", "abc", "config.json: text_config.hidden_size must be a positive integer (got 'abc')"),
    ("text_config.num_hidden_layers", 4.0, "text_config.num_hidden_layers must be a positive integer"),
    ("text_config.rms_norm_eps", "1e-6", "text_config.rms_norm_eps must be a positive number"),
    ("text_config.attention_bias", "no", "text_config.attention_bias must be true or false"),
    ("text_config.layer_types", "full_attention", "text_config.layer_types must be a list of strings"),
    ("text_config.rope_parameters.full_attention.rope_theta", "1e6", "full_attention.rope_theta must be a positive"),
    ("text_config.per_layer_config", {"3": 7}, "text_config.per_layer_config.3 must be a JSON object"),
    ("canvas_length", -4, "config.json: canvas_length must be a positive integer (got -4)"),
    ("canvas_length", 0, "config.json: canvas_length must be a positive integer (got 0)"),
    ("eos_token_id", "1", "config.json: eos_token_id must be a list of integers >= 0"),
])
def test_config_json_of_the_wrong_shape(key, value, message):
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_hf(changed(shipped("config.json"), key, value))
    assert message in str(e.value)


def test_config_null_takes_the_default():
    assert ModelConfig.from_hf(changed(shipped("config.json"), "canvas_length", None)).canvas_length == 256
    with pytest.raises(ConfigError, match="hidden_size must be a positive integer"):
        ModelConfig(hidden_size="abc")               # the Python API checks the same kinds


@pytest.mark.parametrize("key, value, message", [
    ("", [1, 2], "generation_config.json must be a JSON object (got [1, 2])"),
    ("t_min", "0.1", "generation_config.json: t_min must be a positive number (got '0.1')"),
    ("confidence_threshold", "a", "generation_config.json: confidence_threshold must be a number >= 0"),
    ("eos_token_id", "1", "generation_config.json: eos_token_id must be a list of integers >= 0 (got '1')"),
    ("sampler_config", 5, "generation_config.json: sampler_config must be a JSON object (got 5)"),
    ("sampler_config.entropy_bound", "0.1", "generation_config.json: entropy_bound must be a positive number"),
    ("max_new_tokens", 2.5, "generation_config.json: max_new_tokens must be a positive integer"),
    ("stability_threshold", True, "generation_config.json: stability_threshold must be an integer >= 0"),
])
def test_generation_config_json_of_the_wrong_shape(key, value, message):
    with pytest.raises(ConfigError) as e:
        SamplerConfig.from_hf(changed(shipped("generation_config.json"), key, value))
    assert message in str(e.value)


def safetensors_bytes(header, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + data


@pytest.mark.parametrize("name, content, message", [
    ("model.safetensors", bytes(range(256)) * 4, "header length"),                # random bytes: a huge length
    ("model.safetensors", safetensors_bytes([1, 2, 3]), "header is not a JSON object"),
    ("model.safetensors", safetensors_bytes({"a": 5}), "header entry a must be a JSON object"),
    ("model.safetensors", safetensors_bytes({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"x" * 8),
     "a: shape must be a list of integers >= 0"),
    ("model.safetensors", safetensors_bytes({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"x" * 8),
     "is truncated or corrupt (tensor a"),
    ("model.safetensors.index.json", b'{"weight_map": ["a"]}', "weight_map must be a JSON object"),
    ("model.safetensors.index.json", b'[1]', "weight_map must be a JSON object"),
    ("model.safetensors.index.json", b'{"weight_map": {"a": 1}}', "weight_map must be a JSON object"),
], ids=["random", "list-header", "entry", "shape", "offsets", "index-list", "index-top-list", "index-values"])
def test_corrupt_weight_files(folder, tmp_path, name, content, message):
    path, _ = folder
    (path / name).write_bytes(content)
    with pytest.raises(CheckpointError) as e:
        dgemma.load(path)
    assert message in str(e.value)


def test_byte_size_is_checked_before_allocating(tmp_path):
    from dgemma.checkpoint import read_header, read_tensor
    fn = tmp_path / "x.safetensors"
    fn.write_bytes(safetensors_bytes({"a": {"dtype": "F32", "shape": [10 ** 12], "data_offsets": [0, 8]}}, b"x" * 8))
    with pytest.raises(CheckpointError, match="byte size does not match"):
        read_tensor(fn, read_header(fn)["a"], None, torch.device("cpu"))


def test_dtype_must_be_a_compute_dtype(folder):
    path, _ = folder
    for dtype in (torch.int8, torch.float64, "torch.int8"):
        with pytest.raises(ConfigError, match="unsupported dtype.*choose from float32, bfloat16, float16"):
            dgemma.load(path, dtype=dtype)
    assert dgemma.load(path, dtype=torch.float16).dtype == torch.float16


def test_quantize_output_path_errors(folder, tmp_path, monkeypatch):
    import dgemma.checkpoint as ck
    path, _ = folder
    (tmp_path / "afile").write_text("x")
    with pytest.raises(CheckpointError, match="afile is an existing file"):
        ck.quantize_folder(path, tmp_path / "afile", "int8", progress=False)
    with pytest.raises(CheckpointError, match="empty output folder path"):
        ck.quantize_folder(path, "", "int8", progress=False)
    with pytest.raises(CheckpointError, match="empty model path"):
        ck.resolve_model("")

    def disk_full(*args):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(ck, "_write_safetensors", disk_full)
    with pytest.raises(OSError, match="No space"):
        ck.quantize_folder(path, tmp_path / "new" / "deep" / "out", "int8", progress=False)
    assert not (tmp_path / "new").exists()            # the folders it made are gone again
    (tmp_path / "kept").mkdir()
    with pytest.raises(OSError, match="No space"):
        ck.quantize_folder(path, tmp_path / "kept" / "deep" / "out", "int8", progress=False)
    assert list((tmp_path / "kept").iterdir()) == []  # but not one that was there before
