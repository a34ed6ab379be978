"""The one thread that owns the Engine: HTTP handlers submit, cancel and warm through it, and get their
request's committed canvases back through a callback.

Knows: a command queue (submit / cancel / warm / stop) drained before every engine step, so a cancel takes
effect within one step; stepping while there is work and sleeping on the queue when there is none; handing
each request's events (canvas, done, error) to the callback it registered; how many requests wait for a row
(for 429s); ending every open request with an error when the server stops or the engine fails.
Does not know: text, HTTP, OpenAI shapes. Metrics are reported to an optional `observe(kind, value)` hook.
"""
from __future__ import annotations

import logging
import queue
import threading
from typing import Any, Callable

log = logging.getLogger("dgemma.serve")
Sink = Callable[[str, Any], None]         # sink(kind, payload): kind "frame" | "canvas" | "done" | "error"


class Worker:
    def __init__(self, engine, observe: Callable[[str, float], None] | None = None) -> None:
        self.engine = engine
        self.observe = observe or (lambda kind, value: None)
        self.commands: queue.Queue = queue.Queue()
        self.sinks: dict[str, Sink] = {}
        self.waiting = 0                          # submitted, not yet denoising (changed under _lock)
        self._lock = threading.Lock()
        self.stopping: str | None = None
        self.thread = threading.Thread(target=self._loop, name="dgemma-engine", daemon=True)

    # ---- called from any thread ------------------------------------------------------------------
    def start(self) -> "Worker":
        self.thread.start()
        return self

    def submit(self, request_id: str, prompt: list[int], sink: Sink, limit: int | None = None, **kwargs) -> bool:
        """Queue a request (validated by the caller: engine.settings and the position check). With `limit`,
        refuse it (False) when that many requests already wait for a row: the check and the count are one step,
        so a burst of handlers cannot all pass the check before any of them is counted."""
        return self.submit_all([(request_id, prompt, sink, kwargs)], limit)

    def submit_all(self, requests: list[tuple[str, list[int], Sink, dict]], limit: int | None = None) -> bool:
        """Queue several requests (an API request's prompts and n choices: (request_id, prompt, sink, settings)
        each) all together, or none of them (False) when they would take the waiting requests past `limit`."""
        with self._lock:      # stop() sets `stopping` under it too: a submit is either failed below or queued
            stopping = self.stopping   # before the stop command (and failed by the loop)
            if not stopping:
                if limit is not None and self.waiting + len(requests) > limit:
                    return False
                self.waiting += len(requests)
                for request_id, prompt, sink, kwargs in requests:
                    self.commands.put(("submit", request_id, prompt, sink, kwargs))
        if stopping:
            for _, _, sink, _ in requests:
                sink("error", stopping)
        return True

    def cancel(self, request_id: str) -> None:
        self.commands.put(("cancel", request_id))

    def warm(self, prompt: list[int]) -> None:
        self.commands.put(("warm", prompt))

    def stop(self, reason: str = "the server is shutting down", wait: float = 10.0) -> None:
        """End every open request with `reason` and stop the loop after the current step."""
        with self._lock:
            self.stopping = reason
            self.commands.put(("stop",))
        if self.thread.is_alive() and threading.current_thread() is not self.thread and wait:
            self.thread.join(wait)

    # ---- the engine thread -------------------------------------------------------------------------
    def _loop(self) -> None:
        eng = self.engine
        while True:
            try:
                idle = not eng.has_work() and not eng.warming
                if not self._drain(block=idle):
                    break
                if not (eng.has_work() or eng.warming):
                    self._gauges()
                    continue
                self._step()
            except Exception as e:                         # never leave a client hanging, never die
                log.exception("engine step failed")
                self._fail_all(f"internal error in the engine: {type(e).__name__}")
        self._fail_all(self.stopping or "the server is shutting down")

    def _step(self) -> None:
        eng = self.engine
        events = eng.step()
        st = eng.stats
        if st.prefill_tokens:
            self.observe("prefill_seconds", st.prefill_s)
        if st.rows:
            self.observe("pass_seconds", st.pass_s)
        for fr in eng.take_frames() if eng.frames else ():
            sink = self.sinks.get(fr.request_id)
            if sink is not None:
                sink("frame", fr)
        for ev in events:
            res = eng.collect(ev.request_id) if ev.finished else None    # collected even if nobody listens
            sink = self.sinks.pop(ev.request_id, None) if ev.finished else self.sinks.get(ev.request_id)
            if sink is None:
                continue
            sink("canvas", ev)
            if res is not None:
                sink("done", res)
        self._gauges()

    def _recount(self) -> None:
        """`waiting` from the engine's queue and the submits not yet drained (the engine thread's view)."""
        with self._lock:    # submits put their command under the lock: none is counted twice or missed
            self.waiting = self.engine.queued() + self._queued_submits()

    def _gauges(self) -> None:
        self._recount()
        self.observe("queue_depth", self.waiting)
        self.observe("active_rows", len(self.engine.rows))

    def _queued_submits(self) -> int:
        return sum(1 for c in list(self.commands.queue) if c[0] == "submit")

    def _drain(self, block: bool) -> bool:
        """Apply queued commands (waiting for one if `block`); False once told to stop."""
        try:
            cmd = self.commands.get(timeout=0.5) if block else self.commands.get_nowait()
        except queue.Empty:
            return True
        while True:
            kind = cmd[0]
            if kind == "stop":
                return False
            if kind == "submit":
                _, rid, prompt, sink, kwargs = cmd
                try:
                    self.engine.submit(prompt, request_id=rid, **kwargs)
                    self.sinks[rid] = sink
                except ValueError as e:                    # the caller validated; a race is still reported
                    sink("error", str(e))
            elif kind == "cancel":
                self.sinks.pop(cmd[1], None)
                try:
                    self.engine.cancel(cmd[1])
                except Exception:
                    log.exception("cancel failed")
                    self._fail_all("internal error in the engine")
            elif kind == "warm":
                try:
                    self.engine.warm(cmd[1])
                except ValueError:
                    pass
            try:
                cmd = self.commands.get_nowait()
            except queue.Empty:
                return True

    def _fail_all(self, reason: str) -> None:
        """End every open request with `reason`; drop half-done work (warm jobs, queued submits)."""
        for rid, sink in list(self.sinks.items()):
            try:
                self.engine.cancel(rid)
            except Exception:
                log.exception("cancel failed")
            sink("error", reason)
        self.sinks.clear()
        self.engine.drop_warm()
        self.engine.frames.clear()
        keep = []
        while True:                                        # submits that never reached the engine
            try:
                cmd = self.commands.get_nowait()
            except queue.Empty:
                break
            if cmd[0] == "submit":
                cmd[3]("error", reason)
            elif cmd[0] == "stop":
                keep.append(cmd)
        for cmd in keep:                                   # a stop asked for meanwhile still stops the loop
            self.commands.put(cmd)
        self._recount()

    def alive(self) -> bool:
        return self.thread.is_alive() and not self.stopping
