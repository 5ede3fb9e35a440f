"""The demo model: a small Qwen3-architecture checkpoint with random weights and a byte-level BPE tokenizer
trained on engine/data/corpus.txt. Built on first use into a cache directory, byte-identical every time, so
the quick start and the tests need no download. Its output is random text."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from ringllm.engine.cache_dir import cache_root

DEMO_VERSION = "1"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
DEMO_SHAPE = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=4096,
)
VOCAB_SIZE = 1024
CORPUS = Path(__file__).with_name("data") / "corpus.txt"


def demo_model_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """The demo checkpoint's directory, built there first if it is not yet."""
    root = Path(cache_dir) if cache_dir else cache_root()
    path = root / f"demo-qwen3-v{DEMO_VERSION}"
    if not (path / "model.safetensors").is_file():
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=".build-"))
        try:
            build_demo_checkpoint(tmp)
            try:
                tmp.rename(path)  # atomic: concurrent builders race harmlessly
            except OSError:
                if not (path / "model.safetensors").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def build_demo_checkpoint(out: Path) -> None:
    tokenizer_json = _train_tokenizer()
    (out / "tokenizer.json").write_text(tokenizer_json)
    vocab = json.loads(tokenizer_json)
    size = len(vocab["model"]["vocab"]) + sum(
        1 for t in vocab["added_tokens"] if t["content"] not in vocab["model"]["vocab"]
    )
    ids = {t["content"]: t["id"] for t in vocab["added_tokens"]}
    config = {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": size,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "rope_scaling": None,
        "tie_word_embeddings": True,
        "attention_bias": False,
        "hidden_act": "silu",
        "torch_dtype": "float32",
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        **DEMO_SHAPE,
    }
    _write_json(out / "config.json", config)
    _write_json(
        out / "generation_config.json",
        {"bos_token_id": config["bos_token_id"], "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]]},
    )
    _write_json(
        out / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": None,
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "unk_token": None,
            "model_max_length": DEMO_SHAPE["max_position_embeddings"],
            "add_bos_token": False,
            "clean_up_tokenization_spaces": False,
            "chat_template": CHAT_TEMPLATE,
        },
    )
    save_file(_random_weights(config), str(out / "model.safetensors"), metadata={"format": "pt"})


def _train_tokenizer() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    text = CORPUS.read_text(encoding="utf-8")
    tok.train_from_iterator(text.splitlines(), trainer=trainer)
    return tok.to_str(pretty=True)


def _random_weights(config: dict) -> dict[str, torch.Tensor]:
    """Every tensor a Qwen3 checkpoint has, normal(0, std) for matrices and ones for norms, from seed 0."""
    g = torch.Generator().manual_seed(0)
    std = 0.25  # large enough that greedy decoding wanders instead of repeating one token
    h, inter, d = config["hidden_size"], config["intermediate_size"], config["head_dim"]
    q, kv = config["num_attention_heads"] * d, config["num_key_value_heads"] * d
    shapes = {"model.embed_tokens.weight": (config["vocab_size"], h), "model.norm.weight": (h,)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "self_attn.q_proj.weight": (q, h),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.o_proj.weight": (h, q),
                p + "self_attn.q_norm.weight": (d,),
                p + "self_attn.k_norm.weight": (d,),
                p + "mlp.gate_proj.weight": (inter, h),
                p + "mlp.up_proj.weight": (inter, h),
                p + "mlp.down_proj.weight": (h, inter),
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
            }
        )
    return {
        name: (torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=g) * std)
        for name, shape in sorted(shapes.items())
    }


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def checkpoint_digest(path: Path) -> str:
    """SHA-256 over every file of a checkpoint directory, in name order."""
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()
