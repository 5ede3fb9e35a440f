"""Chat checkpoints for the tool-call and reasoning tests whose greedy output is known in advance.

`scripted_checkpoint(out, script, template)` saves a Qwen3-architecture model (random shape from
tests/helpers.tiny_checkpoint) whose attention and MLP outputs are zero, so each position's hidden state is
its token's embedding, and whose LM head maps each token of `script` to the one after it: greedy decoding
after a prompt ending in script[0] writes script[1:] and stops at <|im_end|>. The tokenizer has one token per
ASCII character, Qwen's special tokens, `<think>`, `</think>`, `<tool_call>`, `</tool_call>` as plain added
tokens (decoded as text, as Qwen's are), and any longer strings of the script as single tokens."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tests.helpers import tiny_checkpoint

SPECIAL = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
TAGS = ["<think>", "</think>", "<tool_call>", "</tool_call>"]
CHARS = [chr(i) for i in range(32, 127)] + ["\n"]


def scripted_checkpoint(out: Path, script: list[str], template: str) -> Path:
    from tokenizers import AddedToken, Tokenizer, decoders, models

    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(CHARS)}, merges=[]))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIAL)
    words = TAGS + [w for w in script if w not in CHARS + SPECIAL + TAGS]
    tok.add_tokens([AddedToken(w, normalized=False) for w in words])
    tok.save(str(out / "tokenizer.json"))
    vocab = tok.get_vocab_size()
    ids = [tok.token_to_id(w) for w in script]
    assert None not in ids and len(set(ids)) == len(ids), "each script token once: it has one successor"
    eos = tok.token_to_id("<|im_end|>")
    assert ids[-1] == eos, "a script ends with <|im_end|>"

    tiny_checkpoint("qwen3", out, vocab=vocab + (-vocab % 8), tie=False)
    weights = load_file(str(out / "model.safetensors"))
    g = torch.Generator().manual_seed(0)
    embed = torch.randn(weights["model.embed_tokens.weight"].shape, generator=g)
    head = torch.zeros_like(weights["lm_head.weight"])
    unit = embed / embed.norm(dim=1, keepdim=True)
    for a, b in itertools.pairwise(ids):
        head[b] += 20 * unit[a]  # logit of b after a: 20 * sqrt(hidden); any other token's is far smaller
    weights["model.embed_tokens.weight"], weights["lm_head.weight"] = embed, head
    for name in weights:
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            weights[name] = torch.zeros_like(weights[name])  # the residual stream is the embedding
        if name == "model.norm.weight":
            weights[name] = torch.ones_like(weights[name])
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})

    config = json.loads((out / "config.json").read_text())
    # One token per character makes long prompts; the context is as long as the tests need.
    config.update(eos_token_id=eos, bos_token_id=tok.token_to_id("<|endoftext|>"), max_position_embeddings=4096)
    (out / "config.json").write_text(json.dumps(config))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "bos_token": None,
                "chat_template": template,
            }
        )
    )
    return out
