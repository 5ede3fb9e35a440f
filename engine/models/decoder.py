"""The decoder-only causal LM every supported family is an instance of, and its checkpoint-name mapping."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from engine.models.layers import DecoderLayer, RMSNorm, Rotary


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
    def from_hf_config(cls, cfg: dict, qkv_bias: bool, qk_norm: bool) -> "ModelShape":
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
    """Embedding, N decoder layers, final norm, LM head. `forward` returns hidden states; `logits` maps the
    rows the sampler needs, so prefill never projects every prompt position onto the vocabulary."""

    def __init__(self, shape: ModelShape, max_positions: int):
        super().__init__()
        shape.rotary = Rotary(shape.head_dim, max_positions, shape.rope)
        self.shape = shape
        self.embed_tokens = nn.Embedding(shape.vocab_size, shape.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(i, shape) for i in range(shape.num_layers))
        self.norm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)
        self.rotary = shape.rotary
        self.lm_head = None if shape.tie_word_embeddings else nn.Linear(shape.hidden_size, shape.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            x, residual = layer(x, residual, positions, attn)
        x, _ = self.norm(x, residual)
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return torch.nn.functional.linear(hidden, weight)

    # Checkpoint parameter name -> (our parameter, part index in a merged linear or None).
    _MERGED = {
        "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    }

    def load_weight(self, name: str, tensor: torch.Tensor) -> bool:
        """Copies one checkpoint tensor into place; False for names this model does not use."""
        if name.startswith("model."):
            name = name[len("model."):]
        if name == "lm_head.weight" and self.lm_head is None:
            return False  # tied: the embedding is the head
        if "rotary_emb" in name:
            return False
        parts = name.split(".")
        for i, p in enumerate(parts):
            if p in self._MERGED:
                merged, index = self._MERGED[p]
                module = self.get_submodule(".".join(parts[:i] + [merged]))
                module.load_part(parts[-1], index, tensor)
                return True
        param = self.get_parameter(name)
        if param.shape != tensor.shape:
            raise ValueError(f"checkpoint tensor {name} has shape {tuple(tensor.shape)}, expected {tuple(param.shape)}")
        param.data.copy_(tensor)
        return True
