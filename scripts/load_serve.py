"""Load test for `dgemma serve`: N concurrent streaming chat clients (the official `openai` AsyncOpenAI client).

    python scripts/load_serve.py                          # starts its own server (--max-batch 16 --max-queue 256)
    python scripts/load_serve.py --url http://127.0.0.1:8811 --clients 64 --json load.json

Each client sends one chat request (stream=True, include_usage, max_tokens, max_denoising_steps via extra_body,
its own seed). A request counts as dropped on any exception (an error event raises one), no finish_reason or
no usage chunk (the last before [DONE]: the openai client hides [DONE] itself), completion_tokens !=
max_tokens when finish_reason is "length", or not finishing within --timeout. Reports completed / dropped, wall time,
aggregate completion tokens/s, p50/p95 time to first content chunk and total latency. Exit 1 if any dropped.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

from openai import AsyncOpenAI


def start_server(log) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "dgemma.cli", "serve", "--port", str(port), "--max-batch", "16",
                             "--max-queue", "256"], env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=log, stderr=subprocess.STDOUT)
    for _ in range(240):
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if urllib.request.urlopen(url + "/health", timeout=2).status == 200:
                return proc, url
        except OSError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("server did not become ready")


def record(i: int, error: str | None = None) -> dict:
    return {"client": i, "ok": False, "ttfc": None, "latency": None, "tokens": 0, "finish": None, "error": error}


async def one(client: AsyncOpenAI, model: str, i: int, args) -> dict:
    t0 = time.perf_counter()
    r = record(i)
    finish, usage = None, None
    try:
        stream = await client.chat.completions.create(
            model=model, stream=True, stream_options={"include_usage": True}, max_tokens=args.max_tokens, seed=i,
            messages=[{"role": "user", "content": f"Tell me a short story about the number {i}."}],
            extra_body={"max_denoising_steps": args.steps})
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for c in chunk.choices:
                if c.delta.content and r["ttfc"] is None:
                    r["ttfc"] = time.perf_counter() - t0
                finish = c.finish_reason or finish
        r["latency"] = time.perf_counter() - t0
        r["tokens"], r["finish"] = (usage.completion_tokens if usage else 0), finish
        if finish is None or usage is None:
            r["error"] = f"missing {'finish_reason' if finish is None else 'usage'} (no [DONE]?)"
        elif finish == "length" and usage.completion_tokens != args.max_tokens:
            r["error"] = f"finish=length but completion_tokens={usage.completion_tokens} != {args.max_tokens}"
        else:
            r["ok"] = True
    except Exception as e:                      # error events surface as openai.APIError from the stream
        r["error"] = f"{type(e).__name__}: {e}"[:300]
    return r


def pct(xs: list[float], q: float) -> float | None:
    xs = sorted(x for x in xs if x is not None)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None


async def run(args, url: str) -> list[dict]:
    client = AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=args.timeout)
    model = (await client.models.list()).data[0].id
    tasks = [asyncio.create_task(one(client, model, i, args)) for i in range(args.clients)]
    done, pending = await asyncio.wait(tasks, timeout=args.timeout)
    for t in pending:
        t.cancel()
    res = [t.result() if t in done else record(i, f"not done within --timeout {args.timeout}s")
           for i, t in enumerate(tasks)]
    await client.close()
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--steps", type=int, default=8, help="max_denoising_steps (extra body field)")
    ap.add_argument("--url", help="a running server (default: start one on a free port)")
    ap.add_argument("--timeout", type=float, default=300, help="total time limit, seconds")
    ap.add_argument("--json", metavar="FILE", help="also write the summary and per-request results here")
    args = ap.parse_args()
    log = None if args.url else tempfile.NamedTemporaryFile("w", prefix="load_serve_", suffix=".log", delete=False)
    proc, url = (None, args.url.rstrip("/")) if args.url else start_server(log)
    try:
        t0 = time.perf_counter()
        res = asyncio.run(run(args, url))
        wall = time.perf_counter() - t0
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    ok = [r for r in res if r["ok"]]
    tokens = sum(r["tokens"] for r in res)
    summary = {"clients": args.clients, "max_tokens": args.max_tokens, "steps": args.steps,
               "completed": len(ok), "dropped": len(res) - len(ok), "wall_s": round(wall, 2),
               "completion_tokens": tokens, "finish_stop": sum(r["finish"] == "stop" for r in res), "tokens_per_s": round(tokens / wall, 1),
               "ttfc_p50_s": pct([r["ttfc"] for r in ok], 0.5), "ttfc_p95_s": pct([r["ttfc"] for r in ok], 0.95),
               "latency_p50_s": pct([r["latency"] for r in ok], 0.5),
               "latency_p95_s": pct([r["latency"] for r in ok], 0.95)}
    for k, v in summary.items():
        print(f"{k:18s} {round(v, 2) if isinstance(v, float) else v}")
    errors: dict[str, int] = {}
    for r in res:
        if not r["ok"]:
            errors[r["error"]] = errors.get(r["error"], 0) + 1
    for e, n in errors.items():
        print(f"dropped x{n}: {e}")
    if log is not None:
        print(f"server log: {log.name}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "requests": res}, f, indent=1)
    return 1 if len(ok) < len(res) else 0


if __name__ == "__main__":
    sys.exit(main())
