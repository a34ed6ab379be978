"""The engine worker with a fake engine: a failing step ends the open requests with an error, drops half-done
warm work, and the worker keeps serving; stop ends everything and the thread exits."""
import threading
import time

from dgemma.engine import CanvasEvent, Result, StepStats
from dgemma.serve.worker import Worker


class FakeEngine:
    def __init__(self):
        self.waiting, self.rows, self.warming, self.frames, self.prefilling = [], [], [], [], []
        self.stats, self.fail_next, self.done = StepStats(), False, {}

    def has_work(self):
        return bool(self.waiting)

    def queued(self):
        return 0

    def submit(self, prompt, request_id=None, **kw):
        self.waiting.append(request_id)

    def warm(self, ids):
        self.warming.append(ids)

    def cancel(self, rid):
        self.waiting = [r for r in self.waiting if r != rid]

    def drop_warm(self):
        self.warming.clear()

    def step(self):
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("boom")
        rid = self.waiting.pop(0)
        self.done[rid] = Result(rid, [1], [5], "eos", 1, 1.0)
        return [CanvasEvent(rid, [5], True, "eos", 1)]

    def collect(self, rid):
        return self.done.pop(rid)

    def take_frames(self):
        return []


def _submit(w, rid):
    got, ev = [], threading.Event()

    def sink(kind, payload):
        got.append(kind)
        if kind in ("done", "error"):
            ev.set()
    w.submit(rid, [1, 2], sink)
    assert ev.wait(5)
    return got


def test_worker_survives_a_failing_step():
    eng = FakeEngine()
    w = Worker(eng).start()
    assert _submit(w, "a") == ["canvas", "done"]
    eng.fail_next = True
    eng.warming.append([1] * 10)
    assert _submit(w, "b") == ["error"]
    assert eng.warming == [] and w.alive()
    assert _submit(w, "c") == ["canvas", "done"]
    t0 = time.time()
    w.stop()
    assert not w.thread.is_alive() and time.time() - t0 < 5
    assert _submit(w, "d") == ["error"]


def test_submit_counts_and_refuses_in_one_step():
    w = Worker(FakeEngine())                  # not started: nothing leaves the queue
    sink = lambda kind, payload: None         # noqa: E731
    assert w.submit("a", [1], sink, limit=2) and w.submit("b", [1], sink, limit=2)
    assert not w.submit("c", [1], sink, limit=2) and w.waiting == 2
    assert w.submit("d", [1], sink) and w.waiting == 3          # no limit: always queued


def test_submit_all_takes_all_or_none():
    w = Worker(FakeEngine())                  # not started: nothing leaves the queue
    sink = lambda kind, payload: None         # noqa: E731
    assert w.submit("a", [1], sink, limit=4)
    assert not w.submit_all([(f"n{i}", [1], sink, {}) for i in range(4)], limit=4)   # 1 + 4 > 4: none queued
    assert w.waiting == 1 and w.commands.qsize() == 1
    assert w.submit_all([(f"n{i}", [1], sink, {}) for i in range(3)], limit=4) and w.waiting == 4
    assert [c[1] for c in list(w.commands.queue)] == ["a", "n0", "n1", "n2"]
    w.stopping = "bye"
    got = []
    assert w.submit_all([(f"s{i}", [1], lambda k, p: got.append(k), {}) for i in range(2)])
    assert got == ["error", "error"]          # a stopping worker fails every one of them
