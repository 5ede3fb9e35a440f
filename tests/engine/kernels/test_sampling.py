"""The sampling kernels' host-side sizing (engine/kernels/sampling.py), on the CPU; the kernels themselves
run in test_sampling_gpu.py."""

import pytest

from ringllm.engine.kernels.sampling import sample_chunk, sample_scratch_size


@pytest.mark.parametrize("vocab", [256, 32_000, 151_936])
@pytest.mark.parametrize("max_rows", [1, 8, 31, 32, 33, 256])
def test_sample_scratch_holds_the_chunk_winners_of_every_batch_size(vocab, max_rows):
    size = sample_scratch_size(max_rows, vocab)
    need = [b * -(-vocab // sample_chunk(b)) for b in range(1, max_rows + 1)]
    assert max(need) == size
