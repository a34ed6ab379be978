"""Hugging Face Hub model ids (`owner/name`) wherever a checkpoint folder is accepted.

Never touches the network: a fake hub cache with huggingface_hub's layout is built in a tmp folder and
HF_HUB_OFFLINE is set, so `snapshot_download` can only answer from that cache.
"""
import shutil
import sys
from pathlib import Path

import pytest

import dgemma
from dgemma import CheckpointError, cli
from dgemma.checkpoint import resolve_model

hf = pytest.importorskip("huggingface_hub")
from huggingface_hub import constants as hf_constants  # noqa: E402  (a lazy attribute of the package)

REPO = "owner/name"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """<cache>/models--owner--name/{refs/main, snapshots/<commit>/...} holding the shipped model's files."""
    cache = tmp_path_factory.mktemp("hf_home") / "hub"
    repo = cache / ("models--" + REPO.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)  # no newline, like huggingface_hub writes it
    for f in Path(dgemma.default_model_path()).iterdir():
        if f.is_file():
            shutil.copy(f, snapshot / f.name)
    return cache


@pytest.fixture
def offline(hub_cache, monkeypatch):
    """Point huggingface_hub at the fake cache, offline (env and the constants it read at import time)."""
    monkeypatch.setenv("HF_HOME", str(hub_cache.parent))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HOME", str(hub_cache.parent))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    return hub_cache


def snapshot_of(cache: Path) -> Path:
    return (cache / ("models--" + REPO.replace("/", "--")) / "snapshots" / COMMIT).resolve()


def test_load_hub_id(offline):
    model = dgemma.load(REPO, device="cpu")
    assert Path(model.path).resolve() == snapshot_of(offline)
    tok = dgemma.load_tokenizer(REPO)
    tok2 = dgemma.load_tokenizer(model.path)
    assert tok.encode("hello world") == tok2.encode("hello world") != []


def test_resolve_model(offline, tmp_path):
    assert resolve_model(REPO).resolve() == snapshot_of(offline)
    local = Path(dgemma.default_model_path())
    assert resolve_model(local) == local and resolve_model(str(local)) == local
    with pytest.raises(CheckpointError, match=r"model folder '\./nope' does not exist"):
        resolve_model("./nope")
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_model(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is not a folder"):
        resolve_model(tmp_path / "file")


def test_missing_hub_id(offline):
    with pytest.raises(CheckpointError, match=r"model 'nobody/missing' is not a local folder .*HF_HUB_OFFLINE") as e:
        dgemma.load("nobody/missing")
    assert "download nobody/missing" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="nobody/missing"):
        dgemma.load_tokenizer("nobody/missing")


def test_without_huggingface_hub(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # `import huggingface_hub` -> ImportError
    with pytest.raises(CheckpointError, match=r"'owner/name' is not a local folder.*pip install huggingface_hub"):
        resolve_model(REPO)


def test_cli_hub_id(offline, capsys):
    assert cli.main(["info", "--model", REPO]) == 0
    capsys.readouterr()
    assert cli.main(["info", "--model", "nobody/missing"]) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dgemma: error: model 'nobody/missing'"), err
    assert "Traceback" not in err and out == ""
