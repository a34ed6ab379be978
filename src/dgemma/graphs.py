"""CUDA-graph replay of fixed-shape steps (the denoiser step, the one-token AR step).

Knows: capturing a function of some input tensors once per key and replaying it. A key must name
everything the captured kernels depend on besides the inputs: the shapes, and the addresses of the
buffers the function reads or writes in place (the KV cache). Keys built from addresses let a graph
serve a later call whose cache happens to reuse the same memory, and never a call whose cache does not.
`run` adds the opt-in kernel choice (DGEMMA_FUSED, see kernels.fused) to every key itself: a graph replays the
kernels it captured, so a changed choice must capture anew.
Does not know: what the function computes. Off CUDA (or with `enabled=False`) it simply calls the
function, so the same code path runs, and is tested, on the CPU.
"""
from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import Callable, Hashable

import torch

from . import kernels


def buffer_key(*tensors: torch.Tensor) -> tuple:
    """Addresses and shapes of tensors a captured function touches."""
    return tuple((t.data_ptr(), tuple(t.shape)) for t in tensors)


class StepGraphs:
    """`run(key, fn, *inputs)`: the first call of a key runs `fn` eagerly (warming cuBLAS and friends on a
    side stream, as graph capture requires), the second captures it and every later call replays it with
    the new inputs copied into the captured ones (a key whose capture fails stays eager, with a warning).
    Returns fresh tensors (clones), never graph buffers.
    All graphs share one memory pool (their intermediates reuse it; only their small outputs stay apart), so
    keeping many is cheap; at most `max_graphs` are kept (least recently used dropped) — enough for an engine
    to hold one per active-row count and a few key-slot sizes."""

    def __init__(self, enabled: bool = True, max_graphs: int = 64) -> None:
        self.enabled = enabled                              # the caller's switch
        self.capturable = torch.cuda.is_available()         # what the model allows (set by for_model)
        self.max_graphs = max_graphs
        self.pool = None
        self.entries: OrderedDict[Hashable, object] = OrderedDict()
        self.captures = 0                                   # graphs captured so far (for tests and stats)

    def run(self, key: Hashable, fn: Callable[..., tuple[torch.Tensor, ...]], *inputs: torch.Tensor):
        if not (self.enabled and self.capturable):
            return fn(*inputs)
        key = (kernels.fused_choice(), key)
        entry = self.entries.get(key)
        if entry is None:                                   # warm-up: a real step, run eagerly
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = fn(*inputs)
            torch.cuda.current_stream().wait_stream(side)
            self._put(key, "warm")
            return out
        if entry == "eager":                                # capture failed for this key earlier
            return fn(*inputs)
        if entry == "warm":                                 # capture, then replay below
            static_in = tuple(x.clone() for x in inputs)
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, pool=self.pool):
                    static_out = fn(*static_in)
            except RuntimeError as err:                     # something in fn cannot be captured: stay eager
                warnings.warn(f"CUDA graph capture failed; this step runs eagerly from now on ({err})")
                self._put(key, "eager")
                return fn(*inputs)
            self.pool = graph.pool()
            self.captures += 1
            entry = (graph, static_in, static_out)
            self._put(key, entry)
        self.entries.move_to_end(key)
        graph, static_in, static_out = entry
        for dst, src in zip(static_in, inputs):
            dst.copy_(src)
        graph.replay()
        return tuple(o.clone() for o in static_out)

    def _put(self, key: Hashable, value: object) -> None:
        self.entries[key] = value
        self.entries.move_to_end(key)
        while len(self.entries) > self.max_graphs:
            self.entries.popitem(last=False)


def for_model(model) -> StepGraphs:
    """The model's graph store (one per model object, created on first use). It replays graphs only while the
    model is capturable (`model.graph_safe()`: CUDA, bf16); otherwise it calls the step eagerly."""
    rt = model._runtime
    if rt.graphs is None:
        rt.graphs = StepGraphs()
    rt.graphs.capturable = model.graph_safe()
    return rt.graphs
