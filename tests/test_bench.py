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
