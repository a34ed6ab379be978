import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="session")
def ref_dir(tmp_path_factory):
    """A tiny random reference checkpoint (6 layers, window 8, canvas 16) and the reference model."""
    from refmodels import reference_model, save_reference
    ref = reference_model(0)
    return save_reference(ref, tmp_path_factory.mktemp("tiny")), ref


@pytest.fixture(scope="session")
def peaky_dir(tmp_path_factory):
    """Like ref_dir but with large embeddings, so the denoiser becomes confident and rows stop early."""
    from refmodels import reference_model, save_reference
    ref = reference_model(0)
    with torch.no_grad():
        ref.model.decoder.embed_tokens.weight.mul_(40)
    return save_reference(ref, tmp_path_factory.mktemp("peaky")), ref


@pytest.fixture(scope="session")
def peaky_model(tmp_path_factory):
    """A loaded model that becomes confident (embeddings x8), for engine and server tests."""
    import dgemma
    from refmodels import reference_model, save_reference
    ref = reference_model(0)
    with torch.no_grad():
        ref.model.decoder.embed_tokens.weight.mul_(8)
    return dgemma.load(save_reference(ref, tmp_path_factory.mktemp("peaky8") / "m"), device="cpu")
