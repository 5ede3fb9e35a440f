"""Attention backends behind one interface: `torch` everywhere, `flashinfer` on CUDA; each also in a
batch-invariant form for deterministic inference (engine/determinism.py)."""

from ringllm.engine.attention.base import AttentionBackend, AttentionMetadata


def make_backend(
    name: str, device, pool, num_heads: int, head_dim: int, deterministic: bool = False
) -> AttentionBackend:
    if name == "auto":
        name = "flashinfer" if device.type == "cuda" and _has_flashinfer() else "torch"
    if name == "torch":
        from ringllm.engine.attention.torch_backend import BatchInvariantTorchAttention, TorchAttention

        return (BatchInvariantTorchAttention if deterministic else TorchAttention)(pool, num_heads, head_dim)
    if name == "flashinfer":
        if device.type != "cuda" or not _has_flashinfer():
            raise ValueError("the flashinfer attention backend needs a CUDA device and flashinfer-python installed")
        from ringllm.engine.attention.flashinfer_backend import FlashInferAttention
        from ringllm.engine.attention.flashinfer_invariant import BatchInvariantFlashInfer

        return (BatchInvariantFlashInfer if deterministic else FlashInferAttention)(pool, num_heads, head_dim)
    raise ValueError(f"unknown attention backend {name!r}")


def _has_flashinfer() -> bool:
    try:
        import flashinfer  # noqa: F401
    except ImportError:
        return False
    return True


__all__ = ["AttentionBackend", "AttentionMetadata", "make_backend"]
