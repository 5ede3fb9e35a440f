"""The attention interface's defaults (engine/attention/base.py): a backend runs without CUDA graphs unless
it declares them."""

import pytest
import torch

from ringllm.engine.attention.torch_backend import TorchAttention
from ringllm.engine.core.slots import PAGE_SIZE
from ringllm.engine.kv_cache import KVPool

CPU = torch.device("cpu")


def test_attention_backends_run_without_cuda_graphs_unless_they_declare_them():
    pool = KVPool(1, 8 * PAGE_SIZE, 1, 4, torch.float32, CPU)
    attn = TorchAttention(pool, 2, 4)
    assert attn.supports_cuda_graphs is False and attn.kv_store_target(0) is None
    with pytest.raises(NotImplementedError):
        attn.make_graph_decoder(1, torch.zeros(8, dtype=torch.int32))
