"""Finding a checkpoint (a directory, a GGUF file or a hub repo id) and loading its weights into a model:
safetensors as stored, GGUF dequantized (engine/gguf.py). Either way every tensor the model needs must be
there: a missing one is an error naming it, not a model that silently computes something else."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from safetensors import safe_open
from tqdm import tqdm

from ringllm.engine import gguf
from ringllm.engine.logs import get_logger

if TYPE_CHECKING:
    from ringllm.engine.models.decoder import DecoderForCausalLM

log = get_logger("engine.loader")

DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
}


class ModelNotFoundError(ValueError):
    """No usable checkpoint at the given path or hub id."""


def resolve_model_path(model: str, download_dir: str | None = None) -> Path:
    """A local directory or .gguf file as is (a directory with no config.json but one .gguf file: that file);
    otherwise a hub repo id downloaded through huggingface_hub."""
    path = Path(model).expanduser()
    if gguf.is_gguf(path):
        return path
    if path.is_dir():
        if not (path / "config.json").is_file():
            found = gguf.find_gguf(path)
            if found is not None:
                return found
            raise ModelNotFoundError(
                f"{path} has no config.json (nor a .gguf file): not a Hugging Face checkpoint directory"
            )
        return path
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise ModelNotFoundError(f"model {model!r} is neither a checkpoint directory nor a hub repo id (owner/name)")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(
            model, cache_dir=download_dir, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
        )
    except Exception as e:  # no network, unknown repo, gated repo: all end the same way for the user
        raise ModelNotFoundError(
            f"could not download {model!r} from the Hugging Face hub ({type(e).__name__}: {e}). "
            "Point --model at a local checkpoint directory instead."
        ) from e
    return Path(local)


def checkpoint_path(model: str | None, download_dir: str | None = None) -> Path:
    """The checkpoint directory to load: `model` resolved, or the demo model's when none is given."""
    if model is None:
        from ringllm.engine.demo import demo_model_path

        return demo_model_path()
    return resolve_model_path(model, download_dir)


def generation_eos_ids(path: Path) -> set[int]:
    """The end-of-sequence ids of the checkpoint's generation_config.json (none without one): they end an
    output like config.json's own."""
    f = path / "generation_config.json"
    if not f.is_file():
        return set()
    eos = json.loads(f.read_text()).get("eos_token_id")
    return set() if eos is None else ({eos} if isinstance(eos, int) else set(eos))


def read_config(path: Path) -> dict:
    """The checkpoint's config.json (for a GGUF file, the one its metadata describes). Quantized checkpoints
    other than GGUF (fp8, AWQ, GPTQ, ...) are refused here, before anything is loaded."""
    if gguf.is_gguf(path):
        return gguf.opened(path).config()
    with open(path / "config.json") as f:
        cfg = json.load(f)
    quant = cfg.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else "?"
        raise ModelNotFoundError(
            f"{path / 'config.json'} has a quantization_config (quant_method {method!r}): ringllm loads "
            f"unquantized safetensors checkpoints and GGUF files, not {method} weights; use the unquantized "
            "model or a GGUF file"
        )
    return cfg


def pick_dtype(requested: str, cfg: dict, device: torch.device) -> torch.dtype:
    if requested != "auto":
        return DTYPES[requested]
    if device.type == "cpu":
        return torch.float32  # CPU matmuls in bf16 are slow and inexact; the CPU path is the reference
    name = cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"
    return DTYPES.get(name, torch.bfloat16)


def load_weights(model: DecoderForCausalLM, path: Path) -> None:
    """Every checkpoint tensor offered to the model (each rank keeps its part); then an error if a tensor it
    needs was not in the checkpoint."""
    disable = not os.isatty(2) or os.environ.get("RINGLLM_NO_PROGRESS") == "1"
    loaded: set[str] = set()
    if gguf.is_gguf(path):
        f = gguf.opened(path)
        cfg = f.config()
        names = f.tensor_names()
        tensors = tqdm(f.hf_tensors(cfg), total=len(names), desc="loading GGUF weights", unit="tensor", disable=disable)
        for name, array in tensors:
            if model.load_weight(name, torch.from_numpy(np.require(array, requirements=["C", "W"]))):
                loaded.add(name)
        gguf.open_gguf.cache_clear()  # the reader's metadata is big; nothing reads it after the weights
        check_complete(model, loaded, path)
        log.info("weights loaded", path=str(path), tensors=len(loaded), format="gguf")
        return
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelNotFoundError(f"{path} has no *.safetensors files")
    entries: list[tuple[Path, str]] = []
    for file in files:
        with safe_open(file, framework="pt") as f:
            entries += [(file, n) for n in f.keys()]  # noqa: SIM118 (safe_open is not a mapping)
    handles = {}
    try:
        for file, name in tqdm(entries, desc="loading weights", unit="tensor", disable=disable):
            if file not in handles:
                handles[file] = safe_open(file, framework="pt").__enter__()
            # A lazy slice: a tensor-parallel rank reads only the rows or columns it holds.
            if model.load_weight(name, handles[file].get_slice(name)):
                loaded.add(name)
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)
    check_complete(model, loaded, path)
    log.info("weights loaded", path=str(path), tensors=len(loaded), files=len(files))


def required_tensors(model: DecoderForCausalLM) -> set[str]:
    """The Hugging Face tensor names this rank's part of the model is built from."""
    shape = model.shape
    names = set()
    if model.embed_tokens is not None:  # the first stage's, or the last's tied head
        names.add("model.embed_tokens.weight")
    if model.lm_head is not None:
        names.add("lm_head.weight")
    if model.norm is not None:
        names.add("model.norm.weight")
    per_layer = [
        "input_layernorm.weight",
        "post_attention_layernorm.weight",
        "mlp.gate_proj.weight",
        "mlp.up_proj.weight",
        "mlp.down_proj.weight",
    ]
    per_layer += [f"self_attn.{p}_proj.weight" for p in "qkvo"]
    if shape.qkv_bias:
        per_layer += [f"self_attn.{p}_proj.bias" for p in "qkv"]
    if shape.qk_norm:
        per_layer += ["self_attn.q_norm.weight", "self_attn.k_norm.weight"]
    for layer in model.layer_range:
        names.update(f"model.layers.{layer}.{p}" for p in per_layer)
    return names


def check_complete(model: DecoderForCausalLM, loaded: set[str], path: Path) -> None:
    have = {n if n.startswith(("model.", "lm_head.")) else f"model.{n}" for n in loaded}
    missing = sorted(required_tensors(model) - have)
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise ModelNotFoundError(
            f"the checkpoint at {path} is incomplete: {len(missing)} tensor(s) the model needs are missing: {shown}"
        )
