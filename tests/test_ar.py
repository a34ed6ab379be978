"""AR mode: the logits each token is chosen from equal the encoder's teacher-forced logits."""
import torch

from torch.utils._python_dispatch import TorchDispatchMode

from test_cache import model


class Reads(TorchDispatchMode):
    """Counts reads of tensor values back to the host (each one a wait for the device on a GPU)."""
    n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        Reads.n += func.overloadpacket.__name__ in ("_local_scalar_dense", "item", "is_nonzero")
        return func(*args, **(kwargs or {}))


def test_ar_logits_equal_encoder_logits():
    m = model()
    ids = torch.randint(2, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    out = m.generate_ar(ids, max_new_tokens=12, eos_token_id=None, return_logits=True)   # passes the window (6)
    ref = m.encoder_logits(out.sequences)[:, 4:-1]
    assert torch.allclose(out.step_logits, ref, atol=1e-5)
    assert torch.equal(out.sequences[:, 5:], ref.argmax(-1))


def test_ar_eos_then_pad():
    m = model()
    ids = torch.randint(2, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    free = m.generate_ar(ids, max_new_tokens=6, eos_token_id=None)
    eos = int(free.sequences[0, 5])        # make row 0's first new token an EOS
    out = m.generate_ar(ids, max_new_tokens=6, eos_token_id=[eos], pad_token_id=0)
    assert out.sequences[0, 5] == eos and (out.sequences[0, 6:] == 0).all()
    assert out.tokens_per_forward[0] < 1


def test_ar_without_eos_reads_nothing_back_per_token():
    """With no EOS to stop at, the token loop never waits for the device (on a GPU each wait leaves it idle while
    the host queues the next step): the reads back from tensors do not grow with the tokens decoded."""
    m = model()
    ids = torch.randint(2, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    counts = []
    for n in (3, 9):
        Reads.n = 0
        with Reads():
            m.generate_ar(ids, max_new_tokens=n, eos_token_id=None, cuda_graphs=True)
        counts.append(Reads.n)
    assert counts[0] == counts[1], counts


def test_ar_refuses_an_empty_prompt_and_a_negative_temperature():
    m = model()
    for ids, kw, what in ((torch.zeros(1, 0, dtype=torch.long), {}, "prompt token"),
                          (torch.tensor([[3, 4]]), {"temperature": -1.0}, "temperature")):
        try:
            m.generate_ar(ids, max_new_tokens=2, **kw)
        except ValueError as e:
            assert what in str(e)
        else:
            raise AssertionError(f"accepted {kw or 'an empty prompt'}")


def test_diffusion_reads_back_once_per_step():
    """generate with the stop rule reads one number back per denoising step (whether every row has stopped, and
    whether any has), in graph and eager mode alike."""
    m = model()
    ids = torch.randint(2, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    for kw in (dict(sampler="fast", cuda_graphs=True), dict(sampler="exact")):
        counts = []
        for steps in (3, 7):
            run = dict(max_new_tokens=m.config.canvas_length, max_denoising_steps=steps, stability_threshold=1,
                       confidence_threshold=1e-9, eos_token_id=None, **kw)
            m.generate(ids, **run)                    # once before: the schedule's table is made (and cached)
            Reads.n = 0
            with Reads():
                out = m.generate(ids, **run)
            assert int(out.decoder_passes.max()) == steps          # the rule never fires: every step runs
            counts.append(Reads.n)
        assert counts[1] - counts[0] == 7 - 3, (kw, counts)
