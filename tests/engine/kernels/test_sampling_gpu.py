"""The sampling kernels (engine/kernels/sampling.py, `pytest -m gpu`): the Gumbel-max distribution and seeds,
sample_rows reading the row tables by request row, and its reused scratch."""

import pytest
import torch

pytestmark = pytest.mark.gpu


def test_gumbel_sampling_distribution_and_seeds():
    from ringllm.engine.kernels.sampling import gumbel_sample

    probs = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    n = 40_000
    logits = probs.log().repeat(n, 1).cuda()
    temp = torch.ones(n, device="cuda")
    seeds = torch.arange(n, device="cuda")
    tokens = gumbel_sample(logits, temp, seeds, torch.zeros(n, dtype=torch.long, device="cuda"))
    freq = torch.bincount(tokens.cpu(), minlength=6).float() / n
    assert torch.allclose(freq, probs, atol=0.01), freq
    again = gumbel_sample(logits, temp, seeds, torch.zeros(n, dtype=torch.long, device="cuda"))
    assert torch.equal(tokens, again)
    greedy = gumbel_sample(
        logits, torch.zeros(n, device="cuda"), seeds, torch.zeros(n, dtype=torch.long, device="cuda")
    )
    assert (greedy == 0).all()
    # Real vocabulary size: greedy is the argmax at small and large batch (two chunk sizes), and a seeded row
    # draws the same token alone as inside a batch of 64.
    big = torch.randn(64, 151_936, device="cuda", dtype=torch.bfloat16)
    zero, ctr = torch.zeros(64, device="cuda"), torch.full((64,), 5, dtype=torch.long, device="cuda")
    assert torch.equal(gumbel_sample(big, zero, seeds[:64], ctr), big.float().argmax(1))
    assert torch.equal(gumbel_sample(big[:1], zero[:1], seeds[:1], ctr[:1]), big[:1].float().argmax(1))
    hot = torch.full((64,), 2.0, device="cuda")
    together = gumbel_sample(big, hot, seeds[:64], ctr)
    alone = torch.cat([gumbel_sample(big[i : i + 1], hot[:1], seeds[i : i + 1], ctr[:1]) for i in range(4)])
    assert torch.equal(together[:4], alone)


def test_sample_rows_reads_the_row_tables_as_the_torch_gathers_did():
    """kernels.sample_rows reads temperature, seed, has_seed and prompt_len by request row and takes the step
    seed as a scalar; the same draws as gathering them with torch first (the sampler's former path, through
    gumbel_sample, whose noise test_gumbel_sampling_distribution_and_seeds pins). Greedy, seeded and unseeded
    rows, rows out of order; `land` writes the kept rows' tokens into req_tokens[row, seq_len]."""
    from ringllm.engine.kernels.sampling import gumbel_sample, sample_rows

    g = torch.Generator(device="cuda").manual_seed(0)
    R, B, V = 40, 24, 151_936
    temp = torch.rand(R, device="cuda", generator=g) + 0.3
    temp[::5] = 0  # greedy rows
    seed = torch.randint(0, 1 << 40, (R,), device="cuda", generator=g)
    has_seed = torch.rand(R, device="cuda", generator=g) < 0.5
    prompt_len = torch.randint(0, 100, (R,), device="cuda", generator=g)
    rows = torch.randperm(R, device="cuda", generator=g)[:B]
    seq_lens = torch.randint(100, 400, (B,), device="cuda", generator=g)
    logits = torch.randn(B, V, device="cuda", dtype=torch.bfloat16, generator=g)
    step_seed = 1_000_003 * 7 + 3
    counter = torch.where(has_seed[rows], seq_lens - prompt_len[rows], torch.arange(B, device="cuda"))
    ref = gumbel_sample(logits, temp[rows], torch.where(has_seed[rows], seed[rows], step_seed), counter)
    tokens, packed = sample_rows(logits, rows, seq_lens, step_seed, temp, seed, has_seed, prompt_len)
    assert torch.equal(tokens, ref) and torch.equal(packed[:, 0], ref.float()) and packed.shape == (B, 1)
    greedy = (temp[rows] == 0).nonzero().squeeze(1)
    assert torch.equal(tokens[greedy], logits[greedy].float().argmax(1))
    req_tokens = torch.full((R, 512), -1, dtype=torch.int32, device="cuda")
    keep = (torch.arange(B, device="cuda") % 3 != 0).int()
    again, _ = sample_rows(
        logits, rows, seq_lens.int(), step_seed, temp, seed, has_seed, prompt_len, (req_tokens, keep)
    )
    expect = torch.full_like(req_tokens, -1)
    k = keep.bool()
    expect[rows[k], seq_lens[k]] = ref[k].int()
    assert torch.equal(again, ref) and torch.equal(req_tokens, expect)


def test_sample_rows_with_reused_scratch_draws_as_with_fresh_buffers():
    """The sampler's chunk-winner buffers (kernels.sample_scratch_size, reused every step, stale values from a
    larger batch left in them) give the tokens of fresh buffers, at batch sizes on both sides of the chunk
    switch (32 rows)."""
    from ringllm.engine.kernels.sampling import sample_rows, sample_scratch_size

    g = torch.Generator(device="cuda").manual_seed(2)
    R, V = 40, 151_936
    temp = torch.rand(R, device="cuda", generator=g) + 0.3
    temp[::4] = 0
    seed = torch.randint(0, 1 << 40, (R,), device="cuda", generator=g)
    has_seed = torch.rand(R, device="cuda", generator=g) < 0.5
    prompt_len = torch.randint(0, 100, (R,), device="cuda", generator=g)
    n = sample_scratch_size(R, V)
    scratch = (torch.full((n,), 1e30, device="cuda"), torch.full((n,), -7, dtype=torch.int32, device="cuda"))
    for B in (40, 31, 1, 32, 5):
        rows = torch.randperm(R, device="cuda", generator=g)[:B]
        seq_lens = torch.randint(100, 400, (B,), device="cuda", generator=g)
        logits = torch.randn(B, V, device="cuda", dtype=torch.bfloat16, generator=g)
        args = (logits, rows, seq_lens, 11 + B, temp, seed, has_seed, prompt_len)
        fresh, _ = sample_rows(*args)
        reused, packed = sample_rows(*args, None, scratch)
        assert torch.equal(fresh, reused) and torch.equal(packed[:, 0], fresh.float()), B
