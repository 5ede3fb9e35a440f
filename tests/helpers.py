"""Tiny random-weight Hugging Face checkpoints and a loop that runs an Engine to completion."""

from __future__ import annotations

import json
from pathlib import Path

import torch

FAMILIES = {
    "qwen3": dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3"),
    "qwen2": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2"),
    "llama": dict(architectures=["LlamaForCausalLM"], model_type="llama",
                  rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                    original_max_position_embeddings=64), rope_theta=500000.0),
}


def tiny_checkpoint(family: str, out: Path, vocab: int = 256, tie: bool = False, seed: int = 0,
                    head_dim: int = 16, dtype: torch.dtype = torch.float32) -> Path:
    """Saves a random-weight model of `family` with transformers' own classes, in float32."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(FAMILIES[family])
    model_type = spec.pop("model_type")
    cfg = AutoConfig.for_model(model_type, vocab_size=vocab, hidden_size=4 * head_dim, intermediate_size=8 * head_dim,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim,
                               max_position_embeddings=512, initializer_range=0.2, tie_word_embeddings=tie,
                               rms_norm_eps=1e-6, **spec)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # norms at 1 and biases at 0 would hide mistakes in how they are applied
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.to(dtype).save_pretrained(out)
    return out


def hf_greedy(path: Path, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    outs = []
    for p in prompts:
        ids = torch.tensor([p])
        with torch.no_grad():
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=None, pad_token_id=0)
        outs.append(gen[0, len(p):].tolist())
    return outs


def run_engine(engine, prompts: list[list[int]], params, rid_prefix: str = "r") -> list[list[int]]:
    """Adds every prompt, steps until all finish, returns the generated ids in prompt order."""
    rids = [f"{rid_prefix}{i}" for i in range(len(prompts))]
    out = {rid: [] for rid in rids}
    for rid, p in zip(rids, prompts):
        engine.add_request(rid, p, params)
    steps = 0
    while engine.has_work:
        for o in engine.step():
            if o.token_id is not None:
                out[o.rid].append(o.token_id)
        steps += 1
        assert steps < 10_000, "engine did not finish"
    return [out[r] for r in rids]


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj))
