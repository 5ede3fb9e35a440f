"""Converts a GGUF file into a Hugging Face checkpoint directory that `vllm serve DIR` (or any transformers
reader) loads: the weights dequantized by transformers' own GGUF reader into --dtype (bf16 by default) as
safetensors, config.json, generation_config.json, and the tokenizer built from the GGUF's `tokenizer.*`
metadata (tokenizer.json, tokenizer_config.json and the chat template).

    python scripts/gguf_to_safetensors.py MODEL.gguf /tmp/qwc-st
    python scripts/gguf_to_safetensors.py MODEL.gguf /tmp/qwc-st --check   # and compare a greedy generation

Used by the real-model benchmark (scripts/gpu_real_model_bench.sh) so that vLLM serves the very weights ringllm
dequantizes from the same file. Works offline: nothing is fetched (HF_HUB_OFFLINE is set before transformers
loads). The directory is written beside itself and renamed into place, so a half-written one never looks done.

--check loads the written directory back and generates a few greedy tokens from a chat prompt with it and with
the GGUF itself (both in float32 on CPU, so the comparison is of the weights, not of bf16 rounding); it exits 1
when they differ or when the chat template did not survive the conversion.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float32": torch.float32}
CHECK_MESSAGES = [{"role": "user", "content": "Write a Python function that reverses a string."}]


def load(gguf: Path, dtype: torch.dtype):
    """(model, tokenizer) read from the GGUF by transformers, every tensor dequantized into `dtype`."""
    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype, **_dequantized())
    return model, tokenizer


def _dequantized() -> dict:
    """Transformers 5.2x can keep a GGUF's weights packed (GgufConfig, with hub kernels): ask for plain dense
    weights. Older versions always dequantize and have no such option."""
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _as_plain_checkpoint(model) -> None:
    """Forgets that the weights came from a GGUF: transformers refuses to save a model loaded through its GGUF
    quantizer, although with dequantize=True it holds ordinary dense tensors, and config.json must not carry
    a quantization_config (vLLM would look for GGUF kernels)."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def convert(gguf: Path, out: Path, dtype: torch.dtype) -> None:
    model, tokenizer = load(gguf, dtype)
    if not tokenizer.chat_template:
        raise SystemExit(f"{gguf}: the GGUF's tokenizer carries no chat template; a chat benchmark needs one")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    _as_plain_checkpoint(model)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def greedy(model, tokenizer, n: int) -> list[int]:
    ids = tokenizer.apply_chat_template(CHECK_MESSAGES, add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if not isinstance(ids, torch.Tensor) else ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return out[0, ids.shape[1] :].tolist()


def check(gguf: Path, out: Path, n: int) -> bool:
    """Whether the written directory generates what the GGUF generates (greedy, float32) and has the template."""
    torch.manual_seed(0)
    src_model, src_tok = load(gguf, torch.float32)
    expected = greedy(src_model, src_tok, n)
    del src_model
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(out)
    got = greedy(model, tokenizer, n)
    same_template = tokenizer.chat_template == src_tok.chat_template
    print(f"check: GGUF    {expected}\ncheck: written {got}\ncheck: text {tokenizer.decode(got)!r}")
    print(f"check: chat template {'present and identical' if same_template else 'MISSING or changed'}")
    return got == expected and same_template


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gguf", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--check", action="store_true", help="compare a greedy generation with the GGUF's (CPU, fp32)")
    ap.add_argument("--check-tokens", type=int, default=8)
    a = ap.parse_args(argv)
    if not a.gguf.is_file():
        raise SystemExit(f"{a.gguf}: no such file")
    t0 = time.perf_counter()
    convert(a.gguf, a.out, DTYPES[a.dtype])
    size = sum(f.stat().st_size for f in a.out.iterdir())
    print(f"convert: {a.gguf.name} -> {a.out} ({size / 1e6:.0f} MB, {a.dtype}) in {time.perf_counter() - t0:.1f} s")
    print("convert: files", " ".join(sorted(f.name for f in a.out.iterdir())))
    if a.check and not check(a.gguf, a.out, a.check_tokens):
        print("check: FAILED")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
