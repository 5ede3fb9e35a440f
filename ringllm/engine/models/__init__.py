"""Model families by the `architectures` name in config.json."""

from ringllm.engine.models.llama import LlamaForCausalLM
from ringllm.engine.models.qwen2 import Qwen2ForCausalLM
from ringllm.engine.models.qwen3 import Qwen3ForCausalLM

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
