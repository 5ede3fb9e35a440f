"""The engine's host-side core, without torch: the scheduler, the radix prefix cache, the KV slot allocator,
requests as sequences, the step plan handed to the model runner, and the cascade-attention grouping with its
thresholds. tests/test_boundaries.py checks that nothing here imports torch (or the web stack)."""
