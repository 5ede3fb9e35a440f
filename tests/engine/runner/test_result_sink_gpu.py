"""Step results on CUDA (engine/runner/result_sink.py, `pytest -m gpu`): the pinned ResultRing's reuse, the
sampler writing into pinned memory (zero-copy), and the engine's steps going through both rings."""

import pytest
import torch

from ringllm.engine import EngineConfig, SamplingParams
from ringllm.engine.engine import Engine
from tests.engine.gpu_helpers import gpu_prompts
from tests.helpers import run_engine

pytestmark = pytest.mark.gpu


def _after_device_work(fill: float, rows: int, width: int = 1) -> torch.Tensor:
    """A [rows, width] result the compute stream writes only after ~10 ms of other work (torch.cuda._sleep),
    so that a copy that did not wait for the compute stream would read it unwritten."""
    out = torch.empty(rows, width, device="cuda")
    torch.cuda._sleep(20_000_000)
    return out.fill_(fill)


def test_result_ring_reuses_a_buffer_only_once_its_result_is_read_or_dropped():
    from ringllm.engine.runner.result_sink import ResultRing, copy_to_host

    ring, stream = ResultRing(2, 64), torch.cuda.Stream()
    ring_ptrs = {b.data_ptr() for b in ring.buffers}
    held = [copy_to_host(_after_device_work(float(i), 3), None, 3, None, stream, ring) for i in range(3)]
    # two unread results hold both buffers: the third copy got a fresh one
    assert {held[0].host.data_ptr(), held[1].host.data_ptr()} == ring_ptrs
    assert held[2].host.data_ptr() not in ring_ptrs
    assert [r.wait().tokens.tolist() for r in held] == [[0, 0, 0], [1, 1, 1], [2, 2, 2]]
    # read: the buffers are free again; a read result keeps its tokens when its buffer is rewritten
    again = [copy_to_host(_after_device_work(7.0 + i, 2), None, 2, None, stream, ring) for i in range(2)]
    assert {r.host.data_ptr() for r in again} == ring_ptrs
    assert [r.wait().tokens.tolist() for r in again] == [[7, 7], [8, 8]]
    assert held[0].wait().tokens.tolist() == [0, 0, 0]
    # a result dropped unread frees its buffer; one kept unread does not
    kept = copy_to_host(_after_device_work(5.0, 1), None, 1, None, stream, ring)
    dropped = copy_to_host(_after_device_work(6.0, 1), None, 1, None, stream, ring)
    dropped_ptr = dropped.host.data_ptr()
    del dropped
    reused = copy_to_host(_after_device_work(9.0, 4), None, 4, None, stream, ring)
    assert reused.host.data_ptr() == dropped_ptr != kept.host.data_ptr()
    assert reused.wait().tokens.tolist() == [9] * 4 and kept.wait().tokens.tolist() == [5]
    # too large for a buffer (prompt rows): a fresh one, and the prompt rows survive the read
    big = copy_to_host(_after_device_work(3.0, 20, 6), 2, 4, None, stream, ring)
    assert big.host.data_ptr() not in ring_ptrs
    sample = big.wait()
    assert sample.tokens.tolist() == [3] * 4 and sample.prompt is not None and (sample.prompt == 3).all()


def test_engine_steps_copy_through_the_pinned_rings(gpu_ckpt, monkeypatch):
    """In the engine's step loop every result lands in a ResultRing buffer (written there by the sampler
    itself: zero-copy) and every step's index arrays go through the StagingRing (no fresh pinned
    tensor in steady state); the tokens are those of a run with overlap off and every result copied."""
    from ringllm.engine.kernels import sampling as kernels
    from ringllm.engine.runner.model_runner import ModelRunner
    from ringllm.engine.runner.result_sink import ResultRing
    from ringllm.engine.runner.staging import StagingRing

    def run(**kw):
        engine = Engine(
            EngineConfig(
                model=str(gpu_ckpt),
                device="cuda",
                max_bs=16,
                context_len=512,
                dtype="bfloat16",
                kv_cache_tokens=4096,
                warmup="off",  # the spies below count this run's steps (the warm-up has tests of its own)
                **kw,
            )
        )
        try:
            out = run_engine(engine, gpu_prompts(), SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))
            results = engine.runner.results
            return out, results.zero_copy, {b.data_ptr() for b in results.ring.buffers}
        finally:
            engine.close()

    assert kernels.writes_pinned_memory(torch.device("cuda"))
    with monkeypatch.context() as m:
        m.setattr(kernels, "writes_pinned_memory", lambda device: False)
        plain, zero_copy, _ = run(disable_overlap_schedule=True)
    assert not zero_copy
    hosts, staged, landed = [], [], []
    sample, send, land = ModelRunner.sample, StagingRing.send, ResultRing.landed

    def spy_sample(self, step, mask=None):
        result = sample(self, step, mask)
        hosts.append(result.host.data_ptr())
        return result

    def spy_send(self, *args):
        out = send(self, *args)
        staged.append(out is not None)
        return out

    def spy_landed(self, *args):
        landed.append(args)
        return land(self, *args)

    monkeypatch.setattr(ModelRunner, "sample", spy_sample)
    monkeypatch.setattr(StagingRing, "send", spy_send)
    monkeypatch.setattr(ResultRing, "landed", spy_landed)
    overlapped, zero_copy, ring = run()
    assert zero_copy and overlapped == plain
    assert len(hosts) >= 24 and set(hosts) <= ring and len(set(hosts)) >= 2
    assert len(staged) == len(hosts) and all(staged)
    assert len(landed) == len(hosts)  # every step: all rows plain, none asked for logprobs


def test_zero_copy_result_is_read_only_after_the_sampler_wrote_it():
    """The sampler writes a step's tokens into a ResultRing buffer on the compute stream (behind ~10 ms of
    other work); `wait` returns them, not what the buffer held before; a buffer read is handed out again, one
    unread is not."""
    from ringllm.engine.kernels.sampling import sample_rows
    from ringllm.engine.runner.result_sink import ResultRing

    ring, V = ResultRing(2, 64), 4096
    zeros = torch.zeros(8, dtype=torch.long, device="cuda")
    temp, seeded = torch.zeros(8, device="cuda"), torch.zeros(8, dtype=torch.bool, device="cuda")

    def step(tokens: list[int]):
        B = len(tokens)
        taken = ring.take_direct(B)
        assert taken is not None
        slot, out = taken
        out.fill_(-1.0)
        logits = torch.zeros(B, V)
        logits[torch.arange(B), torch.tensor(tokens)] = 1.0  # greedy picks these
        logits, rows = logits.cuda(), torch.arange(B, device="cuda")
        torch.cuda._sleep(20_000_000)  # the sampler's write comes ~10 ms after the host queued it
        _, packed = sample_rows(logits, rows, zeros[:B] + 5, 1, temp, zeros, seeded, zeros, out=out)
        assert packed is out
        return ring.landed(slot, B, torch.cuda.current_stream())

    first, second = step([3, 9]), step([100, 7, 4000])
    assert ring.take_direct(1) is None  # both buffers hold unread results
    assert first.wait().tokens.tolist() == [3, 9] and second.wait().tokens.tolist() == [100, 7, 4000]
    third = step([42])
    assert third.wait().tokens.tolist() == [42] and first.wait().tokens.tolist() == [3, 9]
