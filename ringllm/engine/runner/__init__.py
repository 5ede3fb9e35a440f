"""The model runner and its parts: the runner itself (model_runner.py: builds the model, the KV pool and the
request tables, and runs a step in two phases, forward then sample), a step's inputs on the device
(inputs.py, with the pinned staging ring of staging.py), the KV pool's sizing (memory.py), CUDA graphs
(cuda_graph.py), the one way sampled tokens leave the sampler (result_sink.py), the start-up warm-up
(warmup.py) and where compiled kernels are kept across runs (kernel_cache.py)."""
