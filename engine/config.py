"""EngineConfig: the one place every engine setting comes from."""

from __future__ import annotations

from dataclasses import dataclass, field, fields


@dataclass
class EngineConfig:
    model: str | None = None  # checkpoint dir or hub id; None builds and serves the demo model
    dtype: str = "auto"  # auto | bfloat16 | float16 | float32
    device: str = "auto"  # auto | cpu | cuda
    tp_size: int = 1
    pp_size: int = 1
    device_ids: list[int] | None = None
    nccl_port: int = 29555  # rank 0's rendezvous port (torch.distributed TCP store)
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"  # rank 0's host, as the other hosts reach it
    gpu_memory_utilization: float = 0.9
    kv_cache_tokens: int | None = None  # explicit pool size in tokens (wins over memory budgets)
    cpu_kv_cache_gb: float = 1.0  # pool budget on CPU when kv_cache_tokens is not given
    max_bs: int = 256  # most sequences in one step
    max_num_batched_tokens: int = 8192  # token budget of one step (prefill chunks + decodes)
    max_waiting_requests: int = 4096
    context_len: int | None = None  # default: the model's max_position_embeddings
    enforce_eager: bool = False  # no CUDA graphs
    disable_overlap_schedule: bool = False
    disable_radix_cache: bool = False
    attention_backend: str = "auto"  # auto | torch | flashinfer
    seed: int = 0
    log_level: str = "info"
    profile: bool = False
    profile_dir: str = "profiles"
    download_dir: str | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.max_bs < 1:
            raise ValueError(f"max_bs must be >= 1, got {self.max_bs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.dtype not in ("auto", "bfloat16", "bf16", "float16", "fp16", "half", "float32", "fp32", "float"):
            raise ValueError(f"unknown dtype {self.dtype!r}")
        if self.tp_size < 1 or self.pp_size < 1:
            raise ValueError(f"tp_size and pp_size must be >= 1, got {self.tp_size} and {self.pp_size}")
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"node_rank must be in [0, nnodes), got {self.node_rank} of {self.nnodes}")
        if self.attention_backend not in ("auto", "torch", "flashinfer"):
            raise ValueError(f"unknown attention backend {self.attention_backend!r}")

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}
