"""Finding a checkpoint (a directory or a hub repo id) and loading its safetensors into a model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from engine.logs import get_logger

log = get_logger("engine.loader")

DTYPES = {
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
}


class ModelNotFoundError(ValueError):
    """No usable checkpoint at the given path or hub id."""


def resolve_model_path(model: str, download_dir: str | None = None) -> Path:
    """A local directory as is; otherwise a hub repo id downloaded through huggingface_hub."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} has no config.json: not a Hugging Face checkpoint directory")
        return path
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise ModelNotFoundError(f"model {model!r} is neither a checkpoint directory nor a hub repo id (owner/name)")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(model, cache_dir=download_dir,
                                  allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
    except Exception as e:  # no network, unknown repo, gated repo: all end the same way for the user
        raise ModelNotFoundError(
            f"could not download {model!r} from the Hugging Face hub ({type(e).__name__}: {e}). "
            "Point --model at a local checkpoint directory instead."
        ) from e
    return Path(local)


def checkpoint_path(model: str | None, download_dir: str | None = None) -> Path:
    """The checkpoint directory to load: `model` resolved, or the demo model's when none is given."""
    if model is None:
        from engine.demo import demo_model_path

        return demo_model_path()
    return resolve_model_path(model, download_dir)


def read_config(path: Path) -> dict:
    with open(path / "config.json") as f:
        return json.load(f)


def pick_dtype(requested: str, cfg: dict, device: torch.device) -> torch.dtype:
    if requested != "auto":
        return DTYPES[requested]
    if device.type == "cpu":
        return torch.float32  # CPU matmuls in bf16 are slow and inexact; the CPU path is the reference
    name = cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"
    return DTYPES.get(name, torch.bfloat16)


def load_weights(model: torch.nn.Module, path: Path) -> None:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelNotFoundError(f"{path} has no *.safetensors files")
    names = []
    for file in files:
        with safe_open(file, framework="pt") as f:
            names += [(file, n) for n in f.keys()]
    loaded = set()
    disable = not os.isatty(2) or os.environ.get("RINGLLM_NO_PROGRESS") == "1"
    handles = {}
    try:
        for file, name in tqdm(names, desc="loading weights", unit="tensor", disable=disable):
            if file not in handles:
                handles[file] = safe_open(file, framework="pt").__enter__()
            # A lazy slice: a tensor-parallel rank reads only the rows or columns it holds.
            if model.load_weight(name, handles[file].get_slice(name)):
                loaded.add(name)
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)
    log.info("weights loaded", path=str(path), tensors=len(loaded), files=len(files))
