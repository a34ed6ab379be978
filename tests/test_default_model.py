"""The model that ships inside the package: present, small, loads, and continues English text."""
from pathlib import Path


import dgemma
from dgemma.cli import main


def test_shipped_model_folder():
    path = Path(dgemma.default_model_path())
    size = sum(f.stat().st_size for f in path.iterdir())
    assert size < 20e6
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "README.md"):
        assert (path / name).is_file(), name
    m = dgemma.load(path, dtype="float32")
    c = m.config
    assert c.num_experts > 1 and "sliding_attention" in c.layer_types and "full_attention" in c.layer_types


def test_shipped_model_writes_english(capsys):
    assert main(["generate", "--seed", "0", "--max-new-tokens", "48", "The old house at the end of the street"]) == 0
    text = capsys.readouterr().out
    words = text.split()
    assert len(words) >= 5
    assert sum(w.strip(".,;:!?'\"").isalpha() for w in words) >= 0.6 * len(words)
    common = {"the", "and", "of", "to", "a", "in", "was", "he", "she", "it", "that", "his", "her", "with"}
    assert any(w.lower().strip(".,;:") in common for w in words)
