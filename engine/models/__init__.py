"""Model families by the `architectures` name in config.json."""

from engine.models.llama import LlamaForCausalLM
from engine.models.qwen2 import Qwen2ForCausalLM
from engine.models.qwen3 import Qwen3ForCausalLM

MODEL_CLASSES = {
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "LlamaForCausalLM": LlamaForCausalLM,
}


def model_class(cfg: dict):
    arch = (cfg.get("architectures") or ["?"])[0]
    if arch not in MODEL_CLASSES:
        raise ValueError(f"architecture {arch!r} is not supported; supported: {', '.join(MODEL_CLASSES)}")
    return MODEL_CLASSES[arch]
