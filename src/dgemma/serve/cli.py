"""`dgemma serve`: arguments, checks that fail fast (before listening), and uvicorn with a graceful stop.

Knows: the command line, that the server extra may be missing, that SIGTERM / Ctrl-C should end in-flight
requests with an error event and exit 0. Imports FastAPI and uvicorn only when the command runs.
"""
from __future__ import annotations

import argparse
import logging
import os
import socket
import threading


def add_serve(sub) -> None:
    from dgemma.cli import _positive, add_weights_args
    p = sub.add_parser("serve", help="serve a model behind an OpenAI-compatible HTTP API",
                       description="Serve a model behind an OpenAI-compatible HTTP API (chat and text completions, "
                                   "streaming, continuous batching, multi-turn prefix reuse, /metrics).")
    p.add_argument("--model", metavar="PATH_OR_ID",
                   help="checkpoint folder or Hugging Face hub id (default: the model shipped with dgemma)")
    p.add_argument("--served-model-name", metavar="NAME",
                   help="the model id clients send (default: the folder name or hub id; dgemma-default for the "
                        "shipped model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", metavar="KEY", help="require 'Authorization: Bearer KEY' (default: $DGEMMA_API_KEY)")
    p.add_argument("--max-batch", type=_positive, default=8, metavar="N", help="requests denoised at once (default 8)")
    p.add_argument("--max-queue", type=_positive, default=64, metavar="N",
                   help="requests waiting for a batch row before new ones get 429 (default 64)")
    p.add_argument("--device", metavar="DEV", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    add_weights_args(p)
    p.add_argument("--sampler", choices=("auto", "exact", "fast"), default="fast",
                   help="fast (default): one random number per position, CUDA graphs on a GPU; exact: the "
                        "reference's random stream (seeded CPU fp32 runs match transformers; slower when batched); "
                        "auto: exact on the CPU in float32, fast elsewhere. Seeds reproduce with either")
    p.add_argument("--prefill-chunk", type=_positive, default=256, metavar="N",
                   help="prompts are encoded N tokens per engine step; also the prefix-reuse granularity "
                        "(default 256)")
    p.add_argument("--prefix-cache-mb", type=int, default=1024, metavar="MB",
                   help="memory for reusable prompt prefixes (multi-turn chats); 0 turns reuse off (default 1024)")
    p.add_argument("--max-denoising-steps", type=_positive, default=256, metavar="N",
                   help="largest max_denoising_steps a request may ask for (bounds one request's work; default 256)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.set_defaults(run=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from dgemma.cli import UsageError, _device, _model_dir, check_weights_args
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise UsageError(f"dgemma serve needs the server extra ({e.name} is missing): pip install 'dgemma[serve]'")
    if not 0 <= args.port < 65536:
        raise UsageError(f"--port must be in 0..65535 (got {args.port})")
    if args.prefix_cache_mb < 0:
        raise UsageError("--prefix-cache-mb must be >= 0")
    check_weights_args(args)
    path = _model_dir(args.model)
    _device(args.device)
    from dgemma.config import ModelConfig
    from dgemma.tokenizer import Tokenizer
    ModelConfig.from_dir(path)                       # config and tokenizer errors: one line, before listening
    Tokenizer.from_dir(path)
    sock = _listen(args.host, args.port)             # a port in use: one line, before the model loads
    from .app import Metrics, ServeConfig, State, create_app, start_loading
    name = args.served_model_name or (args.model if args.model and not os.path.isdir(args.model)
                                      else path.name if args.model else "dgemma-default")
    cfg = ServeConfig(model_path=str(path), model_name=name, api_key=args.api_key or os.environ.get("DGEMMA_API_KEY")
                      or None, device=args.device, dtype=args.dtype, quantize=args.quantize,
                      group_size=args.group_size, max_batch=args.max_batch,
                      max_queue=args.max_queue, sampler=args.sampler, prefill_chunk=args.prefill_chunk,
                      prefix_cache_bytes=args.prefix_cache_mb << 20, max_steps=args.max_denoising_steps)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    where = f"[{args.host}]" if ":" in args.host else args.host
    logging.getLogger("dgemma.serve").info("listening on http://%s:%d; /health is 200 once the model is loaded",
                                           where, sock.getsockname()[1])
    state = State(cfg, metrics=Metrics())
    app = create_app(state)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            """Stop accepting, end in-flight requests with an error event, exit 0 (not re-raise the signal)."""
            if state.worker is not None and not state.worker.stopping:   # no locks or joins in a signal handler
                state.worker.stopping = "the server is shutting down"
                threading.Thread(target=state.worker.stop, daemon=True).start()
            super().handle_exit(sig, frame)
            self._captured_signals.clear()

    server = Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                   timeout_graceful_shutdown=30, access_log=False))
    loader = start_loading(state)

    def watch() -> None:                              # a model that cannot load stops the server (exit 1)
        loader.join()
        if state.failed:
            server.should_exit = True
    threading.Thread(target=watch, daemon=True).start()
    server.run(sockets=[sock])
    if state.worker is not None:
        state.worker.stop()
    if state.failed:
        print(f"dgemma: error: could not load the model: {state.failed}")
        return 1
    return 0


def _listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (uvicorn listens on it), or a UsageError naming why it cannot be."""
    from dgemma.cli import UsageError
    sock = None
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)     # connections wait in the backlog while the model loads (/health answers 503 then)
    except OSError as e:      # socket.gaierror too: an unknown host name
        if sock is not None:
            sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock
