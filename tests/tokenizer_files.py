"""Tokenizer files for the torch-free tests (tests/text, tests/app): a small byte-level BPE with Qwen's special
tokens and chat template, trained in milliseconds, and the same tokenizer as the metadata of a GGUF file."""

from __future__ import annotations

import json
from pathlib import Path

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TAGS = ["<think>", "</think>", "<tool_call>", "</tool_call>"]  # plain added tokens, decoded as text (as Qwen's)
QWEN_TEMPLATE = (Path(__file__).parent / "data" / "qwen2.5-tools.jinja").read_text()
CORPUS = [
    "The sea is calm tonight, and the tide is full.",
    "naïve café — 你好，世界！🎉 emoji and tabs\tand\nnewlines",
    "Once upon a time there was a function that returned the weather in Paris.",
    '{"name": "get_weather", "arguments": {"city": "Paris"}}',
]


def bpe_tokenizer(out: Path, template: str | None = QWEN_TEMPLATE) -> Path:
    """A directory with tokenizer.json (byte-level BPE: a multi-byte character spans several tokens) and
    tokenizer_config.json (Qwen's special tokens; `template` as the chat template)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    tok.add_tokens([AddedToken(t, normalized=False) for t in TAGS])
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    if template is not None:
        config["chat_template"] = template
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


def tokenizer_gguf(tokenizer_dir: Path, out: Path) -> Path:
    """A GGUF file holding nothing but `tokenizer_dir`'s tokenizer and chat template, as llama.cpp's converter
    writes a gpt2-type vocabulary (no tensors: the tokenizer is all the loader reads)."""
    import gguf

    tj = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    cfg = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    vocab = dict(tj["model"]["vocab"])
    added = {t["content"]: t["id"] for t in tj["added_tokens"]}
    vocab.update(added)
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    w = gguf.GGUFWriter(str(out), "qwen2")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIAL else 4 if t in added else 1 for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]])
    w.add_eos_token_id(added["<|im_end|>"])
    w.add_chat_template(cfg["chat_template"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
