"""Denoising frames from the engine: the last frame of each canvas is the committed canvas, a seeded request's
frames repeat exactly, and requests without frames get the same tokens (frames are pure observation)."""
import torch

from dgemma.engine import Engine

KW = dict(max_new_tokens=40, max_denoising_steps=6, stability_threshold=1, confidence_threshold=4.0,
          eos_token_id=[5, 7], pad_token_id=0)


def _ids(n, seed):
    return torch.randint(20, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _run(m, frames, seed=3):
    eng = Engine(m, max_batch=2, prefill_chunk=16)
    a = eng.submit(_ids(12, 1), seed=seed, frames=frames, **KW)
    b = eng.submit(_ids(9, 2), seed=seed + 1, **KW)             # a neighbour without frames
    events, got = [], []
    while eng.has_work():
        events += eng.step()
        got += eng.take_frames()
    return eng, a, b, events, got


def test_frames_end_with_the_committed_canvas(peaky_model):
    eng, a, b, events, frames = _run(peaky_model, True)
    assert frames and all(f.request_id == a for f in frames)
    committed = [e.tokens for e in events if e.request_id == a]
    finals = [f for f in frames if f.final]
    assert [f.tokens for f in finals] == committed
    assert all(f.state == [2] * len(f.tokens) for f in finals)
    C = peaky_model.config.canvas_length
    for f in frames:
        if not f.final:
            assert len(f.tokens) == len(f.state) == len(f.entropy) == C
            assert f.accepted == sum(f.state) and set(f.state) <= {0, 1}
            assert abs(f.mean_entropy - sum(f.entropy) / C) < 1e-4
    # steps count up within each canvas; canvases count up
    for c in {f.canvas for f in frames}:
        steps = [f.step for f in frames if f.canvas == c and not f.final]
        assert steps == list(range(len(steps)))


def test_frames_repeat_and_do_not_change_tokens(peaky_model):
    _, a1, b1, ev1, f1 = _run(peaky_model, True)
    _, a2, b2, ev2, f2 = _run(peaky_model, True)
    _, a3, b3, ev3, f3 = _run(peaky_model, False)
    assert [(f.canvas, f.step, f.tokens, f.state, f.entropy) for f in f1] == \
           [(f.canvas, f.step, f.tokens, f.state, f.entropy) for f in f2]
    assert f3 == []
    toks = lambda ev, rid: [t for e in ev if e.request_id == rid for t in e.tokens]  # noqa: E731
    assert toks(ev1, a1) == toks(ev3, a3) and toks(ev1, b1) == toks(ev3, b3)


def test_final_frames_carry_their_own_entropy_when_batched(peaky_model):
    eng = Engine(peaky_model, max_batch=2, prefill_chunk=16)
    ids = [eng.submit(_ids(12, i), seed=i, frames=True, **KW) for i in range(2)]
    frames = []
    while eng.has_work():
        eng.step()
        frames += eng.take_frames()
    for rid in ids:
        mine = [f for f in frames if f.request_id == rid]
        for prev, f in zip(mine, mine[1:]):
            if f.final:
                assert f.entropy == prev.entropy[:len(f.tokens)] and f.mean_entropy > 0
