"""--generation-config (vLLM's option): the sampling defaults a model's creators recommend, from its
generation_config.json, for the fields a request leaves unset. `auto` reads the model's file, `vllm` none, and
a folder that folder's file.

As vLLM does (ModelConfig.get_diff_sampling_param over GenerationConfig.to_diff_dict), only temperature, top_p,
top_k, min_p, repetition_penalty and max_new_tokens (as max_tokens) are taken, and only where they differ from
transformers' GenerationConfig defaults: a file that spells out top_k 50, transformers' default, leaves top_k
unset (off), as in vLLM. Each value must fit the bounds ipc/sampling.py declares for the field."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec

from ringllm.app.settings import SamplingDefaults
from ringllm.ipc.sampling import SamplingParams

FILE = "generation_config.json"
# generation_config.json's name -> the request field it is the default of.
FIELDS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}
# transformers' GenerationConfig() values of those fields (min_p and max_new_tokens default to None).
HF_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 50, "repetition_penalty": 1.0}


class GenerationConfigError(ValueError):
    pass


def folder_problem(choice: str) -> str | None:
    """A --generation-config FOLDER without the file, found before the engine loads."""
    if choice in ("auto", "vllm") or (Path(choice).expanduser() / FILE).is_file():
        return None
    return f"--generation-config {choice}: no {FILE} there (auto: the model's; vllm: no defaults)"


def sampling_defaults(choice: str, model_path: str) -> tuple[SamplingDefaults, str]:
    """The defaults for --generation-config `choice` and the model at `model_path` (the engine's, a hub id
    resolved), with one line saying where they came from, for the start-up log."""
    if choice == "vllm":
        return SamplingDefaults(), "no sampling defaults (--generation-config vllm)"
    folder = Path(model_path if choice == "auto" else choice).expanduser()
    if folder.is_file():  # a GGUF file: llama.cpp's format carries no generation config
        return SamplingDefaults(), f"no sampling defaults: a GGUF file has no {FILE} ({folder.name})"
    path = folder / FILE
    if not path.is_file():
        return SamplingDefaults(), f"no sampling defaults: {folder} has no {FILE}"
    defaults = read_defaults(path)
    if defaults == SamplingDefaults():
        return defaults, f"no sampling defaults in {path}"
    return defaults, f"sampling defaults from {path} (--generation-config vllm to ignore them)"


def read_defaults(path: Path) -> SamplingDefaults:
    """The file's sampling fields that differ from transformers' defaults, checked."""
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GenerationConfigError(f"{path}: {e}") from None
    if not isinstance(config, dict):
        raise GenerationConfigError(f"{path}: not a JSON object")
    values = {
        field: config[name]
        for name, field in FIELDS.items()
        if config.get(name) is not None and config[name] != HF_DEFAULTS.get(name)
    }
    try:
        defaults = msgspec.convert(values, SamplingDefaults)
        SamplingParams(**{k: v for k, v in msgspec.structs.asdict(defaults).items() if v is not None})
    except (msgspec.ValidationError, ValueError) as e:
        raise GenerationConfigError(f"{path}: {e}") from None
    return defaults
