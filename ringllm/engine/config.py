"""EngineConfig: the one place every engine setting comes from.

Each field carries its command-line description in its metadata (`setting(...)`): the help text, vLLM's
names for the same option, and the allowed values. `ringllm serve` and `ringllm generate` build their options
from these fields (app/options.py), and each option can also be set by RINGLLM_<FIELD NAME>, so a default,
a help text and an environment variable live here and nowhere else."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

DTYPES = ("auto", "bfloat16", "bf16", "float16", "fp16", "half", "float32", "fp32", "float")
# auto: the model's dtype. fp8 and fp8_e4m3 (vLLM's names for the same thing): float8_e4m3fn with scale 1.0,
# so stored values are clamped to +-448 and keep about 2 significant digits (engine/kv_cache.py).
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")
SCHEDULING_POLICIES = ("fcfs", "priority")  # vLLM's names
WARMUP_CHOICES = ("auto", "on", "off")


def setting(
    default: Any,
    help: str,
    *aliases: str,
    choices: tuple | None = None,
    metavar: str | None = None,
    default_text: str | None = None,
    parse: Callable[[str], Any] | None = None,
    nargs: str | None = None,
) -> Any:
    """A config field and its option: `--field-name` plus `aliases` (vLLM's names), `help`, optionally a
    fixed set of `choices`, the text the reference shows for the default (`default_text`), and how one
    value is read from text (`parse`; by default from the field's type) or several (`nargs="+"`)."""
    return field(
        default=default,
        metadata=dict(
            help=help,
            aliases=aliases,
            choices=choices,
            metavar=metavar,
            default_text=default_text,
            parse=parse,
            nargs=nargs,
        ),
    )


@dataclass
class EngineConfig:
    model: str | None = setting(
        None, "checkpoint directory or hub repo id (default: the demo model)", default_text="the demo model"
    )
    tokenizer: str | None = setting(None, "tokenizer directory (default: the model's)")
    download_dir: str | None = setting(None, "where hub checkpoints are downloaded (default: the hub's cache)")
    dtype: str = setting("auto", "weights' and activations' dtype", choices=DTYPES)
    kv_cache_dtype: str = setting(
        "auto",
        "KV cache dtype (auto: the model's; fp8 = fp8_e4m3: float8 e4m3, half the bytes, values clamped to +-448)",
        choices=KV_CACHE_DTYPES,
    )
    device: str = setting("auto", "where the engine runs (auto: cuda when available)", choices=("auto", "cpu", "cuda"))
    tp_size: int = setting(1, "tensor-parallel ranks", "--tensor-parallel-size", "-tp")
    pp_size: int = setting(1, "pipeline-parallel stages", "--pipeline-parallel-size", "-pp")
    device_ids: list[int] | None = setting(None, "comma-separated GPU ids to use", metavar="IDS")
    nccl_port: int = setting(29555, "rank 0's torch.distributed rendezvous port", "--master-port")
    nnodes: int = setting(1, "hosts the ranks are spread over")
    node_rank: int = setting(0, "this host's index (0 runs the engine and the server)")
    master_addr: str = setting("127.0.0.1", "address of node 0, as the other hosts reach it")
    gpu_memory_utilization: float = setting(0.9, "share of GPU memory to use")
    kv_cache_tokens: int | None = setting(None, "KV pool size in tokens (overrides the memory budgets)")
    cpu_kv_cache_gb: float = setting(1.0, "KV pool budget on CPU, GiB")
    max_bs: int = setting(256, "most sequences in one step", "--max-num-seqs")
    max_num_batched_tokens: int = setting(8192, "token budget of one step (prefill chunks and decodes)")
    max_waiting_requests: int = setting(4096, "queue bound; beyond it requests get 503")
    scheduling_policy: str = setting(
        "fcfs",
        "order of admission (fcfs: arrival; priority: a request's priority, lower first, then arrival, and the "
        "lowest priority is preempted first; with fcfs a request's priority must be 0)",
        choices=SCHEDULING_POLICIES,
    )
    context_len: int | None = setting(
        None, "longest sequence (default: the model's; larger is refused)", "--max-model-len"
    )
    enforce_eager: bool = setting(False, "no CUDA graphs")
    warmup: str = setting(
        "auto",
        "run the step kinds a workload hits before reporting ready, so that no request waits for a kernel to "
        "compile (engine/runner/warmup.py; auto: on a GPU only, where kernels compile on first use; off: the "
        "first requests compile them)",
        choices=WARMUP_CHOICES,
    )
    disable_overlap_schedule: bool = setting(False, "do not overlap host and device work")
    disable_radix_cache: bool = setting(False, "no prefix caching")
    disable_cascade_attention: bool = setting(
        False, "decode rows sharing a cached prefix attend to it one by one (no cascade attention on FlashInfer)"
    )
    attention_backend: str = setting("auto", "attention kernels", choices=("auto", "torch", "flashinfer"))
    seed: int = setting(
        0, "seed of the sampler's generator (with --enable-deterministic-inference: of every request without one)"
    )
    enable_deterministic_inference: bool = setting(
        False,
        "the same tokens for the same request whatever else is batched with it and whatever the prefix cache "
        "holds: batch-invariant kernels, no cascade attention, no split-KV, a seed for every sampled request "
        "(ringllm/engine/determinism.py; slower, see the README)",
        "--deterministic",
    )
    grammar_compile_timeout: float = setting(
        10.0, "seconds one grammar compile may take before its requests are refused (it runs in a child process)"
    )
    grammar_cache_mb: int = setting(128, "compiled grammars kept, in MiB (least recently used dropped first)")
    grammar_mask_budget_ms: float = setting(
        50.0, "ms a request's token mask may take to fill in one step; past it the request ends with an error"
    )
    log_level: str = setting("info", "log level", choices=("debug", "info", "warning", "error"))
    profile: bool = setting(False, "record a torch profiler trace of the run")
    profile_dir: str = setting("profiles", "where profiler traces go (one file per rank)")
    profile_max_steps: int = setting(
        200, "a profile started by /start_profile ends itself, its trace written, after this many engine steps"
    )
    profile_max_mb: int = setting(
        1024, "MiB of profiler traces one engine process may write; past it /start_profile answers 409"
    )

    def __post_init__(self) -> None:
        if self.max_bs < 1:
            raise ValueError(f"max_bs must be >= 1, got {self.max_bs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(
                f"kv_cache_dtype {self.kv_cache_dtype!r} is not implemented: use one of {', '.join(KV_CACHE_DTYPES)}"
            )
        if self.tp_size < 1 or self.pp_size < 1:
            raise ValueError(f"tp_size and pp_size must be >= 1, got {self.tp_size} and {self.pp_size}")
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"node_rank must be in [0, nnodes), got {self.node_rank} of {self.nnodes}")
        if self.grammar_compile_timeout <= 0 or self.grammar_cache_mb < 1 or self.grammar_mask_budget_ms <= 0:
            raise ValueError(
                "grammar_compile_timeout and grammar_mask_budget_ms must be > 0 and grammar_cache_mb >= 1, got "
                f"{self.grammar_compile_timeout}, {self.grammar_mask_budget_ms} and {self.grammar_cache_mb}"
            )
        if self.profile_max_steps < 1 or self.profile_max_mb < 1:
            raise ValueError(
                f"profile_max_steps and profile_max_mb must be >= 1, got {self.profile_max_steps} and "
                f"{self.profile_max_mb}"
            )
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise ValueError(f"scheduling_policy must be one of {', '.join(SCHEDULING_POLICIES)}")
        if self.warmup not in WARMUP_CHOICES:
            raise ValueError(f"warmup must be one of {', '.join(WARMUP_CHOICES)}, got {self.warmup!r}")
        if self.attention_backend not in ("auto", "torch", "flashinfer"):
            raise ValueError(f"unknown attention backend {self.attention_backend!r}")
        if self.enable_deterministic_inference and self.tp_size > 2:
            # Two partial sums add the same whichever rank adds them; three or more do not, and NCCL picks its
            # reduction order (ring or tree, chunking) by the message size, which follows the batch.
            raise ValueError(
                f"--enable-deterministic-inference takes at most 2 tensor-parallel ranks, got {self.tp_size}: "
                "with more, the all-reduce's order of additions depends on the batch"
            )
        if self.context_len is not None and self.context_len < 2:
            raise ValueError(f"context_len must be >= 2, got {self.context_len}")


def check_context_len(config: EngineConfig, model_max: int | None) -> None:
    """Refuses a context longer than the model was trained for (its max_position_embeddings): the rotary
    tables would be extrapolated silently and the output would degrade without any sign."""
    if config.context_len is not None and model_max is not None and config.context_len > model_max:
        raise ValueError(
            f"--context-len {config.context_len} is larger than the model's maximum of {model_max} "
            f"tokens (max_position_embeddings); use at most {model_max}"
        )
