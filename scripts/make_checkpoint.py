"""Builds a random-weight Hugging Face checkpoint from a real model's config.json shape (no download).

    python scripts/make_checkpoint.py scripts/shapes/qwen3-0.6b.json /tmp/qwen3-0.6b [--dtype bfloat16]

The weights are normal(0, 0.02) (norms at 1) from a fixed seed; the tokenizer is the demo model's, so the
checkpoint loads everywhere a real one does (its vocabulary is smaller than the model's, so only token-id
workloads are meaningful)."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ringllm.engine.loader import DTYPES
from ringllm.engine.models import model_class


def build(shape_json: Path, out: Path, dtype: str = "bfloat16", seed: int = 0, device: str = "cpu") -> Path:
    cfg = json.loads(shape_json.read_text())
    cls = model_class(cfg)
    shape = cls.read_shape(cfg)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator(device=device).manual_seed(seed)
    h, d = shape.hidden_size, shape.head_dim
    q, kv, inter = shape.num_heads * d, shape.num_kv_heads * d, shape.intermediate_size
    shapes = {"model.embed_tokens.weight": (shape.vocab_size, h), "model.norm.weight": (h,)}
    if not shape.tie_word_embeddings:
        shapes["lm_head.weight"] = (shape.vocab_size, h)
    for i in range(shape.num_layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "self_attn.q_proj.weight": (q, h),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.o_proj.weight": (h, q),
                p + "mlp.gate_proj.weight": (inter, h),
                p + "mlp.up_proj.weight": (inter, h),
                p + "mlp.down_proj.weight": (h, inter),
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
            }
        )
        if shape.qk_norm:
            shapes.update({p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,)})
        if shape.qkv_bias:
            shapes.update(
                {
                    p + "self_attn.q_proj.bias": (q,),
                    p + "self_attn.k_proj.bias": (kv,),
                    p + "self_attn.v_proj.bias": (kv,),
                }
            )
    tensors = {}
    for name, s in sorted(shapes.items()):
        if len(s) == 1:
            t = torch.ones(s) if name.endswith("norm.weight") else torch.randn(s, generator=g, device=device) * 0.02
        else:
            t = torch.randn(s, generator=g, device=device) * 0.02
        tensors[name] = t.to(DTYPES[dtype]).cpu()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg["torch_dtype"] = dtype
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    from ringllm.engine.demo import demo_model_path

    demo = demo_model_path()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(demo / f, out / f)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shape", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    print(build(a.shape, a.out, a.dtype, a.seed, a.device))
