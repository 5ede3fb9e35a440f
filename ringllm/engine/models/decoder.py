"""The decoder-only causal LM every supported family is an instance of, and its checkpoint-name mapping."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ringllm.engine import determinism, parallel
from ringllm.engine.models.layers import (
    DecoderLayer,
    MergedLinear,
    RMSNorm,
    Rotary,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from ringllm.engine.parallel import Layout


@dataclass
class ModelShape:
    """The parts of a Hugging Face config.json the engine uses, read the same way for every family."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: dict
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    eos_token_ids: list[int]
    bos_token_id: int | None
    torch_dtype: str | None
    rotary: Rotary | None = None  # built once per model and shared by its layers

    @classmethod
    def from_hf_config(cls, cfg: dict, qkv_bias: bool, qk_norm: bool) -> ModelShape:
        heads = cfg["num_attention_heads"]
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        rope.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
        eos = cfg.get("eos_token_id")
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        return cls(
            architecture=cfg["architectures"][0],
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads", heads),
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            rope=rope,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            qk_norm=qk_norm,
            eos_token_ids=eos_ids,
            bos_token_id=cfg.get("bos_token_id"),
            torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
        )


class DecoderForCausalLM(nn.Module):
    """Embedding, N decoder layers, final norm, LM head. Under pipeline parallelism a stage holds only its own
    layers (and the embedding on the first stage, the norm and head on the last): `forward` takes the previous
    stage's (hidden, residual) as `carry` and returns them for the next stage, or, on the last stage, the normed
    hidden states. `logits` maps the rows the sampler needs, so prefill never projects every prompt position
    onto the vocabulary. `batch_invariant`: every linear layer and the head compute each row the same way at
    any batch size (engine/determinism.py)."""

    head_linear: Callable[..., torch.Tensor] = staticmethod(F.linear)

    def __init__(
        self, shape: ModelShape, max_positions: int, layout: Layout | None = None, batch_invariant: bool = False
    ):
        super().__init__()
        lay = layout or Layout()
        lay.check_heads(shape.num_heads, shape.num_kv_heads)
        if shape.intermediate_size % lay.tp_size:
            raise ValueError(f"tp_size {lay.tp_size} must divide the MLP width {shape.intermediate_size}")
        shape.rotary = Rotary(shape.head_dim, max_positions, shape.rope)
        self.shape, self.layout = shape, lay
        self.layer_range = lay.layer_range(shape.num_layers)
        first, last = lay.is_first_stage, lay.is_last_stage
        needs_embedding = first or (last and shape.tie_word_embeddings)
        self.embed_tokens = (
            VocabParallelEmbedding(shape.vocab_size, shape.hidden_size, lay) if needs_embedding else None
        )
        self.layers = nn.ModuleList(DecoderLayer(i, shape, lay) for i in range(len(self.layer_range)))
        self.norm = RMSNorm(shape.hidden_size, shape.rms_norm_eps) if last else None
        self.rotary = shape.rotary
        self.lm_head = None
        if last and not shape.tie_word_embeddings:
            self.lm_head = VocabParallelEmbedding(shape.vocab_size, shape.hidden_size, lay)  # used as a matrix
        if batch_invariant:
            for module in self.modules():
                if isinstance(module, (MergedLinear, RowParallelLinear)):
                    module.linear = determinism.linear
            self.head_linear = determinism.linear

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn, carry=None):
        if carry is None:  # the first stage, which holds the embedding
            assert self.embed_tokens is not None
            x, residual = self.embed_tokens(input_ids), None
        else:
            x, residual = carry
        for layer in self.layers:
            x, residual = layer(x, residual, positions, attn)
        if self.norm is None:
            return x, residual
        x, _ = self.norm(x, residual)
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        head = self.embed_tokens if self.lm_head is None else self.lm_head
        assert head is not None, "logits only on the last stage, which holds the head (or the tied embedding)"
        local = self.head_linear(hidden, head.weight)
        return parallel.tp_all_gather(local)[:, : self.shape.vocab_size]

    # Checkpoint parameter name -> (our parameter, part index in a merged linear or None).
    _MERGED = {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def load_weight(self, name: str, tensor) -> bool:
        """Copies this rank's part of one checkpoint tensor into place; False for names it does not hold.
        `tensor` may be a safetensors slice: only the indexed shard is read from disk."""
        if name.startswith("model."):
            name = name[len("model.") :]
        if "rotary_emb" in name:
            return False
        if name in ("embed_tokens.weight", "lm_head.weight"):
            module = self.embed_tokens if name == "embed_tokens.weight" else self.lm_head
            if module is None:
                return False  # another stage's, or tied: the embedding is the head
            module.load(tensor)
            return True
        parts = name.split(".")
        if parts[0] == "layers":
            layer = int(parts[1])
            if layer not in self.layer_range:
                return False
            parts[1] = str(layer - self.layer_range.start)
        elif parts[0] == "norm" and self.norm is None:
            return False
        for i, p in enumerate(parts):
            if p in self._MERGED:
                merged, index = self._MERGED[p]
                linear = self.get_submodule(".".join(parts[:i] + [merged]))
                assert isinstance(linear, MergedLinear)
                linear.load_part(parts[-1], index, tensor)
                return True
            if p in ("o_proj", "down_proj"):
                row_linear = self.get_submodule(".".join(parts[: i + 1]))
                assert isinstance(row_linear, RowParallelLinear)
                row_linear.load(tensor)
                return True
        param = self.get_parameter(".".join(parts))
        full = tensor[:]
        if param.shape != full.shape:
            raise ValueError(f"checkpoint tensor {name} has shape {tuple(full.shape)}, expected {tuple(param.shape)}")
        param.data.copy_(full)
        return True
