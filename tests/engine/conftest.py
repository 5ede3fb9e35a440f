"""Fixtures of the engine's GPU tests (built on first use, once per session): a tiny bf16 Qwen3 checkpoint,
the same with room for 4,096 positions, a random checkpoint of Qwen3-0.6B's real shape and one GPU's greedy
tokens on it."""

import json

import pytest
import torch

from tests.engine.gpu_helpers import greedy_with_margins
from tests.helpers import tiny_checkpoint, write_json


@pytest.fixture(scope="session")
def gpu_ckpt(tmp_path_factory):
    return tiny_checkpoint("qwen3", tmp_path_factory.mktemp("gpu-qwen3"), vocab=512, head_dim=128, dtype=torch.bfloat16)


@pytest.fixture(scope="session")
def long_ckpt(tmp_path_factory):
    """The tiny model with room for 4,096 positions (its weights do not depend on it)."""
    path = tiny_checkpoint("qwen3", tmp_path_factory.mktemp("gpu-long"), vocab=512, head_dim=128, dtype=torch.bfloat16)
    config = json.loads((path / "config.json").read_text())
    write_json(path / "config.json", config | {"max_position_embeddings": 4096})
    return path


@pytest.fixture(scope="session")
def qwen3_06b(tmp_path_factory):
    """A random checkpoint of Qwen3-0.6B's real shape, in bf16."""
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]  # the repository
    sys.path.insert(0, str(root / "scripts"))
    from make_checkpoint import build

    return build(root / "scripts/shapes/qwen3-0.6b.json", tmp_path_factory.mktemp("qwen3-0.6b"), device="cuda")


@pytest.fixture(scope="session")
def one_gpu_greedy(qwen3_06b):
    return greedy_with_margins(qwen3_06b)
