"""`dgemma bench` runs end to end on a tiny checkpoint (a smoke test: numbers are not checked)."""
import json

import pytest

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
    ar = rep["results"]["ar"]       # one-token steps timed apart from the prompt's pass: 3 of them in the total
    assert 0 < 3 * ar["decode_step_ms"] < 1000 * ar["total_s"]
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


def test_bench_runs_the_reference_like_dgemma(tmp_path, capsys):
    """The reference computes in dgemma's dtype (by default what dgemma.load picks: fp32 for the shipped model on
    a CPU, though it is stored in bf16) with the checkpoint's sampler settings: with the early stop on, both make
    the same decoder passes."""
    pytest.importorskip("transformers.models.diffusion_gemma")
    out = tmp_path / "bench"
    assert main(["bench", "--systems", "dgemma,reference", "--adaptive", "--canvases", "3", "--prompt-len", "16",
                 "--steps", "8", "--threads", "1", "--out", str(out)]) == 0
    rep = json.loads((out / "bench.json").read_text())
    res = rep["results"]
    assert rep["setup"]["dtype"] == "float32"
    assert res["dgemma"]["decoder_passes"] == res["reference"]["decoder_passes"] < 3 * 8, res


def test_bench_errors_are_one_line(tmp_path, capsys):
    m = model()
    path = dgemma.save(m, tmp_path / "m")
    q = tmp_path / "q"
    assert main(["quantize", str(path), str(q), "--weights", "int8"]) == 0
    capsys.readouterr()
    assert main(["bench", "--model", str(q), "--systems", "reference", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "cannot read a dgemma-quantized folder" in err and "nothing left to run" in err
    for argv, what in ((["--shape", "bogus"], "--shape"), (["--threads", "0"], "--threads"),
                       (["--model", str(path), "--prompt-len", str(m.config.max_position_embeddings)], "context")):
        assert main(["bench", *argv, "--systems", "dgemma", "--out", str(tmp_path / "b")]) == 2
        assert what in capsys.readouterr().err
    bad = tmp_path / "bad"                      # fails inside the worker: its exception as one line
    bad.mkdir()
    for f in path.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((bad / "config.json").read_text())
    cfg["text_config"]["intermediate_size"] += 8    # the weights no longer fit it: load fails
    (bad / "config.json").write_text(json.dumps(cfg))
    assert main(["bench", "--model", str(bad), "--systems", "dgemma", "--out", str(tmp_path / "b")]) == 1
    line = next(ln for ln in capsys.readouterr().out.splitlines() if "error" in ln)
    assert "CheckpointError" in line and "File " not in line and "|" not in line


def test_roofline_counts_every_weight_and_the_forward_macs():
    """scripts/roofline.py: the weights a pass reads (all experts) are the model's parameters (norms and scalars
    aside); an AR step reads only k experts per layer; its per-token MACs are what a hooked forward's matmuls do."""
    import importlib.util
    import os

    import torch

    from dgemma.config import preset
    from dgemma.model import DiffusionGemma

    spec = importlib.util.spec_from_file_location(
        "roofline", os.path.join(os.path.dirname(__file__), "..", "scripts", "roofline.py"))
    roofline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(roofline)
    cfg = preset("small", num_hidden_layers=6, layer_types=[])
    params = sum(p.numel() for n, p in DiffusionGemma(cfg).named_parameters() if p.dim() >= 2)
    assert roofline.weight_bytes(cfg, 256, denoiser=True) == 2 * params
    expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    assert roofline.weight_bytes(cfg, 1, denoiser=False) == 2 * (
        params - cfg.num_hidden_layers * (cfg.num_experts - cfg.top_k_experts) * expert - 3 * cfg.hidden_size
        * cfg.intermediate_size)
    # the matmuls of one encoder token at position 0 (it sees 1 key): every linear, the k experts, the head
    macs = []
    m = DiffusionGemma(cfg).eval()
    linear, grouped = torch.nn.functional.linear, torch._grouped_mm
    torch.nn.functional.linear = lambda x, w, b=None: macs.append(x.shape[:-1].numel() * w.numel()) or linear(x, w, b)
    torch._grouped_mm = lambda x, w, **kw: macs.append(x.shape[0] * w[0].numel()) or grouped(x, w, **kw)   # experts
    try:
        with torch.no_grad():
            m.head(m.encode(torch.tensor([[5]]), m.new_cache(1, 4)))
    finally:
        torch.nn.functional.linear, torch._grouped_mm = linear, grouped
    counted, _ = roofline.per_token_macs(cfg, 1, denoiser=False)
    attention = sum(2 * cfg.num_attention_heads * cfg.layer_head_dim(i) for i in range(cfg.num_hidden_layers))
    assert sum(macs) == counted - attention


def test_gpu_report_judges_the_targets_from_bench_output(tmp_path, capsys, monkeypatch):
    """scripts/gpu_report.py on real `dgemma bench` output (tiny shape, CPU): a row per system and run, each target
    judged from the numbers in the files (ratios within one run), missing inputs said to be missing."""
    import importlib.util
    import os
    import re
    import sys

    spec = importlib.util.spec_from_file_location(
        "gpu_report", os.path.join(os.path.dirname(__file__), "..", "scripts", "gpu_report.py"))
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    for run, batch in (("b1", 1), ("b32", 2)):      # as two gpu_bench.sh stages would bring them back
        assert main(["bench", "--shape", "tiny", "--dtype", "float32", "--steps", "2", "--prompt-len", "5",
                     "--ar-tokens", "4", "--batch", str(batch), "--threads", "1", "--systems",
                     "dgemma-fast,engine,ar", "--out", str(tmp_path / f"stage_{run}" / run)]) == 0
    runs = report.load(tmp_path / "stage_b1", tmp_path / "stage_b32")
    assert set(runs) == {"b1", "b32"}
    rows = {t[0]: t for t in report.targets(runs)}
    ar_row = rows["AR step, batch 1 (one-token steps, ms each)"]
    assert ar_row[2].startswith(f"{runs['b1']['ar']['decode_step_ms']:.2f} ")
    fast = runs["b1"]["dgemma-fast"]
    step = rows["batch 1 decoder pass"]
    assert step[2].startswith(f"{fast['step_ms']:.1f} ") and step[3] == ("met" if fast["step_ms"] <= 15 else "NOT met")
    assert rows["batch 1 vs the reference (same run)"][2] == "not measured"        # no reference in these runs
    engine = [t for name, t in rows.items() if name.startswith("Engine / generate")]
    assert len(engine) == 2
    for t, run in zip(engine, ("b1", "b32")):
        r = runs[run]
        v = r["engine"]["tokens_per_s"] / r["dgemma-fast"]["tokens_per_s"]
        assert t[2].startswith(f"{v:.3f}") and t[3] == ("met" if v >= 0.95 else "NOT met")
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["gpu_report.py", str(tmp_path / "stage_b1"), str(tmp_path / "stage_b32")])
    report.main()
    out = capsys.readouterr().out
    assert len(re.findall(r"^\| batch (1|32), default \| (dgemma-fast|engine|ar) \|", out, re.M)) == 6


def test_gpu_profile_runs_every_line_on_the_cpu(tmp_path):
    """scripts/gpu_profile.py (the GPU session's diagnostics) as a smoke run on the CPU, a 2-layer tiny shape, its
    Triton kernels interpreted: it ends cleanly, with both paths' step times, kernel counts and tables, graph replay
    (eager on the CPU) equal to the eager step, the fp32 static plan equal to the dynamic one, and no timing that
    failed. (It found a model made in inference mode failing at its packed q/k/v weights before any GPU did.)"""
    import os
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "1", "OUT": str(tmp_path), "PYTHONPATH": "src"}
    over = ("canvas_length=16", "num_hidden_layers=2", "num_experts=4", "top_k_experts=2")
    r = subprocess.run([sys.executable, "scripts/gpu_profile.py", "--device", "cpu", "--shape", "tiny",
                        "--prompt-len", "8", *[a for o in over for a in ("--override", o)]],
                       capture_output=True, text=True, timeout=600, env=env,
                       cwd=os.path.join(os.path.dirname(__file__), ".."))
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((tmp_path / "profile_b1.json").read_text())
    assert rep["gpu"] == "cpu" and rep["overrides"]["num_hidden_layers"] == 2
    assert rep["fp32_static_vs_dynamic_rel_err"] < 1e-4 and rep["bf16_static_repeat_equal"]
    for mode in ("fused", "torch"):
        assert rep[f"{mode}_graph_equals_eager"]
        assert rep[f"{mode}_graph_step_ms"] > 0 and rep[f"{mode}_denoise_step_kernels"] > 0
        assert rep[f"{mode}_ar_step_kernels"] > 0 and rep[f"{mode}_ar_ms_per_token_with_prefill"] > 0
        assert (tmp_path / f"profile_b1_{mode}.txt").exists() and (tmp_path / f"profile_ar_b1_{mode}.txt").exists()
    for key in ("fused_moe_T16_ms", "fused_head_and_sampler_chunk_ms", "attn_global_q16_L32_default_folded_ms"):
        assert isinstance(rep[key], float), (key, rep[key])
    assert not [k for k, v in rep.items() if isinstance(v, str) and v.startswith("failed")]


@pytest.mark.slow
def test_gpu_bench_script_dry_run_on_the_cpu(tmp_path):
    """scripts/gpu_bench.sh, both stages in one call, as a dry run on the CPU (tiny shape; ~90 s, so not in CI: run
    it before spending device time, `pytest -m slow -k dry_run`): every step runs and ends cleanly, every file the
    report and the notes need is written, and the report judges the targets from them."""
    import os
    import subprocess

    env = {**os.environ, "OUT": str(tmp_path), "DEVICE": "cpu", "SHAPE": "tiny", "STAGE": "all", "DEADLINE": "900",
           "PROFILE_ARGS": "--override canvas_length=16 --override num_hidden_layers=2 --prompt-len 8"}
    r = subprocess.run(["bash", "scripts/gpu_bench.sh"], capture_output=True, text=True, timeout=1200, env=env,
                       cwd=os.path.join(os.path.dirname(__file__), ".."))
    assert r.returncode == 0, r.stderr[-3000:]
    for step in ("GPU tests", "batch 1, DGEMMA_FUSED=all", "batch 32, DGEMMA_FUSED=all", "batch 1, default path",
                 "batch 32, default path", "step diagnostics", "batch 32 step kernels"):
        assert f"== {step} (up to" in r.stdout, step
    assert "ended with status" not in r.stdout and "SKIPPED" not in r.stdout, r.stdout[-3000:]
    for f in ("b1_fused", "b32_fused", "b1", "b32"):
        assert (tmp_path / f / "bench.json").exists(), f
    for f in ("gpu_tests.txt", "profile_b1.json", "profile_b32.json", "profile_b1_fused.txt", "profile_b32_torch.txt"):
        assert (tmp_path / f).exists(), f
    assert "| batch 1 decoder pass | <= 15 ms |" in r.stdout
