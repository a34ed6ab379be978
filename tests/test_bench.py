"""`dgemma bench` runs end to end on a tiny checkpoint (a smoke test: numbers are not checked)."""
import json

import dgemma
from dgemma.cli import main

from test_cache import model


def test_bench_smoke(tmp_path):
    path = dgemma.save(model(), tmp_path / "m")
    out = tmp_path / "bench"
    assert main(["bench", "--model", str(path), "--steps", "2", "--prompt-len", "5", "--ar-tokens", "4",
                 "--threads", "1", "--out", str(out)]) == 0
    rep = json.loads((out / "bench.json").read_text())
    for system in ("dgemma", "dgemma-fast", "reference", "ar"):
        assert rep["results"][system]["tokens_per_s"] > 0, rep["results"][system]
    assert rep["results"]["dgemma"]["decoder_passes"] == 2
    assert (out / "bench.png").exists()


def test_bench_engine_system(tmp_path):
    """The engine system serves `batch` requests at the fixed step count: same passes and new tokens as generate."""
    path = dgemma.save(model(), tmp_path / "m")
    out = tmp_path / "bench"
    assert main(["bench", "--model", str(path), "--steps", "3", "--prompt-len", "5", "--batch", "2",
                 "--canvases", "2", "--threads", "1", "--systems", "dgemma,engine", "--out", str(out)]) == 0
    res = json.loads((out / "bench.json").read_text())["results"]
    assert res["engine"]["decoder_passes"] == res["dgemma"]["decoder_passes"] == 6
    assert res["engine"]["sampler"] == "exact" and res["engine"]["tokens_per_s"] > 0
